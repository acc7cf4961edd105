"""Entry for the multi-process tests: the training job with probe callbacks that dump each rank's matrices and
what it holds of the model's parameters.

    accelerate launch ... tests/ddp_entry.py RECIPE DUMP_DIR [dotted.key=value ...]
"""

import sys

from helpers import DumpRankRotations, DumpShardInfo

from spinlearn.config import load_recipe
from spinlearn.job import run_training

if __name__ == "__main__":
    recipe, dump_dir, *overrides = sys.argv[1:]
    run_training(load_recipe(recipe, overrides), callbacks=[DumpRankRotations(dump_dir), DumpShardInfo(dump_dir)])
