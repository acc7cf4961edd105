"""Does the demo model show the problem rotations solve? Activation outliers per layer, and W4A4KV4 RTN
perplexity without rotation, with random Hadamard R1+R2, and with R1+R2 plus the online R3/R4 Hadamards.

Per layer it also prints the activation quantizer's relative error (the A bits, per token, no clip) at the inputs of
q_proj (= k/v_proj's), o_proj, gate_proj (= up_proj's) and down_proj: as they are, behind a Hadamard (an online one,
as R4 at down_proj), behind a random orthogonal matrix, and on iid Gaussian data of the same shape, the level a
rotation reaches on data without structure. A Hadamard at or below the Gaussian level leaves no room for another
rotation there.

    python launch/check_demo_outliers.py                     # shipped model, test split, CPU
    python launch/check_demo_outliers.py --model /tmp/demo_model --device cuda --max-windows 0

The perplexities come from `spinlearn.evaluate.evaluate_setting` (the same rotation and fake-quant code as
`spinlearn eval` and the training loss); only the outlier statistics are computed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spinlearn.demo import demo_data_file, demo_model_dir  # noqa: E402
from spinlearn.data import eval_windows, tokenize_concat  # noqa: E402


def quant_errors(x: torch.Tensor, spec, seed: int = 0) -> dict:
    """Relative error ||q(x) - x||^2 / ||x||^2 per token, averaged, of the activation quantizer ``spec`` on x
    [tokens, n] as it is, times a Hadamard, times a random orthogonal matrix (seeded), and on iid Gaussian data."""
    from spinlearn.hadamard import fast_hadamard_transform
    from spinlearn.quant import quantize_activation

    x = x.float()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(x.shape[-1], x.shape[-1], generator=g, dtype=torch.float64))

    def err(v: torch.Tensor) -> float:
        return round(((quantize_activation(v, spec) - v).pow(2).sum(-1) / v.pow(2).sum(-1)).mean().item(), 4)

    return {"as_is": err(x), "hadamard": err(fast_hadamard_transform(x)), "random_orthogonal": err(x @ q.to(x)),
            "gaussian": err(torch.randn(x.shape, generator=g))}


# Linear inputs whose quantization errors are reported: stats key -> module path inside a decoder layer
ERROR_INPUTS = {"q_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "gate_in": "mlp.gate_proj",
                "down_in": "mlp.down_proj"}


def activation_stats(model, windows: torch.Tensor, a_spec=None) -> list[dict]:
    """Per layer: residual-stream output and down_proj input outlier statistics (and, given the activation
    quantizer ``a_spec``, its relative errors at the ``ERROR_INPUTS``: ``quant_errors``).

    channel ratio = max over channels of (max |x| over tokens) / its median over channels;
    kurtosis = E[(x - mean)^4] / var^2 over all entries (3 for a Gaussian).
    """
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda mod, inp, out, i=i: captured.__setitem__(f"resid{i}", (out[0] if isinstance(out, tuple) else out).detach())))
        for key, path in ERROR_INPUTS.items():
            hooks.append(layer.get_submodule(path).register_forward_pre_hook(
                lambda mod, inp, i=i, key=key: captured.__setitem__(f"{key}{i}", inp[0].detach())))
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

    out = [{"layer": i, "resid": stats(captured[f"resid{i}"]), "down_in": stats(captured[f"down_in{i}"])}
           for i in range(len(model.model.layers))]
    if a_spec is not None and a_spec.enabled:
        for s in out:
            for key in ERROR_INPUTS:
                x = captured[f"{key}{s['layer']}"]
                s.setdefault(key, {})["a_error"] = quant_errors(x.reshape(-1, x.shape[-1]), a_spec)
    return out


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spinlearn.evaluate import evaluate_setting
    from spinlearn.quant import QuantSettings

    path = args.model or demo_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = demo_data_file(args.split).read_text(encoding="utf-8")
    windows = eval_windows(tokenize_concat([text], tokenizer), args.seqlen)[: args.max_windows or None].to(args.device)
    w, a, kv = args.bits
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    q = QuantSettings.from_flags(w_bits=w, a_bits=a, kv_bits=kv)
    with torch.no_grad():
        result = {"model": str(path), "split": args.split, "tokens": windows.numel(), "bits": [w, a, kv],
                  "stats": activation_stats(model, windows[:8], q.a)}

    def row(rotation, quant, **kw):
        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device)
        return evaluate_setting(fresh, windows, rotation=rotation, quant=quant, seed=args.seed, progress=False,
                                **kw)["ppl"]

    ppl = {"float": row("none", QuantSettings()), "rtn": row("none", q),
           "rtn_r1r2": row("hadamard", q), "rtn_r1r2_r3r4": row("hadamard", q, r3=True, r4=True)}
    result["ppl"] = {k: round(v, 2) for k, v in ppl.items()}

    for stat in result["stats"]:
        r, d = stat["resid"], stat["down_in"]
        print(f"layer {stat['layer']}: residual max {r['max_abs']:8.1f} ratio {r['channel_ratio']:6.1f} "
              f"kurt {r['kurtosis']:7.1f} top {r['top_channels']} | down_proj in max {d['max_abs']:7.1f} "
              f"ratio {d['channel_ratio']:6.1f} kurt {d['kurtosis']:7.1f}")
        for key, path in ERROR_INPUTS.items():
            if "a_error" in stat.get(key, {}):
                e = stat[key]["a_error"]
                print(f"  A{a} relative error at {path}'s input: as is {e['as_is']:.4f}, Hadamard {e['hadamard']:.4f}, "
                      f"random orthogonal {e['random_orthogonal']:.4f}, iid Gaussian {e['gaussian']:.4f}")
    print(f"W{w}A{a}KV{kv} perplexity on {args.split} ({windows.numel()} tokens, seqlen {args.seqlen}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
