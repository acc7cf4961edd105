"""spinlearn.memplan and `spinlearn plan`: parameter counts from a config alone, the estimate against the measured
peak memory of real training steps on CPU, the per-strategy arithmetic and the printed table."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from spinlearn import memplan
from spinlearn.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
# Public parameter counts (the model cards' 8.03B / 70.6B, exactly).
LLAMA3_PARAMS = {"llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496}
SMALL = dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
MEDIUM = dict(SMALL, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, vocab_size=16000)
TOLERANCE = 0.25


def _recipe(tmp_path: Path, seqlen: int, batch: int, *, ckpt: bool = False, dtype: str = "float32",
            w_bits: int = 4, loss: str = "ce") -> Path:
    """``loss``: ``ce`` (the schema's), ``kl`` (the demo recipe's: the KL to the float teacher alone) or both."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"loss: {{ce_weight: {float('ce' in loss.split('+'))}, kl_weight: {float('kl' in loss.split('+'))}}}\n" +
        f"model: {{path: unused, dtype: {dtype}}}\n"
        f"data: {{train: unused.txt, seqlen: {seqlen}}}\n"
        f"quant: {{w_bits: {w_bits}, a_bits: 4, kv_bits: 4}}\n"
        "rotation: {layout: transformer_universal, r3: true, r4: true, optimizer: cayley_sgd, momentum: 0.0}\n"
        f"train: {{max_steps: 2, per_device_train_batch_size: {batch}, gradient_checkpointing: {str(ckpt).lower()}}}\n"
        "output_dir: unused\n"
    )
    return path


def _model_dir(tmp_path: Path, values: dict) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(values))
    return d


# ------------------------------------------------------------------ the measured step (runs in a child process)
def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(spec: dict) -> dict:
    """Training-like steps as RotationTrainer runs them (its loss, ``losses.training_loss``, on the W4A4KV4 model,
    backward to the rotations, clipping, Cayley SGD); peak RSS minus the RSS after the imports."""
    import torch
    from transformers import AutoModelForCausalLM

    from spinlearn.activation_side import resolve_apply
    from spinlearn.config import load_recipe
    from spinlearn.losses import training_loss
    from spinlearn.fakequant import rotations_attached
    from spinlearn.online import online_linears
    from spinlearn.quant import QuantSettings
    from spinlearn.rotation_plan import make_matrices, prepare_model
    from spinlearn.trainer import make_optimizer

    torch.set_num_threads(1)
    baseline = _peak_mib()
    cfg = load_recipe(spec["recipe"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(memplan.load_config(spec["model"]),
                                             dtype=getattr(torch, cfg.model.dtype)).train()
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    plan = prepare_model(model, cfg.rotation.layout)
    ids = torch.randint(0, model.config.vocab_size, (cfg.train.per_device_train_batch_size, cfg.data.seqlen))
    online = online_linears(model, cfg.rotation.online, r4=cfg.rotation.r4)
    quant = QuantSettings.from_recipe(cfg.quant)
    on_activations = resolve_apply(cfg.rotation.apply, quant.w.enabled or quant.lm_head.enabled)
    with rotations_attached(model, plan, make_matrices(plan, mode=cfg.rotation.init, seed=0), quant=quant,
                            r3=cfg.rotation.r3, online=online, rotate_activations=on_activations) as h:
        params = list(h.bank.parameters())
        opt = make_optimizer(cfg.rotation.optimizer, params, lr=1.5, momentum=cfg.rotation.momentum)

        for _ in range(spec["steps"]):
            training_loss(model, ids, ce_weight=cfg.loss.ce_weight, kl_weight=cfg.loss.kl_weight)[0].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"peak_mib": _peak_mib() - baseline}


def _forked(spec: dict) -> dict:
    """Run ``_child(spec)`` in a fork of this process (the imports are paid once) and return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fork: its own peak RSS, counted from its start
        os.close(read_fd)
        try:
            os.write(write_fd, json.dumps(_child(spec)).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if not out or status != 0:
        raise RuntimeError(f"measurement {spec} failed (status {status})")
    return json.loads(out)


def measure_peak_mib(runs: list[tuple[Path, Path]], steps: int = 1) -> list[float]:
    """Peak RSS (MiB, minus the baseline after the imports) of ``steps`` training steps for each (model dir,
    recipe), each in a fork of one child process that imported torch and transformers once."""
    # A fixed mmap threshold makes glibc hand freed large blocks back at once, so RSS follows the live tensors
    # (as the plan counts them) instead of the heap's high-water mark.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    specs = json.dumps([{"model": str(m), "recipe": str(r), "steps": steps} for m, r in runs])
    proc = subprocess.run([sys.executable, __file__, specs], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["peak_mib"] for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _estimate_mib(model_dir: Path, recipe: Path) -> float:
    plan = memplan.make_plan(model_dir, recipe, overhead_gib=memplan.CPU_OVERHEAD_GIB)  # a CPU process, no CUDA
    key = "checkpointing_on" if plan["settings"]["gradient_checkpointing"] else "checkpointing_off"
    return plan["estimates"]["single"][key]["total"] * 1024


def _check_estimates(tmp_path: Path, cases: dict[str, tuple]) -> None:
    runs = {}
    for name, (values, seqlen, batch, kw) in cases.items():
        d = tmp_path / name
        d.mkdir()
        runs[name] = (_model_dir(d, values), _recipe(d, seqlen, batch, **kw))
    measured = dict(zip(runs, measure_peak_mib(list(runs.values()))))
    estimated = {name: _estimate_mib(*run) for name, run in runs.items()}
    for name in runs:
        assert abs(estimated[name] - measured[name]) <= TOLERANCE * measured[name], (name, estimated, measured)


def test_estimate_within_25_percent_of_measured_cpu_peak(tmp_path):
    """Two model sizes (20M parameters with a 32000 vocabulary; 2 wider layers, 16000 vocabulary, batch 2), and the
    20M one at 1024 tokens on the KL alone and on cross-entropy + KL, where the logits' copies are about half of
    the peak."""
    _check_estimates(tmp_path, {"20M": (SMALL, 256, 1, {}), "wide": (MEDIUM, 128, 2, {}),
                                "20M-kl": (SMALL, 1024, 1, {"loss": "kl"}),
                                "20M-ce+kl": (SMALL, 1024, 1, {"loss": "ce+kl"})})


def test_estimate_on_the_activations_within_25_percent_of_measured_cpu_peak(tmp_path):
    """W16A4KV4 (rotation.apply auto: the matrices on the activations, no rotated weights), two sizes."""
    _check_estimates(tmp_path, {"20M-w16": (SMALL, 256, 1, {"w_bits": 16}),
                                "wide-w16": (MEDIUM, 512, 2, {"w_bits": 16})})


@pytest.mark.slow
def test_estimate_bf16_long_sequences_and_checkpointing(tmp_path):
    _check_estimates(tmp_path, {"bf16": (SMALL, 256, 1, {"dtype": "bfloat16"}), "long": (SMALL, 1024, 1, {}),
                                "long-ckpt": (SMALL, 1024, 1, {"ckpt": True})})


# ------------------------------------------------------------------------------------- config alone, counts
@pytest.mark.parametrize("name", sorted(LLAMA3_PARAMS))
def test_parameter_counts_from_config_alone(name):
    shape = memplan.model_shape(memplan.load_config(CONFIGS / name))  # a directory holding only config.json
    assert shape.params == LLAMA3_PARAMS[name]
    layers = {"llama3_8b": 32, "llama3_70b": 80}[name]
    hidden = {"llama3_8b": 4096, "llama3_70b": 8192}[name]
    assert shape.layers == layers and len(set(shape.layer_params)) == 1
    assert shape.rotation_sizes == [hidden] + [128] * layers  # R1 and one R2 (head_dim 128) per layer
    assert shape.head_params == shape.embed_params == 128256 * hidden


@pytest.mark.parametrize("family", ["llama", "mixtral", "nemotron_h", "opt", "phi3"])
def test_counts_match_a_real_model(tmp_path, family):
    from tests.helpers import layout_for, tiny_model

    model = tiny_model(family)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(model.config.to_json_string())
    shape = memplan.model_shape(memplan.load_config(cfg_file), layout_for(family))  # the json file's path works too
    real = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert shape.params == real + (model.get_input_embeddings().weight.numel() if tied else 0)  # untied by a copy
    layers = model.get_decoder().layers
    assert shape.layer_params == [sum(p.numel() for p in layer.parameters()) for layer in layers]
    cfg = model.config
    expected = cfg.intermediate_size * cfg.num_experts_per_tok if family == "mixtral" else \
        getattr(cfg, "intermediate_size", None) or cfg.ffn_dim
    assert shape.widths["intermediate"] == expected  # MoE: the top-k experts each token runs through


def test_a_model_with_custom_code_is_planned_with_its_own_classes(tmp_path):
    """A config.json with auto_map: decoded and built with the model's own classes when the recipe trusts its code
    (model.trust_remote_code), counted like the same architecture without custom code; refused otherwise."""
    from tests.helpers import save_remote_code_model_dir, save_tiny_model_dir

    src = save_remote_code_model_dir(tmp_path / "custom")
    recipe = ROOT / "recipes" / "demo.yaml"
    plan = memplan.make_plan(src, recipe, overrides=["model.trust_remote_code=true"])
    assert plan["architecture"] == "CustomForCausalLM"
    plain = memplan.make_plan(save_tiny_model_dir(tmp_path / "plain", "llama"), recipe)
    assert plan["params"] == plain["params"] and plan["estimates"] == plain["estimates"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        memplan.make_plan(src, recipe)


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        memplan.load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="model_type"):
        memplan.load_config(tmp_path)


# ----------------------------------------------------------------------------------------- strategies
def test_strategy_arithmetic():
    shape = memplan.model_shape(memplan.load_config(CONFIGS / "llama3_70b"))
    st = memplan.Settings(dtype="bfloat16", seqlen=2048, batch=1, gradient_checkpointing=True)
    single = memplan.estimate(shape, st, "single")
    ddp = memplan.estimate(shape, st, "ddp", 8)
    fsdp = memplan.estimate(shape, st, "fsdp", 8)
    dmap = memplan.estimate(shape, st, "device_map", 8)
    assert single["frozen weights"] == shape.params * 2 == ddp["frozen weights"]
    gathered = (memplan.FSDP_GATHERED_LAYERS * shape.layer_params[0] + shape.outer_params) * 2
    assert fsdp["frozen weights"] == pytest.approx(shape.params * 2 / 8 + gathered)
    # device map: 10 of the 80 layers per GPU; the busiest GPU is the last one (lm_head and the logits)
    assert dmap["frozen weights"] == (10 * shape.layer_params[0] + shape.outer_params - shape.embed_params) * 2
    assert dmap["logits and loss"] == single["logits and loss"] > 0
    # rotations are replicated: DDP and FSDP add the gradient all-reduce bucket
    rot = sum(n * n for n in shape.rotation_sizes) * 4
    assert ddp["rotations, gradients, optimizer state"] - single["rotations, gradients, optimizer state"] == rot
    assert fsdp["total"] < 80 * memplan.GIB < ddp["total"]  # 70B: FSDP over 8 x 80 GiB fits, DDP does not
    off = memplan.estimate(shape, st, "fsdp", 8, ckpt=False)
    assert off["activations"] > 10 * fsdp["activations"]
    assert off["rotated-weight temporaries"] > 10 * fsdp["rotated-weight temporaries"]
    assert sum(v for k, v in single.items() if k != "total") == single["total"]
    host = memplan.host_weights(shape, st, 8)  # the node's CPU memory: one copy on FSDP's rank 0, one per DDP rank
    assert host["fsdp"] == shape.params * 2 and host["ddp"] == 8 * host["fsdp"]
    with pytest.raises(ValueError, match="strategy"):
        memplan.estimate(shape, st, "zero3")


@pytest.mark.parametrize("name", ["llama3_70b", "qwen2_5_72b"])
def test_the_70b_recipes_fit_fsdp_on_8_gpus_of_80_gib(name):
    """recipes/llama3_70b_w4a4kv4.yaml, recipes/qwen2_5_72b_w4a4kv4.yaml: their first line launches FSDP over 8 GPUs,
    where the plan fits (checkpointing on, as the recipe has it) and DDP does not; rank 0 holds one copy in CPU."""
    recipe = ROOT / "recipes" / f"{name}_w4a4kv4.yaml"
    assert "accelerate_configs/8gpu_fsdp.yaml" in recipe.read_text().splitlines()[0]
    plan = memplan.make_plan(CONFIGS / name, recipe, gpus=8, gpu_mem=80)
    assert plan["settings"]["gradient_checkpointing"] and plan["params"] > 70e9
    assert plan["fits"]["fsdp"]["checkpointing_on"] and not plan["fits"]["ddp"]["checkpointing_on"]
    assert plan["host_gib"]["fsdp"] == pytest.approx(plan["params"] * 2 / memplan.GIB)
    # rank 0 alone writes the fused model and the exports while the other ranks wait in a barrier
    from spinlearn.config import load_recipe, training_arguments_kwargs

    assert training_arguments_kwargs(load_recipe(recipe))["ddp_timeout"] >= 3 * 3600


def test_cli_plan_table_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    recipe = str(ROOT / "recipes" / "llama3_8b_w4a4kv4.yaml")
    rc = cli_main(["plan", "--model", str(CONFIGS / "llama3_8b"), "--config", recipe, "--gpus", "8", "--gpu-mem", "80",
                   "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| component | single process | DDP (8) | FSDP (8) | device map (8) |" in text
    assert "**peak, checkpointing on (recipe)**" in text and "fits" in text
    plan = json.loads(out.read_text())
    assert plan["params"] == LLAMA3_PARAMS["llama3_8b"] and plan["settings"]["gradient_checkpointing"] is True
    assert set(plan["estimates"]) == set(memplan.STRATEGIES)
    assert plan["fits"]["fsdp"]["checkpointing_on"] is True
    assert "| host (CPU) memory for the weights, whole node |" in text
    assert plan["host_gib"]["ddp"] == pytest.approx(8 * plan["host_gib"]["fsdp"])
    assert cli_main(["plan", "--model", str(tmp_path), "--config", str(ROOT / "recipes/demo.yaml")]) == 2
    assert "no config.json" in capsys.readouterr().err


if __name__ == "__main__":  # the measuring child process
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  (imported once, before the forks)
    import transformers  # noqa: F401

    print(json.dumps([_forked(spec) for spec in json.loads(sys.argv[1])]))
