"""FP4 fake quantizers (spinlearn.fp4) against float64 references, compressed-tensors' own E2M1 rounding,
and the format dispatch of spinlearn.quant."""

from __future__ import annotations

import pytest
import torch

from spinlearn.fp4 import E2M1_VALUES, mxfp4_qdq, nvfp4_block_scales, nvfp4_global_scale, nvfp4_qdq, round_e2m1
from spinlearn.quant import QuantSettings, QuantSpec, fake_quantize, quantize_activation, quantize_weight

GRID = torch.tensor(E2M1_VALUES, dtype=torch.float64)


def ref_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float64 reference: nearest magnitude of the grid, ties to the even index (even mantissa), saturating."""
    a = x.double().abs().clamp(max=6.0)
    d = (a.unsqueeze(-1) - GRID).abs()
    best = d.min(dim=-1, keepdim=True).values
    cand = (d == best)
    # among tied candidates prefer an even index
    even = cand & (torch.arange(len(GRID)) % 2 == 0)
    idx = torch.where(even.any(-1), even.float().argmax(-1), cand.float().argmax(-1))
    return torch.sign(x.double()) * GRID[idx]


def test_round_e2m1_matches_reference_and_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g, dtype=torch.float64) * 3
    mids = (GRID[1:] + GRID[:-1]) / 2
    x = torch.cat([x, mids, -mids, torch.tensor([7.0, -9.0, 0.0])])
    assert torch.equal(round_e2m1(x), ref_e2m1(x))
    assert round_e2m1(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).tolist() == [0, 1, 1, 2, 2, 4, 4]


def test_round_e2m1_equals_compressed_tensors():
    import torch._dynamo
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 4
    with torch._dynamo.config.patch(disable=True):
        theirs = FP4_E2M1_DATA.cast_to_fp4(x.clone())
    assert torch.equal(round_e2m1(x), theirs)


def ref_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """float64 NVFP4: g = 448*6/amax, block scale = fp8(amax_b/6*g) (0 -> 1/8), x_hat = e2m1(x g / s) s / g."""
    xd = x.double()
    g = 448.0 * 6.0 / xd.abs().max()
    b = xd.reshape(*x.shape[:-1], -1, 16)
    s = (b.abs().amax(-1) / 6.0 * g).to(torch.float8_e4m3fn).double()
    s = torch.where(s == 0, torch.full_like(s, 0.125), s)
    eff = (s / g).unsqueeze(-1)
    return (ref_e2m1(b / eff) * eff).reshape(x.shape)


def test_nvfp4_matches_float64_reference():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    x[3, :16] = 0.0  # an all-zero block
    x[5, 7] = 40.0  # an outlier sets the global scale
    got = nvfp4_qdq(x)
    ref = ref_nvfp4(x)
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-7)
    # x_hat / (s_b / g) lies on the E2M1 grid exactly
    g = nvfp4_global_scale(x.abs().amax())
    eff = (nvfp4_block_scales(x, g) / g).unsqueeze(-1)
    q = got.reshape(32, 8, 16) / eff
    assert torch.equal(round_e2m1(q), q)


def test_mxfp4_power_of_two_scales_and_reference():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).double()
    got = mxfp4_qdq(x).double()
    b = x.reshape(16, 2, 32)
    scale = torch.exp2(torch.floor(torch.log2(b.abs().amax(-1, keepdim=True))) - 2)
    ref = (ref_e2m1(b / scale) * scale).reshape(x.shape)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_ste_and_dispatch():
    spec = QuantSpec(bits=4, format="nvfp4")
    x = torch.randn(4, 32, requires_grad=True)
    y = quantize_activation(x, spec)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(y.detach(), nvfp4_qdq(x.detach()))
    w = torch.randn(8, 64)
    assert torch.equal(quantize_weight(w, QuantSpec(bits=4, format="mxfp4")), mxfp4_qdq(w))
    assert torch.equal(fake_quantize(w, QuantSpec(bits=16, format="nvfp4")), w)  # 16 bits = off


def test_settings_pass_format_and_spec_errors():
    s = QuantSettings.from_flags(w_bits=4, a_bits=4, format="nvfp4")
    assert (s.w.format, s.a.format, s.kv.format) == ("nvfp4", "nvfp4", "int")
    with pytest.raises(ValueError, match="format='fp8'.*int, nvfp4, mxfp4"):
        QuantSpec(format="fp8")
    with pytest.raises(ValueError, match="set bits to 4"):
        QuantSpec(bits=8, format="nvfp4")
    with pytest.raises(ValueError, match="blocks of 32"):
        QuantSpec(bits=4, format="mxfp4", group_size=16)
    with pytest.raises(ValueError, match="blocks of 16 .* 40"):
        nvfp4_qdq(torch.randn(2, 40))
