"""Perplexity of a (rotated, quantized) model, and one row of the results table: rotation x quantizer.

``evaluate_setting`` is what ``spinlearn eval`` runs: load, rotate (none / random Hadamard / learned),
optionally GPTQ the weights, install the fake quantizers of ``fakequant.py`` and measure perplexity.

Where a learned rotation is found (``--rotation learned``):
  * an exported model (``train_rotations.py`` writes ``OUT/model/`` and ``OUT/rotations.safetensors``; ``spinlearn
    rotate`` writes both into one directory) already holds its rotations: ``rotations.safetensors`` in the model
    directory or its parent marks it. Nothing is folded again. A run's model is a plain float model; the online
    Hadamards its recipe used (``recipe.yaml`` beside it) are applied when it is evaluated, as in training.
  * a plain (unrotated) model plus ``rotations_file``: the file's matrices are folded with ``layout``.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .artifacts import ACTIVATION_CLIPS_FILE, RECIPE_FILE, ROTATIONS_FILE, WEIGHT_CLIPS_FILE
from .loading import check_safetensors  # re-exported; loading.py is its home
from .choices import EVAL_ROTATIONS as ROTATIONS
from .choices import WEIGHT_METHODS as W_METHODS
from .quant import QuantSpec
from .fakequant import KV_ATTR, set_activation_clips, set_weight_clips, wrap_model
from .online import fold_online, online_linears
from .quant import QuantSettings


__all__ = [
    "perplexity", "evaluate_setting", "learned_source", "check_safetensors", "recorded_rotations_file",
    "apply_rotations_file",
    "ROTATIONS_FILE",
]


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True, desc: str = "ppl",
    over_ranks: bool = False,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows [n, seqlen] (labels = the inputs, HF's shifted loss).

    Runs inside ``parametrize.cached()``: rotated/quantized weights are computed once, not per window.
    ``over_ranks`` (a model sharded over the ranks, ``spinlearn.sharded``; a collective call): each rank takes every
    world-th window, all ranks run the same number of forwards (a short share repeats a window it then drops), the
    sums are all-reduced, and nothing is cached (a sharded layer's full weight lives only inside its forward)."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs token windows [n >= 1, seqlen >= 2], got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = next(model.parameters()).device
    batches = _rank_batches(windows.shape[0], batch_size, over_ranks)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # NLL total, token count
    try:
        with contextlib.nullcontext() if over_ranks else parametrize.cached():
            for index, counted in tqdm(batches, desc=desc, disable=not progress):
                batch = windows[index].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss  # mean over batch * (seqlen-1)
                if counted:
                    n = batch.shape[0] * (batch.shape[1] - 1)
                    sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    finally:
        model.train(was_training)
    if over_ranks:
        import torch.distributed as dist

        reduced = sums.to(device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    nll = (sums[0] / sums[1]).item()
    if not math.isfinite(nll):
        raise FloatingPointError(f"perplexity: the mean NLL is {nll} (the quantized model produced NaN/inf logits)")
    return math.exp(nll)


def _rank_batches(n: int, batch_size: int, over_ranks: bool) -> list[tuple[torch.Tensor, bool]]:
    """(window indices, counted) per forward of this rank: all windows, or every world-th one padded with repeats
    of window 0 (not counted) to the same number of forwards on every rank."""
    mine, per_rank = torch.arange(n), n
    if over_ranks:
        import torch.distributed as dist

        world = dist.get_world_size()
        mine, per_rank = mine[dist.get_rank()::world], -(-n // world)
    rounds = -(-per_rank // batch_size)
    out = [(mine[i * batch_size:(i + 1) * batch_size], True) for i in range(rounds)]
    return [(idx, True) if len(idx) else (torch.zeros(1, dtype=torch.long), False) for idx, _ in out]


# ----------------------------------------------------------------------------------------- learned rotations
def recorded_rotations_file(model_dir: str | Path) -> Path | None:
    """The rotations file an export left next to its model: DIR/rotations.safetensors or its parent's."""
    d = Path(model_dir)
    for cand in (d / ROTATIONS_FILE, d.parent / ROTATIONS_FILE):
        if cand.is_file():
            return cand
    return None


def apply_rotations_file(
    model: nn.Module, path: str | Path, layout: str = "transformer_universal"
) -> dict[str, torch.Tensor]:
    """Fold the matrices of a rotations file (e.g. a training checkpoint's) into a plain model, in place.

    The file must hold exactly the instances the layout makes for this model (``r1``, ``r2.model.layers.0``...)
    with matching sizes; anything else means another model or another layout, and nothing is changed."""
    from .artifacts import load_rotations
    from .fusion import fold_rotations
    from .layout import load_layout, resolve_dims, resolve_placements
    from .rotation_plan import prepare_model
    from .rotations import orthogonality_error

    matrices = load_rotations(path)
    # The names the layout makes for this model, checked before prepare_model edits it (norm fusion, untying).
    lay = load_layout(layout)
    dims = resolve_dims(lay, model.config)
    expected = {}
    for p in resolve_placements(model, lay, dims):
        expected.setdefault(p.instance, dims[p.matrix])
    missing, extra = sorted(set(expected) - set(matrices)), sorted(set(matrices) - set(expected))
    if missing or extra:
        raise ValueError(
            f"rotations file {str(path)!r} does not fit this model with layout {lay.name!r}: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
            f"{'...' if len(extra) > 4 else ''} (expected {len(expected)} matrices, e.g. {sorted(expected)[:3]})"
        )
    for name, n in expected.items():
        if tuple(matrices[name].shape) != (n, n):
            raise ValueError(
                f"rotations file {str(path)!r}: matrix {name!r} has shape {tuple(matrices[name].shape)}, "
                f"layout {lay.name!r} needs ({n}, {n}) for this model"
            )
        err = orthogonality_error(matrices[name].double())
        if err > 1e-4:
            raise ValueError(
                f"rotations file {str(path)!r}: matrix {name!r} is not orthogonal (|R^T R - I| = {err:.1e})"
            )
    plan = prepare_model(model, lay)
    if plan.mean_preserving:  # LayerNorm with bias: the residual matrix must map the all-ones vector to itself
        from .rotations import ones_residual

        for name, (mname, _) in plan.instances().items():
            if mname == plan.residual_matrix and ones_residual(matrices[name].double()) > 1e-4:
                raise ValueError(
                    f"rotations file {str(path)!r}: matrix {name!r} does not map the all-ones vector to itself "
                    f"(max |R 1 - 1| = {ones_residual(matrices[name].double()):.1e}); this LayerNorm model "
                    "(biased norms) stays exact only with such a residual rotation"
                )
    fold_rotations(plan.placements, {k: v.double() for k, v in matrices.items()}, plan.layout.use_float64)
    _fold_sibling_scales(model, plan, Path(path))
    return matrices


def _fold_sibling_scales(model: nn.Module, plan, rotations_path: Path) -> None:
    """A run that learned scales wrote them beside its rotations (``scales.safetensors``; a checkpoint: the log-scales):
    they belong to the same transform and are folded after the rotations."""
    from .artifacts import LOG_SCALES_FILE, SCALES_FILE, load_rotations
    from .scales_fold import fold_scales

    if (rotations_path.parent / SCALES_FILE).is_file():
        scales = {k: v.double() for k, v in load_rotations(rotations_path.parent / SCALES_FILE).items()}
    elif (rotations_path.parent / LOG_SCALES_FILE).is_file():
        scales = {k: v.double().exp() for k, v in load_rotations(rotations_path.parent / LOG_SCALES_FILE).items()}
    else:
        return
    print(f"spinlearn: folding the learned scales found beside {rotations_path.name} ({len(scales)} vectors)",
          file=sys.stderr)
    fold_scales(model, plan, scales)


# --------------------------------------------------------------------------------------------- one setting
@torch.no_grad()
def _rtn_bare_weights(model: nn.Module, spec: QuantSpec) -> list[str]:
    """RTN for weights GPTQ does not handle (3-D MoE expert tensors, not nn.Linear), so no weight stays float."""
    from .layout import addressable_targets
    from .quant import quantize_weight

    names = []
    for name, t in addressable_targets(model).items():
        if t.module is None and spec.enabled:
            w = t.weight
            w.copy_(quantize_weight(w.detach().reshape(-1, w.shape[-1]), spec).reshape(w.shape))
            names.append(name)
    return names


def _load(model_path_or_model, dtype, trust_remote_code: bool = False):
    if isinstance(model_path_or_model, nn.Module):
        return model_path_or_model, None
    from .loading import check_model_path, load_causal_lm

    path = check_model_path(model_path_or_model)
    from .export.loading import is_export, load_export

    try:
        if is_export(path):  # compressed-tensors export: decompress and apply its online transforms
            check_safetensors(path)  # (load_causal_lm checks a plain model's files itself)
            model = load_export(path, dtype=dtype, trust_remote_code=trust_remote_code)
            info = model.spinlearn_export
            acts = f"; {info['activations']} activation quantization applied" if info["activations"] else ""
            print(f"loaded export {path} ({info['format'] or 'float'}): weights decompressed with compressed-tensors, "
                  f"online input transforms applied on {len(info['online'])} layers{acts}", file=sys.stderr)
            return model, path
        return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code), path
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # safetensors' own error types, e.g. data shorter than the header says
        raise ValueError(f"cannot load the model in {str(path)!r}: {type(e).__name__}: {e}") from e


def learned_source(model_path_or_model, rotations_file: str | Path | None = None) -> tuple[str, Path | None]:
    """Where ``--rotation learned`` takes its rotations from, checked from config.json alone (before loading).

    Returns ("exported", recorded file or None) for a model that already holds them, or ("file", path) when the
    matrices of ``rotations_file`` are to be folded into a plain model. Raises ValueError otherwise."""
    is_model = isinstance(model_path_or_model, nn.Module)
    where = type(model_path_or_model).__name__ if is_model else str(model_path_or_model)
    recorded = None if is_model else recorded_rotations_file(model_path_or_model)
    exported = recorded is not None
    if rotations_file is not None:
        rf = Path(rotations_file)
        if not rf.is_file():
            raise FileNotFoundError(f"rotations file {str(rotations_file)!r} does not exist")
        if recorded is not None and rf.resolve() == recorded.resolve():
            return "exported", recorded
        if exported:
            raise ValueError(
                f"model {where!r} already has rotations folded in (recorded: {recorded}); "
                "drop --rotations, or pass the unrotated model"
            )
        return "file", rf
    if not exported:
        raise ValueError(
            f"--rotation learned needs a model exported by train_rotations.py (no recorded rotations in {where}: "
            f"no {ROTATIONS_FILE} in the model directory or its parent); "
            "or pass --rotations FILE together with the unrotated model"
        )
    return "exported", recorded


def run_dir_of(model_dir: str | Path) -> Path | None:
    """The training run a model directory belongs to (itself or its parent holds recipe.yaml and the rotations)."""
    d = Path(model_dir)
    for base in (d, d.parent):
        if (base / RECIPE_FILE).is_file() and (base / ROTATIONS_FILE).is_file():
            return base
    return None


def run_online_settings(model_dir: str | Path) -> dict:
    """The online Hadamards a training run used (``rotation.r3``, ``rotation.r4``, ``rotation.online`` of the
    ``recipe.yaml`` beside its ``model/``): the quantized model it measured applies them, so evaluating the
    export the same way applies them too. Empty for a directory that is not a run's model."""
    rot = _run_recipe_section(model_dir, "rotation")
    if rot is None:
        return {}
    return {"r3": bool(rot.get("r3")), "r4": bool(rot.get("r4")), "online": list(rot.get("online") or [])}


def _run_recipe_section(model_dir, section: str) -> dict | None:
    """A section of the recipe.yaml of the run a model directory belongs to ({} when absent; None: not a run)."""
    from omegaconf import OmegaConf

    base = run_dir_of(model_dir)
    if base is None:
        return None
    return OmegaConf.to_container(OmegaConf.load(base / RECIPE_FILE)).get(section) or {}


CLIP_KINDS = {  # kind -> (the run's file, the CLI flag, what must be quantized for the ratios to act)
    "activation": (ACTIVATION_CLIPS_FILE, "--activation-clips", "quantized activations or K/V; pass --a-bits 4 or "
                   "--kv-bits 4 (or another width below 16)"),
    "weight": (WEIGHT_CLIPS_FILE, "--weight-clips", "int weights, round-to-nearest (without --w-clip) or GPTQ's grid; "
               "pass --w-bits 4 (or another width below 16)"),
}


def recorded_clips(model_dir: str | Path, kind: str) -> Path | None:
    """The learned clip ratios (``kind`` activation: ``quant.learn_a_clip`` / ``learn_kv_clip``; weight:
    ``quant.learn_w_clip``) of the run a model directory belongs to, if any."""
    base = run_dir_of(model_dir)
    path = base / CLIP_KINDS[kind][0] if base is not None else None
    return path if path is not None and path.is_file() else None


def check_clips_file(file: str | Path, kind: str, applies: bool) -> Path:
    """A clip-ratio file given explicitly must exist and meet what it acts on (cheap: nothing is loaded)."""
    _, flag, needs = CLIP_KINDS[kind]
    if not applies:
        raise ValueError(f"{flag} {file}: {kind} clip ratios apply to {needs}")
    if not Path(file).is_file():
        raise FileNotFoundError(f"{flag} {str(file)!r} does not exist")
    return Path(file)


def _recorded_weight_clips_apply(model_dir, w: QuantSpec, w_method: str) -> bool:
    """Whether the run's recorded weight clip ratios fit weights quantized to ``w``: the grid (bits, symmetric, group
    size) its recipe learned them on, and for GPTQ its ``quant.gptq.learned_grid`` (one read of the recipe)."""
    q = _run_recipe_section(model_dir, "quant")
    if q is None or (q.get("w_bits"), q.get("w_sym", True), q.get("w_groupsize", -1)) != (w.bits, w.sym, w.group_size):
        return False
    return w_method != "gptq" or bool((q.get("gptq") or {}).get("learned_grid", True))


def _clips(given, kind: str, path, is_run_model: bool, applies: bool, recorded_applies: bool = True) -> dict | None:
    """The clip table to apply: a table or a file given, the run's recorded one (``None``: the default for a run's
    model, when it ``recorded_applies``), or none (``"none"``). Clip ratios only act where ``applies``."""
    from .artifacts import load_rotations

    if given == "none":
        return None
    if isinstance(given, dict):
        return given if applies else None
    if given is not None:
        return load_rotations(check_clips_file(given, kind, applies))
    file = recorded_clips(path, kind) if is_run_model else None
    return load_rotations(file) if file is not None and applies and recorded_applies else None


def _eval_clips(activation_clips, weight_clips, path, run_model: bool, quant: QuantSettings, w_method: str):
    """(activation clip table, weight clip table) an evaluation applies (see ``_clips``): weight ratios act on int
    weights, by round-to-nearest (without the MSE search) or as GPTQ's grid, and a run's recorded ones only on the
    grid (bits, symmetry, group size) its recipe learned them for (GPTQ: with its ``quant.gptq.learned_grid``)."""
    clips = _clips(activation_clips, "activation", path, run_model, quant.a.enabled or quant.kv.enabled)
    if clips:  # a linear input's ratio acts with quantized activations, a K/V one with a quantized cache
        clips = {n: r for n, r in clips.items() if (quant.kv.enabled if f".{KV_ATTR}." in n else quant.a.enabled)}
    w = quant.w
    applies = w.enabled and w.format == "int" and (w_method == "gptq" or not w.mse_clip)
    recorded = run_model and _recorded_weight_clips_apply(path, w, w_method)
    w_clips = _clips(weight_clips, "weight", path, run_model, applies, recorded)
    return clips, w_clips


def _spec_dict(spec: QuantSpec) -> dict:
    return asdict(spec)


def zero_shot(model: nn.Module, tokenizer, tasks, *, batch_size: int = 1, limit: int | None = None) -> dict:
    """Zero-shot accuracy through the lm-eval harness (optional extra: ``pip install 'spinlearn[eval]'``) on the
    model *as it is now*, i.e. with whatever rotations and fake quantizers are installed on it.

    The harness loads its task data through ``datasets``; offline, that works only when the data is already in
    the local cache. Returns {task: {metric: value}}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(
            "zero-shot evaluation needs the lm-eval harness: pip install 'spinlearn[eval]' (lm-eval with its hf extra)"
        ) from e
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit)
    except (ConnectionError, OSError) as e:
        raise ValueError(
            f"task data for {list(tasks)} is not available locally ({type(e).__name__}: {e}); "
            "download it once with network access, then run offline"
        ) from e
    results = out.get("results", {}) if isinstance(out, dict) else {}
    return {task: {k: v for k, v in metrics.items() if isinstance(v, int | float)} for task, metrics in results.items()}


def evaluate_setting(
    model_path_or_model,
    windows: torch.Tensor,
    *,
    rotation: str = "none",
    quant: QuantSettings | None = None,
    w_method: str = "rtn",
    calib_blocks: torch.Tensor | None = None,
    rotations_file: str | Path | None = None,
    layout: str = "transformer_universal",
    seed: int = 0,
    r3: bool = False,
    r4: bool = False,
    online=None,
    gptq_kwargs: dict | None = None,
    dtype: str | torch.dtype = "auto",
    batch_size: int = 1,
    progress: bool = True,
    tasks=None,
    tokenizer=None,
    task_limit: int | None = None,
    activation_clips: str | Path | dict | None = None,
    weight_clips: str | Path | dict | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Perplexity of one (rotation, quantization) setting; returns {"ppl": float, "settings": {...}}.

    rotation: "none" quantizes the model as it is; "hadamard" folds random Hadamard R1/R2 (``rotation_plan.rotate``,
    ``seed``); "learned" needs an exported model or ``rotations_file`` (see the module docstring).
    r3/r4/online add online Hadamards (``online.online_linears``; their weight half is folded first); a learned
    run's model also gets the ones its recipe used (``run_online_settings``), and the activation clip ratios it
    learned (``activation_clips``: None = the run's recorded ones, a file's path, a table, or "none"), and likewise
    its learned weight clip ratios (``weight_clips``; recorded ones apply to RTN weights on the run's grid). w_method
    "gptq" runs ``gptq_quantize_model`` on the rotated float model with ``calib_blocks`` [n, seqlen] and then
    evaluates with weights left as GPTQ made them (the wrappers' weight quantizer off; activations/KV as ``quant``).
    A model object (instead of a path) is modified in place: rotated, and quantized by GPTQ."""
    quant = quant or QuantSettings()
    _check_setting(rotation, w_method, rotations_file, calib_blocks)
    source = learned_source(model_path_or_model, rotations_file) if rotation == "learned" else None
    model, path = _load(model_path_or_model, dtype, trust_remote_code)
    model.eval()
    settings: dict = {"model": str(path) if path is not None else type(model).__name__,
                      "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                      "rotation": rotation, "layout": layout, "w_method": w_method}
    _apply_rotation(model, rotation, source, layout, seed, settings)
    # A run's model/ gets the online Hadamards its recipe used; a compressed-tensors export already applies its own.
    is_run_model = source is not None and source[0] == "exported" and path and not hasattr(model, "spinlearn_export")
    recorded = run_online_settings(path) if is_run_model else {}
    use_r3 = bool(r3) or recorded.get("r3", False)
    use_r4 = bool(r4) or recorded.get("r4", False)
    names = online_linears(model, [*(online or []), *recorded.get("online", [])], use_r4)
    fold_online(model, names)  # the weight half; the online half is installed with the quantizers
    settings.update(r3=use_r3, r4=use_r4, online=len(names), online_recorded=sorted(k for k, v in recorded.items() if v))
    eval_quant = quant
    clips, w_clips = _eval_clips(activation_clips, weight_clips, path, bool(is_run_model), quant, w_method)
    settings["activation_clips"], settings["weight_clips"] = len(clips or ()), len(w_clips or ())
    if w_method == "gptq":  # the learned weight clips set GPTQ's grid; the weights then stay as GPTQ made them
        eval_quant = _gptq_weights(model, quant, calib_blocks, gptq_kwargs, r3=use_r3, online=names,
                                   progress=progress, settings=settings, weight_clips=w_clips, activation_clips=clips)
        w_clips = None
    handle = wrap_model(model, quant=eval_quant, r3=use_r3, online=names, online_in_weights=False)
    zero = None
    try:
        if clips:
            set_activation_clips(model, clips)
        if w_clips:
            set_weight_clips(model, w_clips)
        ppl = perplexity(model, windows, batch_size=batch_size, progress=progress, desc=f"ppl {rotation}")
        if tasks:
            zero = zero_shot(model, tokenizer or _tokenizer_for(path), tasks, batch_size=batch_size, limit=task_limit)
    finally:
        handle.remove()
    settings.update(
        w=_spec_dict(quant.w), a=_spec_dict(quant.a), kv=_spec_dict(quant.kv), lm_head=_spec_dict(quant.lm_head),
        eval_windows=int(windows.shape[0]), eval_seqlen=int(windows.shape[1]), batch_size=batch_size,
    )
    result = {"ppl": ppl, "settings": settings}
    if zero is not None:
        result["zero_shot"] = zero
    return result


def _check_setting(rotation: str, w_method: str, rotations_file, calib_blocks) -> None:
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation={rotation!r}: use one of {', '.join(ROTATIONS)}")
    if w_method not in W_METHODS:
        raise ValueError(f"w_method={w_method!r}: use one of {', '.join(W_METHODS)}")
    if rotations_file is not None and rotation != "learned":
        raise ValueError(f"a rotations file ({rotations_file}) only goes with rotation 'learned', not {rotation!r}")
    if w_method == "gptq" and (calib_blocks is None or calib_blocks.numel() == 0):
        raise ValueError(
            "GPTQ needs calibration data: pass calib_blocks (CLI: --calib-data FILE), or use --w-method rtn"
        )


def _apply_rotation(model: nn.Module, rotation: str, source, layout: str, seed: int, settings: dict) -> None:
    """Fold the setting's R1/R2: random Hadamard, a rotations file, or nothing (an export already holds them)."""
    if rotation == "hadamard":
        from .rotation_plan import rotate

        rotate(model, layout, mode="hadamard", seed=seed)
        settings["seed"] = seed
    elif source is not None and source[0] == "file":
        apply_rotations_file(model, source[1], layout)
        settings["rotations_file"] = str(source[1])
        settings["rotations_folded"] = True
    elif source is not None:
        settings["rotations_file"] = str(source[1]) if source[1] else None
        settings["rotations_folded"] = False  # the export already holds them


def _gptq_weights(model: nn.Module, quant: QuantSettings, calib_blocks, gptq_kwargs, *, r3: bool, online,
                  progress: bool, settings: dict, weight_clips: dict | None = None,
                  activation_clips: dict | None = None) -> QuantSettings:
    """GPTQ on the rotated float model (online Hadamards installed), on the grid of the learned ``weight_clips``
    (weight name -> ratios) where given; returns the settings to evaluate with: weights left as GPTQ made them,
    activations/KV as ``quant``. With ``refit`` (the default) the calibration runs with ``quant``'s activation and
    K/V quantizers (and the ``activation_clips``) on, as the evaluation will, for GPTQ's asymmetric calibration;
    without it, in float."""
    from .config import gptq_kwargs as default_kwargs
    from .gptq import gptq_linears, gptq_quantize_model

    kw = {**default_kwargs(), **(gptq_kwargs or {})}
    linears = gptq_linears(model)
    grids = {n.removesuffix(".weight"): r for n, r in (weight_clips or {}).items()
             if n.removesuffix(".weight") in linears}  # (3-D expert tensors: RTN below, without them)
    calib = quant.for_calibration() if kw["refit"] else QuantSettings()
    hooks = wrap_model(model, quant=calib, r3=r3, online=online, online_in_weights=False)
    try:
        if kw["refit"] and activation_clips:
            set_activation_clips(model, activation_clips)
        errors = gptq_quantize_model(model, calib_blocks, quant.w, progress=progress, clips=grids, **kw)
    finally:
        hooks.remove()
    settings["gptq"] = {**kw, "nsamples": int(calib_blocks.shape[0]), "seqlen": int(calib_blocks.shape[1]),
                        "layers_quantized": len(errors), "learned_grid": len(grids),
                        "rtn_fallback": _rtn_bare_weights(model, quant.w)}
    return QuantSettings(w=QuantSpec(bits=16), a=quant.a, kv=quant.kv, lm_head=quant.lm_head)


def _tokenizer_for(path):
    if path is None:
        raise ValueError("zero-shot tasks need a tokenizer (pass tokenizer= with a model object)")
    from .loading import load_tokenizer

    return load_tokenizer(path)
