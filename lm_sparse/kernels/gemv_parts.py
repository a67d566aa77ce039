"""The Triton building blocks the sparse GEMV kernels share (`sparse_gemv.py`, `gemv_packed.py`): loading and
thresholding x, one step of rows or of one row, writing a program's K slice, and the split-K reduce.

A program's K slice ends in `_store_slice`: written straight into y when the launch has one slice, otherwise
as float32 partial sums into the slice's slot, summed in slice order by a second launch
(`_reduce_partials_kernel`) or, with FUSED_REDUCE, by whichever program of the column block finishes last
(`_last_slice_reduces`). Either way the sum's order is fixed, so the result is deterministic run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_x(x_ptr, offs_b, b_ok, offs_k, k_ok, stride_xb, USE_DOT: tl.constexpr):
    """The [BLOCK_B, BLOCK_K] tile of x (rows offs_b) with USE_DOT, else the [BLOCK_K] slice of its one row."""
    if USE_DOT:
        return tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                       other=0.0)
    else:
        return tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)


@triton.jit
def _keep(x, t):
    """not(|x| <= t): the engine's Threshold rule exactly (t rounded down to x's dtype; NaN survives, as there)."""
    return ~(tl.abs(x.to(tl.float32)) <= t)


@triton.jit
def _rows_step(acc, zeros, x, keep, ok, w, COUNT: tl.constexpr, DOT_FP32: tl.constexpr):
    """One step of 2..8 rows: acc [BLOCK_B, BLOCK_N] += masked x [BLOCK_B, BLOCK_K] @ w on the tensor cores;
    zeros [BLOCK_B] += the step's zero entries of the masked x (`ok`: the real rows and inputs)."""
    xm = tl.where(keep, x, 0.0).to(w.dtype)
    if COUNT:
        zeros += tl.sum(((xm == 0) & ok).to(tl.int32), axis=1)
    if DOT_FP32:  # the CPU interpreter's bf16 dot is wrong; the GPU path keeps native dtypes
        acc += tl.dot(xm.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    elif w.dtype == tl.float32:
        acc += tl.dot(xm, w, input_precision="ieee")
    else:
        acc += tl.dot(xm, w, out_dtype=tl.float32)
    return acc, zeros


@triton.jit
def _row_step(acc2d, zeros, x, keep, ok, w, COUNT: tl.constexpr):
    """One step of one row: acc2d [BLOCK_K, BLOCK_N] += masked x [BLOCK_K] times its weight rows (reduced over K
    once, at the end); zeros [1] += the step's zero entries of the masked x (`ok`: the real inputs)."""
    xm = tl.where(keep, x.to(tl.float32), 0.0)
    acc2d += xm[:, None] * w.to(tl.float32)
    if COUNT:
        zeros += tl.sum(((xm == 0) & ok).to(tl.int32), axis=0)
    return acc2d, zeros


@triton.jit
def _start_program(B, N, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   USE_DOT: tl.constexpr):
    """A GEMV program's column block and rows, and its zeroed sums: acc ([BLOCK_B, BLOCK_N] with USE_DOT, else
    batch 1's [BLOCK_K, BLOCK_N], reduced over K once, in `_store_slice`) and the rows' zero counts."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    zeros = tl.zeros((BLOCK_B,), dtype=tl.int32)
    return pid_n, pid_k, offs_n, offs_n < N, offs_b, offs_b < B, acc, zeros


@triton.jit
def _store_slice(acc, zeros, offs_b, b_ok, offs_n, n_ok, pid_n, pid_k, B, N, bias_ptr, out_ptr, partial_ptr,
                 zeros_ptr, counts_ptr, tickets_ptr, stride_ob, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
                 COUNT: tl.constexpr, USE_DOT: tl.constexpr, FUSED_REDUCE: tl.constexpr, REDUCE_S: tl.constexpr,
                 REDUCE_TILES: tl.constexpr):
    """A program's float32 sums of its K slice ([BLOCK_B, BLOCK_N] with USE_DOT; batch 1's [BLOCK_K, BLOCK_N]
    accumulator is reduced over K here, once): into the slice's partial slot, or (no split) plus bias into y;
    and, from the first column block, the slice's zero counts per row. With FUSED_REDUCE the last program of
    the column block then sums the slots (`_last_slice_reduces`)."""
    if not USE_DOT:
        acc = tl.sum(acc, axis=0)[None, :]  # BLOCK_B == 1
    out_mask = b_ok[:, None] & n_ok[None, :]
    if COUNT:  # every column block sees the same x: the first one writes this K slice's counts
        if pid_n == 0:
            tl.store(zeros_ptr + pid_k * B + offs_b, zeros.to(tl.int64), mask=b_ok)
    if WRITE_PARTIAL:
        slot = partial_ptr + pid_k * B * N
        tl.store(slot + offs_b[:, None] * N + offs_n[None, :], acc, mask=out_mask)
        if FUSED_REDUCE:
            _last_slice_reduces(partial_ptr, bias_ptr, out_ptr, zeros_ptr, counts_ptr, tickets_ptr, offs_b, b_ok,
                                offs_n, n_ok, pid_n, B, N, stride_ob, HAS_BIAS, COUNT, REDUCE_S, REDUCE_TILES)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _last_slice_reduces(partial_ptr, bias_ptr, out_ptr, zeros_ptr, counts_ptr, tickets_ptr, offs_b, b_ok, offs_n,
                        n_ok, pid_n, B, N, stride_ob, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr,
                        REDUCE_S: tl.constexpr, REDUCE_TILES: tl.constexpr):
    """The split-K reduce without its launch: once its partial sums are written, a program draws a ticket for its
    column block, and the one that draws the last sums the block's slots, REDUCE_S slices a load, in slice order
    (whichever program that is, the result is the same), adds the bias, writes y (and, in the first column
    block, the rows' zero counts), and sets the ticket back to 0 for the next launch. The tickets are int32
    counters (`sparse_gemv.reserve_tickets`): no floating-point atomics."""
    n_slices = tl.num_programs(1)
    tl.debug_barrier()  # all of this program's stores are issued before its ticket, which releases them
    ticket = tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if ticket == n_slices - 1:
        offs_s = tl.arange(0, REDUCE_S)
        tile = offs_b[:, None] * N + offs_n[None, :]
        ok = b_ok[:, None] & n_ok[None, :]
        acc = tl.zeros(tile.shape, dtype=tl.float32)
        for i in tl.static_range(REDUCE_TILES):  # all loads in flight at once
            s = i * REDUCE_S + offs_s
            acc += tl.sum(tl.load(partial_ptr + s[:, None, None] * B * N + tile[None, :, :],
                                  mask=(s < n_slices)[:, None, None] & ok[None, :, :], other=0.0,
                                  cache_modifier=".cg"), axis=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)
        if COUNT:
            if pid_n == 0:
                counts = tl.zeros(offs_b.shape, dtype=tl.int64)
                for i in tl.static_range(REDUCE_TILES):
                    s = i * REDUCE_S + offs_s
                    counts += tl.sum(tl.load(zeros_ptr + s[:, None] * B + offs_b[None, :],
                                             mask=(s < n_slices)[:, None] & b_ok[None, :], other=0,
                                             cache_modifier=".cg"), axis=0)
                tl.store(counts_ptr + offs_b, counts, mask=b_ok)
        tl.atomic_xchg(tickets_ptr + pid_n, 0)


@triton.jit
def _walk_step(acc, zeros, x, t, offs_k, k_ok, offs_b, b_ok, offs_n, n_ok, wt_ptr, stride_wk,
               COUNT: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """One BLOCK_K step of the walking kernel: threshold x in registers, load only the active weight rows (the
    union over the batch rows with USE_DOT), accumulate. acc: [BLOCK_B, BLOCK_N] (USE_DOT) or [BLOCK_K, BLOCK_N]."""
    if USE_DOT:
        xk_ok = b_ok[:, None] & k_ok[None, :]
        keep = _keep(x, t) & xk_ok
        active = tl.max(keep.to(tl.int32), axis=0) > 0  # union over the batch rows
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=active[:, None] & n_ok[None, :],
                    other=0.0)
        acc, zeros = _rows_step(acc, zeros, x, keep, xk_ok, w, COUNT, DOT_FP32)
    else:
        keep = _keep(x, t) & k_ok
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=keep[:, None] & n_ok[None, :],
                    other=0.0)
        acc, zeros = _row_step(acc, zeros, x, keep, k_ok, w, COUNT)
    return acc, zeros


@triton.jit
def _reduce_partials_kernel(partial_ptr, bias_ptr, out_ptr, zeros_ptr, counts_ptr, B, N, stride_ob, SPLIT_K,
                            HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    # Slices are read BLOCK_S at a time as one [BLOCK_S, BLOCK] tile: a split of 64 is 4 memory round trips,
    # not 64 dependent loads (the summation order is fixed, so the result is deterministic).
    offs_s = tl.arange(0, BLOCK_S)
    if COUNT:  # the K slices' zero counts, summed here rather than in a launch of their own
        if tl.program_id(0) == 0:
            offs_b = tl.arange(0, BLOCK_B)
            b_ok = offs_b < B
            counts = tl.zeros((BLOCK_B,), dtype=tl.int64)
            for s0 in range(0, SPLIT_K, BLOCK_S):
                s_ok = (s0 + offs_s) < SPLIT_K
                c = tl.load(zeros_ptr + (s0 + offs_s)[:, None] * B + offs_b[None, :],
                            mask=s_ok[:, None] & b_ok[None, :], other=0)
                counts += tl.sum(c, axis=0)
            tl.store(counts_ptr + offs_b, counts, mask=b_ok)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < B * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, SPLIT_K, BLOCK_S):
        s_ok = (s0 + offs_s) < SPLIT_K
        p = tl.load(partial_ptr + (s0 + offs_s)[:, None] * B * N + offs[None, :], mask=s_ok[:, None] & ok[None, :],
                    other=0.0)
        acc += tl.sum(p, axis=0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_ob + n, acc.to(out_ptr.dtype.element_ty), mask=ok)
