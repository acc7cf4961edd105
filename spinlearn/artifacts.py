"""What a run or an export writes, under which names, and how (atomically).

Every file and directory name of an output (``rotations.safetensors``, the ``model/`` sub-directory, ...) is
defined here once. Everything is first written to a hidden temporary sibling and renamed into place at the end,
so a failure never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROTATIONS_FILE = "rotations.safetensors"  # learned / applied matrices, by instance name
MODEL_DIR = "model"  # a run's fused float model (plain Hugging Face directory)
RECIPE_FILE = "recipe.yaml"  # the fully resolved recipe
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
LAYOUT_FILE = "layout.yaml"  # the resolved layout `spinlearn rotate` applied
RUN_MARKER = "spinlearn_run.json"  # marks a directory as one spinlearn run (id, start time, status)
EXPORT_DIR_PREFIX = "export-"  # a run's deployable exports: export-SCHEME/
OPTIMIZER_FILE = "optimizer.safetensors"  # Trainer checkpoints: optimizer state (momentum included)
SCHEDULER_FILE = "scheduler.json"

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless overwrite is set (checked before any work)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory that replaces ``out`` only if the block succeeds."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def save_model_dir(model, dest: Path, tokenizer_source: str | Path | None = None) -> None:
    """save_pretrained with safetensors, plus the source's tokenizer files copied alongside."""
    model.save_pretrained(str(dest), safe_serialization=True)
    if tokenizer_source is not None:
        src = Path(tokenizer_source)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (dest / name).exists():
                shutil.copy2(src / name, dest / name)


def save_rotations(matrices: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in matrices.items()}
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}
    save_file(tensors, str(path), metadata=meta)


def load_rotations(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rotations file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"rotations file {str(path)!r} is not a valid safetensors file: {e}") from e
