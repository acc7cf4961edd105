"""Model preparation and folding: untie embeddings, fuse norm scales into readers, fold rotations into weights.

Everything here edits parameters in place under ``torch.no_grad`` and leaves a plain Hugging Face model.
The math runs in float64 when asked (``use_float64``) and is cast back to each tensor's dtype.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .layout import Layout, LayoutError, Placement, Target, addressable_targets, match_norms
from .rotations import rotate_axis_fast, signed_hadamard_signs


def _text_configs(config):
    yield config
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            yield text


@torch.no_grad()
def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own storage (a real clone) if it shares it with the input embedding.

    Folding the final norm into lm_head and rotating both sides would otherwise corrupt one of them."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied_flag = any(getattr(c, "tie_word_embeddings", False) for c in _text_configs(model.config))
    if out is None or inp is None:
        return False
    shared = out.weight.data_ptr() == inp.weight.data_ptr()
    if shared or tied_flag:
        out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
        for c in _text_configs(model.config):
            if hasattr(c, "tie_word_embeddings"):
                c.tie_word_embeddings = False
        # transformers re-ties on load/save when this map lists lm_head; the untied copy must stay independent.
        if getattr(model, "_tied_weights_keys", None):
            model._tied_weights_keys = {}
        return True
    return False


@dataclass
class NormInfo:
    module: nn.Module
    plus_one: bool  # Gemma-style: output = normed * (1 + weight)
    has_bias: bool  # LayerNorm with a bias


@torch.no_grad()
def inspect_norm(norm: nn.Module) -> NormInfo:
    """Find out how a norm applies its weight by probing it (works for any RMSNorm/LayerNorm class)."""
    w = getattr(norm, "weight", None)
    if w is None:
        raise LayoutError(f"norm {type(norm).__name__} has no weight to fuse")
    saved = w.detach().clone()
    try:
        w.zero_()
        if getattr(norm, "bias", None) is not None:
            saved_b = norm.bias.detach().clone()
            norm.bias.zero_()
        x = torch.randn(2, w.shape[0], dtype=w.dtype, device=w.device)
        plus_one = bool(norm(x).abs().max() > 0)  # weight 0 still passes the input: (1 + w) scaling
    finally:
        w.copy_(saved)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(saved_b)
    return NormInfo(norm, plus_one, getattr(norm, "bias", None) is not None)


@torch.no_grad()
def fuse_norm_into(info: NormInfo, readers: list[Target], use_float64: bool) -> bool:
    """Fold the norm's scale (and bias) into the readers' input side, then make the norm an identity scale.

    A LayerNorm bias goes into the readers' biases. If a reader has none (OPT's lm_head), the bias stays in
    the norm as ``bias / scale`` so the readers still see the same values; the caller must then rotate that
    bias with the residual stream. Returns True in that case."""
    norm = info.module
    scale = norm.weight.detach().double() + (1.0 if info.plus_one else 0.0)
    bias = norm.bias.detach().double() if info.has_bias else None
    keep_bias = bias is not None and any(t.bias is None for t in readers)
    if keep_bias and scale.abs().min() < 1e-12:
        raise LayoutError(
            f"cannot keep {type(norm).__name__}'s bias: a reader has no bias and the scale has zeros"
        )
    for t in readers:
        if t.in_axis is None:
            raise LayoutError(f"{t.name!r} cannot take a norm's scale: it has no input side")
        w = t.weight
        if bias is not None and not keep_bias:
            work = w.detach().double() if use_float64 else w.detach().float()
            t.bias.copy_((t.bias.detach().to(work.dtype) + work @ bias.to(work.dtype)).to(t.bias.dtype))
        # A single product is correctly rounded in float32 already, so float64 would change nothing here.
        work = w.detach().double() if w.dtype == torch.float64 else w.detach().float()
        w.copy_((work * scale.to(work.dtype)).to(w.dtype))
    norm.weight.fill_(0.0 if info.plus_one else 1.0)
    if keep_bias:
        norm.bias.copy_((bias / scale).to(norm.bias.dtype))
    elif info.has_bias:
        norm.bias.zero_()
    return keep_bias


def _targets_for(pattern_list, parent: str, targets: dict[str, Target]) -> list[Target]:
    found = []
    for rel in (g.strip() for pattern in pattern_list for g in pattern.split("|")):
        full = f"{parent}.{rel}" if parent else rel
        found += [targets[n] for n in targets if fnmatch.fnmatchcase(n, full)]
    return list({id(t): t for t in found}.values())


def norm_readers(model: nn.Module, layout: Layout) -> dict[str, list[Target]]:
    """norm name -> the reader tensors its norm_fuse_config entry names (maybe none), in layout order.

    Decoder-layer entries name readers relative to the norm's parent; lm_head entries by full name. A norm
    pattern that matches nothing raises (a typo) unless it is another family's norm (skipped with a note)."""
    targets = addressable_targets(model)
    modules = dict(model.named_modules())
    out: dict[str, list[Target]] = {}
    entries = [(n, ts, True) for n, ts in layout.decoder_layer_fuse] + [(n, [t], False) for n, t in layout.lm_head_fuse]
    for norm_pat, reader_pats, relative in entries:
        for nname in match_norms(norm_pat, modules, layout.name):
            if not hasattr(modules[nname], "weight") or any(fnmatch.fnmatchcase(nname, g) for g in layout.ignore_norms):
                continue
            parent = nname.rsplit(".", 1)[0] if relative and "." in nname else ""
            found = out.get(nname, []) + _targets_for(reader_pats, parent, targets)
            out[nname] = list({id(t): t for t in found}.values())
    return out


@torch.no_grad()
def fuse_norms(model: nn.Module, layout: Layout) -> tuple[list[str], list[Target]]:
    """Apply the layout's norm_fuse_config. Returns the names of the norms made weightless, and the norm
    biases that stayed in place (they must be rotated with the residual stream, as Targets)."""
    modules = dict(model.named_modules())
    fused: list[str] = []
    kept_biases: list[Target] = []
    for nname, readers in norm_readers(model, layout).items():
        if not readers:
            raise LayoutError(f"norm {nname!r}: none of the readers layout {layout.name!r} names for it exist")
        if fuse_norm_into(inspect_norm(modules[nname]), readers, layout.use_float64):
            norm = modules[nname]
            kept_biases.append(Target(f"{nname}.bias", norm.bias, None, None, -1, norm))
        fused.append(nname)
    return fused, kept_biases


def check_unfused_norms(model: nn.Module, layout: Layout, fused: list[str], width: int) -> None:
    """Refuse models with a scaled norm over the residual width that the layout does not fuse (e.g. Gemma2's
    post-attention norm, which scales a sublayer's output before it joins the residual stream): a rotation
    cannot pass through it exactly."""
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if (
            "norm" not in type(mod).__name__.lower()
            or not isinstance(w, torch.Tensor)
            or w.shape != (width,)
            or name in fused
            or any(fnmatch.fnmatchcase(name, g) for g in layout.ignore_norms)
        ):
            continue
        raise LayoutError(
            f"norm {name!r} ({type(mod).__name__}, width {width}) acts on the residual stream but the layout "
            f"{layout.name!r} does not fuse it; a rotation cannot pass through it exactly "
            "(this family is not supported by this layout; add it to norm_fuse_config or ignore_norms if it is "
            "known to be harmless)"
        )


@torch.no_grad()
def center_writers(writers: list[Target], use_float64: bool) -> None:
    """Make every residual-stream writer produce zero-mean vectors (LayerNorm models): LayerNorm then equals
    RMSNorm on the stream, which is what lets a rotation pass through it."""
    for t in writers:
        w = t.weight
        work = w.detach().double() if use_float64 else w.detach().float()
        w.copy_((work - work.mean(dim=t.out_axis, keepdim=True)).to(w.dtype))
        if t.bias is not None:
            t.bias.sub_(t.bias.detach().mean())


@torch.no_grad()
def fold_rotations(placements: list[Placement], matrices: dict[str, torch.Tensor], use_float64: bool,
                   device: torch.device | str | None = None) -> None:
    """Write every placement's matrix into its tensor: ``axis <- axis @ R`` (biases on the output side too).

    Each tensor is converted once and gets all its matrices in one go; signed Hadamard matrices (the
    hadamard / base_hadamard modes) use the fast transform instead of a dense product. ``device``: where the
    products run, one tensor at a time (default: where each tensor lives; e.g. a GPU for a model held in CPU
    memory, whose float64 products would take the CPU many minutes at 70B)."""
    dtype = torch.float64 if use_float64 else torch.float32
    prepared: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}
    by_tensor: dict[int, list[Placement]] = {}
    for p in placements:
        by_tensor.setdefault(id(p.target.weight), []).append(p)

    def matrix(instance: str, where: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (instance, where) not in prepared:
            r = matrices[instance].to(dtype=dtype)
            signs = signed_hadamard_signs(r)
            prepared[instance, where] = (r.to(where), signs.to(where) if signs is not None else None)
        return prepared[instance, where]

    for group in by_tensor.values():
        t = group[0].target
        where = torch.device(device) if device is not None else t.weight.device
        w = t.weight.detach().to(where, dtype)
        b = t.bias.detach().to(where, dtype) if t.bias is not None else None
        for p in group:
            r, signs = matrix(p.instance, where)
            axis = t.in_axis if p.side == "input" else t.out_axis
            w = rotate_axis_fast(w, r, axis, signs)
            if p.side == "output" and b is not None:
                b = rotate_axis_fast(b, r, -1, signs)
        t.weight.copy_(w.to(t.weight.dtype))
        if b is not None:
            t.bias.copy_(b.to(t.bias.dtype))
