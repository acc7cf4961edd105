"""`spinlearn export` end to end on a tiny run directory (model/ + recipe.yaml with R4 + results.md) and
`spinlearn eval` on the export; the user errors: one line, exit code 2, nothing written to OUT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers import TINY_WORDS, save_tiny_model_dir
from spinlearn.artifacts import MODEL_DIR, RECIPE_FILE, RESULTS_FILE
from spinlearn.cli import main
from spinlearn.config import load_recipe, recipe_to_yaml

RESULTS = "| setting | perplexity |\n|---|---|\n| float | 12.345 |\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_cli")
    run = root / "run"
    save_tiny_model_dir(run / MODEL_DIR, intermediate_size=192)
    cfg = load_recipe(None, [f"model.path={root / 'base'}", f"output_dir={run}", "train.max_steps=1",
                             "rotation.r4=true", "data.train=x.txt", "data.eval=x.txt"])
    (run / RECIPE_FILE).write_text(recipe_to_yaml(cfg))
    (run / RESULTS_FILE).write_text(RESULTS)
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(TINY_WORDS) for _ in range(600)) + "\n")
    return root, run


def _export(run_dir, out, *extra):
    return main(["export", "--run", str(run_dir), "--output", str(out), *extra])


def test_export_run_with_r4_and_eval(run, tmp_path, capsys):
    root, run_dir = run
    out = tmp_path / "w4"
    assert _export(run_dir, out, "--scheme", "w4a16", "--group-size", "32") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    group = qc["transform_config"]["config_groups"]["spinlearn_online"]
    assert group["type"] == "random-hadamard" and group["apply"][0]["location"] == "input"
    card = (out / "README.md").read_text()
    assert "| float | 12.345 |" in card and "w4a16" in card and "ignores `transform_config`" in card
    assert "rotation:" in card and "vllm serve" in card  # the recipe and how to serve it
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    capsys.readouterr()
    args = ["eval", "--data", str(root / "text.txt"), "--seqlen", "32", "--max-windows", "4"]
    assert main(args + ["--model", str(out), "--json", str(tmp_path / "q.json")]) == 0
    assert "online input transforms applied on 2 layers" in capsys.readouterr().err
    assert main(args + ["--model", str(run_dir / MODEL_DIR), "--json", str(tmp_path / "f.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())["ppl"]
    f = json.loads((tmp_path / "f.json").read_text())["ppl"]
    assert abs(q / f - 1) < 0.2 and q != f  # 4-bit weights: close to the float model, not equal


def test_float_export_eval_equals_the_run_model(run, tmp_path):
    root, run_dir = run
    out = tmp_path / "float"
    assert _export(run_dir, out, "--scheme", "float") == 0
    args = ["eval", "--data", str(root / "text.txt"), "--seqlen", "32", "--max-windows", "4"]
    assert main(args + ["--model", str(out), "--json", str(tmp_path / "x.json")]) == 0
    assert main(args + ["--model", str(run_dir / MODEL_DIR), "--json", str(tmp_path / "m.json")]) == 0
    x = json.loads((tmp_path / "x.json").read_text())["ppl"]
    m = json.loads((tmp_path / "m.json").read_text())["ppl"]
    assert abs(x / m - 1) < 1e-5  # R4 folded + applied online = the same function


@pytest.mark.parametrize("case,extra,message", [
    ("no model", ["--scheme", "w4a16"], "holds no model"),
    ("unservable", ["--scheme", "w4a4"], "vLLM has no integer W4A4 kernel; vLLM serves w4a16"),
    ("kv4", ["--scheme", "kv4"], "no 4-bit KV cache"),
    ("group", ["--scheme", "w4a16", "--group-size", "48"],
     "group size 48 does not divide the input width 64 of 'model.layers.0.self_attn.q_proj'"),
    ("gptq", ["--scheme", "w4a16", "--w-method", "gptq"], "GPTQ needs calibration data: pass --calib-data"),
    ("nvfp4", ["--scheme", "nvfp4"], "needs calibration data"),
    ("not empty", ["--scheme", "w4a16"], "exists and is not empty"),
])
def test_export_errors(run, tmp_path, capsys, case, extra, message):
    _, run_dir = run
    src = tmp_path / "empty_run" if case == "no model" else run_dir
    src.mkdir(exist_ok=True)
    out = tmp_path / "out"
    if case == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    capsys.readouterr()
    assert _export(src, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may print a loading bar first)
    assert err.startswith("spinlearn export: error: ") and message in err, err
    if case == "not empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind


def test_job_api_writes_every_recipe_scheme(run):
    from spinlearn.export import export_recipe_schemes, load_export
    from spinlearn.loading import load_causal_lm

    _, run_dir = run
    cfg = load_recipe(run_dir / RECIPE_FILE, ["export.schemes=[w8a8,float]", "export.group_size=-1"])
    model = load_causal_lm(run_dir / MODEL_DIR)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outs = export_recipe_schemes(model, cfg, run_dir, tokenizer_source=run_dir / MODEL_DIR, progress=False)
    assert [p.name for p in outs] == ["export-w8a8", "export-float"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the fused model is untouched
    assert load_export(outs[0]).spinlearn_export["online"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def test_the_export_weight_method_follows_the_recipe_except_where_gptq_does_not_apply():
    """A W16A4KV4 recipe (quant.w_method gptq): its int exports use GPTQ, float/nvfp4 fall back to RTN unless asked."""
    from spinlearn.config import load_recipe
    from spinlearn.export.api import export_w_method

    recipe = load_recipe(None, ["model.path=m", "data.train=t.txt", "output_dir=o", "train.max_steps=1",
                                "quant.w_method=gptq"])
    assert export_w_method("w4a16", None, recipe) == "gptq"
    assert export_w_method("w8a8", "rtn", recipe) == "rtn"
    assert export_w_method("float", None, recipe) == "rtn"
    assert export_w_method("nvfp4", None, recipe) == "rtn"
    assert export_w_method("nvfp4", "gptq", None) == "gptq"  # asked for explicitly: check_export_inputs refuses it
    assert export_w_method("w4a16", None, None) == "rtn"
