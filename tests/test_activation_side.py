"""Rotations on the activations (16-bit weights) give the weight-side wrappers' loss and gradients: the reference is
the rotated model itself (every weight recomputed as R^T W R, every quantizer in the rotated basis), in float64, on
every family, with learned scales, clip ratios, R3 and online Hadamards."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import FAMILIES, float64_exact_norms, layout_for, tiny_model
from spinlearn.activation_side import ActivationBasis, check_output_sides, resolve_apply
from spinlearn.fakequant import activation_clip_params, rotations_attached
from spinlearn.online import online_linears
from spinlearn.quant import ActQuantizer, QuantSettings, QuantSpec
from spinlearn.rotation_plan import make_matrices, prepare_model

W16A4KV4 = QuantSettings(a=QuantSpec(bits=4, sym=False), kv=QuantSpec(bits=4, sym=False))


def _loss_and_grads(family: str, rotate_activations: bool, *, scales_on: bool, online: bool):
    from spinlearn.scales import ScaleBank, plan_scales

    model = tiny_model(family, dtype=torch.float64)
    float64_exact_norms(model)
    plan = prepare_model(model, layout_for(family))
    start = make_matrices(plan, mode="orthogonal", seed=3)  # dense matrices: no Hadamard structure to hide behind
    scales = None
    if scales_on:
        pairs = plan_scales(model, plan, log=False, head_quantized=False)
        gen = torch.Generator().manual_seed(5)
        scales = ScaleBank(pairs, {p.key: torch.rand(p.width, generator=gen, dtype=torch.float64) + 0.5
                                   for p in pairs}).double()
    names = online_linears(model, None, True) if online and family != "mixtral" else []  # mixtral: 3-D experts
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with rotations_attached(model, plan, start, quant=W16A4KV4, r3=online, online=names, scales=scales,
                            learn_a_clip=True, rotate_activations=rotate_activations) as handle:
        clips = activation_clip_params(model)
        with torch.no_grad():
            for i, p in enumerate(clips.values()):
                p.fill_(1.0 + 0.1 * i)
        loss = model(input_ids=ids, labels=ids).loss
        rotations = list(handle.bank.parameters())
        learned = [*rotations, *(scales.parameters() if scales else ()), *clips.values()]
        grads = torch.autograd.grad(loss, learned, allow_unused=True)
        parametrized = sum(hasattr(m, "parametrizations") for m in model.modules())
    # A matrix's Euclidean gradient has a part normal to the manifold (x R R^T is only constant on it) that the
    # weight-side graph carries and the optimizers discard: compare the tangent part, skew(R^T G), of each rotation.
    tangent = [(p.detach().double().T @ g.double() - g.double().T @ p.detach().double()) / 2
               for p, g in zip(rotations, grads)]
    return loss.detach(), [*tangent, *grads[len(rotations):]], parametrized


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_side_loss_and_gradients_equal_the_weight_side(family):
    scales_on = family not in ("opt",)  # OPT's LayerNorm model has no exactly fusible norm pairs to learn
    online = True
    ref_loss, ref_grads, ref_par = _loss_and_grads(family, False, scales_on=scales_on, online=online)
    loss, grads, par = _loss_and_grads(family, True, scales_on=scales_on, online=online)
    assert ref_par > 0 and par == 0  # the weights really were left alone
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=0)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-8)  # the matrices are float32
    assert max(g.abs().max().item() for g in grads) > 1e-4  # the gradients carry signal


def test_a_basis_is_undone_exactly_and_half_precision_is_computed_in_float32():
    r = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]

    class Bank:
        def get(self, name):
            return r

    basis = ActivationBasis(Bank(), "r", online=True)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(basis.inverse(basis.forward(x)), x, rtol=0, atol=1e-12)
    q = ActQuantizer(QuantSpec(bits=4, sym=False))
    q.basis = basis
    y = q(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    expected = basis.inverse(ActQuantizer(QuantSpec(bits=4, sym=False))(basis.forward(x.to(torch.bfloat16).float())))
    torch.testing.assert_close(y, expected.to(torch.bfloat16), rtol=0, atol=0)


def test_apply_mode_resolution_and_refusals():
    assert resolve_apply("auto", weights_quantized=False) is True
    assert resolve_apply("auto", weights_quantized=True) is False
    assert resolve_apply("weights", weights_quantized=False) is False
    with pytest.raises(ValueError, match="needs 16-bit weights while training"):
        resolve_apply("activations", weights_quantized=True)
    with pytest.raises(ValueError, match=re.escape("use one of auto | weights | activations")):
        resolve_apply("sideways", weights_quantized=False)
    model = tiny_model("llama")
    plan = prepare_model(model, layout_for("llama"))
    with pytest.raises(ValueError, match="need 16-bit weights"):
        with rotations_attached(model, plan, make_matrices(plan, mode="hadamard"), rotate_activations=True,
                                quant=QuantSettings(w=QuantSpec(bits=4), a=QuantSpec(bits=4))):
            pass
    check_output_sides(plan, set())  # every output-side matrix (R1 writers, R2 on v_proj) has a reader
    from types import SimpleNamespace

    up = SimpleNamespace(target=SimpleNamespace(name="model.layers.0.mlp.up_proj"), side="output", instance="r9")
    odd = SimpleNamespace(placements=[*plan.placements, up])  # a matrix on up_proj's output nobody reads
    with pytest.raises(ValueError, match=r"rotates the output of \['model.layers.0.mlp.up_proj'\]"):
        check_output_sides(odd, set())
    check_output_sides(odd, {"model.layers.0.mlp.up_proj"})


# ------------------------------------------------------------------------------------------- in the job
from test_job import IDS, assets, original_logits, overrides_for, rel_err, run_main  # noqa: E402,F401


def test_a_w16a4kv4_run_trains_on_the_activations_from_the_weight_side_start(assets, tmp_path, capsys):
    """A W16A4KV4 recipe (GPTQ after training) learns on the activations by default (rotation.apply auto): its start
    row and first step's loss are the weight-side run's, it learns, and its export is float-exact."""
    import json

    from transformers import AutoModelForCausalLM

    w16 = {"quant.w_bits": 16, "quant.w_method": "gptq", "rotation.learn_scales": "true"}
    runs = {}
    for apply in ("auto", "weights"):
        out = tmp_path / apply
        assert run_main(assets, overrides_for(out, **w16, **{"rotation.apply": apply})) == 0
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        runs[apply] = (json.loads((out / "metrics.json").read_text()),
                       [e["loss"] for e in state["log_history"] if "loss" in e])
    (m_act, loss_act), (m_w, loss_w) = runs["auto"], runs["weights"]
    assert m_act["rotation_apply"] == "activations" and m_w["rotation_apply"] == "weights"
    assert m_act["ppl_quant_before"] == pytest.approx(m_w["ppl_quant_before"], rel=1e-5)  # the same function
    assert loss_act[0] == pytest.approx(loss_w[0], rel=1e-5) and len(loss_act) == 4
    assert loss_act[-1] == pytest.approx(loss_w[-1], rel=5e-2)  # trained alike (clipping sees other norms)
    assert m_act["ppl_gptq"] > 1
    with torch.no_grad():
        fused = AutoModelForCausalLM.from_pretrained(tmp_path / "auto" / "model").eval()
        assert rel_err(fused(input_ids=IDS).logits, original_logits(assets)) <= 1e-4
    capsys.readouterr()
    assert run_main(assets, overrides_for(tmp_path / "bad", **{"rotation.apply": "activations"})) == 2  # W4 weights
    assert "rotation.apply: activations needs 16-bit weights while training" in capsys.readouterr().err


def test_readers_of_one_input_share_its_rotation_and_a_new_input_is_rotated_afresh():
    """q, k and v quantize the same norm output: T(x) is computed once for them (counted), and the memo never
    answers for another tensor or the same tensor modified in place."""
    model = tiny_model("llama")
    plan = prepare_model(model, layout_for("llama"))
    calls = []
    with rotations_attached(model, plan, make_matrices(plan, mode="hadamard"), quant=W16A4KV4,
                            rotate_activations=True):
        q_proj = model.model.layers[0].self_attn.q_proj
        basis = q_proj.spinlearn_act.basis
        assert basis is model.model.layers[0].self_attn.k_proj.spinlearn_act.basis  # shared
        assert basis is not model.model.layers[0].self_attn.o_proj.spinlearn_act.basis  # R2, not R1
        real = basis.forward
        basis.forward = lambda x: calls.append(1) or real(x)
        x = torch.randn(2, 5, 64)
        a = basis.around(lambda z: z.round(), x)
        b = basis.around(lambda z: z.round(), x)
        assert len(calls) == 1 and torch.equal(a, b)
        basis.clear()
        basis.around(lambda z: z.round(), x)
        assert len(calls) == 2
        calls.clear()
        x.add_(1.0)  # modified in place: its version changed
        basis.around(lambda z: z.round(), x)
        basis.around(lambda z: z.round(), x.clone())
        assert len(calls) == 2  # modified in place (version), then another tensor: computed each time
        calls.clear()
        ids = torch.randint(3, 100, (1, 8))
        model(input_ids=ids)
        assert len(calls) == 1  # layer 0's q/k/v: one T(x) for three readers
        assert basis._last is None  # forgotten when the attention block's forward ended


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_a_half_precision_model_on_the_activations_gives_the_weight_side_loss(dtype, tol):
    from helpers import loss_on_both_sides

    weights, activations = loss_on_both_sides("qwen2", "cpu", dtype)
    assert abs(activations - weights) <= tol * abs(weights)
