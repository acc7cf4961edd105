"""spinlearn.layout: parsing, dims (one-line errors for bad sizes), ModelOpt's conventions (unchanged ModelOpt
layout files and dicts rotate Llama, Qwen2, Mixtral and Nemotron-H exactly), and skip-with-note vs typo errors."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import spinlearn
from spinlearn.layout import (
    MAX_DIM,
    LayoutError,
    LayoutNote,
    addressable_targets,
    check_layout_for_config,
    load_layout,
    resolve_dims,
    shipped_layouts,
)
from spinlearn.rotation_plan import prepare_model
from helpers import FAMILIES, float64_exact_norms, layout_for, logits_in_model_dtype, tiny_config, tiny_model

DATA = Path(__file__).parent / "data"
MODELOPT = DATA / "modelopt_transformer_universal.yaml"
MODELOPT_NEMOTRON = DATA / "modelopt_nemotron_h.yaml"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "modelopt_transformer_universal.yaml"
IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
UNIVERSAL = load_layout("transformer_universal").to_dict()


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _with(path: str, value) -> dict:
    """transformer_universal with one entry (``a/b/c``) set."""
    d = copy.deepcopy(UNIVERSAL)
    *head, last = path.split("/")
    node = d
    for k in head:
        node = node[k]
    node[last] = value
    return d


def _notes(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, LayoutNote)]


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("name", shipped_layouts())
def test_shipped_layouts_round_trip_through_yaml(name, tmp_path):
    layout = load_layout(name)
    (tmp_path / "l.yaml").write_text(layout.to_yaml())
    assert load_layout(tmp_path / "l.yaml").to_dict() == layout.to_dict()
    assert load_layout(layout.to_dict()).to_dict() == layout.to_dict()


def test_modelopt_fixture_is_modelopts_file_verbatim():
    if not REFERENCE.is_file():
        pytest.skip("no shared reference copy in this checkout")
    assert MODELOPT.read_bytes() == REFERENCE.read_bytes()


# ------------------------------------------------------------------------------------------------- dims


@pytest.mark.parametrize("dim,message", [
    (0, "is 0: a rotation size must be positive"),
    (-16, "is -16: a rotation size must be positive"),
    (MAX_DIM * 2, f"larger than any axis a rotation acts on \\(limit {MAX_DIM}\\)"),
    (True, "not an integer"),
    (2.5, "not an integer"),
])
def test_literal_dims_are_refused_at_load_naming_layout_matrix_and_dim(dim, message):
    with pytest.raises(LayoutError, match=message) as e:
        load_layout(_with("rotation_matrices/r2/dim", dim))
    text = str(e.value)
    assert "'transformer_universal'" in text and "rotation_matrices.r2.dim=" in text and "\n" not in text
    assert "use an int, a config key" in text or "positive" in text


@pytest.mark.parametrize("dim,message", [
    ("hidden_size // 0", "divides by zero"),
    ("hidden_size - 64", "is 0: a rotation size must be positive"),
    ("hidden_size - 100", "= -36\\) is -36"),
    ("hidden_size * 100000", "larger than any axis"),
    ("hidden_size.foo", "'hidden_size' is 64 \\(int\\), not a nested config"),
    ("rope_parameters.rope_theta", "'rope_parameters' is .* \\(dict\\), not a nested config"),
    ("model_type", "'model_type' is 'llama' \\(str\\), not an integer size"),
    ("head_size", "'head_size' is missing"),
])
def test_config_dims_give_one_line_layout_errors(dim, message):
    layout = load_layout(_with("rotation_matrices/r2/dim", dim))
    with pytest.raises(LayoutError, match=message) as e:
        resolve_dims(layout, tiny_config("llama"))
    assert "rotation_matrices.r2.dim=" in str(e.value) and "\n" not in str(e.value)
    # The same through rotate: a LayoutError (no ZeroDivisionError / TypeError), model untouched.
    model = tiny_model("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LayoutError):
        spinlearn.rotate(model, layout)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_dim_larger_than_the_axis_it_rotates_says_so():
    model = tiny_model("llama")
    with pytest.raises(LayoutError, match="128 is larger than the axis.*rotation_matrices.r2.dim"):
        spinlearn.rotate(model, _with("rotation_matrices/r2/dim", 128))


def test_head_dim_falls_back_like_transformers_with_a_note():
    cfg = tiny_config("qwen2")
    assert getattr(cfg, "head_dim", None) is None
    layout = load_layout({"rotation_matrices": {"r2": {"dim": "head_dim"}}})
    notes = _notes(lambda: resolve_dims(layout, cfg))
    assert resolve_dims(layout, cfg) == {"r2": 16}
    assert any("hidden_size // num_attention_heads = 16" in n for n in notes)
    # "head_dim or ..." takes the alternative silently.
    assert _notes(lambda: resolve_dims(load_layout("transformer_universal"), cfg)) == []


# ------------------------------------------------------------------------------- layout against a config


@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_layout_for_config_accepts_the_shipped_layouts(family):
    assert check_layout_for_config(layout_for(family), tiny_config(family)).name == layout_for(family)


@pytest.mark.parametrize("path,value,message", [
    ("rotation_matrices/r1/dim", 48, "r1.dim=48 is 48, which does not divide the residual stream .*hidden_size = 64"),
    ("rotation_matrices/r2/dim", 24, "r2.dim=24 is 24, which does not divide v_proj's output .* = 32"),
    ("rotation_matrices/r2/dim", 0, "r2.dim=0 is 0"),
    ("rotation_matrices/r1/dim", "text_config.hidden_size.x", "missing"),
])
def test_check_layout_for_config_refuses_what_the_config_already_rules_out(path, value, message):
    with pytest.raises(LayoutError, match=message):
        check_layout_for_config(_with(path, value), tiny_config("llama"))


def test_check_layout_for_config_auto_and_files(tmp_path):
    assert check_layout_for_config("auto", tiny_config("llama")) is None
    assert check_layout_for_config(str(MODELOPT), tiny_config("qwen2")).name == "modelopt_transformer_universal"
    with pytest.raises(LayoutError, match="does not exist"):
        check_layout_for_config(str(tmp_path / "nope.yaml"), tiny_config("llama"))


# ------------------------------------------------------------------------------------ ModelOpt layouts


def _exact(family: str, layout, dtype=torch.float64) -> float:
    model = tiny_model(family, dtype=dtype)
    if dtype == torch.float64:
        float64_exact_norms(model)
    ref = logits_in_model_dtype(model, IDS)
    spinlearn.rotate(model, layout, seed=2)
    return _rel(logits_in_model_dtype(model, IDS), ref)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "nemotron_h"])
def test_modelopt_universal_file_and_dict_are_exact_unchanged(family):
    assert _exact(family, str(MODELOPT)) <= 1e-9
    as_dict = OmegaConf.to_container(OmegaConf.load(MODELOPT))
    assert _exact(family, as_dict) <= 1e-9
    assert _exact(family, str(MODELOPT), torch.float32) <= 1e-4


def test_modelopt_style_nemotron_h_layout_is_exact():
    assert _exact("nemotron_h", str(MODELOPT_NEMOTRON)) <= 1e-9
    assert _exact("nemotron_h", str(MODELOPT_NEMOTRON), torch.float32) <= 1e-4


def test_modelopt_conventions_are_translated_with_notes():
    model = tiny_model("llama", dtype=torch.float64)
    notes = _notes(lambda: prepare_model(model, str(MODELOPT)))
    assert any("'*embed_tokens': [r1, null]" in n and "read as [null, r1]" in n for n in notes)
    assert any("'input_layernorm' read as '*.input_layernorm'" in n for n in notes)
    assert any("'*in_proj' matches nothing" in n and "skipped" in n for n in notes)
    assert any("'*out_proj' matches nothing" in n for n in notes)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 1), name  # every norm fused, bare names included


def test_modelopt_universal_on_mixtral_rotates_router_and_experts():
    model = tiny_model("mixtral", dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = prepare_model(model, str(MODELOPT))
    notes = [str(w.message) for w in caught]
    placed = {(p.target.name, p.side, p.matrix) for p in plan.placements}
    layer = "model.layers.0.mlp"
    assert {(f"{layer}.gate", "input", "r1"), (f"{layer}.experts.gate_up_proj", "input", "r1"),
            (f"{layer}.experts.down_proj", "output", "r1")} <= placed
    assert any("added model.layers.0.mlp.gate (reader)" in n for n in notes)
    assert any("norm fusion follows the readers" in n for n in notes)
    assert torch.all(model.model.layers[0].post_attention_layernorm.weight == 1)


def test_modelopt_embedding_with_both_sides_is_still_an_error():
    with pytest.raises(LayoutError, match="'model.embed_tokens' \\(Embedding\\) has no input side"):
        spinlearn.rotate(tiny_model("llama"), _with("rotation_config/*embed_tokens", ["r1", "r1"]))


# --------------------------------------------------------------------------------- skip with note vs typo


def test_other_family_patterns_are_skipped_with_a_note():
    layout = _with("rotation_config/*mixer.in_proj|*w1", ["r1", None])
    notes = _notes(lambda: spinlearn.rotate(tiny_model("llama"), layout))
    assert any("'*mixer.in_proj|*w1' matches nothing in LlamaForCausalLM" in n for n in notes)


@pytest.mark.parametrize("pattern,why", [
    ("*mlp.wi", "no known family has a module named wi"),
    ("*self_attn.qkv_proj", "self_attn exists: a wrong child name"),
])
def test_typo_patterns_still_fail(pattern, why):
    with pytest.raises(LayoutError, match=f"pattern '{pattern.replace('*', '[*]')}' matches no module"):
        spinlearn.rotate(tiny_model("llama"), _with(f"rotation_config/{pattern}", ["r1", None]))


def test_typo_norm_names_still_fail():
    layout = copy.deepcopy(UNIVERSAL)
    layout["norm_fuse_config"]["decoder_layer_fuse"][0][0] = "input_norm"
    with pytest.raises(LayoutError, match="'input_norm' matches no norm.*input_layernorm"):
        spinlearn.rotate(tiny_model("llama"), layout)


def test_skips_that_leave_a_matrix_one_sided_are_errors():
    # OPT has no o_proj: ModelOpt's universal layout would write r2 (v_proj) and never read it.
    with pytest.raises(LayoutError, match="no module reads \\(input side\\) matrix 'r2'.*typos"):
        spinlearn.rotate(tiny_model("opt"), str(MODELOPT))


# ---------------------------------------------------------------------------------- addressable targets


class _Extra(nn.Module):
    def __init__(self):
        super().__init__()
        self.r = nn.Parameter(torch.eye(4))


def test_addressable_targets_skips_the_named_top_level_children():
    model = tiny_model("llama")
    model.add_module("bank", _Extra())
    assert "bank.r" in addressable_targets(model, skip=())
    assert "bank.r" not in addressable_targets(model, skip=("bank",))
    assert "model.layers.0.self_attn.q_proj" in addressable_targets(model, skip=("bank",))


def test_malformed_norm_entries_name_the_entry():
    layout = copy.deepcopy(UNIVERSAL)
    layout["norm_fuse_config"]["lm_head_fuse"] = [["model.norm"]]
    with pytest.raises(LayoutError, match="lm_head_fuse entry \\['model.norm'\\] must be \\[norm, readers\\]"):
        load_layout(layout)
