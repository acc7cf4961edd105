"""The README's main job on the bundled demo: learned rotations must beat random Hadamard rotations, which must
beat no rotation, at W4A4KV4 (the recipe's own seeds: nothing here is tuned to pass). The default run trains the
recipe for 60 steps and scores 50 test windows (about 2 minutes); `-m slow` runs the recipe as shipped."""

from pathlib import Path

import pytest
import torch

from spinlearn.config import load_recipe
from spinlearn.job import run_training

ROOT = Path(__file__).resolve().parents[1]
Q = "W4A4KV4 RTN"
SHORT = ["train.max_steps=60", "train.save_steps=30", "data.eval_max_windows=50", "quant.gptq.nsamples=32"]


def _run_demo(tmp_path_factory, overrides: list[str]):
    out = tmp_path_factory.mktemp("demo") / "run"
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)  # the recipe's paths are relative to the repository root
    try:
        cfg = load_recipe(ROOT / "recipes" / "demo.yaml", [f"output_dir={out}", "train.report_to=[none]", *overrides])
        metrics = run_training(cfg)
    finally:
        mp.undo()
    return cfg, metrics, out


@pytest.fixture(scope="module")
def demo_short(tmp_path_factory):
    return _run_demo(tmp_path_factory, SHORT)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return _run_demo(tmp_path_factory, [])


def _check_rows(metrics, out) -> None:
    rows = metrics["rows"]
    float_ppl, none, hadamard, learned = (rows["float"], rows[f"{Q}, no rotation"],
                                          rows[f"{Q}, random Hadamard rotation"], rows[f"{Q}, learned rotation"])
    assert float_ppl < learned < hadamard < none
    assert none > 1.05 * hadamard  # the demo model really has the outliers rotations fix
    gptq_learned, gptq_start = rows["W4A4KV4 GPTQ, learned rotation"], rows["W4A4KV4 GPTQ, random Hadamard rotation"]
    # GPTQ's refit (a ridge least-squares fit to the float outputs, README "GPTQ's refit") can land a little below
    # float on a sample of windows (60-step run, 50 windows: learned + GPTQ 69.969 against float 70.020), so float
    # is not a lower bound here; 3% below it would be a broken row.
    assert 0.97 * float_ppl < gptq_start < hadamard  # GPTQ beats round-to-nearest on the same (start) rotation
    assert 0.97 * float_ppl < gptq_learned < hadamard  # and the learned rotation keeps its gain under GPTQ
    assert metrics["ppl_gptq"] == gptq_learned and metrics["ppl_gptq_start"] == gptq_start
    assert (out / "results.md").read_text().count("|") > 10
    assert (out / "model" / "config.json").is_file() and (out / "rotations.safetensors").is_file()


def test_demo_recipe_shortened_learned_beats_random_hadamard(demo_short):
    cfg, metrics, out = demo_short
    assert cfg.train.max_steps == 60 and metrics["steps"] == 60
    _check_rows(metrics, out)


@pytest.mark.slow
def test_demo_recipe_as_shipped_learned_beats_random_hadamard(demo_run):
    _, metrics, out = demo_run
    _check_rows(metrics, out)


@pytest.mark.slow
def test_demo_learned_beats_the_best_of_10_random_hadamard_seeds(demo_run, monkeypatch):
    """SpinQuant's central claim on the demo model: the learned rotation beats every one of 10 random-Hadamard
    draws (R3/R4 as in the recipe), each evaluated by the same code as `spinlearn eval --rotation hadamard`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spinlearn.data import eval_windows, load_text, tokenize_concat
    from spinlearn.evaluate import evaluate_setting
    from spinlearn.quant import QuantSettings

    cfg, metrics, _ = demo_run
    monkeypatch.chdir(ROOT)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    windows = eval_windows(tokenize_concat(load_text(cfg.data.eval), tok), cfg.data.seqlen)[: cfg.data.eval_max_windows]
    q = QuantSettings.from_recipe(cfg.quant)
    random_ppls = []
    for seed in range(10):
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        random_ppls.append(evaluate_setting(model, windows, rotation="hadamard", quant=q, seed=seed,
                                            r3=cfg.rotation.r3, r4=cfg.rotation.r4, progress=False)["ppl"])
    assert metrics["rows"][f"{Q}, learned rotation"] < min(random_ppls), random_ppls
