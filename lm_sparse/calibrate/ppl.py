"""Perplexity of a causal LM over token windows (the quantity PPL-p% calibrates against)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def windows_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str | None = None,
                on_batch=None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (float64) and the number of predicted tokens.

    Each window is scored on its own (no context from other windows); the loss is taken in float32 over
    the logits. `on_batch(start, stop)` is called before each batch (the dense pass uses it to know which
    windows its hooks see).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        stop = min(start + batch_size, windows.shape[0])
        if on_batch is not None:
            on_batch(start, stop)
        ids = windows[start:stop].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll.double())
        count += int(ids[:, 1:].numel())
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> float:
    """exp(mean next-token NLL) over `windows` [N, T]."""
    total, count = windows_nll(model, windows, batch_size=batch_size, desc=desc)
    return math.exp(total / max(count, 1))
