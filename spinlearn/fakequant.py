"""Rotated + fake-quantized model: what the training loss and the quantized evaluation run.

Nothing here copies weights. Each rotated tensor gets a ``torch.nn.utils.parametrize`` parametrization that
computes ``R_out^T W R_in`` from the frozen weight and the *current* matrices of a ``RotationBank`` and then
fake-quantizes it (STE); inputs of quantized linears are fake-quantized by forward pre-hooks; K and V are
quantized (after RoPE, and after the online R3 Hadamard when on) inside a registered attention function.
``remove()`` restores the plain module structure so the fusion code can fold the learned matrices.
"""

from __future__ import annotations

import fnmatch
import torch
from torch import nn
from torch.nn.utils import parametrize

from .hadamard import fast_hadamard_transform, supported_order
from .layout import addressable_targets
from .quant import ActQuantizer, QuantSettings, QuantSpec, quantize_weight
from .rotations import RotationBank, rotate_axis

ATTN_NAME = "spinlearn_sdpa"
R4_PATTERN = "*mlp.down_proj|*mixer.down_proj|*fc2"
QUANT_SKIP = ("*mlp.gate", "*router*")  # MoE routers stay in float (tiny, and they pick experts)
ONLINE_KEY = "spinlearn_online_rotations"  # config attribute recording online Hadamards for serving


class RotateQuantWeight(nn.Module):
    """Parametrization: frozen W -> quant(R_out^T W R_in [H_online]) computed from the live bank."""

    def __init__(self, bank, in_inst, out_inst, in_axis, out_axis, wspec: QuantSpec | None, online_in: bool):
        super().__init__()
        self.__dict__["bank"] = bank  # not a submodule: the bank is registered once, on the model
        self.in_inst, self.out_inst = in_inst, out_inst
        self.in_axis, self.out_axis = in_axis, out_axis
        self.wspec = wspec
        self.online_in = online_in
        self.quant_enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = w.float() if w.dtype in (torch.bfloat16, torch.float16) else w
        if self.in_inst is not None:
            x = rotate_axis(x, self.bank.get(self.in_inst).to(x.dtype), self.in_axis)
        if self.out_inst is not None:
            x = rotate_axis(x, self.bank.get(self.out_inst).to(x.dtype), self.out_axis)
        if self.online_in:
            x = fast_hadamard_transform(x)  # W <- W H: the input is transformed by H online
        if self.quant_enabled and self.wspec is not None and self.wspec.enabled and x.ndim >= 2:
            x = quantize_weight(x.reshape(-1, x.shape[-1]), self.wspec).reshape(x.shape)
        return x.to(w.dtype)


class KVQuantizers(nn.Module):
    def __init__(self, head_dim: int, spec: QuantSpec, r3: bool):
        super().__init__()
        self.r3 = r3
        self.k_quant = ActQuantizer(spec, head_dim=head_dim)
        self.v_quant = ActQuantizer(spec, head_dim=head_dim)


def _spinlearn_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = getattr(module, "spinlearn_kv", None)
    if st is not None:
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


def r4_linear_names(model: nn.Module) -> list[str]:
    """The Linear modules whose input gets the online R4 Hadamard (down_proj and its cousins)."""
    globs = R4_PATTERN.split("|")
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, g) for g in globs)]


def check_r4(model: nn.Module) -> list[str]:
    names = r4_linear_names(model)
    if not names:
        raise ValueError(f"rotation.r4 / --r4 is on but no module matches {R4_PATTERN!r}")
    for n in names:
        width = model.get_submodule(n).in_features
        if not supported_order(width):
            raise ValueError(
                f"rotation.r4: the online Hadamard transform has no order {width} (input width of {n!r}); "
                "set rotation.r4=false for this model"
            )
    return names


def check_online_hadamards(model: nn.Module, *, r3: bool, r4: bool) -> None:
    """Refuse widths the online Hadamards cannot handle (R3 over head_dim, R4 over down_proj's input)."""
    if r3:
        for name, mod in attention_modules(model):
            hd = int(mod.head_dim)
            if not supported_order(hd):
                raise ValueError(
                    f"rotation.r3: the online Hadamard transform has no order {hd} (head_dim of {name!r}); "
                    "supported orders are 2^m times 1, 12, 20, 28, 36, ... (see spinlearn.hadamard.supported_order). "
                    "Set rotation.r3=false for this model"
                )
    if r4:
        check_r4(model)


@torch.no_grad()
def fold_r4(model: nn.Module) -> list[str]:
    """W <- W H (float64) on every R4 module; the online half x -> x H is installed by
    ``wrap_model(..., r4=True, r4_in_weights=False)`` or ``apply_online_rotations``."""
    names = check_r4(model)
    for n in names:
        lin = model.get_submodule(n)
        lin.weight.copy_(fast_hadamard_transform(lin.weight.double()).to(lin.weight.dtype))
    return names


def _online_in_hook(module, args, kwargs):
    return (fast_hadamard_transform(args[0]), *args[1:]), kwargs


def _act_quant_hook(module, args, kwargs):
    return (module.spinlearn_act(args[0]), *args[1:]), kwargs


class FakeQuantHooks:
    """Handle on a model with rotation parametrizations, quantizer hooks and the KV attention function."""

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
            if hasattr(mod, attr):
                delattr(mod, attr)
        if self._old_attn is not None:
            self.model.config._attn_implementation = self._old_attn
        self._hooks, self._parametrized, self._attr_added = [], [], []


def _owner_and_param(model: nn.Module, target) -> tuple[nn.Module, str]:
    if target.module is not None and target.weight is getattr(target.module, "weight", None):
        return target.module, "weight"
    if target.module is not None and target.weight is getattr(target.module, "bias", None):
        return target.module, "bias"
    owner_name, pname = target.name.rsplit(".", 1)
    return model.get_submodule(owner_name), pname


def wrap_model(
    model: nn.Module,
    *,
    plan=None,
    bank: RotationBank | None = None,
    quant: QuantSettings | None = None,
    r3: bool = False,
    r4: bool = False,
    r4_in_weights: bool = True,
) -> FakeQuantHooks:
    """Install rotations (plan + bank), online Hadamards (r3/r4) and fake quantizers on ``model``.

    With no plan/bank only quantizers (and online Hadamards) are installed: the baseline evaluations and the
    evaluation of an exported model use that. ``r4_in_weights=False`` is for exported models, whose
    down_proj already holds the folded Hadamard: only the online half is installed."""
    quant = quant or QuantSettings()
    handle = FakeQuantHooks(model)
    targets = addressable_targets(model)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    # Which matrix instance each tensor reads / writes.
    sides: dict[int, dict] = {}
    if plan is not None:
        for p in plan.placements:
            entry = sides.setdefault(id(p.target.weight), {"target": p.target, "input": None, "output": None})
            entry[p.side] = p.instance
    r4_names = set(check_r4(model)) if r4 else set()

    for name, t in targets.items():
        is_head = lm_head is not None and t.module is lm_head
        skip_quant = isinstance(t.module, nn.Embedding) or any(fnmatch.fnmatchcase(name, g) for g in QUANT_SKIP)
        wspec = None if skip_quant else (quant.lm_head if is_head else quant.w)
        entry = sides.get(id(t.weight))
        online = name in r4_names and r4_in_weights
        rotates = entry is not None and (entry["input"] or entry["output"])
        if rotates or online or (wspec is not None and wspec.enabled):
            owner, pname = _owner_and_param(model, t)
            par = RotateQuantWeight(
                bank, entry["input"] if entry else None, entry["output"] if entry else None,
                t.in_axis, t.out_axis, wspec, online,
            )
            parametrize.register_parametrization(owner, pname, par, unsafe=True)
            handle._parametrized.append((owner, pname))
            if entry and entry["output"] and t.bias is not None:
                bpar = RotateQuantWeight(bank, None, entry["output"], None, -1, None, False)
                parametrize.register_parametrization(owner, "bias", bpar, unsafe=True)
                handle._parametrized.append((owner, "bias"))
        if name in r4_names:
            handle._hooks.append(t.module.register_forward_pre_hook(_online_in_hook, with_kwargs=True))
        # Activation quantization of the module's input (for 3-D experts: the experts module's input).
        if not skip_quant and not is_head and quant.a.enabled:
            mod = t.module if t.module is not None else model.get_submodule(name.rsplit(".", 1)[0])
            if not hasattr(mod, "spinlearn_act"):
                mod.spinlearn_act = ActQuantizer(quant.a)
                handle._attr_added.append((mod, "spinlearn_act"))
                handle._hooks.append(mod.register_forward_pre_hook(_act_quant_hook, with_kwargs=True))

    # Norm biases kept in place (OPT's final LayerNorm) rotate with the residual stream.
    for entry in sides.values():
        t = entry["target"]
        if t.module is not None and t.weight is getattr(t.module, "bias", None) and t.weight.ndim == 1:
            if not parametrize.is_parametrized(t.module, "bias"):
                par = RotateQuantWeight(bank, None, entry["output"], None, -1, None, False)
                parametrize.register_parametrization(t.module, "bias", par, unsafe=True)
                handle._parametrized.append((t.module, "bias"))

    check_online_hadamards(model, r3=r3, r4=False)
    if quant.kv.enabled or r3:
        _register_attention()
        for _, mod in attention_modules(model):
            mod.spinlearn_kv = KVQuantizers(int(mod.head_dim), quant.kv, r3)
            handle._attr_added.append((mod, "spinlearn_kv"))
        handle._old_attn = model.config._attn_implementation
        model.config._attn_implementation = ATTN_NAME
    return handle


def online_rotation_record(model: nn.Module, r3: bool, r4: bool) -> dict:
    """What a serving engine must apply online (stored in the exported config under ONLINE_KEY)."""
    rec: dict = {}
    if r4:
        rec["r4"] = {"modules": R4_PATTERN, "count": len(r4_linear_names(model)), "side": "input",
                     "transform": "x @ H (normalized Hadamard, spinlearn.hadamard.hadamard_matrix(n))"}
    if r3:
        rec["r3"] = {"where": "query and key states after RoPE", "transform": "q @ H, k @ H over head_dim"}
    return rec


def apply_online_rotations(model: nn.Module, quant: QuantSettings | None = None) -> FakeQuantHooks | None:
    """Install the online Hadamards recorded in an exported model's config (and optional quantizers)."""
    rec = getattr(model.config, ONLINE_KEY, None) or {}
    if not rec and quant is None:
        return None
    return wrap_model(model, quant=quant or QuantSettings(), r3="r3" in rec, r4="r4" in rec, r4_in_weights=False)
