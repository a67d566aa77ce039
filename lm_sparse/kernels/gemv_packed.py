"""The sparse GEMV's packed variants: a first small launch packs the indices of the inputs active in any row
(a prefix sum in registers), and the main kernel steps through those, so every step loads BLOCK_K real weight
rows. `sparse_gemv.py` launches them (`LaunchConfig.gather`, `LaunchConfig.compact_chunk`).

- gathered (`_pack_active_kernel` + `_sparse_gemv_gather_kernel`): all of K packed into one list, walked by the
  unrolled programs of `sparse_gemv.py`'s main kernel, `split_k` programs per column block sharing its slices;
- compacted (`_compact_active_kernel` + `_sparse_gemv_compact_kernel`): packed per chunk, each chunk's list
  walked in a runtime loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemv_parts import _keep, _row_step, _rows_step, _start_program, _store_slice


@triton.jit
def _packed_step(acc, zeros, k_idx, ok, x_ptr, wt_ptr, t_ptr, t_scalar, offs_b, b_ok, offs_n, n_ok, stride_xb,
                 stride_wk, T_PER_CHANNEL: tl.constexpr, COUNT: tl.constexpr, USE_DOT: tl.constexpr,
                 DOT_FP32: tl.constexpr):
    """One step over packed input indices k_idx (`ok`: the real ones): their weight rows, x and threshold,
    gathered; each row masked by its own threshold test (a row may drop an input another keeps)."""
    if T_PER_CHANNEL:
        t = tl.load(t_ptr + k_idx, mask=ok, other=0.0)
    else:
        t = t_scalar
    w = tl.load(wt_ptr + k_idx[:, None] * stride_wk + offs_n[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
    if USE_DOT:
        xk_ok = b_ok[:, None] & ok[None, :]
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + k_idx[None, :], mask=xk_ok, other=0.0)
        acc, zeros = _rows_step(acc, zeros, x, _keep(x, t) & xk_ok, xk_ok, w, COUNT, DOT_FP32)
    else:
        x = tl.load(x_ptr + k_idx, mask=ok, other=0.0)
        acc, zeros = _row_step(acc, zeros, x, _keep(x, t) & ok, ok, w, COUNT)
    return acc, zeros


@triton.jit
def _active_inputs(x_ptr, t_ptr, offs, B, K, stride_xb, T_PER_CHANNEL: tl.constexpr, BLOCK_B: tl.constexpr):
    """1 where input offs (< K) is active in any of the B rows (not |x| <= t), else 0: what the packers pack."""
    k_ok = offs < K
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
    if T_PER_CHANNEL:
        t = tl.load(t_ptr + offs, mask=k_ok, other=0.0)
    else:
        t = tl.load(t_ptr)
    return tl.max((_keep(x, t) & b_ok[:, None] & k_ok[None, :]).to(tl.int32), axis=0)


@triton.jit
def _compact_active_kernel(x_ptr, t_ptr, idx_ptr, active_ptr, B, K, stride_xb, T_PER_CHANNEL: tl.constexpr,
                           BLOCK_B: tl.constexpr, CHUNK: tl.constexpr):
    """Per chunk of CHUNK inputs: the indices of those active in any row (not |x| <= t), packed at the start of
    the chunk's segment of idx (in order), and how many there are."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    active = _active_inputs(x_ptr, t_ptr, offs, B, K, stride_xb, T_PER_CHANNEL, BLOCK_B)
    tl.store(idx_ptr + c * CHUNK + tl.cumsum(active, axis=0) - 1, offs, mask=active > 0)
    tl.store(active_ptr + c, tl.sum(active, axis=0))


@triton.jit
def _sparse_gemv_compact_kernel(
    x_ptr, wt_ptr, t_ptr, idx_ptr, active_ptr, bias_ptr, out_ptr, partial_ptr, zeros_ptr, counts_ptr, tickets_ptr,
    B, K, N, stride_xb, stride_wk, stride_ob, chunks_per_split, n_chunks,
    T_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, COUNT: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, REDUCE_S: tl.constexpr, REDUCE_TILES: tl.constexpr,
):
    """`_sparse_gemv_kernel` over the packed active inputs of its chunks (`_compact_active_kernel`): its steps
    follow the active inputs, not K, so at high sparsity every step loads BLOCK_K real weight rows."""
    pid_n, pid_k, offs_n, n_ok, offs_b, b_ok, acc, zeros = _start_program(B, N, BLOCK_B, BLOCK_K, BLOCK_N, USE_DOT)
    t_scalar = tl.load(t_ptr)  # used only when T_PER_CHANNEL is off
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, n_chunks)
    for c in range(c_start, c_end):
        n_active = tl.load(active_ptr + c)
        if COUNT:  # inputs no row keeps are zero in every row; the others are counted as they are masked
            zeros += tl.minimum(K - c * CHUNK, CHUNK) - n_active
        for j in range(0, n_active, BLOCK_K):
            offs_j = j + tl.arange(0, BLOCK_K)
            j_ok = offs_j < n_active
            k_idx = tl.load(idx_ptr + c * CHUNK + offs_j, mask=j_ok, other=0)
            acc, zeros = _packed_step(acc, zeros, k_idx, j_ok, x_ptr, wt_ptr, t_ptr, t_scalar, offs_b, b_ok, offs_n,
                                      n_ok, stride_xb, stride_wk, T_PER_CHANNEL, COUNT, USE_DOT, DOT_FP32)
    _store_slice(acc, zeros, offs_b, b_ok, offs_n, n_ok, pid_n, pid_k, B, N, bias_ptr, out_ptr, partial_ptr,
                 zeros_ptr, counts_ptr, tickets_ptr, stride_ob, HAS_BIAS, WRITE_PARTIAL, COUNT, USE_DOT,
                 FUSED_REDUCE, REDUCE_S, REDUCE_TILES)


@triton.jit
def _pack_active_kernel(x_ptr, t_ptr, idx_ptr, count_ptr, B, K, stride_xb, T_PER_CHANNEL: tl.constexpr,
                        BLOCK_B: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr):
    """One program: the indices of the inputs active in any row (not |x| <= t), in order, packed at the start of
    idx, and how many there are. The TILES loads are unrolled, so they are all in flight at once."""
    packed = tl.sum(tl.zeros((1,), dtype=tl.int32), axis=0)
    for i in tl.static_range(TILES):
        offs = i * TILE + tl.arange(0, TILE)
        active = _active_inputs(x_ptr, t_ptr, offs, B, K, stride_xb, T_PER_CHANNEL, BLOCK_B)
        tl.store(idx_ptr + packed + tl.cumsum(active, axis=0) - 1, offs, mask=active > 0)
        packed += tl.sum(active, axis=0)
    tl.store(count_ptr, packed)


@triton.jit
def _sparse_gemv_gather_kernel(
    x_ptr, wt_ptr, t_ptr, idx_ptr, count_ptr, bias_ptr, out_ptr, partial_ptr, zeros_ptr, counts_ptr, tickets_ptr,
    B, K, N, stride_xb, stride_wk, stride_ob, programs_k,
    T_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, COUNT: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, REDUCE_S: tl.constexpr, REDUCE_TILES: tl.constexpr,
):
    """The unrolled kernel over the packed list of active inputs (`_pack_active_kernel`): a slice is
    STEPS * BLOCK_K active inputs, so the slices, and the programs with work, shrink with the sparsity.
    `programs_k` programs per column block take slices pid_k, pid_k + programs_k, ... while any are left: a
    launch sized for the expected sparsity does one slice each, and a denser x costs time, not correctness.
    A program with no slice writes zero partials."""
    pid_n, pid_k, offs_n, n_ok, offs_b, b_ok, acc, zeros = _start_program(B, N, BLOCK_B, BLOCK_K, BLOCK_N, USE_DOT)
    total = tl.load(count_ptr)
    t_scalar = tl.load(t_ptr)  # used only when T_PER_CHANNEL is off
    for start in range(pid_k * STEPS * BLOCK_K, total, programs_k * STEPS * BLOCK_K):
        for i in tl.static_range(STEPS):
            pos = start + i * BLOCK_K + tl.arange(0, BLOCK_K)
            ok = pos < total
            k_idx = tl.load(idx_ptr + pos, mask=ok, other=0)
            acc, zeros = _packed_step(acc, zeros, k_idx, ok, x_ptr, wt_ptr, t_ptr, t_scalar, offs_b, b_ok, offs_n,
                                      n_ok, stride_xb, stride_wk, T_PER_CHANNEL, COUNT, USE_DOT, DOT_FP32)
    if COUNT:  # inputs outside the packed list are zero in every row: counted once, by the first slice
        if pid_k == 0:
            zeros += K - total
    _store_slice(acc, zeros, offs_b, b_ok, offs_n, n_ok, pid_n, pid_k, B, N, bias_ptr, out_ptr, partial_ptr,
                 zeros_ptr, counts_ptr, tickets_ptr, stride_ob, HAS_BIAS, WRITE_PARTIAL, COUNT, USE_DOT,
                 FUSED_REDUCE, REDUCE_S, REDUCE_TILES)
