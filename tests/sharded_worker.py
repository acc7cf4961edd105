"""Worker for tests/test_sharded.py (torchrun, 2 ranks over gloo): a sharded view of a model only rank 0 holds
(spinlearn.sharded) against rank 0's whole model with the same wrappers. Writes DIR/rank{i}.json.

    torchrun --nproc_per_node 2 tests/sharded_worker.py DIR FAMILY
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import layout_for, tiny_model
from torch.distributed.tensor import DTensor

from spinlearn.evaluate import perplexity
from spinlearn.fakequant import rotations_attached
from spinlearn.quant import QuantSettings, QuantSpec
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.sharded import shard_and_fill, skeleton

QUANT = QuantSettings(w=QuantSpec(bits=4), a=QuantSpec(bits=4), kv=QuantSpec(bits=4))


def attach(model, plan):
    start = make_matrices(plan, mode="hadamard", seed=0)
    return rotations_attached(model, plan, start, quant=QUANT, r3=True, learn_a_clip=True, learn_w_clip=True)


def measure(model, handle, ids, windows, over_ranks):
    """Logits, loss, the rotation gradient and the perplexity of three windows (an odd number over two ranks)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    model(input_ids=ids, labels=ids).loss.backward()
    grad = handle.bank.params["r1"].grad.double().clone()
    return logits, grad, perplexity(model, windows, progress=False, over_ranks=over_ranks)


if __name__ == "__main__":
    out, family = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    ids, windows = torch.randint(0, 128, (2, 16), generator=gen), torch.randint(0, 128, (3, 12), generator=gen)
    model = plan = None
    reference = [None]
    if rank == 0:
        model = tiny_model(family)
        plan = prepare_model(model, layout_for(family))
        with attach(model, plan) as handle:
            reference[0] = measure(model, handle, ids, windows, over_ranks=False)
        model.zero_grad(set_to_none=True)
    dist.broadcast_object_list(reference, src=0)
    view, view_plan = skeleton(model, plan)
    with attach(view, view_plan) as handle:
        shard_and_fill(view, model, torch.device("cpu"))
        sharded = [p for p in view.parameters() if isinstance(p, DTensor)]
        local, full = sum(p.to_local().numel() for p in sharded), sum(p.numel() for p in sharded)
        logits, grad, ppl = measure(view, handle, ids, windows, over_ranks=True)
    ref_logits, ref_grad, ref_ppl = reference[0]
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "logits": (logits - ref_logits).abs().max().item() / ref_logits.abs().max().item(),
        "grad": (grad - ref_grad).abs().max().item() / ref_grad.abs().max().item(),
        "ppl": [ppl, ref_ppl], "local": local, "full": full, "held_model": model is not None,
    }))
    dist.destroy_process_group()
