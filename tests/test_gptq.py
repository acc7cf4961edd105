"""GPTQ against RTN and against a slow column-by-column OBS reference in float64."""

from __future__ import annotations

import pytest
import torch

from spinlearn.gptq import HessianAccumulator, RefitAccumulator, gptq_quantize_weight, refit_weight
from spinlearn.quant import QuantSpec, find_qparams, qrange, quant_dequant, quantize_activation, quantize_weight

N_IN, N_OUT, N_TOKENS = 128, 48, 768


def correlated_inputs(seed: int = 0, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Tokens x = z A with a random mixing A, a few loud outlier channels, optional dead channels."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N_TOKENS, N_IN, generator=gen)
    a = torch.randn(N_IN, N_IN, generator=gen) / N_IN**0.5 + 0.5 * torch.eye(N_IN)
    x = z @ a
    x[:, [3, 40, 77]] *= 12.0
    x[:, list(dead)] = 0.0
    return x


def layer(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N_OUT, N_IN, generator=gen) / N_IN**0.5


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator()
    for chunk in x.split(200):
        acc.add_batch(chunk)
    return acc.hessian


def recon_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    x, w, q = x.double(), w.double(), q.double()
    return (x @ w.T - x @ q.T).pow(2).sum().item()


def slow_gptq(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, percdamp: float = 0.01, act_order: bool = False,
    static_groups: bool = False, grid: list | None = None,
) -> torch.Tensor:
    """Textbook GPTQ/OBS in float64: one column at a time, the full inverse Hessian downdated after
    each column (no Cholesky, no blocks, no lazy updates). ``grid``: fixed (scale, zero) per group (one entry per
    channel) instead of the spec's."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    g = spec.group_size
    qmin, qmax = qrange(spec.bits, spec.sym)
    par = lambda cols: find_qparams(cols, spec.bits, spec.sym, spec.clip_ratio, spec.mse_clip)  # noqa: E731
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = par(w) if g == -1 else (None, None)
    static = [par(w[:, j : j + g]) for j in range(0, n, g)] if static_groups else []
    if grid is not None:
        static_groups = g > 0
        scale, zero = grid[0] if g == -1 else (None, None)
        static = [(s.double(), z.double()) for s, z in grid] if g > 0 else []
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(n):
        if static_groups:
            scale, zero = static[perm[j].item() // g]
        elif g > 0 and j % g == 0:
            scale, zero = par(w[:, j : j + g])
        q[:, j] = quant_dequant(w[:, j : j + 1], scale, zero, qmin, qmax)[:, 0]
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]  # optimal compensation of the remaining columns
        hinv = hinv - torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]  # drop column j from the problem
    return q[:, torch.argsort(perm)]


CONFIGS = [
    pytest.param(QuantSpec(bits=4, sym=True), False, id="w4-sym-channel"),
    pytest.param(QuantSpec(bits=4, sym=False, group_size=32), False, id="w4-asym-g32"),
    pytest.param(QuantSpec(bits=4, sym=True), True, id="w4-sym-channel-actorder"),
    pytest.param(QuantSpec(bits=3, sym=False, group_size=32), True, id="w3-asym-g32-actorder"),
]


@pytest.mark.parametrize(("spec", "act_order"), CONFIGS)
def test_gptq_beats_rtn(spec: QuantSpec, act_order: bool) -> None:
    x, w = correlated_inputs(), layer()
    q, stats = gptq_quantize_weight(w, hessian_of(x), spec, act_order=act_order, block_size=32)
    gptq_err = recon_error(x, w, q)
    rtn_err = recon_error(x, w, quantize_weight(w, spec))
    assert gptq_err < 0.6 * rtn_err, (gptq_err, rtn_err)
    assert stats["error"] > 0 and stats["dead_columns"] == 0


@pytest.mark.parametrize("block_size", [128, 48, 7])
@pytest.mark.parametrize(
    ("spec", "act_order", "static"),
    [
        (QuantSpec(bits=4, sym=True), False, False),
        (QuantSpec(bits=4, sym=False, group_size=32), False, False),
        (QuantSpec(bits=3, sym=True, group_size=16), True, False),
        (QuantSpec(bits=4, sym=False, group_size=32), True, True),
        (QuantSpec(bits=4, sym=True, mse_clip=True), True, False),
    ],
)
def test_blocked_matches_slow_reference(spec: QuantSpec, act_order: bool, static: bool, block_size: int) -> None:
    x, w = correlated_inputs(seed=2), layer(seed=3)
    h = hessian_of(x)
    ref = slow_gptq(w, h, spec, act_order=act_order, static_groups=static)
    kw = dict(act_order=act_order, static_groups=static, block_size=block_size)
    q64, _ = gptq_quantize_weight(w.double(), h, spec, compute_dtype=torch.float64, **kw)
    q32, _ = gptq_quantize_weight(w, h, spec, **kw)
    # Grouped scales come from error-updated weights, so they agree to rounding noise, not bitwise.
    assert torch.isclose(q64, ref, rtol=0, atol=1e-9).all()
    # float32 may flip a rare rounding tie, which then shifts the later updates slightly.
    assert (torch.isclose(q32.double(), ref, rtol=0, atol=1e-5)).float().mean().item() >= 0.99
    ref_err = recon_error(x, w, ref)
    assert recon_error(x, w, q32) == pytest.approx(ref_err, rel=1e-2)


def learned_clips(groups: int, seed: int = 5) -> torch.Tensor:
    """Clip ratios per row and group, as learned weight clipping leaves them (0.55 .. 1)."""
    return 0.55 + 0.45 * torch.rand(N_OUT, groups, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("spec", "act_order"),
    [
        (QuantSpec(bits=4, sym=True, mse_clip=True), True),  # (the search is not run on a fixed grid)
        (QuantSpec(bits=4, sym=False, group_size=32), True),
        (QuantSpec(bits=3, sym=True, group_size=16), False),
    ],
)
def test_learned_clip_grid_matches_slow_reference_and_beats_rtn_on_it(spec: QuantSpec, act_order: bool) -> None:
    """With fixed clip ratios, GPTQ rounds on round-to-nearest's grid for those ratios, taken from the original
    weight (the textbook algorithm on that grid, float64), and reconstructs the layer better than RTN on it."""
    x, w = correlated_inputs(seed=2), layer(seed=3)
    h = hessian_of(x)
    groups = 1 if spec.group_size < 0 else N_IN // spec.group_size
    clip = learned_clips(groups)
    g = N_IN if spec.group_size < 0 else spec.group_size
    grid = [find_qparams(w.double()[:, k * g : (k + 1) * g], spec.bits, spec.sym, clip[:, k : k + 1].double())
            for k in range(groups)]
    if spec.sym and spec.group_size < 0:  # written out: clip * max |row| / (2^(b-1) - 1)
        assert torch.allclose(grid[0][0], clip.double() * w.double().abs().amax(1, keepdim=True) / 7)
    ref = slow_gptq(w, h, spec, act_order=act_order, grid=grid)
    q64, st = gptq_quantize_weight(w.double(), h, spec, act_order=act_order, block_size=48,
                                   compute_dtype=torch.float64, clip=clip)
    assert torch.isclose(q64, ref, rtol=0, atol=1e-9).all()
    assert torch.allclose(st["scale"], torch.cat([s for s, _ in grid], 1), rtol=1e-12, atol=0)
    q32, _ = gptq_quantize_weight(w, h, spec, act_order=act_order, clip=clip)
    rtn = quantize_weight(w, QuantSpec(bits=spec.bits, sym=spec.sym, group_size=spec.group_size), clip)
    assert recon_error(x, w, q32) < 0.7 * recon_error(x, w, rtn)
    assert not torch.equal(q32, gptq_quantize_weight(w, h, spec, act_order=act_order)[0])  # not the spec's grid


def test_learned_clip_grid_of_the_wrong_shape_is_refused() -> None:
    x, w = correlated_inputs(), layer()
    with pytest.raises(ValueError, match=r"\[48, 4\]|\(48, 4\)"):
        gptq_quantize_weight(w, hessian_of(x), QuantSpec(bits=4, group_size=32), clip=learned_clips(1))


@pytest.mark.parametrize("sym", [True, False])
def test_per_channel_weights_lie_on_grid(sym: bool) -> None:
    x, w = correlated_inputs(), layer()
    bits = 4
    q, _ = gptq_quantize_weight(w, hessian_of(x), QuantSpec(bits=bits, sym=sym), act_order=True)
    # Per-channel scales from the original weight, written out.
    if sym:
        scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        levels = q / scale
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        wmin, wmax = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
        scale = (wmax - wmin) / (2**bits - 1)
        levels = q / scale + torch.round(-wmin / scale)
        lo, hi = 0, 2**bits - 1
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.round().min() >= lo and levels.round().max() <= hi


@pytest.mark.parametrize("act_order", [False, True])
def test_grouped_weights_have_few_levels(act_order: bool) -> None:
    x, w = correlated_inputs(), layer()
    bits, g = 3, 32
    q, _ = gptq_quantize_weight(w, hessian_of(x), QuantSpec(bits=bits, sym=False, group_size=g), act_order=act_order)
    if act_order:  # groups are consecutive in the activation order
        perm = torch.argsort(torch.diag(hessian_of(x)), descending=True)
        q = q[:, perm]
    for grp in q.reshape(N_OUT, N_IN // g, g).reshape(-1, g):
        assert len(torch.unique(grp)) <= 2**bits


def test_dead_input_column() -> None:
    x, w = correlated_inputs(dead=(5, 90)), layer()
    h = hessian_of(x)
    assert h[5, 5] == 0
    spec = QuantSpec(bits=4, sym=True)
    q, stats = gptq_quantize_weight(w, h, spec, act_order=True)
    assert torch.isfinite(q).all()
    assert stats["dead_columns"] == 2
    assert torch.equal(q[:, [5, 90]], torch.zeros(N_OUT, 2))
    assert recon_error(x, w, q) < recon_error(x, w, quantize_weight(w, spec))
    assert torch.isclose(q.double(), slow_gptq(w, h, spec, act_order=True), rtol=0, atol=1e-5).float().mean() >= 0.99


def test_sixteen_bits_returns_weight() -> None:
    w = layer()
    q, stats = gptq_quantize_weight(w, torch.eye(N_IN), QuantSpec(bits=16))
    assert q is w and stats["error"] == 0.0


def test_dtype_preserved() -> None:
    x, w = correlated_inputs(), layer().bfloat16()
    q, _ = gptq_quantize_weight(w, hessian_of(x), QuantSpec(bits=4))
    assert q.dtype == torch.bfloat16


def test_cholesky_failure_suggests_percdamp() -> None:
    h = -torch.eye(N_IN)
    with pytest.raises(RuntimeError, match="percdamp"):
        gptq_quantize_weight(layer(), h, QuantSpec(bits=4), percdamp=0.0)


def test_bad_arguments() -> None:
    w = layer()
    with pytest.raises(ValueError, match=r"\(128, 128\)"):
        gptq_quantize_weight(w, torch.eye(N_IN - 1), QuantSpec(bits=4))
    with pytest.raises(ValueError, match="group_size=48.*128"):
        gptq_quantize_weight(w, torch.eye(N_IN), QuantSpec(bits=4, group_size=48))
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize_weight(w, torch.eye(N_IN), QuantSpec(bits=4), static_groups=True)
    with pytest.raises(ValueError, match="block_size=0"):
        gptq_quantize_weight(w, torch.eye(N_IN), QuantSpec(bits=4), block_size=0)


def test_hessian_accumulator_matches_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 16), (2, 4, 16), (17, 16)]
    batches = [torch.randn(*shape, generator=gen) for shape in shapes]
    acc = HessianAccumulator()
    for b in batches:
        acc.add_batch(b)
    rows = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    assert acc.nsamples == rows.shape[0] == 28
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), 2.0 / 28 * rows.T @ rows, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="8 features, expected 16"):
        acc.add_batch(torch.randn(2, 8))


def test_hessian_accumulator_hook_and_empty() -> None:
    acc = HessianAccumulator()
    with pytest.raises(RuntimeError, match="GPTQ needs calibration data"):
        _ = acc.hessian
    lin = torch.nn.Linear(16, 4)
    handle = lin.register_forward_hook(acc.forward_hook)
    x = torch.randn(2, 5, 16)
    lin(x)
    handle.remove()
    rows = x.reshape(-1, 16).double()
    torch.testing.assert_close(acc.hessian.double(), 2.0 / 10 * rows.T @ rows, rtol=1e-5, atol=1e-6)


def quantized_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and what a per-token asymmetric int4 activation quantizer makes of them."""
    x = correlated_inputs(seed)
    return x, quantize_activation(x, QuantSpec(bits=4, sym=False))


def refit_accumulator(x: torch.Tensor, xq: torch.Tensor) -> RefitAccumulator:
    acc = RefitAccumulator()
    for a, b in zip(x.split(200), xq.split(200)):
        acc.add_pair(a, b)
    return acc


def test_refit_accumulator_matches_dense() -> None:
    x, xq = quantized_pair()
    acc = refit_accumulator(x, xq)
    n = x.shape[0]
    torch.testing.assert_close(acc.hessian.double(), 2.0 / n * xq.double().T @ xq.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.cross.double(), 2.0 / n * x.double().T @ xq.double(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"target inputs \(4, 128\) and quantized inputs \(4, 64\) differ"):
        acc.add_pair(torch.randn(4, 128), torch.randn(4, 64))
    with pytest.raises(RuntimeError, match="GPTQ needs calibration data"):
        _ = RefitAccumulator().cross


def test_refit_is_the_ridge_least_squares_fit() -> None:
    """Undamped, W C H^-1 is argmin ||X W^T - Xq W'^T|| (float64 lstsq); with the ridge it is the ridge solution; for
    float inputs (C = H) it is W undamped and W shrunk along the weakly excited input directions with the ridge."""
    x, xq = quantized_pair()
    w = layer()
    acc = refit_accumulator(x, xq)
    got = refit_weight(w.double(), acc.hessian, acc.cross, percdamp=0.0)
    ls = torch.linalg.lstsq(xq.double(), x.double() @ w.double().T).solution.T
    torch.testing.assert_close(got, ls, rtol=1e-3, atol=1e-4)
    assert (got - w.double()).abs().max() > 1e-2  # the quantizer's error is worth correcting
    n, lam = x.shape[0], 0.05 * acc.hessian.double().diagonal().mean()
    ridge = torch.linalg.solve(xq.double().T @ xq.double() + n / 2 * lam * torch.eye(N_IN, dtype=torch.float64),
                               xq.double().T @ x.double() @ w.double().T).T
    torch.testing.assert_close(refit_weight(w.double(), acc.hessian, acc.cross, percdamp=0.05), ridge, rtol=1e-3,
                               atol=1e-4)
    h = hessian_of(x)
    torch.testing.assert_close(refit_weight(w, h, h, percdamp=0.0), w, rtol=1e-3, atol=1e-4)
    evals, vecs = torch.linalg.eigh(h.double())
    shrunk = (refit_weight(w.double(), h, h) @ vecs).norm(dim=0) / (w.double() @ vecs).norm(dim=0)
    torch.testing.assert_close(shrunk, evals / (evals + 0.01 * evals.mean()), rtol=1e-4, atol=1e-6)
    assert shrunk[0] < 0.9 and shrunk[-1] > 0.999  # the weakest direction shrinks, the strongest stays
    assert refit_weight(w, torch.zeros_like(h), torch.zeros_like(h)) is w  # no input energy: nothing to fit


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, group_size=32, sym=False)])
def test_gptq_on_the_refit_weight_lowers_the_asymmetric_error(spec: QuantSpec) -> None:
    """||X W^T - Xq Q^T||^2, the error of the deployed layer (quantized weights reading quantized inputs) against
    the float layer: GPTQ on the refitted weight beats GPTQ on W with the same Hessian, and RTN."""
    x, xq = quantized_pair(3)
    w = layer(4)
    acc = refit_accumulator(x, xq)

    def err(q: torch.Tensor) -> float:
        return (x.double() @ w.double().T - xq.double() @ q.double().T).pow(2).sum().item()

    plain, _ = gptq_quantize_weight(w, acc.hessian, spec, act_order=True)
    refit, _ = gptq_quantize_weight(refit_weight(w, acc.hessian, acc.cross), acc.hessian, spec, act_order=True)
    assert err(refit) < 0.9 * err(plain) < 0.9 * err(quantize_weight(w, spec)), (err(refit), err(plain))
    assert err(refit) < err(w)  # better than the float weight reading the quantized inputs
