"""Minimal perplexity helpers for the demo model (the pretraining script, its checks and the asset tests).

The text of a split is tokenized as one stream (with the tokenizer's BOS in front) and cut into
non-overlapping windows of ``seqlen`` tokens, the usual WikiText-2 protocol.
"""

from __future__ import annotations

import math

import torch


def token_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as a [n_windows, seqlen] tensor; the tail shorter than seqlen is dropped."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to predict anything, got {seqlen}")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def mean_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) of ``model`` over all windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += batch[:, 1:].numel()
    return total / count


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all windows."""
    return math.exp(mean_nll(model, windows, batch_size))
