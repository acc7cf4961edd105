"""FSDP's big-model path: the model is whole only on rank 0, in CPU memory; the ranks compute on sharded copies.

A 70B model in bf16 is 140 GB: no GPU holds it, and eight ranks each loading it would need eight times that in host
memory. So under FSDP only rank 0 loads the weights (to the CPU), and every evaluation and the training run on a
*sharded view* built in three steps:

1. ``skeleton``: every rank gets a copy of rank 0's model on the ``meta`` device (modules, names, shapes, dtypes; no
   memory), together with any object that points into the model (a ``RotationPlan``): rank 0 deep-copies them with
   every weight and buffer swapped for a meta tensor and broadcasts the pickle. Structural changes rank 0 made
   (untied embeddings, fused norms) are in the copy; nothing value-dependent is recomputed.
2. The caller installs its wrappers on the skeleton (``wrap_model``, ``rotations_attached``): they register their
   own tensors (the rotation bank, learned scales, clip logits) with real values.
3. ``shard_and_fill``: ``fully_shard`` per decoder layer (``distributed.shard_model``) with the wrappers' tensors
   replicated, storage allocated on the rank's device (``to_empty``), then every tensor that came from the model is
   filled from rank 0's copy: weights scattered shard by shard (``distribute_tensor`` from rank 0, one tensor at a
   time), buffers broadcast. The wrappers' own tensors keep their values.

No rank but 0 ever holds a whole weight beyond the one being scattered, and no GPU more than its shards and the
layer being computed. The fusion and the exports then run on rank 0's CPU model (``job.RotationJob``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PARAMETRIZED = ".parametrizations."  # torch.nn.utils.parametrize moves W to MODULE.parametrizations.W.original


def source_name(name: str) -> str:
    """The plain model's name of a view's tensor: ``a.parametrizations.weight.original`` -> ``a.weight``."""
    if PARAMETRIZED in name and name.endswith(".original"):
        head, rest = name.split(PARAMETRIZED, 1)
        return f"{head}.{rest.removesuffix('.original')}"
    return name


def meta_copy(model: nn.Module, *refs):
    """``(model, *refs)`` deep-copied with every parameter and buffer of ``model`` replaced by a meta tensor of the
    same shape and dtype (``refs``' references into ``model`` follow the copy)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy((model, *refs), memo)


def skeleton(model: nn.Module | None, *refs):
    """On every rank, ``meta_copy(model, *refs)`` of rank 0's ``model`` (the other ranks pass None): a collective
    call. Returns the tuple ``(model, *refs)``."""
    import torch.distributed as dist

    if dist.get_rank() == 0 and model is None:
        raise ValueError("skeleton: rank 0 must pass the model it holds")
    payload = [meta_copy(model, *refs) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def shard_and_fill(view: nn.Module, source: nn.Module | None, device: torch.device) -> int:
    """Shard ``view`` (a ``skeleton`` with any wrappers installed) over the ranks and fill it from ``source``, rank
    0's plain model (None elsewhere): collective. Tensors still on ``meta`` come from ``source`` (looked up by
    ``source_name``); the others (the wrappers' own) are replicated and keep their values. Returns the number of
    decoder-layer units."""
    import torch.distributed as dist

    from .distributed import reshard_after_forward, shard_model

    owned = {n: t.detach().clone() for n, t in _tensors(view) if t.device.type != "meta"}
    replicated = [p for n, p in view.named_parameters() if n in owned]
    units = shard_model(view, replicated, device, reshard_after_forward=reshard_after_forward())
    view.to_empty(device=device)
    source_tensors = dict(_tensors(source)) if source is not None else None
    problem = [None]
    if dist.get_rank() == 0:
        missing = [n for n, _ in _tensors(view) if n not in owned and source_name(n) not in source_tensors]
        if missing:
            problem[0] = (f"sharded view: {len(missing)} tensors have no counterpart in rank 0's model (first: "
                          f"{missing[0]!r}, looked up as {source_name(missing[0])!r})")
    dist.broadcast_object_list(problem, src=0)  # every rank stops, none waits for a scatter that never comes
    if problem[0]:
        raise RuntimeError(problem[0])
    with torch.no_grad():
        for name, t in _tensors(view):
            if name in owned:
                t.copy_(owned[name].to(device))
            else:
                _fill(t, source_tensors[source_name(name)] if source_tensors is not None else None, device)
    return units


def _tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _fill(t: torch.Tensor, full: torch.Tensor | None, device: torch.device) -> None:
    """``t`` (this rank's shard of a DTensor, or a whole replicated tensor) from rank 0's ``full`` tensor."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    if full is not None:
        full = full.detach().to(device=device, dtype=t.dtype)
    if isinstance(t, DTensor):
        if full is None:
            full = torch.empty(t.shape, dtype=t.dtype, device=device)
        piece = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=0)
        t.to_local().copy_(piece.to_local())
    else:
        if full is None:
            full = torch.empty_like(t)
        dist.broadcast(full, src=0)
        t.copy_(full)


__all__ = ["meta_copy", "shard_and_fill", "skeleton", "source_name"]
