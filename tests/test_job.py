"""launch/train_rotations.py end to end on a tiny Llama: outputs, resume, DDP, and clear failures.

Runs in-process (``main([...])``) except the one two-process DDP launch, which needs real ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spinlearn.config import load_recipe
from spinlearn.data import load_text, tokenize_concat
from spinlearn.job import GUARD_KEPT_START
from spinlearn.loading import load_tokenizer
from spinlearn.optim import max_orthogonality_error
from helpers import ROOT, launch_script, save_remote_code_model_dir, save_tiny_model_dir
from spinlearn.artifacts import OPTIMIZER_FILE, ROTATIONS_FILE, RUN_MARKER
from spinlearn.trainer import RotationTrainer
from transformers import TrainerCallback

DEMO_DATA = ROOT / "spinlearn" / "demo" / "data"


launch_main = launch_script("train_rotations").main


TEST_RECIPE = """\
# The demo recipe scaled down to a tiny random Llama: every stage runs (baselines, R1+R2 learned, R3+R4 online
# Hadamards, export, GPTQ row) in seconds.
model: {{path: {model}, dtype: float32}}
data: {{train: {train}, eval: {test}, seqlen: 32, nsamples: 8, eval_max_windows: 2}}
quant: {{w_bits: 4, a_bits: 4, kv_bits: 4, lm_head_bits: 16, gptq: {{nsamples: 2}}}}
rotation: {{layout: transformer_universal, init: hadamard, r3: true, r4: true, optimizer: cayley_sgd, momentum: 0.9}}
train: {{learning_rate: 1.5, lr_scheduler_type: cosine, max_steps: 4, per_device_train_batch_size: 1,
         logging_steps: 1, save_steps: 2, report_to: [none]}}
eval: {{guard: false}}     # 4 steps on a random model: keep what was learned (the guard has its own test)
output_dir: unused
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = save_tiny_model_dir(root / "tiny", "llama")
    # Slices of the demo text: a few thousand tokens each, enough for 8 x 32 training tokens and 2 eval windows.
    train, test = root / "train.txt", root / "test.txt"
    train.write_text(DEMO_DATA.joinpath("train.txt").read_text()[:20_000])
    test.write_text(DEMO_DATA.joinpath("test.txt").read_text()[:8_000])
    recipe = root / "tiny.yaml"
    recipe.write_text(TEST_RECIPE.format(model=model, train=train, test=test))
    return {"root": root, "model": model, "train": train, "test": test, "recipe": recipe}


def overrides_for(out: Path, **extra) -> list[str]:
    return [f"output_dir={out}", *(f"{k}={v}" for k, v in extra.items())]


def run_main(assets, overrides: list[str]) -> int:
    return launch_main(["--config", str(assets["recipe"]), *overrides])


def nothing_exported(out: Path) -> bool:
    return not (out / "model").exists() and not (out / "metrics.json").exists()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


IDS = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def original_logits(assets) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets["model"]).eval()(input_ids=IDS).logits


# -------------------------------------------------------------------------------------------- single process
def test_weight_clips_start_at_the_mse_search_of_the_start_weights(assets, tmp_path, capsys):
    """quant.w_clip_init mse: the learned weight clip ratios start at the MSE search's ratios of the weights the
    quantizers read at the start (start matrices, R4's Hadamard in down_proj). With a learning rate that cannot move
    them, the run's saved ratios are the search's on a float64 fold of the start matrices (a row whose two best
    ratios tie to float32 rounding may pick the neighbour)."""
    from transformers import AutoModelForCausalLM

    from spinlearn.artifacts import WEIGHT_CLIPS_FILE
    from spinlearn.fusion import fold_rotations
    from spinlearn.online import fold_online, online_linears
    from spinlearn.quant import LEARNED_CLIP_DEFAULT, MSE_CLIP_GRID, mse_clip_ratio
    from spinlearn.rotation_plan import make_matrices, prepare_model

    out = tmp_path / "out"
    extra = {"quant.learn_w_clip": "true", "quant.w_clip_init": "mse", "quant.w_clip_lr": "1e-12", "data.eval": "null"}
    assert run_main(assets, overrides_for(out, **extra)) == 0
    logged = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float64)
    plan = prepare_model(model, "transformer_universal")
    fold_rotations(plan.placements, make_matrices(plan, mode="hadamard", seed=0), True)
    fold_online(model, online_linears(model, r4=True))
    saved = load_file(out / WEIGHT_CLIPS_FILE)
    assert len(saved) == 2 * 7
    assert f"weight clips: {sum(r.numel() for r in saved.values())} ratios start at the MSE search's" in logged
    got = torch.cat([r.double().flatten() for r in saved.values()])
    want = torch.cat([mse_clip_ratio(model.get_parameter(name).detach().reshape(*r.shape, -1), 4, True)
                      .clamp(max=LEARNED_CLIP_DEFAULT).flatten() for name, r in saved.items()])
    assert (got - want).abs().max() <= 1 / MSE_CLIP_GRID + 1e-6
    assert ((got - want).abs() <= 1e-6).double().mean() >= 0.95
    assert want.min() < 0.9  # the search clips some rows: a run started at 0.99 would fail the checks above


def test_launch_end_to_end_single_process(assets, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = overrides_for(out, **{"train.report_to": "[wandb]", "train.run_name": "e2e",
                                      "export.schemes": "[float,w4a16]", "export.group_size": 8})
    from spinlearn import plots

    logged, real_log = [], plots.log_to_wandb
    monkeypatch.setattr(plots, "log_to_wandb", lambda metrics, images=None: logged.append(
        {"written": real_log(metrics, images), "rows": dict(metrics["rows"])}) or logged[-1]["written"])
    assert run_main(assets, overrides) == 0

    # Rotations: every matrix, orthogonal, moved away from the random-Hadamard start.
    rot = load_file(out / "rotations.safetensors")
    assert set(rot) == {"r1", "r2.model.layers.0", "r2.model.layers.1"}
    assert rot["r1"].shape == (64, 64) and rot["r2.model.layers.0"].shape == (16, 16)
    assert max_orthogonality_error(list(rot.values())) <= 1e-5
    ckpt4 = load_file(out / "checkpoint-4" / ROTATIONS_FILE)
    assert all((rot[k].double() - ckpt4[k].double()).abs().max() <= 1e-5 for k in rot)  # final = last step, polished

    # The fused model is a plain HF model, exact in plain transformers although the recipe turns R3/R4 on: the
    # online Hadamards are identities in float and only exports that declare them fold their weight half.
    fused = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert "spinlearn_online_rotations" not in fused.config.to_dict()
    with torch.no_grad():
        assert rel_err(fused(input_ids=IDS).logits, original_logits(assets)) <= 1e-4
    assert (out / "model" / "tokenizer.json").is_file()

    # Every export the run wrote, loaded by the format's own library (compressed-tensors, through spinlearn's
    # loader, which applies the declared online R4 as vLLM does): the float export is the original model; the
    # W4A16 one computes the fused model with RTN int4 weights (group 8) and the online R4.
    from spinlearn.export import load_export
    from spinlearn.fakequant import wrap_model
    from spinlearn.online import online_linears
    from spinlearn.quant import QuantSettings

    with torch.no_grad():
        assert rel_err(load_export(out / "export-float").eval()(input_ids=IDS).logits, original_logits(assets)) <= 1e-4
        w4 = load_export(out / "export-w4a16").eval()(input_ids=IDS).logits
        handle = wrap_model(fused, quant=QuantSettings.from_flags(w_bits=4, w_groupsize=8),
                            online=online_linears(fused, r4=True))
        assert rel_err(w4, fused(input_ids=IDS).logits) <= 1e-4
        handle.remove()
        assert rel_err(w4, original_logits(assets)) > 1e-3  # the int4 weights are really there
    assert (out / "export-w4a16" / "README.md").read_text().count("vllm serve") >= 1

    # One run, complete, nothing staged left behind; every file written with the same (umask-respecting) mode.
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["status"] == "complete" and not list(out.glob(".staging-*"))
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in out.rglob("*")
             if p.is_file() and "wandb" not in p.parts}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}

    # The recipe is fully resolved and loads back to the same configuration.
    saved = load_recipe(out / "recipe.yaml")
    assert OmegaConf.to_container(saved) == OmegaConf.to_container(load_recipe(assets["recipe"], overrides))
    assert saved.train.max_steps == 4 and saved.model.path == str(assets["model"])

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ppl_float", "ppl_quant_no_rotation", "ppl_quant_before", "ppl_quant_after"):
        assert metrics[key] > 1, key
    assert metrics["steps"] == 4
    assert metrics["wall_time_s"] >= metrics["train_time_s"] > 0
    assert metrics["train_tokens_per_s"] > 0
    assert metrics["ppl_quant_before"] != metrics["ppl_float"]  # the quantizers were on
    assert (out / "results.md").read_text().count("|") > 10

    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / ROTATIONS_FILE).is_file() and (ckpt / OPTIMIZER_FILE).is_file()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    # The results table reached the wandb run (it was still open: the summary was written).
    assert logged and logged[0]["written"] and logged[0]["rows"] == metrics["rows"]

    # The pictures (the `plots` extra, installed with `test`): a training curve and the outlier profile.
    pytest.importorskip("matplotlib")
    import matplotlib.image

    for name in ("training_curve.png", "outlier_profile.png"):
        assert matplotlib.image.imread(out / name).shape[0] > 100, name


def test_guard_keeps_the_start_when_learning_made_it_worse(assets, tmp_path, monkeypatch):
    """eval.guard: a learned setting worse than the start on the evaluation split is replaced by the start: the
    run says so, records it, and exports the start matrices (float logits still the original model's)."""
    from transformers import AutoModelForCausalLM

    from spinlearn.job import RotationJob
    from spinlearn.rotation_plan import make_matrices, prepare_model

    real = RotationJob._ppl

    def worse(self, label, model):
        value = real(self, label, model)
        if "learned rotation" in label:  # pretend learning hurt
            value = self.metrics["ppl_quant_before"] * 1.5
            self.metrics["rows"][label] = value
        return value

    monkeypatch.setattr(RotationJob, "_ppl", worse)
    out = tmp_path / "out"
    # Plain GPTQ, so that the two GPTQ rows on the same matrices agree to float rounding: the refit calibrates on
    # quantized activations, whose rounding turns the two folds' float-rounding differences into ~1% here.
    overrides = {"eval.guard": "true", "eval.baselines": "true", "quant.gptq.refit": "false"}
    assert run_main(assets, overrides_for(out, **overrides)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["guard"]["kept"] == "start" and metrics["ppl_quant_after"] == metrics["ppl_quant_before"]
    # The GPTQ rows come after the verdict: the learned one is GPTQ on the start matrices too, and says so.
    gptq_row = "W4A4KV4 GPTQ, learned rotation" + GUARD_KEPT_START
    assert metrics["rows"][gptq_row] == metrics["ppl_gptq"] == pytest.approx(metrics["ppl_gptq_start"], rel=1e-4)
    start = make_matrices(prepare_model(AutoModelForCausalLM.from_pretrained(assets["model"]), "transformer_universal"),
                          mode="hadamard", seed=0)
    saved = load_file(out / "rotations.safetensors")
    assert max((saved[k].double() - start[k]).abs().max().item() for k in start) <= 1e-12
    with torch.no_grad():
        fused = AutoModelForCausalLM.from_pretrained(out / "model").eval()
        assert rel_err(fused(input_ids=IDS).logits, original_logits(assets)) <= 1e-4


W16A4KV4 = {"quant.w_bits": 16, "quant.w_method": "gptq", "quant.gptq.w_bits": 4, "eval.guard": "true",
            "eval.baselines": "false", "export.schemes": "[]"}


@pytest.mark.parametrize("hurt", [False, True])
def test_the_guard_judges_w16a4kv4_recipes_by_their_gptq_rows(assets, tmp_path, monkeypatch, hurt):
    """W16A4KV4 recipes deploy GPTQ weights, so the guard compares learned + GPTQ with the start + GPTQ (both rows
    computed before the exports; eval.baselines off). GPTQ rewrites the weights in place: the fused model written
    afterwards is the float one (exact), and when learning hurt under GPTQ it is the start's."""
    from transformers import AutoModelForCausalLM

    from spinlearn.job import RotationJob
    from spinlearn.rotation_plan import make_matrices, prepare_model

    real = RotationJob._gptq_ppl

    def judged(self, label, model, gq, clips, weight_clips):
        value = real(self, label, model, gq, clips, weight_clips)
        if "learned rotation" in label:  # pretend learning hurt (or helped) under GPTQ, whatever the W16 rows say
            value = self.metrics["rows"][label] = value * (2 if hurt else 0.5)
        return value

    monkeypatch.setattr(RotationJob, "_gptq_ppl", judged)
    out = tmp_path / "out"
    assert run_main(assets, overrides_for(out, **W16A4KV4)) == 0
    m = json.loads((out / "metrics.json").read_text())
    learned, start = "W4A4KV4 GPTQ, learned rotation", "W4A4KV4 GPTQ, random Hadamard rotation"
    assert m["guard"]["judged_on"] == learned and m["rows"][start] == m["ppl_gptq_start"]
    start_matrices = make_matrices(prepare_model(AutoModelForCausalLM.from_pretrained(assets["model"]),
                                                 "transformer_universal"), mode="hadamard", seed=0)
    saved = load_file(out / "rotations.safetensors")
    moved = max((saved[k].double() - start_matrices[k]).abs().max().item() for k in start_matrices)
    if hurt:
        assert m["guard"]["kept"] == "start" and m["guard"]["ppl_learned"] > m["guard"]["ppl_start"]
        assert m["rows"][learned + GUARD_KEPT_START] == m["ppl_gptq"] == m["ppl_gptq_start"]
        assert m["ppl_quant_after"] == m["ppl_quant_before"] and learned not in m["rows"]
        assert moved <= 1e-12
    else:
        assert m["guard"]["kept"] == "learned" and m["rows"][learned] == m["ppl_gptq"] <= m["ppl_gptq_start"]
        assert moved > 1e-6
    with torch.no_grad():
        fused = AutoModelForCausalLM.from_pretrained(out / "model").eval()
        assert rel_err(fused(input_ids=IDS).logits, original_logits(assets)) <= 1e-4


def test_a_rerun_clears_the_previous_run_and_a_killed_one_leaves_no_mix(assets, tmp_path, monkeypatch):
    """overwrite_output_dir: a new run removes the previous run's outputs at its start (files it did not write
    stay); killed while exporting, it leaves its marker at 'failed' and none of the previous run's outputs."""
    from spinlearn import artifacts as artifacts_mod

    out = tmp_path / "out"
    common = {"data.eval": "null", "train.max_steps": 2, "train.save_steps": 1, "overwrite_output_dir": "true"}
    assert run_main(assets, overrides_for(out, **common)) == 0
    first = json.loads((out / RUN_MARKER).read_text())
    (out / "notes.txt").write_text("mine")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts_mod, "save_rotations", killed)
    with pytest.raises(KeyboardInterrupt):
        run_main(assets, overrides_for(out, **{**common, "train.max_steps": 1}))
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["run_id"] != first["run_id"] and marker["status"] == "failed"
    left = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert left == ["checkpoint-1", "notes.txt", RUN_MARKER], left  # the new run's checkpoint, the user's file
    monkeypatch.undo()
    assert run_main(assets, overrides_for(out, **common)) == 0
    assert json.loads((out / RUN_MARKER).read_text())["status"] == "complete"
    assert {"model", "rotations.safetensors", "metrics.json", "recipe.yaml", "notes.txt"} <= {p.name for p in out.iterdir()}


def _momentum_buffers(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith("momentum_buffer")}


def test_resume_from_checkpoint_equals_uninterrupted_run(assets, tmp_path):
    """Also the export without online Hadamards (r3/r4 off): a plain HF model with the original float logits."""
    from transformers import AutoModelForCausalLM

    common = {"data.eval": "null", "train.max_steps": 6, "train.save_steps": 3, "train.save_total_limit": "null",
              "rotation.r3": "false", "rotation.r4": "false"}
    full, resumed, no_momentum = tmp_path / "full", tmp_path / "resumed", tmp_path / "no_momentum"
    assert run_main(assets, overrides_for(full, **common)) == 0

    plain = AutoModelForCausalLM.from_pretrained(full / "model").eval()
    with torch.no_grad():
        assert rel_err(plain(input_ids=IDS).logits, original_logits(assets)) <= 1e-4

    ckpt = full / "checkpoint-3"
    assert (ckpt / ROTATIONS_FILE).is_file() and (ckpt / OPTIMIZER_FILE).is_file()
    momenta = _momentum_buffers(ckpt / OPTIMIZER_FILE)
    assert len(momenta) == 3 and all(m.abs().max() > 0 for m in momenta.values())  # r1 + two r2, non-zero

    # An interrupted run (stopped after checkpoint-3) resumed with `latest` in its own directory.
    from spinlearn.job import RotationJob

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RotationJob(load_recipe(assets["recipe"], overrides_for(resumed, **common)), callbacks=[Interrupt()]).run()
    assert (resumed / "checkpoint-3").is_dir() and not (resumed / "metrics.json").exists()
    assert run_main(assets, overrides_for(resumed, **common, **{"train.resume_from_checkpoint": "latest"})) == 0
    a, b = load_file(full / "rotations.safetensors"), load_file(resumed / "rotations.safetensors")
    whole = [json.loads((d / "metrics.json").read_text())["final_train_loss"] for d in (full, resumed)]
    assert whole[0] == pytest.approx(whole[1], rel=1e-9)  # the whole run's loss, not only the resumed steps
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    a6, b6 = load_file(full / "checkpoint-6" / ROTATIONS_FILE), load_file(resumed / "checkpoint-6" / ROTATIONS_FILE)
    assert all(torch.equal(a6[k], b6[k]) for k in a6)  # bit-identical before the final polish, too

    # The comparison is sensitive to the optimizer state: resuming without the momentum ends elsewhere.
    stripped = tmp_path / "ckpt-no-momentum"
    stripped.mkdir()
    for f in ckpt.iterdir():
        (stripped / f.name).write_bytes(f.read_bytes())
    with safe_open(ckpt / OPTIMIZER_FILE, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: torch.zeros_like(v) if k.endswith("momentum_buffer") else v for k, v in tensors.items()},
              stripped / OPTIMIZER_FILE, metadata=meta)
    assert run_main(assets, overrides_for(no_momentum, **common, **{"train.resume_from_checkpoint": stripped})) == 0
    c = load_file(no_momentum / "rotations.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


# ------------------------------------------------------------------------------------------------ failures
@pytest.fixture(scope="module")
def r3_unsupported_model(tmp_path_factory):
    # head_dim 10: no Hadamard matrix of order 10 exists (orders are 1, 2 or multiples of 4).
    return save_tiny_model_dir(tmp_path_factory.mktemp("hd10") / "tiny", "llama", head_dim=10)


def _token_count(assets) -> int:
    return tokenize_concat(load_text(str(assets["train"])), load_tokenizer(assets["model"])).numel()


BAD_INPUTS = {
    "unknown_key": ({"train.max_stepz": 3}, r"unknown recipe key 'train.max_stepz'.*did you mean 'train.max_steps'"),
    "missing_model": ({"model.path": "{tmp}/no-such-model"}, r"model path .*no-such-model.* does not exist"),
    "missing_data": ({"data.train": "{tmp}/missing.txt"}, r"no data file matches .*missing.txt"),
    "short_data": ({"data.nsamples": 5000}, r"calibration data too short: it has {ntok} tokens.* 5000 x 32 = 160000"),
    "hub_offline": ({"data.train": "wikitext2"}, r"cannot load hub dataset 'wikitext2'.*HF_HUB_OFFLINE"),
    "max_steps_unset": ({"train.max_steps": -1}, r"train.max_steps: max_steps must be > 0"),
    "bits_low": ({"quant.w_bits": 1}, r"quant.w_bits=1 is out of range: bits must be an integer in 2..16"),
    "bits_high": ({"quant.kv_bits": 17}, r"quant.kv_bits=17 is out of range: bits must be an integer in 2..16"),
    "r3_head_dim": ({"rotation.r3": "true", "model.path": "{hd10}"}, r"rotation.r3: .*no order 10 \(head_dim"),
    "device_map_value": ({"model.device_map": "everywhere"},
                         r"model.device_map: must be one of auto \| balanced \| balanced_low_0 \| sequential"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_writes_nothing(case, assets, r3_unsupported_model, tmp_path, capsys,
                                                    monkeypatch):
    import re

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra, pattern = BAD_INPUTS[case]
    fill = {"tmp": tmp_path, "hd10": r3_unsupported_model}
    extra = {k: str(v).format(**fill) for k, v in extra.items()}
    if "{ntok}" in pattern:
        pattern = pattern.replace("{ntok}", str(_token_count(assets)))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert run_main(assets, overrides_for(out, **extra)) == 2
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert "train_rotations: error: " in err
    assert re.search(pattern, err, re.S), err
    assert nothing_exported(out)
    if case == "hub_offline":
        assert elapsed < 1.0  # refused at once, not after the datasets library's retries


def test_a_device_map_under_ddp_or_fsdp_is_refused_before_anything_starts(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch sets for 2 processes
    out = tmp_path / "out"
    assert run_main(assets, overrides_for(out, **{"model.device_map": "auto"})) == 2
    err = capsys.readouterr().err
    assert "model.device_map='auto' spreads the model over one process's GPUs, but this job runs 2 processes" in err
    assert "model.device_map=null" in err and nothing_exported(out)


def test_a_device_mapped_run_equals_the_plain_run(assets, tmp_path):
    """model.device_map: auto loads the model through accelerate (on this CPU-only machine every module lands on
    the CPU) and leaves its placement alone; the run learns and measures what a plain run does. (Layers on
    different GPUs: tests/test_gpu.py.)"""
    quick = {"export.schemes": "[]", "eval.baselines": "false", "rotation.learn_scales": "true",
             "quant.learn_a_clip": "true"}
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    assert run_main(assets, overrides_for(plain, **quick)) == 0
    assert run_main(assets, overrides_for(mapped, **quick, **{"model.device_map": "auto"})) == 0
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (plain, mapped)]
    with safe_open(str(assets["model"] / "model.safetensors"), "pt") as f:
        n_weights = len(list(f.keys()))
    assert metrics[1]["device_map"] == {"cpu": n_weights} and "device_map" not in metrics[0]
    assert metrics[1]["rows"] == metrics[0]["rows"]
    for name in ("rotations.safetensors", "scales.safetensors", "activation_clips.safetensors"):
        a, b = load_file(plain / name), load_file(mapped / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_model_with_custom_code_needs_trust_remote_code_and_its_outputs_carry_the_code(assets, tmp_path, capsys):
    """model.trust_remote_code: a model whose classes live in files beside its weights (config.json auto_map) is
    refused without it; with it the job checks it (on the meta device, with its own classes), learns, and writes a
    model/ and exports that carry the code: they load with trust_remote_code and compute the original's function."""
    from transformers import AutoModelForCausalLM

    from spinlearn.export import load_export

    src = save_remote_code_model_dir(tmp_path / "custom")
    assert run_main(assets, overrides_for(tmp_path / "refused", **{"model.path": src})) == 2
    assert "needs custom code from the hub or its directory (config.json has auto_map); pass --trust-remote-code " \
           "(recipe: model.trust_remote_code=true)" in capsys.readouterr().err
    out = tmp_path / "out"
    assert run_main(assets, overrides_for(out, **{"model.path": src, "model.trust_remote_code": "true",
                                                  "export.schemes": "[float]", "eval.baselines": "false"})) == 0
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()(input_ids=IDS).logits
        for loaded in (AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True),
                       load_export(out / "export-float", trust_remote_code=True)):
            assert type(loaded).__name__ == "CustomForCausalLM"
            assert rel_err(loaded.eval()(input_ids=IDS).logits, ref) <= 1e-4


def test_existing_output_dir_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run_main(assets, overrides_for(out)) == 2
    assert "overwrite_output_dir=true" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(assets, tmp_path, capsys, monkeypatch):
    """A hook poisons the embedding output at the third step: the run stops there and says where to resume."""
    real = RotationTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        if self.state.global_step != 2:
            return real(self, model, inputs, *args, **kwargs)
        emb = self.accelerator.unwrap_model(model).get_input_embeddings()
        hook = emb.register_forward_hook(lambda module, args, output: output * float("nan"))
        try:
            return real(self, model, inputs, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(RotationTrainer, "compute_loss", poisoned)
    out = tmp_path / "out"
    assert run_main(assets, overrides_for(out, **{"train.max_steps": 6, "train.save_steps": 2})) == 2
    err = capsys.readouterr().err
    last = out / "checkpoint-2"
    assert "the loss became nan at step 3" in err
    assert f"Last good checkpoint: {last}" in err
    assert (last / ROTATIONS_FILE).is_file() and (last / OPTIMIZER_FILE).is_file()
    assert all(torch.isfinite(m).all() for m in load_file(last / ROTATIONS_FILE).values())
    assert not (out / "checkpoint-4").exists()
    assert nothing_exported(out)


# --------------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how,config", [("nan", "cpu_2proc.yaml"), ("bad_data", "cpu_2proc_fsdp.yaml")])
def test_a_rank_that_goes_wrong_alone_ends_the_whole_job_with_its_message(assets, tmp_path, how, config):
    """Rank 1 alone goes wrong at step 2 (tests/failing_rank_entry.py), under DDP and under FSDP: the job ends (no
    rank left waiting in a collective), says what happened and where, and exports nothing."""
    out = tmp_path / "out"
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "accelerate_configs" / config),
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "failing_rank_entry.py"), how,
           "--config", str(assets["recipe"]),
           *overrides_for(out, **{"train.max_steps": 6, "train.save_steps": 6, "train.per_device_train_batch_size": 1,
                                  "train.report_to": "[none]"})]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    if how == "nan":  # every rank learns of it through the loss all-reduce and stops with the same message
        for rank in (0, 1):
            assert f"error on rank {rank} of 2: the loss became nan at step 2" in text, text[-3000:]
        assert json.loads((out / RUN_MARKER).read_text())["status"] == "failed"
    else:  # the failing rank says what and where; the launcher stops the other one
        assert "unexpected error on rank 1 of 2: IndexError" in text, text[-3000:]
    assert nothing_exported(out)


def test_two_process_ddp_ranks_agree_and_match_one_process_with_the_same_global_batch(assets, tmp_path):
    """2 ranks x batch 1 (gloo on CPU) against 1 process x batch 2: the same samples per step, the same mean
    gradient. Ranks must hold bit-identical matrices; the two runs agree up to float reduction order."""
    ddp_out, single_out, dumps = tmp_path / "ddp", tmp_path / "single", tmp_path / "ranks"
    steps = {"train.max_steps": 4, "train.save_steps": 4}
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "ddp_entry.py"), str(assets["recipe"]), str(dumps),
        *overrides_for(ddp_out, **steps, **{"train.per_device_train_batch_size": 1,
                                                      "train.report_to": "[wandb]"}),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    rank0, rank1 = load_file(dumps / "rank0.safetensors"), load_file(dumps / "rank1.safetensors")
    assert set(rank0) == set(rank1) == {"r1", "r2.model.layers.0", "r2.model.layers.1"}
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    exported = load_file(ddp_out / "rotations.safetensors")  # the same matrices after the final polish
    assert all((exported[k].float() - rank0[k]).abs().max() <= 1e-5 for k in rank0)
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and (ddp_out / "model" / "config.json").is_file()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # rank 0 only

    assert run_main(assets, overrides_for(single_out, **steps, **{"train.per_device_train_batch_size": 2,
                                                                  "data.eval": "null"})) == 0
    def losses(out: Path) -> list[float]:
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    # The same samples per step: the per-step losses (mean over the global batch) agree.
    assert len(losses(ddp_out)) == 4
    assert losses(ddp_out) == pytest.approx(losses(single_out), rel=1e-4)  # other samples: ~1e-2 apart
    single = load_file(single_out / "rotations.safetensors")
    diff = max((single[k].float() - rank0[k]).abs().max().item() for k in rank0)
    assert diff <= 1e-4, diff
    # ... which is a real agreement: training moved the matrices far more than that from their start.
    from transformers import AutoModelForCausalLM

    from spinlearn.rotation_plan import make_matrices, prepare_model

    plan = prepare_model(AutoModelForCausalLM.from_pretrained(assets["model"]), "transformer_universal")
    init = make_matrices(plan, mode="hadamard", seed=0)
    moved = max((single[k].double() - init[k]).abs().max().item() for k in init)
    print(f"DDP vs one process: max diff {diff:.2e}; moved from init {moved:.2e}")
    assert moved > 1e-3 and moved > 30 * diff


@pytest.mark.parametrize(("overrides", "mse_clip", "grid"), [
    ({"quant.w_bits": 16, "quant.w_method": "gptq", "quant.w_clip": "true", "quant.gptq.w_bits": 4}, True, False),
    ({"quant.learn_w_clip": "true"}, True, True),  # the learned ratios set GPTQ's grid; the start's row searches
    ({"quant.learn_w_clip": "true", "quant.gptq.learned_grid": "false"}, True, False),
    ({"quant.learn_w_clip": "true", "quant.gptq.w_bits": 3}, True, False),  # learned for 4 bits, not 3
    ({}, False, False),
], ids=["w16a4kv4-w_clip", "rtn-learn_w_clip", "rtn-learn_w_clip-search", "rtn-learn_w_clip-3bit", "rtn"])
def test_the_jobs_gptq_gets_the_recipes_clip_search_or_learned_grid(assets, tmp_path, monkeypatch, overrides,
                                                                     mse_clip, grid):
    """The job's GPTQ rows get the recipe's GPTQ weights with the clip search where the recipe asks for one
    (quant.w_clip) or learns weight clip ratios (quant.learn_w_clip), and the recipe's activations/KV, from the
    same mapping `spinlearn eval` uses (QuantSettings); the learned row rounds on the learned ratios' grid
    (weight_clips) when they were learned for GPTQ's grid and quant.gptq.learned_grid is on."""
    import spinlearn.evaluate as evaluate_mod
    from spinlearn.artifacts import load_rotations

    seen = []
    monkeypatch.setattr(evaluate_mod, "evaluate_setting",
                        lambda model, windows, **kw: seen.append(kw) or {"ppl": 1.0, "settings": {}})
    out = tmp_path / "out"
    overrides = {**overrides, "train.max_steps": 1, "eval.baselines": "true", "export.schemes": "[]"}
    assert run_main(assets, overrides_for(out, **overrides)) == 0
    calls = [k for k in seen if k.get("w_method") == "gptq"]
    assert len(calls) == 2  # the learned matrices, then the start (eval.baselines)
    bits = 3 if overrides.get("quant.gptq.w_bits") == 3 else 4
    for kw in calls:
        q = kw["quant"]
        assert (q.w.bits, q.w.mse_clip, q.a.bits, q.kv.bits) == (bits, mse_clip, 4, 4)
    assert calls[1]["weight_clips"] == "none"  # the start has no learned ratios
    if grid:
        saved = load_rotations(out / "weight_clips.safetensors")
        assert set(calls[0]["weight_clips"]) == set(saved) and len(saved) > 0
        assert all(torch.equal(calls[0]["weight_clips"][k], saved[k]) for k in saved)
    else:
        assert calls[0]["weight_clips"] == "none"
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {f"W{bits}A4KV4 GPTQ, learned rotation", f"W{bits}A4KV4 GPTQ, random Hadamard rotation"} <= set(rows)


@pytest.mark.parametrize("weights", ["w16_then_gptq", "rtn"])
def test_the_gptq_start_row_is_gptq_on_the_start_matrices(assets, tmp_path, weights):
    """Recipes with eval.baselines (W16A4KV4 + GPTQ, and W4A4KV4 RTN ones): the start matrices + GPTQ row, the
    reference for what learning gave under GPTQ, with the recipe's activations and K/V quantized. With a learning
    rate too small to move anything, it equals the learned + GPTQ row; both are real GPTQ results (not the
    recipe's own W16 or RTN rows)."""
    out = tmp_path / "out"
    overrides = {"train.max_steps": 1, "train.learning_rate": 1e-12, "export.schemes": "[]", "eval.baselines": "true"}
    if weights == "w16_then_gptq":
        overrides |= {"quant.w_bits": 16, "quant.w_method": "gptq", "quant.gptq.w_bits": 4}
    assert run_main(assets, overrides_for(out, **overrides)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["ppl_gptq_start"] == m["rows"]["W4A4KV4 GPTQ, random Hadamard rotation"]
    assert m["ppl_gptq"] == m["rows"]["W4A4KV4 GPTQ, learned rotation"]
    assert abs(m["ppl_gptq_start"] - m["ppl_gptq"]) <= 1e-5 * m["ppl_gptq"]
    assert abs(m["ppl_gptq_start"] - m["ppl_quant_before"]) > 1e-4 * m["ppl_gptq"]  # GPTQ is not the recipe's row
