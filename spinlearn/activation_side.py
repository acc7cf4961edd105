"""Learned rotations applied to the activations around their quantizers instead of to the weights.

When training keeps the weights in 16 bits (W16A4KV4 recipes, with GPTQ after training), the rotated weights
``W' = S_out^-1 R_out^T W R_in S_in [H]`` are never quantized, so the only places the matrices change the loss are the
quantizers: each linear input's and the V (or K) cache's. A quantizer that sees ``x' = ((x R) / s) H`` in the rotated
model can equally see it in the plain model as

    x  ->  T^-1(Q(T(x))),   T(x) = ((x R) / s) H,   T^-1(z) = ((z H^T) * s) R^T

and the plain, frozen weights do the rest: in float T^-1 T is the identity, so the loss and its gradients are the
rotated model's (``tests/test_activation_side.py`` checks this against the weight-side wrappers on every family).
The cost per step is a [tokens, d] x [d, d] product per quantized input instead of recomputing every weight
(``W R``: [out, d] x [d, d] per linear, and its backward), and no rotated weight is ever held in memory.

Which matrix belongs to which quantizer comes from the rotation plan: a linear input's basis is the linear's
input-side matrix (R1 for the residual readers, R2 per head for o_proj), its input scale and its online Hadamard;
the V cache's basis is v_proj's output-side matrix and scale (K's likewise, when a layout rotates k_proj's output).
Every other output-side matrix writes the residual stream, which only its readers' quantizers see.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .choices import ROTATION_APPLY
from .hadamard import fast_hadamard_transform
from .rotations import rotate_axis


class ActivationBasis:
    """``T`` and ``T^-1`` of one quantizer (see the module docstring), read from the live banks on every call.

    ``instance``: the rotation bank's matrix (None: no rotation here); ``scale_key``: the scale bank's pair (None: no
    scale); ``online``: an online Hadamard after both. Tensors are [..., features]; a 4-D [batch, heads, tokens,
    head_dim] K/V tensor takes the head's matrix on its last dim and the scale per (head, channel)."""

    def __init__(self, bank, instance: str | None, scales=None, scale_key: str | None = None, online: bool = False):
        self.bank, self.instance = bank, instance
        self.scales, self.scale_key = scales, scale_key
        self.online = online
        self._last = None  # (weakref to the input, its version, T(input)): see ``_forward_once``

    @property
    def key(self) -> tuple:
        """Quantizers whose bases have equal keys compute the same T (q/k/v of one norm, gate/up): they share one."""
        return self.instance, self.scale_key, self.online

    def _scale(self, x: Tensor) -> Tensor:
        if x.dim() == 4:  # [batch, heads, tokens, head_dim]: the vector covers heads * head_dim
            heads, head_dim = x.shape[1], x.shape[-1]
            return self.scales.for_reader(self.scale_key, heads * head_dim).view(heads, 1, head_dim)
        return self.scales.for_reader(self.scale_key, x.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        """x -> ((x R) / s) H."""
        if self.instance is not None:
            x = rotate_axis(x, self.bank.get(self.instance).to(x), -1)  # x's dtype and device
        if self.scale_key is not None:
            x = x / self._scale(x).to(x)
        return fast_hadamard_transform(x) if self.online else x

    def inverse(self, z: Tensor) -> Tensor:
        """z -> ((z H^T) * s) R^T."""
        if self.online:
            z = fast_hadamard_transform(z, inverse=True)
        if self.scale_key is not None:
            z = z * self._scale(z).to(z)
        if self.instance is not None:
            z = rotate_axis(z, self.bank.get(self.instance).to(z).T, -1)
        return z

    def around(self, quantize, x: Tensor) -> Tensor:
        """``T^-1(quantize(T(x)))``, computed in float32 for half-precision inputs (as the weight-side wrappers
        compute the rotated weights)."""
        return self.inverse(quantize(self._forward_once(x))).to(x.dtype)

    def _forward_once(self, x: Tensor) -> Tensor:
        """T(x) (float32 for half-precision x), computed once for the readers of one input that share this basis
        (q, k and v read one norm output). The input is remembered by weak reference and version, so a freed or
        modified input is never matched; the result is held until ``clear`` (the readers' parent module's forward
        hook, installed by ``fakequant.wrap_model``), so it outlives no forward pass."""
        import weakref

        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        out = self.forward(x.float() if x.dtype in (torch.bfloat16, torch.float16) else x)
        self._last = (weakref.ref(x), x._version, out)
        return out

    def clear(self, *_args) -> None:
        """Forget the remembered T(x) (usable as a forward hook)."""
        self._last = None

    def __repr__(self) -> str:
        return f"ActivationBasis(instance={self.instance}, scale={self.scale_key}, online={self.online})"


def resolve_apply(mode: str, weights_quantized: bool) -> bool:
    """True when the rotations act on the activations: ``activations``, or ``auto`` with 16-bit weights (and
    lm_head) while training; ``weights`` never. ``activations`` with fake-quantized weights is refused."""
    if mode not in ROTATION_APPLY:
        raise ValueError(f"rotation.apply={mode!r}: use one of {' | '.join(ROTATION_APPLY)}")
    if mode == "activations" and weights_quantized:
        raise ValueError("rotation.apply=activations needs 16-bit weights while training (quant.w_bits and "
                         "quant.lm_head_bits 16, e.g. a W16A4KV4 recipe with w_method gptq): fake-quantized weights "
                         "must be rotated themselves; use rotation.apply: weights (or auto)")
    return mode == "activations" or (mode == "auto" and not weights_quantized)


def check_output_sides(plan, handled: set[str]) -> None:
    """Refuse a plan with an output-side matrix no quantizer basis accounts for: every output-side placement must be
    on a K/V projection (``handled`` target names) or write a matrix some reader takes on its input side (the
    residual stream's R1 pattern), else activation-side training would silently ignore it."""
    read = {p.instance for p in plan.placements if p.side == "input" and p.instance is not None}
    orphans = sorted({p.target.name for p in plan.placements if p.side == "output" and p.instance is not None
                      and p.target.name not in handled and p.instance not in read})
    if orphans:
        raise ValueError(f"rotation.apply=activations: the layout rotates the output of {orphans[:3]} with a matrix "
                         "no reader takes as input, so only the weight-side wrappers account for it; use "
                         "rotation.apply: weights")


__all__ = ["ActivationBasis", "resolve_apply", "check_output_sides"]
