"""Input-sparse GEMV for decode steps: y = (x * (|x| > t)) @ W^T + bias, reading only active weight rows.

Layout: the weight is stored input-major, wt = W^T of shape [K, N] (row k holds every output's weight for
input k, contiguous). An inactive input k then skips one contiguous row of wt, so the bytes the kernel
reads shrink with the sparsity of x. The module's own `weight` is the view `wt.t()` (see `backend.py`), so
prefill still runs one cuBLAS GEMM on the same storage and no weight is stored twice.

Kernel: the grid is (output blocks of BLOCK_N, slices of K). A program takes its K slice in steps of BLOCK_K:
it loads x for all (up to 8) rows, applies the threshold in registers (no masked copy of x is written), takes
the union of the rows' active inputs, and loads only those rows of wt. Every weight is read at most once per
launch, whatever the batch. What runs on a GPU (`choose_config`) is the unrolled form (`LaunchConfig.steps`):
every program takes exactly STEPS steps, unrolled, so all of its loads are in flight at once, and there are
thousands of short programs. (The runtime walk, a few hundred programs of ~26 dependent steps each, made
TEAL decoding on an H200 0.70-0.96x of dense; the unrolled form 0.82-0.95x: BENCHMARKS.md.)

Accumulation is float32. With SPLIT_K > 1 every slice writes float32 partial sums to its own slot of a
[SPLIT_K, B, N] buffer and a second small kernel adds them (plus bias) and casts: no atomics at all, so the
kernel works the same for bfloat16, float16 and float32, and its result is deterministic run to run (the
greedy-decoding equality tests rely on that). The cost is one extra launch and SPLIT_K * B * N * 4 bytes of
traffic (the batch-1 defaults on Llama-3-8B shapes: 16 or 28 slices, written and read again, 0.8-1.6% of the
dense weight bytes, 8-16% of what is read at s = 0.9). The reduce reads the slices as [16, BLOCK] tiles, so a
long split is a few round trips, not one dependent load per slice. With a single slice the first kernel
writes y. The zero counts of the masked x (for the sparsity report) are written per K slice and summed by the
same reduce launch, so counting adds no launch. (The building blocks the kernels share: `gemv_parts.py`.)
`LaunchConfig.fused_reduce` (in the sweep, not yet measured) drops that launch: the last program of each column
block to finish, known by an int32 ticket (no floating-point atomics), sums the slots in the same fixed order.

Two variants (`gemv_packed.py`), in `benchmarks/bench_gemv.py --sweep`'s grids, not yet measured to win: both
start with a small launch that packs the indices of the inputs active in any row (a prefix sum in registers),
so that every step loads BLOCK_K real weight rows. The gathered form (`LaunchConfig.gather`, in the small
grid) packs all of K into one list and runs the unrolled programs over it: at s = 0.9 a tenth of the programs
have work, where the unrolled kernel's floor is one program per K slice whatever the sparsity. The compacted
one (`compact_chunk`) packs per chunk and walks each chunk's list in a runtime loop. The counts and the
split-K reduce are the same.

Batch 1 multiplies and keeps a [BLOCK_K, BLOCK_N] accumulator (one reduction at the end); batch 2..8 pads
the rows to 16 and uses `tl.dot` (tensor cores). Above MAX_SPARSE_BATCH rows, or above the op's `max_rows`
argument (the backend lowers it where the union of the rows' active inputs would be nearly dense), the op
runs a dense GEMM on the masked input instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemv_packed import (
    _compact_active_kernel,
    _pack_active_kernel,
    _sparse_gemv_compact_kernel,
    _sparse_gemv_gather_kernel,
)
from .gemv_parts import _load_x, _reduce_partials_kernel, _start_program, _store_slice, _walk_step
from .reference import masked_input

MAX_SPARSE_BATCH = 8
PACK_TILE = 1024  # inputs per unrolled step of the gathered form's packing launch
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this module is imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, wt_ptr, t_ptr, bias_ptr, out_ptr, partial_ptr, zeros_ptr, counts_ptr, tickets_ptr,
    B, K, N, stride_xb, stride_wk, stride_ob, k_per_split,
    T_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, COUNT: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, REDUCE_S: tl.constexpr, REDUCE_TILES: tl.constexpr,
):
    pid_n, pid_k, offs_n, n_ok, offs_b, b_ok, acc, zeros = _start_program(B, N, BLOCK_B, BLOCK_K, BLOCK_N, USE_DOT)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    t_scalar = tl.load(t_ptr)  # used only when T_PER_CHANNEL is off (then each step loads its slice of t)

    if STEPS > 0:
        # The program's slice is exactly STEPS steps (k_per_split = STEPS * BLOCK_K), unrolled: no step waits on
        # another, so the x loads of every step and then their weight rows are all in flight at once. Many short
        # programs, rather than few long ones, is what keeps enough bytes in flight to use the bandwidth.
        for i in tl.static_range(STEPS):
            offs_k = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            x = _load_x(x_ptr, offs_b, b_ok, offs_k, k_ok, stride_xb, USE_DOT)
            if T_PER_CHANNEL:
                t = tl.load(t_ptr + offs_k, mask=k_ok, other=0.0)
            else:
                t = t_scalar
            acc, zeros = _walk_step(acc, zeros, x, t, offs_k, k_ok, offs_b, b_ok, offs_n, n_ok, wt_ptr, stride_wk,
                                    COUNT, USE_DOT, DOT_FP32)
    else:
        # A runtime walk over a long slice. x (and a per-channel t) is loaded one step ahead: the next step's
        # load is in flight while this step's weight rows load, so each step waits on one memory round trip.
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x_next = _load_x(x_ptr, offs_b, b_ok, offs_k, k_ok, stride_xb, USE_DOT)
        if T_PER_CHANNEL:
            t_next = tl.load(t_ptr + offs_k, mask=k_ok, other=0.0)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            x = x_next
            offs_k_next = offs_k + BLOCK_K
            k_next_ok = offs_k_next < k_end
            x_next = _load_x(x_ptr, offs_b, b_ok, offs_k_next, k_next_ok, stride_xb, USE_DOT)
            if T_PER_CHANNEL:
                t = t_next
                t_next = tl.load(t_ptr + offs_k_next, mask=k_next_ok, other=0.0)
            else:
                t = t_scalar
            acc, zeros = _walk_step(acc, zeros, x, t, offs_k, k_ok, offs_b, b_ok, offs_n, n_ok, wt_ptr, stride_wk,
                                    COUNT, USE_DOT, DOT_FP32)

    _store_slice(acc, zeros, offs_b, b_ok, offs_n, n_ok, pid_n, pid_k, B, N, bias_ptr, out_ptr, partial_ptr,
                 zeros_ptr, counts_ptr, tickets_ptr, stride_ob, HAS_BIAS, WRITE_PARTIAL, COUNT, USE_DOT,
                 FUSED_REDUCE, REDUCE_S, REDUCE_TILES)


def launch_device(t: torch.Tensor):
    """The context that makes `t`'s GPU the current device for a Triton launch (nothing on other devices)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and K split of one launch (`choose_config` picks them; benchmarks may sweep them)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    #: 0: every program walks its K slice in BLOCK_K steps, skipping inactive rows by masked loads. A power of
    #: two: a first small launch packs the active inputs of each chunk of this many, and the programs step
    #: through those only (`split_k` then counts programs over whole chunks).
    compact_chunk: int = 0
    #: 0: `split_k` slices, each walked in a runtime loop. N > 0: every program takes exactly N unrolled
    #: BLOCK_K steps (the split is then cdiv(K, N * BLOCK_K) and `split_k` is ignored).
    steps: int = 0
    #: The gathered form (with `steps`): a first one-program launch packs the active inputs of all of K into one
    #: list; the unrolled programs step through it, `steps` BLOCK_K-wide steps a slice, and `split_k` programs
    #: per column block share the slices (size it for the expected sparsity: with cdiv(active inputs, steps *
    #: block_k) programs, each takes one slice).
    gather: bool = False
    #: With a K split: the last program of each column block sums the slices' partials itself (int32 tickets,
    #: `reserve_tickets`) instead of a second launch. One launch fewer per matrix; the sum's order is the same.
    fused_reduce: bool = False


#: A JSON file of measured launch configurations (`benchmarks/bench_gemv.py --sweep --write-configs`) that
#: `choose_config` takes before its own rule, for the (batch, in, out) shapes it lists.
CONFIGS_ENV = "LM_SPARSE_GEMV_CONFIGS"


@functools.lru_cache(maxsize=None)
def load_config_table(path: str) -> dict[tuple[int, int, int], LaunchConfig]:
    """{(batch, in_features, out_features): LaunchConfig} from a `--write-configs` file:
    {"configs": [{"batch": 1, "in": 4096, "out": 14336, "config": {"block_n": 128, ...}}, ...]}."""
    import json

    try:
        with open(path) as f:
            entries = json.load(f)["configs"]
        return {(int(e["batch"]), int(e["in"]), int(e["out"])): LaunchConfig(**e["config"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{CONFIGS_ENV}={path}: not a launch-configuration file written by "
                         f"bench_gemv.py --write-configs ({type(exc).__name__}: {exc})") from exc


def choose_config(batch: int, k: int, n: int, device: torch.device) -> LaunchConfig:
    """The launch for `batch` rows of a [K, N] input-major weight: on CUDA, the configuration the file named by
    LM_SPARSE_GEMV_CONFIGS lists for this shape, else the unrolled kernel at tiles measured on an H200; under
    the interpreter, the unrolled kernel at small tiles."""
    if interpreting() or device.type != "cuda":
        return LaunchConfig(32, 16, 0, steps=2)  # the GPU's unrolled code path, on the interpreter's small tiles
    table = os.environ.get(CONFIGS_ENV)
    if table:
        found = load_config_table(table).get((batch, k, n))
        if found is not None:
            return found
    # Short unrolled programs, many of them: each program's loads are all in flight at once (see STEPS).
    # Batch 1: the fastest of bench_gemv's 24-candidate sweep (s = 0.5 and 0.9 together) on an H200 for every
    # Llama-3-8B decode shape (BENCHMARKS.md): 64 x 32 tiles, 8 steps a program where K = 4096, 16 where K = 14336.
    if batch == 1:
        return LaunchConfig(64, 32, 0, num_warps=4, steps=16 if k > 8192 else 8)
    # 2..8 rows (tensor cores): not yet measured in CUDA graphs; bench_gemv --sweep --batches 2,4,8 tunes it.
    return LaunchConfig(64, 64, 0, num_warps=4, steps=4)


TICKETS = 1 << 16  # column blocks a fused-reduce launch may have
_TICKET_BUFFERS: dict[torch.device, torch.Tensor] = {}


def fused_reduce_slices(use_dot: bool) -> int:
    """Slices the fused reduce loads at once: [4, 16, BLOCK_N] tiles for 2..8 rows, [16, 1, BLOCK_N] for one."""
    return 4 if use_dot else 16


def reserve_tickets(device: torch.device) -> torch.Tensor:
    """The fused reduce's int32 tickets on `device` (one per column block), allocated once, zero, and left at zero
    by every launch. A CUDA graph keeps the address it captured, so the buffer must exist before capture:
    `attach_decode_kernels` reserves it; here, during a capture, a missing buffer is an error. Launches that
    share it must not overlap, i.e. run on one stream per device (as decoding does)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = _TICKET_BUFFERS.get(device)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("sparse_gemv: fused_reduce's tickets must be allocated before CUDA graph capture: "
                               "call lm_sparse.kernels.sparse_gemv.reserve_tickets(device) first")
        buffer = _TICKET_BUFFERS[device] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
    return buffer


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor | None = None,
                config: LaunchConfig | None = None, out: torch.Tensor | None = None,
                count_zeros: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: x [B, K] (B <= MAX_SPARSE_BATCH, unit stride in K), wt [K, N] contiguous rows.

    `threshold` is float32, rounded to x's dtype (`reference.round_threshold`): 0-d for one scalar, or
    1-d of length K per input channel. Returns y [B, N] in x's dtype; with `count_zeros` also the number
    of zero entries of the masked x per row (int64 [B]), counted in the same pass.
    """
    B, K = x.shape
    N = wt.shape[1]
    if B > MAX_SPARSE_BATCH:
        raise ValueError(f"sparse_gemv: batch {B} > {MAX_SPARSE_BATCH}; use the dense path")
    if x.stride(-1) != 1 or wt.stride(-1) != 1:
        raise ValueError("sparse_gemv: x and wt need unit stride in their last dimension")
    cfg = config or choose_config(B, K, N, x.device)
    chunk = cfg.compact_chunk
    if cfg.gather:
        if chunk or cfg.steps < 1 or cfg.split_k < 1:
            raise ValueError(f"sparse_gemv: gather needs steps >= 1, split_k >= 1 and no compact_chunk (got {cfg})")
        split = min(cfg.split_k, triton.cdiv(K, cfg.steps * cfg.block_k))  # more programs would have no slice
    elif chunk:
        if chunk & (chunk - 1):
            raise ValueError(f"sparse_gemv: compact_chunk={chunk} is not a power of two")
        n_chunks = triton.cdiv(K, chunk)
        chunks_per_split = triton.cdiv(n_chunks, cfg.split_k)
        split = triton.cdiv(n_chunks, chunks_per_split)
    elif cfg.steps:
        k_per_split = cfg.steps * cfg.block_k
        split = triton.cdiv(K, k_per_split)
    else:
        k_per_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
        split = triton.cdiv(K, k_per_split)
    if out is None:
        out = torch.empty((B, N), device=x.device, dtype=x.dtype)
    partial = torch.empty((split, B, N), device=x.device, dtype=torch.float32) if split > 1 else out
    use_dot = B > 1
    bias_arg = bias if bias is not None else out
    zeros = torch.empty((split, B), device=x.device, dtype=torch.int64) if count_zeros else out
    counts = torch.empty(B, device=x.device, dtype=torch.int64) if count_zeros and split > 1 else zeros
    fused = cfg.fused_reduce and split > 1
    tickets = reserve_tickets(x.device) if fused else zeros
    reduce_s = fused_reduce_slices(use_dot)
    flags = dict(T_PER_CHANNEL=threshold.dim() == 1, HAS_BIAS=bias is not None, WRITE_PARTIAL=split > 1,
                 COUNT=count_zeros, USE_DOT=use_dot, DOT_FP32=interpreting(), BLOCK_B=16 if use_dot else 1,
                 BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, FUSED_REDUCE=fused,
                 REDUCE_S=reduce_s, REDUCE_TILES=triton.cdiv(split, reduce_s) if fused else 1)
    grid = (triton.cdiv(N, cfg.block_n), split)
    if fused and grid[0] > TICKETS:
        raise ValueError(f"sparse_gemv: fused_reduce takes at most {TICKETS} column blocks (N / block_n), "
                         f"got {grid[0]}")
    with launch_device(x):  # Triton launches on the current device; a model split over GPUs has several
        if cfg.gather:
            idx = torch.empty(K + 1, device=x.device, dtype=torch.int32)  # the packed list, then its length
            _pack_active_kernel[(1,)](
                x, threshold, idx, idx[K:], B, K, x.stride(0), T_PER_CHANNEL=flags["T_PER_CHANNEL"],
                BLOCK_B=triton.next_power_of_2(B), TILE=PACK_TILE, TILES=triton.cdiv(K, PACK_TILE), num_warps=8)
            _sparse_gemv_gather_kernel[grid](
                x, wt, threshold, idx, idx[K:], bias_arg, out, partial, zeros, counts, tickets,
                B, K, N, x.stride(0), wt.stride(0), out.stride(0), split, STEPS=cfg.steps, **flags)
        elif chunk:
            idx = torch.empty(n_chunks * chunk, device=x.device, dtype=torch.int32)
            active = torch.empty(n_chunks, device=x.device, dtype=torch.int32)
            _compact_active_kernel[(n_chunks,)](
                x, threshold, idx, active, B, K, x.stride(0), T_PER_CHANNEL=flags["T_PER_CHANNEL"],
                BLOCK_B=triton.next_power_of_2(B), CHUNK=chunk, num_warps=4)
            _sparse_gemv_compact_kernel[grid](
                x, wt, threshold, idx, active, bias_arg, out, partial, zeros, counts, tickets,
                B, K, N, x.stride(0), wt.stride(0), out.stride(0), chunks_per_split, n_chunks, CHUNK=chunk, **flags)
        else:
            _sparse_gemv_kernel[grid](
                x, wt, threshold, bias_arg, out, partial, zeros, counts, tickets,
                B, K, N, x.stride(0), wt.stride(0), out.stride(0), k_per_split, STEPS=cfg.steps, **flags)
        if split > 1 and not fused:
            block = 256
            _reduce_partials_kernel[(triton.cdiv(B * N, block),)](
                partial, bias_arg, out, zeros, counts, B, N, out.stride(0), split,
                HAS_BIAS=bias is not None, COUNT=count_zeros, BLOCK=block, BLOCK_B=MAX_SPARSE_BATCH,
                BLOCK_S=min(16, triton.next_power_of_2(split)), num_warps=4,
            )
    if count_zeros:
        return out, (counts if split > 1 else zeros[0])
    return out


def dense_masked_linear(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The dense fallback: one GEMM on the masked input (the engine's masked-dense path)."""
    return F.linear(masked_input(x, threshold), wt.t(), bias)


def _dense_rows(rows: int, max_rows: int) -> bool:
    return rows == 0 or rows > min(max_rows, MAX_SPARSE_BATCH)


@torch.library.custom_op("lm_sparse::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor,
                  bias: torch.Tensor | None = None, max_rows: int = MAX_SPARSE_BATCH) -> torch.Tensor:
    """y = (x * (|x| > t)) @ wt + bias for x [..., K]; sparse kernel up to `max_rows` rows (at most 8), dense above.

    wt is the input-major weight [K, N]; threshold is float32 rounded to x's dtype (0-d or [K]).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _dense_rows(x2.shape[0], max_rows):
        y = dense_masked_linear(x2, wt, threshold, bias)
    else:
        y = sparse_gemv(x2.contiguous(), wt, threshold, bias)
    return y.reshape(*lead, wt.shape[1])


@sparse_linear.register_fake
def _sparse_linear_fake(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor,
                        bias: torch.Tensor | None = None, max_rows: int = MAX_SPARSE_BATCH) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


@torch.library.custom_op("lm_sparse::sparse_linear_counted", mutates_args=())
def sparse_linear_counted(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor,
                          bias: torch.Tensor | None = None,
                          max_rows: int = MAX_SPARSE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_linear` plus the number of zero entries of the masked x per row (int64, x.shape[:-1]).

    The count is what the engine records for its sparsity report; counting in the kernel's own pass
    spares the decode step a masked copy and a reduction per matrix.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _dense_rows(x2.shape[0], max_rows):
        xm = masked_input(x2, threshold)
        y, zeros = F.linear(xm, wt.t(), bias), (xm == 0).sum(-1)
    else:
        y, zeros = sparse_gemv(x2.contiguous(), wt, threshold, bias, count_zeros=True)
    return y.reshape(*lead, wt.shape[1]), zeros.reshape(lead)


@sparse_linear_counted.register_fake
def _sparse_linear_counted_fake(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor,
                                bias: torch.Tensor | None = None,
                                max_rows: int = MAX_SPARSE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((*x.shape[:-1], wt.shape[1])), x.new_empty(x.shape[:-1], dtype=torch.int64)
