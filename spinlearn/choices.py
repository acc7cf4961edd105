"""The accepted values of every enum-like setting, in one torch-free place.

Recipe validation (``config.py``), layout validation (``layout.py``), the CLI and the loaders all import
these; nothing else spells them out. Importing this module is cheap (no torch, no transformers).
"""

from __future__ import annotations

# How a rotation matrix is initialised (layout ``mode``, recipe ``rotation.init``, ``--mode``).
ROTATION_MODES = ("hadamard", "base_hadamard", "orthogonal")
# Human-readable names of the modes, for results tables.
ROTATION_MODE_LABELS = {"hadamard": "random Hadamard", "base_hadamard": "Hadamard", "orthogonal": "random orthogonal"}
# Weights' dtype while training (recipe) / loading (CLI; "auto" = the checkpoint's, float64 for exactness tests).
TRAIN_DTYPES = ("float32", "bfloat16", "float16")
LOAD_DTYPES = ("float32", "float64", "bfloat16", "float16")
# Quantizer bits: 16 means "not quantized".
BITS_RANGE = (2, 16)
# Final weight quantizer for evaluation/export.
WEIGHT_METHODS = ("rtn", "gptq")
# Number formats of the fake quantizers (integer grid, or NVIDIA/OCP FP4 microscaling formats).
QUANT_FORMATS = ("int", "nvfp4", "mxfp4")
# Deployable export schemes (compressed-tensors) that vLLM serves, and what each means.
EXPORT_SCHEMES = ("w4a16", "w8a8", "nvfp4", "float")
# Optimizers for the rotations.
ROTATION_OPTIMIZERS = ("cayley_sgd", "riemannian_sgd", "riemannian_adam")
# Where learned weight clip ratios start (recipe ``quant.w_clip_init``): the full range (LEARNED_CLIP_DEFAULT), or
# each row's (group's) ratio from the MSE clip search on the start rotation's weights.
WEIGHT_CLIP_INITS = ("full", "mse")
# How learned per-channel scales start (recipe ``rotation.scales_init``): all ones, or SmoothQuant's alpha rule.
SCALES_INITS = ("ones", "smoothquant")
# Where the learned matrices act while training (recipe ``rotation.apply``; see ``spinlearn.activation_side``).
ROTATION_APPLY = ("auto", "weights", "activations")
# One process over several GPUs (recipe ``model.device_map``): accelerate's placement strategies for from_pretrained.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# Rotation settings `spinlearn eval` can evaluate.
EVAL_ROTATIONS = ("none", "hadamard", "learned")


def check_bits(value, key: str) -> str | None:
    """An error message for a bits value out of range (None when fine); ``key`` names the setting."""
    lo, hi = BITS_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return f"{key}={value!r} is out of range: bits must be an integer in {lo}..{hi} (16 = not quantized)"
    return None
