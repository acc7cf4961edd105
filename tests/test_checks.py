"""checks.py: the job's inputs are validated before any data or weights are loaded, one line each."""

from __future__ import annotations

import pytest
from helpers import save_tiny_model_dir

from spinlearn.checks import check_job_inputs
from spinlearn.config import load_recipe
from spinlearn.layout import LayoutError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", "llama")


def recipe(model_dir, out, **overrides):
    base = {"model.path": model_dir, "data.train": "x.txt", "output_dir": out, "train.max_steps": 2,
            "data.seqlen": 32}
    return load_recipe(None, [f"{k}={v}" for k, v in {**base, **overrides}.items()])


def test_a_good_recipe_passes_and_returns_no_checkpoint(model_dir, tmp_path, monkeypatch):
    import spinlearn.loading as loading

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    assert check_job_inputs(recipe(model_dir, tmp_path / "out")) is None


@pytest.mark.parametrize("case", ["seqlen", "layout_dim", "output_file", "resume_missing", "not_empty", "export_group",
                                  "online_width"])
def test_each_bad_input_is_one_clear_error(case, model_dir, tmp_path):
    out = tmp_path / "out"
    extra: dict = {}
    if case == "seqlen":
        extra, error, match = {"data.seqlen": 4096}, ValueError, r"data.seqlen=4096 is beyond the model's context"
    elif case == "layout_dim":
        bad = tmp_path / "bad.yaml"
        bad.write_text('rotation_matrices: {r1: {dim: 0}}\nrotation_config: {"*embed_tokens": [null, r1]}\n')
        extra, error, match = {"rotation.layout": bad}, LayoutError, r"dim"
    elif case == "output_file":
        out.write_text("a file")
        error, match = FileExistsError, r"output_dir .* is a file"
    elif case == "resume_missing":
        extra = {"train.resume_from_checkpoint": tmp_path / "nowhere"}
        error, match = ValueError, r"train.resume_from_checkpoint: checkpoint .*nowhere.* does not exist"
    elif case == "export_group":  # the tiny Llama's MLP is 344 wide: a group of 32 does not divide it
        extra = {"export.schemes": "[w4a16]", "export.group_size": 32}
        error, match = ValueError, r"group size 32 does not divide the input width 344 of 'model.layers.0.mlp.down_proj'"
    elif case == "online_width":
        extra = {"rotation.online": "['*mlp.wo']"}
        error, match = ValueError, r"rotation.online: pattern '\*mlp.wo' matches no linear layer"
    else:
        out.mkdir()
        (out / "x").write_text("x")
        error, match = FileExistsError, r"overwrite_output_dir=true"
    with pytest.raises(error, match=match) as info:
        check_job_inputs(recipe(model_dir, out, **extra))
    assert "\n" not in str(info.value)


def test_an_export_scheme_vllm_cannot_serve_is_refused_by_the_recipe(model_dir, tmp_path):
    from spinlearn.config import RecipeError

    with pytest.raises(RecipeError, match=r"export.schemes: each scheme must be one of w4a16 \| w8a8 \| nvfp4 \| float"):
        recipe(model_dir, tmp_path / "out", **{"export.schemes": "[w4a4]"})
