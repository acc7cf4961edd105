"""Learned, fusible per-channel scales (SmoothQuant / OSTQuant-style), trained jointly with the rotations.

A positive vector ``s = exp(theta)`` sits at every pair of tensors where a channel-wise scale folds exactly into
the weights (in the rotated basis, i.e. after the rotations):

* ``norm``:    a fused (weightless) norm and its readers: the norm's output is divided by s (exported norm weight
               1/s, Gemma-style ``1 + w`` norms 1/s - 1, a kept LayerNorm bias b/s), the readers' input columns
               are multiplied by s;
* ``v_o``:     v_proj -> o_proj per head channel: v's output rows (and bias) / s, o's input columns * s. Under GQA
               there is one vector per KV head ([num_kv_heads * head_dim]); the o_proj columns of query head h
               take the scale of the KV head it reads (``repeat_kv``: KV head h // n_rep);
* ``up_down``: gated MLPs (down(act(gate(x)) * up(x))): up's output rows / s, down's input columns * s. An online
               input Hadamard on down_proj comes after the scales (down weight = (W diag(s)) H).

Pairs that cannot fold exactly are skipped and logged once (fused qkv / gate_up projections, 3-D MoE experts,
non-gated MLPs, Mamba mixers). During training (``fakequant.wrap_model`` with a ``ScaleBank``) the norm side is a
forward hook on the norm and every other side lives in the weights' parametrization, before weight quantization;
``scales_fold.fold_scales`` writes them into a prepared model after ``fusion.fold_rotations`` (float64), leaving a
plain Hugging Face model with the same float logits; ``scales_fold.smoothquant_scales`` is the calibrated start.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .choices import SCALES_INITS
from .fusion import norm_readers
from .layout import addressable_targets
from .rotations import BANK_ATTR

SCALES_ATTR = "spinlearn_scales"  # where the learnable ScaleBank hangs on a model during training
SCALE_KINDS = ("norm", "v_o", "up_down")
CLAMP_MIN = 1e-5  # SmoothQuant's floor on the statistics


def _log(msg: str) -> None:
    print(f"[spinlearn] {msg}", flush=True)


@dataclass(frozen=True)
class ScalePair:
    """One scale vector: ``key`` (the source's name), what divides by it (``source``: a norm module, or a writer
    tensor's name) and the reader tensors (names) whose input side multiplies by it."""

    key: str
    kind: str
    source: str
    readers: tuple[str, ...]
    width: int
    head_dim: int | None = None  # v_o under GQA: readers are n_rep times wider, in blocks of head_dim


def scale_axis(t: torch.Tensor, s: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with every slice along ``axis`` multiplied by the matching entry of ``s``. Differentiable."""
    shape = [1] * t.ndim
    shape[axis] = -1
    return t * s.to(t).reshape(shape)  # t's dtype and device (a device-mapped model: the layer's GPU)


def expand_for_reader(s: torch.Tensor, width: int, head_dim: int | None, *, name: str = "") -> torch.Tensor:
    """The scale a reader of ``width`` input channels sees: s itself, or (GQA) each KV head's block repeated for
    the n_rep query heads that read it."""
    if width == s.shape[-1]:
        return s
    if head_dim is None or width % s.shape[-1] or s.shape[-1] % head_dim:
        raise ValueError(f"scale {name!r} of width {s.shape[-1]} does not fit a reader of width {width} "
                         f"(head_dim {head_dim})")
    n_rep = width // s.shape[-1]
    return s.reshape(-1, head_dim).repeat_interleave(n_rep, dim=0).reshape(-1)


# -------------------------------------------------------------------------------------------------- the pairs
def _norm_pairs(model: nn.Module, plan) -> list[ScalePair]:
    pairs = []
    modules = dict(model.named_modules())
    for nname, readers in norm_readers(model, plan.layout).items():
        if nname not in plan.fused_norms or not readers:
            continue
        width = modules[nname].weight.shape[0]
        pairs.append(ScalePair(nname, "norm", nname, tuple(t.name for t in readers), width))
    return pairs


def _v_o_pairs(plan, targets) -> list[ScalePair]:
    """Writer -> reader pairs joined by a non-residual matrix instance (R2 between v_proj and o_proj)."""
    by_inst: dict[str, dict[str, list]] = {}
    for p in plan.placements:
        if p.matrix != plan.residual_matrix:
            by_inst.setdefault(p.instance, {"input": [], "output": []})[p.side].append(p)
    pairs = []
    for sides in by_inst.values():
        writers, readers = sides["output"], sides["input"]
        if len(writers) != 1 or not readers:
            continue
        w = writers[0].target
        if w.module is None or w.weight.ndim != 2 or any(r.target.weight.ndim != 2 for r in readers):
            continue
        width = w.weight.shape[w.out_axis]
        head_dim = plan.dims[writers[0].matrix]
        if any(r.target.weight.shape[r.target.in_axis] % width for r in readers):
            continue
        pairs.append(ScalePair(w.name, "v_o", w.name, tuple(r.target.name for r in readers), width, head_dim))
    return pairs


def _up_down_pairs(model: nn.Module, targets) -> list[ScalePair]:
    pairs = []
    for name, mod in model.named_modules():
        kids = [getattr(mod, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(k, nn.Linear) for k in kids):
            up, down = f"{name}.up_proj", f"{name}.down_proj"
            if up in targets and down in targets:
                pairs.append(ScalePair(up, "up_down", up, (down,), kids[1].weight.shape[0]))
    return pairs


# writer -> reader couples that a channel scale cannot cross exactly, with the reason the log gives
_UNFUSABLE = {
    "qkv_proj": "v_proj -> o_proj: fused qkv_proj",
    "gate_up_proj": "up -> down: fused or 3-D gate_up_proj",
    "in_proj": "in_proj -> out_proj: Mamba mixer (conv/SSM between)",
    "fc1": "fc1 -> fc2: not a gated MLP",
}


def _skipped(model: nn.Module, pairs: list[ScalePair]) -> dict[str, set[str]]:
    """reason -> module classes where a writer/reader couple has no scale pair."""
    covered = {p.source for p in pairs}
    out: dict[str, set[str]] = {}
    for name, mod in model.named_modules():
        for child, reason in _UNFUSABLE.items():
            if hasattr(mod, child) and f"{name}.{child}" not in covered:
                out.setdefault(reason, set()).add(type(mod).__name__)
        if hasattr(mod, "up_proj") and hasattr(mod, "down_proj") and f"{name}.up_proj" not in covered:
            out.setdefault("up -> down: not a gated MLP of Linears", set()).add(type(mod).__name__)
        if hasattr(mod, "v_proj") and hasattr(mod, "head_dim") and f"{name}.v_proj" not in covered:
            out.setdefault("v_proj -> o_proj: no per-head matrix between them", set()).add(type(mod).__name__)
    return out


def plan_scales(model: nn.Module, plan, *, log: bool = True, head_quantized: bool = True) -> list[ScalePair]:
    """Every exactly fusible scale pair of a prepared model (``rotation_plan.prepare_model``), in model order;
    skipped couples are logged once per reason. ``head_quantized=False`` (lm_head left in float) drops the final
    norm -> lm_head pair: nothing quantized would see it, so its gradient is rounding noise."""
    targets = addressable_targets(model, skip=(SCALES_ATTR, BANK_ATTR))
    pairs = _norm_pairs(model, plan) + _v_o_pairs(plan, targets) + _up_down_pairs(model, targets)
    if not head_quantized:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        pairs = [p for p in pairs if not all(targets[r].module is head for r in p.readers)]
    if log:
        for reason, classes in sorted(_skipped(model, pairs).items()):
            _log(f"scales: skipped {reason} (in {', '.join(sorted(classes))})")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(pairs, key=lambda p: (order.get(p.source, order.get(p.source.rsplit(".", 1)[0], -1)), p.kind))


# ------------------------------------------------------------------------------------------------- the bank
class ScaleBank(nn.Module):
    """The learnable log-scales (float32), one vector per ``ScalePair``, under sanitised keys."""

    def __init__(self, pairs: list[ScalePair], init: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.pairs = list(pairs)
        self.by_key = {p.key: p for p in self.pairs}
        init = init or {}
        unknown = sorted(set(init) - set(self.by_key))
        if unknown:
            raise KeyError(f"initial scales for pairs the model does not have: {unknown[:4]}")
        self.log_s = nn.ParameterDict()
        for p in self.pairs:
            s = init.get(p.key, torch.ones(p.width, dtype=torch.float64))
            self._check(p, s, "initial scale")
            self.log_s[self._key(p.key)] = nn.Parameter(s.detach().double().log().float())

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @staticmethod
    def _check(p: ScalePair, s: torch.Tensor, what: str) -> None:
        if tuple(s.shape) != (p.width,):
            raise ValueError(f"{what} {p.key!r} has shape {tuple(s.shape)}, expected ({p.width},)")
        if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError(f"{what} {p.key!r} must be positive and finite")

    def get(self, key: str) -> torch.Tensor:
        return self.log_s[self._key(key)].exp()

    def for_reader(self, key: str, width: int) -> torch.Tensor:
        return expand_for_reader(self.get(key), width, self.by_key[key].head_dim, name=key)

    def apply(self, x: torch.Tensor, in_key: str | None, in_axis: int | None, out_key: str | None,
              out_axis: int) -> torch.Tensor:
        """A (rotated) weight with its input axis * s_in and its output axis / s_out."""
        if in_key is not None:
            x = scale_axis(x, self.for_reader(in_key, x.shape[in_axis]), in_axis)
        if out_key is not None:
            x = scale_axis(x, 1.0 / self.get(out_key), out_axis)
        return x

    @torch.no_grad()
    def scales(self) -> dict[str, torch.Tensor]:
        """key -> s in float64 (what ``fold_scales`` folds and a run saves)."""
        return {p.key: self.log_s[self._key(p.key)].detach().double().exp().cpu() for p in self.pairs}

    def log_scales(self) -> dict[str, torch.Tensor]:
        """The optimizer's variables (float32 log-scales) by key: bit-exact checkpoints."""
        return {p.key: self.log_s[self._key(p.key)].detach().cpu().clone() for p in self.pairs}

    @torch.no_grad()
    def load_log_scales(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.by_key) - set(tensors))
        if missing:
            raise KeyError(f"log-scales missing from the file: {missing[:4]}")
        for p in self.pairs:
            v = self.log_s[self._key(p.key)]
            if tuple(tensors[p.key].shape) != tuple(v.shape):
                raise ValueError(f"log-scale {p.key!r} has shape {tuple(tensors[p.key].shape)}, expected {tuple(v.shape)}")
            v.copy_(tensors[p.key].to(v.dtype))

    @contextlib.contextmanager
    def identity(self):
        """All scales 1 for the duration of the block (measures the rotation alone), restored after."""
        saved = self.log_scales()
        with torch.no_grad():
            for v in self.log_s.values():
                v.zero_()
        try:
            yield
        finally:
            self.load_log_scales(saved)

    def range(self) -> tuple[float, float]:
        with torch.no_grad():
            vals = torch.cat([v.detach().flatten() for v in self.log_s.values()]).exp()
        return float(vals.min()), float(vals.max())


class NormScaleHook:
    """Forward hook on a fused norm: its output divided by the live scale (before any reader sees it)."""

    def __init__(self, bank: ScaleBank, key: str):
        self.bank, self.key = bank, key

    def __call__(self, module, args, output):
        return output / self.bank.get(self.key).to(output)


__all__ = ["SCALES_ATTR", "SCALES_INITS", "ScaleBank", "ScalePair", "plan_scales", "scale_axis", "expand_for_reader",
           "NormScaleHook", "CLAMP_MIN"]
