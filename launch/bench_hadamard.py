"""Benchmark: dense ``x @ H`` versus spinlearn.hadamard.fast_hadamard_transform.

Run:  .venv/bin/python launch/bench_hadamard.py [--device cuda] [--batch 2048]
          [--orders 4096 11008 14336 18944] [--threads 1]

Prints a Markdown table (times are the median of --repeats runs after one warm-up; H is precomputed
for the dense path, so only the matmul is timed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spinlearn.hadamard import decompose_order, fast_hadamard_transform, hadamard_matrix, supported_order


def _time(fn, device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (caches, kernels, allocator)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch", type=int, default=2048, help="rows of x (default: 2048)")
    parser.add_argument("--orders", type=int, nargs="+", default=[4096, 11008, 14336, 18944])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} batch={args.batch}\n")
    print("| order | K x 2^m | batch | dense x@H (ms) | fast (ms) | speedup | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for n in args.orders:
        if not supported_order(n):
            print(f"| {n} | unsupported | | | | | |")
            continue
        k, p = decompose_order(n)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, n, generator=gen).to(device=device, dtype=dtype)
        h = hadamard_matrix(n, dtype=dtype, device=device)
        dense = _time(lambda: x @ h, device, args.repeats)
        fast = _time(lambda: fast_hadamard_transform(x), device, args.repeats)
        diff = (fast_hadamard_transform(x).float() - (x @ h).float()).abs().max().item()
        print(
            f"| {n} | {k} x {p} | {args.batch} | {dense * 1e3:.1f} | {fast * 1e3:.1f} "
            f"| {dense / fast:.1f}x | {diff:.1e} |"
        )
        del h


if __name__ == "__main__":
    main()
