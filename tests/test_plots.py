"""spinlearn.plots: training curve and outlier-profile PNGs, the activation profile's statistics, wandb results."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from spinlearn import plots
from spinlearn.rotation_plan import rotate
from tests.helpers import tiny_model

OUTLIER_CHANNELS = [3, 17, 40]
# Inputs that read the residual stream (through a fused norm): where planted embedding outliers show up.
RESIDUAL_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _history(steps: int = 6) -> list[dict]:
    hist = [{"loss": 3.0 - 0.1 * s, "learning_rate": 1.5 * (1 - s / steps), "rot_grad_norm": 0.5 / (s + 1),
             "rot_tangent_grad_norm": 0.1 / (s + 1), "max_orth_error": 1e-7 * (s + 1), "tokens_per_s": 100.0,
             "step": s, "epoch": 0.1 * s}
            for s in range(1, steps + 1)]
    return hist + [{"train_runtime": 1.0, "train_loss": 2.7, "step": steps}]  # the final summary entry


def _read_png(path) -> np.ndarray:
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 0
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def test_training_curve_png(tmp_path):
    path = plots.plot_training_curve(_history(), tmp_path / "sub" / "curve.png")
    img = _read_png(path)
    assert img.std() > 0  # not a blank canvas
    with pytest.raises(ValueError, match="no training-step entries"):
        plots.plot_training_curve([{"train_runtime": 1.0, "step": 3}], tmp_path / "x.png")


def test_training_curve_draws_both_gradient_norms_in_one_panel(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_training_curve(_history(), tmp_path / "curve.png")
    by_title = {ax.get_title(): ax for ax in figures[0].axes if ax.get_title()}
    assert set(by_title) == {title for title, _, _ in plots.CURVE_PANELS}
    grad = by_title["rotation gradient norm"]
    assert [line.get_label() for line in grad.get_lines()] == ["after clipping", "its tangent part"]
    assert list(grad.get_lines()[1].get_ydata()) == [0.1 / (s + 1) for s in range(1, 7)]
    assert grad.get_legend() is not None and by_title["training loss"].get_legend() is None
    # an older run's log without the tangent field still draws the clipped norm alone
    figures.clear()
    plots.plot_training_curve([{k: v for k, v in e.items() if k != "rot_tangent_grad_norm"} for e in _history()],
                              tmp_path / "old.png")
    grad = {ax.get_title(): ax for ax in figures[0].axes}["rotation gradient norm"]
    assert [line.get_label() for line in grad.get_lines()] == ["after clipping"]


def test_missing_matplotlib_logs_one_line_and_skips(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    monkeypatch.setattr(plots, "_hint_logged", False)
    with caplog.at_level(logging.WARNING, logger="spinlearn.plots"):
        assert plots.plot_training_curve(_history(), tmp_path / "a.png") is None
        profile = {"l": {"max_median_ratio": 2.0, "kurtosis": 3.0}}
        assert plots.plot_outlier_profile(profile, {}, tmp_path / "b.png") is None
    assert [r.message for r in caplog.records] == [plots.INSTALL_HINT]
    assert "spinlearn[plots]" in plots.INSTALL_HINT
    assert not list(tmp_path.iterdir())


def _outlier_model():
    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, OUTLIER_CHANNELS] *= 40.0
    return model


def _captured_inputs(model, names, blocks) -> dict[str, np.ndarray]:
    got: dict[str, list] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double().numpy())) for n in names]
    with torch.no_grad():
        for b in blocks:
            model(input_ids=b[None])
    for h in hooks:
        h.remove()
    return {n: np.concatenate(v) for n, v in got.items()}


def _numpy_stats(x: np.ndarray) -> tuple[float, float]:
    cmax = np.abs(x).max(0)
    ratio = cmax.max() / np.median(cmax)
    kurt = np.mean((x - x.mean()) ** 4) / x.var() ** 2
    return ratio, kurt


def test_activation_profile_matches_numpy_and_rotation_flattens_outliers(tmp_path):
    blocks = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    model = _outlier_model()
    check = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    before = plots.activation_profile(model, blocks)
    # every linear but lm_head (tied to the embeddings here), in model order
    assert list(before) == [n for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for n, x in _captured_inputs(model, check, blocks).items():
        ratio, kurt = _numpy_stats(x)
        assert before[n]["max_median_ratio"] == pytest.approx(ratio, rel=1e-9)
        assert before[n]["kurtosis"] == pytest.approx(kurt, rel=1e-6)
        assert before[n]["channels"] == x.shape[1] and before[n]["values"] == x.size

    rotate(model, "transformer_universal", mode="hadamard", seed=0)
    after = plots.activation_profile(model, blocks)
    for n, x in _captured_inputs(model, check, blocks).items():
        assert after[n]["max_median_ratio"] == pytest.approx(_numpy_stats(x)[0], rel=1e-9)
    readers = [n for n in before if n.rsplit(".", 1)[-1] in RESIDUAL_READERS]
    assert len(readers) == 2 * len(RESIDUAL_READERS)
    for n in readers:
        assert before[n]["max_median_ratio"] > 8.0, (n, before[n])  # the planted channels stick out...
        assert after[n]["max_median_ratio"] < before[n]["max_median_ratio"] / 3, (n, before[n], after[n])
        assert after[n]["kurtosis"] < before[n]["kurtosis"], n  # ...and the rotation spreads them out

    path = plots.plot_outlier_profile(before, after, tmp_path / "outliers.png")
    _read_png(path)


def test_activation_profile_moe_experts_and_module_filter():
    model = tiny_model("mixtral", seed=0)
    names = list(plots.profiled_modules(model))
    assert "model.layers.0.mlp.experts" in names  # the fused 3-D experts: their module's input
    assert "lm_head" not in names
    blocks = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    prof = plots.activation_profile(model, blocks, modules=["*.mlp.experts"])
    assert sorted(prof) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(p["channels"] == 64 and p["values"] == 16 * 64 for p in prof.values())
    with pytest.raises(ValueError, match="no quantized linear input matches"):
        plots.activation_profile(model, blocks, modules=["*nothing*"])


@pytest.mark.parametrize("family", ["mixtral", "nemotron_h"])
def test_profiled_modules_are_the_same_on_a_wrapped_model_and_skip_convolutions(family):
    """The names only (a wrapped or sharded model's weights are computed, not read): the same with the rotations and
    quantizers attached (the experts' parametrized 3-D tensors included), and no Conv1d (Nemotron-H's mixers)."""
    from spinlearn.fakequant import rotations_attached
    from spinlearn.quant import QuantSettings
    from spinlearn.rotation_plan import make_matrices, prepare_model
    from tests.helpers import layout_for

    model = tiny_model(family, seed=0)
    plan = prepare_model(model, layout_for(family))
    plain = set(plots.profiled_modules(model))
    assert not any("conv" in n for n in plain) and "lm_head" not in plain
    with rotations_attached(model, plan, make_matrices(plan, mode="hadamard", seed=0),
                            quant=QuantSettings.from_flags(w_bits=4, a_bits=4, kv_bits=4)):
        assert set(plots.profiled_modules(model)) == plain


def test_log_to_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = {"rows": {"float": 66.1, "W4A4KV4 RTN, learned rotation": 68.2, "W4A16 GPTQ, learned rotation": 66.4},
               "ppl_gptq": 66.4, "steps": 7, "train_tokens_per_s": 1234.5, "model": "m"}
    img = plots.plot_training_curve(_history(), tmp_path / "curve.png")
    assert plots.log_to_wandb(metrics, {"training_curve": img}) is False  # no run yet: a no-op
    run = wandb.init(dir=str(tmp_path), project="spinlearn-test", mode="offline")
    try:
        assert plots.log_to_wandb(metrics, {"training_curve": img}) is True
        s = run.summary
        assert s["results/float"] == 66.1
        assert s["results/W4A16 GPTQ, learned rotation"] == 66.4
        assert s["results/ppl_gptq"] == 66.4 and s["results/steps"] == 7
        assert s["results/train_tokens_per_s"] == 1234.5
        assert "results/model" not in s.keys()  # only the result keys
    finally:
        run.finish()
    assert wandb.run is None
    assert plots.log_to_wandb(metrics, {"training_curve": img}) is False
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_activation_profile_of_the_training_model_has_quantizers_off():
    """On the wrapped training model (rotations attached, W4A4KV4 quantizers on) the profile is the folded
    model's: the inputs are profiled unquantized, as the rotation leaves them."""
    from spinlearn.fakequant import rotations_attached
    from spinlearn.quant import QuantSettings
    from spinlearn.rotation_plan import make_matrices, prepare_model

    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model = _outlier_model()
    plan = prepare_model(model, "transformer_universal")
    with rotations_attached(model, plan, make_matrices(plan, mode="hadamard", seed=0),
                            quant=QuantSettings.from_flags(w_bits=4, a_bits=4, kv_bits=4)):
        wrapped = plots.activation_profile(model, blocks)
    folded = _outlier_model()
    rotate(folded, "transformer_universal", mode="hadamard", seed=0)
    reference = plots.activation_profile(folded, blocks)
    assert list(wrapped) == list(reference)
    for n in reference:
        assert wrapped[n]["max_median_ratio"] == pytest.approx(reference[n]["max_median_ratio"], rel=1e-4), n
        assert wrapped[n]["kurtosis"] == pytest.approx(reference[n]["kurtosis"], rel=1e-3), n
