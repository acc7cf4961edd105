"""What the learned-rotation job checks before it loads data or weights: every input that can be checked cheaply.

The output directory (a directory, writable; not empty unless overwriting or resuming), the model directory
(config.json valid, weights files intact), the layout against the model's config, the sequence lengths against
its context, and the checkpoint to resume from. Each failure is one line naming the key or file and what would
work.
"""

from __future__ import annotations

import os
from pathlib import Path

from .artifacts import check_output_dir, resolve_resume
from .loading import check_model_dir, check_remote_code, check_seqlen


def check_job_inputs(cfg) -> str | None:
    """Validate a recipe's inputs before any heavy work; returns the checkpoint to resume from (or None)."""
    resume = resolve_resume(cfg)
    check_device_map(cfg.model.device_map, int(os.environ.get("WORLD_SIZE", "1")))
    check_output_dir(cfg.output_dir, overwrite=bool(cfg.overwrite_output_dir or resume), label="output_dir",
                     overwrite_hint="set overwrite_output_dir=true or train.resume_from_checkpoint=latest")
    config_json = check_model_dir(cfg.model.path)
    check_remote_code(cfg.model.path, cfg.model.trust_remote_code)
    check_seqlen(config_json, cfg.data.seqlen, "data.seqlen")
    check_seqlen(config_json, cfg.data.eval_seqlen, "data.eval_seqlen")
    _check_layout(cfg)
    return resume


def check_device_map(device_map: str | None, world_size: int) -> None:
    """``model.device_map`` spreads one process's model over its GPUs; DDP and FSDP give every process a device
    of its own (and the whole model or a shard of it), so the two do not combine."""
    if device_map is not None and world_size > 1:
        raise ValueError(
            f"model.device_map={device_map!r} spreads the model over one process's GPUs, but this job runs "
            f"{world_size} processes (DDP/FSDP); launch one process (python launch/train_rotations.py, or accelerate "
            "launch --num_processes 1), or set model.device_map=null to replicate (DDP) or shard (FSDP) the model")


def _check_layout(cfg) -> None:
    """The layout resolves against the model's config (dims exist, are positive and fit); the online input
    Hadamards' widths and the exports' group sizes fit the model's layers (checked on the model built on the meta
    device; R3's head_dim is checked once the model is loaded) — no weights needed."""
    from transformers import AutoConfig

    from .layout import check_layout_for_config
    from .loading import meta_model
    from .online import online_linears

    config = AutoConfig.from_pretrained(str(Path(cfg.model.path)), trust_remote_code=cfg.model.trust_remote_code)
    check_layout_for_config(cfg.rotation.layout, config)
    model = meta_model(config, trust_remote_code=cfg.model.trust_remote_code)
    online_linears(model, cfg.rotation.online, cfg.rotation.r4)
    _check_exports(cfg, model)


def _check_exports(cfg, model) -> None:
    """Every ``export.schemes`` entry is one vLLM serves, with a group size that divides every quantized width."""
    from .export.schemes import GROUPED_SCHEMES, resolve_scheme
    from .export.weights import check_group_widths, quantized_linears

    for scheme in cfg.export.schemes:
        group = cfg.export.group_size if scheme in GROUPED_SCHEMES else None
        s = resolve_scheme(scheme, group, w_clip=bool(cfg.quant.w_clip))
        if s.quantized:
            check_group_widths(quantized_linears(model), s)
