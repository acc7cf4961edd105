"""spinlearn.layout_infer: ``layout: auto`` finds the residual stream by watching a forward pass. On every family
a shipped layout covers, the inferred layout is float64-exact and rotates the same tensors, sides and matrices
as the shipped one; families no layout can make exact are refused; ``spinlearn rotate --layout auto`` prints and
writes a layout the user can keep."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import spinlearn
from spinlearn.cli import main
from spinlearn.config import load_recipe
from spinlearn.layout import LayoutError, LayoutNote, load_layout
from spinlearn.layout_infer import complete_layout, infer_layout, trace_residual_graph
from spinlearn.rotation_plan import prepare_model
from helpers import FAMILIES, float64_exact_norms, layout_for, logits_in_model_dtype, tiny_model, tiny_tokenizer

IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _placed(family: str, layout) -> set[tuple[str, str, str]]:
    plan = prepare_model(tiny_model(family, dtype=torch.float64), layout)
    return {(p.target.name, p.side, p.matrix) for p in plan.placements}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inferred_layout_is_exact_and_matches_the_shipped_one(family):
    model = tiny_model(family, dtype=torch.float64)
    float64_exact_norms(model)
    ref = logits_in_model_dtype(model, IDS)
    _, matrices = spinlearn.rotate(model, "auto", seed=4)
    assert _rel(logits_in_model_dtype(model, IDS), ref) <= 1e-9
    assert any(not torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype)) for m in matrices.values())
    shipped = _placed(family, layout_for(family))
    assert _placed(family, "auto") == shipped
    # The printed YAML is a layout in its own right: it places the same.
    yaml_text = infer_layout(tiny_model(family, dtype=torch.float64)).to_yaml()
    assert _placed(family, load_layout(load_layout_from_text(yaml_text))) == shipped


def load_layout_from_text(text: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(text))


def test_graph_of_a_hybrid_and_a_moe_model():
    g = trace_residual_graph(tiny_model("nemotron_h", dtype=torch.float64))
    assert g.norms["model.layers.0.norm"] == ["model.layers.0.mixer.in_proj"]
    assert g.norms["model.norm_f"] == ["lm_head"]
    assert {"model.embeddings", "model.layers.0.mixer.out_proj", "model.layers.2.mixer.down_proj"} <= set(g.writers)
    assert g.heads == [("model.layers.1.mixer.v_proj", "model.layers.1.mixer.o_proj", 16)]
    g = trace_residual_graph(tiny_model("mixtral", dtype=torch.float64))
    assert g.norms["model.layers.1.post_attention_layernorm"] == [
        "model.layers.1.mlp.gate", "model.layers.1.mlp.experts.gate_up_proj"]
    assert "model.layers.1.mlp.experts.down_proj" in g.writers


def test_fused_qkv_gets_r1_only_with_a_note():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout = infer_layout(tiny_model("phi3"))
    assert set(layout.rotation_matrices) == {"r1"}
    assert any("fused qkv" in str(w.message) for w in caught if issubclass(w.category, LayoutNote))


def test_post_sublayer_norms_are_refused_clearly():
    from transformers import Gemma2Config

    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayoutError, match="post_attention_layernorm.*read by no linear module.*post-sublayer norm"):
        spinlearn.rotate(model, "auto")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_completion_adds_a_missing_router_with_a_note_and_stays_exact():
    d = copy.deepcopy(load_layout("transformer_universal").to_dict())
    cfg = d["rotation_config"]
    key = next(k for k in cfg if "|*mlp.gate|" in k)
    cfg[key.replace("|*mlp.gate|", "|")] = cfg.pop(key)
    d["norm_fuse_config"]["decoder_layer_fuse"][1][1].remove("mlp.gate")
    model = tiny_model("mixtral", dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        completed = complete_layout(model, load_layout(d))
    messages = [str(w.message) for w in caught]
    assert any("added model.layers.0.mlp.gate (reader)" in m for m in messages)
    assert any("norm fusion follows the readers" in m for m in messages)
    float64_exact_norms(model)
    ref = logits_in_model_dtype(model, IDS)
    spinlearn.rotate(model, completed)
    assert _rel(logits_in_model_dtype(model, IDS), ref) <= 1e-9


def test_shipped_layouts_need_no_completion():
    for family in ("llama", "mixtral", "opt"):
        layout = load_layout(layout_for(family))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert complete_layout(tiny_model(family), layout) is layout
        assert not [w for w in caught if issubclass(w.category, LayoutNote)]


def test_cli_rotate_layout_auto_prints_and_writes_the_layout(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_model("qwen2")
    model.save_pretrained(src, safe_serialization=True)
    tiny_tokenizer().save_pretrained(src)
    ref = logits_in_model_dtype(model, IDS)
    assert main(["rotate", "--model", str(src), "--output", str(out), "--layout", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "rotation_config:" in printed and "'*v_proj':" in printed
    written = load_layout(out / "layout.yaml")
    assert written.name == "auto" and set(written.rotation_matrices) == {"r1", "r2"}
    assert _placed("qwen2", written) == _placed("qwen2", "transformer_universal")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _rel(logits_in_model_dtype(reloaded, IDS), ref) <= 1e-4


def test_recipes_accept_layout_auto(tmp_path):
    base = ["model.path=m", "data.train=t.txt", f"output_dir={tmp_path / 'o'}", "train.max_steps=1"]
    assert load_recipe(None, [*base, "rotation.layout=auto"]).rotation.layout == "auto"
    with pytest.raises(ValueError, match="rotation.layout.*or auto"):
        load_recipe(None, [*base, "rotation.layout=autox"])


def test_cli_rotate_layout_auto_refuses_in_one_line(tmp_path, capsys):
    from transformers import Gemma2Config

    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    src, out = tmp_path / "src", tmp_path / "out"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src, safe_serialization=True)
    assert main(["rotate", "--model", str(src), "--output", str(out), "--layout", "auto"]) == 2
    err = capsys.readouterr().err
    assert "cannot infer a layout for Gemma2ForCausalLM" in err and "Traceback" not in err
    assert not out.exists()
