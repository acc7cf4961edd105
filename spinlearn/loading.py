"""Loading Hugging Face causal LMs with clear errors (missing path, remote code, bad dtype)."""

from __future__ import annotations

import json
from pathlib import Path

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


def needs_remote_code(path: Path) -> bool:
    from transformers import CONFIG_MAPPING

    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path / 'config.json')!r} is not valid JSON: {e}") from e
    return "auto_map" in cfg and cfg.get("model_type") not in CONFIG_MAPPING


def load_causal_lm(path: str | Path, *, dtype="auto", trust_remote_code: bool = False, device: str | None = None):
    """AutoModelForCausalLM.from_pretrained on a local directory, refusing remote code unless allowed."""
    from transformers import AutoModelForCausalLM

    p = check_model_path(path)
    if needs_remote_code(p) and not trust_remote_code:
        raise ValueError(
            f"model at {str(path)!r} needs custom code from the hub or its directory (config.json has auto_map); "
            "pass --trust-remote-code (recipe: model.trust_remote_code=true) if you trust it"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except OSError as e:  # e.g. no weights file: a user error (exit 2 in the CLI), not a traceback
        raise FileNotFoundError(f"cannot load the model in {str(path)!r}: {e}") from e
    if device:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
