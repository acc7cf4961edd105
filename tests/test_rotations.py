"""spinlearn.rotations: applying matrices (dense / block-diagonal / fast Hadamard), mean-preserving rotations and
the RotationBank, up to the float-exactness of a trained model in every family (float64 references)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import FAMILIES, float64_exact_norms, layout_for, logits_in_model_dtype, tiny_model
from spinlearn.fakequant import BANK_ATTR, wrap_model
from spinlearn.fusion import fold_rotations
from spinlearn.hadamard import hadamard_matrix, random_hadamard_matrix, random_orthogonal_matrix
from spinlearn.quant import QuantSettings, QuantSpec
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.rotations import (
    RotationBank,
    fix_ones_direction,
    ones_complement,
    ones_preserving,
    ones_residual,
    orthogonality_error,
    rotate_axis,
    rotate_axis_fast,
    signed_hadamard_signs,
)
from spinlearn.trainer import make_optimizer

W4A4KV4 = QuantSettings(w=QuantSpec(bits=4), a=QuantSpec(bits=4, sym=False), kv=QuantSpec(bits=4, sym=False))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------ applying a matrix
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotate_axis_block_diagonal_equals_dense_reference(axis):
    t = torch.randn(8, 12, 16, generator=_gen(1), dtype=torch.float64)
    r = random_orthogonal_matrix(4, _gen(2), dtype=torch.float64)
    n = t.shape[axis]
    dense = torch.block_diag(*[r] * (n // 4))  # the n x n matrix a 4 x 4 block-diagonal R stands for
    reference = torch.tensordot(t, dense, dims=([axis], [0])).movedim(-1, axis)
    torch.testing.assert_close(rotate_axis(t, r, axis), reference, rtol=0, atol=1e-13)


def test_rotate_axis_refuses_a_size_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide axis 1 of size 12"):
        rotate_axis(torch.zeros(3, 12), torch.eye(5), 1)


def test_signed_hadamard_detected_and_fast_path_matches_dense():
    h = random_hadamard_matrix(64, _gen(3), dtype=torch.float64)
    signs = signed_hadamard_signs(h)
    assert signs is not None
    torch.testing.assert_close(signs[:, None] * hadamard_matrix(64, dtype=torch.float64), h, rtol=0, atol=0)
    t = torch.randn(5, 128, generator=_gen(4), dtype=torch.float64)
    torch.testing.assert_close(rotate_axis_fast(t, h, 1, signs), rotate_axis(t, h, 1), rtol=0, atol=1e-12)
    assert signed_hadamard_signs(random_orthogonal_matrix(64, _gen(5), dtype=torch.float64)) is None
    flipped = h.clone()
    flipped[3, 7] *= -1  # one entry off: still +-1/8 everywhere but no longer diag(s) H
    assert signed_hadamard_signs(flipped) is None


# ------------------------------------------------------------------------------------- mean-preserving matrices
def test_ones_preserving_maps_ones_to_ones_and_round_trips():
    q = random_orthogonal_matrix(63, _gen(6), dtype=torch.float64)
    r = ones_preserving(q)
    assert r.shape == (64, 64)
    assert orthogonality_error(r) <= 1e-13 and ones_residual(r) <= 1e-13
    torch.testing.assert_close(ones_complement(r), q, rtol=0, atol=1e-13)
    # Every mean-preserving rotation is one of these: fix_ones_direction's output has its own Q.
    m = fix_ones_direction(random_orthogonal_matrix(64, _gen(7), dtype=torch.float64))
    torch.testing.assert_close(ones_preserving(ones_complement(m)), m, rtol=0, atol=1e-13)


def test_ones_complement_refuses_a_matrix_that_moves_the_ones_vector():
    r = random_orthogonal_matrix(16, _gen(8), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rotation 'r1' must map the all-ones vector to itself.*max \|R 1 - 1\|"):
        RotationBank({"r1": r}, preserve_ones=("r1",))
    with pytest.raises(KeyError, match="r9"):
        RotationBank({"r1": fix_ones_direction(r)}, preserve_ones=("r9",))


def test_ones_preserving_gradient_matches_dense_formula():
    q = random_orthogonal_matrix(7, _gen(9), dtype=torch.float64).requires_grad_(True)
    g = torch.randn(8, 8, generator=_gen(10), dtype=torch.float64)
    (ones_preserving(q) * g).sum().backward()
    u = torch.full((8,), 8**-0.5, dtype=torch.float64)
    v = torch.eye(8, dtype=torch.float64)[0] - u
    h = torch.eye(8, dtype=torch.float64) - 2 * torch.outer(v, v) / (v @ v)  # H e1 = u
    assert torch.allclose(h[:, 0], u, atol=1e-15)
    q_ref = q.detach().clone().requires_grad_(True)
    (h @ torch.block_diag(torch.ones(1, 1, dtype=torch.float64), q_ref) @ h * g).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------- RotationBank
def _bank_matrices() -> dict[str, torch.Tensor]:
    return {
        "r1": fix_ones_direction(random_hadamard_matrix(64, _gen(11), dtype=torch.float64)),
        "r2.model.layers.0": random_orthogonal_matrix(16, _gen(12), dtype=torch.float64),
    }


@pytest.mark.parametrize("preserve", [(), ("r1",)])
def test_bank_save_load_round_trip(tmp_path, preserve):
    mats = _bank_matrices()
    bank = RotationBank(mats, preserve_ones=preserve)
    shapes = {n: tuple(p.shape) for n, p in bank.params.items()}
    assert shapes == {"r1": (63, 63) if preserve else (64, 64), "r2__model__layers__0": (16, 16)}
    for n, m in bank.matrices().items():
        assert m.shape == mats[n].shape and _rel(m.double(), mats[n]) <= 1e-6
    save_file(bank.matrices(), tmp_path / "r.safetensors")
    save_file(bank.parameter_tensors(), tmp_path / "p.safetensors")
    other = RotationBank({n: torch.eye(m.shape[0], dtype=torch.float64) for n, m in mats.items()},
                         preserve_ones=preserve)
    other.load_matrices(load_file(tmp_path / "r.safetensors"))
    for n in mats:
        torch.testing.assert_close(other.get(n), bank.get(n), rtol=0, atol=2e-6)
    other.load_parameter_tensors(load_file(tmp_path / "p.safetensors"))
    for n in mats:  # the optimizer's variables themselves: bit-exact
        assert torch.equal(other.get(n), bank.get(n))
    with pytest.raises(KeyError, match="missing from the file"):
        other.load_matrices({"r1": mats["r1"]})


def test_bank_for_plan_preserves_ones_only_for_layernorm_residual():
    opt_plan = prepare_model(tiny_model("opt"), layout_for("opt"))
    llama_plan = prepare_model(tiny_model("llama"), layout_for("llama"))
    assert RotationBank.for_plan(opt_plan, make_matrices(opt_plan)).preserve_ones == ("r1",)
    assert RotationBank.for_plan(llama_plan, make_matrices(llama_plan)).preserve_ones == ()


def test_bank_load_refuses_unconstrained_r1_for_a_mean_preserving_bank():
    bank = RotationBank(_bank_matrices(), preserve_ones=("r1",))
    bad = dict(_bank_matrices(), r1=random_orthogonal_matrix(64, _gen(13), dtype=torch.float64))
    before = bank.get("r1").detach().clone()
    with pytest.raises(ValueError, match="all-ones vector"):
        bank.load_matrices(bad)
    assert torch.equal(bank.get("r1"), before)


# ------------------------------------------------------------------------ float-exactness after training steps
def _trained_matrices(original, family: str, dtype: torch.dtype, preserve: bool, steps: int = 2):
    """prepare + bank + wrap (W4A4KV4, so the loss depends on the rotations), `steps` Cayley-SGD steps at lr 1.5;
    returns the initial and the learned matrices (float64)."""
    model = copy.deepcopy(original)
    plan = prepare_model(model, layout_for(family))
    init = make_matrices(plan, mode="hadamard", seed=0)
    bank = RotationBank.for_plan(plan, init, dtype) if preserve else RotationBank(init, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, BANK_ATTR, bank)
    handle = wrap_model(model, plan=plan, bank=bank, quant=W4A4KV4)
    opt = make_optimizer("cayley_sgd", list(bank.parameters()), lr=1.5, momentum=0.0)
    ids = torch.randint(3, 128, (2, 16), generator=_gen(14))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    handle.remove()
    delattr(model, BANK_ATTR)
    return init, {n: m.double() for n, m in bank.matrices().items()}


def _fused_vs_original(original, family: str, matrices) -> float:
    fused = copy.deepcopy(original)
    plan = prepare_model(fused, layout_for(family))
    fold_rotations(plan.placements, matrices, True)
    ids = torch.randint(3, 128, (2, 12), generator=_gen(15))
    return _rel(logits_in_model_dtype(fused, ids).double(), logits_in_model_dtype(original, ids).double())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_model_float_exact_after_cayley_steps(family):
    original = tiny_model(family, dtype=torch.float64)
    float64_exact_norms(original)
    init, learned = _trained_matrices(original, family, torch.float64, preserve=True)
    moved = max((learned[n] - init[n]).abs().max().item() for n in init)
    assert moved > 5e-4, "the rotations did not train: the check below would be vacuous"
    assert max(orthogonality_error(m) for m in learned.values()) <= 1e-12
    assert _fused_vs_original(original, family, learned) <= 1e-9
    if family == "opt":
        assert ones_residual(learned["r1"]) <= 1e-12


def test_opt_float32_exact_after_cayley_steps_and_drifts_without_the_constraint():
    original = tiny_model("opt", dtype=torch.float32)
    _, learned = _trained_matrices(original, "opt", torch.float32, preserve=True, steps=3)
    assert ones_residual(learned["r1"]) <= 1e-5
    assert _fused_vs_original(original, "opt", learned) <= 1e-4
    _, free = _trained_matrices(original, "opt", torch.float32, preserve=False, steps=3)
    assert ones_residual(free["r1"]) > 1e-3  # an unconstrained R1 leaves the all-ones direction...
    assert _fused_vs_original(original, "opt", free) > 1e-3  # ...and the fused float model changes


def test_mean_preserving_bank_learns_a_procrustes_target_and_keeps_the_ones_vector():
    """100 Cayley-SGD steps (lr 1.5, momentum 0.9, reorth every step) on ||R - T||^2 with T mean-preserving:
    the optimizer moves Q only, so R reaches T while R 1 = 1 holds to rounding at every step."""
    target = fix_ones_direction(random_orthogonal_matrix(16, _gen(16), dtype=torch.float64))
    start = fix_ones_direction(random_orthogonal_matrix(16, _gen(17), dtype=torch.float64))
    bank = RotationBank({"r1": start}, dtype=torch.float64, preserve_ones=("r1",))
    opt = make_optimizer("cayley_sgd", list(bank.parameters()), lr=1.5, momentum=0.9)
    first = ((bank.get("r1") - target) ** 2).sum().item()
    for _ in range(100):
        opt.zero_grad()
        loss = ((bank.get("r1") - target) ** 2).sum()
        loss.backward()
        opt.step()
        assert ones_residual(bank.get("r1").detach()) <= 1e-12
    assert loss.item() < 1e-3 * first
    assert bank.max_orthogonality_error() <= 1e-12
