"""Entry for the multi-process tests: the training job with probe callbacks that dump each rank's matrices and
what it holds of the model's parameters, and a count of the times each rank loaded the model's weights
(DUMP_DIR/loads{rank}.json).

    accelerate launch ... tests/ddp_entry.py RECIPE DUMP_DIR [dotted.key=value ...]
"""

import json
import os
import sys
from pathlib import Path

from helpers import DumpRankRotations, DumpShardInfo

import spinlearn.loading as loading
from spinlearn.config import load_recipe
from spinlearn.job import run_training

LOADS: list[str] = []
_load_causal_lm = loading.load_causal_lm


def counted_load(*args, **kwargs):
    LOADS.append(str(args[0] if args else kwargs.get("path")))
    return _load_causal_lm(*args, **kwargs)


if __name__ == "__main__":
    recipe, dump_dir, *overrides = sys.argv[1:]
    loading.load_causal_lm = counted_load
    run_training(load_recipe(recipe, overrides), callbacks=[DumpRankRotations(dump_dir), DumpShardInfo(dump_dir)])
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    Path(dump_dir, f"loads{os.environ.get('RANK', '0')}.json").write_text(json.dumps(LOADS))
