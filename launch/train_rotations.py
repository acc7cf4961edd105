"""Learn SpinQuant-style rotations for a Hugging Face causal LM, fuse them and export the model.

    accelerate launch launch/train_rotations.py --config recipes/demo.yaml [dotted.key=value ...]

Single process or multi-process DDP (e.g. --config_file accelerate_configs/8gpu_ddp.yaml). See README.md.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)

    from spinlearn.config import load_recipe
    from spinlearn.job import run_training

    where = _rank()
    try:
        cfg = load_recipe(args.config, args.overrides)
        run_training(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ConnectionError, RuntimeError) as e:
        print(f"train_rotations: error{where}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # unexpected: the traceback follows; say which rank it was first
        print(f"train_rotations: unexpected error{where}: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    return 0


def _rank() -> str:
    """' on rank R of N' under a multi-process launch (torchrun's environment), else ''. A rank that fails exits,
    and the launcher then stops the others, so the job ends instead of waiting in a collective."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" on rank {os.environ.get('RANK', '?')} of {world}" if world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
