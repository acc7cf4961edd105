"""Data-free rotation (QuaRot / ModelOpt style): prepare the model, make the matrices, fold them, verify.

``prepare_model`` is shared with learned rotations: it unties embeddings, fuses norms and resolves where
each matrix goes; ``rotate`` then folds random or deterministic matrices, while the trainer learns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .choices import ROTATION_MODES
from .fusion import center_writers, check_unfused_norms, fold_rotations, fuse_norms, norm_readers, untie_embeddings
from .layout import (
    Layout,
    LayoutError,
    Placement,
    load_layout,
    match_pattern,
    notes_once,
    resolve_dims,
    resolve_placements,
)
from .layout_infer import complete_layout, hidden_size, infer_layout
from .rotations import fix_ones_direction, make_rotation, orthogonality_error


AUTO = "auto"  # rotation.layout / --layout value that infers the layout from the model


@dataclass
class RotationPlan:
    layout: Layout
    dims: dict[str, int]
    placements: list[Placement]
    residual_matrix: str | None  # the matrix on the residual stream (read by lm_head)
    mean_preserving: bool = False  # LayerNorm model: residual matrices must map the all-ones vector to itself
    fused_norms: list[str] = field(default_factory=list)

    def instances(self) -> dict[str, tuple[str, int]]:
        """instance name -> (matrix name, size), in a deterministic order."""
        out = {}
        for p in self.placements:
            out.setdefault(p.instance, (p.matrix, self.dims[p.matrix]))
        return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in s.replace(".", " . ").split()]


def _residual_matrix(layout: Layout, placements: list[Placement]) -> str | None:
    heads = [t for _, t in layout.lm_head_fuse]
    for p in placements:
        if p.side == "input" and any(match_pattern(h, [p.target.name]) for h in heads):
            return p.matrix
    return None


def prepare_model(model: nn.Module, layout: str | Layout) -> RotationPlan:
    """Validate the layout against the model, then untie embeddings, fuse norms and (LayerNorm models) centre
    the residual writers. Nothing is modified if validation fails.

    ``layout="auto"`` infers the layout from the model; any other layout is completed with the residual
    readers/writers and norm readers it misses (each with a note; see ``layout_infer.complete_layout``)."""
    with notes_once():
        return _prepare(model, layout)


def _prepare(model: nn.Module, layout: str | Layout) -> RotationPlan:
    layout = infer_layout(model) if layout == AUTO else complete_layout(model, load_layout(layout))
    dims = resolve_dims(layout, model.config)
    untied_probe = _tied(model)
    placements = resolve_placements(model, layout, dims)
    residual = _residual_matrix(layout, placements)
    modules = dict(model.named_modules())
    norm_readers(model, layout)  # validate norm patterns before touching anything
    if untied_probe:
        untie_embeddings(model)
        # lm_head got new storage: re-resolve so placements point at the live parameters.
        placements = resolve_placements(model, layout, dims)
    fused, kept_biases = fuse_norms(model, layout)
    check_unfused_norms(model, layout, fused, hidden_size(model))
    mean_preserving = any(getattr(modules[n], "bias", None) is not None for n in fused)
    if mean_preserving and residual is not None:
        writers = [p.target for p in placements if p.side == "output" and p.matrix == residual]
        center_writers(list({id(t): t for t in writers}.values()), layout.use_float64)
    if kept_biases:
        if residual is None:
            raise LayoutError("a norm bias must be rotated with the residual stream, but lm_head reads no matrix")
        placements += [Placement(t, "output", residual, "") for t in kept_biases]
    return RotationPlan(layout, dims, placements, residual, mean_preserving, fused)


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or inp is None:
        return False
    cfg_tied = any(getattr(c, "tie_word_embeddings", False) for c in (model.config, model.config.get_text_config()))
    return cfg_tied or out.weight.data_ptr() == inp.weight.data_ptr()


def make_matrices(plan: RotationPlan, *, mode: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One float64 matrix per instance, drawn from one seeded generator in a fixed order (reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for inst, (mname, n) in plan.instances().items():
        m = make_rotation(n, mode or plan.layout.rotation_matrices[mname].mode, gen, name=inst)
        if plan.mean_preserving and mname == plan.residual_matrix:
            m = fix_ones_direction(m)
        out[inst] = m
    return out


@torch.no_grad()
def _probe_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.double()


def _verify_tolerance(dtype: torch.dtype) -> float:
    # HF norms and attention upcast to float32 internally, so even float64 models agree only to ~1e-7;
    # a wrong layout is off by >1e-2.
    return {torch.float64: 1e-5, torch.float32: 1e-3}.get(dtype, 5e-2)


def rotate(
    model: nn.Module,
    layout: str | Layout = "transformer_universal",
    *,
    mode: str | None = None,
    seed: int = 0,
    verify: bool = True,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Fold R1/R2 (as the layout places them) into ``model``'s weights, in place. ``layout`` is a shipped name,
    a YAML path (ModelOpt's layouts work unchanged), a dict, a Layout, or ``"auto"`` (inferred from the model).

    Returns the model and the matrices applied (name -> float64 tensor). With ``verify`` the logits on a
    short random probe are compared before/after and a mismatch raises instead of returning a broken model.
    """
    if mode is not None and mode not in ROTATION_MODES:
        raise ValueError(f"mode={mode!r}: use one of {', '.join(ROTATION_MODES)}")
    was_training = model.training
    model.eval()
    try:
        matrices = _rotate_and_verify(model, layout, mode, seed, verify)
    finally:
        model.train(was_training)
    return model, matrices


def _rotate_and_verify(model: nn.Module, layout, mode: str | None, seed: int, verify: bool) -> dict[str, torch.Tensor]:
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    probe = None
    if verify:
        vocab = model.get_input_embeddings().weight.shape[0]
        probe = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(1234)).to(device)
        reference = _probe_logits(model, probe)
    plan = prepare_model(model, layout)
    matrices = make_matrices(plan, mode=mode, seed=seed)
    for name, m in matrices.items():
        err = orthogonality_error(m)
        if err > 1e-8:
            raise RuntimeError(f"internal error: matrix {name} is not orthogonal ({err:.2e})")
    fold_rotations(plan.placements, matrices, plan.layout.use_float64)
    if verify:
        after = _probe_logits(model, probe)
        rel = ((after - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
        if rel > _verify_tolerance(dtype):
            raise LayoutError(
                f"rotation with layout {plan.layout.name!r} changed the model's outputs (relative error {rel:.2e} "
                f"in {dtype}); this architecture ({type(model).__name__}) is not handled exactly by the layout"
            )
    return matrices
