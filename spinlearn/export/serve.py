"""Run an export in vLLM (optional extra ``spinlearn[serve]``): perplexity from prompt logprobs, generation, speed.

Used by ``tests/test_serve_vllm.py`` and ``launch/bench_serve.py`` as a subprocess
(``python -m spinlearn.export.serve ppl|bench ...``) because vLLM starts worker processes with spawn and keeps
global state. On CPU, vLLM 0.32's dense fallback for online transforms calls ``layer.cpu_linear``, an attribute
only real linear layers get ("'HadamardTransform' object has no attribute 'cpu_linear'"); ``cpu_workaround_dir``
writes a ``sitecustomize.py`` that gives the class one (``torch.nn.functional.linear``, which is what the attribute
holds for a plain float layer), and the caller puts that directory on ``PYTHONPATH`` so spawned workers get it too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

_SITECUSTOMIZE = '''\
# spinlearn: vLLM 0.32 CPU fallback for online transforms needs HadamardTransform.cpu_linear
import importlib.abc, importlib.util, sys

_TARGET = "vllm.model_executor.layers.quantization.compressed_tensors.transform.module"


def _patch(mod):
    import torch
    cls = getattr(mod, "HadamardTransform", None)
    if cls is not None and not hasattr(cls, "cpu_linear"):
        cls.cpu_linear = staticmethod(torch.nn.functional.linear)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        orig = loader.exec_module

        def exec_module(module):
            orig(module)
            _patch(module)
        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''


def cpu_workaround_dir(where: str | Path) -> Path:
    """Write the sitecustomize.py described above into ``where``; returns the directory for PYTHONPATH."""
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return d


def _llm(model: str, dtype: str, max_len: int):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_len, seed=0)


def vllm_perplexity(llm, windows) -> float:
    """exp(mean NLL) of every token but each window's first, from prompt logprobs (windows: lists of ids)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [{"prompt_token_ids": list(map(int, w))} for w in windows]
    nll, count = 0.0, 0
    for w, out in zip(windows, llm.generate(prompts, params, use_tqdm=False)):
        for tok, lp in zip(w[1:], out.prompt_logprobs[1:]):
            nll -= lp[int(tok)].logprob
            count += 1
    return math.exp(nll / count)


def _cmd_ppl(args) -> dict:
    import torch
    from vllm import SamplingParams

    windows = torch.load(args.windows).tolist()
    llm = _llm(args.model, args.dtype, len(windows[0]) + 64)
    ppl = vllm_perplexity(llm, windows)
    gen = llm.generate([args.prompt], SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    return {"ppl": ppl, "text": gen[0].outputs[0].text, "windows": len(windows)}


def _cmd_bench(args) -> dict:
    """Prefill tokens/s (a batch of prompts, 1 new token) and decode tokens/s (the same prompts, N new tokens)."""
    from vllm import SamplingParams

    llm = _llm(args.model, args.dtype, args.prompt_len + args.gen_len + 8)
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 1000 + 10 for j in range(args.prompt_len)]}
               for i in range(args.batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=args.gen_len, ignore_eos=True), use_tqdm=False)
    total = time.perf_counter() - t0
    decode = max(total - prefill, 1e-9)
    return {"prefill_tok_s": args.batch * args.prompt_len / prefill,
            "decode_tok_s": args.batch * (args.gen_len - 1) / decode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spinlearn.export.serve")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ppl")
    a.add_argument("model")
    a.add_argument("windows", help="torch.save'd LongTensor [n, seqlen]")
    a.add_argument("--prompt", default="To be, or not to be")
    b = sub.add_parser("bench")
    b.add_argument("model")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--prompt-len", type=int, default=256)
    b.add_argument("--gen-len", type=int, default=64)
    for q in (a, b):
        q.add_argument("--dtype", default="bfloat16")
        q.add_argument("--json", required=True)
    args = p.parse_args(argv)
    result = _cmd_ppl(args) if args.cmd == "ppl" else _cmd_bench(args)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
