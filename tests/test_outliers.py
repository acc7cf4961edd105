"""On a model with planted outlier channels, a Hadamard R1 spreads them out: the residual stream's kurtosis and
max/median channel ratio drop, while the logits stay the same and the stream is exactly the old one times R1."""

from __future__ import annotations

import pytest
import torch

import spinlearn
from helpers import float64_exact_norms, launch_script, logits_in_model_dtype, tiny_model

OUTLIER_CHANNELS = [5, 17, 40]
SCALE = 40.0


def outlier_model():
    """Tiny Llama (float64) whose residual stream has a few huge channels, as in real LLMs."""
    model = tiny_model("llama", dtype=torch.float64)
    float64_exact_norms(model)
    c = OUTLIER_CHANNELS
    with torch.no_grad():
        model.model.embed_tokens.weight[:, c] *= SCALE
        for layer in model.model.layers:  # every writer of the stream boosts the same channels
            layer.self_attn.o_proj.weight[c, :] *= SCALE
            layer.mlp.down_proj.weight[c, :] *= SCALE
    return model


@torch.no_grad()
def residual_stream(model, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream entering every decoder layer and the final norm: [points, tokens, hidden]."""
    captured: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    modules = [*model.model.layers, model.model.norm]
    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(captured) == len(modules)
    return torch.stack([x.reshape(-1, x.shape[-1]) for x in captured])


def channel_ratio(x: torch.Tensor) -> float:
    """max over channels of (max |x| over tokens), divided by the median channel's max."""
    per_channel = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
    return (per_channel.max() / per_channel.median()).item()


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis E[(x - mu)^4] / Var^2 of all the values (3 for a Gaussian)."""
    v = x.flatten().double()
    d = v - v.mean()
    return ((d**4).mean() / (d**2).mean() ** 2).item()


def test_reference_statistics():
    # The two statistics against values known in closed form.
    x = torch.ones(10, 8)
    x[:, 3] = 5.0
    assert channel_ratio(x) == pytest.approx(5.0)
    two_point = torch.tensor([-1.0, 1.0] * 50)
    assert kurtosis(two_point) == pytest.approx(1.0)
    gauss = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert kurtosis(gauss) == pytest.approx(3.0, abs=0.05)


def test_hadamard_rotation_removes_planted_outliers():
    model = outlier_model()
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    before = residual_stream(model, ids)
    logits_before = logits_in_model_dtype(model, ids)
    ratio_before, kurt_before = channel_ratio(before), kurtosis(before)
    assert ratio_before > 10 and kurt_before > 10, (ratio_before, kurt_before)  # the planting worked

    _, matrices = spinlearn.rotate(model, "transformer_universal", mode="hadamard", seed=0)
    after = residual_stream(model, ids)
    ratio_after, kurt_after = channel_ratio(after), kurtosis(after)

    # The rotated stream is exactly the old stream times R1: same information, spread over all channels.
    torch.testing.assert_close(after, before @ matrices["r1"], rtol=0, atol=1e-9 * before.abs().max().item())
    logits_after = logits_in_model_dtype(model, ids)
    assert ((logits_after - logits_before).abs().max() / logits_before.abs().max()).item() <= 1e-9

    assert ratio_after < ratio_before / 3, (ratio_before, ratio_after)
    assert kurt_after < kurt_before / 3, (kurt_before, kurt_after)
    assert kurt_after < 6  # close to Gaussian, not merely "less heavy-tailed"


def _per_token_int4_error(x: torch.Tensor) -> float:
    """Textbook per-token asymmetric min-max int4 (float64): mean over tokens of ||q(x) - x||^2 / ||x||^2."""
    x = x.double()
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    q = (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale
    return ((q - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()


def test_quant_errors_behind_a_hadamard():
    # The diagnostic behind the README's "no room for another rotation at down_proj's input": the activation
    # quantizer's error on planted outlier channels, as is and behind a Hadamard, against iid Gaussian data.
    from spinlearn.quant import QuantSettings

    errors = launch_script("check_demo_outliers").quant_errors
    spec = QuantSettings.from_flags(a_bits=4).a
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g)
    x[:, [3, 77]] *= 40.0  # two outlier channels
    e = errors(x, spec)
    assert e["as_is"] == pytest.approx(_per_token_int4_error(x), abs=1e-4)  # the quantizer is the textbook one
    assert e["gaussian"] == pytest.approx(_per_token_int4_error(torch.randn(2048, 256, generator=g)), rel=0.03)
    assert e["as_is"] > 5 * e["hadamard"], e  # the Hadamard spreads the outliers ...
    assert e["hadamard"] < 1.05 * e["gaussian"], e  # ... at or below the Gaussian level (here +-a+-b patterns)
    assert e["random_orthogonal"] == pytest.approx(e["gaussian"], rel=0.15), e  # a random one: Gaussian-like
    plain = errors(torch.randn(2048, 256, generator=g), spec)  # no outliers: a rotation changes nothing much
    assert plain["as_is"] == pytest.approx(plain["hadamard"], rel=0.1), plain
