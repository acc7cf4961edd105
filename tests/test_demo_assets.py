"""The bundled demo model, tokenizer and text splits load offline and still perform as measured."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spinlearn.demo import SPLITS, demo_data_file, demo_model_dir
from spinlearn.data import eval_windows, tokenize_concat
from spinlearn.evaluate import perplexity

# Float perplexity of the shipped weights on the first 4 windows of 256 tokens of the test split. The bound leaves 10% for platform/BLAS differences.
MEASURED_TEST_PPL_4x256 = 53.07  # CPU, fp32, torch 2.13, transformers 5.23
MAX_WEIGHTS_BYTES = 25_000_000


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir())


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model_dir(), trust_remote_code=False, dtype=torch.float32).eval()


def test_config_is_small_llama_with_gqa_and_non_power_of_two_mlp():
    cfg = json.loads((demo_model_dir() / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    inter = cfg["intermediate_size"]
    assert inter & (inter - 1) != 0, f"MLP width {inter} must not be a power of two"
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert head_dim & (head_dim - 1) == 0
    assert cfg["tie_word_embeddings"] is False
    assert cfg["hidden_act"] == "silu"


def test_weights_file_is_small_safetensors():
    files = sorted(p.name for p in demo_model_dir().glob("*.safetensors"))
    assert files == ["model.safetensors"]
    size = (demo_model_dir() / "model.safetensors").stat().st_size
    assert size <= MAX_WEIGHTS_BYTES, f"weights are {size} bytes"


def test_model_and_tokenizer_load_offline(model, tokenizer):
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("To be, or not to be")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # the tokenizer prepends BOS, as Llama's does
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token_id != tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "To be, or not to be"  # byte-level BPE round trip


@pytest.mark.parametrize("split", SPLITS)
def test_splits_exist_and_are_english_text(split, tokenizer):
    text = demo_data_file(split).read_text(encoding="utf-8")
    assert text.isascii()
    tokens = len(tokenizer(text, verbose=False)["input_ids"])
    assert tokens >= (1_000_000 if split == "train" else 50_000), f"{split} has only {tokens} tokens"
    # Bytes per token is a cheap check that the tokenizer fits the text (it was trained on the train split).
    assert 2.5 < len(text) / tokens < 5.0


def test_splits_do_not_overlap():
    texts = {s: demo_data_file(s).read_text(encoding="utf-8") for s in SPLITS}
    for held_out in ("validation", "test"):
        # Long lines (over 60 characters) of held-out text must not occur in train.
        lines = {line for line in texts[held_out].splitlines() if len(line) > 60}
        leaked = [line for line in lines if line in texts["train"]]
        assert len(leaked) < 0.02 * len(lines), f"{held_out} lines found in train: {leaked[:3]}"


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="validation"):
        demo_data_file("dev")


def test_float_perplexity_regression(model, tokenizer):
    text = demo_data_file("test").read_text(encoding="utf-8")
    windows = eval_windows(tokenize_concat([text], tokenizer), 256)[:4]
    nll = math.log(perplexity(model, windows, batch_size=4, progress=False))
    # Reference: the same NLL from logits computed by a straightforward float64 log-softmax.
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, windows[:, 1:, None])
    assert nll == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert math.exp(nll) < 1.1 * MEASURED_TEST_PPL_4x256


# Float perplexity of the second model on the same 4 x 256 test windows (CPU, fp32, torch 2.13).
MEASURED_MODEL_B_TEST_PPL_4x256 = 55.43


def test_second_model_differs_in_shape_and_still_performs(tokenizer):
    from transformers import AutoModelForCausalLM

    a = json.loads((demo_model_dir() / "config.json").read_text())
    b = json.loads((demo_model_dir("model_b") / "config.json").read_text())
    assert b["model_type"] == "llama"
    assert b["hidden_size"] != a["hidden_size"] and b["num_hidden_layers"] != a["num_hidden_layers"]
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir("model_b"), dtype=torch.float32).eval()
    ids = tokenize_concat([demo_data_file("test").read_text()], tokenizer)
    ppl = perplexity(model, eval_windows(ids, 256)[:4], progress=False)
    assert abs(ppl - MEASURED_MODEL_B_TEST_PPL_4x256) <= 0.1 * MEASURED_MODEL_B_TEST_PPL_4x256


def test_unknown_demo_model_is_refused():
    with pytest.raises(ValueError, match="model_b"):
        demo_model_dir("model_c")
