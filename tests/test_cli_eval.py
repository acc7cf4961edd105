"""`spinlearn eval` end to end on a tiny saved model with a locally built tokenizer: perplexities against a
direct computation, rotation invariance at 16 bits, learned rotations from exports and rotation files, the
JSON record, and the user errors (exit code 2 with a message that says what is wrong)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from spinlearn.cli import main
from helpers import TINY_WORDS, tiny_model, tiny_tokenizer


SEQ = 16



def save_model(model, dest: Path) -> Path:
    model.save_pretrained(dest, safe_serialization=True)
    tiny_tokenizer().save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    # One paragraph per file: the tokenized stream is then exactly tokenizer(text).
    (root / "test.txt").write_text(" ".join(rng.choice(TINY_WORDS) for _ in range(8 * SEQ + 5)) + "\n")
    (root / "train.txt").write_text(" ".join(rng.choice(TINY_WORDS) for _ in range(20 * SEQ)) + "\n")
    model = save_model(tiny_model("llama", initializer_range=0.1), root / "llama")
    return root, model


def run(*argv) -> int:
    return main(["eval", *map(str, argv)])


def eval_json(root: Path, model: Path, *extra, name="out.json") -> dict:
    out = root / name
    assert run("--model", model, "--data", root / "test.txt", "--seqlen", SEQ, "--json", out, *extra) == 0
    return json.loads(out.read_text())


def reference_ppl(model_dir: Path, text_file: Path) -> float:
    ids = torch.tensor(tiny_tokenizer()(text_file.read_text())["input_ids"])
    n = ids.numel() // SEQ
    windows = ids[: n * SEQ].view(n, SEQ)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits.double(), -1)
    nll = -logp[:, :-1].gather(2, windows[:, 1:, None]).mean().item()
    return math.exp(nll)


def test_float_rotation_invariance_and_json(env, capsys):
    root, model = env
    ref = reference_ppl(model, root / "test.txt")
    none16 = eval_json(root, model)
    assert none16["ppl"] == pytest.approx(ref, rel=1e-6)
    assert f"perplexity {none16['ppl']:.4f}" in capsys.readouterr().out
    s = none16["settings"]
    for key in ("model", "dtype", "rotation", "layout", "w_method", "r3", "r4", "w", "a", "kv", "lm_head",
                "eval_windows", "eval_seqlen", "data", "calib_data", "nsamples", "max_windows", "eval_tokens"):
        assert key in s, key
    assert s["eval_windows"] == 8 and s["eval_seqlen"] == SEQ and s["rotation"] == "none"

    had16 = eval_json(root, model, "--rotation", "hadamard", "--r3", "--r4", "--seed", 5)
    assert had16["ppl"] == pytest.approx(ref, rel=1e-4)
    assert had16["settings"]["seed"] == 5 and had16["settings"]["r3"] and had16["settings"]["r4"]

    w4a4 = eval_json(root, model, "--rotation", "hadamard", "--w-bits", 4, "--a-bits", 4, "--kv-bits", 4,
                     "--max-windows", 3)
    assert abs(w4a4["ppl"] / reference_ppl(model, root / "test.txt") - 1) > 1e-3
    assert w4a4["settings"]["eval_windows"] == 3
    assert [w4a4["settings"][k]["bits"] for k in ("w", "a", "kv", "lm_head")] == [4, 4, 4, 16]


def test_gptq_through_the_cli(env):
    root, model = env
    res = eval_json(root, model, "--w-bits", 4, "--w-method", "gptq", "--calib-data", root / "train.txt",
                    "--nsamples", 6, "--rotation", "hadamard")
    g = res["settings"]["gptq"]
    assert g["nsamples"] == 6 and g["seqlen"] == SEQ and g["layers_quantized"] == 14  # 2 layers x 7 linears
    assert g["rtn_fallback"] == []  # no 3-D expert tensors in a dense model
    assert res["settings"]["w_method"] == "gptq" and res["settings"]["calib_data"].endswith("train.txt")
    ref = reference_ppl(model, root / "test.txt")
    assert math.isfinite(res["ppl"]) and res["ppl"] != pytest.approx(ref, rel=1e-4)


def test_learned_rotations(env, tmp_path):
    root, model = env
    ref = reference_ppl(model, root / "test.txt")
    rotated = tmp_path / "rotated"
    assert main(["rotate", "--model", str(model), "--output", str(rotated), "--mode", "orthogonal"]) == 0
    quant = ("--w-bits", 4, "--a-bits", 8)

    # An export (rotations.safetensors beside the weights) holds its rotations: nothing is folded again.
    learned = eval_json(root, rotated, "--rotation", "learned", *quant)
    assert learned["ppl"] == pytest.approx(eval_json(root, rotated, *quant)["ppl"], rel=1e-9)
    assert learned["settings"]["rotations_folded"] is False
    assert eval_json(root, rotated, "--rotation", "learned")["ppl"] == pytest.approx(ref, rel=1e-4)

    # The same matrices folded into the plain model from the file give the same quantized model.
    from_file = eval_json(root, model, "--rotation", "learned", "--rotations", rotated / "rotations.safetensors",
                          *quant)
    assert from_file["ppl"] == pytest.approx(learned["ppl"], rel=1e-3)
    assert from_file["settings"]["rotations_folded"] is True


def test_run_model_gets_the_online_hadamards_its_recipe_used(env, tmp_path):
    """train_rotations.py layout: OUT/model (a plain float model) + OUT/rotations + OUT/recipe.yaml with R4 on:
    the learned model is evaluated with the run's online R4, as training measured it."""
    root, model = env
    m = AutoModelForCausalLM.from_pretrained(model)
    save_model(m, tmp_path / "out" / "model")
    save_file({"r1": torch.eye(64)}, tmp_path / "out" / "rotations.safetensors")  # what the run writes beside it
    (tmp_path / "out" / "recipe.yaml").write_text("rotation: {r3: false, r4: true}\n")
    res = eval_json(root, tmp_path / "out" / "model", "--rotation", "learned")
    assert res["ppl"] == pytest.approx(reference_ppl(model, root / "test.txt"), rel=1e-4)  # exact in float
    assert res["settings"]["r4"] is True and res["settings"]["online_recorded"] == ["r4"]
    assert res["settings"]["rotations_file"].endswith("out/rotations.safetensors")
    quantized = eval_json(root, tmp_path / "out" / "model", "--rotation", "learned", "--a-bits", "4")
    with_r4 = eval_json(root, model, "--rotation", "none", "--r4", "--a-bits", "4")
    plain = eval_json(root, model, "--rotation", "none", "--a-bits", "4")
    assert quantized["ppl"] == pytest.approx(with_r4["ppl"], rel=1e-6) and quantized["ppl"] != plain["ppl"]


def test_run_model_gets_the_activation_clips_its_run_learned(env, tmp_path, capsys):
    """A run that learned clip ratios (quant.learn_a_clip) measured its model with them: evaluating its model/
    applies them too (every ratio 0.5 here, so the reference is --a-clip 0.5), unless --activation-clips none."""
    from spinlearn.fakequant import wrap_model
    from spinlearn.quant import ActQuantizer, QuantSettings

    root, model = env
    m = AutoModelForCausalLM.from_pretrained(model)
    save_model(m, tmp_path / "out" / "model")
    save_file({"r1": torch.eye(64)}, tmp_path / "out" / "rotations.safetensors")
    (tmp_path / "out" / "recipe.yaml").write_text("rotation: {r3: false, r4: false}\n")
    handle = wrap_model(m, quant=QuantSettings.from_flags(a_bits=4))
    names = [n for n, q in m.named_modules() if isinstance(q, ActQuantizer) and q.head_dim is None]
    handle.remove()
    clips = tmp_path / "out" / "activation_clips.safetensors"
    save_file({n: torch.tensor(0.5) for n in names}, clips)

    run_model = tmp_path / "out" / "model"
    recorded = eval_json(root, run_model, "--rotation", "learned", "--a-bits", 4)
    assert recorded["settings"]["activation_clips"] == len(names) > 0
    reference = eval_json(root, model, "--a-bits", 4, "--a-clip", 0.5)
    assert recorded["ppl"] == pytest.approx(reference["ppl"], rel=1e-9)
    off = eval_json(root, run_model, "--rotation", "learned", "--a-bits", 4, "--activation-clips", "none")
    assert off["settings"]["activation_clips"] == 0
    assert off["ppl"] == pytest.approx(eval_json(root, model, "--a-bits", 4)["ppl"], rel=1e-9) != recorded["ppl"]
    given = eval_json(root, model, "--a-bits", 4, "--activation-clips", clips)  # any model, a file given
    assert given["ppl"] == pytest.approx(reference["ppl"], rel=1e-9)
    assert eval_json(root, run_model, "--rotation", "learned")["settings"]["activation_clips"] == 0  # float: unused
    gptq = eval_json(root, run_model, "--rotation", "learned", "--a-bits", 4, "--w-bits", 4, "--w-method", "gptq",
                     "--calib-data", root / "train.txt", "--nsamples", 4)  # the job's GPTQ row uses them too
    assert gptq["settings"]["activation_clips"] == len(names)
    capsys.readouterr()
    assert run("--model", model, "--data", root / "test.txt", "--activation-clips", clips) == 2
    assert "clip ratios apply to quantized activations" in capsys.readouterr().err


def test_run_model_gets_the_weight_clips_its_run_learned_on_its_grid_only(env, tmp_path, capsys):
    """Recorded weight clip ratios (quant.learn_w_clip) apply to RTN weights on the run's grid (its recipe's bits and
    group size); another group size leaves them out, and a file given for it is refused by shape."""
    from spinlearn.fakequant import weight_quantizers, wrap_model
    from spinlearn.quant import QuantSettings

    root, model = env
    m = AutoModelForCausalLM.from_pretrained(model)
    out = tmp_path / "out"
    save_model(m, out / "model")
    save_file({"r1": torch.eye(64)}, out / "rotations.safetensors")
    (out / "recipe.yaml").write_text("rotation: {r3: false, r4: false}\nquant: {w_bits: 4, w_groupsize: -1}\n")
    handle = wrap_model(m, quant=QuantSettings.from_flags(w_bits=4))
    shapes = {n: (q_.wspec, getattr(m.get_submodule(n.rsplit(".", 1)[0]), "weight").shape[0])
              for n, q_ in weight_quantizers(m).items()}
    handle.remove()
    clips = out / "weight_clips.safetensors"
    save_file({n: torch.full((rows, 1), 0.5) for n, (_, rows) in shapes.items()}, clips)

    run_model = out / "model"
    recorded = eval_json(root, run_model, "--rotation", "learned", "--w-bits", 4)
    assert recorded["settings"]["weight_clips"] == len(shapes) > 0
    plain = eval_json(root, run_model, "--rotation", "learned", "--w-bits", 4, "--weight-clips", "none")
    assert plain["settings"]["weight_clips"] == 0 and plain["ppl"] != pytest.approx(recorded["ppl"], rel=1e-6)
    given = eval_json(root, model, "--w-bits", 4, "--weight-clips", clips)  # any model, a file given
    assert given["ppl"] == pytest.approx(recorded["ppl"], rel=1e-9)
    other_grid = eval_json(root, run_model, "--rotation", "learned", "--w-bits", 4, "--w-groupsize", 8)
    assert other_grid["settings"]["weight_clips"] == 0  # learned per channel: not for groups of 8
    gptq = ("--rotation", "learned", "--w-bits", 4, "--w-method", "gptq", "--calib-data", root / "train.txt",
            "--nsamples", 4)
    on_grid = eval_json(root, run_model, *gptq)  # GPTQ rounds on the learned ratios' grid
    assert on_grid["settings"]["gptq"]["learned_grid"] == len(shapes)
    searched = eval_json(root, run_model, *gptq, "--w-clip", "--weight-clips", "none")
    assert searched["settings"]["gptq"]["learned_grid"] == 0
    assert searched["ppl"] != pytest.approx(on_grid["ppl"], rel=1e-6)
    (out / "recipe.yaml").write_text("rotation: {r3: false, r4: false}\n"
                                     "quant: {w_bits: 4, w_groupsize: -1, gptq: {learned_grid: false}}\n")
    assert eval_json(root, run_model, *gptq)["settings"]["gptq"]["learned_grid"] == 0  # the recipe said no
    (out / "recipe.yaml").write_text("rotation: {r3: false, r4: false}\nquant: {w_bits: 4, w_groupsize: -1}\n")
    capsys.readouterr()
    assert run("--model", model, "--data", root / "test.txt", "--seqlen", SEQ, "--w-bits", 4, "--w-groupsize", 8,
               "--weight-clips", clips) == 2
    err = capsys.readouterr().err
    assert "(group size 8) needs (" in err and "[rows, groups]" in err
    assert run("--model", model, "--data", root / "test.txt", "--seqlen", SEQ, "--weight-clips", clips) == 2
    assert "weight clip ratios apply to int weights, round-to-nearest" in capsys.readouterr().err


def test_a_run_model_evaluated_as_it_is_says_what_it_leaves_out(env, tmp_path, capsys):
    """`--rotation none` (the default) on a run's model/ evaluates it without its online Hadamards and clip ratios,
    a different number from the run's learned row: the command says so, and names the flag that reproduces it."""
    root, model = env
    out = tmp_path / "out"
    save_model(AutoModelForCausalLM.from_pretrained(model), out / "model")
    save_file({"r1": torch.eye(64)}, out / "rotations.safetensors")
    (out / "recipe.yaml").write_text("rotation: {r3: true, r4: true}\nquant: {w_bits: 4}\n")
    capsys.readouterr()
    as_is = eval_json(root, out / "model", "--a-bits", 4)
    assert "without the online Hadamards and clip ratios its run used; --rotation learned" in capsys.readouterr().err
    learned = eval_json(root, out / "model", "--a-bits", 4, "--rotation", "learned")
    assert "note:" not in capsys.readouterr().err
    assert learned["settings"]["r4"] and not as_is["settings"]["r4"]
    assert learned["ppl"] != pytest.approx(as_is["ppl"], rel=1e-6)
    eval_json(root, model, "--a-bits", 4)  # a plain model: nothing to say
    assert "note:" not in capsys.readouterr().err


def _corrupt_model(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 3])
    return dest


@pytest.mark.parametrize(
    "case",
    ["short_data", "seqlen_beyond_context", "bits_low", "bits_high", "learned_plain", "corrupt_model", "missing_rotations",
     "garbage_rotations", "gptq_no_calib", "rotations_without_learned", "rotations_on_export"],
)
def test_user_errors(env, tmp_path, capsys, case):
    root, model = env
    data = root / "test.txt"
    args = ["--model", model, "--data", data, "--seqlen", SEQ]
    expected = {
        "seqlen_beyond_context": (["--seqlen", 10_000], "--seqlen=10000 is beyond the model's context "
                                                        "(max_position_embeddings = 128)"),
        "bits_low": (["--w-bits", 1], "--w-bits=1 is out of range"),
        "bits_high": (["--kv-bits", 17], "--kv-bits=17 is out of range"),
        "learned_plain": (["--rotation", "learned"], "--rotation learned needs a model exported by train_rotations.py"),
        "missing_rotations": (["--rotation", "learned", "--rotations", tmp_path / "missing.safetensors"],
                              "missing.safetensors"),
        "gptq_no_calib": (["--w-method", "gptq", "--w-bits", 4], "needs calibration data"),
        "rotations_without_learned": (["--rotation", "hadamard", "--rotations", tmp_path / "r.safetensors"],
                                      "--rotations goes with --rotation learned"),
    }
    if case == "short_data":  # fewer tokens than one window of SEQ
        args[3] = tmp_path / "short.txt"
        args[3].write_text("the cat sat on the mat\n")
        extra, message = [], f"has {len(tiny_tokenizer()(args[3].read_text())['input_ids'])} tokens"
    elif case == "corrupt_model":
        args[1] = _corrupt_model(model, tmp_path / "bad")
        extra, message = [], str(tmp_path / "bad" / "model.safetensors")
    elif case == "garbage_rotations":
        (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
        extra = ["--rotation", "learned", "--rotations", tmp_path / "garbage.safetensors"]
        message = "garbage.safetensors"
    elif case == "rotations_on_export":
        rotated = tmp_path / "rotated"
        assert main(["rotate", "--model", str(model), "--output", str(rotated)]) == 0
        (tmp_path / "other.safetensors").write_bytes((rotated / "rotations.safetensors").read_bytes())
        args[1] = rotated
        extra = ["--rotation", "learned", "--rotations", tmp_path / "other.safetensors"]
        message = "already has rotations"
    else:
        extra, message = expected[case]
    capsys.readouterr()
    assert run(*args, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress bar on a new file
    assert err.startswith("spinlearn eval: error:") and message in err, err


def _fake_lm_eval(monkeypatch, seen: dict):
    """A stand-in for the lm-eval harness (not installed here, and its task data needs the hub): records what
    model it was handed and whether spinlearn's quantizers were live while it ran."""
    import sys
    import types

    from spinlearn.fakequant import ATTN_NAME

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen["model"], seen["tokenizer"] = pretrained, tokenizer

    def simple_evaluate(model, tasks, num_fewshot, limit):
        m = seen["model"]
        seen["quantized_during_eval"] = (
            m.config._attn_implementation == ATTN_NAME and any(hasattr(x, "spinlearn_act") for x in m.modules())
        )
        seen["tasks"], seen["limit"] = tasks, limit
        return {"results": {t: {"acc,none": 0.5, "alias": t} for t in tasks}}

    pkg = types.ModuleType("lm_eval")
    pkg.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", pkg)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)


def test_zero_shot_tasks_run_on_the_quantized_model(env, monkeypatch, capsys):
    root, model = env
    seen: dict = {}
    _fake_lm_eval(monkeypatch, seen)
    res = eval_json(root, model, "--w-bits", 4, "--a-bits", 4, "--kv-bits", 4, "--tasks", "piqa,arc_easy",
                    "--task-limit", 5, name="zs.json")
    assert seen["tasks"] == ["piqa", "arc_easy"] and seen["limit"] == 5
    assert seen["quantized_during_eval"] is True
    assert res["zero_shot"] == {"piqa": {"acc,none": 0.5}, "arc_easy": {"acc,none": 0.5}}
    assert "zero-shot piqa: acc,none 0.5000" in capsys.readouterr().out


def test_zero_shot_without_the_harness_is_a_clear_error(env, monkeypatch, capsys):
    root, model = env
    monkeypatch.setattr("spinlearn.cli._lm_eval_available", lambda: False)
    assert run("--model", model, "--data", root / "test.txt", "--seqlen", SEQ, "--tasks", "piqa") == 2
    assert "pip install 'spinlearn[eval]'" in capsys.readouterr().err
