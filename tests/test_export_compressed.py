"""Exports decompressed by compressed-tensors' own code equal spinlearn's fake-quantized weights (integers exact),
configs validate against its pydantic models, and W4A16 packs to <= 1/6 of float32."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model
from spinlearn.export import export_model
from spinlearn.export.schemes import resolve_scheme
from spinlearn.fp4 import nvfp4_block_scales, nvfp4_global_scale, nvfp4_qdq, round_e2m1
from spinlearn.online import fold_online, online_linears
from spinlearn.quant import quantize_weight, weight_qparams

DEMO = Path(__file__).resolve().parents[1] / "spinlearn" / "demo" / "model"


def _decompress(out: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Every quantized module's weight decompressed by compressed-tensors' compressor, plus its raw tensors."""
    import torch._dynamo
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate({k: v for k, v in cfg.items() if k != "transform_config"})
    scheme = qc.config_groups["group_0"]
    tensors = load_file(str(out / "model.safetensors"))
    mods = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    res = {}
    for m in mods:
        local = {k[len(m) + 1:]: v for k, v in tensors.items() if k.startswith(m + ".") and "." not in k[len(m) + 1:]}
        with torch._dynamo.config.patch(disable=True):
            dec = BaseCompressor.get_value_from_registry(qc.format).decompress(local, scheme)
        res[m] = {"weight": dec["weight"], **{f"raw_{k}": v for k, v in local.items()}}
    return cfg, res


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama")
    return model, online_linears(model, None, True)


def _folded(model, online):
    ref = copy.deepcopy(model)
    fold_online(ref, online)
    return ref


@pytest.mark.parametrize("scheme,group", [("w4a16", 8), ("w4a16", -1), ("w8a8", None)])
def test_int_exports_decompress_to_spinlearn_rtn(tiny, tmp_path, scheme, group):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig

    model, online = tiny
    out = export_model(model, tmp_path / scheme, scheme=scheme, online=online, group_size=group, progress=False)
    cfg, dec = _decompress(out)
    QuantizationConfig.model_validate({k: v for k, v in cfg.items() if k != "transform_config"})
    TransformConfig.model_validate(cfg["transform_config"])
    spec = resolve_scheme(scheme, group).quant.w
    ref = _folded(model, online)
    linears = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(dec) == sorted(linears) and cfg["ignore"] == ["lm_head"]
    for name in linears:
        w = ref.get_submodule(name).weight.detach()
        expect = quantize_weight(w, spec)
        assert torch.equal(dec[name]["weight"], expect), name
        scale, _ = weight_qparams(w, spec)
        assert torch.equal(dec[name]["raw_weight_scale"], scale), name  # the very scales spinlearn used
        q = expect.reshape(scale.shape[0], scale.shape[1], -1) / scale.unsqueeze(-1)
        assert (q - q.round()).abs().max() < 1e-4  # on spinlearn's grid
        assert torch.equal(_stored_codes(dec[name], spec.bits, w.shape), q.round().reshape(w.shape).to(torch.int8))


def _stored_codes(d: dict, bits: int, shape) -> torch.Tensor:
    """The integers the checkpoint holds (int4 unpacked by compressed-tensors' own helper, or int8 as stored)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if "raw_weight_packed" in d:
        return unpack_from_int32(d["raw_weight_packed"], bits, torch.Size(shape)).to(torch.int8)
    return d["raw_weight"]


def test_nvfp4_export_decompresses_to_spinlearn_fp4(tmp_path):
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="blocks of 16 .* input width 344 of 'model.layers.0.mlp.down_proj'"):
        export_model(tiny_model("llama"), tmp_path / "bad", scheme="nvfp4", calib_blocks=calib)
    assert not (tmp_path / "bad").exists()
    model = tiny_model("llama", intermediate_size=192)  # NVFP4 blocks of 16: 344 = 172 * 2 would not do
    online = online_linears(model, None, True)
    out = export_model(model, tmp_path / "nvfp4", scheme="nvfp4", online=online, calib_blocks=calib, progress=False)
    cfg, dec = _decompress(out)
    assert cfg["format"] == "nvfp4-pack-quantized"
    ref = _folded(model, online)
    for name, d in dec.items():
        w = ref.get_submodule(name).weight.detach()
        mine = nvfp4_qdq(w)
        # compressed-tensors decompresses NVFP4 to bfloat16: the same values, rounded once to bf16
        assert torch.equal(d["weight"], mine.to(d["weight"].dtype)), name
        g = nvfp4_global_scale(w.abs().amax())
        assert torch.equal(d["raw_weight_global_scale"], g)
        eff = (nvfp4_block_scales(w, g) / g).repeat_interleave(16, dim=1)
        codes = unpack_fp4_from_uint8(d["raw_weight_packed"], w.shape[0], w.shape[1], dtype=torch.float32)
        assert torch.equal(codes, round_e2m1(mine / eff)), name  # E2M1 codes exactly spinlearn's
        assert d["raw_weight_packed"].dtype == torch.uint8 and d["raw_weight_packed"].shape[1] == w.shape[1] // 2
        assert d["raw_weight_scale"].dtype == torch.float8_e4m3fn
        assert d["raw_input_global_scale"].item() > 0


def test_gptq_export_holds_gptq_weights_and_its_scales(tiny, tmp_path):
    from spinlearn.fakequant import wrap_model
    from spinlearn.gptq import gptq_quantize_model

    model, online = tiny
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    out = export_model(model, tmp_path / "gptq", scheme="w4a16", online=online, group_size=-1, w_method="gptq",
                       calib_blocks=calib, progress=False)
    _, dec = _decompress(out)
    ref = _folded(model, online)
    hooks = wrap_model(ref, online=online, online_in_weights=False)
    gptq_quantize_model(ref, calib, resolve_scheme("w4a16", -1).quant.w, skip=["lm_head"], progress=False,
                        refit=True)  # quant.gptq.refit's default
    hooks.remove()
    for name, d in dec.items():
        assert torch.equal(d["weight"], ref.get_submodule(name).weight.detach()), name


def test_gptq_reports_the_grid_it_used():
    from spinlearn.gptq import gptq_quantize_weight
    from spinlearn.quant import QuantSpec

    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    h = 2 * x.T @ x / 256
    for spec, kw in [(QuantSpec(bits=4, group_size=16), {"act_order": True, "static_groups": True}),
                     (QuantSpec(bits=4, group_size=16), {}), (QuantSpec(bits=3), {"act_order": True})]:
        q, st = gptq_quantize_weight(w, h, spec, **kw)
        s = st["scale"]
        codes = q.reshape(16, s.shape[1], -1) / s.unsqueeze(-1)
        assert (codes - codes.round()).abs().max() < 1e-4, (spec, kw)
    _, st = gptq_quantize_weight(w, h, QuantSpec(bits=4, group_size=16), act_order=True)
    assert st["scale"] is None  # act_order groups are not contiguous columns


def test_demo_w4a16_packs_to_a_sixth(tmp_path):
    from spinlearn.loading import load_causal_lm

    model = load_causal_lm(DEMO)
    out = export_model(model, tmp_path / "demo", scheme="w4a16", progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rsplit(".", 1)[0] in linears)
    dense = sum(m.weight.numel() * 4 for m in linears.values())
    assert packed <= dense / 6, (packed, dense)
    _, dec = _decompress(out)
    spec = resolve_scheme("w4a16").quant.w
    for name in ("model.layers.0.mlp.down_proj", "model.layers.4.self_attn.q_proj"):
        assert torch.equal(dec[name]["weight"], quantize_weight(model.get_submodule(name).weight.detach(), spec))


def _learned_clips(model, online, seed: int):
    """(the folded reference model, its quantized linears, per-row clip ratios for them as a run saves them)."""
    ref = _folded(model, online)
    linears = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    gen = torch.Generator().manual_seed(seed)
    clips = {f"{n}.weight": 0.6 + 0.35 * torch.rand(ref.get_submodule(n).weight.shape[0], 1, generator=gen)
             for n in linears}
    return ref, linears, clips


def test_learned_weight_clips_set_the_exported_scales_on_their_grid_only(tiny, tmp_path, capsys):
    """A run's learned weight clip ratios are the RTN weight scales of an export on the grid they were learned for
    (decompressed by compressed-tensors: quantize_weight with the ratios); another grid leaves them out, saying so."""
    model, online = tiny
    ref, linears, clips = _learned_clips(model, online, seed=4)
    out = export_model(model, tmp_path / "clipped", scheme="w4a16", online=online, group_size=-1, progress=False,
                       weight_clips=clips)
    assert "weight scales from the run's learned clip ratios (14 weights)" in capsys.readouterr().err
    _, dec = _decompress(out)
    spec = resolve_scheme("w4a16", -1).quant.w
    for name in linears:
        w = ref.get_submodule(name).weight.detach()
        clip = clips[f"{name}.weight"]
        assert torch.equal(dec[name]["weight"], quantize_weight(w, spec, clip)), name
        assert torch.equal(dec[name]["raw_weight_scale"], weight_qparams(w, spec, clip)[0]), name
        assert not torch.equal(dec[name]["weight"], quantize_weight(w, spec)), name
    recipe_grid = (4, True, -1)
    from spinlearn.export.api import carried_weight_clips

    grouped = resolve_scheme("w4a16", 8)
    assert carried_weight_clips(clips, grouped, "rtn", recipe_grid)[0] is None  # learned per channel, exported per 8
    assert "are not applied" in carried_weight_clips(clips, grouped, "rtn", recipe_grid)[1]
    assert carried_weight_clips(clips, resolve_scheme("w4a16", -1), "gptq", recipe_grid)[0] is clips  # its grid
    assert carried_weight_clips(clips, resolve_scheme("w4a16", -1), "gptq", recipe_grid, gptq_grid=False)[0] is None
    assert carried_weight_clips(clips, resolve_scheme("w4a16", -1, w_clip=True), "rtn", recipe_grid)[0] is None
    assert carried_weight_clips(clips, resolve_scheme("w4a16", -1), "rtn", recipe_grid)[0] is clips
    assert carried_weight_clips(clips, resolve_scheme("float"), "rtn", recipe_grid) == (None, None)


def test_a_gptq_export_rounds_on_the_learned_weight_grid(tiny, tmp_path, capsys):
    """GPTQ exports of a run with learned weight clip ratios on their grid store the scales those ratios give
    (decompressed by compressed-tensors), with GPTQ's integers: not round-to-nearest's values on that grid. (Plain
    GPTQ here; with quant.gptq.refit the ratios apply to the refitted weight, see tests/test_evaluate.py.)"""
    model, online = tiny
    ref, linears, clips = _learned_clips(model, online, seed=6)
    blocks = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    out = export_model(model, tmp_path / "gptq", scheme="w4a16", online=online, group_size=-1, w_method="gptq",
                       calib_blocks=blocks, weight_clips=clips, gptq_kwargs={"refit": False}, progress=False)
    assert "GPTQ rounds on the grid of the run's learned clip ratios (14 weights)" in capsys.readouterr().err
    _, dec = _decompress(out)
    spec = resolve_scheme("w4a16", -1).quant.w
    differs = 0
    for name in linears:
        w = ref.get_submodule(name).weight.detach()
        scale = weight_qparams(w, spec, clips[f"{name}.weight"])[0]
        assert torch.equal(dec[name]["raw_weight_scale"], scale), name
        levels = dec[name]["weight"] / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 8, name
        differs += not torch.equal(dec[name]["weight"], quantize_weight(w, spec, clips[f"{name}.weight"]))
    assert differs == len(linears)


@pytest.mark.parametrize(("w_method", "mse_clip"), [("gptq", True), ("rtn", False)])
def test_a_recipe_that_learns_weight_clips_exports_gptq_with_the_clip_search(tiny, tmp_path, monkeypatch, w_method,
                                                                            mse_clip):
    """A recipe with quant.learn_w_clip (and no quant.w_clip) exports GPTQ weights with the MSE clip search, as the
    job's GPTQ rows measure them (spinlearn.quant.gptq_clip_search); its RTN exports keep round-to-nearest's plain
    scales."""
    import spinlearn.export.api as api
    from spinlearn.config import load_recipe

    recipe = load_recipe(DEMO.parents[2] / "recipes" / "demo.yaml", [f"output_dir={tmp_path / 'run'}"])
    assert recipe.quant.learn_w_clip and not recipe.quant.w_clip
    seen = []
    real = api.resolve_scheme
    monkeypatch.setattr(api, "resolve_scheme", lambda *a, **kw: seen.append(kw["w_clip"]) or real(*a, **kw))
    model, online = tiny
    blocks = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    export_model(model, tmp_path / "out", scheme="w4a16", online=online, recipe=recipe, w_method=w_method,
                 group_size=-1, calib_blocks=blocks, progress=False)
    assert seen == [mse_clip]
