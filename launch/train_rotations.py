"""Learn SpinQuant-style rotations for a Hugging Face causal LM, fuse them and export the model.

    accelerate launch launch/train_rotations.py --config recipes/demo.yaml [dotted.key=value ...]

Single process or multi-process DDP (e.g. --config_file accelerate_configs/8gpu_ddp.yaml). See README.md.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)

    from spinlearn.config import load_recipe
    from spinlearn.job import run_training

    try:
        cfg = load_recipe(args.config, args.overrides)
        run_training(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ConnectionError, RuntimeError) as e:
        print(f"train_rotations: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
