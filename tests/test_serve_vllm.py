"""The demo's W4A16 and W8A8 exports (random Hadamard R1/R2 + online R4) served by vLLM on CPU: perplexity from
prompt logprobs within 1% of spinlearn's own evaluation of the same export, and generated text.

Needs vLLM's CPU build in the running environment (``pip install "spinlearn[serve]"``, see ENVIRONMENT.md);
skipped otherwise. vLLM runs in a subprocess (``python -m spinlearn.export.serve``) with the CPU workaround for
online transforms on PYTHONPATH (see ``spinlearn.export.serve``). About 2-3 minutes per export on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (spinlearn[serve])"),
]

DEMO = Path(__file__).resolve().parents[1] / "spinlearn" / "demo"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from spinlearn import rotate
    from spinlearn.data import eval_windows, load_text, tokenize_concat
    from spinlearn.export import export_model
    from spinlearn.loading import load_causal_lm, load_tokenizer
    from spinlearn.online import online_linears

    root = tmp_path_factory.mktemp("serve")
    model = load_causal_lm(DEMO / "model")
    rotate(model, "transformer_universal", mode="hadamard", seed=0)
    online = online_linears(model, None, True)
    for scheme in ("w4a16", "w8a8"):
        export_model(model, root / scheme, scheme=scheme, online=online, tokenizer_source=DEMO / "model",
                     progress=False)
    ids = tokenize_concat(load_text(str(DEMO / "data" / "test.txt"), split="test"), load_tokenizer(DEMO / "model"))
    torch.save(eval_windows(ids, 256)[:20], root / "windows.pt")
    return root


def _spinlearn_ppl(export: Path, windows: torch.Tensor) -> float:
    from spinlearn.evaluate import perplexity
    from spinlearn.export import load_export

    # bf16: what vLLM runs on CPU (its int kernels are bf16-only); load_export applies W8A8's int8 activations
    return perplexity(load_export(export, dtype="bfloat16"), windows, progress=False)


def _vllm(export: Path, root: Path) -> dict:
    from spinlearn.export.serve import cpu_workaround_dir

    site = cpu_workaround_dir(root / "site")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = root / f"{export.name}.json"
    cmd = [sys.executable, "-m", "spinlearn.export.serve", "ppl", str(export), str(root / "windows.pt"),
           "--dtype", "bfloat16", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8"])
def test_vllm_serves_export_like_spinlearn_eval(exports, scheme):
    served = _vllm(exports / scheme, exports)
    ours = _spinlearn_ppl(exports / scheme, torch.load(exports / "windows.pt"))
    assert abs(served["ppl"] / ours - 1) < 0.01, (served["ppl"], ours)
    assert served["ppl"] < 100  # the demo's float perplexity on these windows is ~73: the transform was applied
    assert len(served["text"].split()) >= 3
