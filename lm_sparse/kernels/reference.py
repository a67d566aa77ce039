"""Plain-torch references of the sparse kernels: what each kernel must compute, written the obvious way.

The mask is the engine's `Threshold` rule: an input survives unless |x| <= t, compared in x's dtype (the
threshold is rounded to x's dtype first, as torch does for `x.abs() <= t`). NaN inputs therefore survive,
exactly as `Threshold` keeps them.
"""

from __future__ import annotations

import torch


def round_threshold(threshold: float | torch.Tensor, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The threshold the kernels take: rounded to the activations' dtype, stored as float32.

    A scalar gives a 0-d tensor, a per-input-channel threshold a 1-d tensor of length K. Comparing
    |x| (exactly widened to float32) with this value is the same test as `x.abs() <= t` in x's dtype.
    """
    t = torch.as_tensor(threshold, device=device)
    return t.to(dtype).to(torch.float32).contiguous()


def threshold_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask of x under a threshold from `round_threshold` (broadcast over the last dim)."""
    return ~(x.abs().to(torch.float32) <= threshold.to(x.device))


def masked_input(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x with every entry |x| <= t set to zero, in x's dtype (the engine's masked-dense input)."""
    return x.masked_fill(~threshold_mask(x, threshold), 0)


def sparse_linear_reference(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 y = (x * mask) @ W^T + bias, with W^T given input-major as wt [K, N]."""
    xm = masked_input(x, threshold).to(torch.float64)
    y = xm @ wt.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
