"""Bad input to `spinlearn rotate`: a clear error (exit 2, message on stderr), and nothing written to OUT.

The same layout problems through the Python API raise LayoutError (a ValueError) and leave the model as it was.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import spinlearn
from spinlearn import artifacts
from spinlearn.cli import main
from spinlearn.layout import LayoutError, load_layout, shipped_layouts
from helpers import tiny_model

UNIVERSAL = load_layout("transformer_universal").to_dict()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(d, safe_serialization=True)
    return d


def write_layout(path: Path, edit) -> Path:
    """transformer_universal with ``edit(dict)`` applied, written as YAML."""
    d = copy.deepcopy(UNIVERSAL)
    edit(d)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(d)))
    return path


def _leftovers(parent: Path, out: Path) -> list[str]:
    return [p.name for p in parent.glob(f".{out.name}.tmp-*")]


def refused(capsys, argv: list[str], out: Path, *fragments: str) -> str:
    """Run the CLI, expect exit 2 with every fragment in stderr, OUT absent and no temp dir left behind."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "spinlearn rotate: error:" in err, err
    for f in fragments:
        assert f in err, (f, err)
    assert "Traceback" not in err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert _leftovers(out.parent, out) == []
    return err


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["rotate", "--model", str(model), "--output", str(out), *extra]


def _set(path: str, value):
    def edit(d):
        *head, last = path.split("/")
        node = d
        for k in head:
            node = node[k]
        node[last] = value

    return edit


# -------------------------------------------------------------------------------------------------- layouts


def test_unknown_layout_lists_the_shipped_ones(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    err = refused(capsys, _argv(model_dir, out, "--layout", "transformer_universl"), out, "'transformer_universl'")
    assert all(name in err for name in shipped_layouts())


def test_pattern_matching_nothing_names_it_and_close_modules(model_dir, tmp_path, capsys):
    layout = write_layout(tmp_path / "l.yaml", _set("rotation_config/*self_attn.qkv_proj", ["r1", None]))
    out = tmp_path / "out"
    refused(capsys, _argv(model_dir, out, "--layout", str(layout)), out,
            "'*self_attn.qkv_proj'", "matches no module", "self_attn.q_proj")


def test_norm_pattern_matching_nothing(model_dir, tmp_path, capsys):
    def edit(d):
        d["norm_fuse_config"]["decoder_layer_fuse"][0][0] = "*layers.*.input_norm"

    layout = write_layout(tmp_path / "l.yaml", edit)
    out = tmp_path / "out"
    refused(capsys, _argv(model_dir, out, "--layout", str(layout)), out,
            "'*layers.*.input_norm'", "matches no norm", "input_layernorm")


def test_missing_config_key(model_dir, tmp_path, capsys):
    layout = write_layout(tmp_path / "l.yaml", _set("rotation_matrices/r2/dim", "head_size"))
    out = tmp_path / "out"
    refused(capsys, _argv(model_dir, out, "--layout", str(layout)), out, "'head_size'", "missing", "r2")


def test_matrix_not_dividing_the_module(model_dir, tmp_path, capsys):
    # head_dim is 16; a 24 x 24 R2 cannot act per head on v_proj's output (32) or o_proj's input (64).
    layout = write_layout(tmp_path / "l.yaml", _set("rotation_matrices/r2/dim", 24))
    out = tmp_path / "out"
    err = refused(capsys, _argv(model_dir, out, "--layout", str(layout)), out, "'r2'", "size 24", "does not divide")
    assert "self_attn.v_proj" in err or "self_attn.o_proj" in err
    assert "(32, 64)" in err or "(64, 64)" in err  # the module's weight shape


def test_malformed_layout_yaml(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rotation_matrices: [\n  r1: {")
    out = tmp_path / "out"
    refused(capsys, _argv(model_dir, out, "--layout", str(bad)), out, "bad.yaml", "not valid YAML")


def test_layout_that_changes_the_outputs_is_refused_before_writing(model_dir, tmp_path, capsys):
    # lm_head left out of R1: only the before/after verification can notice.
    def edit(d):
        cfg = d["rotation_config"]
        key = next(k for k in cfg if "lm_head" in k)
        cfg[key.replace("|lm_head", "")] = cfg.pop(key)

    layout = write_layout(tmp_path / "l.yaml", edit)
    out = tmp_path / "out"
    refused(capsys, _argv(model_dir, out, "--layout", str(layout)), out, "changed the model's outputs")


# --------------------------------------------------------------------------------------------- model paths


def test_model_path_that_does_not_exist(tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, _argv(tmp_path / "nowhere", out), out, "nowhere", "does not exist")


def test_model_dir_without_weights(model_dir, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((model_dir / "config.json").read_text())
    out = tmp_path / "out"
    refused(capsys, _argv(src, out), out, "cannot load the model", "model.safetensors")


def test_invalid_config_json(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{not json")
    out = tmp_path / "out"
    refused(capsys, _argv(src, out), out, "config.json", "not valid JSON")


def test_remote_code_needs_the_flag(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "spinlearn_fancy_lm",
        "architectures": ["FancyLM"],
        "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig",
                     "AutoModelForCausalLM": "modeling_fancy.FancyLM"},
    }))
    out = tmp_path / "out"
    refused(capsys, _argv(src, out), out, "--trust-remote-code", "auto_map")


def test_bad_dtype(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, _argv(model_dir, out, "--dtype", "float8"), out, "'float8'", "bfloat16")


# ---------------------------------------------------------------------------------------------- output dir


def test_non_empty_output_needs_overwrite_and_overwrite_replaces(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(_argv(model_dir, out)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert _leftovers(tmp_path, out) == []

    assert main(_argv(model_dir, out, "--overwrite")) == 0
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and {"model.safetensors", "rotations.safetensors", "layout.yaml"} <= names
    assert _leftovers(tmp_path, out) == []


def test_empty_output_dir_is_fine(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert main(_argv(model_dir, out)) == 0
    assert (out / "model.safetensors").is_file()


def test_failure_while_writing_keeps_the_old_output(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    def broken(*args, **kwargs):
        raise ValueError("disk said no")

    monkeypatch.setattr(artifacts, "save_rotations", broken)
    assert main(_argv(model_dir, out, "--overwrite")) == 2
    assert "disk said no" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path, out) == []


# ---------------------------------------------------------------------------------------------- Python API


def _api_cases(tmp_path: Path):
    return {
        "unknown name": ("no_such_layout", "shipped layouts are"),
        "unmatched pattern": (write_layout(tmp_path / "a.yaml", _set("rotation_config/*mlp.wi", ["r1", None])),
                              "'*mlp.wi' matches no module"),
        "missing key": (write_layout(tmp_path / "b.yaml", _set("rotation_matrices/r2/dim", "head_size")),
                        "'head_size' is missing"),
        "not dividing": (write_layout(tmp_path / "c.yaml", _set("rotation_matrices/r2/dim", 24)),
                         "does not divide"),
    }


def test_python_api_raises_layout_errors_and_leaves_the_model_alone(tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for case, (layout, message) in _api_cases(tmp_path).items():
        with pytest.raises(LayoutError, match=message):
            spinlearn.rotate(model, str(layout))
        # The dict form of the same layout fails the same way.
        if str(layout).endswith(".yaml"):
            with pytest.raises(ValueError, match=message):
                spinlearn.rotate(model, OmegaConf.to_container(OmegaConf.load(layout)))
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), case
        assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    with pytest.raises(ValueError, match="mode='nope'"):
        spinlearn.rotate(model, mode="nope")


@pytest.mark.parametrize("edit,message", [
    (_set("rotation_matrices/r1/mode", "walsh"), "mode='walsh'"),
    (_set("rotation_config/*embed_tokens", [None, "r9"]), "names matrix 'r9'"),
    (_set("rotation_config/*embed_tokens", ["r1"]), "must be \\[input_matrix, output_matrix\\]"),
    (_set("rotations", {}), "unknown key"),
])
def test_malformed_layouts_are_refused_at_load(tmp_path, edit, message):
    with pytest.raises(LayoutError, match=message):
        load_layout(write_layout(tmp_path / "l.yaml", edit))
