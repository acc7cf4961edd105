"""`spinlearn recipes`: the recipes shipped inside the package, listed and copied so that a user without a
checkout can start (the demo copy names the installed demo files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spinlearn.cli import main
from spinlearn.config import RECIPE_DIR, copy_recipe, load_recipe, recipe_command, shipped_recipes

PACKAGE = Path(__file__).resolve().parents[1] / "spinlearn"


def test_every_shipped_recipe_instantiates():
    recipes = shipped_recipes()
    assert "demo" in recipes and len(recipes) >= 9
    for name, path in recipes.items():
        cfg = load_recipe(path)
        assert cfg.train.max_steps > 0, name


def test_recipes_are_package_data():
    section = (PACKAGE.parent / "pyproject.toml").read_text().split("[tool.setuptools.package-data]\n", 1)[1]
    assert '"recipes/*.yaml"' in section.splitlines()[0]  # spinlearn = [...]: what the wheel ships
    assert RECIPE_DIR == PACKAGE / "recipes" and (RECIPE_DIR / "demo.yaml").is_file()


def test_list_shows_each_recipe_with_its_command(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, path in shipped_recipes().items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert recipe_command(path) in line and recipe_command(path).startswith("accelerate launch")
    assert main(["recipes", "list"]) == 0 and capsys.readouterr().out == out


def test_copied_demo_runs_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkout here: relative spinlearn/demo/... paths would not exist
    assert main(["recipes", "cp", "demo", "my.yaml"]) == 0
    assert "spinlearn train --config my.yaml" in capsys.readouterr().out
    cfg = load_recipe("my.yaml")
    assert Path(cfg.model.path) == PACKAGE / "demo" / "model" and (Path(cfg.model.path) / "config.json").is_file()
    assert Path(cfg.data.train).is_file() and Path(cfg.data.eval).is_file()
    assert Path(cfg.data.train) == PACKAGE / "demo" / "data" / "train.txt"
    assert cfg.output_dir == "runs/demo"  # outputs stay relative to where the user runs it
    text = (tmp_path / "my.yaml").read_text()
    assert text.splitlines()[0] == "# " + recipe_command(RECIPE_DIR / "demo.yaml")  # the header is kept
    shipped = load_recipe(RECIPE_DIR / "demo.yaml")
    assert cfg.train == shipped.train and cfg.quant == shipped.quant  # only the paths differ


def test_copy_refuses_to_overwrite_and_names_unknown_recipes(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    dest.write_text("mine")
    assert main(["recipes", "cp", "demo", str(dest)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and dest.read_text() == "mine"
    assert main(["recipes", "cp", "demo", str(dest), "--overwrite"]) == 0
    assert load_recipe(dest).rotation.r4 is True
    assert main(["recipes", "cp", "dmo", str(tmp_path / "x.yaml")]) == 2
    assert "no shipped recipe 'dmo': did you mean 'demo'?" in capsys.readouterr().err
    assert copy_recipe("qwen3_8b_w4a4kv4", tmp_path) == tmp_path / "qwen3_8b_w4a4kv4.yaml"  # into a directory
    with pytest.raises(FileNotFoundError, match="does not exist"):
        copy_recipe("demo", tmp_path / "no" / "dir.yaml")


def test_missing_recipe_file_points_at_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"spinlearn recipes cp demo demo.yaml"):
        load_recipe("demo")
