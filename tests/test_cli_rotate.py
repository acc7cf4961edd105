"""`spinlearn rotate` end to end: the output directory is a plain HF model (safetensors, config, tokenizer) plus
named orthogonal matrices and a loadable layout, and the reloaded model computes what the original did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlearn.cli import main
from spinlearn.layout import load_layout, resolve_dims
from spinlearn.rotations import orthogonality_error
from helpers import logits_in_model_dtype, tiny_model, tiny_tokenizer

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))



def save_model_dir(family: str, dest: Path) -> Path:
    model = tiny_model(family)
    model.save_pretrained(dest, safe_serialization=True)
    tiny_tokenizer().save_pretrained(dest)
    return dest


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _logits(path: Path, dtype=torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return logits_in_model_dtype(model, IDS)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_model_dir("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_ref(llama_dir) -> torch.Tensor:
    return _logits(llama_dir)


def _rotate(src: Path, out: Path, *extra: str) -> None:
    assert main(["rotate", "--model", str(src), "--output", str(out), *extra]) == 0


@pytest.mark.parametrize("mode", ["hadamard", "base_hadamard", "orthogonal"])
def test_output_directory_is_a_plain_hf_model(llama_dir, llama_ref, tmp_path, mode):
    out = tmp_path / "out"
    _rotate(llama_dir, out, "--mode", mode, "--seed", "7")
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "rotations.safetensors", "layout.yaml"} <= files
    assert not any(f.endswith(".bin") for f in files), files

    # Loads with vanilla transformers (no custom code) and reproduces the original logits.
    assert _rel(_logits(out), llama_ref) <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat sat")["input_ids"] == tiny_tokenizer()("the cat sat")["input_ids"]

    # Every matrix, named, orthogonal in float64.
    mats = load_file(out / "rotations.safetensors")
    assert set(mats) == {"r1", "r2.model.layers.0", "r2.model.layers.1"}
    assert mats["r1"].shape == (64, 64) and mats["r2.model.layers.0"].shape == (16, 16)
    for name, m in mats.items():
        assert m.dtype == torch.float64, name
        assert orthogonality_error(m) <= 1e-10, name
        is_hadamard = torch.allclose(m.abs(), torch.full_like(m, m.shape[0] ** -0.5))
        assert is_hadamard == (mode != "orthogonal"), (name, mode)
    with safe_open(out / "rotations.safetensors", "pt") as f:
        assert f.metadata()["mode"] == mode and f.metadata()["seed"] == "7"

    # The resolved layout reloads and names both matrices, with the mode actually used.
    layout = load_layout(out / "layout.yaml")
    assert set(layout.rotation_matrices) == {"r1", "r2"}
    assert all(spec.mode == mode for spec in layout.rotation_matrices.values())
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert resolve_dims(layout, config) == {"r1": 64, "r2": 16}
    assert config.tie_word_embeddings is False  # the source was tied: lm_head had to be untied


def test_seed_changes_hadamard_matrices(llama_dir, tmp_path):
    for seed in ("0", "1"):
        _rotate(llama_dir, tmp_path / f"s{seed}", "--mode", "hadamard", "--seed", seed)
    m0, m1 = load_file(tmp_path / "s0/rotations.safetensors"), load_file(tmp_path / "s1/rotations.safetensors")
    assert not torch.equal(m0["r1"], m1["r1"])
    assert not torch.equal(m0["r2.model.layers.0"], m1["r2.model.layers.0"])
    # Same seed twice -> same matrices.
    _rotate(llama_dir, tmp_path / "again", "--mode", "hadamard", "--seed", "1")
    again = load_file(tmp_path / "again/rotations.safetensors")
    assert all(torch.equal(again[k], m1[k]) for k in m1)


def test_bfloat16_output(llama_dir, llama_ref, tmp_path):
    out = tmp_path / "bf16"
    _rotate(llama_dir, out, "--dtype", "bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    assert load_file(out / "rotations.safetensors")["r1"].dtype == torch.float64  # matrices stay exact
    # bf16 weights: only a coarse agreement is possible, but a wrong rotation would be off by O(1).
    assert _rel(_logits(out, torch.float32), llama_ref) <= 5e-2


@pytest.mark.parametrize("family,layout_args", [("opt", ["--layout", "opt"]), ("mixtral", [])])
def test_other_families_through_the_cli(family, layout_args, tmp_path):
    src = save_model_dir(family, tmp_path / "src")
    ref = _logits(src)
    out = tmp_path / "out"
    _rotate(src, out, *layout_args)
    assert _rel(_logits(out), ref) <= 1e-4
    expected = "opt" if layout_args else "transformer_universal"
    assert load_layout(out / "layout.yaml").name == expected
    mats = load_file(out / "rotations.safetensors")
    assert "r1" in mats and any(k.startswith("r2.") for k in mats)


def test_console_script_entry_point(llama_dir, llama_ref, tmp_path):
    script = Path(sys.executable).parent / "spinlearn"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "spinlearn.cli"]
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*cmd, "rotate", "--model", str(llama_dir), "--output", str(out), "--mode", "hadamard"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rotated LlamaForCausalLM" in proc.stdout
    assert _rel(_logits(out), llama_ref) <= 1e-4
    # And the usage error path of argparse: a bad --mode exits 2 with the choices listed.
    bad = subprocess.run([*cmd, "rotate", "--model", "x", "--output", "y", "--mode", "nope"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "hadamard" in bad.stderr
