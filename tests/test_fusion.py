"""spinlearn.fusion against float64 references: how a norm applies its weight, folding a norm (RMSNorm, Gemma's
1 + w, LayerNorm with bias, readers with and without biases) into its readers, norm fusion through a layout
(ModelOpt's bare norm names included) leaving the logits unchanged, and folding matrices into weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from spinlearn.fusion import fold_rotations, fuse_norm_into, inspect_norm, norm_readers
from spinlearn.layout import LayoutNote, Placement, Target, load_layout
from spinlearn.rotation_plan import prepare_model
from helpers import float64_exact_norms, layout_for, logits_in_model_dtype, tiny_model

MODELOPT = Path(__file__).parent / "data" / "modelopt_transformer_universal.yaml"
IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
D = torch.float64


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _norm(kind: str) -> nn.Module:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = {"rms": LlamaRMSNorm, "gemma": GemmaRMSNorm, "layer": nn.LayerNorm}[kind](16).to(D)
    with torch.no_grad():
        norm.weight.add_(0.5 * torch.randn(16, dtype=D))
        if getattr(norm, "bias", None) is not None:
            norm.bias.add_(0.3 * torch.randn(16, dtype=D))
    holder = nn.Sequential(norm)
    float64_exact_norms(holder)  # HF RMSNorms compute in float32 otherwise
    return norm


def _target(lin: nn.Linear, name: str) -> Target:
    return Target(name, lin.weight, lin.bias, -1, -2, lin)


@pytest.mark.parametrize("kind,plus_one,has_bias", [("rms", False, False), ("gemma", True, False),
                                                    ("layer", False, True)])
def test_inspect_norm_finds_how_the_weight_applies(kind, plus_one, has_bias):
    norm = _norm(kind)
    before = norm.weight.clone()
    info = inspect_norm(norm)
    assert (info.plus_one, info.has_bias) == (plus_one, has_bias)
    assert torch.equal(norm.weight, before)  # probing leaves the norm as it was


@pytest.mark.parametrize("kind", ["rms", "gemma", "layer"])
@pytest.mark.parametrize("reader_bias", [True, False])
def test_fusing_a_norm_keeps_what_every_reader_sees(kind, reader_bias):
    norm = _norm(kind)
    readers = [nn.Linear(16, 8, bias=reader_bias).to(D), nn.Linear(16, 5, bias=True).to(D)]
    x = torch.randn(3, 16, dtype=D)
    ref = [lin(norm(x)) for lin in readers]
    kept = fuse_norm_into(inspect_norm(norm), [_target(r, f"r{i}") for i, r in enumerate(readers)], True)
    for lin, want in zip(readers, ref):
        assert _rel(lin(norm(x)), want) <= 1e-13
    neutral = 0.0 if kind == "gemma" else 1.0
    assert torch.all(norm.weight == neutral)
    # A LayerNorm bias moves into the readers' biases, or stays (divided by the scale) if one reader has none.
    assert kept == (kind == "layer" and not reader_bias)
    if kind == "layer" and reader_bias:
        assert torch.all(norm.bias == 0)


def test_bare_norm_names_read_as_modelopt_does():
    model = tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        readers = norm_readers(model, load_layout(MODELOPT))
    names = {n: sorted(t.name.rsplit(".", 1)[-1] for t in ts) for n, ts in readers.items()}
    assert names["model.layers.1.input_layernorm"] == ["k_proj", "q_proj", "v_proj"]
    assert names["model.layers.0.post_attention_layernorm"] == ["gate_proj", "up_proj"]
    assert names["model.norm"] == ["lm_head"]
    assert any("'input_layernorm' read as '*.input_layernorm'" in str(w.message)
               for w in caught if issubclass(w.category, LayoutNote))


@pytest.mark.parametrize("family,layout", [("gemma", None), ("opt", None), ("llama", str(MODELOPT)),
                                           ("mixtral", str(MODELOPT))])
def test_norm_fusion_alone_leaves_the_logits_unchanged(family, layout):
    """prepare_model fuses every norm (and centres OPT's writers) without any rotation yet: float64-exact."""
    model = tiny_model(family, dtype=D)
    float64_exact_norms(model)
    ref = logits_in_model_dtype(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutNote)
        plan = prepare_model(model, layout or layout_for(family))
    assert _rel(logits_in_model_dtype(model, IDS), ref) <= 1e-12
    assert plan.fused_norms
    for name in plan.fused_norms:
        w = model.get_submodule(name).weight
        assert torch.all(w == (0.0 if family == "gemma" else 1.0)), name
    assert plan.mean_preserving == (family == "opt")


@pytest.mark.parametrize("device", [None, "cpu"])  # "cuda" in test_gpu.py: a CPU model folded on the GPU
def test_fold_rotations_matches_dense_products(device):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=True).to(D)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    r_in = torch.linalg.qr(torch.randn(8, 8, dtype=D))[0]
    r_out = torch.linalg.qr(torch.randn(3, 3, dtype=D))[0]  # block-diagonal on the output axis (6 = 2 x 3)
    t = _target(lin, "lin")
    fold_rotations([Placement(t, "input", "a", ""), Placement(t, "output", "b", "")], {"a": r_in, "b": r_out}, True,
                   device=device)
    block = torch.block_diag(r_out, r_out)
    assert _rel(lin.weight.detach(), block.T @ w @ r_in) <= 1e-13
    assert _rel(lin.bias.detach(), b @ block) <= 1e-13
