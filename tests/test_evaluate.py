"""Perplexity, one evaluation setting, and whole-model GPTQ, against straightforward references.

The tiny model has a large initialisation (peaked outputs) and the text is sampled from the float model
itself, so its perplexity is low and weight quantization moves it measurably: GPTQ vs RTN differences are
well above noise, which a random model on random tokens would not give.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from spinlearn import quant as quant_mod
from spinlearn import fakequant
from spinlearn.evaluate import apply_rotations_file, evaluate_setting, perplexity
from spinlearn.artifacts import save_rotations
from spinlearn.gptq import HessianAccumulator, gptq_quantize_model, gptq_quantize_weight
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.quant import QuantSpec, quantize_weight
from helpers import tiny_model
from spinlearn.fakequant import wrap_model
from spinlearn.quant import QuantSettings

SEQ = 48


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", initializer_range=0.2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (20, 1), generator=gen)
    with torch.no_grad():
        for _ in range(SEQ - 1):
            p = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=gen)], 1)
    return model, ids[:12], ids[12:]  # model, calibration blocks, evaluation windows


def fresh(setup) -> nn.Module:
    return copy.deepcopy(setup[0])


def manual_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    """Next-token NLL written out: log-softmax in float64, one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
            total -= logp[:-1].gather(1, w[1:, None]).sum().item()
            count += w.numel() - 1
    return math.exp(total / count)


def q(w=16, a=16, kv=16) -> QuantSettings:
    return QuantSettings(w=QuantSpec(bits=w), a=QuantSpec(bits=a, sym=False), kv=QuantSpec(bits=kv, sym=False))


def test_perplexity_matches_manual_nll(setup):
    model, _, windows = setup
    ref = manual_ppl(model, windows)
    assert perplexity(model, windows, progress=False) == pytest.approx(ref, rel=1e-6)
    assert perplexity(model, windows, batch_size=3, progress=False) == pytest.approx(ref, rel=1e-6)
    assert 1.5 < ref < 100  # peaked model on its own samples: far below the vocabulary size (128)
    with pytest.raises(ValueError, match="seqlen >= 2"):
        perplexity(model, windows[:, :1], progress=False)


def test_perplexity_computes_quantized_weights_once(setup, monkeypatch):
    model, _, windows = setup
    model = copy.deepcopy(model)
    calls = []
    real = fakequant.RotateQuantWeight.forward
    monkeypatch.setattr(fakequant.RotateQuantWeight, "forward", lambda self, w: calls.append(1) or real(self, w))
    handle = wrap_model(model, quant=q(w=4))
    n_param = len(handle._parametrized)
    ppl = perplexity(model, windows[:4], progress=False)
    assert n_param > 0 and len(calls) == n_param  # once per tensor, not once per window
    assert ppl == pytest.approx(manual_ppl(model, windows[:4]), rel=1e-6)  # and the cache gives the same values
    handle.remove()


def test_settings_float_rotation_invariance_and_quantizers(setup, monkeypatch):
    model, _, windows = setup
    float_ppl = manual_ppl(model, windows)

    none16 = evaluate_setting(fresh(setup), windows, rotation="none", quant=q(), progress=False)
    assert none16["ppl"] == pytest.approx(float_ppl, rel=1e-6)
    had16 = evaluate_setting(fresh(setup), windows, rotation="hadamard", quant=q(), r3=True, r4=True, progress=False)
    assert had16["ppl"] == pytest.approx(float_ppl, rel=1e-4)
    assert had16["settings"]["r3"] and had16["settings"]["r4"] and had16["settings"]["seed"] == 0

    counts = {"act": 0, "w": 0}
    real_act, real_w = quant_mod.quantize_activation, fakequant.quantize_weight
    monkeypatch.setattr(quant_mod, "quantize_activation", lambda x, s: counts.__setitem__("act", counts["act"] + 1)
                        or real_act(x, s))
    monkeypatch.setattr(fakequant, "quantize_weight", lambda w, s, clip=None: counts.__setitem__("w", counts["w"] + 1)
                        or real_w(w, s, clip))
    w4a4 = evaluate_setting(fresh(setup), windows, rotation="hadamard", quant=q(4, 4, 4), progress=False)
    assert w4a4["ppl"] > float_ppl * 1.01
    assert counts["act"] > 0 and counts["w"] > 0  # the quantizers of quant.py did the work
    s = w4a4["settings"]
    assert s["w"]["bits"] == 4 and s["a"]["bits"] == 4 and s["kv"]["bits"] == 4 and s["a"]["sym"] is False
    expected = {"model", "dtype", "rotation", "layout", "w_method", "seed", "r3", "r4", "online", "online_recorded",
                "w", "a", "kv", "lm_head", "eval_windows", "eval_seqlen", "batch_size"}
    assert expected <= set(s)
    assert (s["eval_windows"], s["eval_seqlen"]) == tuple(windows.shape)


def test_rotations_file_on_plain_model(setup, tmp_path):
    """Folding a rotations file gives the model that pipeline.rotate would give with the same matrices."""
    model, _, windows = setup
    rotated = fresh(setup)
    plan = prepare_model(rotated, "transformer_universal")
    mats = make_matrices(plan, mode="orthogonal", seed=3)
    save_rotations({k: v.float() for k, v in mats.items()}, tmp_path / "rot.safetensors")
    from spinlearn.fusion import fold_rotations

    fold_rotations(plan.placements, mats, True)
    ref = evaluate_setting(rotated, windows, quant=q(4, 4, 4), progress=False)["ppl"]
    got = evaluate_setting(fresh(setup), windows, rotation="learned", rotations_file=tmp_path / "rot.safetensors",
                           quant=q(4, 4, 4), progress=False)
    assert got["ppl"] == pytest.approx(ref, rel=1e-3)
    assert got["settings"]["rotations_folded"] is True

    bad = dict(mats)
    bad.pop("r2.model.layers.1")
    save_rotations(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing \['r2.model.layers.1'\]"):
        apply_rotations_file(fresh(setup), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no recorded rotations"):
        evaluate_setting(fresh(setup), windows, rotation="learned", progress=False)


def _hessian(model: nn.Module, name: str, blocks: torch.Tensor) -> torch.Tensor:
    """Inputs of `name` (after its pre-hooks) over the calibration blocks, as GPTQ's Hessian."""
    acc = HessianAccumulator()
    h = model.get_submodule(name).register_forward_hook(acc.forward_hook)
    with torch.no_grad():
        for b in blocks:
            model(input_ids=b[None], use_cache=False)
    h.remove()
    return acc.hessian


def test_gptq_is_sequential_and_sees_online_r4(setup):
    """Each layer's result equals GPTQ of its weight with the Hessian of the inputs it gets from the already
    quantized layers before it, taken after the online R4 hook (so x H, not x, for down_proj)."""
    _, calib, _ = setup
    model = fresh(setup)
    from spinlearn.online import fold_online, online_linears

    names = online_linears(model, r4=True)
    fold_online(model, names)
    hooks = wrap_model(model, quant=QuantSettings(), online=names, online_in_weights=False)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    spec = QuantSpec(bits=3)
    errors = gptq_quantize_model(model, calib, spec, progress=False)
    assert set(errors) == {n for n in before if n != "lm_head"}
    assert torch.equal(model.lm_head.weight, before["lm_head"])  # skipped
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        ref, _ = gptq_quantize_weight(before[name], _hessian(model, name, calib), spec, act_order=True)
        got = model.get_submodule(name).weight
        assert torch.isclose(got, ref, rtol=0, atol=1e-5).float().mean() >= 0.99, name
    hooks.remove()


def test_gptq_beats_rtn_per_layer_and_in_perplexity(setup):
    _, calib, windows = setup
    spec = QuantSpec(bits=3)
    float_model = fresh(setup)
    g_model = fresh(setup)
    gptq_quantize_model(g_model, calib, spec, progress=False)
    # Layer 0's q/k/v read the float embeddings in both models: the same least-squares problem.
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        x_h = _hessian(float_model, name, calib).double()
        w = float_model.get_submodule(name).weight.detach().double()

        def err(qw):
            d = w - qw.detach().double()
            return torch.trace(d @ x_h @ d.T).item()  # = 2/N ||X W^T - X Q^T||^2

        rtn_err, gptq_err = err(quantize_weight(w.float(), spec)), err(g_model.get_submodule(name).weight)
        assert gptq_err < 0.8 * rtn_err, (name, gptq_err, rtn_err)

    rtn = evaluate_setting(fresh(setup), windows, quant=q(w=3), progress=False)["ppl"]
    gptq = evaluate_setting(fresh(setup), windows, quant=q(w=3), w_method="gptq", calib_blocks=calib, progress=False)
    float_ppl = manual_ppl(float_model, windows)
    assert float_ppl < gptq["ppl"] < rtn
    assert (gptq["ppl"] - float_ppl) < 0.85 * (rtn - float_ppl)  # GPTQ recovers a real part of RTN's loss
    assert gptq["settings"]["gptq"]["nsamples"] == calib.shape[0] and gptq["settings"]["gptq"]["act_order"] is True


def test_gptq_refit_fits_each_layer_to_its_float_outputs_on_the_quantized_inputs(setup):
    """refit: each linear's result equals GPTQ, with the Hessian of its quantized inputs, of ``refit_weight`` (the
    ridge fit from the quantized inputs to the float outputs), sequentially; without input quantizers the fit is on
    the float inputs (C = H), and refit=False is GPTQ of the weight as it is."""
    from spinlearn.gptq import RefitAccumulator, refit_weight
    from spinlearn.quant import input_quantizer

    _, calib, _ = setup
    spec = QuantSpec(bits=3)
    model = fresh(setup)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hooks = wrap_model(model, quant=q(4, 4, 4).for_calibration())
    gptq_quantize_model(model, calib, spec, progress=False, refit=True)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        acc = RefitAccumulator()
        h = input_quantizer(model.get_submodule(name)).register_forward_hook(acc.hook)
        with torch.no_grad():
            for b in calib:
                model(input_ids=b[None], use_cache=False)
        h.remove()
        target = refit_weight(before[name], acc.hessian, acc.cross)
        assert (target - before[name]).abs().max() > 1e-3, name  # the quantized inputs move the fit
        ref, _ = gptq_quantize_weight(target, acc.hessian, spec, act_order=True)
        got = model.get_submodule(name).weight
        assert torch.isclose(got, ref, rtol=0, atol=1e-5).float().mean() >= 0.99, name
    hooks.remove()

    plain, fitted = fresh(setup), fresh(setup)
    gptq_quantize_model(plain, calib, spec, progress=False)
    gptq_quantize_model(fitted, calib, spec, progress=False, refit=True)
    name = "model.layers.0.self_attn.q_proj"
    h = _hessian(fresh(setup), name, calib)
    ref, _ = gptq_quantize_weight(refit_weight(before[name], h, h), h, spec, act_order=True)
    assert torch.isclose(fitted.get_submodule(name).weight, ref, rtol=0, atol=1e-5).float().mean() >= 0.99
    plain_ref, _ = gptq_quantize_weight(before[name], h, spec, act_order=True)
    assert torch.equal(plain.get_submodule(name).weight, plain_ref)


def test_evaluation_gptq_calibrates_with_the_settings_activation_quantizers(setup, monkeypatch):
    """With refit (the default) GPTQ runs with the evaluation's activation and K/V quantizers and clip ratios on;
    with gptq_kwargs refit=False, in float, as before; both record it."""
    import spinlearn.gptq as gptq_mod
    from spinlearn.quant import input_quantizer

    _, calib, windows = setup
    seen = []
    real = gptq_mod.gptq_quantize_model

    def spy(model, *args, **kwargs):
        qp = input_quantizer(model.get_submodule("model.layers.0.self_attn.q_proj"))
        kv = getattr(model.get_submodule("model.layers.0.self_attn"), fakequant.KV_ATTR, None)
        seen.append((kwargs["refit"], None if qp is None else (qp.spec.bits, qp.spec.clip_ratio),
                     None if kv is None else kv.k_quant.spec.bits))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(gptq_mod, "gptq_quantize_model", spy)
    clips = {"model.layers.0.self_attn.q_proj.spinlearn_act": 0.8}
    fitted = evaluate_setting(fresh(setup), windows, quant=q(4, 4, 4), w_method="gptq", calib_blocks=calib,
                              activation_clips=clips, progress=False)
    plain = evaluate_setting(fresh(setup), windows, quant=q(4, 4, 4), w_method="gptq", calib_blocks=calib,
                             activation_clips=clips, gptq_kwargs={"refit": False}, progress=False)
    assert seen == [(True, (4, pytest.approx(0.8)), 4), (False, None, None)]
    assert fitted["settings"]["gptq"]["refit"] is True and plain["settings"]["gptq"]["refit"] is False
    assert fitted["ppl"] != plain["ppl"]


def test_gptq_argument_errors(setup):
    model = fresh(setup)
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        gptq_quantize_model(model, None, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        evaluate_setting(model, setup[2], w_method="gptq", progress=False)
    h = wrap_model(model, quant=q(w=4))
    with pytest.raises(ValueError, match="weight parametrization"):
        gptq_quantize_model(model, setup[1], QuantSpec(bits=4), progress=False)
    h.remove()
    with pytest.raises(ValueError, match="clip ratios for 'lm_head', which is not a linear GPTQ quantizes"):
        gptq_quantize_model(model, setup[1], QuantSpec(bits=4), progress=False, clips={"lm_head": torch.ones(1, 1)})


def test_gptq_on_learned_clips_keeps_their_grid_layer_by_layer(setup):
    """``clips`` fix a linear's grid to round-to-nearest's with those ratios; the others keep the spec's."""
    from spinlearn.quant import weight_qparams

    _, calib, _ = setup
    model = fresh(setup)
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight.detach().clone()
    clip = torch.full((w.shape[0], 1), 0.7)
    qparams: dict = {}
    gptq_quantize_model(model, calib, QuantSpec(bits=4), progress=False, clips={name: clip}, qparams=qparams)
    assert torch.equal(qparams[name][0], weight_qparams(w, QuantSpec(bits=4), clip)[0])
    other = "model.layers.1.mlp.up_proj"
    assert torch.allclose(qparams[other][0], fresh(setup).get_submodule(other).weight.abs().amax(1, keepdim=True) / 7)
