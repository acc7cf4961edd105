"""artifacts.py: output-dir checks, atomic writes with the user's umask, checkpoints to resume from."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from spinlearn import artifacts
from spinlearn.artifacts import (
    OPTIMIZER_FILE,
    ROTATIONS_FILE,
    atomic_output_dir,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    latest_checkpoint,
    resolve_resume,
    save_rotations,
    save_safetensors,
)


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------ output directory
def test_output_dir_that_is_a_file_is_refused_even_with_overwrite(tmp_path):
    f = tmp_path / "out"
    f.write_text("a user's file")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"output_dir '.*out' is a file, not a directory"):
            check_output_dir(f, overwrite, label="output_dir")
    assert f.read_text() == "a user's file"


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match=r"cannot be created: '.*f' is a file"):
        check_output_dir(tmp_path / "f" / "run", False)


def test_non_empty_output_dir_names_the_hint(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty; set overwrite_output_dir=true"):
        check_output_dir(tmp_path, False, overwrite_hint="set overwrite_output_dir=true")
    assert check_output_dir(tmp_path, True) == tmp_path
    assert check_output_dir(tmp_path / "new" / "deeper", False) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # and leaves no probe behind


def test_unwritable_output_dir_is_refused_before_any_work():
    # /proc refuses new files even for root (chmod would not stop root).
    with pytest.raises(ValueError, match=r"output '/proc/spinlearn-out/run' is not writable: cannot create a file in '/proc'"):
        check_output_dir("/proc/spinlearn-out/run", False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="is not writable"):
        check_output_dir(ro / "run", False)


# --------------------------------------------------------------------------------------- modes and atomicity
def test_atomic_writes_replace_whole_files_with_umask_modes(tmp_path, umask027):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert mode(target) == 0o640  # 0666 & ~027, although mkstemp creates 0600
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" and mode(tmp_path / "b.bin") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "metrics.json"]  # no temporary left


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "recipe.yaml"
    target.write_text("old")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_safetensors_outputs_get_the_same_mode_as_text(tmp_path, umask022):
    save_rotations({"r1": torch.eye(4)}, tmp_path / ROTATIONS_FILE, {"layout": "x"})
    save_safetensors({"a": torch.zeros(2)}, tmp_path / OPTIMIZER_FILE)
    atomic_write_text(tmp_path / "recipe.yaml", "a: 1\n")
    modes = {p.name: mode(p) for p in tmp_path.iterdir()}
    assert modes == {ROTATIONS_FILE: 0o644, OPTIMIZER_FILE: 0o644, "recipe.yaml": 0o644}  # safetensors alone writes 0600


def test_atomic_output_dir_has_umask_modes(tmp_path, umask027):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        save_rotations({"r1": torch.eye(2)}, tmp / ROTATIONS_FILE)
        (tmp / "sub").mkdir()
    assert mode(out) == 0o750  # mkdtemp made it 0700
    assert mode(out / ROTATIONS_FILE) == 0o640 and mode(out / "sub") == 0o750


def test_importing_artifacts_does_not_import_torch():
    code = "import sys, spinlearn.artifacts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------------ resuming
def make_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / ROTATIONS_FILE).write_bytes(b"x")
    if complete:
        (d / OPTIMIZER_FILE).write_bytes(b"x")
    return d


def recipe(out: Path, resume) -> object:
    return OmegaConf.create({"output_dir": str(out), "train": {"resume_from_checkpoint": resume}})


def test_latest_is_the_newest_complete_checkpoint_by_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make_ckpt(tmp_path, 2)
    ten = make_ckpt(tmp_path, 10)
    make_ckpt(tmp_path, 12, complete=False)  # interrupted while saving
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == ten  # 10 > 2 numerically, 12 incomplete
    for value in ("latest", "LATEST", True, "true"):
        assert resolve_resume(recipe(tmp_path, value)) == str(ten)


@pytest.mark.parametrize("value", [None, False, "false", ""])
def test_no_resume(tmp_path, value):
    make_ckpt(tmp_path, 2)
    assert resolve_resume(recipe(tmp_path, value)) is None


def test_resume_errors_name_the_key_and_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"train.resume_from_checkpoint='latest': no complete checkpoint .* under "
                                         r"output_dir '.*'; set train.resume_from_checkpoint=null"):
        resolve_resume(recipe(tmp_path, "latest"))
    missing = tmp_path / "checkpoint-7"
    with pytest.raises(ValueError, match=rf"train.resume_from_checkpoint: checkpoint '{missing}' does not exist \(nor under output_dir\)"):
        resolve_resume(recipe(tmp_path, str(missing)))
    good = make_ckpt(tmp_path, 4)
    bad = make_ckpt(tmp_path, 6, complete=False)
    with pytest.raises(ValueError, match=rf"not a complete checkpoint \(no {OPTIMIZER_FILE}\).*'{good}'"):
        resolve_resume(recipe(tmp_path, str(bad)))
    assert resolve_resume(recipe(tmp_path, str(good))) == str(good)
    assert resolve_resume(recipe(tmp_path, "checkpoint-4")) == str(good)  # relative to output_dir


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_train_refuses_a_bad_output_dir_before_any_work(case, tmp_path, capsys):
    from spinlearn.cli import main

    out = tmp_path / "out" if case == "file" else Path("/proc/spinlearn-out")
    if case == "file":
        out.write_text("a user's file")
    demo = Path(__file__).resolve().parents[1] / "spinlearn" / "demo" / "model"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "model": {"path": str(demo)}, "data": {"train": str(tmp_path / "never-read.txt")},
        "train": {"max_steps": 1, "report_to": ["none"]}, "output_dir": str(out),
    })))
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"output_dir '{out}'" in err
    assert ("is a file, not a directory" if case == "file" else "is not writable") in err
