"""FSDP2 rotation training (issue 9, item 1): two real ranks on CPU over gloo, accelerate_configs/cpu_2proc_fsdp.yaml.

The frozen weights are sharded (one unit per decoder layer, plus the root), the RotationBank is replicated; the
learned matrices must be bit-identical on both ranks and equal a one-process run with the same global batch, and
the export must equal a one-process fold of the same matrices. See spinlearn/distributed.py for why spinlearn,
not accelerate, applies ``fully_shard``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spinlearn import distributed
from spinlearn.artifacts import (ACTIVATION_CLIPS_FILE, CLIP_LOGITS_FILE, LOG_SCALES_FILE, ROTATIONS_FILE, SCALES_FILE,
                                 WEIGHT_CLIPS_FILE)
from helpers import save_remote_code_model_dir
from test_job import (  # noqa: F401  (assets is a fixture)
    IDS,
    ROOT,
    _free_port,
    assets,
    original_logits,
    overrides_for,
    rel_err,
    run_main,
)

# Both runs: 4 samples per step (FSDP: 2 ranks x batch 1 x 2 accumulated micro-batches), CE + KL to the float model.
STEPS = {"train.max_steps": 4, "train.save_steps": 2, "train.save_total_limit": "null", "loss.kl_weight": 0.5}
BANK_PARAMS = 3  # r1 and one r2 per layer of the tiny Llama


def launch_fsdp(assets, out: Path, dumps: Path, recipe: Path | None = None, config: str = "cpu_2proc_fsdp.yaml",
                **extra) -> subprocess.CompletedProcess:
    """tests/ddp_entry.py under accelerate launch with the 2-process CPU FSDP config (or ``config``), batch 1 per
    rank (the tiny model's recipe, or ``recipe``)."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(out.parent), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "accelerate_configs" / config), "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "ddp_entry.py"), str(recipe or assets["recipe"]), str(dumps),
        *overrides_for(out, **STEPS, **{"train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2,
                                        "train.report_to": "[none]"}, **extra),
    ]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_run(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    proc = launch_fsdp(assets, root / "out", root / "ranks")
    return {"root": root, "out": root / "out", "dumps": root / "ranks", "stdout": proc.stdout}


def step_losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_two_process_fsdp_shards_the_frozen_weights_and_keeps_the_rotations_replicated(fsdp_run):
    assert "FSDP2: 2 decoder layers sharded over 2 ranks" in fsdp_run["stdout"]
    # Only rank 0 ever loads the weights (once, to the CPU); rank 1 computes on sharded views filled from it.
    loads = [json.loads((fsdp_run["dumps"] / f"loads{r}.json").read_text()) for r in (0, 1)]
    assert len(loads[0]) == 1 and loads[1] == []
    assert "rank 0 holds the model in CPU memory" in fsdp_run["stdout"]
    shards = [json.loads((fsdp_run["dumps"] / f"shards{r}.json").read_text()) for r in (0, 1)]
    for info in shards:
        assert info["dtensors"] == info["params"] - BANK_PARAMS  # every frozen weight is sharded, the bank is not
        assert info["trainable_dtensors"] == 0
        assert 0 < info["local_numel"] < info["full_numel"]
    assert shards[0]["local_numel"] + shards[1]["local_numel"] == shards[0]["full_numel"]  # each holds its half
    # The rotated weights' parametrizations read the whole frozen weight inside the layer's forward (all-gathered).
    probe = shards[0]
    assert probe["stored_type"] == "DTensor" and probe["stored_local_shape"][0] * 2 == probe["stored_shape"][0]
    assert probe["seen_in_forward"][0] != "DTensor" and probe["seen_in_forward"][1] == probe["stored_shape"]

    rank0, rank1 = (load_file(fsdp_run["dumps"] / f"rank{r}.safetensors") for r in (0, 1))
    assert set(rank0) == {"r1", "r2.model.layers.0", "r2.model.layers.1"}
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert json.loads((fsdp_run["out"] / "metrics.json").read_text())["steps"] == 4


def test_fsdp_equals_one_process_with_the_same_global_batch_and_exports_its_fold(assets, fsdp_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from spinlearn.fusion import fold_rotations
    from spinlearn.rotation_plan import make_matrices, prepare_model

    single = tmp_path / "single"
    assert run_main(assets, overrides_for(single, **STEPS, **{"train.per_device_train_batch_size": 4})) == 0
    out = fsdp_run["out"]
    assert step_losses(out) == pytest.approx(step_losses(single), rel=1e-4) and len(step_losses(out)) == 4
    # Every evaluation ran on sharded views, the windows split over the ranks: the rows equal one process's.
    rows, single_rows = (json.loads((d / "metrics.json").read_text())["rows"] for d in (out, single))
    skipped = [k for k in single_rows if "GPTQ" in k]
    assert skipped and rows.keys() == single_rows.keys() - set(skipped)  # GPTQ needs the whole model on one device
    for label, value in rows.items():
        assert value == pytest.approx(single_rows[label], rel=1e-3 if "learned" in label else 1e-5), label
    assert "skipped" in json.loads((out / "metrics.json").read_text())["gptq_row"]
    learned, reference = load_file(out / ROTATIONS_FILE), load_file(single / ROTATIONS_FILE)
    diff = max((learned[k].double() - reference[k].double()).abs().max().item() for k in learned)
    assert diff <= 1e-4, diff

    # The export (written by rank 0) is the one-process fold of the same matrices into the original model...
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    plan = prepare_model(model, "transformer_universal")
    start = make_matrices(plan, mode="hadamard", seed=0)
    moved = max((learned[k].double() - start[k]).abs().max().item() for k in start)
    print(f"FSDP vs one process: max diff {diff:.2e}; moved from the start {moved:.2e}")
    assert moved > 30 * diff  # a real agreement: training moved the matrices far more than that
    fold_rotations(plan.placements, {k: v.double() for k, v in learned.items()}, plan.layout.use_float64)
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    expected = model.state_dict()
    assert exported.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[k]) for k, t in exported.state_dict().items())
    # ... and computes the original model's function (the online R3/R4 are identities in float).
    with torch.no_grad():
        assert rel_err(exported(input_ids=IDS).logits, original_logits(assets)) <= 1e-4


def test_fsdp_resume_from_a_checkpoint_equals_the_uninterrupted_run(assets, fsdp_run):
    resumed = fsdp_run["root"] / "resumed"
    launch_fsdp(assets, resumed, fsdp_run["root"] / "resumed_ranks",
                **{"train.resume_from_checkpoint": fsdp_run["out"] / "checkpoint-2"})
    full, again = (load_file(d / "checkpoint-4" / ROTATIONS_FILE) for d in (fsdp_run["out"], resumed))
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert step_losses(resumed)[-2:] == step_losses(fsdp_run["out"])[-2:]


def test_fsdp_replicates_learned_scales_and_clip_ratios_like_a_one_process_run(assets, tmp_path):
    """The shipped recipes learn per-channel scales and clip ratios beside the rotations: under FSDP they are
    replicated with the rotations (bit-identical on the ranks) and train as in one process. The weight clip ratios
    live inside the sharded decoder layers (in the weights' parametrizations) and stay whole too."""
    extras = {"rotation.learn_scales": "true", "quant.learn_a_clip": "true", "quant.learn_w_clip": "true",
              "quant.w_clip_lr": "0.1"}
    fsdp, dumps, single = tmp_path / "fsdp", tmp_path / "ranks", tmp_path / "single"
    launch_fsdp(assets, fsdp, dumps, **extras)
    rank0, rank1 = (load_file(dumps / f"rank{r}.safetensors") for r in (0, 1))
    assert {k.split(".")[0] for k in rank0} >= {"r1", "scale", "clip", "wclip"}
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert run_main(assets, overrides_for(single, **STEPS, **extras, **{"train.per_device_train_batch_size": 4,
                                                                        "data.eval": "null"})) == 0
    assert step_losses(fsdp) == pytest.approx(step_losses(single), rel=1e-4)
    # The same learned tensors after 2 steps (the checkpoints hold their exact variables)...
    for name in (ROTATIONS_FILE, LOG_SCALES_FILE, CLIP_LOGITS_FILE):
        a, b = (load_file(d / "checkpoint-2" / name) for d in (fsdp, single))
        assert a.keys() == b.keys() and a
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-4, name
    # ... and close at the end. Not to 1e-4: the batches' float rounding differs (2 ranks x 2 micro-batches of 1
    # against one batch of 4), and once a value sits on a rounding boundary of a 4-bit quantizer, the two runs round
    # it apart and their gradients differ by a step of the grid (a clip logit by 2e-3 after step 4, measured).
    for name in (ROTATIONS_FILE, SCALES_FILE, ACTIVATION_CLIPS_FILE, WEIGHT_CLIPS_FILE):
        a, b = load_file(fsdp / name), load_file(single / name)
        assert a.keys() == b.keys() and a
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-2, name
    scales = load_file(fsdp / SCALES_FILE)
    assert max((v.double() - 1).abs().max().item() for v in scales.values()) > 1e-3  # the scales did move
    with torch.no_grad():  # the exported model (scales folded) still computes the original function
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(fsdp / "model").eval()
        assert rel_err(exported(input_ids=IDS).logits, original_logits(assets)) <= 1e-4


def test_fsdp_starts_the_weight_clips_at_the_one_process_mse_search(assets, tmp_path):
    """quant.w_clip_init mse under FSDP: every rank gathers each sharded weight whole for the MSE search, so every
    rank starts from the one-process ratios (a learning rate that cannot move them keeps the start to the end)."""
    extras = {"quant.learn_w_clip": "true", "quant.w_clip_init": "mse", "quant.w_clip_lr": "1e-12", "data.eval": "null"}
    fsdp, dumps, single = tmp_path / "fsdp", tmp_path / "ranks", tmp_path / "single"
    launch_fsdp(assets, fsdp, dumps, **extras)
    rank0, rank1 = (load_file(dumps / f"rank{r}.safetensors") for r in (0, 1))
    wclips = [k for k in rank0 if k.startswith("wclip")]
    assert wclips and all(torch.equal(rank0[k], rank1[k]) for k in wclips)
    assert run_main(assets, overrides_for(single, **STEPS, **extras, **{"train.per_device_train_batch_size": 4})) == 0
    a, b = load_file(fsdp / WEIGHT_CLIPS_FILE), load_file(single / WEIGHT_CLIPS_FILE)
    assert a.keys() == b.keys() and len(a) == 2 * 7
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert min(v.min().item() for v in a.values()) < 0.9  # the search's start, not 0.99


def test_fsdp_with_the_rotations_on_the_activations_trains_like_one_process(assets, tmp_path):
    """A W16A4KV4 recipe trains on the activations (rotation.apply auto): no weight is parametrized, FSDP shards the
    plain weights, and the matrices stay bit-identical on the ranks and equal a one-process run's."""
    extras = {"quant.w_bits": 16, "quant.w_method": "gptq", "rotation.learn_scales": "true"}
    fsdp, dumps, single = tmp_path / "fsdp", tmp_path / "ranks", tmp_path / "single"
    launch_fsdp(assets, fsdp, dumps, **extras)
    rank0, rank1 = (load_file(dumps / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert json.loads((fsdp / "metrics.json").read_text())["rotation_apply"] == "activations"
    for r in (0, 1):
        info = json.loads((dumps / f"shards{r}.json").read_text())
        assert info["dtensors"] > 0 and info["local_numel"] < info["full_numel"]  # the plain weights are sharded
    assert run_main(assets, overrides_for(single, **STEPS, **extras, **{"train.per_device_train_batch_size": 4,
                                                                        "data.eval": "null"})) == 0
    assert step_losses(fsdp) == pytest.approx(step_losses(single), rel=1e-4)
    a, b = load_file(fsdp / ROTATIONS_FILE), load_file(single / ROTATIONS_FILE)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-4


@pytest.mark.slow  # a minute: the tiny-model tests above check the same on every run
def test_fsdp_on_the_demo_model_equals_ddp_and_exports_its_fold(assets, tmp_path):
    """The demo recipe as shipped (W4A4KV4, R3/R4, scales and every clip ratio learned) for 4 steps on 2 ranks: FSDP
    learns bit for bit what DDP learns from the same micro-batches (both equal on their ranks), its rows (sharded
    evaluation, windows split over the ranks) equal DDP's (whole model on every rank), and its fused export computes
    the demo model's function. (Against one process with batch 4 the float sums are ordered differently, and Adam,
    which scales each gradient to a unit step, carries that rounding into the scales and clip ratios: 2e-2 after 4
    steps, the rotations 1.3e-3; the tiny model's tests above compare with one process.)"""
    from transformers import AutoModelForCausalLM

    demo = ROOT / "spinlearn" / "demo"
    short = {"model.path": demo / "model", "data.train": demo / "data" / "train.txt",
             "data.eval": demo / "data" / "test.txt", "data.nsamples": 16, "data.eval_max_windows": 3,
             "eval.baselines": "false", "export.schemes": "[]", "eval.guard": "false"}  # 4 steps: keep what they learn
    runs = {}
    for name, config in (("fsdp", "cpu_2proc_fsdp.yaml"), ("ddp", "cpu_2proc.yaml")):
        launch_fsdp(assets, tmp_path / name, tmp_path / f"{name}_ranks", recipe=ROOT / "recipes" / "demo.yaml",
                    config=config, **short)
        rank0, rank1 = (load_file(tmp_path / f"{name}_ranks" / f"rank{r}.safetensors") for r in (0, 1))
        assert {k.split(".")[0] for k in rank0} >= {"r1", "scale", "clip", "wclip"}
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), name
        runs[name] = tmp_path / name
    for file in (ROTATIONS_FILE, SCALES_FILE, ACTIVATION_CLIPS_FILE, WEIGHT_CLIPS_FILE):
        a, b = (load_file(runs[n] / file) for n in ("fsdp", "ddp"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    rows, ddp_rows = (json.loads((runs[n] / "metrics.json").read_text())["rows"] for n in ("fsdp", "ddp"))
    assert rows.keys() == ddp_rows.keys() and len(rows) == 3  # float, the start, learned
    assert all(value == pytest.approx(ddp_rows[label], rel=1e-5) for label, value in rows.items()), (rows, ddp_rows)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(runs["fsdp"] / "model").eval()(input_ids=ids).logits
        original = AutoModelForCausalLM.from_pretrained(demo / "model").eval()(input_ids=ids).logits
    assert rel_err(exported, original) <= 1e-4


def test_fsdp_on_a_model_with_custom_code(assets, tmp_path):
    """model.trust_remote_code under FSDP: rank 1 rebuilds rank 0's model from a pickled copy, so it must know the
    model's own classes too (its checks import them); the run learns and its fused model computes the original's
    function with the custom class."""
    from transformers import AutoModelForCausalLM

    src = save_remote_code_model_dir(tmp_path / "custom")
    out = tmp_path / "out"
    launch_fsdp(assets, out, tmp_path / "ranks", **{"model.path": src, "model.trust_remote_code": "true",
                                                    "export.schemes": "[]", "eval.baselines": "false"})
    rank0, rank1 = (load_file(tmp_path / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    with torch.no_grad():
        fused = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True).eval()
        original = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
        assert type(fused).__name__ == "CustomForCausalLM"
        assert rel_err(fused(input_ids=IDS).logits, original(input_ids=IDS).logits) <= 1e-4


# ------------------------------------------------------------------------------------ without processes
def test_the_fsdp_request_is_claimed_from_accelerate(monkeypatch):
    for key in (distributed.FSDP_ENV, distributed.FSDP_VERSION_ENV, distributed.CLAIMED_ENV,
                distributed.WRAP_POLICY_ENV, *distributed.UNSUPPORTED_WHEN_TRUE):
        monkeypatch.setenv(key, "")  # recorded, so that the claim's own writes are undone after the test
        monkeypatch.delenv(key)
    assert distributed.claim_fsdp_request() is False  # a plain launch: nothing to claim
    monkeypatch.setenv(distributed.FSDP_ENV, "true")
    monkeypatch.setenv(distributed.FSDP_VERSION_ENV, "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        distributed.claim_fsdp_request()
    monkeypatch.setenv(distributed.FSDP_VERSION_ENV, "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="fsdp_offload_params"):  # refused, not silently ignored
        distributed.claim_fsdp_request()
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    assert distributed.claim_fsdp_request() is True
    assert os.environ[distributed.FSDP_ENV] == "false"  # accelerate sets up plain data parallelism
    assert distributed.claim_fsdp_request() is True  # a second job in the same process still shards


def test_decoder_layer_classes_come_from_the_model_or_the_config(monkeypatch):
    from helpers import tiny_model

    model = tiny_model("llama")
    monkeypatch.delenv(distributed.LAYER_CLS_ENV, raising=False)
    assert {c.__name__ for c in distributed.decoder_layer_classes(model)} == {"LlamaDecoderLayer"}
    monkeypatch.setenv(distributed.LAYER_CLS_ENV, "LlamaDecoderLayer,NoSuchLayer")
    with pytest.raises(ValueError, match="NoSuchLayer"):
        distributed.decoder_layer_classes(model)


def test_ranks_that_drifted_apart_are_caught(tmp_path):
    """Two gloo ranks (torchrun): identical banks pass the check; one flipped bit on rank 1 fails it on both."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "replicated_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"identical": "passed",
                                                                          "one_bit_off": "raised"}


def test_the_full_weights_fully_shard_replaced_are_released():
    """Without this every rank would keep all full weights alive through the old parameter objects."""
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    whole = list(model.parameters())
    replaced = model[0].weight
    holder = [replaced]  # e.g. the rotation plan's reference to the target weight
    model[0].weight = nn.Parameter(torch.zeros(4, 8))  # what fully_shard does: a new (sharded) parameter
    distributed._free_replaced(whole, model)
    assert holder[0].numel() == 0 and holder[0].shape == (0,)
    assert model[0].weight.shape == (4, 8) and model[1].weight.shape == (8, 8)  # live parameters untouched
