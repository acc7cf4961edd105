"""The ``spinlearn`` command: rotate, train, eval."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .choices import EVAL_ROTATIONS, ROTATION_MODES, WEIGHT_METHODS, check_bits

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, ConnectionError, ImportError)


def _cmd_rotate(args: argparse.Namespace) -> None:
    from .artifacts import LAYOUT_FILE, ROTATIONS_FILE, atomic_output_dir, check_output_dir, save_model_dir, save_rotations
    from .layout import load_layout
    from .loading import check_model_dir, load_causal_lm, parse_dtype
    from .rotation_plan import rotate

    # Cheap checks first: nothing is loaded or written if these fail.
    check_output_dir(args.output, args.overwrite)
    check_model_dir(args.model)
    layout = None if args.layout == "auto" else load_layout(args.layout)
    parse_dtype(args.dtype)

    t0 = time.perf_counter()
    model = load_causal_lm(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                           device=args.device)
    t_load = time.perf_counter() - t0
    if layout is None:  # --layout auto: inferred from the model, printed so the user can keep it
        from .layout_infer import infer_layout

        layout = infer_layout(model)
        print(f"# layout inferred from {type(model).__name__} (also written to OUT/layout.yaml)\n{layout.to_yaml()}")
    model, matrices = rotate(model, layout, mode=args.mode, seed=args.seed, verify=not args.no_verify)
    t_rot = time.perf_counter() - t0 - t_load
    with atomic_output_dir(args.output, args.overwrite) as tmp:
        save_model_dir(model, tmp, tokenizer_source=args.model)
        save_rotations(matrices, tmp / ROTATIONS_FILE, {"layout": layout.name, "seed": args.seed,
                                                                  "mode": args.mode or "layout"})
        resolved = layout.to_dict()
        if args.mode:
            for spec in resolved["rotation_matrices"].values():
                spec["mode"] = args.mode
        from omegaconf import OmegaConf

        # seed/mode as a comment: the file must stay a valid layout (load_layout refuses unknown keys).
        header = f"# written by spinlearn rotate --seed {args.seed} --mode {args.mode or 'layout'}\n"
        (tmp / LAYOUT_FILE).write_text(header + OmegaConf.to_yaml(OmegaConf.create(resolved)))
    t_total = time.perf_counter() - t0
    print(
        f"rotated {type(model).__name__} with layout {layout.name!r} ({len(matrices)} matrices) -> {args.output} "
        f"[load {t_load:.1f}s, rotate {t_rot:.1f}s, total {t_total:.1f}s]"
    )


def _cmd_recipes(args: argparse.Namespace) -> None:
    from .config import RECIPE_DIR, copy_recipe, recipe_command, shipped_recipes

    if args.action == "cp":
        dest = copy_recipe(args.name, args.dest, overwrite=args.overwrite)
        print(f"copied recipe {args.name!r} to {dest}; run it with: spinlearn train --config {dest}")
        return
    recipes = shipped_recipes()
    width = max(map(len, recipes), default=0)
    print(f"shipped recipes ({RECIPE_DIR}):")
    for name, path in recipes.items():
        print(f"  {name:<{width}}  {recipe_command(path)}")
    print("copy one to edit it: spinlearn recipes cp NAME DEST.yaml")


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_recipe
    from .job import run_training

    run_training(load_recipe(args.config, args.overrides))


def _check_bits(args: argparse.Namespace) -> None:
    for flag in ("w_bits", "a_bits", "kv_bits", "lm_head_bits"):
        msg = check_bits(getattr(args, flag), f"--{flag.replace('_', '-')}")
        if msg:
            raise ValueError(msg)


def _lm_eval_available() -> bool:
    import importlib.util

    return "lm_eval" in sys.modules or importlib.util.find_spec("lm_eval") is not None


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    import torch

    from .data import calibration_blocks, eval_windows, load_text, tokenize_concat
    from .evaluate import check_clips_file, evaluate_setting, learned_source, run_dir_of
    from .artifacts import load_rotations
    from .loading import check_model_dir, check_seqlen, load_tokenizer, parse_dtype
    from .quant import QuantSettings

    # Cheap checks first: nothing is loaded if these fail.
    _check_bits(args)
    for flag in ("seqlen", "nsamples", "max_windows", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v < (2 if flag == "seqlen" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} {v} is too small")
    if args.w_method == "gptq" and not args.calib_data:
        raise ValueError("--w-method gptq needs calibration data: pass --calib-data FILE (e.g. the train split)")
    if args.rotations and args.rotation != "learned":
        raise ValueError(f"--rotations goes with --rotation learned, not --rotation {args.rotation}")
    if args.activation_clips not in (None, "none"):
        check_clips_file(args.activation_clips, "activation", args.a_bits < 16 or args.kv_bits < 16)
    if args.weight_clips not in (None, "none"):
        check_clips_file(args.weight_clips, "weight", args.w_bits < 16 and (args.w_method == "gptq" or not args.w_clip))
    parse_dtype(args.dtype)
    if args.tasks and not _lm_eval_available():
        raise ImportError("--tasks needs the lm-eval harness: pip install 'spinlearn[eval]'")
    check_seqlen(check_model_dir(args.model), args.seqlen, "--seqlen")
    if args.rotation == "learned":
        if args.rotations:
            load_rotations(args.rotations)  # a missing or corrupt file is named here
        learned_source(args.model, args.rotations)
    elif args.rotation == "none" and run_dir_of(args.model) is not None:
        print(f"spinlearn eval: note: {args.model} is a training run's model; --rotation none evaluates it as it is, "
              "without the online Hadamards and clip ratios its run used; --rotation learned reproduces the run's "
              "learned row", file=sys.stderr)
    quant = QuantSettings.from_flags(
        w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, lm_head_bits=args.lm_head_bits,
        w_groupsize=args.w_groupsize, w_clip=args.w_clip, a_clip=args.a_clip,
    )

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    eval_ids = tokenize_concat(load_text(args.data, split="test", text_field=args.text_field), tokenizer)
    windows = eval_windows(eval_ids, args.seqlen)[: args.max_windows]
    calib = None
    if args.calib_data:
        calib_ids = tokenize_concat(load_text(args.calib_data, split="train", text_field=args.text_field), tokenizer)
        calib = calibration_blocks(calib_ids, args.nsamples, args.seqlen, args.seed)
    t0 = time.perf_counter()
    result = evaluate_setting(
        args.model, windows, rotation=args.rotation, quant=quant, w_method=args.w_method, calib_blocks=calib,
        rotations_file=args.rotations, layout=args.layout, seed=args.seed, r3=args.r3, r4=args.r4,
        online=[g.strip() for g in args.online.split(",") if g.strip()] if args.online else None,
        dtype=args.dtype, batch_size=args.batch_size,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        task_limit=args.task_limit, activation_clips=args.activation_clips, weight_clips=args.weight_clips,
        trust_remote_code=args.trust_remote_code, gptq_kwargs={"refit": args.gptq_refit},
    )
    result["settings"].update(
        data=args.data, calib_data=args.calib_data, nsamples=args.nsamples if calib is not None else None,
        max_windows=args.max_windows, text_field=args.text_field, eval_tokens=int(eval_ids.numel()),
    )
    result["time_s"] = round(time.perf_counter() - t0, 2)
    q = quant.name
    print(
        f"perplexity {result['ppl']:.4f}  ({q} {args.w_method}, rotation {args.rotation}, "
        f"{windows.shape[0]} windows x {args.seqlen} tokens) [{result['time_s']:.1f}s]"
    )
    for task, metrics in result.get("zero_shot", {}).items():
        print(f"zero-shot {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_run
    from .export.api import check_export_inputs, export_w_method, resolve_source
    from .export.schemes import resolve_scheme

    # Cheap checks first: nothing is loaded or written if these fail.
    for flag in ("nsamples", "seqlen"):
        if getattr(args, flag) < (2 if flag == "seqlen" else 1):
            raise ValueError(f"--{flag} {getattr(args, flag)} is too small")
    scheme = resolve_scheme(args.scheme, args.group_size)
    model_dir, recipe, _ = resolve_source(args.run)
    method = export_w_method(args.scheme, args.w_method, recipe)
    needs_calib = method == "gptq" or scheme.name == "nvfp4"
    if not args.calib_data:
        check_export_inputs(scheme, method, None)
    from .artifacts import check_output_dir

    check_output_dir(args.output, args.overwrite)
    calib = None
    if needs_calib and args.calib_data:
        from .data import calibration_blocks, load_text, tokenize_concat
        from .loading import load_tokenizer

        ids = tokenize_concat(load_text(args.calib_data, split="train"), load_tokenizer(model_dir))
        calib = calibration_blocks(ids, args.nsamples, args.seqlen, args.seed)
    t0 = time.perf_counter()
    out = export_run(args.run, args.scheme, args.output, w_method=method, group_size=args.group_size,
                     calib_blocks=calib, overwrite=args.overwrite)
    print(f"exported {model_dir} as {scheme.name} ({method}) -> {out} [{time.perf_counter() - t0:.1f}s]")


def _cmd_plan(args: argparse.Namespace) -> None:
    import json

    from .memplan import format_plan, make_plan

    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: need at least one GPU")
    if args.gpu_mem is not None and args.gpu_mem <= 0:
        raise ValueError(f"--gpu-mem {args.gpu_mem}: give the memory of one GPU in GiB, e.g. 80")
    plan = make_plan(args.model, args.config, gpus=args.gpus, gpu_mem=args.gpu_mem, overrides=args.overrides)
    print(format_plan(plan), end="")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(plan, indent=2) + "\n")


def _add_plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="estimate the peak GPU memory of a training run from config.json alone")
    pl.add_argument("--model", required=True, help="model directory holding a config.json, or the json's path "
                    "(no weights needed)")
    pl.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs for DDP / FSDP / device map (default 1)")
    pl.add_argument("--gpu-mem", type=float, default=None, help="memory of one GPU in GiB: say which plans fit")
    pl.add_argument("--json", default=None, help="also write the plan (GiB per component) to this JSON file")
    pl.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides, e.g. data.seqlen=4096")
    pl.set_defaults(func=_cmd_plan)


def _add_recipes_parser(sub) -> None:
    rc = sub.add_parser("recipes", help="list the shipped recipes, or copy one to edit (spinlearn recipes cp demo my.yaml)")
    rc.set_defaults(func=_cmd_recipes, action="list")
    rsub = rc.add_subparsers(dest="action")
    rsub.add_parser("list", help="list the shipped recipes with the command that runs each (the default)")
    cp = rsub.add_parser("cp", help="copy a shipped recipe to a path (demo paths become the installed files)")
    cp.add_argument("name", help="shipped recipe name, e.g. demo")
    cp.add_argument("dest", help="destination file (or directory)")
    cp.add_argument("--overwrite", action="store_true", help="replace an existing destination file")


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity of a model under a rotation and W/A/KV quantization setting")
    e.add_argument("--model", required=True, help="local Hugging Face model directory (plain, rotated or exported)")
    e.add_argument("--data", required=True, help="evaluation text: .txt/.json/.jsonl/.parquet file or glob, or "
                   "wikitext2 / c4 (test split)")
    e.add_argument("--text-field", default=None, help="column holding the text in json/parquet files")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per window (evaluation and calibration)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    e.add_argument("--w-bits", type=int, default=16, help="weight bits, 2..16 (16 = float)")
    e.add_argument("--a-bits", type=int, default=16, help="activation bits (per token, asymmetric)")
    e.add_argument("--kv-bits", type=int, default=16, help="K/V bits (per head, asymmetric)")
    e.add_argument("--lm-head-bits", type=int, default=16, help="lm_head weight bits (RTN)")
    e.add_argument("--w-groupsize", type=int, default=-1, help="weight group size (-1 = per output channel)")
    e.add_argument("--w-clip", action="store_true", help="MSE clip search for weight scales")
    e.add_argument("--a-clip", type=float, default=1.0, help="activation clip ratio (0 < r <= 1)")
    e.add_argument("--w-method", choices=WEIGHT_METHODS, default="rtn", help="weight quantizer")
    e.add_argument("--rotation", choices=EVAL_ROTATIONS, default="none",
                   help="none: as is; hadamard: random Hadamard R1/R2 folded first; learned: an exported model "
                   "(rotations.safetensors in its directory or parent) or --rotations FILE on the unrotated model")
    e.add_argument("--rotations", default=None, help="rotations safetensors to fold into an unrotated --model")
    e.add_argument("--layout", default="transformer_universal", help="layout for --rotation hadamard / --rotations")
    e.add_argument("--r3", action="store_true", help="online Hadamard on queries/keys after RoPE")
    e.add_argument("--r4", action="store_true", help="online Hadamard before down_proj (folded into its weight)")
    e.add_argument("--online", default=None,
                   help="online input Hadamards on these linears: comma-separated module globs, or 'all' "
                        "(every linear but lm_head; Brevitas's layerwise mode); --r4 is the down_proj set")
    e.add_argument("--activation-clips", default=None, metavar="FILE|none",
                   help="activation clip ratios (a run's activation_clips.safetensors) to apply; a run's model/ gets "
                   "the ones its run learned by default, 'none' turns that off")
    e.add_argument("--weight-clips", default=None, metavar="FILE|none",
                   help="weight clip ratios (a run's weight_clips.safetensors): RTN's weight scales, or with "
                   "--w-method gptq the grid GPTQ rounds on (instead of its clip search); a run's model/ gets the "
                   "ones its run learned by default when --w-bits/--w-groupsize match its recipe, 'none' turns that off")
    e.add_argument("--calib-data", default=None, help="calibration text for --w-method gptq (train split)")
    e.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows of --seqlen tokens")
    e.add_argument("--gptq-refit", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ's refit (quant.gptq.refit, default on): calibrate on the quantized activations and refit "
                   "each weight to the float outputs (ridge least squares) before rounding; --no-gptq-refit: plain GPTQ")
    e.add_argument("--seed", type=int, default=0, help="Hadamard rotation and calibration sampling seed")
    e.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | float64 | auto (checkpoint's)")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own code (config.json auto_map) to build it; only for models you trust")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    e.add_argument("--json", default=None, help="write the perplexity and every setting to this JSON file")
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval zero-shot tasks (optional extra: pip install 'spinlearn[eval]'; "
                        "offline only with task data already cached)")
    e.add_argument("--task-limit", type=int, default=None, help="examples per zero-shot task (quick checks)")
    e.set_defaults(func=_cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinlearn", description="Learn and fold rotations for LLM quantization.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("rotate", help="fold data-free R1/R2 rotations into a Hugging Face model")
    r.add_argument("--model", required=True, help="local Hugging Face model directory")
    r.add_argument("--layout", default="transformer_universal",
                   help="shipped layout name, a YAML path, or auto (inferred from the model)")
    r.add_argument("--output", required=True, help="output directory (a plain HF model directory)")
    r.add_argument("--mode", choices=ROTATION_MODES, default=None,
                   help="override every matrix's mode (default: the layout's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | float64 | auto (checkpoint's)")
    r.add_argument("--device", default=None, help="where to do the math, e.g. cuda (default: cpu)")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    r.add_argument("--trust-remote-code", action="store_true")
    r.add_argument("--no-verify", action="store_true", help="skip the before/after logits check")
    r.set_defaults(func=_cmd_rotate)

    t = sub.add_parser("train", help="learn rotations from a recipe (same as launch/train_rotations.py, one process)")
    t.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10")
    t.set_defaults(func=_cmd_train)

    _add_eval_parser(sub)

    _add_recipes_parser(sub)
    _add_plan_parser(sub)

    x = sub.add_parser("export", help="write a compressed-tensors checkpoint vLLM serves (w4a16, w8a8, nvfp4, float)")
    x.add_argument("--run", required=True, help="a training output directory (model/ + recipe.yaml) or a model "
                   "directory spinlearn rotate wrote")
    x.add_argument("--scheme", required=True, help="w4a16 | w8a8 | nvfp4 | float")
    x.add_argument("--output", required=True, help="output directory (must be empty unless --overwrite)")
    x.add_argument("--w-method", choices=WEIGHT_METHODS, default=None,
                   help="weight quantizer (default: the run's export.w_method / quant.w_method, else rtn)")
    x.add_argument("--group-size", type=int, default=None,
                   help="w4a16 weight group size (default: the run's export.group_size, else 128; -1 = per channel)")
    x.add_argument("--calib-data", default=None, help="calibration text for gptq / nvfp4 (train split)")
    x.add_argument("--nsamples", type=int, default=128, help="calibration windows of --seqlen tokens")
    x.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    x.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    x.set_defaults(func=_cmd_export)

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"spinlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
