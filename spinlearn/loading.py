"""Loading Hugging Face causal LMs with clear errors (missing path, bad config.json, truncated weights, remote
code, bad dtype, a sequence length beyond the model's context), each checked before anything heavy is loaded."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .choices import LOAD_DTYPES

DTYPES = {name: getattr(torch, name) for name in LOAD_DTYPES}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[name]


def check_model_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist (pass a local Hugging Face model directory; "
            "hub names need network access, which this run does not have)"
        )
    if not p.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is a file; pass the Hugging Face model directory holding it")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model path {str(path)!r} has no config.json: not a Hugging Face model directory")
    return p


def check_model_config(path: str | Path) -> dict[str, Any]:
    """config.json of a model directory, parsed: a JSON object whose ``model_type`` transformers knows, or that
    brings its own code (``auto_map``). ValueError naming the file and what would work otherwise."""
    from transformers import CONFIG_MAPPING

    file = Path(path) / "config.json"
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON ({e}); restore it from the model's original files") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object with a model_type, got a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if "auto_map" in cfg or model_type in CONFIG_MAPPING:
        return cfg
    if not model_type:
        raise ValueError(f"{str(file)!r} has no model_type (e.g. \"llama\"): not a Hugging Face model config")
    import transformers

    close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ValueError(
        f"{str(file)!r}: model_type {model_type!r} is not known to transformers {transformers.__version__}; "
        f"{hint}upgrade transformers, or give the model's custom code (auto_map) and trust_remote_code"
    )


def needs_remote_code(path: Path) -> bool:
    from transformers import CONFIG_MAPPING

    cfg = check_model_config(path)
    return "auto_map" in cfg and cfg.get("model_type") not in CONFIG_MAPPING


def check_remote_code(path: str | Path, trust_remote_code: bool) -> None:
    """Refuse a model that needs its own code (config.json auto_map) unless it is trusted, naming both switches."""
    if needs_remote_code(Path(path)) and not trust_remote_code:
        raise ValueError(
            f"model at {str(path)!r} needs custom code from the hub or its directory (config.json has auto_map); "
            "pass --trust-remote-code (recipe: model.trust_remote_code=true) if you trust it"
        )


def check_safetensors(model_dir: str | Path) -> None:
    """Raise ValueError naming the first weights file in ``model_dir`` whose safetensors header is unreadable
    or whose data is cut short (cheap: headers only; transformers' own error does not say which file)."""
    from safetensors import safe_open

    from .artifacts import ROTATIONS_FILE

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        if f.name == ROTATIONS_FILE:
            continue
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    fh.get_slice(k)
        except Exception as e:
            raise ValueError(
                f"cannot load the model in {str(model_dir)!r}: corrupt or truncated file {str(f)!r} ({e}); "
                "copy or download it again"
            ) from e


def check_model_dir(path: str | Path) -> dict[str, Any]:
    """Every cheap check of a local model directory before loading it (exists, config.json valid, weights
    files intact); returns the parsed config.json (e.g. for :func:`check_seqlen`)."""
    p = check_model_path(path)
    cfg = check_model_config(p)
    check_safetensors(p)
    return cfg


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def check_seqlen(config: Mapping | Any, seqlen: int | None, key: str) -> None:
    """Refuse ``seqlen`` tokens per window beyond the model's context (``max_position_embeddings`` or its
    equivalent in ``config``: a config.json dict or a transformers config): positions past it were never
    trained, so perplexities there mean nothing. ``key`` names the setting (``data.seqlen``, ``--seqlen``)."""
    if seqlen is None:
        return
    if not isinstance(config, Mapping):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        config = text.to_dict() if hasattr(text, "to_dict") else vars(text)
    config = config.get("text_config") or config
    for name in _CONTEXT_KEYS:
        limit = config.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if seqlen > limit:
                raise ValueError(
                    f"{key}={seqlen} is beyond the model's context ({name} = {limit}): positions past it were never "
                    f"trained, so perplexities would mean nothing; use {key} <= {limit}"
                )
            return


def load_causal_lm(path: str | Path, *, dtype="auto", trust_remote_code: bool = False, device: str | None = None,
                   device_map: str | None = None):
    """AutoModelForCausalLM.from_pretrained on a local directory, refusing remote code unless allowed.
    ``device_map`` (``choices.DEVICE_MAPS``): the model spread over the visible GPUs by accelerate (its
    ``hf_device_map`` says where each module went), instead of ``device``."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    check_model_dir(p)
    check_remote_code(p, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code,
            **({"device_map": device_map} if device_map else {}),
        )
    except OSError as e:  # e.g. no weights file: a user error (exit 2 in the CLI), not a traceback
        raise FileNotFoundError(f"cannot load the model in {str(path)!r}: {e}") from e
    if device and not device_map:
        model.to(device)
    model.eval()
    return model


def device_map_summary(model, key: str = "model.device_map") -> dict[str, int]:
    """How many of a device-mapped model's parameter tensors sit on each device. Modules accelerate offloaded
    (to the CPU or disk: the GPUs were too small) hold their weights on the meta device, loaded only inside each
    forward, so they cannot be rotated in place: refused, naming ``key``."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        counts[str(p.device)] = counts.get(str(p.device), 0) + 1
    if "meta" in counts:
        raise ValueError(
            f"{key}: the model does not fit the visible GPUs; accelerate offloaded {counts['meta']} weights to the "
            f"CPU or disk (placement {counts}), and spinlearn needs every weight on a device to rotate it: use more "
            "GPUs, FSDP (accelerate_configs/8gpu_fsdp.yaml), or see `spinlearn plan` for what fits")
    return counts


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """AutoTokenizer of a local directory; a config.json there is checked first (the tokenizer reads it)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if (p / "config.json").is_file():
        check_model_config(p)
    elif not p.is_dir():
        check_model_path(p)  # says what is wrong with the path
    try:
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except OSError as e:  # no or unreadable tokenizer files: a user error, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot load the tokenizer in {str(path)!r}: {first}") from e


def meta_model(config, trust_remote_code: bool = False):
    """The model ``config`` describes, built on the ``meta`` device: every module and shape, no memory, no weights
    (for checks and plans made before anything is loaded). ``trust_remote_code``: a config with custom code
    (``auto_map``) builds its own model class (the recipe's ``model.trust_remote_code``)."""
    import warnings

    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
