import os

# Hub access fails here; make it fail at once instead of after a long timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Small linear algebra is much faster single-threaded on this 2-core machine.
torch.set_num_threads(1)
