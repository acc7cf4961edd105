"""Online input Hadamards as a compressed-tensors ``transform_config`` group (what vLLM applies at run time).

A linear ``y = x W^T`` with an online input Hadamard is stored as ``W H`` (folded offline in float64) and
declared with two ``TransformArgs`` of one group, as llm-compressor writes them: ``input`` (online, ``x -> x H``)
and ``weight_input`` with ``inverse`` (the record that ``W H`` is already in the weight; loaders apply only the
online half). The matrix is stored as ``<module>.<GROUP>_input.weight`` = ``sqrt(n) H``, the unnormalized +-1
matrix (compressed-tensors and vLLM divide by ``sqrt(n)`` when they load it), once per input width.

Type ``random-hadamard``: vLLM uses the stored matrix through a dense GEMM for every type but ``hadamard``, whose
CUDA kernel (hadacore) regenerates a Sylvester matrix and only exists for powers of two. A stored matrix serves
every order spinlearn builds (12 * 2^m, 172 * 2^m, ...). ``randomize`` stays false: the stored matrix is the one.
vLLM shares one matrix per group and size, so every module of one width uses the same H, which is what spinlearn
folds.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from ..hadamard import hadamard_matrix

TRANSFORM_GROUP = "spinlearn_online"  # transform_config group name; tensors are <module>.spinlearn_online_input.weight
TRANSFORM_TYPE = "random-hadamard"


def transform_weight_name(module: str) -> str:
    return f"{module}.{TRANSFORM_GROUP}_input.weight"


def stored_hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """sqrt(n) * hadamard_matrix(n): the +-1 matrix a checkpoint stores (exact in any float dtype)."""
    return torch.round(hadamard_matrix(n, torch.float64) * math.sqrt(n)).to(dtype)


def target_patterns(names: list[str], all_names: list[str]) -> list[str]:
    """compressed-tensors targets naming exactly ``names`` among ``all_names``: one ``re:`` pattern per module
    path with its layer indices generalised (``model.layers.3.mlp.down_proj`` -> ``re:^model\\.layers\\.\\d+
    \\.mlp\\.down_proj$``) when those match nothing else, else the names themselves."""
    pats = list(dict.fromkeys("^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) + "$" for n in names))
    hit = {n for n in all_names if any(re.match(p, n) for p in pats)}
    if hit == set(names):
        return [f"re:{p}" for p in pats]
    return list(names)


def transform_config(online: list[str], all_linears: list[str]):
    """The ``TransformConfig`` (pydantic) declaring the online input Hadamards of ``online``; None if empty."""
    if not online:
        return None
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    targets = target_patterns(online, all_linears)
    scheme = TransformScheme(
        type=TRANSFORM_TYPE,
        apply=[TransformArgs(targets=targets, location="input"),
               TransformArgs(targets=targets, location="weight_input", inverse=True)],
        randomize=False,
        requires_grad=False,
    )
    return TransformConfig(config_groups={TRANSFORM_GROUP: scheme})


def transform_tensors(model: nn.Module, online: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """{``<module>.<GROUP>_input.weight``: +-1 Hadamard of its input width}, stored once per width, on the first
    online module of that width. vLLM keeps one matrix per group and size (a global registry that every layer's
    transform shares), so one copy loads them all; per layer, R4 on Llama-3-8B would add 32 x 14336^2 entries."""
    out = {}
    for n in online:
        width = model.get_submodule(n).in_features
        if not any(t.shape[0] == width for t in out.values()):
            out[transform_weight_name(n)] = stored_hadamard(width, dtype)
    return out
