"""Pictures of a run and its results in wandb: the training curve, the activation outlier profile.

* :func:`plot_training_curve` draws loss, learning rate, orthogonality error and rotation gradient norm
  against the step from a Trainer's ``state.log_history`` (fields written by ``RotationTrainer.log``).
* :func:`activation_profile` measures, for the input of every quantized linear (every ``nn.Linear`` but
  lm_head; for fused 3-D MoE experts the experts module's input), how outlier-heavy it is: the ratio of the
  largest to the median per-channel max magnitude, and the kurtosis of its values. Quantizers are switched off
  while it runs, online Hadamards (R4) stay on: it profiles what the activation quantizer would see.
  :func:`plot_outlier_profile` draws two such profiles (before / after rotation) per layer.
* :func:`log_to_wandb` puts the results table (every perplexity row, the GPTQ row, steps, tokens/s) and the
  pictures into the active wandb run; a no-op without one.

matplotlib is an optional extra (``pip install "spinlearn[plots]"``): without it the plot functions log one
line saying so and return None.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["CURVE_FIELDS", "CURVE_PANELS", "PROFILE_KEYS", "SUMMARY_KEYS", "activation_profile", "log_to_wandb",
           "plot_outlier_profile", "plot_training_curve"]

logger = logging.getLogger(__name__)
INSTALL_HINT = 'matplotlib is not installed: pip install "spinlearn[plots]" to get the run\'s PNG pictures; skipped'
# the training curve's panels: (title, log_history fields -> legend label (None: no legend), log-scale y axis)
CURVE_PANELS = (
    ("training loss", {"loss": None}, False),
    ("learning rate", {"learning_rate": None}, False),
    ("orthogonality error max|R^T R - I|", {"max_orth_error": None}, True),
    ("rotation gradient norm", {"rot_grad_norm": "after clipping", "rot_tangent_grad_norm": "its tangent part"}, True),
)
CURVE_FIELDS = tuple(field for _, fields, _ in CURVE_PANELS for field in fields)
# activation_profile's statistics -> axis label
PROFILE_KEYS = {"max_median_ratio": "max / median channel magnitude", "kurtosis": "kurtosis"}
# metrics.json keys (spinlearn.job) copied to the wandb summary besides the perplexity rows
SUMMARY_KEYS = ("ppl_float", "ppl_quant_no_rotation", "ppl_quant_before", "ppl_quant_after", "ppl_gptq", "steps",
                "train_time_s", "train_tokens_per_s", "final_train_loss", "max_orth_error", "wall_time_s")
_hint_logged = False


def _figure_class():
    """matplotlib's Figure (no pyplot: no global state, no GUI backend), or None with one log line."""
    global _hint_logged
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _hint_logged:
            logger.warning(INSTALL_HINT)
            _hint_logged = True
        return None
    return Figure


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


# ----------------------------------------------------------------------------------------- training curve
def plot_training_curve(log_history: list[dict], path) -> Path | None:
    """PNG of loss, learning rate, orthogonality error and rotation gradient norm vs step; returns its path.

    ``log_history``: ``trainer.state.log_history`` (entries without a field are skipped for that field)."""
    entries = [e for e in log_history if "step" in e and any(k in e for k in CURVE_FIELDS)]
    if not entries:
        raise ValueError("log_history has no training-step entries (with 'step' and 'loss' or the rotation fields)")
    Figure = _figure_class()
    if Figure is None:
        return None
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (title, fields, log_y) in zip(axes, CURVE_PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        curves = {key: [(e["step"], e[key]) for e in entries if e.get(key) is not None and math.isfinite(e[key])]
                  for key in fields}
        curves = {key: pts for key, pts in curves.items() if pts}
        if not curves:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        for key, pts in curves.items():
            steps, values = zip(*pts)
            ax.plot(steps, values, marker="." if len(pts) < 50 else None, label=fields[key])
        if log_y and all(v > 0 for pts in curves.values() for _, v in pts):
            ax.set_yscale("log")
        if any(fields[key] for key in curves):
            ax.legend()
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------- activation profile
def profiled_modules(model: nn.Module, modules: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """name -> module whose input is profiled: every nn.Linear except lm_head, and the owner of each fused 3-D
    MoE experts parameter. ``modules``: names or fnmatch globs to keep (default all)."""
    from .sharded import source_name

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    for name, p in model.named_parameters():  # not the weights' values: a wrapped or sharded model computes them
        name = source_name(name)
        if p.ndim == 3 and not name.endswith(".weight"):  # fused experts [E, out, in], not e.g. a Conv1d's weight
            owner = name.rsplit(".", 1)[0]
            out.setdefault(owner, model.get_submodule(owner))
    if modules is not None:
        globs = list(modules)
        out = {n: m for n, m in out.items() if any(fnmatch.fnmatchcase(n, g) for g in globs)}
        if not out:
            raise ValueError(f"activation_profile: no quantized linear input matches {globs}")
    return out


class _InputStats:
    """Running per-channel max |x| and the first four raw moments of every value (float64)."""

    def __init__(self):
        self.chan_max: torch.Tensor | None = None
        self.moments = torch.zeros(4, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])  # on the input's device; only sums move
        cmax = x.abs().amax(0).cpu()
        self.chan_max = cmax if self.chan_max is None else torch.maximum(self.chan_max, cmax)
        self.moments += torch.stack([x.sum(), x.pow(2).sum(), x.pow(3).sum(), x.pow(4).sum()]).cpu()
        self.count += x.numel()

    def result(self) -> dict:
        m1, m2, m3, m4 = (self.moments / self.count).tolist()
        var = m2 - m1 * m1
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        median = float(torch.quantile(self.chan_max, 0.5))  # the mean of the two middle values for even counts
        return {
            "max_median_ratio": float(self.chan_max.max()) / median if median > 0 else float("inf"),
            "kurtosis": central4 / (var * var) if var > 0 else float("nan"),
            "channels": int(self.chan_max.numel()),
            "values": self.count,
        }


def _recorder(stats: _InputStats):
    def hook(module, args, kwargs):
        stats.update(args[0] if args else next(iter(kwargs.values())))

    return hook


@torch.no_grad()
def activation_profile(model: nn.Module, blocks, *, modules: Iterable[str] | None = None) -> dict[str, dict]:
    """The outlier profile of every quantized linear input on ``blocks`` (LongTensor [n, seqlen] or a list of
    1-D token tensors; a few calibration blocks are enough), with quantizers off.

    Returns ``{module name: {"max_median_ratio", "kurtosis", "channels", "values"}}``: max_median_ratio is the
    largest per-channel max |x| over the median one (channels = the last axis, max over every token), kurtosis
    the Pearson kurtosis E[(x-mu)^4] / var^2 of all input values (3 for a Gaussian)."""
    from .quant import quantizers_disabled

    targets = profiled_modules(model, modules)
    stats = {name: _InputStats() for name in targets}
    hooks = [mod.register_forward_pre_hook(_recorder(stats[name]), with_kwargs=True) for name, mod in targets.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with quantizers_disabled(model):
            for block in blocks:
                model(input_ids=torch.as_tensor(block).reshape(1, -1).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n, s in stats.items() if s.count == 0]
    if len(missing) == len(stats):
        raise ValueError("activation_profile: no blocks given, or the model ran none of the profiled modules")
    return {n: s.result() for n, s in stats.items() if s.count}


def _short(name: str) -> str:
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return f"{nums[0]}.{parts[-1]}" if nums else parts[-1]


def plot_outlier_profile(before: Mapping[str, dict], after: Mapping[str, dict], path, *,
                         labels: tuple[str, str] = ("before rotation", "after rotation")) -> Path | None:
    """PNG of two activation profiles (from :func:`activation_profile`) per layer: max/median channel ratio and
    kurtosis, log scale, one point per quantized linear input in model order; returns its path."""
    names = list(before) + [n for n in after if n not in before]
    if not names:
        raise ValueError("plot_outlier_profile: both profiles are empty")
    Figure = _figure_class()
    if Figure is None:
        return None
    fig = Figure(figsize=(max(8, min(0.18 * len(names), 40)), 7), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    x = range(len(names))
    for ax, (key, ylabel) in zip(axes, PROFILE_KEYS.items()):
        for prof, label, style in ((before, labels[0], "o-"), (after, labels[1], "s-")):
            ys = [prof[n][key] if n in prof else float("nan") for n in names]
            ax.plot(x, ys, style, markersize=3, linewidth=1, label=label)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    step = max(1, len(names) // 60)  # at most ~60 tick labels
    axes[-1].set_xticks(list(x)[::step], [_short(n) for n in names][::step], rotation=90, fontsize=7)
    axes[0].set_title("activation outliers of the quantized linear inputs, per layer")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ wandb
def log_to_wandb(metrics: Mapping, images: Mapping[str, str | Path] | None = None) -> bool:
    """Results and pictures into the active wandb run: every ``metrics["rows"]`` perplexity (label ->
    value) and the ``SUMMARY_KEYS`` present into the run summary (``results/<label>``, ``results/<key>``) and a
    ``wandb.Table`` ("results"); each PNG of ``images`` (name -> path) as a ``wandb.Image`` ("plots/<name>").
    Returns whether anything was logged: False (a no-op) when no wandb run is active."""
    wandb = sys.modules.get("wandb")  # a run can only be active if wandb was imported
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return False
    rows = dict(metrics.get("rows", {}))
    summary = {f"results/{label}": float(v) for label, v in rows.items()}
    summary.update({f"results/{k}": metrics[k] for k in SUMMARY_KEYS if metrics.get(k) is not None})
    run.summary.update(summary)
    payload: dict = {"results": wandb.Table(columns=["setting", "perplexity"],
                                            data=[[label, float(v)] for label, v in rows.items()])}
    for name, p in (images or {}).items():
        if p is not None and Path(p).is_file():
            payload[f"plots/{name}"] = wandb.Image(str(p))
    run.log(payload)
    return True
