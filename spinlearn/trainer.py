"""The Hugging Face Trainer subclass that learns the rotations.

Only the RotationBank's Stiefel parameters are optimised (plus, when given, the learned scales and activation clip
logits, with Adam, through one ``optim.MultiOptimizer``); the model's weights are frozen. The loss is the
causal-LM cross-entropy of the fake-quantized model (``losses.causal_lm_cross_entropy``), optionally plus
KL(teacher || student) per token (``losses.kl_teacher_student``), the float teacher being the same wrapped model
with every wrapper passed through (``fakequant.float_passthrough``: the frozen weights as they are, no second copy
of them and no rotated weight recomputed for the teacher).
Checkpoints hold the rotations and the optimizer state (momentum included) as safetensors.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from .artifacts import save_safetensors
from .artifacts import LOSS_STATE_FILE, OPTIMIZER_FILE, ROTATION_PARAMS_FILE, ROTATIONS_FILE, SCHEDULER_FILE
from .artifacts import CLIP_LOGITS_FILE, LOG_SCALES_FILE
from .losses import training_loss
from .optim import CayleySGD, MultiOptimizer, tangent_part
from .rotations import RotationBank



class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"the loss became {value} at step {step}; training stopped (lower the learning rate?)")
        self.step = step


def make_optimizer(name: str, params, lr: float, momentum: float):
    import geoopt

    if name == "cayley_sgd":
        # Two fixed-point iterations only approximate the Cayley transform: at lr 1.5 the drift reaches 1e-2 in
        # 100 steps. A deterministic polar re-orthonormalisation after every step keeps R on the manifold.
        return CayleySGD(params, lr=lr, momentum=momentum, reorth_every=1)
    if name == "riemannian_sgd":
        return geoopt.optim.RiemannianSGD(params, lr=lr, momentum=momentum, stabilize=10)
    if name == "riemannian_adam":
        return geoopt.optim.RiemannianAdam(params, lr=lr, stabilize=10)
    raise ValueError(f"rotation.optimizer={name!r}: use cayley_sgd, riemannian_sgd or riemannian_adam")


def _flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in json.loads(meta["scalars"]).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def _global_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.norm(torch.stack([t.norm() for t in tensors]))) if tensors else 0.0


class RotationLogger(TrainerCallback):
    """Keeps what the rotation log fields need: the rotation gradient's norm after the Trainer's clipping
    (``train.max_grad_norm`` acts on the Euclidean gradient), the norm of its tangent part (what moves the
    rotations) and the training start time.

    The fields themselves are added in ``RotationTrainer.log``: a callback's ``on_log`` runs after the Trainer has
    stored the entry and after the reporting callbacks (wandb) have sent it, so additions there are lost."""

    def __init__(self, trainer: RotationTrainer):
        self.trainer = trainer
        self.grad_norm = float("nan")
        self.tangent_grad_norm = float("nan")
        self.t0: float | None = None

    def on_step_begin(self, args, state, control, **kw):
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        params = [p for p in self.trainer.bank.parameters() if p.grad is not None]
        self.grad_norm = _global_norm([p.grad for p in params])
        self.tangent_grad_norm = _global_norm([tangent_part(p, p.grad) for p in params])


class RotationTrainer(Trainer):
    def __init__(self, *args, bank: RotationBank, rotation_optimizer: str = "cayley_sgd", momentum: float = 0.0,
                 kl_weight: float = 0.0, ce_weight: float = 1.0, kl_topk: int | None = None,
                 scales=None, scales_lr: float = 1e-2, clips: dict | None = None, clips_lr: float = 0.1,
                 weight_clips: dict | None = None, weight_clips_lr: float = 0.1, **kwargs):
        """``scales`` (a ``ScaleBank``), ``clips`` (name -> learnable activation or K/V clip logit,
        ``activation_clip_params``) and ``weight_clips`` (weight name -> clip logits, ``weight_clip_params``) are
        learned with Adam at their own learning rates beside the rotations (``MultiOptimizer``)."""
        super().__init__(*args, **kwargs)
        self.scales, self.scales_lr = scales, scales_lr
        self.clips, self.clips_lr = dict(clips or {}), clips_lr
        self.weight_clips, self.weight_clips_lr = dict(weight_clips or {}), weight_clips_lr
        if self.args.max_steps <= 0:
            raise ValueError("train.max_steps must be > 0: rotation training is step-based (SpinQuant uses 100)")
        self.bank = bank
        self.rotation_optimizer = rotation_optimizer
        self.momentum = momentum
        self.kl_weight = kl_weight
        self.ce_weight = ce_weight
        self.kl_topk = kl_topk
        self.tokens_seen = 0
        self.loss_sum, self.loss_count = 0.0, 0  # the whole run's loss (restored on resume), mean over ranks
        # Our loss is a per-batch mean: let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.rotation_logger = RotationLogger(self)
        self.add_callback(self.rotation_logger)

    @property
    def all_clips(self) -> dict:
        """Every learned clip logit by name (activation quantizers and weights): what checkpoints hold."""
        return {**self.clips, **self.weight_clips}

    # -- optimisation ---------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = make_optimizer(
                self.rotation_optimizer, list(self.bank.parameters()), self.args.learning_rate, self.momentum
            )
            groups = ([{"params": list(self.scales.parameters()), "lr": self.scales_lr}] if self.scales else []) + (
                [{"params": list(self.clips.values()), "lr": self.clips_lr}] if self.clips else []) + (
                [{"params": list(self.weight_clips.values()), "lr": self.weight_clips_lr}] if self.weight_clips else [])
            if groups:
                self.optimizer = MultiOptimizer([self.optimizer, torch.optim.Adam(groups, foreach=False)])
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        self.tokens_seen += input_ids.numel() * self.args.world_size
        loss, outputs = training_loss(model, input_ids, inputs.get("labels"), ce_weight=self.ce_weight,
                                      kl_weight=self.kl_weight, kl_topk=self.kl_topk,
                                      unwrapped=self.accelerator.unwrap_model(model))
        mean_loss = self._mean_over_ranks(loss)
        if not math.isfinite(mean_loss):
            local = float(loss.detach())  # finite here when another rank hit the non-finite loss
            raise NonFiniteLossError(self.state.global_step + 1, local if not math.isfinite(local) else float("nan"))
        self.loss_sum += mean_loss
        self.loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        """The loss averaged over ranks (NaN if it is not finite on some rank). Under DDP a rank that stopped alone
        would leave the others waiting in the gradient all-reduce forever, so every rank learns about a
        non-finite loss anywhere; the same collective gives every rank the same whole-run loss."""
        value = loss.detach().to(torch.float64).reshape(1)
        stats = torch.cat([value.nan_to_num(0.0, 0.0, 0.0), (~torch.isfinite(value)).to(torch.float64)])
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = stats.to(self.args.device)
            torch.distributed.all_reduce(stats)
        total, bad = stats.tolist()
        return float("nan") if bad > 0 else total / self.args.world_size

    def whole_run_loss(self) -> float:
        """Mean training loss over every micro-batch of the run, resumed steps included."""
        return self.loss_sum / max(self.loss_count, 1)

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training-step entries only (not the final summary)
            logs["rot_grad_norm"] = self.rotation_logger.grad_norm
            logs["rot_tangent_grad_norm"] = self.rotation_logger.tangent_grad_norm
            logs["max_orth_error"] = self.bank.max_orthogonality_error()
            if self.scales is not None:
                logs["scale_min"], logs["scale_max"] = self.scales.range()
            t0 = self.rotation_logger.t0
            elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
            if elapsed > 0:
                logs["tokens_per_s"] = self.tokens_seen / elapsed
        super().log(logs, start_time)

    # -- checkpoints: rotations + optimizer state as safetensors ---------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # every rank calls this; only the main one writes
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_safetensors({n: m.cpu().contiguous() for n, m in self.bank.matrices().items()},
                  os.path.join(output_dir, ROTATIONS_FILE))
        if self.bank.preserve_ones:  # the optimizer's variables are not the matrices: keep them exactly too
            save_safetensors({n: t.cpu().contiguous() for n, t in self.bank.parameter_tensors().items()},
                      os.path.join(output_dir, ROTATION_PARAMS_FILE))
        if self.scales is not None:
            save_safetensors(self.scales.log_scales(), os.path.join(output_dir, LOG_SCALES_FILE))
        if self.all_clips:
            save_safetensors({n: p.detach().cpu().clone() for n, p in self.all_clips.items()},
                             os.path.join(output_dir, CLIP_LOGITS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, ROTATIONS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {resume_from_checkpoint!r} has no {ROTATIONS_FILE}")
        self.bank.load_matrices(load_file(path))  # checks every matrix (a mean-preserving one must map 1 to 1)
        params = os.path.join(resume_from_checkpoint, ROTATION_PARAMS_FILE)
        if self.bank.preserve_ones and os.path.isfile(params):
            self.bank.load_parameter_tensors(load_file(params))  # bit-exact: Q itself, not Q recovered from R
        self._load_extra(resume_from_checkpoint)

    def _load_extra(self, checkpoint: str) -> None:
        """The learned scales and clip logits of a checkpoint (when this run learns them)."""
        for wanted, name in ((self.scales is not None, LOG_SCALES_FILE), (bool(self.all_clips), CLIP_LOGITS_FILE)):
            if wanted and not os.path.isfile(os.path.join(checkpoint, name)):
                raise FileNotFoundError(f"checkpoint {checkpoint!r} has no {name} (was it saved by a run that "
                                        "learned scales / clip ratios?)")
        if self.scales is not None:
            self.scales.load_log_scales(load_file(os.path.join(checkpoint, LOG_SCALES_FILE)))
        if self.all_clips:
            saved = load_file(os.path.join(checkpoint, CLIP_LOGITS_FILE))
            missing = sorted(set(self.all_clips) - set(saved))
            if missing:
                raise KeyError(f"checkpoint {checkpoint!r}: clip logits missing for {missing[:3]}")
            with torch.no_grad():
                for n, p in self.all_clips.items():
                    p.copy_(saved[n].to(p.dtype))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        tensors, meta = _flatten_optimizer_state(self.optimizer.state_dict())
        save_safetensors(tensors, os.path.join(output_dir, OPTIMIZER_FILE), metadata=meta)
        with open(os.path.join(output_dir, LOSS_STATE_FILE), "w") as f:
            json.dump({"loss_sum": self.loss_sum, "loss_count": self.loss_count}, f)
        sched = {k: v for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        with open(os.path.join(output_dir, SCHEDULER_FILE), "w") as f:
            json.dump(sched, f)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        from safetensors import safe_open

        path = os.path.join(checkpoint, OPTIMIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {checkpoint!r} has no {OPTIMIZER_FILE}")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.optimizer.load_state_dict(_unflatten_optimizer_state(tensors, meta))
        loss_state = os.path.join(checkpoint, LOSS_STATE_FILE)
        if os.path.isfile(loss_state):
            with open(loss_state) as f:
                saved = json.load(f)
            self.loss_sum, self.loss_count = float(saved["loss_sum"]), int(saved["loss_count"])
        with open(os.path.join(checkpoint, SCHEDULER_FILE)) as f:
            sched = json.load(f)
        self.lr_scheduler.load_state_dict({**self.lr_scheduler.state_dict(), **sched})

    def finalize_rotations(self) -> None:
        """One deterministic re-orthonormalisation at the end (identical on every rank)."""
        if isinstance(self.optimizer, CayleySGD):
            self.optimizer.orthonormalize_()
        else:
            from .optim import polar_orthonormalize

            with torch.no_grad():
                for p in self.bank.parameters():
                    p.copy_(polar_orthonormalize(p))
