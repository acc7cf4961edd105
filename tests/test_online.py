"""online.py: which linears get an online input Hadamard, the checks, and the two halves against a dense reference."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from spinlearn.fakequant import wrap_model
from spinlearn.hadamard import hadamard_matrix
from spinlearn.online import ALL, R4_GLOBS, fold_online, online_input_hook, online_linears


def test_r4_is_the_down_proj_set_and_online_adds_globs():
    model = tiny_model("llama")
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert online_linears(model, r4=True) == down
    assert online_linears(model) == []
    both = online_linears(model, ["*o_proj"], r4=True)
    assert both == down + [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert online_linears(model, ["*mlp.down_proj"], r4=True) == down  # no duplicates


def test_all_is_every_linear_but_lm_head_and_routers():
    model = tiny_model("mixtral")
    names = online_linears(model, [ALL])
    assert "lm_head" not in names and not any(n.endswith("mlp.gate") for n in names)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"} <= set(names)


def test_unknown_glob_and_unsupported_width_are_refused_with_the_name():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"rotation.online: pattern '\*mlp.wo' matches no linear layer"):
        online_linears(model, ["*mlp.wo"])
    odd = tiny_model("qwen2", intermediate_size=10)  # no Hadamard matrix of order 10 exists
    with pytest.raises(ValueError, match=r"no Hadamard matrix of order 10 .*'model.layers.0.mlp.down_proj'"):
        online_linears(odd, r4=True)


def test_r4_covers_the_mlp_outputs_of_other_families():
    assert online_linears(tiny_model("phi3"), r4=True) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert online_linears(tiny_model("opt"), r4=True) == [f"model.decoder.layers.{i}.fc2" for i in range(2)]
    with pytest.raises(ValueError, match="pattern '\\*mlp.down_proj' matches no linear layer"):
        online_linears(tiny_model("opt"), ["*mlp.down_proj"])


def test_the_two_halves_equal_the_float_linear_and_a_dense_hadamard():
    torch.manual_seed(0)
    lin = torch.nn.Linear(344, 8, dtype=torch.float64)  # 344 = 172 * 2: a non-power-of-two order
    holder = torch.nn.Sequential()
    holder.add_module("down_proj", lin)
    x = torch.randn(3, 344, dtype=torch.float64)
    ref = lin(x)
    h = hadamard_matrix(344, dtype=torch.float64)
    w = lin.weight.detach().clone()
    fold_online(holder, ["down_proj"])
    assert torch.allclose(lin.weight, w @ h, atol=1e-12)  # the weight half is W H
    handle = lin.register_forward_pre_hook(online_input_hook, with_kwargs=True)
    assert torch.allclose(lin(x), ref, atol=1e-10)  # with the online half, the same function
    handle.remove()


def test_wrap_model_applies_both_halves_in_training_and_only_the_online_half_after_folding():
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        names = online_linears(model, r4=True)
        handle = wrap_model(model, online=names)  # parametrization W H + hook x H
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-9)
        handle.remove()
        fold_online(model, names)
        assert not torch.allclose(model(input_ids=ids).logits, ref, atol=1e-3)  # folded, not yet applied online
        handle = wrap_model(model, online=names, online_in_weights=False)
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-9)
        handle.remove()
    assert R4_GLOBS[0] == "*mlp.down_proj"
