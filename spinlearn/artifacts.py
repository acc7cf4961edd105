"""What a run or an export writes, under which names, and how (atomically, with the user's umask).

Every file and directory name of an output (``rotations.safetensors``, the ``model/`` sub-directory, ...) is
defined here once. Everything is first written to a hidden temporary sibling and renamed into place at the end,
so a failure never leaves a half-written output. Files get ``0666 & ~umask`` and directories ``0777 & ~umask``
(as ``open``/``mkdir`` would), although ``tempfile`` and safetensors create theirs 0600/0700.

Importing this module is cheap (no torch, no safetensors): the recipe loader uses the checkpoint names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ROTATIONS_FILE = "rotations.safetensors"  # learned / applied matrices, by instance name
MODEL_DIR = "model"  # a run's fused float model (plain Hugging Face directory)
RECIPE_FILE = "recipe.yaml"  # the fully resolved recipe
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
LAYOUT_FILE = "layout.yaml"  # the resolved layout `spinlearn rotate` applied
RUN_MARKER = "spinlearn_run.json"  # marks a directory as one spinlearn run (id, start time, status)
EXPORT_DIR_PREFIX = "export-"  # a run's deployable exports: export-SCHEME/
OPTIMIZER_FILE = "optimizer.safetensors"  # Trainer checkpoints: optimizer state (momentum included)
# Trainer checkpoints of a bank with mean-preserving matrices (LayerNorm models): the optimizer's exact
# variables (Q of R = H diag(1, Q) H), for a bit-exact resume; rotations.safetensors still holds the full R's
ROTATION_PARAMS_FILE = "rotation_parameters.safetensors"
SCHEDULER_FILE = "scheduler.json"
SCALES_FILE = "scales.safetensors"  # learned per-channel scales s (float64) by pair key (spinlearn.scales), folded
LOG_SCALES_FILE = "log_scales.safetensors"  # Trainer checkpoints: the scales' exact variables (float32 log s)
ACTIVATION_CLIPS_FILE = "activation_clips.safetensors"  # learned activation clip ratios by quantizer module name
WEIGHT_CLIPS_FILE = "weight_clips.safetensors"  # learned weight clip ratios [rows, groups] by weight name
CLIP_LOGITS_FILE = "clip_logits.safetensors"  # Trainer checkpoints: the clips' exact variables (activations, weights)
LOSS_STATE_FILE = "loss_state.json"  # Trainer checkpoints: the running loss sum, so a resumed run reports the whole run
TRAINING_CURVE_FILE = "training_curve.png"
OUTLIER_PROFILE_FILE = "outlier_profile.png"
STAGING_PREFIX = ".staging-"  # a run's final outputs are staged here, then moved into place together
CHECKPOINT_PREFIX = "checkpoint-"  # Trainer checkpoints: checkpoint-STEP/

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, racy with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(path: str | Path) -> None:
    """Give ``path`` (and everything under it, for a directory) the modes ``open``/``mkdir`` would have given."""
    mask = _umask()
    path = Path(path)
    todo = [path]
    if path.is_dir():
        todo += list(path.rglob("*"))
    for p in todo:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: readers see the old file or the new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        apply_umask_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _check_writable(out: Path, label: str) -> None:
    """Create and remove a probe file in ``out`` or its nearest existing parent (what the run will create)."""
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"{label} {str(out)!r} cannot be created: {str(parent)!r} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".spinlearn-write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "in it" if parent == out else f"in {str(parent)!r}"
        raise ValueError(
            f"{label} {str(out)!r} is not writable: cannot create a file {where} ({e.strerror or e}); "
            "choose another directory or fix its permissions"
        ) from e


def check_output_dir(out: str | Path, overwrite: bool, *, label: str = "output",
                     overwrite_hint: str = "pass --overwrite to replace it") -> Path:
    """Before any work: ``out`` must be a directory (or not exist yet) that can be written, and be empty unless
    ``overwrite``. ``label`` names the setting in messages (``output_dir`` for a recipe), ``overwrite_hint`` says
    how to allow replacing it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{label} {str(out)!r} is a file, not a directory; pass a directory path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{label} {str(out)!r} exists and is not empty; {overwrite_hint}")
    _check_writable(out, label)
    return out


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete Trainer checkpoint (``checkpoint-N`` holding the rotations and the optimizer state)."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        step = p.name.rsplit("-", 1)[-1]
        if step.isdigit() and (p / ROTATIONS_FILE).is_file() and (p / OPTIMIZER_FILE).is_file():
            found.append((int(step), p))
    return max(found)[1] if found else None


RESUME_LATEST = ("latest", "true")  # train.resume_from_checkpoint values meaning "the newest complete checkpoint"


def resolve_resume(cfg) -> str | None:
    """The checkpoint ``train.resume_from_checkpoint`` names (``latest``/``true``: the newest complete one under
    ``output_dir``; a path, relative to the current directory or else to ``output_dir``; null/false: none), checked
    before any work; ValueError naming the key otherwise."""
    value = cfg.train.resume_from_checkpoint
    key = "train.resume_from_checkpoint"
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in RESUME_LATEST):
        found = latest_checkpoint(cfg.output_dir)
        if found is None:
            raise ValueError(
                f"{key}={value!r}: no complete checkpoint (checkpoint-N/ with {ROTATIONS_FILE} and {OPTIMIZER_FILE}) "
                f"under output_dir {str(cfg.output_dir)!r}; set {key}=null to start from scratch"
            )
        return str(found)
    path = Path(str(value)).expanduser()
    if not path.exists() and not path.is_absolute() and (Path(cfg.output_dir) / path).exists():
        path = Path(cfg.output_dir) / path  # checkpoint-N, named relative to the run directory
    if not path.exists():
        raise ValueError(f"{key}: checkpoint {str(value)!r} does not exist (nor under output_dir); pass a "
                         "checkpoint-N directory or latest")
    missing = [n for n in (ROTATIONS_FILE, OPTIMIZER_FILE) if not (path / n).is_file()]
    if missing:
        latest = latest_checkpoint(path.parent) if path.is_dir() else None
        hint = f"; the newest complete one next to it is {str(latest)!r}" if latest else ""
        raise ValueError(f"{key}: {str(value)!r} is not a complete checkpoint (no {' or '.join(missing)}){hint}")
    return str(path)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory that replaces ``out`` only if the block succeeds."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask_modes(tmp)  # mkdtemp made it 0700, safetensors writes 0600
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def save_model_dir(model, dest: Path, tokenizer_source: str | Path | None = None) -> None:
    """save_pretrained with safetensors, plus the source's tokenizer files copied alongside (umask modes)."""
    model.save_pretrained(str(dest), safe_serialization=True)
    copy_tokenizer_files(tokenizer_source, dest)
    apply_umask_modes(dest)


def copy_tokenizer_files(source: str | Path | None, dest: Path) -> None:
    """The tokenizer files of a model directory, copied beside a written model (existing files are kept)."""
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file() and not (Path(dest) / name).exists():
            shutil.copyfile(Path(source) / name, Path(dest) / name)


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file (which writes 0600 through its own temporary file), then the umask mode."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    apply_umask_modes(path)


def save_rotations(matrices: dict[str, Any], path: str | Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in matrices.items()}
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}
    save_safetensors(tensors, path, metadata=meta)


def load_rotations(path: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rotations file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"rotations file {str(path)!r} is not a valid safetensors file: {e}") from e
