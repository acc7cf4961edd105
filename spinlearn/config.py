"""Recipe schema: structured omegaconf dataclasses, loading with ``key=value`` overrides, validation.

A recipe is a YAML file whose keys mirror the dataclasses below (defaults follow SpinQuant)::

    cfg = load_recipe("recipes/llama3_8b_w4a4kv4.yaml", ["train.max_steps=5", "quant.a_bits=8"])
    cfg.quant.w_bits, cfg.train.learning_rate      # attribute access, types enforced by omegaconf

Unknown keys, missing required values and out-of-range settings fail with a :class:`RecipeError`
(a ``ValueError``) that names the dotted key, where it came from and what would work. Paths are not
checked for existence here: the data and model loaders do that when they open them.

``train`` takes any ``transformers.TrainingArguments`` field besides the keys declared in :class:`TrainConfig`
(which carry spinlearn's defaults): such keys are checked against TrainingArguments' own fields and types, except
the few spinlearn sets itself (:data:`RESERVED_TRAIN_KEYS`).

Shipped recipes live in ``spinlearn/recipes/`` (``recipes/`` in a checkout links there); :func:`copy_recipe`
(``spinlearn recipes cp NAME DEST``) copies one with its ``spinlearn/demo/...`` paths made absolute paths of the
installed package, so that a copy runs from any directory. The loader itself resolves paths against the current
directory only.

This module deliberately imports neither torch nor transformers at import time, so reading or
checking a recipe stays fast (``training_arguments_kwargs`` imports torch lazily; transformers is imported only
for a recipe with ``train`` keys beyond :class:`TrainConfig`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import enum
import functools
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .choices import EXPORT_SCHEMES, QUANT_FORMATS, ROTATION_MODES, ROTATION_OPTIMIZERS, TRAIN_DTYPES, WEIGHT_METHODS, check_bits
from .choices import DEVICE_MAPS, ROTATION_APPLY, SCALES_INITS, WEIGHT_CLIP_INITS

__all__ = [
    "RecipeError",
    "ModelConfig",
    "DataConfig",
    "GPTQConfig",
    "gptq_kwargs",
    "QuantConfig",
    "RotationConfig",
    "LossConfig",
    "TrainConfig",
    "EvalConfig",
    "RecipeConfig",
    "HUB_DATASETS",
    "DATA_SUFFIXES",
    "load_recipe",
    "validate",
    "recipe_to_yaml",
    "training_arguments_kwargs",
    "training_arguments_fields",
    "RESERVED_TRAIN_KEYS",
    "RECIPE_DIR",
    "shipped_recipes",
    "recipe_command",
    "copy_recipe",
]

# Accepted values of the enum-like string settings.

# transformers.SchedulerType values (checked against transformers in the tests; kept here so that
# validating a recipe does not import transformers).
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)  # fmt: skip
# Data sources: a hub shorthand, or a local file / glob with one of these suffixes.
HUB_DATASETS = ("wikitext2", "c4")
DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
REQUIRED_KEYS = ("model.path", "data.train", "output_dir")
_LAYOUT_DIR = Path(__file__).parent / "layouts"


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown key, missing value or a value out of range."""


# ----------------------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    path: str = MISSING  # hub id or local directory
    dtype: str = "float32"  # weights' dtype while training: float32 | bfloat16 | float16
    trust_remote_code: bool = False
    # null = the whole model on the process's device; auto | balanced | balanced_low_0 | sequential: one process
    # with the frozen model spread over its visible GPUs by accelerate (not with DDP/FSDP)
    device_map: Optional[str] = None


@dataclass
class DataConfig:
    train: str = MISSING  # wikitext2 | c4 | local .txt/.json/.jsonl/.parquet file or glob
    eval: Optional[str] = None  # same forms; null = no evaluation
    text_field: Optional[str] = None  # column holding the text in json/parquet files
    seqlen: int = 2048
    nsamples: int = 800  # calibration windows of `seqlen` tokens
    eval_seqlen: Optional[int] = None  # null = seqlen
    eval_max_windows: Optional[int] = None  # cap on evaluation windows; null = all
    seed: int = 0


@dataclass
class GPTQConfig:
    nsamples: int = 128
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    w_bits: Optional[int] = None  # null = quant.w_bits
    learned_grid: bool = True  # with quant.learn_w_clip: GPTQ rounds on the learned clip ratios' grid (else MSE search)
    refit: bool = True  # calibrate on the quantized activations, refit each weight to the float outputs (ridge) first


def gptq_kwargs(g=None) -> dict:
    """The keyword arguments of ``gptq.gptq_quantize_model`` a ``quant.gptq`` section gives (None: the schema's
    defaults, what ``spinlearn eval`` and ``spinlearn export`` use without a recipe)."""
    g = g if g is not None else GPTQConfig()
    return {"percdamp": g.percdamp, "block_size": g.block_size, "act_order": g.act_order, "refit": g.refit}


@dataclass
class QuantConfig:
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    w_groupsize: int = -1  # -1 = per output channel
    w_sym: bool = True
    w_clip: bool = False  # MSE clip search for weights
    learn_w_clip: bool = False  # learn a clip ratio per weight row (group) for RTN weights; RTN exports carry it
    w_clip_lr: float = 0.1  # Adam learning rate of the weight clip logits (learn_w_clip; 0.01 barely moves them, demo)
    w_clip_init: str = "full"  # with learn_w_clip, where they start: full (0.99) | mse (each row's MSE clip search)
    a_sym: bool = False
    a_clip: float = 1.0  # clip ratio for activations
    learn_a_clip: bool = False  # learn one clip ratio per linear input (sigmoid; starts at a_clip, or 0.99 when 1)
    a_clip_lr: float = 0.1  # Adam learning rate of the clip logits (learn_a_clip; 0.01 barely moves them, demo)
    learn_kv_clip: bool = False  # learn one clip ratio for each attention block's K and one for its V (a_clip_lr)
    a_groupsize: int = -1  # -1 = per token
    kv_sym: bool = False
    kv_groupsize: int = -1  # -1 = per head
    lm_head_bits: int = 16
    w_method: str = "rtn"  # final weight quantizer for evaluation/export: rtn | gptq
    format: str = "int"  # number format of the fake quantizers: int | nvfp4 | mxfp4 (FP4 microscaling)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)


@dataclass
class RotationConfig:
    layout: str = "transformer_universal"  # shipped layout name or path to a layout YAML
    init: str = "hadamard"  # hadamard | base_hadamard | orthogonal
    r3: bool = False  # online Hadamard on queries/keys after RoPE
    r4: bool = False  # online Hadamard before down_proj
    # Online input Hadamards as module globs ("all" = every linear but lm_head); null = the down_proj set when r4
    online: Optional[list[str]] = None
    optimizer: str = "cayley_sgd"  # cayley_sgd | riemannian_sgd | riemannian_adam
    # Where the matrices act while training: weights (R^T W R every step; needed when the weights are fake-quantized)
    # or activations (x R around each quantizer: the same loss, cheaper; 16-bit weights); auto picks activations when
    # quant.w_bits and quant.lm_head_bits are 16
    apply: str = "auto"
    momentum: float = 0.0  # for cayley_sgd / riemannian_sgd (SpinQuant uses none)
    learn_scales: bool = False  # learn fusible per-channel scales with the rotations (spinlearn.scales), folded
    scales_init: str = "ones"  # ones | smoothquant (s = max|X|^alpha / max|W|^(1-alpha), rotated basis)
    scales_alpha: float = 0.5  # SmoothQuant's alpha
    scales_lr: float = 0.01  # Adam learning rate of the log-scales
    seed: int = 0


@dataclass
class LossConfig:
    kl_weight: float = 0.0  # >0 adds kl_weight * KL(float teacher || quantized student), per token
    ce_weight: float = 1.0  # causal-LM cross-entropy of the quantized model
    kl_topk: Optional[int] = None  # KL restricted to the teacher's top-k logits per token; null = the full vocabulary


@dataclass
class TrainConfig:
    learning_rate: float = 1.5
    max_steps: int = -1  # must be set > 0: training is step-based
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    report_to: list[str] = field(default_factory=lambda: ["wandb"])  # ["none"] for no reporting
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: Optional[int] = 2
    dataloader_num_workers: int = 0
    run_name: Optional[str] = None
    # latest | true (the newest complete checkpoint under output_dir) | a checkpoint-N path | null; see resolve_resume
    resume_from_checkpoint: Any = None
    # Any other transformers.TrainingArguments field may be set here too (checked against TrainingArguments itself).


@dataclass
class EvalConfig:
    baselines: bool = True  # also evaluate float, no-rotation, random-Hadamard and GPTQ (learned, start) models
    guard: bool = True  # keep the start matrices when the learned ones are worse on the evaluation split
    batch_size: int = 1


@dataclass
class ExportConfig:
    schemes: list[str] = field(default_factory=list)  # deployable exports at the end of a run: w4a16 | w8a8 | nvfp4 | float
    w_method: Optional[str] = None  # rtn | gptq; null = quant.w_method
    group_size: Optional[int] = None  # int4 weight group size; null = 128 (w4a16), -1 = per channel


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output_dir: str = MISSING
    overwrite_output_dir: bool = False


def quant_section(**values) -> DictConfig:
    """A validated ``quant`` section from keyword values (CLI flags, benchmarks); bits default to 16 (off)."""
    base = {"w_bits": 16, "a_bits": 16, "kv_bits": 16, "lm_head_bits": 16}
    section = OmegaConf.structured(QuantConfig)
    user = OmegaConf.create({**base, **values})
    _check_keys(OmegaConf.to_container(user), section, "in the quantizer settings")
    merged = OmegaConf.merge(section, user)
    errors = [msg for key in ("w_bits", "a_bits", "kv_bits", "lm_head_bits")
              if (msg := check_bits(merged[key], f"quant.{key}"))]
    if errors:
        raise RecipeError("; ".join(errors))
    return merged


# ------------------------------------------------------------- train.*: TrainingArguments passthrough
# TrainingArguments fields spinlearn sets itself or does not use: a recipe key for them would break the job or
# be silently ignored.
RESERVED_TRAIN_KEYS = {
    "output_dir": "set the top-level 'output_dir'",
    "per_device_eval_batch_size": "set 'eval.batch_size'",
    "remove_unused_columns": "spinlearn sets it to false (its collator feeds input_ids/labels only)",
    "ddp_find_unused_parameters": "spinlearn sets it to false (every rotation gets a gradient each step)",
    "activation_checkpointing": "set 'train.gradient_checkpointing' (spinlearn maps it to the current name)",
    "activation_checkpointing_kwargs": "spinlearn sets use_reentrant=false (the weights are frozen)",
    "gradient_checkpointing_kwargs": "spinlearn sets use_reentrant=false (the weights are frozen)",
    **dict.fromkeys(
        ("optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon"),
        f"the rotations are trained by 'rotation.optimizer' ({' | '.join(ROTATION_OPTIMIZERS)}) with "
        "'rotation.momentum'; TrainingArguments' optimizer settings would be ignored",
    ),
}
_ALSO_TRAIN = ", or any transformers.TrainingArguments field"


@functools.lru_cache(maxsize=1)
def training_arguments_fields() -> dict[str, Any]:
    """``transformers.TrainingArguments``' settable fields and their types (imports transformers, once: only
    recipes with ``train`` keys beyond :class:`TrainConfig` need it)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments)
            if f.init and not f.name.startswith("_")}


def _train_passthrough_ok(path: str, siblings: list[str], source: str) -> bool:
    """True for a ``train.KEY`` that is a TrainingArguments field spinlearn leaves to the user; else RecipeError."""
    key = path.rpartition(".")[2]
    if key in RESERVED_TRAIN_KEYS:
        raise RecipeError(f"recipe key '{path}' ({source}) cannot be set here: {RESERVED_TRAIN_KEYS[key]}")
    fields = training_arguments_fields()
    if key in fields:
        return True
    raise _unknown_key_error(path, siblings, _schema(), source, more=fields, also=_ALSO_TRAIN)


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a recipe value fits a TrainingArguments annotation (lenient where a type cannot be checked)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # Union[SomeEnum, str]: the string must name a member
            return any(_type_ok(value, e) for e in enums)
        return any(_type_ok(value, a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in {m.name for m in tp}
    if (origin or tp) is dict:
        return isinstance(value, Mapping)
    if (origin or tp) is list:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    return True  # a class a recipe cannot spell (e.g. ParallelismConfig): left to TrainingArguments


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    if typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
        args = typing.get_args(tp)
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args = [a for a in args if a is not str]  # the enum's values are the strings accepted
        return " | ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_train_passthrough(cfg: DictConfig, errors: list[str]) -> None:
    """Type-check the ``train`` keys that pass through to TrainingArguments against its annotations."""
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = [k for k in cfg.train.keys() if k not in own]
    if not extra:
        return
    fields = training_arguments_fields()
    values = OmegaConf.to_container(cfg.train, resolve=True)
    for key in extra:
        tp, value = fields.get(key, Any), values[key]
        if not _type_ok(value, tp):
            errors.append(f"train.{key}: expected {_type_name(tp)} (transformers.TrainingArguments.{key}), "
                          f"got {value!r}")


# ---------------------------------------------------------------------------------------- loading
def _schema() -> DictConfig:
    return OmegaConf.structured(RecipeConfig)


def _leaf_paths(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in node.keys():
        path = f"{prefix}{key}"
        child = node._get_node(key)
        out += _leaf_paths(child, path + ".") if isinstance(child, DictConfig) else [path]
    return out


def _unknown_key_error(path: str, siblings: list[str], schema: DictConfig, source: str,
                       more: Iterable[str] = (), also: str = "") -> RecipeError:
    """``more``: further valid names for the did-you-mean (not listed); ``also``: what else is valid, in words."""
    parent, _, key = path.rpartition(".")
    prefix = f"{parent}." if parent else ""
    pool = list(dict.fromkeys([*siblings, *more]))
    close = [prefix + k for k in difflib.get_close_matches(key, pool, n=3, cutoff=0.6)]
    if not close:  # perhaps the key exists in another section (train.w_bits -> quant.w_bits)
        leaves = _leaf_paths(schema)
        close = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
        close = close or difflib.get_close_matches(path, leaves, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return RecipeError(
        f"unknown recipe key '{path}' ({source}): {hint}valid keys under {where}: {', '.join(siblings)}{also}"
    )


def _check_keys(user: Any, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Refuse keys the schema does not have, naming the dotted path and the closest valid keys."""
    if not isinstance(user, Mapping):
        where = f"'{prefix[:-1]}'" if prefix else "a recipe"
        raise RecipeError(f"{where} must be a mapping of keys to values ({source}), got {user!r}")
    siblings = [str(k) for k in schema.keys()]
    for key, value in user.items():
        path = f"{prefix}{key}"
        if str(key) not in siblings:
            if prefix == "train." and _train_passthrough_ok(path, siblings, source):
                continue
            raise _unknown_key_error(path, siblings, _schema(), source)
        child = schema._get_node(str(key))
        if isinstance(child, DictConfig):
            if isinstance(value, Mapping):
                _check_keys(value, child, source, path + ".")
            elif value is not None:
                sub = ", ".join(f"{path}.{k}" for k in child.keys())
                raise RecipeError(f"'{path}' is a section, not a value ({source}): set its keys ({sub})")
        elif isinstance(value, Mapping):
            raise RecipeError(f"'{path}' is a value, not a section ({source}): got {value!r}")


def _normalise(user: DictConfig) -> None:
    """Small conveniences before merging: `report_to: none` -> ["none"]."""
    train = user.get("train")
    if isinstance(train, DictConfig) and isinstance(train.get("report_to"), str):
        train.report_to = [train.report_to]


def _merge(base: DictConfig, user: DictConfig, source: str) -> DictConfig:
    # Walk a plain copy: iterating a DictConfig would resolve ${...} interpolations too early.
    _check_keys(OmegaConf.to_container(user, resolve=False), base, source)
    _normalise(user)
    try:
        with open_dict(base.train):  # TrainingArguments fields pass through (checked by _check_keys)
            merged = OmegaConf.merge(base, user)
        OmegaConf.set_struct(merged.train, None)  # typed again: only _merge may add keys
        return merged
    except OmegaConfBaseException as e:  # type errors: w_bits=four, model.path=null ...
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", e)).strip().splitlines()[0]
        raise RecipeError(f"bad value for '{key}' ({source}): {msg}") from e


def _parse_override(text: str) -> DictConfig:
    key, eq, _ = text.partition("=")
    if not eq or not key.strip():
        raise RecipeError(f"override {text!r} must look like dotted.key=value, e.g. train.max_steps=100")
    try:
        return OmegaConf.from_dotlist([text])
    except OmegaConfBaseException as e:
        raise RecipeError(f"cannot parse override {text!r}: {e}") from e


def load_recipe(path: str | Path | None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema defaults <- recipe file (if any) <- ``dotted.key=value`` overrides, validated.

    Returns a structured DictConfig (attribute access, types enforced, interpolations resolved).
    Raises FileNotFoundError for a missing file and RecipeError for anything wrong in it.
    """
    if isinstance(overrides, str):  # a lone string would otherwise be split into characters
        overrides = [overrides]
    cfg = _schema()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            shipped = f"; copy it with: spinlearn recipes cp {path} {path}.yaml" if str(path) in shipped_recipes() else ""
            raise FileNotFoundError(
                f"recipe file not found: {str(path)!r} (`spinlearn recipes` lists the shipped recipes{shipped})"
            )
        try:
            user = OmegaConf.load(path)
        except Exception as e:
            raise RecipeError(f"cannot parse recipe {str(path)!r}: {e}") from e
        if isinstance(user, ListConfig) or user is None:
            raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections, got a {type(user).__name__}")
        cfg = _merge(cfg, user, f"in {path}")
    for text in overrides:
        cfg = _merge(cfg, _parse_override(text), f"in override {text!r}")
    return validate(cfg)


# ------------------------------------------------------------------------------------- validation
def _check_required(cfg: DictConfig, errors: list[str]) -> None:
    missing = OmegaConf.missing_keys(cfg)
    for key in REQUIRED_KEYS:
        value = None if key in missing else OmegaConf.select(cfg, key)
        if value is None or (isinstance(value, str) and not value.strip()):
            errors.append(f"{key}: missing required value; set it in the recipe or pass {key}=...")
    for key in sorted(missing - set(REQUIRED_KEYS)):
        errors.append(f"{key}: missing required value")


def _data_source_ok(value: str) -> bool:
    return value in HUB_DATASETS or value.lower().endswith(DATA_SUFFIXES)


def _value_checks(cfg: DictConfig, errors: list[str]):
    """need(ok, key, msg), one_of(key, choices), positive(key, optional), groupsize(key): each appends
    "KEY: what is wrong, got VALUE" to ``errors``."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            errors.append(f"{key}: {msg}, got {OmegaConf.select(cfg, key)!r}")

    def one_of(key: str, choices: tuple[str, ...]) -> None:
        need(OmegaConf.select(cfg, key) in choices, key, f"must be one of {' | '.join(choices)}")

    def positive(key: str, optional: bool = False) -> None:
        v = OmegaConf.select(cfg, key)
        ok = (optional and v is None) or (v is not None and v > 0)
        need(ok, key, "must be > 0" + (" or null" if optional else ""))

    def groupsize(key: str) -> None:
        v = OmegaConf.select(cfg, key)
        need(v == -1 or v > 0, key, "must be -1 (one group per row/head) or a positive group size")

    return need, one_of, positive, groupsize


def _check_train_values(cfg: DictConfig, errors: list[str]) -> None:
    need, _, positive, _ = _value_checks(cfg, errors)
    t = cfg.train
    if t.max_steps <= 0:
        errors.append(
            f"train.max_steps: max_steps must be > 0: rotation training is step-based (SpinQuant uses 100); "
            f"got {t.max_steps} (HF's -1 default would silently run epochs or nothing). Set train.max_steps=N"
        )
    positive("train.learning_rate")
    positive("train.per_device_train_batch_size")
    positive("train.gradient_accumulation_steps")
    positive("train.logging_steps")
    positive("train.save_steps")
    positive("train.save_total_limit", optional=True)
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.dataloader_num_workers >= 0, "train.dataloader_num_workers", "must be >= 0")
    reports = list(t.report_to)
    names_ok = all(isinstance(x, str) and x.strip() for x in reports)
    need(names_ok, "train.report_to", "must be a list of integration names")
    need("none" not in reports or reports == ["none"], "train.report_to", "'none' cannot be combined with integrations")
    resume = t.resume_from_checkpoint
    need(resume is None or isinstance(resume, bool) or (isinstance(resume, str) and bool(resume.strip())),
         "train.resume_from_checkpoint", "must be latest | true (the newest complete checkpoint) | a path | null")
    _check_train_passthrough(cfg, errors)


def _check_values(cfg: DictConfig, errors: list[str]) -> None:
    need, one_of, positive, groupsize = _value_checks(cfg, errors)
    for key in ("quant.w_bits", "quant.a_bits", "quant.kv_bits", "quant.lm_head_bits", "quant.gptq.w_bits"):
        v = OmegaConf.select(cfg, key)
        if key == "quant.gptq.w_bits" and v is None:
            continue
        if msg := check_bits(v, key):
            errors.append(msg)

    d, q, r = cfg.data, cfg.quant, cfg.rotation
    one_of("model.dtype", TRAIN_DTYPES)
    if cfg.model.device_map is not None:
        one_of("model.device_map", DEVICE_MAPS)
    one_of("quant.w_method", WEIGHT_METHODS)
    one_of("quant.format", QUANT_FORMATS)
    for scheme in cfg.export.schemes:
        need(scheme in EXPORT_SCHEMES, "export.schemes", f"each scheme must be one of {' | '.join(EXPORT_SCHEMES)}")
    if cfg.export.w_method is not None:
        one_of("export.w_method", WEIGHT_METHODS)
    if cfg.export.group_size is not None:
        groupsize("export.group_size")
    one_of("rotation.init", ROTATION_MODES)
    one_of("rotation.optimizer", ROTATION_OPTIMIZERS)
    one_of("train.lr_scheduler_type", LR_SCHEDULERS)

    forms = f"{' | '.join(HUB_DATASETS)} or a local {'/'.join(DATA_SUFFIXES)} file or glob"
    for key in ("data.train", "data.eval"):
        v = OmegaConf.select(cfg, key)
        if key == "data.eval" and v is not None and not v.strip():
            errors.append("data.eval: empty string; use null for no evaluation or one of " + forms)
        elif isinstance(v, str) and v.strip():  # a missing data.train is reported by _check_required
            need(_data_source_ok(v), key, f"must be {forms}")
    positive("data.seqlen")
    positive("data.nsamples")
    positive("data.eval_seqlen", optional=True)
    positive("data.eval_max_windows", optional=True)
    if d.text_field is not None:
        need(bool(d.text_field.strip()), "data.text_field", "must be a column name or null")

    for key in ("quant.w_groupsize", "quant.a_groupsize", "quant.kv_groupsize"):
        groupsize(key)
    need(0 < q.a_clip <= 1, "quant.a_clip", "clip ratio must be in (0, 1]")
    positive("quant.a_clip_lr")
    if q.learn_a_clip:
        need(q.format == "int" and q.a_bits < 16, "quant.learn_a_clip",
             "needs quantized activations (a_bits < 16) in the int format")
    positive("quant.w_clip_lr")
    need(not q.learn_kv_clip or q.kv_bits < 16, "quant.learn_kv_clip", "needs a quantized K/V cache (kv_bits < 16)")
    if q.learn_w_clip:
        need(q.format == "int" and q.w_bits < 16, "quant.learn_w_clip",
             "needs quantized weights (w_bits < 16) in the int format: training rounds them to nearest on the "
             "learned grid (w_method gptq: GPTQ after training, rounding on that grid, quant.gptq.learned_grid)")
        need(not q.w_clip, "quant.learn_w_clip", "learns the clip ratio that quant.w_clip searches for: set one of "
             "them, not both")
    one_of("quant.w_clip_init", WEIGHT_CLIP_INITS)
    positive("quant.gptq.nsamples")
    positive("quant.gptq.block_size")
    need(0 <= q.gptq.percdamp < 1, "quant.gptq.percdamp", "must be in [0, 1) (fraction of mean diagonal)")

    layout = r.layout
    shipped = sorted(p.stem for p in _LAYOUT_DIR.glob("*.yaml"))
    is_path = layout.endswith((".yaml", ".yml")) or "/" in layout
    need(is_path or layout in shipped or layout == "auto", "rotation.layout",
         f"must be a shipped layout ({' | '.join(shipped)}), a path to a layout .yaml, or auto")  # fmt: skip
    need(0 <= r.momentum < 1, "rotation.momentum", "must be in [0, 1)")
    one_of("rotation.apply", ROTATION_APPLY)
    need(r.apply != "activations" or (q.w_bits == 16 and q.lm_head_bits == 16), "rotation.apply",
         "activations needs 16-bit weights while training (quant.w_bits and quant.lm_head_bits 16); use weights or auto")
    one_of("rotation.scales_init", SCALES_INITS)
    need(0 <= r.scales_alpha <= 1, "rotation.scales_alpha", "must be in [0, 1]")
    positive("rotation.scales_lr")

    need(cfg.loss.kl_weight >= 0, "loss.kl_weight", "must be >= 0")
    need(cfg.loss.ce_weight >= 0, "loss.ce_weight", "must be >= 0")
    positive("loss.kl_topk", optional=True)
    if cfg.loss.kl_weight == 0 and cfg.loss.ce_weight == 0:
        errors.append("loss: ce_weight and kl_weight are both 0, so nothing would be trained; make one > 0")

    _check_train_values(cfg, errors)
    positive("eval.batch_size")


def validate(cfg: DictConfig | Mapping) -> DictConfig:
    """Check a recipe (structured or plain) and return it as a structured, resolved DictConfig.

    Every problem found is listed in one RecipeError, each line starting with its dotted key.
    """
    if not (isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is RecipeConfig):
        user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        cfg = _merge(_schema(), user, "in the given config")
    errors: list[str] = []
    _check_required(cfg, errors)
    if not errors:  # interpolations can only be resolved once required values exist
        try:
            OmegaConf.resolve(cfg)
        except OmegaConfBaseException as e:
            raise RecipeError(f"cannot resolve interpolation in recipe: {e}") from e
        _check_values(cfg, errors)
    if errors:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errors))
    return cfg


def recipe_to_yaml(cfg: DictConfig) -> str:
    """The fully resolved recipe as YAML (saved next to checkpoints and exports)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


# ------------------------------------------------------------------------------------ shipped recipes
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"  # recipes ship inside the package
# The demo recipe names the bundled files relative to a checkout; a copy names the installed ones instead.
_PACKAGE_RELATIVE = re.compile(r"(?<![\w./-])spinlearn/demo/")


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name (file stem) -> file."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def recipe_command(path: str | Path) -> str:
    """A recipe's first comment line: the command that runs it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    first = next((line for line in lines if line.startswith("#")), "")
    return first.lstrip("#").strip()


def copy_recipe(name: str, dest: str | Path, overwrite: bool = False) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or a directory to put NAME.yaml in), with its
    ``spinlearn/demo/...`` paths made absolute paths of the installed package, so that it runs from anywhere."""
    recipes = shipped_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, list(recipes), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"no shipped recipe {name!r}: {hint}shipped recipes: {', '.join(recipes)}")
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{name}.yaml"
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{str(dest)!r} exists; pass --overwrite to replace it")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"directory {str(dest.parent)!r} does not exist; create it or pick another path")
    demo = (Path(__file__).resolve().parent / "demo").as_posix() + "/"
    lines = recipes[name].read_text(encoding="utf-8").splitlines(keepends=True)
    lines = [line if line.lstrip().startswith("#") else _PACKAGE_RELATIVE.sub(demo, line) for line in lines]
    lines.insert(1, f"# (copied from spinlearn's shipped recipe {name!r}; from anywhere: spinlearn train --config {dest})\n")
    from .artifacts import atomic_write_text

    atomic_write_text(dest, "".join(lines))
    return dest


# ---------------------------------------------------------------------------------- HF Trainer glue
_TRAIN_KEYS_NOT_FOR_HF = ("resume_from_checkpoint",)  # passed to trainer.train() instead


def training_arguments_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.TrainingArguments`` from ``train.*`` and ``output_dir``.

    ``overwrite_output_dir`` is not included (transformers 5 dropped it; the job's input checks and run directory act on it),
    nor ``resume_from_checkpoint`` (an argument of ``Trainer.train``).
    """
    import inspect

    import torch
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {
        k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k not in _TRAIN_KEYS_NOT_FOR_HF
    }
    kwargs.update(
        output_dir=str(cfg.output_dir),
        per_device_eval_batch_size=int(cfg.eval.batch_size),
        # The collator feeds input_ids/labels only; the model's forward signature must not prune them.
        remove_unused_columns=False,
        # Every rotation receives a gradient each step, and a DDP unused-parameter scan costs a pass.
        ddp_find_unused_parameters=False,
    )
    params = inspect.signature(TrainingArguments).parameters
    # transformers 5.23 renamed gradient_checkpointing -> activation_checkpointing (old name warns).
    ckpt = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    kwargs[ckpt] = bool(kwargs.pop("gradient_checkpointing"))
    if kwargs[ckpt]:
        # Weights are frozen: reentrant checkpointing drops gradients when a segment's inputs do not
        # require grad, so use the non-reentrant variant.
        kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    if "save_safetensors" in params:  # removed in transformers 5 (always safetensors there)
        kwargs["save_safetensors"] = True
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
    return kwargs
