"""spinlearn.sharded: the model whole on rank 0 only, the ranks computing on sharded views filled from it (FSDP's
big-model path). Two real ranks over gloo (torchrun); the reference is rank 0's whole model with the same wrappers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from spinlearn.sharded import meta_copy, source_name
from test_job import ROOT, _free_port


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_a_sharded_view_computes_what_rank_0s_whole_model_computes(tmp_path, family):
    """Rotations, learned clips, R3 and W4A4KV4 on both: the same logits and rotation gradient on every rank, and
    the perplexity with the windows split over the ranks (3 windows: one rank repeats one it does not count) equals
    the whole model's. Rank 1 never holds the model, and each rank stores about half of every sharded weight."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "sharded_worker.py"), str(tmp_path), family]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["logits"] <= 1e-5 and r["grad"] <= 1e-4, r
        assert r["ppl"][0] == pytest.approx(r["ppl"][1], rel=1e-6)
        assert 0.3 * r["full"] <= r["local"] <= 0.7 * r["full"]  # dim-0 chunks: 4 experts, odd widths
    assert ranks[0]["local"] + ranks[1]["local"] == ranks[0]["full"]
    assert [r["held_model"] for r in ranks] == [True, False]


def test_source_names_undo_parametrize():
    assert source_name("model.layers.0.mlp.down_proj.parametrizations.weight.original") == "model.layers.0.mlp.down_proj.weight"
    assert source_name("model.layers.0.mlp.experts.parametrizations.gate_up_proj.original") == \
        "model.layers.0.mlp.experts.gate_up_proj"
    assert source_name("model.norm.weight") == "model.norm.weight"


def test_a_meta_copy_keeps_structure_and_references_but_no_values():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_buffer("table", torch.arange(5.0))
    refs = {"head": model[0], "weight": model[0].weight}
    copy, copied_refs = meta_copy(model, refs)
    assert all(t.device.type == "meta" for t in [*copy.parameters(), *copy.buffers()])
    assert [(n, p.shape, p.dtype) for n, p in copy.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    assert copied_refs["head"] is copy[0] and copied_refs["weight"] is copy[0].weight  # references follow the copy
    assert model[0].weight.device.type == "cpu"  # the original is untouched
