"""Float invariance of `spinlearn.rotate` on every supported architecture, mode and dtype, and after a
save/reload with vanilla AutoModelForCausalLM."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import spinlearn
from spinlearn.layout import LayoutError
from spinlearn.rotations import orthogonality_error
from helpers import FAMILIES, float64_exact_norms, layout_for, logits_in_model_dtype, tiny_model

MODES = ["hadamard", "base_hadamard", "orthogonal"]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_float64_invariance(family, mode):
    model = tiny_model(family, dtype=torch.float64)
    float64_exact_norms(model)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = logits_in_model_dtype(model, ids)
    _, matrices = spinlearn.rotate(model, layout_for(family), mode=mode, seed=3)
    out = logits_in_model_dtype(model, ids)
    assert _rel(out, ref) <= 1e-9
    assert matrices, "no matrix applied"
    for name, m in matrices.items():
        assert m.dtype == torch.float64
        assert orthogonality_error(m) <= 1e-10, name


def test_rotation_changes_weights_and_r2_is_per_layer():
    model = tiny_model("llama", dtype=torch.float64)
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    _, matrices = spinlearn.rotate(model, "transformer_universal", seed=1)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert set(matrices) == {"r1", "r2.model.layers.0", "r2.model.layers.1"}
    assert matrices["r1"].shape == (64, 64) and matrices["r2.model.layers.0"].shape == (16, 16)
    assert not torch.equal(matrices["r2.model.layers.0"], matrices["r2.model.layers.1"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "opt", "nemotron_h", "gemma", "phi3", "qwen3", "mistral"])
def test_float32_invariance_after_save_and_reload(family, tmp_path):
    model = tiny_model(family, dtype=torch.float32)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = logits_in_model_dtype(model, ids)
    spinlearn.rotate(model, layout_for(family), seed=0)
    assert _rel(logits_in_model_dtype(model, ids), ref) <= 1e-4
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _rel(logits_in_model_dtype(reloaded, ids), ref) <= 1e-4
    if family in ("llama", "opt"):  # tied in the original config: must come back untied
        assert not reloaded.config.tie_word_embeddings
        emb, head = reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight
        assert emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head)


def test_tied_embeddings_are_untied_by_a_real_clone():
    model = tiny_model("llama")
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    spinlearn.rotate(model, "transformer_universal")
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert model.config.tie_word_embeddings is False


def test_norms_become_weightless_and_gemma_keeps_plus_one_form():
    model = tiny_model("gemma", dtype=torch.float64)
    spinlearn.rotate(model, "transformer_universal")
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 0), name  # Gemma's (1 + w): the neutral weight is 0


def test_qwen3_head_norms_untouched():
    model = tiny_model("qwen3", dtype=torch.float64)
    before = model.model.layers[0].self_attn.q_norm.weight.clone()
    spinlearn.rotate(model, "transformer_universal")
    assert torch.equal(model.model.layers[0].self_attn.q_norm.weight, before)


def test_seeds_and_modes_behave_as_named():
    def mats(mode, seed):
        return spinlearn.rotate(tiny_model("mistral", dtype=torch.float64), "transformer_universal", mode=mode, seed=seed)[1]

    base_a, base_b = mats("base_hadamard", 0), mats("base_hadamard", 5)
    assert all(torch.equal(base_a[k], base_b[k]) for k in base_a)  # deterministic whatever the seed
    h0, h0b, h1 = mats("hadamard", 0), mats("hadamard", 0), mats("hadamard", 1)
    assert all(torch.equal(h0[k], h0b[k]) for k in h0)
    assert not torch.equal(h0["r1"], h1["r1"])
    n = h0["r1"].shape[0]
    for m in (h0["r1"], base_a["r1"]):  # Hadamard: all entries +-1/sqrt(n)
        assert torch.allclose(m.abs(), torch.full_like(m, n**-0.5))
    orth = mats("orthogonal", 0)["r1"]
    assert orthogonality_error(orth) <= 1e-10
    assert not torch.allclose(orth.abs(), torch.full_like(orth, n**-0.5))


def test_gemma2_post_norms_are_refused():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(LayoutError, match="Gemma2RMSNorm.*does not fuse it"):
        spinlearn.rotate(model, "transformer_universal")


def test_verification_catches_a_wrong_layout():
    # Leave lm_head out of R1: the residual stream is rotated but its last reader is not. Verification must
    # refuse instead of returning a silently broken model.
    bad = spinlearn.layout.load_layout("transformer_universal").to_dict()
    cfg = bad["rotation_config"]
    key = next(k for k in cfg if "lm_head" in k)
    cfg[key.replace("|lm_head", "")] = cfg.pop(key)
    model = tiny_model("mistral")
    with pytest.raises(LayoutError, match="changed the model's outputs"):
        spinlearn.rotate(model, bad)
