"""Fake quantizers (quantize-dequantize) with a straight-through estimator.

One integer grid is used everywhere (training loss, evaluation and GPTQ):

* symmetric:  q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),      x_hat = s * q,
              s = clip * max|x| / (2^(b-1) - 1)   (QuaRot/SpinQuant convention: the extra
              negative level is representable but the scale is set by the positive side)
* asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1),              x_hat = s * (q - z),
              s = clip * (max - min) / (2^b - 1), z = round(-clip * min / s), where the range
              always contains 0 (min <= 0 <= max) so zero is exactly representable.

Statistics are taken per row of the last dimension (per output channel for a weight
[out, in], per token for an activation), or per group of `group_size` consecutive entries of
the last dimension. Scales are computed without gradients; the STE makes the backward pass
the identity (``RoundThroughScale``: one autograd node whose forward is exactly x_hat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "QuantSpec",
    "qrange",
    "find_qparams",
    "mse_clip_ratio",
    "quant_dequant",
    "fake_quantize",
    "quantize_weight",
    "weight_qparams",
    "quantize_activation",
    "quantize_kv",
    "ActQuantizer",
    "fake_quantize_learned_clip",
    "clip_logit_start",
    "clip_from_logit",
    "weight_groups",
    "quantizers_disabled",
    "QuantSettings",
]

# MSE clip search, as in GPTQ/QuaRot's `mse` option: shrink factors 1.00, 0.99, ..., 0.20 and the
# p-norm of the error that picks the best one per row (2.4 weighs large errors a bit more than MSE).
MSE_CLIP_GRID = 100
MSE_CLIP_MIN_SHRINK = 0.2
MSE_CLIP_NORM = 2.4


@dataclass
class QuantSpec:
    """How to fake-quantize one kind of tensor (weights, activations or KV cache).

    bits: 2..16, where 16 means "off". group_size: -1 for one scale per row (output channel /
    token), or >0 for groups of that many entries along the last dim. clip_ratio: shrinks the
    range before quantizing (0 < r <= 1). mse_clip: search the clip ratio per row/group that
    minimises the quantization error (meant for weights; costs ~80 quantize passes).
    format: "int" (the integer grid above) or an FP4 microscaling format ("nvfp4", "mxfp4", see
    ``spinlearn.fp4``): those have 4-bit E2M1 values in fixed blocks (16 / 32) with their own scales, so
    bits must be 4 (or 16 = off), group_size -1 or the block size, and sym / mse_clip do not apply.
    """

    bits: int = 16
    sym: bool = True
    group_size: int = -1
    clip_ratio: float = 1.0
    mse_clip: bool = False
    format: str = "int"

    def __post_init__(self) -> None:
        from .choices import QUANT_FORMATS

        if self.format not in QUANT_FORMATS:
            raise ValueError(f"QuantSpec.format={self.format!r} is invalid: use one of {', '.join(QUANT_FORMATS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(
                f"QuantSpec.bits={self.bits!r} is invalid: use an integer in 2..16 (16 = no quantization)"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"QuantSpec.group_size={self.group_size!r} must be an integer (-1 or > 0)")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} is invalid: "
                "use -1 (one scale per channel/token) or a positive group size"
            )
        if not isinstance(self.clip_ratio, (int, float)) or not 0.0 < float(self.clip_ratio) <= 1.0:
            raise ValueError(f"QuantSpec.clip_ratio={self.clip_ratio!r} is invalid: use a number in (0, 1]")
        if self.format != "int":
            from .fp4 import BLOCK_SIZE

            if self.bits not in (4, 16):
                raise ValueError(f"QuantSpec.format={self.format!r} has 4-bit values: set bits to 4 (or 16 = off), "
                                 f"not {self.bits}")
            if self.group_size not in (-1, BLOCK_SIZE[self.format]):
                raise ValueError(f"QuantSpec.format={self.format!r} uses blocks of {BLOCK_SIZE[self.format]}: set "
                                 f"group_size to -1 or {BLOCK_SIZE[self.format]}, not {self.group_size}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Integer levels [qmin, qmax] of the grid."""
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _params_for_ratio(xmin: Tensor, xmax: Tensor, ratio: Tensor | float, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point for a range [xmin, xmax] (per row, keepdim) shrunk by `ratio`."""
    if sym:
        absmax = torch.maximum(xmin.abs(), xmax) * ratio
        scale = absmax / (2 ** (bits - 1) - 1)
        # All-zero rows: any positive scale maps them to 0 exactly.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    lo, hi = xmin * ratio, xmax * ratio
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    return scale, zero


@torch.no_grad()
def _range_with_zero(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of the last dim (keepdim): min(x, 0) and max(x, 0), so the grid always holds 0. (amin and amax, not
    torch.aminmax: on CPU over short rows the fused op was several times slower than the two.)"""
    zero_t = torch.zeros((), dtype=x.dtype, device=x.device)
    return (torch.minimum(x.amin(dim=-1, keepdim=True), zero_t),
            torch.maximum(x.amax(dim=-1, keepdim=True), zero_t))


@torch.no_grad()
def find_qparams(
    x: Tensor, bits: int, sym: bool, clip_ratio: float | Tensor = 1.0, mse: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero point per row of the last dim of `x` (shapes [..., 1]), no gradient.

    With `mse`, tries shrink factors 1.00 .. 0.20 (times clip_ratio) and keeps per row the one
    with the smallest sum |x_hat - x|^2.4, like GPTQ's reference quantizer.
    """
    x = x.detach().to(_compute_dtype(x))
    xmin, xmax = _range_with_zero(x)
    if not mse:
        return _params_for_ratio(xmin, xmax, clip_ratio, bits, sym)
    scale, zero, _ = _mse_search(x, xmin, xmax, bits, sym, clip_ratio)
    return scale, zero


@torch.no_grad()
def mse_clip_ratio(x: Tensor, bits: int, sym: bool) -> Tensor:
    """The clip ratio per row of the last dim of `x` ([..., 1]) that ``find_qparams(..., mse=True)`` picks: the
    shrink factor of 1.00 .. 0.20 with the smallest sum |x_hat - x|^2.4 (the learned weight clips' MSE start)."""
    x = x.detach().to(_compute_dtype(x))
    return _mse_search(x, *_range_with_zero(x), bits, sym, 1.0)[2]


def _mse_search(x: Tensor, xmin: Tensor, xmax: Tensor, bits: int, sym: bool,
                clip_ratio: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, zero, ratio) per row: the grid search of ``find_qparams``'s `mse` option."""
    qmin, qmax = qrange(bits, sym)
    scale, zero = _params_for_ratio(xmin, xmax, clip_ratio, bits, sym)
    best = torch.full_like(scale, float("inf"))
    best_step = torch.zeros_like(scale)
    n_steps = round((1.0 - MSE_CLIP_MIN_SHRINK) * MSE_CLIP_GRID)
    for i in range(n_steps + 1):
        ratio = clip_ratio * (1.0 - i / MSE_CLIP_GRID)
        s, z = _params_for_ratio(xmin, xmax, ratio, bits, sym)
        # In place: this loop dominates the cost of weight quantization with mse_clip.
        err = x.div(s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(x)
        err = err.abs_().pow_(MSE_CLIP_NORM).sum(dim=-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_step = torch.where(better, float(i), best_step)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero, clip_ratio * (1.0 - best_step / MSE_CLIP_GRID)


def quant_dequant(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round to the grid and map back: scale * (clamp(round(x / scale) + zero, qmin, qmax) - zero)."""
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return scale * (q - zero)


class RoundThroughScale(torch.autograd.Function):
    """``quant_dequant`` (the same operations, so the same bits) with the straight-through estimator, as one
    autograd node: to ``x`` the identity; to ``scale``, when it has a gradient (a learned clip ratio), the derivative
    of scale * (clamp(round(u) + zero) - zero), u = x / scale, with round's derivative taken as 1: (q - zero) - u
    inside the grid, (q - zero) where clamped. ``zero`` takes no gradient. Keeps one tensor of x's size for the
    backward pass, and only for a scale with a gradient: a learned activation clip on a [4, 256, 768] float32 input
    now keeps 1.0x the input's bytes, where the element-wise autograd graph this replaced kept 3.0x (and ran about
    twice the element-wise passes)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
        u = x / scale
        q = torch.round(u).add_(zero)
        inside = (q >= qmin) & (q <= qmax) if ctx.needs_input_grad[1] else None
        q = q.clamp_(qmin, qmax).sub_(zero)
        out = scale * q
        if inside is not None:
            ctx.scale_shape = scale.shape
            ctx.save_for_backward(q.sub_(u.mul_(inside)))  # d out / d scale, element-wise
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_scale = None
        if ctx.needs_input_grad[1]:
            (d_scale,) = ctx.saved_tensors
            grad_scale = (grad * d_scale).sum_to_size(ctx.scale_shape)
        return grad, grad_scale, None, None, None


def _check_groups(n: int, group_size: int, what: str) -> None:
    if n % group_size != 0:
        raise ValueError(
            f"{what} group_size={group_size} does not divide the last dimension {n}: "
            f"use a divisor of {n} or -1 for one scale per row"
        )


def _group_of(n: int, spec: QuantSpec) -> int:
    """The statistics group along a last dimension of ``n`` entries (all of it with group_size -1), checked."""
    group = n if spec.group_size == -1 else spec.group_size
    _check_groups(n, group, "QuantSpec")
    return group


def _fake_quantize_rows(x: Tensor, bits: int, sym: bool, clip_ratio: float, mse: bool, group: int) -> Tensor:
    """Quantize-dequantize with STE, statistics per group of `group` entries of the last dim."""
    xf = x.to(_compute_dtype(x))
    shape = xf.shape
    grouped = xf.reshape(*shape[:-1], shape[-1] // group, group)
    scale, zero = find_qparams(grouped, bits, sym, clip_ratio, mse)
    # Straight-through estimator: forward = x_hat, backward = identity.
    return RoundThroughScale.apply(grouped, scale, zero, *qrange(bits, sym)).reshape(shape).to(x.dtype)


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize `x` along its last dim (per row, or per group of spec.group_size)."""
    if not spec.enabled:
        return x
    if x.dim() == 0:
        raise ValueError("fake_quantize needs a tensor with at least one dimension, got a scalar")
    if spec.format != "int":
        from .fp4 import fake_quantize_fp4

        return fake_quantize_fp4(x, spec.format, float(spec.clip_ratio))
    n = x.shape[-1]
    group = _group_of(n, spec)
    return _fake_quantize_rows(x, spec.bits, spec.sym, float(spec.clip_ratio), spec.mse_clip, group)


def _check_weight_clip(w: Tensor, spec: QuantSpec, clip: Tensor) -> None:
    rows_groups = weight_groups(w.shape, spec)
    if spec.format != "int" or spec.mse_clip or tuple(clip.shape) != rows_groups:
        raise ValueError(f"per-row weight clip ratios need the int format without mse_clip and shape {rows_groups} "
                         f"[rows, groups]; got shape {tuple(clip.shape)} (format {spec.format}, "
                         f"mse_clip {spec.mse_clip})")


def quantize_weight(w: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> Tensor:
    """Weight [out, in]: one scale per output channel, or per group along `in`; honours mse_clip. ``clip``: a clip
    ratio per row and group [out, in / group] (learned weight clipping) instead of the spec's; it gets a gradient."""
    if not spec.enabled:
        return w
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if clip is None:
        return fake_quantize(w, spec)
    _check_weight_clip(w, spec, clip)
    return fake_quantize_learned_clip(w, spec, clip.to(w.device).unsqueeze(-1))


@torch.no_grad()
def weight_qparams(w: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The integer grid's scale and zero point [out, in / group] (one column per channel) that
    ``quantize_weight(w, spec, clip)`` uses, so that its result is exactly ``scale * (q - zero)`` per group."""
    if spec.format != "int":
        raise ValueError(f"weight_qparams is for the int format; {spec.format} scales come from spinlearn.fp4")
    if w.dim() != 2:
        raise ValueError(f"weight_qparams expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    rows, groups = weight_groups(w.shape, spec)
    grouped = w.to(_compute_dtype(w)).reshape(rows, groups, w.shape[-1] // groups)
    ratio: Tensor | float = float(spec.clip_ratio)
    if clip is not None:
        _check_weight_clip(w, spec, clip)
        ratio = clip.to(device=w.device, dtype=grouped.dtype).unsqueeze(-1)
    scale, zero = find_qparams(grouped, spec.bits, spec.sym, ratio, spec.mse_clip)
    return scale.squeeze(-1), zero.squeeze(-1)


def quantize_activation(x: Tensor, spec: QuantSpec) -> Tensor:
    """Activation [..., features]: dynamic scales per token (row of the last dim) or per group."""
    return fake_quantize(x, spec)


def quantize_kv(x: Tensor, spec: QuantSpec, head_dim: int) -> Tensor:
    """Keys/values [..., n_heads * head_dim]: one scale per token per head.

    spec.group_size > 0 splits each head into sub-groups of that size. Symmetry follows spec.sym;
    KV caches are usually quantized asymmetrically, so build their spec with sym=False.
    """
    if not spec.enabled:
        return x
    if head_dim <= 0 or x.shape[-1] % head_dim != 0:
        raise ValueError(
            f"quantize_kv: head_dim={head_dim} does not divide the last dimension {x.shape[-1]} "
            "(expected [..., n_heads * head_dim])"
        )
    group = head_dim
    if spec.group_size > 0:
        if head_dim % spec.group_size != 0:
            raise ValueError(
                f"quantize_kv: group_size={spec.group_size} does not divide head_dim={head_dim}: "
                "use a divisor of head_dim or -1 for one scale per head"
            )
        group = spec.group_size
    return _fake_quantize_rows(x, spec.bits, spec.sym, float(spec.clip_ratio), spec.mse_clip, group)


# Learnable activation clipping: ratio = sigmoid(phi), phi clamped so the ratio stays inside (0, 1) in float32.
LEARNED_CLIP_DEFAULT = 0.99  # the start when quant.a_clip is 1 (a sigmoid never reaches 1)
CLIP_LOGIT_BOUND = 12.0


def fake_quantize_learned_clip(x: Tensor, spec: QuantSpec, ratio: Tensor) -> Tensor:
    """``fake_quantize`` with a clip ratio that gets a gradient (LSQ / OmniQuant-style; int format only).

    The forward value is ``fake_quantize`` with ``clip_ratio = ratio``. Backward: identity to ``x`` (the usual STE;
    the range statistics take no gradient) and, to the ratio, the derivative of scale * (clamp(round_ste(x / scale)
    + z) - z) through the scale: (round(u) - u) inside the grid, (q - z) where clamped, times d scale / d ratio."""
    n = x.shape[-1]
    group = _group_of(n, spec)
    xf = x.to(_compute_dtype(x))
    g = xf.reshape(*xf.shape[:-1], n // group, group)
    xmin, xmax = _range_with_zero(g)
    scale, zero = _params_for_ratio(xmin, xmax, ratio.to(g.dtype), spec.bits, spec.sym)
    out = RoundThroughScale.apply(g, scale, zero.detach(), *qrange(spec.bits, spec.sym))
    return out.reshape(xf.shape).to(x.dtype)


def clip_logit_start(ratio: float | Tensor) -> float | Tensor:
    """The logit whose sigmoid is ``ratio`` (a ratio of 1 starts at LEARNED_CLIP_DEFAULT: a sigmoid never reaches 1);
    a tensor of ratios gives a float64 tensor of logits."""
    if isinstance(ratio, Tensor):
        r = torch.where(ratio < 1, ratio.double(), LEARNED_CLIP_DEFAULT)
        return (r / (1.0 - r)).log()
    r = float(ratio) if ratio < 1 else LEARNED_CLIP_DEFAULT
    return torch.tensor(r / (1.0 - r), dtype=torch.float64).log().item()


def clip_from_logit(logit: Tensor) -> Tensor:
    """A learnable clip ratio from its logit: sigmoid(logit), the logit clamped so the ratio stays inside (0, 1)."""
    return torch.sigmoid(logit.clamp(-CLIP_LOGIT_BOUND, CLIP_LOGIT_BOUND))


def weight_groups(shape: tuple[int, ...] | torch.Size, spec: QuantSpec) -> tuple[int, int]:
    """[rows, groups] of a weight's quantizer statistics: rows = every entry but the last dim's (a 3-D expert tensor
    is quantized as one stack of rows), groups = last dim / group size (1 per row with group_size -1)."""
    n = int(shape[-1])
    group = _group_of(n, spec)
    return math.prod(int(d) for d in shape[:-1]), n // group


INPUT_QUANT_ATTR = "spinlearn_act"  # the attribute of a linear holding its input's ActQuantizer (fakequant installs it)


def input_quantizer(module: nn.Module) -> ActQuantizer | None:
    """The quantizer ``fakequant.wrap_model`` put on ``module``'s input, if it is on (enabled, fewer than 16 bits)."""
    q = getattr(module, INPUT_QUANT_ATTR, None)
    return q if isinstance(q, ActQuantizer) and q.enabled and q.spec.enabled else None


class ActQuantizer(nn.Module):
    """Dynamic activation (or KV, when head_dim is set) fake quantizer that can be switched off.

    `enabled` is a plain attribute so the trainer can compute float teacher logits with the
    same model (see `quantizers_disabled`). With ``learn_clip`` (activations, int format) the clip ratio is a
    parameter, ``sigmoid(clip_logit)``, starting at spec.clip_ratio (or 0.99 when that is 1).
    """

    def __init__(self, spec: QuantSpec, head_dim: int | None = None, learn_clip: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.head_dim = head_dim
        self.enabled = True
        self.basis = None  # an activation_side.ActivationBasis: quantize in the rotated model's basis
        self.clip_logit = None
        if learn_clip:
            if spec.format != "int":
                raise ValueError(f"a learnable clip ratio is for int-format activations and K/V only (format "
                                 f"{spec.format!r})")
            self.clip_logit = nn.Parameter(torch.tensor(clip_logit_start(spec.clip_ratio)))

    def clip_ratio(self) -> Tensor | float:
        """The clip ratio in use: sigmoid of the learnable logit (a tensor with a gradient), else the spec's."""
        if self.clip_logit is None:
            return float(self.spec.clip_ratio)
        return clip_from_logit(self.clip_logit)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or not self.spec.enabled:
            return x
        if self.basis is not None:  # learned rotations on the activations (spinlearn.activation_side)
            return self.basis.around(self._quantize, x)
        return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        if self.head_dim is not None and self.clip_logit is not None:  # K/V: groups within each head's channels
            group = self.spec.group_size if self.spec.group_size > 0 else self.head_dim
            return fake_quantize_learned_clip(x, dataclasses.replace(self.spec, group_size=group), self.clip_ratio())
        if self.head_dim is not None:
            return quantize_kv(x, self.spec, self.head_dim)
        if self.clip_logit is not None:
            return fake_quantize_learned_clip(x, self.spec, self.clip_ratio())
        return quantize_activation(x, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        kv = f", head_dim={self.head_dim}" if self.head_dim is not None else ""
        return f"bits={s.bits}, sym={s.sym}, group_size={s.group_size}, clip_ratio={s.clip_ratio}{kv}"


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily turn off every ActQuantizer (and any module with a boolean `quant_enabled`) in `model`."""
    saved: list[tuple[nn.Module, str, bool]] = []
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            saved.append((m, "enabled", m.enabled))
        elif isinstance(getattr(m, "quant_enabled", None), bool):
            saved.append((m, "quant_enabled", m.quant_enabled))
    try:
        for m, attr, _ in saved:
            setattr(m, attr, False)
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


def gptq_clip_search(q) -> bool:
    """Whether GPTQ weights get the MSE clip search (``q``: a recipe's ``quant`` section): ``quant.w_clip``, or
    ``quant.learn_w_clip`` (the stronger GPTQ: on the demo it lowers the random-Hadamard + GPTQ row). Weights with
    learned clip ratios on GPTQ's grid round on those instead (``gptq_learned_grid``); the search is for the rest
    (the start matrices' row, another grid, ``quant.gptq.learned_grid: false``)."""
    return bool(q.w_clip or q.learn_w_clip)


def gptq_learned_grid(q, spec: QuantSpec) -> bool:
    """Whether GPTQ quantizing to ``spec`` rounds on the grid of a run's learned weight clip ratios (``q``: the
    run's recipe ``quant`` section): it learned them (``quant.learn_w_clip``), ``quant.gptq.learned_grid`` is on,
    and ``spec`` is the int grid (bits, symmetry, group size) they were learned for. GPTQ then only chooses the
    integers on that grid (its MSE clip search does not run for those weights)."""
    return bool(q.learn_w_clip and q.gptq.learned_grid and spec.format == "int"
                and (spec.bits, spec.sym, spec.group_size) == (q.w_bits, q.w_sym, q.w_groupsize))


@dataclass
class QuantSettings:
    """The four quantizers of one setting: weights, activations, K/V cache and lm_head's weights.

    Built from a recipe's ``quant`` section by :meth:`from_recipe`, the one mapping from recipe keys to
    quantizer specs; the CLI and the benchmarks build a ``quant`` section from their flags (:meth:`from_flags`)
    and go through it too."""

    w: QuantSpec = field(default_factory=QuantSpec)
    a: QuantSpec = field(default_factory=QuantSpec)
    kv: QuantSpec = field(default_factory=lambda: QuantSpec(sym=False))
    lm_head: QuantSpec = field(default_factory=QuantSpec)  # weights of lm_head; 16 bits = left alone

    @classmethod
    def from_recipe(cls, q) -> QuantSettings:
        """``q``: a recipe's ``quant`` section (``config.QuantConfig`` fields)."""
        return cls(
            w=QuantSpec(bits=q.w_bits, sym=q.w_sym, group_size=q.w_groupsize, mse_clip=q.w_clip, format=q.format),
            a=QuantSpec(bits=q.a_bits, sym=q.a_sym, group_size=q.a_groupsize, clip_ratio=q.a_clip, format=q.format),
            kv=QuantSpec(bits=q.kv_bits, sym=q.kv_sym, group_size=q.kv_groupsize),
            lm_head=QuantSpec(bits=q.lm_head_bits, sym=q.w_sym, group_size=q.w_groupsize, mse_clip=q.w_clip),
        )

    @classmethod
    def from_flags(cls, **values) -> QuantSettings:
        """Settings from ``quant`` keys given as keyword arguments (``w_bits=4, a_bits=4``...); the others take the
        recipe schema's defaults except bits, which default to 16 (off)."""
        from .config import quant_section

        return cls.from_recipe(quant_section(**values))

    @classmethod
    def for_gptq(cls, q) -> QuantSettings:
        """What GPTQ quantizes to after training: ``quant.gptq.w_bits`` (or ``quant.w_bits``, or 4 when training
        kept 16-bit weights) with the recipe's symmetry and group size, and the MSE clip search when
        ``gptq_clip_search``; activations, K/V and lm_head as the recipe says (the GPTQ rows measure the setting
        the recipe deploys)."""
        base = cls.from_recipe(q)
        bits = q.gptq.w_bits or (q.w_bits if q.w_bits < 16 else 4)
        w = QuantSpec(bits=bits, sym=q.w_sym, group_size=q.w_groupsize, mse_clip=gptq_clip_search(q))
        return cls(w=w, a=base.a, kv=base.kv, lm_head=base.lm_head)

    def for_calibration(self) -> QuantSettings:
        """The quantizers GPTQ's asymmetric calibration (``quant.gptq.refit``) runs the model with: 16-bit weights (GPTQ
        quantizes them itself), this setting's activations and K/V, lm_head left alone."""
        return QuantSettings(w=QuantSpec(bits=16), a=self.a, kv=self.kv, lm_head=QuantSpec(bits=16))

    @property
    def name(self) -> str:
        """The setting's short name, e.g. W4A4KV4 (16 = not quantized)."""
        return f"W{self.w.bits}A{self.a.bits}KV{self.kv.bits}"
