"""spinlearn.scales: learned per-channel scales — the pairs per family, exact folding (float64 references), the
wrapped model against the folded one, the SmoothQuant start against a numpy reference, gradients and GQA sharing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from helpers import FAMILIES, float64_exact_norms, layout_for, logits_in_model_dtype, tiny_model
from spinlearn.fakequant import rotations_attached
from spinlearn.fusion import fold_rotations
from spinlearn.quant import QuantSettings, QuantSpec
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.scales import ScaleBank, plan_scales
from spinlearn.scales_fold import fold_scales, smoothquant_scales

W4A4KV4 = QuantSettings(w=QuantSpec(bits=4), a=QuantSpec(bits=4, sym=False), kv=QuantSpec(bits=4, sym=False))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(seed: int = 15) -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=_gen(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _random_scales(pairs, seed: int = 3) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {p.key: torch.exp(0.5 * torch.randn(p.width, generator=g, dtype=torch.float64)) for p in pairs}


# kinds of pair each family must get (the others are skipped and logged)
EXPECTED_KINDS = {
    "llama": {"norm", "v_o", "up_down"}, "qwen2": {"norm", "v_o", "up_down"}, "qwen3": {"norm", "v_o", "up_down"},
    "mistral": {"norm", "v_o", "up_down"}, "gemma": {"norm", "v_o", "up_down"}, "mixtral": {"norm", "v_o"},
    "phi3": {"norm"}, "nemotron_h": {"norm", "v_o"}, "opt": {"norm", "v_o"},
}


def _fused(original, family: str, dtype=torch.float64, seed: int = 3):
    model = copy.deepcopy(original)
    plan = prepare_model(model, layout_for(family))
    matrices = make_matrices(plan, mode="orthogonal", seed=seed)
    pairs = plan_scales(model, plan)
    scales = _random_scales(pairs, seed)
    fold_rotations(plan.placements, matrices, True)
    fold_scales(model, plan, scales)
    return model, plan, matrices, pairs, scales


@pytest.mark.parametrize("family", list(FAMILIES))
def test_folded_scales_keep_float64_logits_exact(family, capsys):
    original = tiny_model(family, dtype=torch.float64)
    float64_exact_norms(original)
    fused, _, _, pairs, _ = _fused(original, family)
    assert {p.kind for p in pairs} == EXPECTED_KINDS[family]
    ids = _ids()
    ref = logits_in_model_dtype(original, ids)
    assert _rel(logits_in_model_dtype(fused, ids), ref) <= 1e-9
    if EXPECTED_KINDS[family] != {"norm", "v_o", "up_down"}:
        assert "[spinlearn] scales: skipped" in capsys.readouterr().out
    # the scales really changed the weights: folding without them is a different model
    unscaled = copy.deepcopy(original)
    plan = prepare_model(unscaled, layout_for(family))
    fold_rotations(plan.placements, make_matrices(plan, mode="orthogonal", seed=3), True)
    diffs = [(a - b).abs().max().item() for a, b in zip(fused.parameters(), unscaled.parameters())]
    assert max(diffs) > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_folded_scales_float32_exact_and_undone_by_the_inverse(family):
    original = tiny_model(family, dtype=torch.float32)
    fused, plan, _, _, scales = _fused(original, family)
    ids = _ids()
    assert _rel(logits_in_model_dtype(fused, ids), logits_in_model_dtype(original, ids)) <= 1e-4
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    fold_scales(fused, plan, {k: s * 3.0 for k, s in scales.items()})
    fold_scales(fused, plan, {k: 1.0 / (s * 3.0) for k, s in scales.items()})
    assert max((fused.state_dict()[k] - v).abs().max().item() for k, v in before.items()) <= 1e-5


def test_fold_scales_refuses_unknown_keys_and_bad_shapes():
    model = tiny_model("llama")
    plan = prepare_model(model, "transformer_universal")
    with pytest.raises(KeyError, match="model.layers.9.input_layernorm"):
        fold_scales(model, plan, {"model.layers.9.input_layernorm": torch.ones(64)})
    with pytest.raises(ValueError, match=r"'model.layers.0.input_layernorm' has shape \(3,\), expected \(64,\)"):
        fold_scales(model, plan, {"model.layers.0.input_layernorm": torch.ones(3)})


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "opt"])
def test_wrapped_with_quantizers_off_equals_folded(family):
    original = tiny_model(family, dtype=torch.float64)
    float64_exact_norms(original)
    fused, _, matrices, _, scales = _fused(original, family)
    model = copy.deepcopy(original)
    plan = prepare_model(model, layout_for(family))
    bank = ScaleBank(plan_scales(model, plan, log=False), scales)
    ids = _ids()
    with torch.no_grad(), rotations_attached(model, plan, matrices, scales=bank):
        wrapped = logits_in_model_dtype(model, ids)
    assert _rel(wrapped, logits_in_model_dtype(fused, ids)) <= 1e-6  # bank float32: log-scales rounded
    with torch.no_grad(), rotations_attached(model, plan, matrices, scales=bank, quant=W4A4KV4):
        quantized = logits_in_model_dtype(model, ids)
    assert _rel(quantized, wrapped) > 1e-3
    assert not hasattr(model, "spinlearn_scales")


def test_gradients_reach_every_log_scale_and_gqa_shares_one_vector_per_kv_head():
    model = tiny_model("llama")
    plan = prepare_model(model, "transformer_universal")
    pairs = plan_scales(model, plan)
    bank = ScaleBank(pairs, _random_scales(pairs))
    vo = bank.by_key["model.layers.0.self_attn.v_proj"]
    cfg = model.config
    assert vo.width == cfg.num_key_value_heads * cfg.head_dim and vo.head_dim == cfg.head_dim
    s = bank.get(vo.key).detach()
    wide = bank.for_reader(vo.key, cfg.num_attention_heads * cfg.head_dim).detach()
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for h in range(cfg.num_attention_heads):  # query head h reads KV head h // n_rep (transformers' repeat_kv)
        g = h // n_rep
        assert torch.equal(wide[h * cfg.head_dim:(h + 1) * cfg.head_dim], s[g * cfg.head_dim:(g + 1) * cfg.head_dim])
    ids = _ids()
    with rotations_attached(model, plan, make_matrices(plan), scales=bank, quant=W4A4KV4):
        model(input_ids=ids, labels=ids).loss.backward()
    for key, p in bank.log_s.items():
        assert p.grad is not None and p.grad.abs().max() > 0, key
    assert "model.norm" in bank.by_key  # lm_head is quantized only when asked: then its input scale counts
    assert "model.norm" not in {p.key for p in plan_scales(model, plan, log=False, head_quantized=False)}


def test_smoothquant_start_matches_a_numpy_reference():
    alpha = 0.5
    model = tiny_model("llama")
    plan = prepare_model(model, "transformer_universal")
    matrices = make_matrices(plan, mode="hadamard", seed=1)
    pairs = plan_scales(model, plan, log=False)
    blocks = torch.randint(3, 128, (3, 16), generator=_gen(4))
    got = smoothquant_scales(model, plan, matrices, pairs, blocks, alpha)
    # reference: the rotations folded into a copy, plain forward, inputs captured, the formula in numpy
    ref_model = copy.deepcopy(model)
    fold_rotations(plan.placements, matrices, True)  # model is left prepared: fold into it, compare on ref_model's copy
    ref_model = model
    inputs: dict[str, list] = {}
    layer = ref_model.model.layers[0]
    mods = {"q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].detach().numpy()))
             for n, m in mods.items()]
    with torch.no_grad():
        for row in blocks:
            ref_model(input_ids=row[None])
    for h in hooks:
        h.remove()

    def formula(x, weights, kv_heads=None, head_dim=None):
        xmax = np.abs(np.concatenate([a.reshape(-1, a.shape[-1]) for a in x])).max(0).astype(np.float64)
        wmax = np.max([np.abs(w.detach().numpy().astype(np.float64)).max(0) for w in weights], axis=0)
        if kv_heads:
            xmax = xmax.reshape(kv_heads, -1, head_dim).max(1).reshape(-1)
            wmax = wmax.reshape(kv_heads, -1, head_dim).max(1).reshape(-1)
        return np.maximum(xmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)

    attn = layer.self_attn
    cfg = ref_model.config
    expected = {
        "model.layers.0.input_layernorm": formula(inputs["q"], [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
        "model.layers.0.self_attn.v_proj": formula(inputs["o"], [attn.o_proj.weight], cfg.num_key_value_heads, cfg.head_dim),
        "model.layers.0.mlp.up_proj": formula(inputs["down"], [layer.mlp.down_proj.weight]),
    }
    for key, ref in expected.items():
        np.testing.assert_allclose(got[key].numpy(), ref, rtol=2e-5)
    assert all(float(s.max() / s.min()) > 1.5 for s in got.values())  # non-trivial: not all ones


# ------------------------------------------------------------------------------ end to end: the launch script
from test_job import IDS, assets, original_logits, overrides_for, rel_err, run_main  # noqa: E402,F401


def test_launch_with_scales_and_clips_exports_a_float_exact_model(assets, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from spinlearn.artifacts import (ACTIVATION_CLIPS_FILE, CLIP_LOGITS_FILE, LOG_SCALES_FILE, SCALES_FILE,
                                     WEIGHT_CLIPS_FILE)

    out = tmp_path / "out"
    extra = {"rotation.learn_scales": "true", "rotation.scales_init": "smoothquant", "quant.learn_a_clip": "true",
             "quant.learn_w_clip": "true", "quant.w_clip_lr": "0.1", "quant.learn_kv_clip": "true"}
    assert run_main(assets, overrides_for(out, **extra)) == 0
    scales = load_file(out / SCALES_FILE)
    assert len(scales) == 2 * 4  # per layer: 2 norms, v -> o, up -> down (lm_head stays float: no final-norm scale)
    assert all(s.dtype == torch.float64 and (s > 0).all() for s in scales.values())
    clips = load_file(out / ACTIVATION_CLIPS_FILE)
    assert len(clips) == 2 * (7 + 2) and all(0 < float(r) < 1 for r in clips.values())  # linear inputs, K and V
    w_clips = load_file(out / WEIGHT_CLIPS_FILE)  # one ratio per output row of every quantized weight
    assert len(w_clips) == 2 * 7 and w_clips["model.layers.0.mlp.down_proj.weight"].shape == (64, 1)
    assert all(((r > 0) & (r < 1)).all() for r in w_clips.values())
    assert (out / "checkpoint-2" / LOG_SCALES_FILE).is_file() and (out / "checkpoint-2" / CLIP_LOGITS_FILE).is_file()
    fused = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    norm = fused.model.layers[0].input_layernorm.weight.double()
    key = "model.layers.0.input_layernorm"
    torch.testing.assert_close(norm, (1.0 / scales[key]).float().double(), rtol=0, atol=0)  # the scales are folded
    with torch.no_grad():
        assert rel_err(fused(input_ids=IDS).logits, original_logits(assets)) <= 1e-4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ppl_quant_after"] > 1
    assert metrics["guard"] == {"kept": "learned", "judged_on": "W4A4KV4 RTN, learned rotation"}
    assert metrics["scales"]["vectors"] == 8 and metrics["scales"]["init"] == "smoothquant"
    assert metrics["activation_clips"]["count"] == 18 and 0 < metrics["activation_clips"]["min"] < 1
    assert metrics["weight_clips"]["weights"] == 14 and metrics["weight_clips"]["min"] < metrics["weight_clips"]["max"]
    # `spinlearn eval` of the run's model reproduces the learned row: scales folded, online R3/R4, the learned clips
    # (activations and weights); without the weight clips it does not.
    from spinlearn.cli import main as cli

    record = tmp_path / "eval.json"
    assert cli(["eval", "--model", str(out / "model"), "--data", str(assets["test"]), "--seqlen", "32",
                "--max-windows", "2", "--rotation", "learned", "--w-bits", "4", "--a-bits", "4", "--kv-bits", "4",
                "--json", str(record)]) == 0
    assert json.loads(record.read_text())["ppl"] == pytest.approx(metrics["ppl_quant_after"], rel=1e-5)
    assert json.loads(record.read_text())["settings"]["weight_clips"] == 14
    assert cli(["eval", "--model", str(out / "model"), "--data", str(assets["test"]), "--seqlen", "32",
                "--max-windows", "2", "--rotation", "learned", "--w-bits", "4", "--a-bits", "4", "--kv-bits", "4",
                "--weight-clips", "none", "--json", str(record)]) == 0
    assert json.loads(record.read_text())["ppl"] != pytest.approx(metrics["ppl_quant_after"], rel=1e-5)


def test_guard_with_scales_undoes_them_and_keeps_the_start(assets, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from spinlearn.artifacts import SCALES_FILE
    from spinlearn.job import RotationJob

    real = RotationJob._ppl

    def worse(self, label, model):
        value = real(self, label, model)
        return self.metrics["ppl_quant_before"] * 1.5 if "learned rotation" in label else value  # pretend learning hurt

    monkeypatch.setattr(RotationJob, "_ppl", worse)
    out = tmp_path / "out"
    extra = {"rotation.learn_scales": "true", "eval.guard": "true", "eval.baselines": "false", "train.max_steps": "2"}
    assert run_main(assets, overrides_for(out, **extra)) == 0
    assert json.loads((out / "metrics.json").read_text())["guard"]["kept"] == "start"
    assert not (out / SCALES_FILE).exists()
    fused = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    norms = [m.weight for n, m in fused.named_modules() if n.endswith("layernorm") or n == "model.norm"]
    assert all(torch.allclose(w, torch.ones_like(w), atol=1e-6) for w in norms)  # weightless again: scales undone
    with torch.no_grad():
        assert rel_err(fused(input_ids=IDS).logits, original_logits(assets)) <= 1e-4


def test_a_rotations_file_with_scales_beside_it_folds_both(tmp_path):
    """`spinlearn eval --rotations FILE` on a plain model: the scales a run saved beside its rotations are part of
    the same transform; folding the file gives the same weights as the run's own fold."""
    from spinlearn.artifacts import SCALES_FILE, save_rotations
    from spinlearn.evaluate import apply_rotations_file

    original = tiny_model("llama", dtype=torch.float64)
    expected, _, matrices, _, scales = _fused(original, "llama")
    save_rotations(matrices, tmp_path / "rotations.safetensors")
    save_rotations(scales, tmp_path / SCALES_FILE)
    got = copy.deepcopy(original)
    apply_rotations_file(got, tmp_path / "rotations.safetensors")
    for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-12), name
