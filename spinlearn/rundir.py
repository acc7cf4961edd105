"""A run directory holds one run: cleared at the start, marked, and filled with its final outputs all at once.

At start (after validation) the previous run's outputs are removed (its checkpoints too, unless this run resumes
from them) and a marker (``spinlearn_run.json``: run id, start time, status) is written. The final outputs are
written to a hidden staging directory and moved into place together at the end; then the marker says
``complete``. A run that dies leaves its marker at ``running`` or ``failed`` and no outputs of another run.
Files this project does not write are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from .artifacts import (
    CHECKPOINT_PREFIX,
    ACTIVATION_CLIPS_FILE,
    WEIGHT_CLIPS_FILE,
    EXPORT_DIR_PREFIX,
    LAYOUT_FILE,
    METRICS_FILE,
    MODEL_DIR,
    OUTLIER_PROFILE_FILE,
    RECIPE_FILE,
    RESULTS_FILE,
    ROTATIONS_FILE,
    RUN_MARKER,
    SCALES_FILE,
    STAGING_PREFIX,
    TRAINING_CURVE_FILE,
)

FINAL_OUTPUTS = (MODEL_DIR, ROTATIONS_FILE, SCALES_FILE, ACTIVATION_CLIPS_FILE, WEIGHT_CLIPS_FILE, LAYOUT_FILE, RECIPE_FILE, METRICS_FILE, RESULTS_FILE, TRAINING_CURVE_FILE,
                 OUTLIER_PROFILE_FILE)


def _is_previous_output(name: str, keep_checkpoints: bool) -> bool:
    if name in FINAL_OUTPUTS or name == RUN_MARKER:
        return True
    if name.startswith((EXPORT_DIR_PREFIX, STAGING_PREFIX)):
        return True
    return name.startswith(CHECKPOINT_PREFIX) and not keep_checkpoints


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def read_marker(out: str | Path) -> dict | None:
    path = Path(out) / RUN_MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(out: Path, marker: dict) -> None:
    tmp = out / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, out / RUN_MARKER)


def start_run(out: str | Path, *, resuming: bool) -> dict:
    """Clear the previous run's outputs from ``out`` (checkpoints kept when ``resuming``) and mark it as this run's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for entry in out.iterdir():
        if _is_previous_output(entry.name, keep_checkpoints=resuming):
            _remove(entry)
    marker = {"run_id": uuid.uuid4().hex, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "resumed": resuming}
    _write_marker(out, marker)
    return marker


def mark_run(out: str | Path, status: str) -> None:
    """Update the marker's status (``complete``, ``failed``); a directory without a marker is left alone."""
    out = Path(out)
    marker = read_marker(out)
    if marker is None:
        return
    marker.update(status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_marker(out, marker)


def staging_dir(out: str | Path) -> Path:
    """A fresh hidden directory inside ``out`` for this run's final outputs."""
    out = Path(out)
    marker = read_marker(out) or {"run_id": uuid.uuid4().hex}
    path = out / f"{STAGING_PREFIX}{marker['run_id']}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish_run(staging: Path, out: str | Path) -> None:
    """Move every staged output into ``out`` (replacing what is there), then mark the run complete."""
    out = Path(out)
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if target.exists():
            _remove(target)
        os.replace(entry, target)
    staging.rmdir()
    mark_run(out, "complete")


__all__ = ["start_run", "mark_run", "staging_dir", "publish_run", "read_marker"]
