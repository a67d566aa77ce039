"""One-pass threshold masking for prefill: y = x where |x| > t, else 0, counting the zeros of each row.

Prefill runs dense GEMMs on masked inputs. Torch's `x.masked_fill(x.abs() <= t, 0)` makes three passes
over x (abs, compare, fill) and writes two temporaries, and the engine's count of zeros is a fourth pass;
this kernel reads x once and writes y once, the minimum for an out-of-place mask (q, k and v read the same
x with possibly different thresholds, so x itself cannot be overwritten), and counts the zero entries of
each row of y in the same pass. Same semantics as `Threshold`: drop |x| <= t in x's dtype, keep NaN.

Grid: (rows, blocks of BLOCK columns). Every program adds its block's zero count to its row's int32
counter with an integer atomic add: exact and order-independent, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_gemv import launch_device

BLOCK = 1024


@triton.jit
def _threshold_mask_kernel(x_ptr, t_ptr, y_ptr, zeros_ptr, K, T_PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs_k < K
    x = tl.load(x_ptr + row * K + offs_k, mask=ok, other=0.0)
    if T_PER_CHANNEL:
        t = tl.load(t_ptr + offs_k, mask=ok, other=0.0)
    else:
        t = tl.load(t_ptr)
    y = tl.where(tl.abs(x.to(tl.float32)) <= t, 0.0, x).to(x.dtype)
    tl.store(y_ptr + row * K + offs_k, y, mask=ok)
    tl.atomic_add(zeros_ptr + row, tl.sum(((y == 0) & ok).to(tl.int32), axis=0))


@torch.library.custom_op("lm_sparse::threshold_mask_counted", mutates_args=())
def threshold_mask_counted(x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with |x| <= t set to zero, the zero entries of each row: int64, x.shape[:-1]) in one read and one
    write of x; threshold from `reference.round_threshold`."""
    x = x.contiguous()
    y = torch.empty_like(x)
    zeros = torch.zeros(x.shape[:-1], dtype=torch.int32, device=x.device)
    if x.numel() > 0:
        k = x.shape[-1]
        with launch_device(x):
            _threshold_mask_kernel[(x.numel() // k, triton.cdiv(k, BLOCK))](
                x, threshold, y, zeros, k, T_PER_CHANNEL=threshold.dim() == 1, BLOCK=BLOCK, num_warps=4)
    return y, zeros.long()


@threshold_mask_counted.register_fake
def _threshold_mask_counted_fake(x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=torch.int64))
