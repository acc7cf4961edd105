"""The quantized values of an export: spinlearn's own RTN / GPTQ / NVFP4 results with the scales that made them.

For every quantized linear this gives the dequantized grid values ``weight`` (exactly what spinlearn's evaluation
computes: ``quant.quantize_weight`` for RTN, ``gptq.gptq_quantize_model`` for GPTQ, ``fp4.nvfp4_qdq`` for NVFP4)
and the scales of that grid, so that ``weight == scale * q`` per group with q an integer (int schemes) or an
E2M1 value (NVFP4, with ``scale = block_scale / global_scale``). compressed-tensors then recovers q exactly as
``round(weight / scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..fp4 import nvfp4_block_scales, nvfp4_global_scale, nvfp4_qdq
from ..online import linear_layers
from ..quant import QuantSpec, quantize_weight, weight_qparams
from .schemes import ExportScheme


@dataclass
class QuantizedLinear:
    """One linear's export values: ``weight`` [out, in] on the grid, ``scale`` [out, in / group] (NVFP4: the FP8
    block scales as float32), ``global_scale`` / ``input_global_scale`` [1] (NVFP4 only)."""

    weight: Tensor
    scale: Tensor
    global_scale: Tensor | None = None
    input_global_scale: Tensor | None = None


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears an export quantizes: every nn.Linear but the output head and MoE routers (as in training)."""
    return linear_layers(model)


def check_group_widths(linears: dict[str, nn.Linear], scheme: ExportScheme) -> None:
    """Every quantized input width must be a multiple of the group; else name the layer and what would work."""
    g = scheme.group_size
    if g <= 0:
        return
    bad = [(n, m.in_features) for n, m in linears.items() if m.in_features % g]
    if bad:
        import math

        common = math.gcd(*(m.in_features for m in linears.values()))
        options = [d for d in (128, 64, 32, 16, 8) if common % d == 0]
        hint = f"a group size dividing every width ({', '.join(map(str, options))})" if options else \
            f"a divisor of {common}"
        n, w = bad[0]
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        if scheme.name == "nvfp4":
            raise ValueError(f"nvfp4 quantizes blocks of 16 inputs, which do not divide the input width {w} of {n!r}"
                             f"{more}: export this model as w4a16 or w8a8")
        raise ValueError(f"group size {g} does not divide the input width {w} of {n!r}{more}: use -1 (per channel) "
                         f"or {hint}")


def rtn_values(w: Tensor, scheme: ExportScheme, clip: Tensor | None = None) -> QuantizedLinear:
    """Round-to-nearest with spinlearn's quantizer (int; ``clip``: a run's learned clip ratios [out, groups]) or its
    NVFP4 quantizer."""
    spec: QuantSpec = scheme.quant.w
    if spec.format == "nvfp4":
        wf = w.detach().to(torch.float32)
        g = nvfp4_global_scale(wf.abs().amax())
        return QuantizedLinear(nvfp4_qdq(wf, global_scale=g), nvfp4_block_scales(wf, g), g)
    scale, _ = weight_qparams(w.detach(), spec, clip)
    return QuantizedLinear(quantize_weight(w.detach(), spec, clip), scale)


@torch.no_grad()
def gptq_values(model: nn.Module, names: list[str], scheme: ExportScheme, calib_blocks: Tensor, *,
                gptq_kwargs: dict | None = None, weight_clips: dict | None = None,
                progress: bool = True) -> dict[str, QuantizedLinear]:
    """GPTQ on ``model`` in place (online input hooks, if any, already installed), with contiguous groups
    (``static_groups`` when grouping with act_order), on the grid of a run's learned ``weight_clips`` (by weight
    name) where given, returning the values and the scales GPTQ used."""
    from ..config import gptq_kwargs as default_kwargs
    from ..gptq import gptq_quantize_model

    if scheme.quant.w.format != "int":
        raise ValueError(f"GPTQ exports integer weights; scheme {scheme.name!r} uses round-to-nearest (--w-method rtn)")
    kw = {**default_kwargs(), **(gptq_kwargs or {})}
    if scheme.quant.w.group_size > 0 and kw["act_order"]:
        kw["static_groups"] = True  # groups of contiguous columns, as the checkpoint stores them
    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    qparams: dict = {}
    grids = {n: weight_clips[f"{n}.weight"] for n in names if f"{n}.weight" in (weight_clips or {})}
    gptq_quantize_model(model, calib_blocks, scheme.quant.w, skip=skip, progress=progress, qparams=qparams,
                        clips=grids, **kw)
    out = {}
    for n in names:
        scale, _ = qparams[n]
        out[n] = QuantizedLinear(model.get_submodule(n).weight.detach().clone(), scale)
    return out


@torch.no_grad()
def input_amax(model: nn.Module, names: list[str], calib_blocks: Tensor) -> dict[str, Tensor]:
    """max |x| of each named linear's input over the calibration windows (after any online pre-hooks)."""
    amax: dict[str, Tensor] = {}

    def hook(name):
        def fn(module, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for b in calib_blocks:
            model(input_ids=b.unsqueeze(0).to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


def quantize_linears(model: nn.Module, names: list[str], scheme: ExportScheme, *, w_method: str,
                     calib_blocks: Tensor | None, gptq_kwargs: dict | None = None, weight_clips: dict | None = None,
                     progress: bool = True) -> dict[str, QuantizedLinear]:
    """Export values for every named linear (RTN or GPTQ, on the grid of a run's learned ``weight_clips`` by weight
    name when given); NVFP4 also gets each input's static global scale."""
    if w_method == "gptq":
        values = gptq_values(model, names, scheme, calib_blocks, gptq_kwargs=gptq_kwargs, weight_clips=weight_clips,
                             progress=progress)
    else:
        clips = weight_clips or {}
        values = {n: rtn_values(model.get_submodule(n).weight, scheme, clips.get(f"{n}.weight")) for n in names}
    if scheme.name == "nvfp4":
        for n, a in input_amax(model, names, calib_blocks).items():
            values[n].input_global_scale = nvfp4_global_scale(a)
    return values
