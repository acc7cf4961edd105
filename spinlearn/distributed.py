"""FSDP2 for rotation training: the frozen weights sharded per decoder layer, the learned tensors replicated.

Asked for by the accelerate config (``distributed_type: FSDP``, ``fsdp_version: 2``: ``accelerate launch`` sets
``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION=2`` in every rank's environment), but applied by spinlearn, not by
accelerate, for three reasons:

* accelerate (1.15) enables FSDP only for accelerator devices: on CPU (gloo) its state is ``MULTI_CPU`` whatever
  the config says, and the Trainer silently falls back to DDP. One code path on CPU and GPU keeps the CPU tests
  meaningful for GPU runs.
* accelerate's root ``fully_shard`` would shard the bank (it hangs on the model) together with the embeddings
  unless every config named it in ``fsdp_ignored_modules``; the rotations (and the learned scales and clip ratios,
  when on) must stay whole and bit-identical on every rank, and their gradients must still be averaged, which FSDP
  does not do for parameters it ignores.
* the weights are frozen, so FSDP never reduce-scatters anything (gloo has no reduce_scatter): the only
  collectives are the all-gathers before each unit's forward (and again in backward, ``reshard_after_forward``),
  and the all-reduce of the bank's gradients.

So the job claims the FSDP request before accelerate sees it (``claim_fsdp_request``), lets accelerate set up
plain multi-process data parallelism, and computes on sharded views of the model (``spinlearn.sharded``: rank 0
alone loads the weights, to the CPU; every rank builds a meta copy, installs the wrappers, then ``shard_model``
applies ``fully_shard`` on every decoder layer (the model's ``_no_split_modules``, or
``FSDP_TRANSFORMER_CLS_TO_WRAP``) and on the root, with the learned tensors (the bank's matrices, the scale bank's
log-scales, the clip logits) as ``ignored_params``, and the shards are filled from rank 0). The Trainer is told the
model is already sharded (``mark_sharded``; transformers' ``is_distributed_loading_by_transformers`` path): it
does not wrap it in DDP, broadcasts the replicated trainable parameters from rank 0, and averages their gradients
over ranks at the end of each accumulation window (``Trainer._sync_replicated_trainable_parameters``).

The rotated weights are parametrizations that read ``parametrizations.weight.original`` inside each layer's
forward, i.e. after FSDP has all-gathered it: they see the full frozen weight. Rank 0's CPU model is never
sharded: the fusion and the exports use it after training.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

FSDP_ENV = "ACCELERATE_USE_FSDP"
FSDP_VERSION_ENV = "FSDP_VERSION"
LAYER_CLS_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"
RESHARD_ENV = "FSDP_RESHARD_AFTER_FORWARD"
WRAP_POLICY_ENV = "FSDP_AUTO_WRAP_POLICY"
# accelerate config settings spinlearn's sharding does not implement: refused rather than ignored. (Its
# fsdp_cpu_ram_efficient_loading is what spinlearn always does: rank 0 alone loads the weights, spinlearn.sharded.)
UNSUPPORTED_WHEN_TRUE = {
    "FSDP_OFFLOAD_PARAMS": "fsdp_offload_params",
    "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing (set train.gradient_checkpointing: true instead)",
}
CLAIMED_ENV = "SPINLEARN_FSDP"  # set once the job has taken over the request (survives a second job in-process)


def claim_fsdp_request() -> bool:
    """True when the accelerate launch asked for FSDP. Takes the request away from accelerate (its env flag is set
    to false) so that it sets up plain data parallelism and leaves the sharding to spinlearn.sharded. Call it
    before ``TrainingArguments``/``Accelerator`` exist. Refuses FSDP1: FSDP2 is the one supported."""
    if os.environ.get(CLAIMED_ENV) == "1":
        return True
    if os.environ.get(FSDP_ENV, "false").lower() != "true":
        return False
    version = os.environ.get(FSDP_VERSION_ENV, "1")
    if version != "2":
        raise ValueError(f"the accelerate config asks for FSDP version {version}; spinlearn supports fsdp_version: 2 "
                         "(see accelerate_configs/8gpu_fsdp.yaml)")
    refused = [name for env, name in UNSUPPORTED_WHEN_TRUE.items() if os.environ.get(env, "false").lower() == "true"]
    policy = os.environ.get(WRAP_POLICY_ENV, "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        refused.append(f"fsdp_auto_wrap_policy {policy} (spinlearn shards by decoder layer: TRANSFORMER_BASED_WRAP)")
    if refused:
        raise ValueError(f"accelerate FSDP settings not supported by spinlearn's FSDP: {'; '.join(refused)} "
                         "(see accelerate_configs/8gpu_fsdp.yaml)")
    os.environ[FSDP_ENV] = "false"
    os.environ[CLAIMED_ENV] = "1"
    return True


def reshard_after_forward() -> bool:
    """The accelerate config's ``fsdp_reshard_after_forward`` (default true): free each layer's gathered weights after
    its forward and gather them again in backward."""
    return os.environ.get(RESHARD_ENV, "true").lower() != "false"


def decoder_layer_classes(model: nn.Module) -> set[type]:
    """The classes that get one FSDP unit each: ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (comma-separated class names, from
    the accelerate config's ``fsdp_transformer_layer_cls_to_wrap``) or the model's ``_no_split_modules``."""
    names = os.environ.get(LAYER_CLS_ENV) or ",".join(getattr(model, "_no_split_modules", None) or [])
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    missing = wanted - {c.__name__ for c in found}
    if not wanted or missing:
        raise ValueError(f"FSDP: no decoder layer class to shard by (wanted {sorted(wanted) or 'none'}, not in the "
                         f"model: {sorted(missing)}); set fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    return found


def shard_model(model: nn.Module, replicated: list[nn.Parameter], device: torch.device,
                reshard_after_forward: bool = True) -> int:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, lm_head); ``replicated``
    parameters are left whole on every rank. ``reshard_after_forward``: free each layer's gathered weights after
    its forward and gather them again in backward (less memory, one more all-gather per layer). Returns the number
    of decoder-layer units."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP needs a process group: launch with accelerate launch (see accelerate_configs/)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(replicated)
    classes = tuple(decoder_layer_classes(model))
    layers = [m for m in model.modules() if isinstance(m, classes)]
    whole = [p for p in model.parameters() if p not in ignored]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    _free_replaced(whole, model)
    return len(layers)


def _free_replaced(whole: list[nn.Parameter], model: nn.Module) -> None:
    """Release the storage of the full weights ``fully_shard`` replaced by shards. Other holders of the old
    parameter objects (the rotation plan's targets, ``rotations_attached``'s requires_grad bookkeeping) would
    otherwise keep every full weight alive on every rank; they only need the objects, not the values."""
    live = {id(p) for p in model.parameters()}
    with torch.no_grad():
        for p in whole:
            if id(p) not in live:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def mark_sharded(trainer, learned: list[nn.Parameter]) -> int:
    """Tell the Trainer that ``trainer.model`` (a sharded view, ``spinlearn.sharded``, rotations attached; ``learned``,
    the rotations and any learned scales and clip logits, its only trainable parameters) is already distributed:
    no DDP wrap; the learned tensors broadcast from rank 0 and their gradients averaged over ranks by the Trainer.
    Call after the Trainer is built and before ``train()``. Returns the number of decoder-layer units (0 with a
    single process: nothing is sharded, the model trains whole)."""
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(trainer, "_sync_replicated_trainable_parameters"):
        import transformers

        raise RuntimeError(f"FSDP needs a transformers Trainer that trains models sharded before it (transformers "
                           f"{transformers.__version__} has no Trainer._sync_replicated_trainable_parameters); "
                           "upgrade transformers or use DDP (accelerate_configs/8gpu_ddp.yaml)")
    if trainer.args.world_size == 1:
        return 0  # one process: nothing to shard over, the model trains whole
    units = sum(isinstance(m, FSDPModule) for m in trainer.model.modules()) - 1  # minus the root
    if units < 1:
        raise RuntimeError("FSDP: the model given to the Trainer is not sharded (build it with spinlearn.sharded)")
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    if trainable != {id(p) for p in learned}:
        raise RuntimeError(f"FSDP: the learned tensors ({len(learned)}) must be the model's only trainable "
                           f"parameters ({len(trainable)} have requires_grad)")
    trainer.is_distributed_loading_by_transformers = True
    # Between the micro-batches of an accumulation window that Trainer path pauses FSDP's gradient reduction through
    # the model config's ``distributed_config`` (set only by from_pretrained(distributed_config=...)). The frozen
    # weights have no gradients to reduce, and the learned tensors' averaging already waits for the window's last
    # micro-batch.
    trainer._defer_fsdp_gradient_reduction = contextlib.nullcontext
    return units


def check_replicated(params, what: str = "learned tensors") -> None:
    """Raise on every rank if ``params`` are not bit-identical on all ranks: each rank compares its tensors with
    rank 0's (one broadcast per tensor, a temporary copy of one tensor at a time), then the verdict is shared."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = [p.detach() for p in params]
    differ = 0
    for p in params:
        reference = p.clone()
        dist.broadcast(reference, src=0)
        differ += int(not torch.equal(reference, p))
    verdict = torch.tensor([differ], dtype=torch.int64, device=params[0].device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    if verdict.item():
        raise RuntimeError(f"the {what} differ across ranks after training ({verdict.item()} of {len(params)} tensors "
                           "on some rank differ from rank 0's): the ranks drifted apart; nothing is exported")
