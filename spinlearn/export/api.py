"""Export entry points: a fused float model (in memory) or a run / model directory -> a compressed-tensors checkpoint.

Steps: check everything cheap (scheme, method, calibration data, group widths, output directory); copy the model;
fold the online Hadamards ``W <- W H`` (float64) into the linears ``online.online_linears`` names; quantize with
spinlearn's RTN or GPTQ (online input hooks installed, so GPTQ's Hessians see ``x H``); compress through
compressed-tensors; write weights, config (``quantization_config`` + ``transform_config``), tokenizer and a
model card atomically. Nothing is left in OUT when a step fails.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..artifacts import (MODEL_DIR, RECIPE_FILE, WEIGHT_CLIPS_FILE, atomic_output_dir, atomic_write_text,
                         check_output_dir)
from ..config import gptq_kwargs as default_gptq_kwargs
from ..report import format_table
from .compressed import checkpoint_tensors, quantization_config, write_checkpoint
from .model_card import CardInfo, model_card
from .schemes import GROUPED_SCHEMES, ExportScheme, check_w_method, resolve_scheme
from .transforms import transform_config, transform_tensors
from .weights import check_group_widths, quantize_linears, quantized_linears

RTN_ONLY = ("nvfp4", "float")  # schemes GPTQ does not apply to (a recipe's gptq is used for the int ones)
VLLM_CPU_WNA16_MULTIPLE = 32  # vLLM's CPU W4A16 kernel: input and output widths must be multiples of this


def serving_notes(linears: dict[str, nn.Linear], scheme: ExportScheme) -> list[str]:
    """Known vLLM limits this export hits (one line per problem, naming the layers and what to do)."""
    notes = []
    if scheme.name == "w4a16":
        m = VLLM_CPU_WNA16_MULTIPLE
        bad = [f"{n} ({lin.in_features}x{lin.out_features})" for n, lin in linears.items()
               if lin.in_features % m or lin.out_features % m]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            notes.append(f"vLLM's CPU W4A16 kernel needs input and output widths that are multiples of {m}; "
                         f"{shown} are not, so vLLM on CPU refuses this checkpoint at load time. Serve it on a GPU, "
                         "or export w8a8 (int8) for CPU serving.")
        if scheme.group_size > 0 and scheme.group_size % 2:
            notes.append(f"vLLM's CPU W4A16 kernel needs an even group size (this export: {scheme.group_size}); "
                         "use --group-size -1 (per channel) or an even group.")
    if scheme.name == "nvfp4":
        notes.append("NVFP4 W4A4 runs in vLLM on FP4-capable GPUs (Blackwell); elsewhere vLLM falls back to "
                     "weight-only FP4 or refuses it.")
    return notes


def check_export_inputs(scheme: ExportScheme, w_method: str, calib_blocks: Tensor | None) -> None:
    check_w_method(w_method)
    if w_method == "gptq" and not scheme.quantized:
        raise ValueError("--w-method gptq quantizes weights; scheme 'float' keeps them in float (use rtn)")
    if w_method == "gptq" and scheme.name == "nvfp4":
        raise ValueError("GPTQ exports integer weights; scheme 'nvfp4' is round-to-nearest (use --w-method rtn)")
    needs = "GPTQ" if w_method == "gptq" else "nvfp4 (static input global scales)" if scheme.name == "nvfp4" else None
    if needs and (calib_blocks is None or calib_blocks.numel() == 0):
        raise ValueError(f"{needs} needs calibration data: pass --calib-data FILE (the train split) or calib_blocks")


def _recipe_settings(recipe) -> dict:
    """What a resolved recipe says about an export: defaults for the keyword arguments of ``export_model``."""
    from ..config import recipe_to_yaml
    from ..quant import gptq_clip_search

    g = recipe.quant.gptq
    return {"w_method": recipe.export.w_method or recipe.quant.w_method, "group_size": recipe.export.group_size,
            "w_clip": bool(recipe.quant.w_clip), "gptq_w_clip": gptq_clip_search(recipe.quant),
            "nsamples": g.nsamples, "recipe_text": recipe_to_yaml(recipe),
            "w_grid": (recipe.quant.w_bits, recipe.quant.w_sym, recipe.quant.w_groupsize),
            "gptq_learned_grid": bool(g.learned_grid),
            "base_model": str(recipe.model.path), "source": str(recipe.output_dir),
            "gptq_kwargs": default_gptq_kwargs(g)}


def export_w_method(scheme: str, w_method: str | None, recipe=None) -> str:
    """The weight quantizer an export uses: ``w_method`` if given, else the recipe's (``export.w_method``, then
    ``quant.w_method``), else RTN; schemes GPTQ does not apply to (``RTN_ONLY``) take RTN unless asked for
    explicitly (then ``check_export_inputs`` refuses it)."""
    if w_method is None and scheme in RTN_ONLY:
        return "rtn"
    if w_method is None and recipe is not None:
        w_method = recipe.export.w_method or recipe.quant.w_method
    if scheme == "float":
        return "rtn"
    return w_method or "rtn"


def export_model(model: nn.Module, output: str | Path, *, scheme: str, online: list[str] | None = None,
                 recipe=None, w_method: str | None = None, group_size: int | None = None,
                 calib_blocks: Tensor | None = None, w_clip: bool | None = None, gptq_kwargs: dict | None = None,
                 weight_clips: dict | None = None, card: CardInfo | None = None,
                 tokenizer_source: str | Path | None = None, run_metrics: dict | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Export an in-memory fused float model (not modified: the work is done on a copy) to ``output``.

    ``online``: names of the linears that get an online input Hadamard (``spinlearn.online.online_linears``);
    their weights must not hold ``W H`` yet. ``recipe`` (a resolved recipe, at the end of a run) supplies the
    defaults: ``export.w_method`` / ``quant.w_method``, ``export.group_size``, ``quant.w_clip`` (GPTQ:
    ``spinlearn.quant.gptq_clip_search``, as the job's GPTQ rows), the GPTQ settings
    and ``quant.gptq.nsamples`` calibration windows; with it, schemes GPTQ does not apply to (nvfp4, float) use RTN.
    ``run_metrics`` (the run's metrics dict) gives the model card its results table. ``weight_clips`` (a run's
    learned weight clip ratios, ``weight_clips.safetensors``) set the RTN weight scales when the export quantizes
    weights on the grid they were learned for (the recipe's bits, symmetry and group size); else a note says they
    were left out. Returns ``output``."""
    rs = _recipe_settings(recipe) if recipe is not None else {}
    w_method = export_w_method(scheme, w_method, recipe)
    if group_size is None and scheme in GROUPED_SCHEMES:  # the recipe's group size is for the int4 schemes
        group_size = rs.get("group_size")
    w_clip = rs.get("gptq_w_clip" if w_method == "gptq" else "w_clip", False) if w_clip is None else w_clip
    gptq_kwargs = {**default_gptq_kwargs(), **(gptq_kwargs or rs.get("gptq_kwargs") or {})}
    if calib_blocks is not None and "nsamples" in rs:
        calib_blocks = calib_blocks[: rs["nsamples"]]
    s = resolve_scheme(scheme, group_size, w_clip=w_clip)
    check_export_inputs(s, w_method, calib_blocks)
    output = check_output_dir(output, overwrite)
    online = list(online or [])
    linears = quantized_linears(model)
    if s.quantized:
        check_group_widths(linears, s)
    card = card or CardInfo()
    card.base_model, card.recipe = card.base_model or rs.get("base_model"), card.recipe or rs.get("recipe_text")
    card.source = card.source or rs.get("source")
    weight_clips, clip_note = carried_weight_clips(weight_clips, s, w_method, rs.get("w_grid"),
                                                   rs.get("gptq_learned_grid", True))
    card.w_method, card.notes = w_method, card.notes + serving_notes(linears, s) + ([clip_note] if clip_note else [])
    if run_metrics is not None:
        card.results = format_table(run_metrics)
    for note in card.notes:
        print(f"spinlearn export: note: {note}", file=sys.stderr)
    values, work = _quantized_copy(model, s, linears, online, w_method, calib_blocks, gptq_kwargs, weight_clips,
                                   progress)
    tensors = checkpoint_tensors(work, values, s, transform_tensors(work, online, next(work.parameters()).dtype))
    all_linears = [n for n, m in work.named_modules() if isinstance(m, nn.Linear)]
    qconfig = quantization_config(s, [n for n in all_linears if n not in linears]) if s.quantized else None
    tconfig = transform_config(online, all_linears)
    with atomic_output_dir(output, overwrite) as tmp:
        write_checkpoint(tmp, work, tensors, qconfig, tconfig, tokenizer_source)
        atomic_write_text(tmp / "README.md", model_card(card, s, online))
    return output


def carried_weight_clips(weight_clips: dict | None, s: ExportScheme, w_method: str,
                         learned_grid: tuple[int, bool, int] | None,
                         gptq_grid: bool = True) -> tuple[dict | None, str | None]:
    """(the clips the export applies, a note for the log and the model card): a run's learned weight clip ratios
    apply to int weights on the grid (bits, symmetric, group size) they were learned for: round-to-nearest's scales
    (without the MSE search), or the grid GPTQ rounds on (``gptq_grid``: the recipe's ``quant.gptq.learned_grid``)."""
    if not weight_clips or not s.quantized:
        return None, None
    w = s.quant.w
    grid = (w.bits, w.sym, w.group_size)
    method_takes = gptq_grid if w_method == "gptq" else not w.mse_clip
    if not method_takes or w.format != "int" or (learned_grid is not None and tuple(learned_grid) != grid):
        return None, (f"the run's learned weight clip ratios (bits, symmetric, group size = {tuple(learned_grid or ())}"
                      f") are not applied: scheme {s.name} quantizes weights by {w_method.upper()} as {w.format} "
                      f"{grid}; export.group_size equal to quant.w_groupsize would apply them")
    if w_method == "gptq":
        return weight_clips, f"GPTQ rounds on the grid of the run's learned clip ratios ({len(weight_clips)} weights)"
    return weight_clips, f"weight scales from the run's learned clip ratios ({len(weight_clips)} weights)"


def _quantized_copy(model, s: ExportScheme, linears, online, w_method, calib_blocks, gptq_kwargs, weight_clips,
                    progress):
    """A copy of ``model`` with ``W H`` folded into the online linears, and the export values of its linears. GPTQ
    with ``refit`` calibrates with the scheme's activation quantizers on (w8a8's int8; w4a16 has none, so its refit
    is the ridge alone, see ``gptq.refit_weight``)."""
    from ..fakequant import wrap_model
    from ..online import fold_online
    from ..quant import QuantSettings

    work = copy.deepcopy(model).eval()
    fold_online(work, online)
    if not s.quantized:
        return {}, work
    calib = s.quant.for_calibration() if w_method == "gptq" and gptq_kwargs["refit"] else QuantSettings()
    hooks = wrap_model(work, quant=calib, online=online, online_in_weights=False)  # x -> x H for GPTQ / calibration
    try:
        values = quantize_linears(work, list(linears), s, w_method=w_method, calib_blocks=calib_blocks,
                                  gptq_kwargs=gptq_kwargs, weight_clips=weight_clips, progress=progress)
    finally:
        hooks.remove()
    return values, work


def resolve_source(path: str | Path):
    """(model dir, recipe or None, run dir or None) of a run directory or a plain model directory."""
    p = Path(path)
    if (p / MODEL_DIR / "config.json").is_file():
        from ..config import load_recipe

        recipe = load_recipe(p / RECIPE_FILE) if (p / RECIPE_FILE).is_file() else None
        return p / MODEL_DIR, recipe, p
    if (p / "config.json").is_file():
        return p, None, None
    if not p.exists():
        raise FileNotFoundError(f"--run {str(p)!r} does not exist")
    raise FileNotFoundError(f"--run {str(p)!r} holds no model: expected a run directory with {MODEL_DIR}/config.json "
                            "(a training output) or a model directory with config.json (spinlearn rotate output)")


def export_run(run_dir: str | Path, scheme: str, output: str | Path, *, w_method: str | None = None,
               group_size: int | None = None, calib_blocks: Tensor | None = None, overwrite: bool = False,
               progress: bool = True) -> Path:
    """Export a training run (``RUN/model`` + ``RUN/recipe.yaml``: online Hadamards from ``rotation.r4`` /
    ``rotation.online``, and the recipe's defaults, see ``export_model``) or a plain model directory (no online
    transforms, default quantizer settings). Explicit ``w_method`` / ``group_size`` override the recipe."""
    from ..loading import load_causal_lm
    from ..online import online_linears

    model_dir, recipe, run = resolve_source(run_dir)
    rs = _recipe_settings(recipe) if recipe is not None else {}
    s = resolve_scheme(scheme, group_size if group_size is not None or scheme not in GROUPED_SCHEMES
                       else rs.get("group_size"))
    check_export_inputs(s, export_w_method(scheme, w_method, recipe), calib_blocks)
    check_output_dir(output, overwrite)
    model = load_causal_lm(model_dir, trust_remote_code=bool(recipe is not None and recipe.model.trust_remote_code))
    online = online_linears(model, recipe.rotation.online, recipe.rotation.r4) if recipe is not None else []
    card = CardInfo(base_model=rs.get("base_model", str(model_dir)), source=str(run or model_dir),
                    recipe=rs.get("recipe_text"), run_dir=run)
    clips_file = run / WEIGHT_CLIPS_FILE if run is not None else None
    weight_clips = load_file(clips_file) if clips_file is not None and clips_file.is_file() else None
    return export_model(model, output, scheme=scheme, online=online, recipe=recipe, w_method=w_method,
                        group_size=group_size, calib_blocks=calib_blocks, weight_clips=weight_clips, card=card,
                        tokenizer_source=model_dir, overwrite=overwrite, progress=progress)


@torch.no_grad()
def export_recipe_schemes(model: nn.Module, cfg, output_dir: str | Path, *, calib_blocks: Tensor | None = None,
                          tokenizer_source: str | Path | None = None, run_metrics: dict | None = None,
                          weight_clips: dict | None = None, progress: bool = True) -> list[Path]:
    """``output_dir/export-SCHEME/`` for every ``cfg.export.schemes`` entry, from the fused float model (online
    Hadamards not folded), the resolved recipe ``cfg`` and the run's learned ``weight_clips`` (what a training job
    does at its end)."""
    from ..artifacts import EXPORT_DIR_PREFIX
    from ..online import online_linears

    online = online_linears(model, cfg.rotation.online, cfg.rotation.r4)
    return [export_model(model, Path(output_dir) / f"{EXPORT_DIR_PREFIX}{scheme}", scheme=scheme, online=online,
                         recipe=cfg, calib_blocks=calib_blocks, tokenizer_source=tokenizer_source,
                         weight_clips=weight_clips,
                         run_metrics=run_metrics, card=CardInfo(source=str(cfg.output_dir), run_dir=Path(output_dir)),
                         overwrite=True, progress=progress)
            for scheme in cfg.export.schemes]
