"""Fake quantizers against explicit per-row / per-group reference formulas in Python floats."""

from __future__ import annotations

import pytest
import torch

from spinlearn.quant import (
    MSE_CLIP_GRID,
    MSE_CLIP_MIN_SHRINK,
    MSE_CLIP_NORM,
    ActQuantizer,
    QuantSpec,
    fake_quantize,
    quantize_activation,
    quantize_kv,
    quantize_weight,
    quantizers_disabled,
)


def ref_quant_group(vals: list[float], bits: int, sym: bool, clip: float) -> list[float]:
    """Quantize-dequantize one group of numbers, written out with Python floats."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = max(abs(v) for v in vals) * clip / qmax
        scale = scale if scale > 0 else 1.0
        return [scale * min(max(round(v / scale), -qmax - 1), qmax) for v in vals]
    lo = min(min(vals), 0.0) * clip
    hi = max(max(vals), 0.0) * clip
    scale = (hi - lo) / (2**bits - 1)
    scale = scale if scale > 0 else 1.0
    zero = round(-lo / scale)
    return [scale * (min(max(round(v / scale) + zero, 0), 2**bits - 1) - zero) for v in vals]


def ref_quant(x: torch.Tensor, bits: int, sym: bool, clip: float = 1.0, group: int = -1) -> torch.Tensor:
    """Reference over the last dim of any-rank x: rows, then groups of `group` entries."""
    rows = x.double().reshape(-1, x.shape[-1]).tolist()
    g = x.shape[-1] if group == -1 else group
    out = [sum((ref_quant_group(r[j : j + g], bits, sym, clip) for j in range(0, len(r), g)), []) for r in rows]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Laplace samples: heavier tails than a Gaussian, like LLM weights with a few large entries."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=gen, dtype=torch.float64) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [-1, 8])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.85])
def test_fake_quantize_matches_reference(sym: bool, group: int, bits: int, clip: float) -> None:
    x = torch.randn(6, 32, dtype=torch.float64) * torch.linspace(0.1, 3.0, 6, dtype=torch.float64)[:, None]
    x[2, 5] = 7.0  # an outlier that sets one row's range
    spec = QuantSpec(bits=bits, sym=sym, group_size=group, clip_ratio=clip)
    torch.testing.assert_close(fake_quantize(x, spec), ref_quant(x, bits, sym, clip, group), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sym", [True, False])
def test_weight_and_activation_match_reference(sym: bool) -> None:
    w = torch.randn(12, 48, dtype=torch.float64)
    x = torch.randn(2, 3, 48, dtype=torch.float64) + 0.5  # shifted: asymmetric ranges differ from symmetric
    for group in (-1, 16):
        spec = QuantSpec(bits=4, sym=sym, group_size=group)
        torch.testing.assert_close(quantize_weight(w, spec), ref_quant(w, 4, sym, 1.0, group), rtol=0, atol=1e-12)
        torch.testing.assert_close(quantize_activation(x, spec), ref_quant(x, 4, sym, 1.0, group), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sym", [False, True])
def test_kv_per_head_matches_reference(sym: bool) -> None:
    head_dim, n_heads = 8, 4
    x = torch.randn(2, 5, n_heads * head_dim, dtype=torch.float64)
    x[..., head_dim : 2 * head_dim] *= 10  # one loud head must not coarsen the others' grids
    spec = QuantSpec(bits=3, sym=sym)
    out = quantize_kv(x, spec, head_dim)
    torch.testing.assert_close(out, ref_quant(x, 3, sym, 1.0, head_dim), rtol=0, atol=1e-12)
    # Same per-head result when heads are a separate dim.
    per_head = quantize_kv(x.reshape(2, 5, n_heads, head_dim), spec, head_dim)
    torch.testing.assert_close(per_head.reshape(x.shape), out, rtol=0, atol=0)
    # Sub-groups of the head.
    sub = quantize_kv(x, QuantSpec(bits=3, sym=sym, group_size=4), head_dim)
    torch.testing.assert_close(sub, ref_quant(x, 3, sym, 1.0, 4), rtol=0, atol=1e-12)


def test_kv_bad_head_dim_or_group() -> None:
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match="head_dim=7"):
        quantize_kv(x, QuantSpec(bits=4), 7)
    with pytest.raises(ValueError, match="group_size=5.*head_dim=8"):
        quantize_kv(x, QuantSpec(bits=4, group_size=5), 8)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_per_row_at_most_2_pow_bits(sym: bool, bits: int) -> None:
    x = torch.randn(16, 256)
    out = fake_quantize(x, QuantSpec(bits=bits, sym=sym))
    for row in out:
        assert len(torch.unique(row)) <= 2**bits
    grouped = fake_quantize(x, QuantSpec(bits=bits, sym=sym, group_size=64)).reshape(16, 4, 64)
    for row in grouped.reshape(-1, 64):
        assert len(torch.unique(row)) <= 2**bits


@pytest.mark.parametrize("sym", [True, False])
def test_error_decreases_with_bits(sym: bool) -> None:
    x = torch.randn(32, 128, dtype=torch.float64)
    errors = [(fake_quantize(x, QuantSpec(bits=b, sym=sym)) - x).pow(2).sum().item() for b in range(2, 11)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Roughly 4x less squared error per extra bit once the grid is fine.
    assert 3.0 < errors[5] / errors[6] < 5.0


@pytest.mark.parametrize(
    "quantize",
    [
        lambda t: fake_quantize(t, QuantSpec(bits=3, sym=False, group_size=8)),
        lambda t: quantize_weight(t, QuantSpec(bits=4, mse_clip=True, clip_ratio=0.9)),
        lambda t: quantize_activation(t, QuantSpec(bits=4, sym=False)),
        lambda t: quantize_kv(t, QuantSpec(bits=2, sym=False), head_dim=16),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ste_gradient_is_identity(quantize, dtype: torch.dtype) -> None:
    x = torch.randn(8, 32).to(dtype).requires_grad_()
    upstream = torch.randn(8, 32).to(dtype)
    out = quantize(x)
    assert not torch.equal(out.detach(), x.detach())  # it did quantize
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_gradient_reaches_rotation() -> None:
    """d/dR <G, q(W R)> = W^T G with the STE: what rotation training relies on."""
    w = torch.randn(16, 32, dtype=torch.float64)
    r = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0].requires_grad_()
    g = torch.randn(16, 32, dtype=torch.float64)
    (quantize_weight(w @ r, QuantSpec(bits=4)) * g).sum().backward()
    torch.testing.assert_close(r.grad, w.T @ g)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_mse_clip_beats_no_clip_on_heavy_tails(bits: int, sym: bool) -> None:
    w = heavy_tailed(32, 128)
    plain = quantize_weight(w, QuantSpec(bits=bits, sym=sym))
    searched = quantize_weight(w, QuantSpec(bits=bits, sym=sym, mse_clip=True))
    # The search includes ratio 1.0, so per row its own objective can only improve ...
    row_obj = lambda q: (q - w).abs().pow(MSE_CLIP_NORM).sum(dim=1)  # noqa: E731
    assert (row_obj(searched) <= row_obj(plain) * (1 + 1e-12)).all()
    # ... and on heavy tails the squared error drops clearly.
    mse_plain, mse_searched = (plain - w).pow(2).sum().item(), (searched - w).pow(2).sum().item()
    assert mse_searched < 0.95 * mse_plain, (mse_searched, mse_plain)
    # Still on a grid of at most 2^bits levels per row.
    assert max(len(torch.unique(row)) for row in searched) <= 2**bits


@pytest.mark.parametrize("sym", [True, False])
def test_mse_clip_ratio_is_the_ratio_the_search_picks(sym: bool) -> None:
    """``mse_clip_ratio`` (the learned weight clips' MSE start) against the search written out with Python floats,
    and the ratio gives back ``find_qparams``'s searched scale and zero."""
    from spinlearn.quant import find_qparams, mse_clip_ratio

    w = heavy_tailed(6, 24).double()
    got = mse_clip_ratio(w, 4, sym)
    assert got.shape == (6, 1)
    n_steps = round((1 - MSE_CLIP_MIN_SHRINK) * MSE_CLIP_GRID)
    for row, ratio in zip(w.tolist(), got.flatten().tolist()):
        errors = [sum(abs(q - v) ** MSE_CLIP_NORM for q, v in zip(ref_quant_group(row, 4, sym, 1 - i / MSE_CLIP_GRID),
                                                                   row)) for i in range(n_steps + 1)]
        best = min(range(len(errors)), key=lambda i: (errors[i], i))
        assert ratio == pytest.approx(1 - best / MSE_CLIP_GRID, abs=1e-12)
    assert (got < 1).any()  # heavy tails: the search clips
    for a, b in zip(find_qparams(w, 4, sym, got), find_qparams(w, 4, sym, mse=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "number"),
    [
        ({"bits": 1}, "1"),
        ({"bits": 17}, "17"),
        ({"bits": 0}, "0"),
        ({"group_size": 0}, "0"),
        ({"group_size": -3}, "-3"),
        ({"clip_ratio": 0.0}, "0.0"),
        ({"clip_ratio": 1.5}, "1.5"),
        ({"clip_ratio": -0.2}, "-0.2"),
    ],
)
def test_bad_spec_raises_naming_value(kwargs: dict, number: str) -> None:
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{field}={number}\b"):
        QuantSpec(**kwargs)


def test_bits_message_names_valid_range() -> None:
    with pytest.raises(ValueError, match=r"2\.\.16"):
        QuantSpec(bits=32)


def test_group_not_dividing_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"group_size=24.*dimension 64"):
        fake_quantize(torch.randn(4, 64), QuantSpec(bits=4, group_size=24))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4), QuantSpec(bits=4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_in_same_dtype_out(dtype: torch.dtype) -> None:
    x = torch.randn(4, 64).to(dtype)
    spec = QuantSpec(bits=4, sym=False, group_size=16)
    out = fake_quantize(x, spec)
    assert out.dtype == dtype
    # Computed in float32 from the same values, then rounded to the input dtype once.
    torch.testing.assert_close(out, fake_quantize(x.float(), spec).to(dtype), rtol=0, atol=0)
    assert quantize_weight(x.double(), spec).dtype == torch.float64


def test_sixteen_bits_is_identity() -> None:
    x = torch.randn(4, 32)
    spec = QuantSpec()
    assert not spec.enabled and QuantSpec(bits=15).enabled
    assert fake_quantize(x, spec) is x
    assert quantize_weight(x, spec) is x
    assert quantize_activation(x, spec) is x
    assert quantize_kv(x, spec, 8) is x


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("mse", [False, True])
def test_zero_rows_stay_zero(sym: bool, mse: bool) -> None:
    x = torch.randn(4, 32)
    x[1] = 0.0
    x[3, :16] = 0.0
    out = fake_quantize(x, QuantSpec(bits=4, sym=sym, group_size=16, mse_clip=mse))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(32))
    assert torch.equal(out[3, :16], torch.zeros(16))


def test_act_quantizer_switch() -> None:
    x = torch.randn(2, 3, 32)
    act = ActQuantizer(QuantSpec(bits=4, sym=False))
    kv = ActQuantizer(QuantSpec(bits=4, sym=False), head_dim=8)
    model = torch.nn.Sequential(act, kv)
    torch.testing.assert_close(act(x), quantize_activation(x, act.spec), rtol=0, atol=0)
    torch.testing.assert_close(kv(x), quantize_kv(x, kv.spec, 8), rtol=0, atol=0)
    kv.enabled = False
    with quantizers_disabled(model):
        assert not act.enabled
        assert model(x) is x
    assert act.enabled and not kv.enabled  # previous states restored
    assert "bits=4" in repr(model) and "head_dim=8" in repr(model)


# ------------------------------------------------------------------------------------ learnable activation clip
def _clip_quantizer(sym: bool, ratio: float, dtype=torch.float64) -> ActQuantizer:
    q = ActQuantizer(QuantSpec(bits=4, sym=sym, clip_ratio=ratio), learn_clip=True)
    return q.to(dtype)


def _outlier_tokens(dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(7), dtype=dtype)
    x[:, 3] = 8.0  # a positive outlier channel: clipped at ratio 0.8
    x[:, 9] = -6.0
    return x


@pytest.mark.parametrize("sym", [True, False])
def test_learned_clip_forward_is_the_fixed_clip_quantizer(sym):
    q = _clip_quantizer(sym, 0.8, torch.float32)
    x = _outlier_tokens(torch.float32)
    ratio = float(q.clip_ratio().detach())
    assert abs(ratio - 0.8) < 1e-6
    assert torch.equal(q(x), fake_quantize(x, QuantSpec(bits=4, sym=sym, clip_ratio=ratio)))
    assert abs(float(ActQuantizer(QuantSpec(bits=4), learn_clip=True).clip_ratio().detach()) - 0.99) < 1e-6  # a_clip 1


@pytest.mark.parametrize("sym", [True, False])
def test_learned_clip_gradient_is_lsq_and_matches_finite_differences_where_clipped(sym):
    """Autograd vs the float64 LSQ formula for d loss / d phi, and (on the clipped entries only, where the output is
    smooth in the ratio: scale * (q - z) with q fixed) against central finite differences of the forward value."""
    q = _clip_quantizer(sym, 0.8)
    x = _outlier_tokens()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (q(x) * weights).sum().backward()
    r = float(q.clip_ratio().detach())
    qmin, qmax = (-8, 7) if sym else (0, 15)
    xmin, xmax = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    dscale_dr = (torch.maximum(-xmin, xmax) / 7) if sym else (xmax - xmin) / 15
    scale = dscale_dr * r
    zero = torch.zeros_like(scale) if sym else torch.round(-xmin * r / scale)
    u = x / scale
    qi = torch.round(u) + zero
    clipped = (qi < qmin) | (qi > qmax)
    dx_dscale = torch.where(clipped, qi.clamp(qmin, qmax) - zero, torch.round(u) - u)
    expected = (weights * dx_dscale * dscale_dr).sum() * r * (1 - r)
    torch.testing.assert_close(q.clip_logit.grad, expected, rtol=1e-10, atol=1e-12)
    assert clipped.sum() >= 6  # the outlier channels really are clipped

    def value(phi: float) -> float:
        with torch.no_grad():
            q.clip_logit.fill_(phi)
            return float((q(x) * weights * clipped).sum())

    phi, eps = float(q.clip_logit.detach()), 1e-6
    fd = (value(phi + eps) - value(phi - eps)) / (2 * eps)
    analytic = float((weights * clipped * dx_dscale * dscale_dr).sum() * r * (1 - r))
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)) and abs(analytic) > 1e-3


def test_learned_clip_ratio_stays_inside_0_1_and_x_gets_the_identity_ste():
    q = _clip_quantizer(False, 0.9, torch.float32)
    x = _outlier_tokens(torch.float32).requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    for phi in (-1e4, 1e4, float(torch.finfo(torch.float32).max)):
        with torch.no_grad():
            q.clip_logit.fill_(phi)
        assert 0.0 < float(q.clip_ratio().detach()) < 1.0
        assert torch.isfinite(q(x)).all()
    with pytest.raises(ValueError, match="int-format activations and K/V only"):
        ActQuantizer(QuantSpec(bits=4, format="nvfp4"), learn_clip=True)


# ------------------------------------------------------------------------------ per-row (group) weight clip ratios
@pytest.mark.parametrize("group", [-1, 8])
def test_weight_clip_per_row_and_group_is_the_float64_grid_and_its_qparams(group):
    """quantize_weight with a clip ratio per row and group: float64 reference s = r * max|w| / 7 per group;
    weight_qparams gives the scales of that grid (what an export stores), and the ratio gets a gradient."""
    from spinlearn.quant import weight_groups, weight_qparams

    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    spec = QuantSpec(bits=4, group_size=group)
    rows, groups = weight_groups(w.shape, spec)
    assert (rows, groups) == (6, 1 if group == -1 else 4)
    clip = torch.linspace(0.6, 0.95, rows * groups, dtype=torch.float64).reshape(rows, groups).requires_grad_(True)
    out = quantize_weight(w, spec, clip)
    g = w.reshape(rows, groups, -1)
    s = clip.detach().unsqueeze(-1) * g.abs().amax(-1, keepdim=True) / 7
    ref = (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(w.shape)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    scale, zero = weight_qparams(w, spec, clip.detach())
    torch.testing.assert_close(scale, s.squeeze(-1), rtol=0, atol=0)
    assert torch.equal(zero, torch.zeros_like(zero))
    assert not torch.equal(out, quantize_weight(w, spec))  # the ratios changed the grid
    out.pow(2).sum().backward()
    assert clip.grad is not None and clip.grad.abs().min() > 0
    with pytest.raises(ValueError, match=rf"shape \(6, {groups}\) \[rows, groups\]; got shape \(6, 3\)"):
        quantize_weight(w, spec, torch.ones(6, 3))
    with pytest.raises(ValueError, match="without mse_clip"):
        quantize_weight(w, QuantSpec(bits=4, group_size=group, mse_clip=True), clip.detach())


# ------------------------------------------------------------------------------ the STE node itself
def _saved_tensor_count(fn) -> int:
    """How many tensors autograd keeps for the backward pass while ``fn`` runs."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


@pytest.mark.parametrize("sym", [True, False])
def test_round_through_scale_is_quant_dequant_and_saves_one_tensor_only_for_a_learned_scale(sym):
    """The forward is quant_dequant bit for bit (float32, outliers clamped); the backward is the identity to x and
    the float64 LSQ term to the scale; nothing is kept for a scale without a gradient (fixed-clip quantizers)."""
    from spinlearn.quant import RoundThroughScale, qrange, quant_dequant

    qmin, qmax = qrange(4, sym)
    x = (_outlier_tokens(torch.float32) * 1.7).reshape(6, 4, 8)  # [tokens, groups, group]
    scale = (x.abs().amax(-1, keepdim=True) * 0.7 / 7).requires_grad_(True)  # clips the large entries
    zero = torch.zeros_like(scale) if sym else torch.full_like(scale, 8.0)
    xg = x.clone().requires_grad_(True)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = RoundThroughScale.apply(xg, scale, zero, qmin, qmax)
    assert torch.equal(out, quant_dequant(x, scale.detach(), zero, qmin, qmax))
    (out * weights).sum().backward()
    assert torch.equal(xg.grad, weights)
    s, w, x64, z = scale.detach().double(), weights.double(), x.double(), zero.double()
    u = x64 / s
    q = torch.round(u) + z
    inside = (q >= qmin) & (q <= qmax)
    expected = (w * torch.where(inside, q - z - u, q.clamp(qmin, qmax) - z)).sum(-1, keepdim=True)
    assert (~inside).sum() >= 4  # some entries really are clamped
    torch.testing.assert_close(scale.grad.double(), expected, rtol=1e-5, atol=1e-5)

    learned = _saved_tensor_count(lambda: RoundThroughScale.apply(xg, scale, zero, qmin, qmax))
    fixed = _saved_tensor_count(lambda: RoundThroughScale.apply(xg, scale.detach(), zero, qmin, qmax))
    assert (learned, fixed) == (1, 0)
