"""Folding learned scales into a prepared, rotated model, and their SmoothQuant start (see ``spinlearn.scales``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .fusion import inspect_norm
from .layout import addressable_targets
from .rotations import BANK_ATTR
from .scales import SCALES_ATTR, CLAMP_MIN, ScaleBank, ScalePair, expand_for_reader, plan_scales, scale_axis


def _resolve(model: nn.Module, plan, scales) -> tuple[dict[str, torch.Tensor], dict[str, ScalePair]]:
    if isinstance(scales, ScaleBank):
        return scales.scales(), scales.by_key
    pairs = {p.key: p for p in plan_scales(model, plan, log=False)}
    unknown = sorted(set(scales) - set(pairs))
    if unknown:
        raise KeyError(f"scales for pairs this model does not have: {unknown[:4]} (it has {list(pairs)[:4]} ...)")
    for k, s in scales.items():
        ScaleBank._check(pairs[k], s, "scale")
    return dict(scales), pairs


@torch.no_grad()
def _fold_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """norm output / s: its effective weight (``1 + w`` for Gemma-style norms) and any bias divided by s."""
    info = inspect_norm(norm)
    one = 1.0 if info.plus_one else 0.0
    w = norm.weight.detach().to(s.dtype) + one
    s = s.to(w.device)  # the norm's (a device-mapped model's layers sit on different GPUs)
    norm.weight.copy_((w / s - one).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.detach().to(s.dtype) / s).to(norm.bias.dtype))


@torch.no_grad()
def _scale_target(t, s: torch.Tensor, axis: int, with_bias: bool) -> None:
    t.weight.copy_(scale_axis(t.weight.detach().to(s.dtype), s, axis).to(t.weight.dtype))
    if with_bias and t.bias is not None:
        t.bias.copy_((t.bias.detach().to(s.dtype) * s.to(t.bias.device)).to(t.bias.dtype))


@torch.no_grad()
def fold_scales(model: nn.Module, plan, scales: ScaleBank | dict[str, torch.Tensor],
                use_float64: bool | None = None) -> None:
    """Write scales into a prepared model (after ``fusion.fold_rotations``): sources / s, readers' input * s.

    Multiplicative (folding ``1 / s`` afterwards undoes it). ``scales``: a ScaleBank, or key -> s (a subset of
    ``plan_scales``' pairs). The math runs in float64 unless ``use_float64`` (default: the layout's) is False."""
    values, pairs = _resolve(model, plan, scales)
    f64 = plan.layout.use_float64 if use_float64 is None else use_float64
    dtype = torch.float64 if f64 else torch.float32
    targets = addressable_targets(model, skip=(BANK_ATTR, SCALES_ATTR))
    modules = dict(model.named_modules())
    for key, s in values.items():
        p = pairs[key]
        s = s.to(dtype=dtype)  # each target takes it to its own device
        if p.kind == "norm":
            _fold_norm(modules[p.source], s)
        else:
            src = targets[p.source]
            _scale_target(src, 1.0 / s, src.out_axis, with_bias=True)
        for r in p.readers:
            t = targets[r]
            _scale_target(t, expand_for_reader(s, t.weight.shape[t.in_axis], p.head_dim, name=key), t.in_axis, False)


# ------------------------------------------------------------------------------------------- SmoothQuant start
def _reduce_to_width(v: torch.Tensor, p: ScalePair) -> torch.Tensor:
    """A reader-width statistic reduced (max) to the pair's width: GQA query heads sharing a KV head."""
    if v.shape[0] == p.width:
        return v
    return v.reshape(p.width // p.head_dim, -1, p.head_dim).amax(dim=1).reshape(-1)


def _reader_weight(model: nn.Module, t) -> torch.Tensor:
    """The reader's current (parametrized: rotated) weight."""
    if t.module is not None:
        return t.module.weight
    owner, pname = t.name.rsplit(".", 1)
    return getattr(model.get_submodule(owner), pname)


def _weight_absmax(model: nn.Module, p: ScalePair, targets) -> torch.Tensor:
    out = None
    for r in p.readers:
        t = targets[r]
        w = _reader_weight(model, t).detach().double().abs().movedim(t.in_axis, -1)
        v = _reduce_to_width(w.reshape(-1, w.shape[-1]).amax(dim=0), p)
        out = v if out is None else torch.maximum(out, v)
    return out


def _input_absmax_hooks(model: nn.Module, pairs: Sequence[ScalePair], targets, stats: dict):
    """Hooks recording max |x_j| of each pair's reader input: a norm's output, else the first reader's input."""
    def record(key):
        def hook(module, args, output=None):
            x = output if output is not None else args[0]
            v = x.detach().double().abs().reshape(-1, x.shape[-1]).amax(dim=0)
            stats[key] = v if key not in stats else torch.maximum(stats[key], v)
        return hook

    handles = []
    for p in pairs:
        if p.kind == "norm":
            handles.append(model.get_submodule(p.source).register_forward_hook(record(p.key)))
        else:
            handles.append(targets[p.readers[0]].module.register_forward_pre_hook(record(p.key)))
    return handles


@torch.no_grad()
def smoothquant_scales(model: nn.Module, plan, matrices: dict[str, torch.Tensor], pairs: Sequence[ScalePair],
                       blocks: torch.Tensor, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """SmoothQuant's start in the rotated basis: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), X_j the readers'
    input channel j over ``blocks`` (token ids [n, seqlen], one forward each, float, rotations attached) and W_j
    the largest |entry| of input column j over every reader's rotated weight. Returns key -> s (float64)."""
    from .fakequant import rotations_attached

    stats: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    with rotations_attached(model, plan, matrices):
        targets = addressable_targets(model, skip=(BANK_ATTR, SCALES_ATTR))
        handles = _input_absmax_hooks(model, pairs, targets, stats)
        try:
            for row in blocks:
                model(input_ids=row.reshape(1, -1).to(device))
        finally:
            for h in handles:
                h.remove()
        wmax = {p.key: _weight_absmax(model, p, targets) for p in pairs}
    out = {}
    for p in pairs:
        x = _reduce_to_width(stats[p.key], p).clamp(min=CLAMP_MIN).cpu()
        w = wmax[p.key].clamp(min=CLAMP_MIN).cpu()
        out[p.key] = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=CLAMP_MIN)
    return out


__all__ = ["fold_scales", "smoothquant_scales"]
