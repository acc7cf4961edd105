"""spinlearn.fakequant: wrapping and unwrapping a model, and activation quantization of every linear input,
3-D MoE experts included (counted at the matmuls themselves, not at the hooks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import FAMILIES, layout_for, tiny_model
from spinlearn.fakequant import BANK_ATTR, wrap_model
from spinlearn.quant import QuantSettings, QuantSpec, quantizers_disabled
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.rotations import RotationBank

A_BITS = 4
W4A4KV4 = QuantSettings(w=QuantSpec(bits=4), a=QuantSpec(bits=A_BITS, sym=False), kv=QuantSpec(bits=4, sym=False))
A4 = QuantSettings(a=QuantSpec(bits=A_BITS, sym=False))


def _ids(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(0))


class LinearInputs(TorchFunctionMode):
    """Records (weight shape, max distinct values in one input row) for every F.linear call: the input a linear
    layer or an expert projection really multiplies."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            rows = x.detach().reshape(-1, x.shape[-1])
            distinct = max(len(torch.unique(r)) for r in rows)
            self.calls.append((tuple(w.shape), distinct))
        return func(*args, **kwargs)


def _linear_inputs(model) -> list[tuple[tuple[int, ...], int]]:
    with torch.no_grad(), LinearInputs() as rec:
        model(input_ids=_ids())
    return rec.calls


def _float_only_shapes(model) -> set[tuple[int, int]]:
    """Weights whose inputs stay in float by design: lm_head and MoE routers."""
    cfg = model.config
    shapes = {(cfg.vocab_size, cfg.hidden_size)}
    if getattr(cfg, "num_local_experts", None):
        shapes.add((cfg.num_local_experts, cfg.hidden_size))
    return shapes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_quantized_linear_input_has_at_most_2_bits_values_per_token(family):
    model = tiny_model(family)
    handle = wrap_model(model, quant=A4)
    calls = _linear_inputs(model)
    float_only = _float_only_shapes(model)
    quantized = [(s, d) for s, d in calls if s not in float_only]
    assert {s for s, _ in calls} & float_only  # lm_head was seen (and is left in float)
    assert all(d <= 2**A_BITS for _, d in quantized), sorted({(s, d) for s, d in quantized if d > 2**A_BITS})
    with quantizers_disabled(model):  # the same inputs in float have many more: the count above is meaningful
        assert all(d > 2**A_BITS for s, d in _linear_inputs(model) if s not in float_only)
    if family == "mixtral":
        inter, hidden = model.config.intermediate_size, model.config.hidden_size
        shapes = {s for s, _ in quantized}
        assert {(2 * inter, hidden), (hidden, inter)} <= shapes  # both expert projections, per expert
    handle.remove()


def test_without_the_experts_forward_the_down_proj_input_stays_float():
    """The fix is the quantized experts forward: with the plain eager forward (what a module-input hook alone gives)
    the input of the experts' down projection, act(gate) * up, reaches the matmul unquantized."""
    model = tiny_model("mixtral")
    handle = wrap_model(model, quant=A4)
    for layer in model.model.layers:
        del layer.mlp.experts.forward  # back to transformers' eager experts loop
    inter, hidden = model.config.intermediate_size, model.config.hidden_size
    down = [d for s, d in _linear_inputs(model) if s == (hidden, inter)]
    assert down and max(down) > 2**A_BITS
    handle.remove()


def test_quantized_experts_forward_is_eager_bit_for_bit_with_quantizers_off():
    model = tiny_model("mixtral", dtype=torch.float64)
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        handle = wrap_model(model, quant=A4)
        quantized = model(input_ids=ids).logits
        with quantizers_disabled(model):
            off = model(input_ids=ids).logits
    handle.remove()
    assert torch.equal(off, reference)
    assert (quantized - reference).abs().max() > 1e-3


def test_bare_expert_tensors_outside_a_transformers_experts_module_are_refused():
    model = tiny_model("mixtral")
    del model.model.layers[0].mlp.experts.has_gate  # no longer the use_experts_implementation contract
    name = r"'model\.layers\.0\.mlp\.experts\.gate_up_proj'"
    with pytest.raises(ValueError, match=rf"cannot fake-quantize the input of {name}.*lacks \['has_gate'\]"):
        wrap_model(model, quant=A4)
    assert not any(hasattr(m, "spinlearn_act") or "parametrizations" in m._modules for m in model.modules())


# ------------------------------------------------------------------------------------------------ wrap / remove
def _structure(model) -> list[tuple[str, str, int, bool]]:
    """Every module: name, class, number of forward pre-hooks, whether its forward is an instance override."""
    return [(n, type(m).__name__, len(m._forward_pre_hooks), "forward" in m.__dict__) for n, m in model.named_modules()]


@pytest.mark.parametrize("family", ["llama", "mixtral", "opt"])
def test_wrap_then_remove_restores_structure_weights_and_outputs(family):
    model = tiny_model(family)
    plan = prepare_model(model, layout_for(family))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_structure = _structure(model)
    attn = model.config._attn_implementation
    ids = _ids()
    with torch.no_grad():
        before_logits = model(input_ids=ids).logits
    bank = RotationBank.for_plan(plan, make_matrices(plan, mode="hadamard", seed=0))
    setattr(model, BANK_ATTR, bank)
    handle = wrap_model(model, plan=plan, bank=bank, quant=W4A4KV4, r3=family != "opt")
    with torch.no_grad():
        wrapped_logits = model(input_ids=ids).logits
    assert _structure(model) != before_structure  # something was installed...
    handle.remove()
    delattr(model, BANK_ATTR)
    assert _structure(model) == before_structure  # ...and all of it is gone
    assert model.config._attn_implementation == attn
    after_state = model.state_dict()
    assert set(after_state) == set(before_state)
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before_logits)
    assert (wrapped_logits - before_logits).abs().max() > 1e-3  # the wrapped model really was different


# ------------------------------------------------------------------------------ learned activation clip table
def _rewrapped(model, ids, table: dict, set_table, **wrap_kw):
    """A fresh wrap of ``model`` (W4A4KV4, ``wrap_kw``): its logits before and after ``set_table(model, table)``.
    Returns (handle, before, after); the caller removes the handle."""
    handle = wrap_model(model, quant=W4A4KV4, **wrap_kw)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        set_table(model, table)
        after = model(input_ids=ids).logits
    return handle, before, after


def test_activation_clip_table_reproduces_the_learned_quantizers_on_a_fresh_wrap():
    from spinlearn.fakequant import activation_clip_params, activation_clip_table, set_activation_clips

    model = tiny_model("llama")
    ids = _ids()
    handle = wrap_model(model, quant=W4A4KV4, learn_a_clip=True)
    params = activation_clip_params(model)
    assert len(params) == 2 * 7 and "model.layers.0.self_attn.q_proj.spinlearn_act" in params
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.fill_(-1.0 + 0.2 * i)  # distinct ratios, 0.27 .. 0.86
        learned = model(input_ids=ids).logits
    table = activation_clip_table(model)
    handle.remove()
    assert not activation_clip_params(model)
    handle, fixed, again = _rewrapped(model, ids, table, set_activation_clips)
    assert torch.equal(again, learned) and (fixed - learned).abs().max() > 1e-2
    with pytest.raises(KeyError, match="does not have.*'nope.spinlearn_act'"):
        set_activation_clips(model, {"nope.spinlearn_act": 0.5})
    handle.remove()


# ------------------------------------------------------------------------------ learned weight clip table
def test_weight_clip_table_reproduces_the_learned_weight_quantizers_on_a_fresh_wrap():
    from spinlearn.fakequant import (learned_extras_off, set_weight_clips, weight_clip_params, weight_clip_table,
                                     weight_quantizers)

    model = tiny_model("llama")
    ids = _ids()
    handle = wrap_model(model, quant=W4A4KV4, learn_w_clip=True)
    params = weight_clip_params(model)
    assert len(params) == 2 * 7 and set(params) == set(weight_quantizers(model))  # lm_head: 16 bits, not learned
    down = "model.layers.0.mlp.down_proj.weight"
    assert params[down].shape == (model.config.hidden_size, 1)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params.values())  # the loss reaches every ratio
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.copy_(torch.linspace(-1.0, 2.0, p.numel()).reshape(p.shape) + 0.1 * i)  # ratios 0.27 .. 0.9
        learned = model(input_ids=ids).logits
        with learned_extras_off(model):
            plain_w4 = model(input_ids=ids).logits  # the spec's ratio (1.0)
    table = weight_clip_table(model)
    handle.remove()
    assert not weight_clip_params(model)
    handle, fixed, again = _rewrapped(model, ids, table, set_weight_clips)
    assert torch.equal(fixed, plain_w4)
    assert torch.equal(again, learned) and (fixed - learned).abs().max() > 1e-2
    with pytest.raises(KeyError, match="weight clip table names quantizers this model does not have.*'nope.weight'"):
        set_weight_clips(model, {"nope.weight": torch.ones(1, 1)})
    with pytest.raises(ValueError, match=r"needs \(64, 1\)"):
        set_weight_clips(model, {down: torch.ones(64, 2)})
    handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_clips_cover_every_quantized_weight_of_every_family(family):
    """Every quantized weight (3-D MoE experts as one stack of rows) gets its ratios, and a table taken from the
    learned quantizers gives the same logits when set on a fresh wrap."""
    from spinlearn.fakequant import set_weight_clips, weight_clip_params, weight_clip_table, weight_quantizers

    model = tiny_model(family)
    ids = _ids(1, 12)
    handle = wrap_model(model, quant=W4A4KV4, learn_w_clip=True)
    params = weight_clip_params(model)
    assert params and set(params) == set(weight_quantizers(model))
    with torch.no_grad():
        for p in params.values():
            p.fill_(0.5)  # ratio 0.62
        learned = model(input_ids=ids).logits
    table = weight_clip_table(model)
    handle.remove()
    handle, plain, again = _rewrapped(model, ids, table, set_weight_clips)
    assert torch.equal(again, learned) and not torch.equal(plain, learned)
    handle.remove()


def test_kv_clip_ratios_are_learned_and_reproduced_by_the_activation_clip_table():
    """learn_kv_clip: each attention block's K and V quantizers learn a ratio (the loss reaches it); the activation
    clip table carries them and a fresh wrap with the table computes the same logits."""
    from spinlearn.fakequant import KV_ATTR, activation_clip_params, activation_clip_table, set_activation_clips

    model = tiny_model("llama")
    ids = _ids()
    handle = wrap_model(model, quant=W4A4KV4, learn_kv_clip=True, r3=True)
    params = activation_clip_params(model)
    kv = {n: p for n, p in params.items() if f".{KV_ATTR}." in n}
    assert len(params) == len(kv) == 2 * 2  # no linear-input ratios asked for; K and V per layer
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in kv.values())
    with torch.no_grad():
        for i, p in enumerate(kv.values()):
            p.fill_(-0.5 + 0.5 * i)
        learned = model(input_ids=ids).logits
    table = activation_clip_table(model)
    handle.remove()
    handle, fixed, again = _rewrapped(model, ids, table, set_activation_clips, r3=True)
    assert torch.allclose(again, learned, rtol=0, atol=1e-6) and (fixed - learned).abs().max() > 1e-2
    handle.remove()


def test_mse_weight_clip_start_is_the_search_on_the_weights_the_quantizers_read():
    """quant.w_clip_init mse: every learned weight clip ratio starts at the MSE search's ratio for its row of the
    weight its quantizer reads, here against a float64 fold of the start matrices with R4's Hadamard folded into
    down_proj (``fold_online``), instead of at LEARNED_CLIP_DEFAULT."""
    from spinlearn.fakequant import rotations_attached, start_weight_clips_at_mse, weight_clip_table
    from spinlearn.fusion import fold_rotations
    from spinlearn.online import fold_online, online_linears
    from spinlearn.quant import LEARNED_CLIP_DEFAULT, mse_clip_ratio

    model = tiny_model("llama", dtype=torch.float64)
    plan = prepare_model(model, layout_for("llama"))
    matrices = make_matrices(plan, mode="hadamard", seed=0)
    online = online_linears(model, r4=True)
    reference, ref_plan = copy.deepcopy((model, plan))
    fold_rotations(ref_plan.placements, matrices, True)
    fold_online(reference, online)
    with rotations_attached(model, plan, matrices, quant=W4A4KV4, online=online, learn_w_clip=True):
        before = weight_clip_table(model)
        ratios = start_weight_clips_at_mse(model)
        after = weight_clip_table(model)
    assert all(torch.allclose(r, torch.full_like(r, LEARNED_CLIP_DEFAULT)) for r in before.values())
    assert len(after) == 2 * 7 and ratios.numel() == sum(r.numel() for r in after.values())
    for name, got in after.items():
        w = reference.get_parameter(name).detach()
        want = mse_clip_ratio(w.reshape(*got.shape, -1), 4, True).squeeze(-1).clamp(max=LEARNED_CLIP_DEFAULT)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6, msg=name)
    assert ratios.min() < 0.9  # the search clipped rows the 0.99 start did not
    with rotations_attached(model, plan, matrices, quant=W4A4KV4, learn_w_clip=False):
        assert start_weight_clips_at_mse(model) is None


# ------------------------------------------------------------------------------ the distillation teacher
@pytest.mark.parametrize("family", FAMILIES)
def test_float_passthrough_is_the_float_model_without_reading_the_banks(family, monkeypatch):
    """Inside ``float_passthrough`` the fully wrapped model (dense random rotations, random scales, R3, R4, learned
    clips, W4A4KV4) computes the prepared model's float logits; the rotation and scale banks are not read (NaN in
    them changes nothing), no online Hadamard is computed, and on exit every wrapper works again."""
    import spinlearn.fakequant
    import spinlearn.online
    from spinlearn.fakequant import float_passthrough, rotations_attached
    from spinlearn.online import online_linears
    from spinlearn.scales import ScaleBank, plan_scales

    model = tiny_model(family)
    plan = prepare_model(model, layout_for(family))
    ids = _ids()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    pairs = plan_scales(model, plan, log=False) if family != "opt" else []
    gen = torch.Generator().manual_seed(5)
    scales = ScaleBank(pairs, {p.key: torch.rand(p.width, generator=gen, dtype=torch.float64) + 0.5 for p in pairs})
    online = online_linears(model, None, True) if family != "mixtral" else []  # mixtral: 3-D experts
    with torch.no_grad(), rotations_attached(model, plan, make_matrices(plan, mode="orthogonal", seed=3),
                                             quant=W4A4KV4, r3=family != "opt", online=online, scales=scales,
                                             learn_a_clip=True, learn_w_clip=True, learn_kv_clip=True) as handle:
        quantized = model(input_ids=ids).logits
        with quantizers_disabled(model):
            rotated_float = model(input_ids=ids).logits  # the same float model through the rotated weights
        hadamards = []
        for mod in (spinlearn.fakequant, spinlearn.online):  # R3 (the attention function) and R4 (the input hook)
            fwht = mod.fast_hadamard_transform
            monkeypatch.setattr(mod, "fast_hadamard_transform", lambda x, _f=fwht: hadamards.append(1) or _f(x))
        with float_passthrough(model):
            teacher = model(input_ids=ids).logits
        assert not hadamards
        model(input_ids=ids)
        assert hadamards  # the wrapped model does compute them
        assert torch.equal(model(input_ids=ids).logits, quantized)  # every wrapper back on
        for p in [*handle.bank.parameters(), *scales.parameters()]:
            p.fill_(float("nan"))
        with float_passthrough(model):
            teacher_nan_banks = model(input_ids=ids).logits
        with quantizers_disabled(model):
            assert torch.isnan(model(input_ids=ids).logits).all()  # ...which do read the banks
    assert torch.allclose(teacher, plain, rtol=0, atol=1e-5)
    assert torch.equal(teacher_nan_banks, teacher)
    assert torch.allclose(teacher, rotated_float, rtol=0, atol=1e-4)
    assert (quantized - plain).abs().max() > 1e-2  # the wrapped model really is quantized
    assert not any("spinlearn_passthrough" in m.__dict__ for m in model.modules())
