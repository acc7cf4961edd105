"""Worker for tests/test_fsdp.py (run by torchrun, 2 ranks over gloo): spinlearn.distributed.check_replicated on
identical tensors, then with one bit flipped on rank 1; each rank writes what happened to DIR/rank{i}.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spinlearn.distributed import check_replicated


def outcome(params) -> str:
    try:
        check_replicated(params)
    except RuntimeError as e:
        assert "differ across ranks" in str(e), e
        return "raised"
    return "passed"


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    params = [torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), torch.ones(4)]
    result = {"identical": outcome(params)}
    if rank == 1:
        params[0].view(torch.int32)[3, 5] ^= 1  # one bit of one element
    result["one_bit_off"] = outcome(params)
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
