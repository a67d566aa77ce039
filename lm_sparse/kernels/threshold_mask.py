"""One-pass threshold masking for prefill: y = x where |x| > t, else 0.

Prefill runs dense GEMMs on masked inputs. Torch's `x.masked_fill(x.abs() <= t, 0)` makes three passes
over x (abs, compare, fill) and writes two temporaries; this kernel reads x once and writes y once, the
minimum for an out-of-place mask (q, k and v read the same x with possibly different thresholds, so x
itself cannot be overwritten). Same semantics as `Threshold`: drop |x| <= t in x's dtype, keep NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _threshold_mask_kernel(x_ptr, t_ptr, y_ptr, numel, K, T_PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if T_PER_CHANNEL:
        t = tl.load(t_ptr + offs % K, mask=ok, other=0.0)
    else:
        t = tl.load(t_ptr)
    y = tl.where(tl.abs(x.to(tl.float32)) <= t, 0.0, x)
    tl.store(y_ptr + offs, y.to(x.dtype), mask=ok)


def _launch(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return y
    block = 1024
    _threshold_mask_kernel[(triton.cdiv(numel, block),)](
        x, threshold, y, numel, x.shape[-1], T_PER_CHANNEL=threshold.dim() == 1, BLOCK=block, num_warps=4)
    return y


@torch.library.custom_op("lm_sparse::threshold_mask", mutates_args=())
def threshold_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x with |x| <= t set to zero (one read, one write); threshold from `reference.round_threshold`."""
    return _launch(x, threshold)


@threshold_mask.register_fake
def _threshold_mask_fake(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)
