"""Entry for the failing-rank tests: the training job (launch/train_rotations.py's main) on several ranks where rank 1
alone goes wrong at its second step, either with bad data (token ids beyond the vocabulary) or with a NaN in its
forward pass.

    accelerate launch ... tests/failing_rank_entry.py bad_data|nan --config RECIPE [dotted.key=value ...]
"""

import sys

from transformers import TrainerCallback

import spinlearn.job
from helpers import launch_script  # tests/ is this script's directory, so it is on sys.path


class GoWrongOnRank1(TrainerCallback):
    def __init__(self, how: str):
        self.how = how

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if args.process_index != 1 or state.global_step != 1:
            return
        emb = model.get_input_embeddings()
        if self.how == "nan":
            emb.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        else:  # ids no embedding row exists for: what a tokenizer / model mismatch on one shard feeds
            emb.register_forward_pre_hook(lambda module, inputs: (inputs[0] + module.num_embeddings,))


if __name__ == "__main__":
    how, *argv = sys.argv[1:]
    run_training = spinlearn.job.run_training
    spinlearn.job.run_training = lambda cfg, **kw: run_training(cfg, callbacks=[GoWrongOnRank1(how)], **kw)
    sys.exit(launch_script("train_rotations").main(argv))
