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
from torch import Tensor, nn

from ..artifacts import MODEL_DIR, RECIPE_FILE, atomic_output_dir, atomic_write_text, check_output_dir
from .compressed import checkpoint_tensors, quantization_config, write_checkpoint
from .model_card import CardInfo, model_card
from .schemes import ExportScheme, check_w_method, resolve_scheme
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


def export_model(model: nn.Module, scheme: str, output: str | Path, *, online: list[str] | None = None,
                 w_method: str = "rtn", group_size: int | None = None, calib_blocks: Tensor | None = None,
                 w_clip: bool = False, gptq_kwargs: dict | None = None, card: CardInfo | None = None,
                 tokenizer_source: str | Path | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Export an in-memory fused float model (not modified: the work is done on a copy).

    ``online``: names of the linears that get an online input Hadamard (``spinlearn.online.online_linears``);
    their weights must not hold ``W H`` yet. Returns the output directory."""
    s = resolve_scheme(scheme, group_size, w_clip=w_clip)
    check_export_inputs(s, w_method, calib_blocks)
    output = check_output_dir(output, overwrite)
    online = list(online or [])
    linears = quantized_linears(model)
    if s.quantized:
        check_group_widths(linears, s)
    card = card or CardInfo()
    card.w_method, card.notes = w_method, card.notes + serving_notes(linears, s)
    for note in card.notes:
        print(f"spinlearn export: note: {note}", file=sys.stderr)

    work = copy.deepcopy(model).eval()
    from ..online import fold_online

    fold_online(work, online)
    values = {}
    if s.quantized:
        from ..fakequant import wrap_model

        hooks = wrap_model(work, online=online, online_in_weights=False)  # x -> x H for GPTQ / calibration
        try:
            values = quantize_linears(work, list(linears), s, w_method=w_method, calib_blocks=calib_blocks,
                                      gptq_kwargs=gptq_kwargs, progress=progress)
        finally:
            hooks.remove()
    dtype = next(work.parameters()).dtype
    tensors = checkpoint_tensors(work, values, s, transform_tensors(work, online, dtype))
    all_linears = [n for n, m in work.named_modules() if isinstance(m, nn.Linear)]
    qconfig = quantization_config(s, [n for n in all_linears if n not in linears]) if s.quantized else None
    tconfig = transform_config(online, all_linears)
    with atomic_output_dir(output, overwrite) as tmp:
        write_checkpoint(tmp, work, tensors, qconfig, tconfig, tokenizer_source)
        atomic_write_text(tmp / "README.md", model_card(card, s, online))
    return output


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
    ``rotation.online``, ``quant.w_clip``, ``export.*`` defaults) or a plain model directory (no online transforms,
    default quantizer settings). ``w_method`` None = the recipe's ``export.w_method`` / ``quant.w_method`` / rtn."""
    from ..loading import load_causal_lm
    from ..online import online_linears

    model_dir, recipe, run = resolve_source(run_dir)
    if w_method is None:
        w_method = (recipe.export.w_method or recipe.quant.w_method) if recipe is not None else "rtn"
    if group_size is None and recipe is not None:
        group_size = recipe.export.group_size
    s = resolve_scheme(scheme, group_size)
    check_export_inputs(s, w_method, calib_blocks)
    check_output_dir(output, overwrite)
    model = load_causal_lm(model_dir)
    online, w_clip, gptq_kwargs, recipe_text = [], False, None, None
    if recipe is not None:
        from ..config import recipe_to_yaml

        online = online_linears(model, recipe.rotation.online, recipe.rotation.r4)
        w_clip = bool(recipe.quant.w_clip)
        g = recipe.quant.gptq
        gptq_kwargs = {"percdamp": g.percdamp, "block_size": g.block_size, "act_order": g.act_order}
        recipe_text = recipe_to_yaml(recipe)
    card = CardInfo(base_model=str(recipe.model.path) if recipe is not None else str(model_dir),
                    source=str(run or model_dir), recipe=recipe_text, run_dir=run)
    return export_model(model, scheme, output, online=online, w_method=w_method, group_size=group_size,
                        calib_blocks=calib_blocks, w_clip=w_clip, gptq_kwargs=gptq_kwargs, card=card,
                        tokenizer_source=model_dir, overwrite=overwrite, progress=progress)


@torch.no_grad()
def export_recipe_schemes(model: nn.Module, cfg, output_dir: str | Path, *, calib_blocks: Tensor | None = None,
                          tokenizer_source: str | Path | None = None, progress: bool = True) -> list[Path]:
    """What a training job calls at its end: ``output_dir/export-SCHEME/`` for every ``cfg.export.schemes`` entry,
    from the fused float model (online Hadamards not folded) and the resolved recipe ``cfg``."""
    from ..artifacts import EXPORT_DIR_PREFIX
    from ..config import recipe_to_yaml
    from ..online import online_linears

    online = online_linears(model, cfg.rotation.online, cfg.rotation.r4)
    g = cfg.quant.gptq
    method = cfg.export.w_method or cfg.quant.w_method
    outs = []
    for scheme in cfg.export.schemes:
        card = CardInfo(base_model=str(cfg.model.path), source=str(output_dir), recipe=recipe_to_yaml(cfg),
                        run_dir=Path(output_dir))
        outs.append(export_model(
            model, scheme, Path(output_dir) / f"{EXPORT_DIR_PREFIX}{scheme}", online=online,
            w_method="rtn" if scheme in RTN_ONLY else method, group_size=cfg.export.group_size,
            calib_blocks=calib_blocks, w_clip=bool(cfg.quant.w_clip), card=card, tokenizer_source=tokenizer_source,
            gptq_kwargs={"percdamp": g.percdamp, "block_size": g.block_size, "act_order": g.act_order},
            overwrite=True, progress=progress))
    return outs
