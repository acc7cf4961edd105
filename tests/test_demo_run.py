"""The README's main job on the bundled demo: learned rotations must beat random Hadamard rotations, which must
beat no rotation, at W4A4KV4 (the recipe's own seeds: nothing here is tuned to pass)."""

from pathlib import Path

from spinlearn.config import load_recipe
from spinlearn.train import run_training

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_learned_beats_random_hadamard(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    cfg = load_recipe(ROOT / "recipes" / "demo.yaml", [f"output_dir={tmp_path / 'demo'}", "train.report_to=[none]"])
    metrics = run_training(cfg)
    rows = metrics["rows"]
    q = "W4A4KV4 RTN"
    float_ppl, none, hadamard, learned = (rows["float"], rows[f"{q}, no rotation"],
                                          rows[f"{q}, random Hadamard rotation"], rows[f"{q}, learned rotation"])
    assert float_ppl < learned < hadamard < none
    assert none > 1.05 * hadamard  # the demo model really has the outliers rotations fix
    assert rows["W4A16 GPTQ, learned rotation"] < learned
    out = tmp_path / "demo"
    assert (out / "results.md").read_text().count("|") > 10
    assert (out / "model" / "config.json").is_file() and (out / "rotations.safetensors").is_file()
