"""rundir.py: a run directory holds one run (cleared at start, marked, final outputs published together)."""

from __future__ import annotations

import json

from spinlearn import rundir
from spinlearn.artifacts import METRICS_FILE, MODEL_DIR, ROTATIONS_FILE, RUN_MARKER


def _previous_run(out):
    out.mkdir()
    (out / MODEL_DIR).mkdir()
    (out / MODEL_DIR / "config.json").write_text("{}")
    (out / ROTATIONS_FILE).write_bytes(b"old")
    (out / METRICS_FILE).write_text('{"steps": 100}')
    (out / "checkpoint-50").mkdir()
    (out / "export-w4a16").mkdir()
    (out / ".staging-dead").mkdir()
    (out / "my_notes.txt").write_text("keep me")


def test_start_clears_the_previous_run_but_never_foreign_files(tmp_path):
    out = tmp_path / "run"
    _previous_run(out)
    marker = rundir.start_run(out, resuming=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(["my_notes.txt", RUN_MARKER])
    assert rundir.read_marker(out) == marker and marker["status"] == "running" and len(marker["run_id"]) == 32


def test_resuming_keeps_the_checkpoints(tmp_path):
    out = tmp_path / "run"
    _previous_run(out)
    rundir.start_run(out, resuming=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint-50", "my_notes.txt", RUN_MARKER])


def test_staged_outputs_appear_together_and_the_marker_says_complete(tmp_path):
    out = tmp_path / "run"
    marker = rundir.start_run(out, resuming=False)
    staging = rundir.staging_dir(out)
    assert staging.parent == out and staging.name.endswith(marker["run_id"]) and staging.name.startswith(".")
    (staging / MODEL_DIR).mkdir()
    (staging / ROTATIONS_FILE).write_bytes(b"new")
    (staging / METRICS_FILE).write_text("{}")
    assert not (out / ROTATIONS_FILE).exists()  # nothing visible before publishing
    rundir.publish_run(staging, out)
    assert not staging.exists() and (out / ROTATIONS_FILE).read_bytes() == b"new"
    final = json.loads((out / RUN_MARKER).read_text())
    assert final["status"] == "complete" and final["run_id"] == marker["run_id"] and "finished" in final


def test_mark_run_leaves_a_directory_without_marker_alone(tmp_path):
    rundir.mark_run(tmp_path, "failed")
    assert not (tmp_path / RUN_MARKER).exists()
    rundir.start_run(tmp_path, resuming=False)
    rundir.mark_run(tmp_path, "failed")
    assert rundir.read_marker(tmp_path)["status"] == "failed"
