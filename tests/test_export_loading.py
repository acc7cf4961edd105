"""Online transforms in exports: stored matrices, targets, and spinlearn's loader (decompress + transforms) against
the fused model's logits; what plain transformers does with the same checkpoint."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model
from spinlearn.export import export_model, load_export
from spinlearn.export.schemes import check_scheme_name, resolve_scheme
from spinlearn.export.transforms import stored_hadamard, target_patterns, transform_config
from spinlearn.hadamard import hadamard_matrix
from spinlearn.online import fold_online, online_linears
from spinlearn.quant import QuantSettings


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", initializer_range=0.1)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    return model, online_linears(model, None, True), ids


@pytest.mark.parametrize("n", [64, 344, 192, 12 * 16])  # 2^m, 172*2, 12*16
def test_stored_matrix_is_pm1_and_normalises_to_spinlearns(n):
    v = stored_hadamard(n, torch.float32)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert torch.allclose(v.double() / math.sqrt(n), hadamard_matrix(n), atol=1e-12)


def test_targets_name_exactly_the_online_layers():
    names = [f"model.layers.{i}.{m}" for i in range(12) for m in ("mlp.down_proj", "mlp.up_proj", "self_attn.o_proj")]
    down = [n for n in names if n.endswith("down_proj")]
    assert target_patterns(down, names) == [r"re:^model\.layers\.\d+\.mlp\.down_proj$"]
    some = down[:3]  # only some layers: the pattern would over-match, so the names themselves
    assert target_patterns(some, names) == some
    tc = transform_config(down, names).model_dump()
    group = tc["config_groups"]["spinlearn_online"]
    assert [a["location"] for a in group["apply"]] == ["input", "weight_input"] and group["apply"][1]["inverse"]


@pytest.mark.parametrize("mode", ["r4", "all"])
def test_float_export_reproduces_fused_logits(tiny, tmp_path, mode):
    model, online, ids = tiny
    if mode == "all":  # every linear but lm_head (Brevitas layerwise / QuIP-style online input Hadamards)
        online = online_linears(model, ["all"], False)
    out = export_model(model, tmp_path / "f", scheme="float", online=online, progress=False)
    loaded = load_export(out)
    assert loaded.spinlearn_export["online"] == online
    stored = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if "spinlearn_online_input" in k}
    widths = {model.get_submodule(n).in_features for n in online}
    assert sorted(v.shape[0] for v in stored.values()) == sorted(widths)  # one +-1 matrix per width
    assert all(torch.equal(v, stored_hadamard(v.shape[0])) for v in stored.values())
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_w8a8_export_computes_spinlearns_fake_quantized_model(tiny, tmp_path):
    from spinlearn.fakequant import wrap_model

    model, online, ids = tiny
    out = export_model(model, tmp_path / "q", scheme="w8a8", online=online, progress=False)
    loaded = load_export(out)
    ref = copy.deepcopy(model)
    fold_online(ref, online)
    s = resolve_scheme("w8a8").quant  # int8 weights per channel, int8 dynamic per-token inputs after x H
    hooks = wrap_model(ref, quant=QuantSettings(w=s.w, a=s.a), online=online, online_in_weights=False)
    assert loaded.spinlearn_export["activations"] == "w8a8"
    with torch.no_grad():
        a, b = ref(ids).logits, loaded(ids).logits
    hooks.remove()
    # float64 dense transform (loader, as vLLM's stored matrix) vs spinlearn's float32 fast transform: a few int8
    # activation codes round differently; without the activation quantizer the two agree to 1e-5
    assert (a - b).abs().max() / a.abs().max() < 3e-3


def test_plain_transformers_ignores_the_transform(tiny, tmp_path):
    """Documented behaviour (README, model card): from_pretrained loads it but computes another function."""
    from transformers import AutoModelForCausalLM

    model, online, ids = tiny
    out = export_model(model, tmp_path / "p", scheme="w8a8", online=online, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    ours = load_export(out)
    with torch.no_grad():
        a, b, ref = plain(ids).logits, ours(ids).logits, model(ids).logits
    assert (b - ref).abs().max() < 0.05 * ref.abs().max()  # ours: 8-bit weights, close to float
    assert (a - ref).abs().max() > 5 * (b - ref).abs().max()  # plain: the transform is missing


def test_scheme_refusals_name_what_vllm_serves():
    for bad in ("w4a4", "W4A4KV4", "kv4", "int3"):
        with pytest.raises(ValueError, match="vLLM serves w4a16 .*, w8a8 .*, nvfp4 .* or float"):
            check_scheme_name(bad)
    with pytest.raises(ValueError, match="does not apply to scheme 'w8a8'"):
        resolve_scheme("w8a8", 64)
    with pytest.raises(ValueError, match="-1 .per channel. or a positive group size"):
        resolve_scheme("w4a16", 0)
    s = resolve_scheme("w4a16")
    assert (s.quant.w.bits, s.quant.w.group_size, s.quant.a.enabled) == (4, 128, False)
    s = resolve_scheme("w8a8")
    assert (s.quant.w.bits, s.quant.a.bits, s.quant.a.sym) == (8, 8, True)
    assert json.loads(resolve_scheme("nvfp4").ct_scheme(["Linear"]).model_dump_json())["weights"]["group_size"] == 16


def test_serving_notes_name_layers_vllm_cpu_cannot_run(tiny):
    from spinlearn.export import serving_notes
    from spinlearn.export.weights import quantized_linears

    model, _, _ = tiny  # MLP width 344: not a multiple of 32
    notes = serving_notes(quantized_linears(model), resolve_scheme("w4a16", 8))
    assert len(notes) == 1 and "multiples of 32" in notes[0] and "model.layers.0.mlp.gate_proj (64x344)" in notes[0]
    assert "w8a8" in notes[0]  # what the user can do
    assert serving_notes(quantized_linears(model), resolve_scheme("w8a8")) == []
    odd = serving_notes(quantized_linears(tiny_model("llama", intermediate_size=96)), resolve_scheme("w4a16", 1))
    assert any("even group size" in n for n in odd)


def test_nvfp4_export_applies_static_input_scales(tmp_path):
    from spinlearn.fp4 import nvfp4_qdq

    model = tiny_model("llama", intermediate_size=192)
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    out = export_model(model, tmp_path / "nv", scheme="nvfp4", calib_blocks=calib, progress=False)
    loaded = load_export(out)
    assert loaded.spinlearn_export["activations"] == "nvfp4"
    g = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.input_global_scale"]
    seen = {}
    lin = loaded.get_submodule("model.layers.0.mlp.down_proj")
    hooks = [lin.register_forward_pre_hook(lambda m, a: seen.setdefault("raw", a[0]), prepend=True),
             lin.register_forward_pre_hook(lambda m, a: seen.setdefault("quantized", a[0]))]
    with torch.no_grad():
        loaded(calib[:1])
    for h in hooks:
        h.remove()
    assert not torch.equal(seen["raw"], seen["quantized"])
    assert torch.equal(seen["quantized"], nvfp4_qdq(seen["raw"], global_scale=g))
