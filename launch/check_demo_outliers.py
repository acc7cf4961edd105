"""Does the demo model show the problem rotations solve? Activation outliers, and W4A4KV4 RTN with and without R1.

    python launch/check_demo_outliers.py                     # shipped model, test split, CPU
    python launch/check_demo_outliers.py --model /tmp/demo_model --device cuda --max-windows 0

A quick, self-contained simulation (the library's fake-quant wrappers and `spinlearn rotate` replace it):
  * weights: 4-bit symmetric per-output-channel round-to-nearest (no clipping search, no GPTQ);
  * activations: every linear input of the decoder, 4-bit asymmetric per token; lm_head stays in float;
  * KV cache: k_proj / v_proj outputs, 4-bit asymmetric per token and head (K before RoPE: an approximation);
  * R1: RMSNorm scales folded into the following linears, then a random Hadamard H (Sylvester x random signs)
    rotates the residual stream: embed <- embed H, readers W <- W H, writers W <- H^T W;
  * R1+R4: also an online rotation Q of the down_proj input (random orthogonal; x <- x Q, W_down <- W_down Q).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spinlearn.demo import demo_data_file, demo_model_dir  # noqa: E402
from spinlearn.demo.eval import perplexity, token_windows  # noqa: E402


def quantize_asym(x: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """Round-to-nearest asymmetric fake quantization over the last dim (or groups of it)."""
    shape = x.shape
    if group is not None:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale
    return q.reshape(shape)


def quantize_sym(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (row) round-to-nearest fake quantization of a weight."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


class QuantLinear(nn.Module):
    """y = Q_a(x R) Q_w(W)^T, then optional per-head fake quantization of the output (KV cache)."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, kv_bits: int | None = None,
                 head_dim: int | None = None, online_rot: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(quantize_sym(linear.weight.data, w_bits), requires_grad=False)
        self.bias = linear.bias
        self.a_bits, self.kv_bits, self.head_dim = a_bits, kv_bits, head_dim
        self.online_rot = online_rot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_rot is not None:
            x = x @ self.online_rot.to(x.dtype)
        y = nn.functional.linear(quantize_asym(x, self.a_bits), self.weight, self.bias)
        if self.kv_bits is not None:
            y = quantize_asym(y, self.kv_bits, group=self.head_dim)
        return y


def random_hadamard(n: int, gen: torch.Generator) -> torch.Tensor:
    """Sylvester Hadamard of order n (a power of two) times random signs, normalised to be orthogonal."""
    if n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return (h * signs) / math.sqrt(n)


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def fold_and_rotate(model, r1: torch.Tensor) -> None:
    """Fold RMSNorm scales into the readers and rotate the residual stream by r1 (in float64)."""
    def fold(norm, readers):
        for lin in readers:
            lin.weight.data = (lin.weight.double() * norm.weight.double()).to(lin.weight.dtype)
        norm.weight.data.fill_(1.0)

    def read(lin):
        lin.weight.data = (lin.weight.double() @ r1).to(lin.weight.dtype)

    def write(lin):
        lin.weight.data = (r1.T @ lin.weight.double()).to(lin.weight.dtype)

    m = model.model
    for layer in m.layers:
        at, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [at.q_proj, at.k_proj, at.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            read(lin)
        write(at.o_proj)
        write(mlp.down_proj)
    fold(m.norm, [model.lm_head])
    read(model.lm_head)
    m.embed_tokens.weight.data = (m.embed_tokens.weight.double() @ r1).to(m.embed_tokens.weight.dtype)


def quantize_model(model, w_bits: int, a_bits: int, kv_bits: int, r4: torch.Tensor | None = None) -> None:
    """Swap every decoder linear for a QuantLinear (lm_head stays in float, as SpinQuant does)."""
    head_dim = model.config.head_dim
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "o_proj"):
            setattr(at, name, QuantLinear(getattr(at, name), w_bits, a_bits))
        for name in ("k_proj", "v_proj"):
            setattr(at, name, QuantLinear(getattr(at, name), w_bits, a_bits, kv_bits, head_dim))
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, QuantLinear(getattr(mlp, name), w_bits, a_bits))
        down = mlp.down_proj
        if r4 is not None:
            down.weight.data = (down.weight.double() @ r4).to(down.weight.dtype)
        mlp.down_proj = QuantLinear(down, w_bits, a_bits, online_rot=None if r4 is None else r4.float())


@torch.no_grad()
def activation_stats(model, windows: torch.Tensor) -> list[dict]:
    """Per layer: residual-stream output and down_proj input outlier statistics.

    channel ratio = max over channels of (max |x| over tokens) / its median over channels;
    kurtosis = E[(x - mean)^4] / var^2 over all entries (3 for a Gaussian).
    """
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda mod, inp, out, i=i: captured.__setitem__(f"resid{i}", (out[0] if isinstance(out, tuple) else out).detach())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, inp, i=i: captured.__setitem__(f"down{i}", inp[0].detach())))
    device = next(model.parameters()).device
    model(input_ids=windows.to(device))
    for h in hooks:
        h.remove()

    def stats(x: torch.Tensor) -> dict:
        x = x.double().reshape(-1, x.shape[-1])[1:]  # drop the first (BOS) position of the first window
        chan = x.abs().amax(0)
        c = x - x.mean()
        return {"max_abs": round(chan.max().item(), 1),
                "channel_ratio": round((chan.max() / chan.median()).item(), 1),
                "kurtosis": round(((c**4).mean() / (c**2).mean() ** 2).item(), 1),
                "top_channels": chan.topk(3).indices.tolist()}

    return [{"layer": i, "resid": stats(captured[f"resid{i}"]), "down_in": stats(captured[f"down{i}"])}
            for i in range(len(model.model.layers))]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--split", default="test")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=64, help="0 = the whole split")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, nargs=3, default=(4, 4, 4), metavar=("W", "A", "KV"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or demo_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    text = demo_data_file(args.split).read_text(encoding="utf-8")
    windows = token_windows(tokenizer, text, args.seqlen, args.max_windows or None)
    w, a, kv = args.bits
    gen = torch.Generator().manual_seed(args.seed)
    r1 = random_hadamard(model.config.hidden_size, gen).to(args.device)
    r4 = random_orthogonal(model.config.intermediate_size, gen).to(args.device)

    result = {"model": str(path), "split": args.split, "tokens": windows.numel(), "bits": [w, a, kv],
              "stats": activation_stats(model, windows[:8])}
    ppl = {"float": perplexity(model, windows)}
    rotated = copy.deepcopy(model)
    fold_and_rotate(rotated, r1.double())
    ppl["float_rotated"] = perplexity(rotated, windows)  # must equal float: the rotation is exact
    for name, base, rot4 in (("rtn", model, None), ("rtn_r1", rotated, None), ("rtn_r1_r4", rotated, r4.double())):
        q = copy.deepcopy(base)
        quantize_model(q, w, a, kv, rot4)
        ppl[name] = perplexity(q, windows)
    result["ppl"] = {k: round(v, 2) for k, v in ppl.items()}

    for row in result["stats"]:
        r, d = row["resid"], row["down_in"]
        print(f"layer {row['layer']}: residual max {r['max_abs']:8.1f} ratio {r['channel_ratio']:6.1f} "
              f"kurt {r['kurtosis']:7.1f} top {r['top_channels']} | down_proj in max {d['max_abs']:7.1f} "
              f"ratio {d['channel_ratio']:6.1f} kurt {d['kurtosis']:7.1f}")
    print(f"W{w}A{a}KV{kv} perplexity on {args.split} ({windows.numel()} tokens, seqlen {args.seqlen}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
