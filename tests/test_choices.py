"""choices.py: every enum-like value it lists is one the code that consumes it accepts (one home, no drift)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from spinlearn import choices
from spinlearn.export.schemes import resolve_scheme
from spinlearn.loading import parse_dtype
from spinlearn.quant import QuantSpec
from spinlearn.rotations import make_rotation


@pytest.mark.parametrize("mode", choices.ROTATION_MODES)
def test_every_rotation_mode_makes_an_orthogonal_matrix(mode):
    r = make_rotation(12, mode, torch.Generator().manual_seed(0))
    assert torch.allclose(r.T @ r, torch.eye(12, dtype=r.dtype), atol=1e-12)
    assert mode in choices.ROTATION_MODE_LABELS


def test_dtypes_formats_and_schemes_are_accepted_where_they_are_used():
    assert {str(parse_dtype(d)).removeprefix("torch.") for d in choices.LOAD_DTYPES} == set(choices.LOAD_DTYPES)
    assert set(choices.TRAIN_DTYPES) <= set(choices.LOAD_DTYPES)
    for fmt in choices.QUANT_FORMATS:
        assert QuantSpec(bits=4, format=fmt).format == fmt
    for scheme in choices.EXPORT_SCHEMES:
        assert resolve_scheme(scheme).name == scheme


def test_check_bits_names_the_key_and_the_range():
    lo, hi = choices.BITS_RANGE
    assert choices.check_bits(lo, "k") is None and choices.check_bits(hi, "k") is None
    assert "quant.w_bits=1 is out of range" in choices.check_bits(lo - 1, "quant.w_bits")
    assert choices.check_bits(True, "k") is not None  # a bool is not a bit count


def test_choices_imports_no_torch():
    code = "import sys, spinlearn.choices; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
