"""FP4 (E2M1) microscaling fake quantizers with a straight-through estimator: NVFP4 and MXFP4.

An E2M1 value is sign-magnitude with 2 exponent and 1 mantissa bits; its magnitudes are
``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``. Rounding is to the nearest magnitude, ties to the even mantissa
(0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), and anything above 6
saturates to 6: the same table compressed-tensors and NVIDIA's kernels use.

* NVFP4 (NVIDIA): blocks of 16 consecutive entries of the last dim, each with an FP8 E4M3 scale, and one
  float32 global scale per tensor. With ``amax`` the tensor's max |x| and ``amax_b`` the block's::

      g   = 448 * 6 / amax                      (global scale: block scales use the FP8 range)
      s_b = fp8_e4m3(amax_b / 6 * g)            (stored block scale; 0 -> 0.125, FP8's eps)
      x_hat = e2m1(x / (s_b / g)) * (s_b / g)

  This is the convention of compressed-tensors' ``nvfp4-pack-quantized`` (``weight_global_scale`` = g,
  ``weight_scale`` = s_b), computed in the same float32 order so an export decompresses to exactly these
  values. Activations use a dynamic global scale from the tensor at hand (a serving engine calibrates a
  static one, ``input_global_scale``).
* MXFP4 (OCP Microscaling v1.0): blocks of 32 with a power-of-two (E8M0) scale
  ``2^(floor(log2 amax_b) - 2)`` (2 = E2M1's largest exponent), no global scale.

``clip_ratio`` shrinks the block max (and the tensor max) before the scales are taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "E2M1_VALUES", "FP4_MAX", "FP8_E4M3_MAX", "FP8_E4M3_EPS", "BLOCK_SIZE",
    "round_e2m1", "nvfp4_global_scale", "nvfp4_block_scales", "nvfp4_qdq", "mxfp4_qdq", "fake_quantize_fp4",
]

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_E4M3_EPS = 0.125  # what a zero block scale becomes (as compressed-tensors does)
BLOCK_SIZE = {"nvfp4": 16, "mxfp4": 32}
_MX_ELEM_EMAX = 2  # largest exponent of E2M1 (6 = 1.5 * 2^2)


def round_e2m1(x: Tensor) -> Tensor:
    """Round to the nearest E2M1 value (ties to even mantissa), saturating at +-6; same dtype as x.

    The grid has spacing 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]; ``torch.round`` (half to even) in units of that
    spacing gives exactly the ties-to-even-mantissa rule (e.g. 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 5 -> 4)."""
    a = x.abs()
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.sign(x) * q.clamp(max=FP4_MAX)


def nvfp4_global_scale(amax: Tensor) -> Tensor:
    """g = 448 * 6 / amax in float32 (shape [1]); 1 where amax is 0 or not finite."""
    amax = amax.detach().to(torch.float32).reshape(1)
    g = FP8_E4M3_MAX * FP4_MAX / amax.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def nvfp4_block_scales(x: Tensor, global_scale: Tensor, clip_ratio: float = 1.0) -> Tensor:
    """FP8-representable block scales s_b [..., n/16] (as float32) for x [..., n]."""
    blocks = x.detach().to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // 16, 16)
    amax_b = blocks.abs().amax(dim=-1) * clip_ratio
    s = (amax_b / FP4_MAX) * global_scale
    s = s.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return torch.where(s == 0, torch.full_like(s, FP8_E4M3_EPS), s)


def _check_blocks(x: Tensor, fmt: str) -> int:
    block = BLOCK_SIZE[fmt]
    if x.dim() == 0 or x.shape[-1] % block != 0:
        raise ValueError(
            f"{fmt} quantizes blocks of {block} along the last dimension, which is "
            f"{x.shape[-1] if x.dim() else 'absent (a scalar)'}: use a width divisible by {block} or the int format"
        )
    return block


@torch.no_grad()
def nvfp4_qdq(x: Tensor, clip_ratio: float = 1.0, global_scale: Tensor | None = None) -> Tensor:
    """NVFP4 quantize-dequantize of x [..., n] (n divisible by 16) in float32; no gradient.

    ``global_scale``: a fixed g (e.g. an export's); default = from this tensor's max |x|."""
    _check_blocks(x, "nvfp4")
    xf = x.detach().to(torch.float32)
    if global_scale is None:
        global_scale = nvfp4_global_scale(xf.abs().amax() * clip_ratio)
    eff = (nvfp4_block_scales(xf, global_scale, clip_ratio) / global_scale).unsqueeze(-1)
    blocks = xf.reshape(*x.shape[:-1], x.shape[-1] // 16, 16)
    q = round_e2m1(blocks / eff)
    return (q * eff).reshape(x.shape)


@torch.no_grad()
def mxfp4_qdq(x: Tensor, clip_ratio: float = 1.0) -> Tensor:
    """MXFP4 quantize-dequantize of x [..., n] (n divisible by 32) in float32; no gradient."""
    _check_blocks(x, "mxfp4")
    xf = x.detach().to(torch.float32)
    blocks = xf.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax_b = blocks.abs().amax(dim=-1, keepdim=True) * clip_ratio
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.exp2(torch.floor(torch.log2(amax_b.clamp(min=tiny))) - _MX_ELEM_EMAX)
    return (round_e2m1(blocks / scale) * scale).reshape(x.shape)


def fake_quantize_fp4(x: Tensor, fmt: str, clip_ratio: float = 1.0) -> Tensor:
    """FP4 fake quantization with STE (forward x_hat, backward identity), in x's dtype."""
    if fmt == "nvfp4":
        xq = nvfp4_qdq(x, clip_ratio)
    elif fmt == "mxfp4":
        xq = mxfp4_qdq(x, clip_ratio)
    else:
        raise ValueError(f"unknown FP4 format {fmt!r}: use one of {', '.join(BLOCK_SIZE)}")
    xq = xq.to(x.dtype)
    return x + (xq - x).detach()
