"""Online input Hadamards: which linears get one, checks, and the offline half folded into the weights.

An online input Hadamard on a linear ``y = x W^T`` computes ``y = (x H)(W H)^T``: exact in float (H is orthogonal),
but the quantizers see ``x H`` and ``W H``, whose outliers are spread over the whole width. R4 (QuaRot/SpinQuant)
is the down_proj set; ``rotation.online`` names any set of linears by glob (Brevitas's layerwise / orphan-sink modes,
llm-compressor's QuIP), ``["all"]`` every linear but lm_head and MoE routers.

The two halves live in different places: the online half (``x -> x H``) is a forward pre-hook installed by
``fakequant.wrap_model`` (training, evaluation) or declared as an input transform in a compressed-tensors export
(serving); the weight half (``W <- W H``) is a parametrization during training and ``fold_online`` in an export.
A run's plain float model holds neither, so it is exact in plain transformers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from .hadamard import fast_hadamard_transform, supported_order

# The linears R4 rotates online: every module that reads an MLP's inner activation (act(gate) * up).
R4_GLOBS = ("*mlp.down_proj", "*mixer.down_proj", "*fc2")
ALL = "all"  # rotation.online: ["all"] = every linear except lm_head and MoE routers
ROUTER_GLOBS = ("*mlp.gate", "*router*")  # MoE routers: never rotated online, never quantized (tiny, pick experts)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear but the output head and MoE routers: the linears that are quantized and can be rotated
    online (training, evaluation and exports alike)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not any(fnmatch.fnmatchcase(n, g) for g in ROUTER_GLOBS)}


def _match(globs: Sequence[str], linears: dict[str, nn.Linear], key: str) -> list[str]:
    names: list[str] = []
    for pattern in globs:
        alts = [g.strip() for g in str(pattern).split("|") if g.strip()]
        found = [n for n in linears if any(fnmatch.fnmatchcase(n, g) for g in alts)]
        if not found and key == "rotation.online":
            sample = ", ".join(list(linears)[:4])
            raise ValueError(f"{key}: pattern {pattern!r} matches no linear layer of the model (linears are named "
                             f"like {sample}); use module globs such as '*mlp.down_proj' or 'all'")
        names += found
    return list(dict.fromkeys(names))


def online_linears(model: nn.Module, online: Sequence[str] | None = None, r4: bool = False) -> list[str]:
    """Names of the nn.Linear modules that get an online input Hadamard: the R4 set when ``r4``, plus the
    modules ``online`` names (globs, or ``["all"]``). Every one is checked for a supported Hadamard order."""
    linears = linear_layers(model)
    names: list[str] = []
    if r4:
        names = _match(R4_GLOBS, linears, "rotation.r4")
        if not names:
            raise ValueError(f"rotation.r4 / --r4 is on but no linear layer matches {'|'.join(R4_GLOBS)}; "
                             "set rotation.r4=false or name the layers in rotation.online")
    if online:
        names += list(linears) if list(online) == [ALL] else _match(online, linears, "rotation.online")
    names = list(dict.fromkeys(names))
    for n in names:
        width = linears[n].in_features
        if not supported_order(width):
            raise ValueError(
                f"online Hadamard: no Hadamard matrix of order {width} is known (input width of {n!r}); "
                "supported orders are 2^m times 1, 12, 20, 28, 36, ... (spinlearn.hadamard.supported_order): "
                "leave this layer out of rotation.online / set rotation.r4=false"
            )
    return names


def check_r3(attention: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse head widths the online R3 Hadamard (queries/keys over head_dim) cannot handle."""
    for name, mod in attention:
        hd = int(mod.head_dim)
        if not supported_order(hd):
            raise ValueError(
                f"rotation.r3: the online Hadamard transform has no order {hd} (head_dim of {name!r}); "
                "supported orders are 2^m times 1, 12, 20, 28, 36, ... (see spinlearn.hadamard.supported_order). "
                "Set rotation.r3=false for this model"
            )


@torch.no_grad()
def fold_online(model: nn.Module, names: Sequence[str]) -> None:
    """The weight half, in float64: ``W <- W H`` on every named linear (the input must then be ``x H``)."""
    for n in names:
        lin = model.get_submodule(n)
        lin.weight.copy_(fast_hadamard_transform(lin.weight.double()).to(lin.weight.dtype))


def online_input_hook(module, args, kwargs):
    """Forward pre-hook: the online half, ``x -> x H`` over the last axis."""
    return (fast_hadamard_transform(args[0]), *args[1:]), kwargs
