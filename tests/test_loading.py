"""loading.py: every cheap check of a model directory (config.json, truncated weights, context length), also as
the one-line errors (exit 2) of `spinlearn rotate`, `eval` and `train`, before anything heavy is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import tiny_config, tiny_model, tiny_tokenizer
from spinlearn.cli import main
from spinlearn.loading import (
    check_model_config,
    check_model_dir,
    check_safetensors,
    check_seqlen,
    device_map_summary,
    load_causal_lm,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loading") / "llama"
    tiny_model("llama").save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save_pretrained(d)
    return d


def copy_with(model_dir: Path, dest: Path, config_text: str | None = None, truncate: bool = False) -> Path:
    shutil.copytree(model_dir, dest)
    if config_text is not None:
        (dest / "config.json").write_text(config_text)
    if truncate:
        weights = dest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dest


BAD_CONFIGS = {
    "not_json": ("{\"model_type\": \"llama\",", r"config.json' is not valid JSON"),
    "not_object": ("[1, 2]", r"config.json' must hold a JSON object with a model_type, got a list"),
    "no_model_type": ("{\"hidden_size\": 64}", r"config.json' has no model_type"),
    "unknown_model_type": ("{\"model_type\": \"lama\"}",
                           r"model_type 'lama' is not known to transformers .*did you mean 'llama'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_json_is_named(case, model_dir, tmp_path):
    text, pattern = BAD_CONFIGS[case]
    bad = copy_with(model_dir, tmp_path / case, config_text=text)
    for check in (check_model_config, check_model_dir, load_tokenizer, load_causal_lm):
        with pytest.raises(ValueError, match=pattern):
            check(bad)


def test_auto_map_config_is_accepted_and_good_config_returned(model_dir, tmp_path):
    assert check_model_dir(model_dir)["model_type"] == "llama"
    custom = copy_with(model_dir, tmp_path / "custom",
                       config_text=json.dumps({"model_type": "my_arch", "auto_map": {"AutoConfig": "x.Cfg"}}))
    assert check_model_config(custom)["model_type"] == "my_arch"
    with pytest.raises(ValueError, match="trust-remote-code"):
        load_causal_lm(custom)


def test_truncated_weights_are_named_before_loading(model_dir, tmp_path):
    bad = copy_with(model_dir, tmp_path / "trunc", truncate=True)
    pattern = r"corrupt or truncated file '.*trunc/model.safetensors'"
    for check in (check_safetensors, check_model_dir, load_causal_lm):
        with pytest.raises(ValueError, match=pattern):
            check(bad)


def test_seqlen_beyond_the_context_is_refused_with_the_numbers():
    cfg = tiny_config("llama")  # max_position_embeddings 128
    check_seqlen(cfg, 128, "data.seqlen")
    check_seqlen(cfg.to_dict(), None, "data.eval_seqlen")
    for config in (cfg, cfg.to_dict(), {"text_config": {"max_position_embeddings": 128}}, {"n_positions": 128}):
        with pytest.raises(ValueError, match=r"data.seqlen=129 is beyond the model's context "
                                             r"\((max_position_embeddings|n_positions) = 128\).*data.seqlen <= 128"):
            check_seqlen(config, 129, "data.seqlen")
    check_seqlen({"hidden_size": 8}, 10**6, "data.seqlen")  # no known context key: nothing to check


# ------------------------------------------------------------------------------------------ through the CLI
def refused(capsys, argv: list[str], *patterns: str) -> str:
    import re

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    for pattern in patterns:
        assert re.search(pattern, err), err
    return err


def test_rotate_refuses_a_truncated_model(model_dir, tmp_path, capsys):
    bad = copy_with(model_dir, tmp_path / "trunc", truncate=True)
    refused(capsys, ["rotate", "--model", bad, "--output", tmp_path / "out"], r"truncated file '.*model.safetensors'")
    assert not (tmp_path / "out").exists()


def test_eval_refuses_seqlen_beyond_the_context(model_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("the cat sat\n")
    refused(capsys, ["eval", "--model", model_dir, "--data", tmp_path / "t.txt", "--seqlen", 4096],
            r"--seqlen=4096 is beyond the model's context \(max_position_embeddings = 128\)")


@pytest.mark.parametrize("case", ["bad_config", "truncated"])
def test_train_refuses_a_bad_model_dir_before_the_tokenizer(case, model_dir, tmp_path, capsys):
    bad = copy_with(model_dir, tmp_path / case, config_text="{oops" if case == "bad_config" else None,
                    truncate=case == "truncated")
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n" * 50)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "model": {"path": str(bad)}, "data": {"train": str(tmp_path / "t.txt"), "seqlen": 8, "nsamples": 2},
        "train": {"max_steps": 1, "report_to": ["none"]}, "output_dir": str(tmp_path / "out"),
    })))
    pattern = r"config.json' is not valid JSON" if case == "bad_config" else r"truncated file '.*model.safetensors'"
    refused(capsys, ["train", "--config", recipe], pattern)
    assert not (tmp_path / "out").exists()


def test_train_refuses_seqlen_beyond_the_context_before_loading_data(tmp_path, capsys):
    demo = Path(__file__).resolve().parents[1] / "spinlearn" / "demo" / "model"  # max_position_embeddings 2048
    recipe = tmp_path / "r.yaml"
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "model": {"path": str(demo)}, "data": {"train": str(tmp_path / "never-read.txt"), "seqlen": 256,
                                               "eval_seqlen": 4096},
        "train": {"max_steps": 1, "report_to": ["none"]}, "output_dir": str(tmp_path / "out"),
    })))
    refused(capsys, ["train", "--config", recipe],
            r"data.eval_seqlen=4096 is beyond the model's context \(max_position_embeddings = 2048\)")
    assert not (tmp_path / "out").exists()


def test_device_map_summary_counts_weights_per_device_and_refuses_offloaded_ones():
    model = tiny_model("llama")
    n = len(list(model.parameters()))
    assert device_map_summary(model) == {"cpu": n}
    model.model.layers[1].to("meta")  # what accelerate leaves in place of weights it offloaded to the CPU or disk
    offloaded = len(list(model.model.layers[1].parameters()))
    with pytest.raises(ValueError, match=rf"model.device_map: the model does not fit the visible GPUs; accelerate "
                                         rf"offloaded {offloaded} weights .*use more GPUs, FSDP"):
        device_map_summary(model)
