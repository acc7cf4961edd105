"""One rotation-training step against a plain float forward+backward: time and peak memory, on CPU.

    python launch/bench_train.py                        # ~20M Llama, seqlen 512 and 2048, batch 1, 1 thread
    python launch/bench_train.py --seqlens 512 --profile  # also: where the rotation step spends its time
    python launch/bench_train.py --modes rotation_learned_kl rotation_learned_kl_rotated  # some rows (+ float)
    python launch/bench_train.py --checkpointing          # rotation step with / without gradient checkpointing
    python launch/bench_train.py --distributed --seqlens 512  # RotationTrainer steps, 2 CPU ranks: DDP vs FSDP
    python launch/bench_train.py --gpu                    # Llama-3-8B's config, random bf16 weights, one CUDA GPU

The model is a ~20M-parameter Llama built from a config (hidden 256, 4 layers, 8 heads / 2 KV heads, MLP 1024,
vocab 32000, untied lm_head), random weights, batch 1. Each measurement runs in its own child process (model
build, one warm-up step, then the median of --repeats timed steps), so that its peak RSS (VmHWM) is its own:

  * float fwd+bwd      the standard baseline: every weight requires grad, loss.backward() computes all weight
                       gradients (no optimizer). The rotation step needs the same passes: the gradient of every
                       rotated weight R_out^T W R_in must be formed to reach the rotations.
  * float fwd+bwd, emb only requires_grad on the input embedding only: backprop through the whole network but
                       (almost) no weight gradients; a lower bound, shown for reference.
  * rotation step      what RotationTrainer does per step: W4A4KV4 fake quantization (weights per channel,
                       activations per token, K/V per head), R1 + per-layer R2 computed into the weights on the
                       fly, online R3/R4 Hadamards, CE loss, backward to the rotations, gradient clipping at 1.0
                       and a Cayley SGD step (with the per-step polar re-orthonormalisation).
  * + learned          the W4A4KV4 step with what the shipped recipes learn beside the matrices: per-channel
                       scales, one clip ratio per activation input and per weight row (Adam)
  * + KL               that step trained on the KL to the float teacher (the demo recipe's loss: one more forward,
                       no backward): the teacher as RotationTrainer computes it (every wrapper passed through, a
                       plain float forward: fakequant.float_passthrough), and through the rotated weights with the
                       quantizers off (what the trainer did before: every rotated weight recomputed for it)
  * W16A4KV4           the same with 16-bit weights (recipes that run GPTQ after training), once with the matrices
                       computed into the weights and once on the activations around each quantizer
                       (``rotation.apply: activations``, the default for such recipes: spinlearn.activation_side).

Target (issue): rotation step <= 1.5x the float fwd+bwd in time and in peak memory at seqlen 2048.

--checkpointing measures only the rotation step, without and with non-reentrant gradient checkpointing of every
decoder layer (``train.gradient_checkpointing: true``): the layers' activations and rotated weights are recomputed
in the backward pass instead of being kept, trading time for peak memory.

--distributed runs RotationTrainer (the job's trainer, same rotation step) on 2 CPU ranks over gloo, once with
accelerate_configs/cpu_2proc.yaml (DDP: every rank holds every weight) and once with cpu_2proc_fsdp.yaml (FSDP2:
each rank holds half of the frozen weights, one unit per decoder layer gathered for its forward and backward; only
rank 0 builds the whole model, as in the job: spinlearn.sharded). Per rank: seconds per step, RSS once the model is
ready (after sharding), the largest RSS at a step's end, and VmHWM (which includes building the model). The
children run with MALLOC_MMAP_THRESHOLD_=65536 so that freed weights leave the RSS (glibc would otherwise keep them
in its heap).
--layers N changes the model's depth in every mode.

--gpu builds a random-weight model from --model-config (default: launch/configs/llama3_8b/config.json, Llama-3-8B)
in bfloat16 on the first CUDA GPU and measures, at --seqlens (default 2048) and --batch: the float forward+backward
(every weight's gradient), the rotation step with float32 rotation products, the same with TF32 products
(``train.tf32: true``), the latter with gradient checkpointing, and with learned scales and clip ratios too; then
W16A4KV4 steps with the matrices on the weights (TF32) and on the activations. Peak =
torch.cuda.max_memory_allocated of the measuring process, set beside `spinlearn plan`'s estimate for the same
settings (single process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# mode -> what the table calls it; the rotation modes' quantizers and where their matrices act
MODES = {
    "float": "float fwd+bwd",
    "float_emb": "float fwd+bwd, emb grad only",
    "rotation": "rotation step, W4A4KV4 (weights)",
    "rotation_learned": "rotation step, W4A4KV4 + learned scales and clip ratios (the recipes')",
    "rotation_learned_kl": "the same on the KL to the float teacher (the demo recipe's loss)",
    "rotation_learned_kl_rotated": "the same, teacher through the rotated weights, quantizers off (before)",
    "rotation_w16": "rotation step, W16A4KV4 on the weights",
    "rotation_w16_act": "rotation step, W16A4KV4 on the activations",
}
W4A4KV4, W16A4KV4 = dict(w_bits=4, a_bits=4, kv_bits=4), dict(a_bits=4, kv_bits=4)
ROTATION_QUANT = {"rotation": W4A4KV4, "rotation_learned": W4A4KV4, "rotation_learned_kl": W4A4KV4,
                  "rotation_learned_kl_rotated": W4A4KV4, "rotation_w16": W16A4KV4, "rotation_w16_act": W16A4KV4}
# the KL modes' teacher: RotationTrainer's (every wrapper passed through: a plain float forward), or the rotated
# float model the trainer used before (the quantizers off, every rotated weight recomputed)
KL_TEACHER = {"rotation_learned_kl": "passthrough", "rotation_learned_kl_rotated": "rotated"}
MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


GPU_CONFIG = Path(__file__).resolve().parent / "configs" / "llama3_8b" / "config.json"
# label -> the rotation step's settings; "float" is the plain forward+backward
GPU_MODES = {
    "float fwd+bwd": dict(mode="float"),
    "rotation, fp32 products": dict(mode="rotation"),
    "rotation, tf32": dict(mode="rotation", tf32=True),
    "rotation, tf32, checkpointing": dict(mode="rotation", tf32=True, checkpointing=True),
    "rotation + scales + clips, tf32, checkpointing": dict(mode="rotation", tf32=True, checkpointing=True,
                                                           scales=True),
    "the same on the KL to the float teacher": dict(mode="rotation_learned_kl", tf32=True, checkpointing=True,
                                                    scales=True),
    "W16A4KV4 rotation on the weights, tf32": dict(mode="rotation_w16", tf32=True),
    "W16A4KV4 rotation on the activations": dict(mode="rotation_w16_act"),
}


def build_model(layers: int | None = None, config: str | None = None, device: str = "cpu", dtype: str = "float32"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(config) if config else LlamaConfig(**MODEL)
    if layers:
        cfg.num_hidden_layers = layers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_step(mode: str, model, ids, r3: bool, r4: bool, scales: bool = False):
    """A closure running one step of `mode` on `model` (prepared as that mode needs); ``scales``: learned scales
    and activation and weight clip ratios beside the rotations (Adam, as RotationTrainer does); the KL modes train
    on RotationTrainer's KL to the float teacher instead of the cross-entropy (``KL_TEACHER``)."""
    import torch
    from torch.nn.utils import parametrize

    if mode in ("float", "float_emb"):
        for name, p in model.named_parameters():
            p.requires_grad_(mode == "float" or name == "model.embed_tokens.weight")

        def step() -> float:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()

        return step

    from spinlearn.losses import kl_teacher_student, training_loss
    from spinlearn.fakequant import activation_clip_params, rotations_attached, weight_clip_params
    from spinlearn.online import online_linears
    from spinlearn.optim import MultiOptimizer
    from spinlearn.quant import QuantSettings, quantizers_disabled
    from spinlearn.rotation_plan import make_matrices, prepare_model
    from spinlearn.scales import ScaleBank, plan_scales
    from spinlearn.trainer import make_optimizer

    plan = prepare_model(model, "transformer_universal")
    quant = QuantSettings.from_flags(**ROTATION_QUANT[mode])
    on_activations = mode == "rotation_w16_act"
    bank_scales = ScaleBank(plan_scales(model, plan, log=False, head_quantized=False)) if scales else None
    attached = rotations_attached(model, plan, make_matrices(plan, mode="hadamard", seed=0), quant=quant, r3=r3,
                                  online=online_linears(model, r4=r4), scales=bank_scales, learn_a_clip=scales,
                                  learn_w_clip=scales and quant.w.enabled, rotate_activations=on_activations)
    bank = attached.__enter__().bank  # stays attached for the life of this benchmark process
    params = list(bank.parameters())
    opt = make_optimizer("cayley_sgd", params, lr=1.5, momentum=0.9)
    extra = ([*bank_scales.parameters(), *activation_clip_params(model).values(), *weight_clip_params(model).values()]
             if scales else [])
    if extra:
        opt = MultiOptimizer([opt, torch.optim.Adam(extra, lr=1e-2, foreach=False)])

    def loss_of_step() -> torch.Tensor:
        if KL_TEACHER.get(mode) != "rotated":  # RotationTrainer's loss, cross-entropy or the KL alone
            return training_loss(model, ids, ce_weight=float(mode not in KL_TEACHER),
                                 kl_weight=float(mode in KL_TEACHER))[0]
        student = model(input_ids=ids, use_cache=False).logits
        with torch.no_grad(), quantizers_disabled(model):
            target = model(input_ids=ids, use_cache=False).logits
        return kl_teacher_student(target, student)

    def step() -> float:
        loss = loss_of_step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + extra, 1.0)  # the Trainer's max_grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # The step must own the attachment: a generator context manager nobody references is closed by the garbage
    # collector, which removes the wrappers (the step would then time the plain model).
    step.attached = attached
    rotated = any(parametrize.is_parametrized(m) for m in model.modules()) if not on_activations else any(
        getattr(m, "basis", None) is not None for m in model.modules())
    if not rotated:
        raise RuntimeError(f"the rotation step's model has no rotated {'activations' if on_activations else 'weights'}")
    return step


def enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer (transformers renamed the method in 5.x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def child(spec: dict) -> dict:
    """Runs in a fresh process: build, warm up, time `repeats` steps; report times and memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    cuda = device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = bool(spec.get("tf32"))  # what TrainingArguments(tf32=True) sets
    model = build_model(spec.get("layers"), spec.get("config"), device, spec.get("dtype", "float32"))
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (spec.get("batch", 1), spec["seqlen"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    step = make_step(spec["mode"], model, ids, spec["r3"], spec["r4"], scales=spec.get("scales", False))
    if spec.get("checkpointing"):
        enable_checkpointing(model)
        model.train()  # decoder layers checkpoint in training mode only (Llama has no dropout: same math)
    rss_ready = _status_mb("VmRSS")
    step()  # warm-up (allocator, one-time setup)
    times = []
    for _ in range(spec["repeats"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()  # loss.item() synchronises
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    out = {"median_s": statistics.median(times), "times_s": times, "peak_mb": peak, "ready_mb": rss_ready,
           "params": n_params}
    if spec.get("profile"):
        out["profile"] = profile_step(step)
    return out


def profile_step(step, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def measure(mode: str, seqlen: int, args, checkpointing: bool = False) -> dict:
    spec = dict(mode=mode, seqlen=seqlen, threads=args.threads, repeats=args.repeats, r3=not args.no_r3,
                r4=not args.no_r4, profile=args.profile and mode.startswith("rotation"), checkpointing=checkpointing,
                layers=args.layers, scales=mode.startswith("rotation_learned"))
    try:
        return _run_child(spec)
    except RuntimeError as e:
        raise RuntimeError(f"{mode} at seqlen {seqlen} failed:\n{e}") from None


def _run_child(spec: dict) -> dict:
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkpointing_table(args) -> int:
    """The rotation step without and with gradient checkpointing, per seqlen: time and peak RSS."""
    rows = []
    for seqlen in args.seqlens:
        plain, ckpt = (measure("rotation", seqlen, args, checkpointing=c) for c in (False, True))
        rows.append((seqlen, plain, ckpt))
        print(f"# seqlen {seqlen}: without {plain['median_s']:.3f} s {plain['peak_mb']:.0f} MiB, "
              f"with {ckpt['median_s']:.3f} s {ckpt['peak_mb']:.0f} MiB", flush=True)
    layers = args.layers or MODEL["num_hidden_layers"]
    print(f"\nLlama {rows[0][1]['params'] / 1e6:.1f}M params (hidden 256, {layers} layers, vocab 32000), batch 1, "
          f"{args.threads} thread(s), median of {args.repeats} steps; rotation step as in the main table. "
          "Peak = VmHWM of the measuring process.\n")
    print("| seqlen | rotation step | with checkpointing | time ratio | peak RSS | peak RSS with checkpointing "
          "| memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for seqlen, p, c in rows:
        print(f"| {seqlen} | {p['median_s']:.3f} s | {c['median_s']:.3f} s | {c['median_s'] / p['median_s']:.2f}x | "
              f"{p['peak_mb']:.0f} MiB | {c['peak_mb']:.0f} MiB | {c['peak_mb'] / p['peak_mb']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({f"rotation{'+ckpt' * c}@{s}": r for s, p, k in rows
                                         for c, r in ((False, p), (True, k))}, indent=2))
    return 0


DIST_CONFIGS = {"DDP": "cpu_2proc.yaml", "FSDP": "cpu_2proc_fsdp.yaml"}


def dist_child(spec: dict) -> dict:
    """One rank under accelerate launch: RotationTrainer for repeats + 1 steps (the first is the warm-up)."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from spinlearn.data import TokenBlockDataset
    from spinlearn.distributed import claim_fsdp_request, mark_sharded
    from spinlearn.fakequant import check_online_hadamards, rotations_attached
    from spinlearn.quant import QuantSettings
    from spinlearn.rotation_plan import make_matrices, prepare_model
    from spinlearn.sharded import shard_and_fill, skeleton
    from spinlearn.trainer import RotationTrainer

    class StepProbe(TrainerCallback):
        def __init__(self):
            self.times, self.rss = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.rss.append(_status_mb("VmRSS"))

    torch.set_num_threads(spec["threads"])
    fsdp = claim_fsdp_request()
    args = TrainingArguments(output_dir=spec["out"], max_steps=spec["repeats"] + 1, per_device_train_batch_size=1,
                             learning_rate=1.5, save_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=True, remove_unused_columns=False, ddp_find_unused_parameters=False,
                             disable_tqdm=True)
    # DDP: every rank builds the whole model. FSDP: only rank 0 does (the job's path, spinlearn.sharded); every rank
    # trains a sharded view filled from it.
    model = build_model(spec.get("layers")) if args.process_index == 0 or not fsdp else None
    plan = prepare_model(model, "transformer_universal") if model is not None else None
    view, view_plan = skeleton(model, plan) if fsdp else (model, plan)
    online = check_online_hadamards(view, r3=spec["r3"], r4=spec["r4"])
    blocks = torch.randint(0, MODEL["vocab_size"], (2 * (spec["repeats"] + 1), spec["seqlen"]),
                           generator=torch.Generator().manual_seed(0))
    probe = StepProbe()
    with rotations_attached(view, view_plan, make_matrices(view_plan, mode="hadamard", seed=0),
                            quant=QuantSettings.from_flags(w_bits=4, a_bits=4, kv_bits=4), r3=spec["r3"],
                            online=online) as handle:
        if fsdp:
            shard_and_fill(view, model, args.device)
        trainer = RotationTrainer(model=view, args=args, train_dataset=TokenBlockDataset(blocks), bank=handle.bank,
                                  callbacks=[probe])
        if fsdp:
            mark_sharded(trainer, list(handle.bank.parameters()))
        ready = _status_mb("VmRSS")
        trainer.train()
    result = {"rank": args.process_index, "median_s": statistics.median(probe.times[1:]), "ready_mb": ready,
              "step_rss_mb": max(probe.rss), "peak_mb": _status_mb("VmHWM")}
    Path(spec["out"], f"rank{args.process_index}.json").write_text(json.dumps(result))
    return result


def distributed_table(args) -> int:
    """DDP vs FSDP on 2 CPU ranks, per seqlen: seconds per step and memory per rank."""
    import socket
    import tempfile

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(root), WANDB_MODE="disabled")
    rows = []
    for seqlen in args.seqlens:
        for name, config in DIST_CONFIGS.items():
            with socket.socket() as sock:  # a free port, released before the launch binds it
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            with tempfile.TemporaryDirectory() as out:
                spec = dict(seqlen=seqlen, threads=args.threads, repeats=args.repeats, r3=not args.no_r3,
                            r4=not args.no_r4, layers=args.layers, out=out)
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(root / "accelerate_configs" / config), "--main_process_port", str(port), __file__,
                       "--dist-child", json.dumps(spec)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} at seqlen {seqlen} failed:\n{proc.stderr[-4000:]}")
                ranks = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
            rows.append((seqlen, name, ranks))
            print(f"# {name} seqlen {seqlen}: {ranks}", flush=True)
    layers = args.layers or MODEL["num_hidden_layers"]
    print(f"\nLlama (hidden 256, {layers} layers, vocab 32000), 2 CPU ranks over gloo, batch 1 per rank, "
          f"{args.threads} thread(s) each, median of {args.repeats} steps (after one warm-up); memory per rank "
          "(FSDP: rank 0 holds the whole model besides its shard, rank 1 only its shard).\n")
    print("| seqlen | strategy | s / step | RSS model ready, rank 0 / 1 | RSS at step end, rank 0 / 1 "
          "| peak RSS (incl. loading), rank 0 / 1 |")
    print("|---|---|---|---|---|---|")
    for seqlen, name, ranks in rows:
        by = {r["rank"]: r for r in ranks}
        cell = {k: f"{by[0][k]:.0f} / {by[1][k]:.0f} MiB" for k in ("ready_mb", "step_rss_mb", "peak_mb")}
        print(f"| {seqlen} | {name} | {max(r['median_s'] for r in ranks):.3f} | {cell['ready_mb']} "
              f"| {cell['step_rss_mb']} | {cell['peak_mb']} |")
    if args.json:
        args.json.write_text(json.dumps({f"{n}@{s}": r for s, n, r in rows}, indent=2))
    return 0


def plan_estimate_gib(config: str, seqlen: int, batch: int, dtype: str, ckpt: bool) -> float:
    """`spinlearn plan`'s single-process estimate (GiB) for the bench's rotation step."""
    from spinlearn.memplan import GIB, Settings, estimate, load_config, model_shape

    st = Settings(dtype=dtype, seqlen=seqlen, batch=batch, gradient_checkpointing=ckpt, momentum=0.9)
    return estimate(model_shape(load_config(config), st.layout), st, "single")["total"] / GIB


def gpu_table(args) -> int:
    """Llama-3-8B-sized (or --model-config) random bf16 model on one CUDA GPU: float fwd+bwd vs rotation steps."""
    import torch

    if not torch.cuda.is_available():
        print("--gpu: no CUDA device here", file=sys.stderr)
        return 2
    config = str(args.model_config or GPU_CONFIG)
    rows = []
    for seqlen in args.seqlens:
        for label, mode in GPU_MODES.items():
            spec = dict(seqlen=seqlen, threads=args.threads, repeats=args.repeats, r3=not args.no_r3,
                        r4=not args.no_r4, layers=args.layers, config=config, device="cuda", dtype="bfloat16",
                        batch=args.batch, **mode)
            try:
                r = _run_child(spec)
            except RuntimeError as e:  # e.g. out of memory: the row says so, the others still run
                r = {"error": str(e).strip().splitlines()[-1][:120]}
            if mode["mode"] == "rotation":  # the plan models weight-side steps
                r["plan_gib"] = plan_estimate_gib(config, seqlen, args.batch, "bfloat16",
                                                  bool(mode.get("checkpointing")))
            rows.append((seqlen, label, r))
            print(f"# {label} seqlen {seqlen}: {r}", flush=True)
    name = json.loads(Path(config).read_text()).get("architectures", ["?"])[0]
    params = next((r["params"] for _, _, r in rows if "params" in r), 0)
    print(f"\n{name} from {config} ({params / 1e9:.2f}B params, random weights), bfloat16 on "
          f"{torch.cuda.get_device_name(0)}, batch {args.batch}, median of {args.repeats} steps after one warm-up; "
          "rotation step = W4A4KV4 fake quantization, R1+R2 learned, R3+R4 online Hadamards, Cayley SGD. "
          "Peak = torch.cuda.max_memory_allocated; plan = `spinlearn plan`'s single-process estimate.\n")
    print("| seqlen | step | s / step | vs float fwd+bwd | peak GiB | plan GiB |")
    print("|---|---|---|---|---|---|")
    for seqlen, label, r in rows:
        base = next(x for s, l, x in rows if s == seqlen and l == "float fwd+bwd")
        if "error" in r:
            print(f"| {seqlen} | {label} | failed: {r['error']} | | | {r.get('plan_gib', 0):.1f} |")
            continue
        ratio = f"{r['median_s'] / base['median_s']:.2f}x" if "median_s" in base else ""
        plan = f"{r['plan_gib']:.1f}" if "plan_gib" in r else ""
        print(f"| {seqlen} | {label} | {r['median_s']:.3f} | {ratio} | {r['peak_mb'] / 1024:.1f} | {plan} |")
    if args.json:
        args.json.write_text(json.dumps({f"{l}@{s}": r for s, l, r in rows}, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", help="default: 512 2048 (--gpu: 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-r3", action="store_true", help="rotation step without the online R3 Hadamard")
    parser.add_argument("--no-r4", action="store_true", help="rotation step without the online R4 Hadamard")
    parser.add_argument("--profile", action="store_true", help="print the rotation step's top ops (torch.profiler)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="only the rotation step, without and with gradient checkpointing (peak RSS, time)")
    parser.add_argument("--distributed", action="store_true",
                        help="RotationTrainer on 2 CPU ranks, DDP vs FSDP (seconds per step, RSS per rank)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="the CPU table's rows (default: all; the first float row is the ratios' baseline)")
    parser.add_argument("--layers", type=int, help=f"decoder layers (default {MODEL['num_hidden_layers']})")
    parser.add_argument("--gpu", action="store_true",
                        help="one CUDA GPU, bf16, --model-config's model: float fwd+bwd vs rotation steps")
    parser.add_argument("--model-config", type=Path, help=f"config.json for --gpu (default {GPU_CONFIG.name} of "
                        "launch/configs/llama3_8b)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (--gpu)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dist-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seqlens = args.seqlens or ([2048] if args.gpu else [512, 2048])
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.dist_child:
        dist_child(json.loads(args.dist_child))
        return 0
    if args.gpu:
        return gpu_table(args)
    if args.distributed:
        return distributed_table(args)
    if args.checkpointing:
        return checkpointing_table(args)

    modes = ["float", *(m for m in args.modes if m != "float")]  # the float row is every ratio's baseline
    results: dict = {}
    for seqlen in args.seqlens:
        for mode in modes:
            r = measure(mode, seqlen, args)
            results[f"{mode}@{seqlen}"] = r
            print(f"# {mode:9s} seqlen {seqlen:5d}: median {r['median_s']:.3f} s "
                  f"({', '.join(f'{t:.3f}' for t in r['times_s'])}), peak RSS {r['peak_mb']:.0f} MiB", flush=True)
            if "profile" in r:
                print(r["profile"], flush=True)

    params = next(iter(results.values()))["params"]
    online = "+".join(x for x, off in (("R3", args.no_r3), ("R4", args.no_r4)) if not off) or "no"
    layers = args.layers or MODEL["num_hidden_layers"]
    print(f"\nLlama {params / 1e6:.1f}M params (hidden 256, {layers} layers, GQA 8/2 heads, vocab 32000), batch 1, "
          f"{args.threads} thread(s), median of {args.repeats} steps; rotation steps: R1+R2 learned, {online} online "
          "Hadamards, Cayley SGD. Peak = VmHWM of the measuring process.\n")
    print("| seqlen | step | s / step | vs float fwd+bwd | peak RSS | memory vs float |")
    print("|---|---|---|---|---|---|")
    for seqlen in args.seqlens:
        f = results[f"float@{seqlen}"]
        for mode in modes:
            label = MODES[mode]
            r = results[f"{mode}@{seqlen}"]
            print(f"| {seqlen} | {label} | {r['median_s']:.3f} | {r['median_s'] / f['median_s']:.2f}x | "
                  f"{r['peak_mb']:.0f} MiB | {r['peak_mb'] / f['peak_mb']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
