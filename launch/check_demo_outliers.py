"""Does the demo model show the problem rotations solve? Activation outliers per layer, and W4A4KV4 RTN
perplexity without rotation, with random Hadamard R1+R2, and with R1+R2 plus the online R3/R4 Hadamards.

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spinlearn.evaluate import evaluate_setting
    from spinlearn.quant import QuantSettings

    path = args.model or demo_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = demo_data_file(args.split).read_text(encoding="utf-8")
    windows = eval_windows(tokenize_concat([text], tokenizer), args.seqlen)[: args.max_windows or None].to(args.device)
    w, a, kv = args.bits
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    with torch.no_grad():
        result = {"model": str(path), "split": args.split, "tokens": windows.numel(), "bits": [w, a, kv],
                  "stats": activation_stats(model, windows[:8])}
    q = QuantSettings.from_flags(w_bits=w, a_bits=a, kv_bits=kv)

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
    print(f"W{w}A{a}KV{kv} perplexity on {args.split} ({windows.numel()} tokens, seqlen {args.seqlen}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
