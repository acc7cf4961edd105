"""Benchmark: `spinlearn rotate` versus plain load + save of the same ~100M-parameter Llama.

Run:  .venv/bin/python launch/bench_rotate.py [--threads 2] [--repeats 2] [--profile]

Target (from the issue): rotate <= 2x (load + save). The model is built from a config with random weights
(no download) and saved once as float32 safetensors; then, best of --repeats each:
  load+save: AutoModelForCausalLM.from_pretrained + save_pretrained (safetensors)
  rotate:    the whole CLI path in-process (spinlearn.cli.main: load, untie, fuse, fold, verify, save)
--profile runs the rotate path once more under cProfile and prints the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
              tie_word_embeddings=False)


def build_model(dest: Path) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm scales, so fusion does real work
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(dest, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


DEVICE = None  # set by --device


def load_and_save(src: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    if DEVICE:
        model.to(DEVICE)
    model.save_pretrained(dest, safe_serialization=True)


def rotate_cli(src: Path, dest: Path) -> None:
    from spinlearn.cli import main

    rc = main(["rotate", "--model", str(src), "--output", str(dest), "--overwrite"]
              + (["--device", DEVICE] if DEVICE else []))
    if rc != 0:
        raise SystemExit(f"spinlearn rotate failed with exit code {rc}")


def best_time(fn, repeats: int, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default=None, help="e.g. cuda: load to / rotate on that device in both paths")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench_rotate_"))
    try:
        src, copy_dir, out = work / "src", work / "copy", work / "out"
        n_params = build_model(src)
        load_and_save(src, copy_dir)  # warm-up: imports, page cache
        t_io = best_time(load_and_save, args.repeats, src, copy_dir)
        t_rot = best_time(rotate_cli, args.repeats, src, out)
        ratio = t_rot / t_io
        print()
        print("| model params | device | threads | load+save (s) | rotate (s) | ratio | target |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {n_params / 1e6:.1f}M | {DEVICE or 'cpu'} | {args.threads} | {t_io:.2f} | {t_rot:.2f} | {ratio:.2f}x | "
              f"<= 2x {'(met)' if ratio <= 2 else '(MISSED)'} |")
        if args.profile:
            prof = cProfile.Profile()
            with contextlib.redirect_stdout(io.StringIO()):
                prof.runcall(rotate_cli, src, out)
            stream = io.StringIO()
            pstats.Stats(prof, stream=stream).sort_stats("cumulative").print_stats(25)
            print(stream.getvalue())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
