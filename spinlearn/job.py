"""The learned-rotation job as a recipe class: one method per phase, in the order ``run`` calls them.

    check_inputs -> setup_data -> setup_run_dir -> setup_model -> baselines -> train -> fuse
    -> evaluate_learned -> export -> finish (-> cleanup, always)

Called by ``launch/train_rotations.py`` (under ``accelerate launch``) and by ``spinlearn train``. Every rank runs the
same code; only the main process writes files. Under FSDP only rank 0 loads the model (into CPU memory): every
evaluation and the training run on sharded views of it (``_view``, ``spinlearn.sharded``), and rank 0 folds and
exports. A run directory always holds one run: previous outputs are cleared
after validation, a run marker says which run the directory holds and whether it completed, and the final artefacts
are staged in a hidden directory and moved into place together at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import artifacts, rundir
from .choices import ROTATION_MODE_LABELS
from .fakequant import check_online_hadamards, rotations_attached, wrap_model
from .fusion import fold_rotations
from .scales_fold import fold_scales
from .quant import QuantSettings, gptq_learned_grid
from .report import format_table
from .rotation_plan import make_matrices, prepare_model


PROFILE_BLOCKS = 2  # calibration blocks for the activation outlier profile (before/after pictures)
GUARD_KEPT_START = " (guard: start kept)"  # appended to a learned row's name when the guard kept the start


def _log(msg: str, main: bool = True) -> None:
    if main:
        print(f"[spinlearn] {msg}", flush=True)


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
        _log("wandb: no WANDB_MODE or API key set; logging offline (wandb sync later)")


class RotationJob:
    """Learn rotations for one recipe, fuse them, evaluate and export. ``callbacks`` are extra ``TrainerCallback``s
    (tests inject probes through them)."""

    def __init__(self, cfg, callbacks=()):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.out = Path(cfg.output_dir)
        self.metrics: dict = {"model": str(cfg.model.path), "rows": {}}
        self.images: dict[str, Path] = {}
        self.windows = None
        self.t_start = time.perf_counter()

    # ------------------------------------------------------------------------------------------------ driver
    def run(self) -> dict:
        _default_wandb_offline(self.cfg)
        self.wandb_before = getattr(sys.modules.get("wandb"), "run", None)
        exit_code = 1
        try:
            self.check_inputs()
            self.setup_data()
            self.setup_run_dir()
            self.setup_model()
            self.baselines()
            self.train()
            self.fuse()
            self.evaluate_learned()
            self.export()
            self.finish()
            exit_code = 0
        finally:
            self.cleanup(exit_code)
        return self.metrics

    # -------------------------------------------------------------------------------------------- the phases
    def check_inputs(self) -> None:
        """Everything that can be checked before data and weights are loaded: output dir, model dir, the layout
        against the model's config, sequence lengths, the resume checkpoint."""
        from .checks import check_job_inputs

        self.resume = check_job_inputs(self.cfg)

    def setup_run_dir(self) -> None:
        """Start the process group (TrainingArguments does, under accelerate launch), then make the output dir
        this run's: previous final outputs cleared (checkpoints kept when resuming), a fresh run marker."""
        from accelerate import PartialState
        from transformers import TrainingArguments

        from .config import training_arguments_kwargs
        from .distributed import claim_fsdp_request

        self.fsdp = claim_fsdp_request()  # before accelerate sees it: spinlearn shards the model (distributed.py)
        # A PartialState made before TrainingArguments would describe a single process in which every rank is
        # "main" and all of them would write the outputs at once.
        self.args = TrainingArguments(**training_arguments_kwargs(self.cfg))
        self.state = PartialState()
        self.main = self.state.is_main_process
        self.metrics["device"] = str(self.state.device)
        if self.main:
            rundir.start_run(self.out, resuming=self.resume is not None)
            self.run_started = True  # from here on a failure is this run's: cleanup marks it
        self.state.wait_for_everyone()
        torch.manual_seed(self.cfg.train.seed)

    def setup_data(self) -> None:
        """Tokenizer, calibration blocks and evaluation windows (bad data fails before the model is loaded)."""
        from .data import calibration_blocks, eval_windows, load_text, tokenize_concat
        from .loading import load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        train_ids = tokenize_concat(load_text(cfg.data.train, split="train", text_field=cfg.data.text_field),
                                    self.tokenizer)
        self.blocks = calibration_blocks(train_ids, cfg.data.nsamples, cfg.data.seqlen, cfg.data.seed)
        if cfg.data.eval:
            eval_ids = tokenize_concat(load_text(cfg.data.eval, split="test", text_field=cfg.data.text_field),
                                       self.tokenizer)
            windows = eval_windows(eval_ids, cfg.data.eval_seqlen or cfg.data.seqlen)
            if cfg.data.eval_max_windows:
                windows = windows[: cfg.data.eval_max_windows]
            self.windows = windows

    def setup_model(self) -> None:
        """The frozen model, its quantizers and the linears with online input Hadamards. Under FSDP with several
        ranks only rank 0 loads the weights, to the CPU (``spinlearn.sharded``): the ranks compute on sharded views."""
        from .data import check_token_ids

        cfg = self.cfg
        self.sharded = self.fsdp and self.state.num_processes > 1
        self.model = None
        if self.main or not self.sharded:
            self.model = self._load_model(place=False)
        shape = self.model
        if self.sharded:
            from .sharded import skeleton

            (shape,) = skeleton(self.model)  # rank 0's model on meta: what the checks below read
            _log("FSDP: rank 0 holds the model in CPU memory; the ranks compute on sharded copies", self.main)
        vocab = shape.get_input_embeddings().num_embeddings
        check_token_ids(self.blocks, vocab, what="data.train", model=cfg.model.path)
        check_token_ids(self.windows, vocab, what="data.eval", model=cfg.model.path)
        input_device = self.state.device
        if cfg.model.device_map:  # accelerate placed the layers; the rotations follow each layer's device
            from .loading import device_map_summary

            self.metrics["device_map"] = device_map_summary(self.model)
            input_device = self.model.get_input_embeddings().weight.device
            _log(f"device map ({cfg.model.device_map}): weights per device {self.metrics['device_map']}", self.main)
        elif not self.sharded:
            self.model.to(self.state.device)
        if self.windows is not None:
            self.windows = self.windows.to(input_device)
        self.online = check_online_hadamards(shape, r3=cfg.rotation.r3, online=cfg.rotation.online,
                                             r4=cfg.rotation.r4)
        self.quant = QuantSettings.from_recipe(cfg.quant)
        self.plan = None

    def baselines(self) -> None:
        """The float model's activation profile (before picture) and perplexity, and (eval.baselines) RTN's without
        rotation."""
        with self._view() as (model, _):
            self.profile_before = self._activation_profile(model)
            if self.windows is not None:
                self.metrics["ppl_float"] = self._ppl("float", model)
        if self.windows is not None and self.cfg.eval.baselines:
            with self._view(lambda m, _: wrap_model(m, quant=self.quant)) as (model, _):
                self.metrics["ppl_quant_no_rotation"] = self._ppl(f"{self.quant.name} RTN, no rotation", model)

    def train(self) -> None:
        """Attach the rotations (with any learned scales and clip ratios, the only trainable tensors), measure the
        start, learn them with the Trainer."""
        cfg = self.cfg
        if self.model is not None:
            self.plan = prepare_model(self.model, cfg.rotation.layout)
        from .fakequant import (activation_clip_params, activation_clip_table, learned_extras_off, weight_clip_params,
                                weight_clip_table)

        on_activations = self._on_activations()

        def attach(model, plan):
            """The start matrices (of the view's plan: the same instances on every rank) and the learned tensors."""
            self.start = {k: v.double().cpu() for k, v in make_matrices(plan, mode=cfg.rotation.init,
                                                                         seed=cfg.rotation.seed).items()}
            scales = self._scale_bank(model, plan) if cfg.rotation.learn_scales else None
            return rotations_attached(model, plan, self.start, quant=self.quant, r3=cfg.rotation.r3,
                                      online=self.online, scales=scales, learn_a_clip=cfg.quant.learn_a_clip,
                                      learn_w_clip=cfg.quant.learn_w_clip, learn_kv_clip=cfg.quant.learn_kv_clip,
                                      rotate_activations=on_activations)

        with self._view(attach, prepared=True) as (model, handle):
            scales = handle.scales
            if cfg.quant.learn_w_clip and cfg.quant.w_clip_init == "mse":
                self._mse_weight_clips(model)
            if self.windows is not None:
                label = f"{self.quant.name} RTN, {ROTATION_MODE_LABELS[cfg.rotation.init]} rotation"
                with learned_extras_off(model):  # the start row: the rotation alone (what the guard keeps)
                    self.metrics["ppl_quant_before"] = self._ppl(label, model)
            clips, w_clips = activation_clip_params(model), weight_clip_params(model)
            self.trainer = self._make_trainer(model, handle.bank, scales, clips, w_clips)
            learned = [*handle.bank.parameters(), *(scales.parameters() if scales is not None else ()),
                       *clips.values(), *w_clips.values()]
            if self.fsdp:
                self._shard(learned)
            t0 = time.perf_counter()
            self._fit()
            train_time = time.perf_counter() - t0
            self.trainer.finalize_rotations()
            self.learned = {k: v.double().cpu() for k, v in handle.bank.matrices().items()}
            self.learned_scales = scales.scales() if scales is not None else None
            self.learned_clips = activation_clip_table(model) or None  # linear inputs and K/V
            self.learned_w_clips = weight_clip_table(model) if cfg.quant.learn_w_clip else None
            self._record_extras(scales)
            if self.fsdp:
                from .distributed import check_replicated

                check_replicated(learned)
            self.metrics.update(
                steps=int(self.trainer.state.global_step),
                train_time_s=round(train_time, 2),
                train_tokens_per_s=round(self.trainer.tokens_seen / max(train_time, 1e-9), 1),
                final_train_loss=self.trainer.whole_run_loss(),
                max_orth_error=handle.bank.max_orthogonality_error(),
            )
            if self.sharded:  # the view goes with the block; rank 0's model was never touched
                self.trainer.model = self.trainer.model_wrapped = None
                self.trainer.accelerator.free_memory()

    def fuse(self) -> None:
        """Fold the learned matrices into the weights (float64). The result is a plain HF model, exact in plain
        transformers: online Hadamards are *not* folded here (only exports that declare them fold their half).
        Under FSDP rank 0 folds them into its CPU copy (the products on its GPU, one tensor at a time); the other
        ranks hold no model."""
        if self.model is None:
            return
        fold_rotations(self.plan.placements, self.learned, self.plan.layout.use_float64, device=self.state.device)
        if self.learned_scales is not None:  # after the rotations: the scales live in the rotated basis
            fold_scales(self.model, self.plan, self.learned_scales)

    def evaluate_learned(self) -> None:
        """The learned row, on the fused model with the run's online Hadamards: exactly what an export serves.
        Guard: if it is worse than the start (``eval.guard``), the start is kept instead, and the run says so.
        W16A4KV4 recipes (``quant.w_method: gptq``) are judged by what they deploy: learned + GPTQ against the
        start + GPTQ (both GPTQ rows are computed here, on one process or DDP)."""
        if self.windows is None and not self.profiling:
            return
        with self._view(self._fused_wrappers) as (model, _):
            self.profile_after = self._activation_profile(model)  # quantizers off, online Hadamards on
            if self.windows is None:
                return
            after = self._ppl(self._rtn_learned_row, model)
        self.metrics["ppl_quant_after"] = after
        judged = [self._rtn_learned_row, after, self.metrics["ppl_quant_before"]]
        if self.cfg.eval.guard and self.cfg.quant.w_method == "gptq" and not self.sharded:
            judged = self._gptq_rows(restore=True)
        label, after, before = judged
        if self.cfg.eval.guard and after > before:
            self._keep_start(label, after, before)
        else:
            self.metrics["guard"] = {"kept": "learned", "judged_on": label}

    def _keep_start(self, label: str, after: float, before: float) -> None:
        """The guard's verdict: the start matrices replace the learned ones in the model (scales undone first) and
        in every row and file that follows; the learned extras are dropped."""
        _log(f"guard: the learned rotations ({label}: {after:.3f}) are worse than the start ({before:.3f}) on the "
             "evaluation split; keeping the start matrices (eval.guard=false keeps the learned ones)", self.main)
        if self.model is not None and self.learned_scales is not None:  # undo the scales before the rotations
            fold_scales(self.model, self.plan, {k: 1.0 / s for k, s in self.learned_scales.items()})
        if self.model is not None:
            fold_rotations(self.plan.placements, _inverse_then(self.learned, self.start),
                           self.plan.layout.use_float64, device=self.state.device)
        self.learned, self.learned_scales, self.learned_clips, self.learned_w_clips = self.start, None, None, None
        for extra in ("scales", "activation_clips", "weight_clips"):  # they were dropped too
            self.metrics.pop(extra, None)
        self.metrics["guard"] = {"kept": "start", "judged_on": label, "ppl_learned": after, "ppl_start": before}
        rows = self.metrics["rows"]
        learned_rows = {"ppl_quant_after": (self._rtn_learned_row, "ppl_quant_before"),
                        "ppl_gptq": (self._gptq_learned_row, "ppl_gptq_start")}
        for key, (row, start_key) in learned_rows.items():
            if key in self.metrics:
                del rows[row]
                rows[row + GUARD_KEPT_START] = self.metrics[key] = self.metrics[start_key]

    def export(self) -> None:
        """Stage the fused model, the matrices, the recipe and every deployable export (main process), then the
        GPTQ row (it quantizes the weights in place, so it comes after the float model was saved)."""
        from .config import recipe_to_yaml

        if self.main:
            self.staging = rundir.staging_dir(self.out)
            artifacts.save_model_dir(self.model, self.staging / artifacts.MODEL_DIR, tokenizer_source=self.cfg.model.path)
            artifacts.save_rotations(self.learned, self.staging / artifacts.ROTATIONS_FILE,
                                     {"layout": self.plan.layout.name})
            if self.learned_scales is not None:  # already folded into model/; kept for inspection and re-folding
                artifacts.save_rotations(self.learned_scales, self.staging / artifacts.SCALES_FILE)
            if self.learned_clips is not None:  # a quantizer setting: evaluations apply it (set_activation_clips)
                artifacts.save_rotations(self.learned_clips, self.staging / artifacts.ACTIVATION_CLIPS_FILE)
            if self.learned_w_clips is not None:  # likewise (set_weight_clips); the exports' weight scales use it
                artifacts.save_rotations(self.learned_w_clips, self.staging / artifacts.WEIGHT_CLIPS_FILE)
            (self.staging / artifacts.LAYOUT_FILE).write_text(self.plan.layout.to_yaml())  # as resolved (auto too)
            (self.staging / artifacts.RECIPE_FILE).write_text(recipe_to_yaml(self.cfg))
            self._exports()
        self.state.wait_for_everyone()
        self._gptq_row()

    def finish(self) -> None:
        """Metrics, results table, pictures, wandb summary; then the staged outputs move into place together."""
        self.metrics["wall_time_s"] = round(time.perf_counter() - self.t_start, 2)
        if self.main:
            self._pictures()
            self._log_to_wandb()
            (self.staging / artifacts.METRICS_FILE).write_text(json.dumps(self.metrics, indent=2))
            table = format_table(self.metrics)
            (self.staging / artifacts.RESULTS_FILE).write_text(table)
            rundir.publish_run(self.staging, self.out)
            print(table, flush=True)
        self.state.wait_for_everyone()

    def cleanup(self, exit_code: int) -> None:
        """Close the wandb run this job opened; a failed run leaves its marker saying so."""
        _finish_wandb(self.wandb_before, exit_code=exit_code)
        if exit_code and getattr(self, "run_started", False):
            rundir.mark_run(self.out, "failed")

    # ----------------------------------------------------------------------------------------------- helpers
    def _make_trainer(self, model, bank, scales=None, clips=None, weight_clips=None):
        from .data import TokenBlockDataset
        from .trainer import RotationTrainer

        cfg = self.cfg
        return RotationTrainer(
            model=model, args=self.args, train_dataset=TokenBlockDataset(self.blocks), bank=bank,
            rotation_optimizer=cfg.rotation.optimizer, momentum=cfg.rotation.momentum,
            kl_weight=cfg.loss.kl_weight, ce_weight=cfg.loss.ce_weight, kl_topk=cfg.loss.kl_topk,
            scales=scales, scales_lr=cfg.rotation.scales_lr, clips=clips, clips_lr=cfg.quant.a_clip_lr,
            weight_clips=weight_clips, weight_clips_lr=cfg.quant.w_clip_lr,
            callbacks=self.callbacks or None,
        )

    def _mse_weight_clips(self, model) -> None:
        """``quant.w_clip_init: mse``: the learned weight clip ratios start at the MSE search's (a resumed run then
        loads its checkpoint's over them)."""
        from .fakequant import start_weight_clips_at_mse

        ratios = start_weight_clips_at_mse(model)
        if ratios is not None:
            _log(f"weight clips: {ratios.numel()} ratios start at the MSE search's (min {ratios.min():.2f}, mean "
                 f"{ratios.mean():.2f}, max {ratios.max():.2f})", self.main)

    def _record_extras(self, scales) -> None:
        """metrics.json: how many scale vectors / clip ratios were learned and their range."""
        if scales is not None:
            lo, hi = scales.range()
            self.metrics["scales"] = {"vectors": len(scales.pairs), "init": self.cfg.rotation.scales_init,
                                      "min": lo, "max": hi}
        if self.learned_clips:
            r = torch.stack(list(self.learned_clips.values())).double()
            self.metrics["activation_clips"] = {"count": len(r), "min": r.min().item(), "mean": r.mean().item(),
                                                "max": r.max().item()}
        if self.learned_w_clips:
            r = torch.cat([t.flatten() for t in self.learned_w_clips.values()]).double()
            self.metrics["weight_clips"] = {"weights": len(self.learned_w_clips), "count": len(r), "min": r.min().item(),
                                            "mean": r.mean().item(), "max": r.max().item()}

    def _on_activations(self) -> bool:
        """Where the matrices act while training (``rotation.apply``, see ``spinlearn.activation_side``); said in the
        log and in metrics.json."""
        from .activation_side import resolve_apply

        on = resolve_apply(self.cfg.rotation.apply, self.quant.w.enabled or self.quant.lm_head.enabled)
        self.metrics["rotation_apply"] = "activations" if on else "weights"
        _log("training: the matrices act on " + ("the activations around each quantizer (16-bit weights)" if on
                                                  else "the weights (R^T W R every step)"), self.main)
        return on

    def _scale_bank(self, model, plan):
        """The learnable scales of every fusible pair of ``model`` (prepared by ``plan``), at 1 or at SmoothQuant's
        start (a few calibration blocks, rotated basis, start matrices; under FSDP rank 0 computes it on its CPU
        copy and sends it to the other ranks)."""
        from .scales import ScaleBank, plan_scales
        from .scales_fold import smoothquant_scales

        r = self.cfg.rotation
        pairs = plan_scales(model, plan, log=self.main, head_quantized=self.quant.lm_head.enabled)
        init = None
        if r.scales_init == "smoothquant":
            init = [None]
            if self.model is not None:
                own = pairs if model is self.model else plan_scales(self.model, self.plan, log=False,
                                                                    head_quantized=self.quant.lm_head.enabled)
                init[0] = smoothquant_scales(self.model, self.plan, self.start, own, self.blocks[:8], r.scales_alpha)
            if self.sharded:
                import torch.distributed as dist

                dist.broadcast_object_list(init, src=0)
            init = init[0]
        _log(f"scales: {len(pairs)} learned vectors ({r.scales_init} start)", self.main)
        return ScaleBank(pairs, init)

    def _shard(self, learned) -> None:
        from .distributed import mark_sharded

        units = mark_sharded(self.trainer, learned)
        _log(f"FSDP2: {units} decoder layers sharded over {self.state.num_processes} ranks, learned tensors replicated"
             if units else "FSDP2 with one process: nothing to shard, the model trains whole", self.main)

    @contextlib.contextmanager
    def _view(self, attach=None, prepared: bool = False):
        """``(model, handle)``: the model the ranks compute on, with ``attach(model, plan)``'s wrappers installed
        for the block (a context manager giving ``handle``; None: the plain model). One process or DDP: the whole
        model. FSDP with several ranks: a sharded copy of rank 0's (``spinlearn.sharded``), its plan the copy of
        rank 0's when ``prepared``, dropped after the block."""
        if not self.sharded:
            with attach(self.model, self.plan) if attach else contextlib.nullcontext() as handle:
                yield self.model, handle
            return
        from .sharded import shard_and_fill, skeleton

        model, plan = skeleton(self.model, self.plan if prepared else None)
        with attach(model, plan) if attach else contextlib.nullcontext() as handle:
            shard_and_fill(model, self.model, self.state.device)
            yield model, handle

    def _load_model(self, place: bool = True):
        """The recipe's model from its files (``model.device_map``: spread by accelerate); ``place``: on this
        process's device too (a device-mapped model stays where accelerate put it)."""
        from .loading import load_causal_lm

        cfg = self.cfg.model
        model = load_causal_lm(cfg.path, dtype=cfg.dtype, device_map=cfg.device_map,
                               trust_remote_code=cfg.trust_remote_code)
        return model.to(self.state.device) if place and not cfg.device_map else model

    def _fused_wrappers(self, model, plan):
        """The quantizers and online Hadamards of the learned row, with the learned clip ratios: what an export
        serves."""
        from .fakequant import set_activation_clips, set_weight_clips

        handle = wrap_model(model, quant=self.quant, r3=self.cfg.rotation.r3, online=self.online)
        if getattr(self, "learned_clips", None):
            set_activation_clips(model, self.learned_clips)
        if getattr(self, "learned_w_clips", None):
            set_weight_clips(model, self.learned_w_clips)
        return handle

    def _fit(self) -> None:
        from .trainer import NonFiniteLossError

        try:
            self.trainer.train(resume_from_checkpoint=self.resume)
        except NonFiniteLossError as e:
            last = artifacts.latest_checkpoint(self.args.output_dir)
            hint = f"resume with train.resume_from_checkpoint={last}" if last else "no checkpoint was saved before it"
            raise RuntimeError(f"{e}. Last good checkpoint: {last or 'none'} ({hint})") from e

    def _ppl(self, label: str, model) -> float:
        from .evaluate import perplexity

        value = perplexity(model, self.windows, batch_size=self.cfg.eval.batch_size, progress=self.main, desc=label,
                           over_ranks=self.sharded)
        self.metrics["rows"][label] = value
        _log(f"{label}: perplexity {value:.3f}", self.main)
        return value

    def _exports(self) -> None:
        """``export-SCHEME/`` (compressed-tensors) for every ``export.schemes`` entry, staged with the run."""
        from .export.api import export_recipe_schemes

        for dest in export_recipe_schemes(self.model, self.cfg, self.staging, calib_blocks=self.blocks,
                                          tokenizer_source=self.cfg.model.path, run_metrics=self.metrics,
                                          weight_clips=self.learned_w_clips,
                                          progress=self.main):
            _log(f"export: {dest.name}/ (compressed-tensors)", self.main)

    def _gptq_row(self) -> None:
        """GPTQ with the recipe's activations/KV on the learned matrices (W16A4KV4 recipes, w_method gptq: always;
        RTN recipes: with eval.baselines) and, with eval.baselines, on the start matrices (the reference under
        GPTQ), unless the guard computed both already."""
        cfg = self.cfg
        if self.windows is None or not (cfg.quant.w_method == "gptq" or cfg.eval.baselines):
            return
        if self.sharded:  # GPTQ walks the whole model layer by layer on one device
            self.metrics["gptq_row"] = "skipped: FSDP (no rank holds the whole model on its device)"
            _log("GPTQ row: skipped under FSDP (no rank holds the whole model on its device); the exports and the "
                 "learned row are complete", self.main)
            return
        if "ppl_gptq" not in self.metrics:  # (the guard computed the W16A4KV4 recipes' rows already)
            self._gptq_rows(restore=False, start=cfg.eval.baselines)

    def _gptq_rows(self, *, restore: bool, start: bool = True) -> list:
        """GPTQ on the learned matrices (with the recipe's activations/KV and learned activation clips) and,
        with ``start``, on the start matrices: the reference for what learning gave under GPTQ, SpinQuant's
        comparison. GPTQ rewrites the weights in place: ``restore`` brings the fused float model back afterwards
        (from a CPU copy); the start's row runs on the original weights loaded again. Returns [the learned row's
        label, its perplexity, the start's]."""
        cfg = self.cfg
        gq, name = self._gptq_settings()
        backup = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()} if restore else None
        label = self._gptq_learned_row
        if self.metrics.get("guard", {}).get("kept") == "start":  # (RTN recipes: the guard judged the RTN rows)
            label += GUARD_KEPT_START
        grid = self.learned_w_clips if gptq_learned_grid(cfg.quant, gq.w) else None
        self.metrics["ppl_gptq"] = self._gptq_ppl(label, self.model, gq, self.learned_clips or "none", grid or "none")
        if backup is not None:
            self.model.load_state_dict(backup)
            del backup
        elif start:  # GPTQ rewrote the fused model and nothing after this row needs it: one model in memory
            self.model = self.plan = None
        if start:
            model = self._load_model()
            plan = prepare_model(model, cfg.rotation.layout)
            fold_rotations(plan.placements, self.start, plan.layout.use_float64, device=self.state.device)
            self.metrics["ppl_gptq_start"] = self._gptq_ppl(
                f"{name} GPTQ, {ROTATION_MODE_LABELS[cfg.rotation.init]} rotation", model, gq, "none", "none")
        return [label, self.metrics["ppl_gptq"], self.metrics.get("ppl_gptq_start")]

    @property
    def _rtn_learned_row(self) -> str:
        return f"{self.quant.name} RTN, learned rotation"

    @property
    def _gptq_learned_row(self) -> str:
        return f"{self._gptq_settings()[1]} GPTQ, learned rotation"

    def _gptq_settings(self) -> tuple[QuantSettings, str]:
        """The GPTQ rows' quantizers (GPTQ weights, the recipe's activations and K/V) and the name their rows
        carry."""
        gq = QuantSettings.for_gptq(self.cfg.quant)
        return gq, gq.name.removesuffix("KV16")

    def _gptq_ppl(self, label: str, model, gq: QuantSettings, activation_clips, weight_clips) -> float:
        """GPTQ (the recipe's quant.gptq settings; on the grid of ``weight_clips`` where given) on ``model``'s float
        weights, in place; its row of the table."""
        from .config import gptq_kwargs
        from .evaluate import evaluate_setting

        cfg = self.cfg
        g = cfg.quant.gptq
        res = evaluate_setting(
            model, self.windows, rotation="none", quant=gq, w_method="gptq", calib_blocks=self.blocks[: g.nsamples],
            gptq_kwargs=gptq_kwargs(g),
            r3=cfg.rotation.r3, online=self.online, batch_size=cfg.eval.batch_size, progress=self.main,
            activation_clips=activation_clips, weight_clips=weight_clips,
        )
        self.metrics["rows"][label] = res["ppl"]
        _log(f"{label}: perplexity {res['ppl']:.3f}", self.main)
        return res["ppl"]

    @property
    def profiling(self) -> bool:
        """Whether the outlier pictures are drawn (the optional extra ``plots``): the same answer on every rank."""
        try:
            from .plots import activation_profile  # noqa: F401
        except ImportError:
            return False
        return True

    def _activation_profile(self, model) -> dict | None:
        """The activation outlier profile of ``model`` (quantizers off) on the main process; every rank runs it on a
        sharded view."""
        if not self.profiling or not (self.main or self.sharded):
            return None
        from .plots import activation_profile

        profile = activation_profile(model, self.blocks[:PROFILE_BLOCKS])
        return profile if self.main else None

    def _pictures(self) -> None:
        """training_curve.png and outlier_profile.png (optional extra ``plots``: skipped, with one line, without it)."""
        try:
            from .plots import plot_outlier_profile, plot_training_curve
        except ImportError:
            return
        written = {}
        if any("loss" in e for e in self.trainer.state.log_history):  # none when max_steps < logging_steps
            written["training_curve"] = plot_training_curve(self.trainer.state.log_history,
                                                            self.staging / artifacts.TRAINING_CURVE_FILE)
        before, after = getattr(self, "profile_before", None), getattr(self, "profile_after", None)
        if before and after:
            written["outlier_profile"] = plot_outlier_profile(before, after,
                                                              self.staging / artifacts.OUTLIER_PROFILE_FILE)
        self.images = {k: Path(v) for k, v in written.items() if v is not None}

    def _log_to_wandb(self) -> None:
        try:
            from .plots import log_to_wandb
        except ImportError:
            return
        log_to_wandb(self.metrics, self.images)  # before the staged files move


def _inverse_then(applied: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices that, folded after ``applied``, leave ``wanted`` in the weights: R_applied^T R_wanted."""
    return {k: applied[k].double().T @ wanted[k].double() for k in applied}


def run_training(cfg, callbacks=()) -> dict:
    """Run the whole job described by a validated recipe; returns the metrics dict."""
    return RotationJob(cfg, callbacks).run()


__all__ = ["RotationJob", "run_training"]
