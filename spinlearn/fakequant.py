"""Rotated + fake-quantized model: what the training loss and the quantized evaluation run.

Nothing here copies weights. Each rotated tensor gets a ``torch.nn.utils.parametrize`` parametrization that
computes ``R_out^T W R_in`` from the frozen weight and the *current* matrices of a ``RotationBank`` and then
fake-quantizes it (STE); inputs of quantized linears are fake-quantized by forward pre-hooks (3-D MoE experts:
before each expert projection, inside ``quantized_experts_forward``); K and V are
quantized (after RoPE, and after the online R3 Hadamard when on) inside a registered attention function.
``remove()`` restores the plain module structure so the fusion code can fold the learned matrices.
Optionally learned beside the matrices: per-channel scales (a ``scales.ScaleBank``: norm-output hooks and the same
parametrizations), one activation clip ratio per linear input (``ActQuantizer(learn_clip=True)``) and one weight clip
ratio per weight row and group (``RotateQuantWeight.clip_logit``).
``float_passthrough`` turns every one of these wrappers into the identity for a block: the distillation teacher
is then the plain float model (no rotated weight is recomputed for it).
"""

from __future__ import annotations

import contextlib
import fnmatch
import types
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .activation_side import ActivationBasis, check_output_sides
from .hadamard import fast_hadamard_transform
from .layout import addressable_targets
from .online import ROUTER_GLOBS, check_r3, online_input_hook, online_linears
from .quant import (INPUT_QUANT_ATTR, ActQuantizer, QuantSettings, QuantSpec, clip_from_logit, clip_logit_start,
                    mse_clip_ratio, quantize_weight, quantizers_disabled, weight_groups)
from .rotations import BANK_ATTR, RotationBank, rotate_axis
from .scales import SCALES_ATTR, NormScaleHook, ScaleBank

ATTN_NAME = "spinlearn_sdpa"
KV_ATTR = "spinlearn_kv"  # the attention module's KVQuantizers (their quantizers: KV_ATTR.k_quant / .v_quant)
QUANT_SKIP = ROUTER_GLOBS  # MoE routers stay in float (tiny, and they pick experts)
PASSTHROUGH_ATTR = "spinlearn_passthrough"  # set on every module of a model inside ``float_passthrough``


def _passthrough(module: nn.Module) -> bool:
    return module.__dict__.get(PASSTHROUGH_ATTR, False)


def _unless_passthrough(hook):
    """A forward (pre-)hook that does nothing inside ``float_passthrough`` (returning None leaves the input or the
    output as it is)."""

    def run(module, *args):
        return None if _passthrough(module) else hook(module, *args)

    return run


@contextlib.contextmanager
def float_passthrough(model: nn.Module) -> Iterator[None]:
    """For the block, every wrapper ``wrap_model`` installed on ``model`` is the identity: the weight
    parametrizations return the frozen weight (no rotation, scale, online Hadamard or quantizer), the norm-scale and
    online-Hadamard hooks do nothing, R3 is skipped and every quantizer is off. Rotations, scales and online
    Hadamards are exact in float, so this computes the float model, the wrapped model's float logits up to rounding
    (``quantizers_disabled`` computes the same through the rotated weights), without reading the banks: the
    distillation teacher's forward costs a plain forward."""
    modules = list(model.modules())
    with quantizers_disabled(model):
        for m in modules:
            m.__dict__[PASSTHROUGH_ATTR] = True
        try:
            yield
        finally:
            for m in modules:
                m.__dict__.pop(PASSTHROUGH_ATTR, None)


class RotateQuantWeight(nn.Module):
    """Parametrization: frozen W -> quant(S_out^-1 R_out^T W R_in S_in [H_online]) computed from the live banks
    (S: the diagonal learned scales of a ``ScaleBank``, when given: ``in_scale`` / ``out_scale`` keys)."""

    def __init__(self, bank, in_inst, out_inst, in_axis, out_axis, wspec: QuantSpec | None, online_in: bool,
                 scales: ScaleBank | None = None, in_scale: str | None = None, out_scale: str | None = None,
                 clip_shape: tuple[int, int] | None = None):
        super().__init__()
        self.__dict__["bank"] = bank  # not a submodule: the bank is registered once, on the model
        self.__dict__["scales"] = scales  # likewise
        self.in_scale, self.out_scale = in_scale, out_scale
        self.in_inst, self.out_inst = in_inst, out_inst
        self.in_axis, self.out_axis = in_axis, out_axis
        self.wspec = wspec
        self.online_in = online_in
        self.quant_enabled = True
        # Learned weight clipping (``clip_shape`` = [rows, groups] of the quantized weight): ratio = sigmoid(logit)
        # per row (group), starting at LEARNED_CLIP_DEFAULT; ``fixed_clip`` is a learned table applied afterwards.
        self.clip_logit = None if clip_shape is None else nn.Parameter(
            torch.full(clip_shape, clip_logit_start(1.0)))
        self.fixed_clip: torch.Tensor | None = None

    def clip_ratio(self) -> torch.Tensor | None:
        """The per-row (group) clip ratio in use, [rows, groups]: learned, fixed, or None (the spec's)."""
        if self.clip_logit is not None:
            return clip_from_logit(self.clip_logit)
        return self.fixed_clip

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if _passthrough(self):
            return w
        x = self.transformed(w)
        if self.quant_enabled and self.wspec is not None and self.wspec.enabled and x.ndim >= 2:
            x = quantize_weight(x.reshape(-1, x.shape[-1]), self.wspec, self.clip_ratio()).reshape(x.shape)
        return x.to(w.dtype)

    def transformed(self, w: torch.Tensor) -> torch.Tensor:
        """What the weight quantizer reads: S_out^-1 R_out^T W R_in S_in [H_online], in float32 (float64 stays)."""
        x = w.float() if w.dtype in (torch.bfloat16, torch.float16) else w
        if self.in_inst is not None:
            # .to(x): the weight's dtype and device (under a device map the bank sits on the first GPU)
            x = rotate_axis(x, self.bank.get(self.in_inst).to(x), self.in_axis)
        if self.out_inst is not None:
            x = rotate_axis(x, self.bank.get(self.out_inst).to(x), self.out_axis)
        if self.in_scale is not None or self.out_scale is not None:
            x = self.scales.apply(x, self.in_scale, self.in_axis, self.out_scale, self.out_axis)
        if self.online_in:
            x = fast_hadamard_transform(x)  # W <- W H: the input is transformed by H online
        return x

    @torch.no_grad()
    def mse_clip_start(self, w: torch.Tensor) -> torch.Tensor:
        """The clip ratio per row and group [rows, groups] that the MSE search (``quant.mse_clip_ratio``) picks for
        ``transformed(w)``: the learned weight clips' start with ``quant.w_clip_init: mse``."""
        x = self.transformed(w)
        rows, groups = self.clip_logit.shape
        return mse_clip_ratio(x.reshape(rows, groups, -1), self.wspec.bits, self.wspec.sym).squeeze(-1)


class KVQuantizers(nn.Module):
    def __init__(self, head_dim: int, spec: QuantSpec, r3: bool, learn_clip: bool = False):
        super().__init__()
        self.r3 = r3
        learn_clip = learn_clip and spec.enabled
        self.k_quant = ActQuantizer(spec, head_dim=head_dim, learn_clip=learn_clip)
        self.v_quant = ActQuantizer(spec, head_dim=head_dim, learn_clip=learn_clip)


def _spinlearn_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = getattr(module, KV_ATTR, None)
    if st is not None and not _passthrough(st):
        if st.r3:  # q H (k H)^T = q k^T: exact in float, flattens K's outliers for the KV cache
            query, key = fast_hadamard_transform(query), fast_hadamard_transform(key)
        key, value = st.k_quant(key), st.v_quant(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _spinlearn_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def attention_modules(model: nn.Module):
    for name, mod in model.named_modules():
        if hasattr(mod, "head_dim") and any(hasattr(mod, k) for k in ("k_proj", "qkv_proj")):
            yield name, mod


def check_online_hadamards(model: nn.Module, *, r3: bool, online: Sequence[str] | None = None, r4: bool = False) -> list[str]:
    """Refuse widths the online Hadamards cannot handle (R3 over head_dim, input Hadamards over in_features);
    returns the names of the linears with an online input Hadamard."""
    if r3:
        check_r3(list(attention_modules(model)))
    return online_linears(model, online, r4)


def _act_quant_hook(module, args, kwargs):
    return (getattr(module, INPUT_QUANT_ATTR)(args[0]), *args[1:]), kwargs


# 3-D MoE experts (transformers' ``use_experts_implementation`` modules: gate_up_proj / up_proj and down_proj are
# bare [experts, out, in] parameters of one module) run both projections inside one forward, so no module hook
# sees the down projection's input act(gate) * up. Their forward is replaced, per instance, by the eager loop
# below with a quantizer before each projection; with the quantizers off it computes what eager does, op for op.
EXPERT_INPUT_QUANTIZERS = {
    "gate_up_proj": INPUT_QUANT_ATTR, "up_proj": INPUT_QUANT_ATTR, "down_proj": "spinlearn_act_down",
}
_EXPERTS_CONTRACT = ("num_experts", "has_gate", "has_bias", "is_transposed", "act_fn")


def _expert_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else nn.functional.linear(x, w)  # w: [in, out] when transposed, else [out, in]
    return y if b is None else y + b


def _quantize_with(module: nn.Module, attr: str, x: torch.Tensor) -> torch.Tensor:
    q = getattr(module, attr, None)
    return x if q is None else q(x)


def quantized_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Eager experts loop (transformers' reference for ``use_experts_implementation``) with the input of each
    expert projection fake-quantized per token: ``spinlearn_act`` before gate_up/up, ``spinlearn_act_down``
    before down_proj. Every parametrized weight is read once per call."""
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    w_up, w_down = getattr(self, up_name), self.down_proj
    b_up = getattr(self, f"{up_name}_bias") if self.has_bias else None
    b_down = self.down_proj_bias if self.has_bias else None
    x = _quantize_with(self, INPUT_QUANT_ATTR, hidden_states)
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e >= self.num_experts:
            continue
        pos, tok = torch.where(mask[e])
        h = _expert_linear(x[tok], w_up[e], None if b_up is None else b_up[e], self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _quantize_with(self, "spinlearn_act_down", h)
        h = _expert_linear(h, w_down[e], None if b_down is None else b_down[e], self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def _experts_quantizer_attr(experts: nn.Module, name: str) -> str:
    """Which input quantizer of an experts module the bare parameter ``name`` reads (or a clear refusal)."""
    missing = [a for a in _EXPERTS_CONTRACT if not hasattr(experts, a)]
    pname = name.rsplit(".", 1)[-1]
    if missing or pname not in EXPERT_INPUT_QUANTIZERS or getattr(experts, "_is_expert_parallel", False):
        raise ValueError(
            f"cannot fake-quantize the input of {name!r}: activation quantization of bare expert tensors needs a "
            f"transformers experts module (use_experts_implementation, no expert parallelism) holding "
            f"{'/'.join(EXPERT_INPUT_QUANTIZERS)}; {type(experts).__name__} "
            + (f"lacks {missing}" if missing else f"holds {pname!r}")
        )
    return EXPERT_INPUT_QUANTIZERS[pname]


def _check_expert_inputs(model: nn.Module, targets: dict) -> None:
    """Raise (see ``_experts_quantizer_attr``) for a bare expert tensor whose input cannot be fake-quantized."""
    for name, t in targets.items():
        if t.module is None and not any(fnmatch.fnmatchcase(name, g) for g in QUANT_SKIP):
            _experts_quantizer_attr(model.get_submodule(name.rsplit(".", 1)[0]), name)


def _install_act_quant(model: nn.Module, name: str, t, spec: QuantSpec, handle: FakeQuantHooks,
                       learn_clip: bool = False) -> ActQuantizer:
    """Fake-quantize the input of target ``t``: a forward pre-hook on a Linear-like module; for a bare expert
    tensor, a quantizer in ``quantized_experts_forward``, installed as the experts module's forward."""
    if t.module is not None:
        mod, attr = t.module, INPUT_QUANT_ATTR
    else:
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        attr = _experts_quantizer_attr(mod, name)
    if hasattr(mod, attr):
        return getattr(mod, attr)
    setattr(mod, attr, ActQuantizer(spec, learn_clip=learn_clip))
    handle._attr_added.append((mod, attr))
    if t.module is not None:
        handle._hooks.append(mod.register_forward_pre_hook(_act_quant_hook, with_kwargs=True))
    elif "forward" not in mod.__dict__:
        mod.forward = types.MethodType(quantized_experts_forward, mod)
        handle._attr_added.append((mod, "forward"))
    return getattr(mod, attr)


class FakeQuantHooks:
    """Handle on a model with rotation parametrizations, quantizer hooks and the KV attention function (a context
    manager too: ``with wrap_model(...) as handle:`` removes them on exit)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks: list = []
        self._parametrized: list[tuple[nn.Module, str]] = []
        self._attr_added: list[tuple[nn.Module, str]] = []
        self._old_attn = None

    def remove(self) -> None:
        """Drop every hook, quantizer and parametrization; weights return to the frozen originals."""
        for h in self._hooks:
            h.remove()
        for mod, pname in self._parametrized:
            if parametrize.is_parametrized(mod, pname):
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=False)
        for mod, attr in self._attr_added:
            if attr in mod.__dict__ or attr in mod._modules:  # instance attributes only, never the class's forward
                delattr(mod, attr)
        if self._old_attn is not None:
            self.model.config._attn_implementation = self._old_attn
        self._hooks, self._parametrized, self._attr_added = [], [], []

    def __enter__(self) -> FakeQuantHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _owner_and_param(model: nn.Module, target) -> tuple[nn.Module, str]:
    if target.module is not None and target.weight is getattr(target.module, "weight", None):
        return target.module, "weight"
    if target.module is not None and target.weight is getattr(target.module, "bias", None):
        return target.module, "bias"
    owner_name, pname = target.name.rsplit(".", 1)
    return model.get_submodule(owner_name), pname


def _scale_sides(scales: ScaleBank | None) -> tuple[dict[str, str], dict[str, str]]:
    """target name -> scale key, for the input side (readers) and the output side (writers: v_proj, up_proj)."""
    s_in: dict[str, str] = {}
    s_out: dict[str, str] = {}
    for p in scales.pairs if scales is not None else ():
        for r in p.readers:
            if r in s_in:
                raise ValueError(f"{r!r} reads two scale pairs ({s_in[r]!r}, {p.key!r})")
            s_in[r] = p.key
        if p.kind != "norm":
            s_out[p.source] = p.key
    return s_in, s_out


def wrap_model(
    model: nn.Module,
    *,
    plan=None,
    bank: RotationBank | None = None,
    quant: QuantSettings | None = None,
    r3: bool = False,
    online: Sequence[str] = (),
    online_in_weights: bool = True,
    scales: ScaleBank | None = None,
    learn_a_clip: bool = False,
    learn_w_clip: bool = False,
    learn_kv_clip: bool = False,
    rotate_activations: bool = False,
) -> FakeQuantHooks:
    """Install rotations (plan + bank), online Hadamards (R3 on Q/K; input Hadamards on the linears named in
    ``online``, see ``online.online_linears``) and fake quantizers on ``model``.

    With no plan/bank only quantizers (and online Hadamards) are installed: the baseline evaluations use that.
    ``online_in_weights=False`` is for models whose weights already hold the folded ``W H``
    (``online.fold_online``): only the online half ``x -> x H`` is installed. ``scales`` (a ``ScaleBank`` hung on
    the model beside the bank) adds the learned per-channel scales: norm outputs / s (forward hooks), writers'
    output rows / s and readers' input columns * s in the parametrizations (see ``spinlearn.scales``).
    ``learn_a_clip``: every linear input's quantizer gets a learnable clip ratio (``ActQuantizer(learn_clip=True)``;
    see ``activation_clip_table`` / ``set_activation_clips``). ``learn_w_clip``: every int-quantized weight gets a
    learnable clip ratio per row (group) (``weight_clip_table`` / ``set_weight_clips``); ``learn_kv_clip``: the K and
    V quantizers of every attention block get one each (in the activation clip table). ``rotate_activations``
    (16-bit weights only): the weights stay as they are and every quantizer quantizes in the rotated model's basis
    instead (``spinlearn.activation_side``): the same loss, without recomputing the weights."""
    quant = quant or QuantSettings()
    handle = FakeQuantHooks(model)
    targets = addressable_targets(model, skip=(BANK_ATTR, SCALES_ATTR))
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    # Which matrix instance each tensor reads / writes.
    sides: dict[int, dict] = {}
    if plan is not None:
        for p in plan.placements:
            entry = sides.setdefault(id(p.target.weight), {"target": p.target, "input": None, "output": None})
            entry[p.side] = p.instance
    online_names = set(online)
    scale_in, scale_out = _scale_sides(scales)
    if quant.a.enabled:
        _check_expert_inputs(model, targets)  # refuse before anything is installed

    if rotate_activations and (quant.w.enabled or quant.lm_head.enabled):
        raise ValueError(f"rotations on the activations need 16-bit weights (got {quant.name}, lm_head "
                         f"{quant.lm_head.bits} bits): fake-quantized weights must be rotated themselves")
    bases: dict[tuple, ActivationBasis] = {}  # (parent module, T) -> the basis its quantizers share
    for name, t in targets.items():
        is_head = lm_head is not None and t.module is lm_head
        skip_quant = isinstance(t.module, nn.Embedding) or any(fnmatch.fnmatchcase(name, g) for g in QUANT_SKIP)
        wspec = None if skip_quant else (quant.lm_head if is_head else quant.w)
        entry = sides.get(id(t.weight)) or {"input": None, "output": None}
        s_in, s_out = scale_in.get(name), scale_out.get(name)
        if not rotate_activations:
            _parametrize_weight(model, handle, t, entry, wspec, name in online_names and online_in_weights,
                                bank, scales, s_in, s_out, learn_w_clip)
            if name in online_names:
                handle._hooks.append(t.module.register_forward_pre_hook(_unless_passthrough(online_input_hook),
                                                                            with_kwargs=True))
        # Activation quantization of every quantized linear's input (3-D experts: both projections, per expert).
        if not skip_quant and not is_head and quant.a.enabled:
            q = _install_act_quant(model, name, t, quant.a, handle, learn_a_clip)
            if rotate_activations:  # the input's basis in the rotated model (spinlearn.activation_side)
                q.basis = _shared_basis(model, handle, bases, name, ActivationBasis(bank, entry["input"], scales,
                                                                                      s_in, name in online_names))

    if not rotate_activations:
        _install_residual_extras(model, handle, sides, bank, scales)
    _install_kv(model, quant, r3, handle, learn_kv_clip)
    if rotate_activations:
        handled = _kv_bases(model, targets, sides, bank, scales, scale_out)
        if plan is not None:
            check_output_sides(plan, handled)
    return handle


def _shared_basis(model, handle, bases: dict, name: str, basis: ActivationBasis) -> ActivationBasis:
    """One basis per parent module and T (q/k/v of an attention block, gate/up of an MLP share theirs, so T(x) is
    computed once); it forgets its T(x) when the parent's forward ends."""
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    shared = bases.setdefault((parent, basis.key), basis)
    if shared is basis:
        handle._hooks.append(model.get_submodule(parent).register_forward_hook(basis.clear))
    return shared


def _parametrize_weight(model, handle, t, entry, wspec, online_w, bank, scales, s_in, s_out, learn_w_clip) -> None:
    """The weight-side wrapper of one target (and of its bias when the output side rotates or scales): rotations,
    scales, the online Hadamard's weight half and the weight quantizer, whichever apply."""
    rotates = entry["input"] or entry["output"]
    if not (rotates or online_w or (wspec is not None and wspec.enabled) or s_in or s_out):
        return
    owner, pname = _owner_and_param(model, t)
    learn_clip = learn_w_clip and wspec is not None and wspec.enabled and wspec.format == "int"
    par = RotateQuantWeight(bank, entry["input"], entry["output"], t.in_axis, t.out_axis, wspec, online_w, scales,
                            s_in, s_out, clip_shape=weight_groups(t.weight.shape, wspec) if learn_clip else None)
    parametrize.register_parametrization(owner, pname, par, unsafe=True)
    handle._parametrized.append((owner, pname))
    if (entry["output"] or s_out) and t.bias is not None:
        bpar = RotateQuantWeight(bank, None, entry["output"], None, -1, None, False, scales, None, s_out)
        parametrize.register_parametrization(owner, "bias", bpar, unsafe=True)
        handle._parametrized.append((owner, "bias"))


def _install_residual_extras(model, handle, sides: dict, bank, scales) -> None:
    """Weight-side only: norm biases kept in place (OPT's final LayerNorm) rotate with the residual stream; norm
    outputs are divided by their learned scales (before the readers' pre-hooks: quantizers, online Hadamards)."""
    for entry in sides.values():
        t = entry["target"]
        if t.module is not None and t.weight is getattr(t.module, "bias", None) and t.weight.ndim == 1:
            if not parametrize.is_parametrized(t.module, "bias"):
                par = RotateQuantWeight(bank, None, entry["output"], None, -1, None, False)
                parametrize.register_parametrization(t.module, "bias", par, unsafe=True)
                handle._parametrized.append((t.module, "bias"))
    for p in scales.pairs if scales is not None else ():
        if p.kind == "norm":
            norm = model.get_submodule(p.source)
            handle._hooks.append(norm.register_forward_hook(_unless_passthrough(NormScaleHook(scales, p.key))))


def _kv_bases(model, targets: dict, sides: dict, bank, scales, scale_out: dict) -> set[str]:
    """Activation side: the K/V cache quantizers quantize in the basis of k_proj's / v_proj's output (R2 and the
    v -> o scale on V). Returns the target names accounted for."""
    handled = set()
    for attn_name, mod in attention_modules(model):
        kv = getattr(mod, KV_ATTR, None)
        for proj, quantizer in (("k_proj", getattr(kv, "k_quant", None)), ("v_proj", getattr(kv, "v_quant", None))):
            tname = f"{attn_name}.{proj}"
            t = targets.get(tname)
            if t is None:
                continue
            handled.add(tname)
            out = (sides.get(id(t.weight)) or {}).get("output")
            if quantizer is not None and (out or scale_out.get(tname)):
                quantizer.basis = ActivationBasis(bank, out, scales, scale_out.get(tname))
    return handled


def _install_kv(model: nn.Module, quant: QuantSettings, r3: bool, handle: FakeQuantHooks,
                learn_clip: bool = False) -> None:
    """The attention function with R3 on Q/K and the K/V quantizers (when either is on; ``learn_clip``: a learnable
    clip ratio each)."""
    if r3:
        check_r3(list(attention_modules(model)))
    if quant.kv.enabled or r3:
        _register_attention()
        for _, mod in attention_modules(model):
            setattr(mod, KV_ATTR, KVQuantizers(int(mod.head_dim), quant.kv, r3, learn_clip))
            handle._attr_added.append((mod, KV_ATTR))
        handle._old_attn = model.config._attn_implementation
        model.config._attn_implementation = ATTN_NAME


@contextlib.contextmanager
def rotations_attached(
    model: nn.Module,
    plan,
    matrices: dict[str, torch.Tensor],
    *,
    quant: QuantSettings | None = None,
    r3: bool = False,
    online: Sequence[str] = (),
    bank: RotationBank | None = None,
    scales: ScaleBank | None = None,
    learn_a_clip: bool = False,
    learn_w_clip: bool = False,
    learn_kv_clip: bool = False,
    rotate_activations: bool = False,
) -> Iterator[FakeQuantHooks]:
    """Learnable rotations on a prepared model (``rotation_plan.prepare_model``), for the duration of the block.

    Freezes every weight, hangs a ``RotationBank`` built from ``matrices`` (or the given ``bank``) on the model
    under ``BANK_ATTR`` (its Stiefel parameters are then the model's only trainable ones, which is what the
    Trainer and DDP see) and wraps the model (``wrap_model``). On exit the wrappers and the bank are removed and
    the weights' ``requires_grad`` flags restored: the model is the plain prepared model again, ready for the
    learned matrices to be folded. The handle's ``bank`` attribute holds the bank.

    ``scales``: a ``ScaleBank`` (``scales.plan_scales`` of the prepared model) learned with the rotations; it hangs
    on the model under ``SCALES_ATTR`` (so DDP sees it) and is ``handle.scales`` (None without). ``learn_a_clip``:
    learnable activation clip ratios (``activation_clip_params(model)`` while attached; they go with the wrappers);
    ``learn_w_clip``: learnable weight clip ratios (``weight_clip_params(model)``), likewise; ``learn_kv_clip``: the
    K/V quantizers' (in ``activation_clip_params``). ``rotate_activations``:
    the matrices act on the quantizers' inputs instead of the weights (16-bit weights; ``wrap_model``)."""
    if hasattr(model, BANK_ATTR):
        raise RuntimeError(f"model already has rotations attached ({BANK_ATTR}); nest no attachments")
    device = next(model.parameters()).device
    if device.type == "meta":  # a skeleton (spinlearn.sharded): the learned tensors keep real values
        device = torch.device("cpu")
    bank = (bank if bank is not None else RotationBank.for_plan(plan, matrices)).to(device)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    setattr(model, BANK_ATTR, bank)
    if scales is not None:
        setattr(model, SCALES_ATTR, scales.to(device))
    for p in [*bank.parameters(), *(scales.parameters() if scales is not None else ())]:
        p.requires_grad_(True)
    handle = None
    try:
        handle = wrap_model(model, plan=plan, bank=bank, quant=quant, r3=r3, online=online, scales=scales,
                            learn_a_clip=learn_a_clip, learn_w_clip=learn_w_clip, learn_kv_clip=learn_kv_clip,
                            rotate_activations=rotate_activations)
        handle.bank, handle.scales = bank, scales
        yield handle
    finally:
        if handle is not None:
            handle.remove()
        delattr(model, BANK_ATTR)
        if scales is not None:
            delattr(model, SCALES_ATTR)
        for p, flag in flags:
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------ learnable activation clipping
def activation_clip_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """quantizer module name -> its learnable clip logit (``wrap_model(learn_a_clip=True)``; K/V quantizers with
    ``learn_kv_clip``), in model order."""
    return {n: m.clip_logit for n, m in model.named_modules()
            if isinstance(m, ActQuantizer) and m.clip_logit is not None}


@torch.no_grad()
def activation_clip_table(model: nn.Module) -> dict[str, torch.Tensor]:
    """quantizer module name (``...q_proj.spinlearn_act``) -> learned clip ratio (float32 scalar): what a run saves
    (``activation_clips.safetensors``) so evaluations and exports reproduce the quantized measurement."""
    return {n: m.clip_ratio().detach().cpu().clone() for n, m in model.named_modules()
            if isinstance(m, ActQuantizer) and m.clip_logit is not None}


def _check_table_names(table: dict, quantizers: dict, kind: str) -> None:
    """Every name of a clip table must be one of the model's ``kind`` (activation / weight) quantizers."""
    unknown = sorted(set(table) - set(quantizers))
    if unknown:
        raise KeyError(f"{kind} clip table names quantizers this model does not have: {unknown[:3]} (it has "
                       f"{sorted(quantizers)[:3]} ...; wrap the model with {kind} quantization first)")


def set_activation_clips(model: nn.Module, table: dict[str, torch.Tensor | float]) -> None:
    """Fix the clip ratio of every activation (or K/V) quantizer named in ``table`` (a wrapped model, e.g. the fused
    model after ``wrap_model(quant=...)``): its spec's clip_ratio becomes the table's value. Every name must exist."""
    import dataclasses

    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    _check_table_names(table, quantizers, "activation")
    for name, ratio in table.items():
        q = quantizers[name]
        q.spec = dataclasses.replace(q.spec, clip_ratio=float(ratio))


# ------------------------------------------------------------------------------ learnable weight clipping
def weight_quantizers(model: nn.Module) -> dict[str, RotateQuantWeight]:
    """Weight name (``...q_proj.weight``, a 3-D expert tensor's name) -> the parametrization that quantizes it."""
    found = {}
    for name, mod in model.named_modules():
        for pname, plist in (getattr(mod, "parametrizations", None) or {}).items():
            for par in plist:
                if isinstance(par, RotateQuantWeight) and par.wspec is not None and par.wspec.enabled:
                    found[f"{name}.{pname}" if name else pname] = par
    return found


def weight_clip_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight name -> its learnable clip logit [rows, groups] (``wrap_model(learn_w_clip=True)``), in model order."""
    return {n: q.clip_logit for n, q in weight_quantizers(model).items() if q.clip_logit is not None}


@torch.no_grad()
def start_weight_clips_at_mse(model: nn.Module) -> torch.Tensor | None:
    """Start every learnable weight clip ratio at the MSE search's ratio per row and group of the weight its quantizer
    reads now (the start rotations and scales, any online Hadamard; ``RotateQuantWeight.mse_clip_start``) instead of
    LEARNED_CLIP_DEFAULT. A sharded (FSDP2) weight is gathered whole, one at a time: every rank must call this.
    Returns every ratio set, flattened (None when nothing learns weight clips)."""
    from torch.distributed.tensor import DTensor

    ratios = []
    for name, q in weight_quantizers(model).items():
        if q.clip_logit is None:
            continue
        w = _original_of(model, name)
        ratio = q.mse_clip_start(w.full_tensor() if isinstance(w, DTensor) else w)
        local = q.clip_logit.to_local() if isinstance(q.clip_logit, DTensor) else q.clip_logit
        local.copy_(clip_logit_start(ratio).to(local))
        ratios.append(ratio.flatten().cpu())
    return torch.cat(ratios) if ratios else None


@torch.no_grad()
def weight_clip_table(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weight name -> learned clip ratios [rows, groups] (float32): what a run saves (``weight_clips.safetensors``)
    so that evaluations and exports quantize the weights with the scales training measured."""
    return {n: q.clip_ratio().detach().float().cpu().clone() for n, q in weight_quantizers(model).items()
            if q.clip_logit is not None}


def set_weight_clips(model: nn.Module, table: dict[str, torch.Tensor]) -> None:
    """Fix the clip ratios of every weight named in ``table`` (a model wrapped with weight quantization, e.g. the
    fused model after ``wrap_model(quant=...)``). Every name must be a quantized weight of the table's shape."""
    quantizers = weight_quantizers(model)
    _check_table_names(table, quantizers, "weight")
    for name, ratio in table.items():
        q = quantizers[name]
        if q.wspec.format != "int":
            raise ValueError(f"weight clip ratios apply to int-format weights; {name!r} is quantized as "
                             f"{q.wspec.format}")
        expected = _clip_shape_of(model, name, q.wspec)
        if tuple(ratio.shape) != expected:
            raise ValueError(f"weight clip ratios for {name!r} have shape {tuple(ratio.shape)}; this quantizer "
                             f"(group size {q.wspec.group_size}) needs {expected} [rows, groups]: evaluate with the "
                             "run's weight group size, or without its weight clips")
        q.fixed_clip = ratio.detach().float()


def _clip_shape_of(model: nn.Module, name: str, spec: QuantSpec) -> tuple[int, int]:
    return weight_groups(_original_of(model, name).shape, spec)


def _original_of(model: nn.Module, name: str) -> torch.Tensor:
    """The frozen tensor behind the parametrized weight ``name`` (``weight_quantizers``' names)."""
    owner_name, pname = name.rsplit(".", 1) if "." in name else ("", name)
    return model.get_submodule(owner_name).parametrizations[pname].original


@contextlib.contextmanager
def learned_extras_off(model: nn.Module) -> Iterator[None]:
    """The attached model as its start: learned scales at 1 (``ScaleBank.identity``) and every learnable clip ratio
    (activations and weights) replaced by its spec's fixed one, for the duration of the block (measures the rotation
    alone)."""
    clips = {m: m.clip_logit for m in model.modules()
             if isinstance(m, (ActQuantizer, RotateQuantWeight)) and m.clip_logit is not None}
    scales = getattr(model, SCALES_ATTR, None)
    try:
        for m in clips:
            m.clip_logit = None
        with scales.identity() if scales is not None else contextlib.nullcontext():
            yield
    finally:
        for m, p in clips.items():
            m.clip_logit = p
