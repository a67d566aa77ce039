"""Plain-torch references of the sparse kernels: what each kernel must compute, written the obvious way.

The mask is the engine's `Threshold` rule: an input survives unless |x| <= t, with t the real number calibrated
(compared in x's dtype against t rounded down to that dtype, which is the same test: no value of the dtype lies
between the two). NaN inputs therefore survive, exactly as `Threshold` keeps them.
"""

from __future__ import annotations

import torch


def round_threshold(threshold: float | torch.Tensor, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The threshold the kernels and the `Threshold` rule take: t rounded *down* to the activations' dtype
    (the largest value of that dtype <= t), stored as float32 (float64 for float64 activations).

    A scalar gives a 0-d tensor, a per-input-channel threshold a 1-d tensor of length K. For x in `dtype`,
    `|x| <= rounded` holds exactly when `|x| <= t` does, so the mask is the calibrated one in every dtype.
    Rounding to nearest (what `x.abs() <= t` does with a Python float) would also drop values up to half an ulp
    above t: in bfloat16, FAT's EPS=0.05 would act as 0.050049, and PPL-p%'s per-neuron thresholds would move.
    """
    # Rounded on the CPU (float64 is missing on some devices, nextafter for float16 on CUDA before torch 2.6);
    # it runs once per (device, dtype). A Python float is a double: compared against exactly.
    if isinstance(threshold, torch.Tensor):
        target = threshold.device if device is None else device
        t = threshold.detach().cpu()
    else:
        target, t = device, torch.tensor(float(threshold), dtype=torch.float64)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    rounded = t.to(dtype)
    wide = torch.promote_types(t.dtype, dtype)  # holds both values exactly: an exact comparison
    above = rounded.to(wide) > t.to(wide)
    rounded = torch.where(above, torch.nextafter(rounded, torch.full_like(rounded, float("-inf"))), rounded)
    store = torch.float64 if dtype == torch.float64 else torch.float32
    return rounded.to(device=target, dtype=store).contiguous()


def threshold_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask of x under a threshold from `round_threshold` (broadcast over the last dim)."""
    wide = torch.promote_types(x.dtype, threshold.dtype)  # float32, or float64 for float64 activations
    return ~(x.abs().to(wide) <= threshold.to(device=x.device, dtype=wide))


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
