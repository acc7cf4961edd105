"""vLLM serving speed of spinlearn exports: float vs W4A16 vs W4A16 + online R4, tokens/s and size on disk.

    python launch/bench_serve.py [--model spinlearn/demo/model] [--batch 8 --prompt-len 256 --gen-len 64]

Needs vLLM in this environment (``pip install "spinlearn[serve]"``; on CPU see ../shared/ENVIRONMENT.md). The model
is rotated with random Hadamard R1/R2 (``spinlearn.rotate``), exported three ways with ``spinlearn.export``, and each
export is run in its own vLLM process (``python -m spinlearn.export.serve bench``): prefill tokens/s (a batch of
prompts, one new token) and decode tokens/s (the same prompts, --gen-len new tokens, minus the prefill time).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = (("float", "float", False), ("W4A16", "w4a16", False), ("W4A16 + R4", "w4a16", True))


def _size_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def _exports(model_path: str, root: Path, group_size: int | None) -> list[tuple[str, Path]]:
    from spinlearn import rotate
    from spinlearn.export import export_model
    from spinlearn.loading import load_causal_lm
    from spinlearn.online import online_linears

    model = load_causal_lm(model_path)
    rotate(model, "transformer_universal", mode="hadamard", seed=0)
    r4 = online_linears(model, None, True)
    out = []
    for label, scheme, with_r4 in ROWS:
        d = root / label.replace(" ", "").replace("+", "_")
        export_model(model, d, scheme=scheme, online=r4 if with_r4 else [], group_size=group_size,
                     tokenizer_source=model_path, progress=False)
        out.append((label, d))
    return out


def _bench(export: Path, args, site: Path | None) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    out = export.with_suffix(".json")
    cmd = [sys.executable, "-m", "spinlearn.export.serve", "bench", str(export), "--dtype", args.dtype,
           "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
           "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"vLLM failed on {export}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "spinlearn" / "demo" / "model"))
    p.add_argument("--group-size", type=int, default=None, help="W4A16 group size (default 128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="vLLM's CPU W4A16 kernel needs bfloat16")
    args = p.parse_args()
    import torch

    from spinlearn.export.serve import cpu_workaround_dir

    with tempfile.TemporaryDirectory(prefix="bench_serve-") as tmp:
        root = Path(tmp)
        site = cpu_workaround_dir(root / "site") if not torch.cuda.is_available() else None
        rows = [(label, _size_mb(d), _bench(d, args, site)) for label, d in _exports(args.model, root, args.group_size)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"vLLM on {device}, {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, {args.gen_len} new tokens\n")
    print("| export | size on disk (MiB) | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|")
    for label, size, r in rows:
        print(f"| {label} | {size:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
