"""The learned-rotation job: setup -> baselines -> train -> fuse -> export -> evaluate.

Called by ``launch/train_rotations.py`` (under ``accelerate launch``) and by ``spinlearn train``.
Every rank runs the same code; only the main process writes files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .artifacts import save_model_dir, save_rotations
from .choices import ROTATION_MODE_LABELS
from .fusion import fold_rotations
from .layout import BANK_ATTR
from .loading import check_model_path, load_causal_lm, load_tokenizer
from .rotation_plan import make_matrices, prepare_model
from .report import format_table
from .rotations import RotationBank
from .fakequant import ONLINE_KEY, apply_online_rotations, check_online_hadamards, fold_r4, online_rotation_record, wrap_model
from .quant import QuantSettings

DUMP_RANKS_ENV = "SPINLEARN_DUMP_RANK_ROTATIONS"


def _log(msg: str, main: bool) -> None:
    if main:
        print(f"[spinlearn] {msg}", flush=True)


def _check_output_dir(cfg) -> Path:
    out = Path(cfg.output_dir)
    resuming = bool(cfg.train.resume_from_checkpoint)
    if out.exists() and any(out.iterdir()) and not (cfg.overwrite_output_dir or resuming):
        raise FileExistsError(
            f"output_dir {str(out)!r} exists and is not empty; set overwrite_output_dir=true or "
            "train.resume_from_checkpoint=PATH"
        )
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _dump_rank_rotations(matrices: dict[str, torch.Tensor], process_index: int) -> None:
    """Test hook: with SPINLEARN_DUMP_RANK_ROTATIONS=DIR every rank writes the matrices it holds after training to
    DIR/rank{i}.safetensors, so that a multi-process run can be checked for ranks that drifted apart."""
    target = os.environ.get(DUMP_RANKS_ENV)
    if not target:
        return
    from safetensors.torch import save_file

    Path(target).mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in matrices.items()}, str(Path(target) / f"rank{process_index}.safetensors"))


def _last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint (one holding the rotations) under output_dir, or None."""
    from .trainer import ROTATIONS_FILE

    ckpts = [p for p in Path(output_dir).glob("checkpoint-*") if (p / ROTATIONS_FILE).is_file()]
    ckpts.sort(key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1)
    return str(ckpts[-1]) if ckpts else None


def _finish_wandb(previous_run, exit_code: int) -> None:
    """Close the wandb run the Trainer opened (if any), so that a later run in the same process gets its own."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None and run is not previous_run:
        wandb.finish(exit_code=exit_code)


def _default_wandb_offline(cfg) -> None:
    """wandb with no account and no mode set fails (or hangs without network): default to offline runs."""
    report = list(cfg.train.report_to or [])
    if "wandb" in report and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        print("[spinlearn] wandb: no WANDB_MODE or API key set; logging offline (wandb sync later)", flush=True)


def run_training(cfg) -> dict:
    """Run the whole job described by a validated recipe; returns the metrics dict."""
    from accelerate import PartialState
    from transformers import TrainingArguments

    from .config import recipe_to_yaml, training_arguments_kwargs
    from .data import TokenBlockDataset, calibration_blocks, eval_windows, load_text, tokenize_concat
    from .evaluate import perplexity
    from .trainer import NonFiniteLossError, RotationTrainer

    _default_wandb_offline(cfg)
    t_start = time.perf_counter()
    out = _check_output_dir(cfg)
    check_model_path(cfg.model.path)
    # TrainingArguments sets up the process group (gloo on CPU, NCCL on GPUs) under `accelerate launch`. A
    # PartialState made before it describes a single process, in which every rank is "main" and all of them would
    # write the export at once.
    args = TrainingArguments(**training_arguments_kwargs(cfg))
    state = PartialState()
    main = state.is_main_process
    torch.manual_seed(cfg.train.seed)

    # --- setup: data first (bad data sources fail before the model is loaded), then the model ----------------
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    train_ids = tokenize_concat(load_text(cfg.data.train, split="train", text_field=cfg.data.text_field), tokenizer)
    blocks = calibration_blocks(train_ids, cfg.data.nsamples, cfg.data.seqlen, cfg.data.seed)
    windows = None
    if cfg.data.eval:
        eval_ids = tokenize_concat(load_text(cfg.data.eval, split="test", text_field=cfg.data.text_field), tokenizer)
        windows = eval_windows(eval_ids, cfg.data.eval_seqlen or cfg.data.seqlen)
        if cfg.data.eval_max_windows:
            windows = windows[: cfg.data.eval_max_windows]
        windows = windows.to(state.device)
    model = load_causal_lm(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    model.to(state.device)
    check_online_hadamards(model, r3=cfg.rotation.r3, r4=cfg.rotation.r4)
    qtrain = QuantSettings.from_recipe(cfg.quant)
    metrics: dict = {"model": str(cfg.model.path), "device": str(state.device), "rows": {}}

    def ppl(label: str) -> float:
        value = perplexity(model, windows, batch_size=cfg.eval.batch_size, progress=main, desc=label)
        metrics["rows"][label] = value
        _log(f"{label}: perplexity {value:.3f}", main)
        return value

    # --- baselines on the untouched model ------------------------------------------------------------------
    if windows is not None:
        metrics["ppl_float"] = ppl("float")
        if cfg.eval.baselines:
            h = wrap_model(model, quant=qtrain)
            metrics["ppl_quant_no_rotation"] = ppl(f"{qtrain.name} RTN, no rotation")
            h.remove()

    # --- rotations as Stiefel parameters, wrappers, training ---------------------------------------------
    plan = prepare_model(model, cfg.rotation.layout)
    bank = RotationBank(make_matrices(plan, mode=cfg.rotation.init, seed=cfg.rotation.seed)).to(state.device)
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, BANK_ATTR, bank)  # registered once; the only trainable parameters
    for p in bank.parameters():
        p.requires_grad_(True)
    handle = wrap_model(model, plan=plan, bank=bank, quant=qtrain, r3=cfg.rotation.r3, r4=cfg.rotation.r4)
    if windows is not None:
        metrics["ppl_quant_before"] = ppl(f"{qtrain.name} RTN, {ROTATION_MODE_LABELS[cfg.rotation.init]} rotation")

    trainer = RotationTrainer(
        model=model, args=args, train_dataset=TokenBlockDataset(blocks), bank=bank,
        rotation_optimizer=cfg.rotation.optimizer, momentum=cfg.rotation.momentum,
        kl_weight=cfg.loss.kl_weight, ce_weight=cfg.loss.ce_weight,
    )
    wandb_before = getattr(sys.modules.get("wandb"), "run", None)
    t_train = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=cfg.train.resume_from_checkpoint or None)
    except NonFiniteLossError as e:
        _finish_wandb(wandb_before, exit_code=1)
        last = _last_checkpoint(args.output_dir)
        hint = f"resume with train.resume_from_checkpoint={last}" if last else "no checkpoint was saved before it"
        raise RuntimeError(f"{e}. Last good checkpoint: {last or 'none'} ({hint})") from e
    except BaseException:
        _finish_wandb(wandb_before, exit_code=1)
        raise
    train_time = time.perf_counter() - t_train
    trainer.finalize_rotations()
    learned = {k: v.double().cpu() for k, v in bank.matrices().items()}
    _dump_rank_rotations(bank.matrices(), state.process_index)
    metrics.update(
        steps=int(trainer.state.global_step),
        train_time_s=round(train_time, 2),
        train_tokens_per_s=round(trainer.tokens_seen / max(train_time, 1e-9), 1),
        final_train_loss=float(result.training_loss),
        max_orth_error=bank.max_orthogonality_error(),
    )

    # --- fuse: fold the learned matrices into the weights (float64), drop the wrappers ------------------
    handle.remove()
    delattr(model, BANK_ATTR)
    fold_rotations(plan.placements, learned, plan.layout.use_float64)
    if cfg.rotation.r4:
        fold_r4(model)
    online = online_rotation_record(model, cfg.rotation.r3, cfg.rotation.r4)
    if online:  # recorded in config.json for evaluators and serving engines
        setattr(model.config, ONLINE_KEY, online)

    # --- learned row on the fused model: exactly what a user of the export gets --------------------------
    if windows is not None:
        h = apply_online_rotations(model, qtrain)
        metrics["ppl_quant_after"] = ppl(f"{qtrain.name} RTN, learned rotation")
        h.remove()

    # --- export (main process only) ----------------------------------------------------------------------
    if main:
        out.mkdir(parents=True, exist_ok=True)
        tmp_model = out / ".model.tmp"
        shutil.rmtree(tmp_model, ignore_errors=True)
        save_model_dir(model, tmp_model, tokenizer_source=cfg.model.path)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        os.replace(tmp_model, out / "model")
        save_rotations(learned, out / "rotations.safetensors", {"layout": plan.layout.name})
        _atomic_write_text(out / "recipe.yaml", recipe_to_yaml(cfg))

    # --- GPTQ after learned rotations (modifies the weights: after the export) ---------------------------
    # W16A4KV4 recipes (w_method gptq): the final quantizer, with the recipe's activations/KV. With baselines on
    # and RTN weights: the W4A16 GPTQ row of the results table.
    if windows is not None and (cfg.quant.w_method == "gptq" or cfg.eval.baselines):
        from .evaluate import evaluate_setting

        g = cfg.quant.gptq
        gq = QuantSettings.for_gptq(cfg.quant, with_activations=cfg.quant.w_method == "gptq")
        label = gq.name.removesuffix("KV16")
        res = evaluate_setting(
            model, windows, rotation="none", quant=gq, w_method="gptq", calib_blocks=blocks[: g.nsamples],
            gptq_kwargs={"percdamp": g.percdamp, "block_size": g.block_size, "act_order": g.act_order},
            batch_size=cfg.eval.batch_size, progress=main,
        )
        metrics["rows"][f"{label} GPTQ, learned rotation"] = res["ppl"]
        metrics["ppl_gptq"] = res["ppl"]
        _log(f"{label} GPTQ, learned rotation: perplexity {res['ppl']:.3f}", main)

    metrics["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    _finish_wandb(wandb_before, exit_code=0)
    if main:
        _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        table = format_table(metrics)
        _atomic_write_text(out / "results.md", table)
        print(table, flush=True)
    state.wait_for_everyone()
    return metrics



