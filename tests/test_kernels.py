"""The sparse kernels against float64 torch references, under Triton's CPU interpreter.

TRITON_INTERPRET=1 is set before triton is imported (it is read when a kernel is decorated), so every
kernel runs on CPU tensors here. Shapes are small and odd (not multiples of the tiles); outputs are
poisoned with NaN before each run so an element the kernel forgets to write fails the comparison.

Tolerance: one unit in the last place of the output dtype (the CPU interpreter rounds float32 to bfloat16
toward zero, the GPU to nearest) plus float32 accumulation error.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Interpret on CPU-only machines (read when the kernels are decorated, at import, and when Triton launches
# them: so it stays set; the backend itself never runs kernels on CPU). On a GPU the same tests run the
# compiled kernels on CUDA tensors.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
from lm_sparse.kernels.sparse_gemv import (  # noqa: E402
    LaunchConfig,
    interpreting,
    reserve_tickets,
    sparse_gemv,
    sparse_linear,
    sparse_linear_counted,
)
from lm_sparse.kernels.threshold_mask import threshold_mask_counted  # noqa: E402
from lm_sparse.kernels.reference import masked_input, round_threshold, sparse_linear_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert interpreting() == (DEVICE == "cpu"), "lm_sparse.kernels was imported before TRITON_INTERPRET was set"

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(batch: int, k: int, n: int, dtype: torch.dtype, sparsity: float, per_channel: bool,
            seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random x, wt, bias and a threshold that zeroes about `sparsity` of x (all of x when sparsity is 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g).to(dtype)
    wt = torch.randn(k, n, generator=g).div(k**0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    if sparsity >= 1.0:
        x.zero_()
        t = torch.zeros(k) if per_channel else 0.0
    elif per_channel:
        # A different threshold per input channel, at the given quantile of |x| on average.
        base = float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else -1.0
        t = (torch.rand(k, generator=g) * 0.4 + 0.8) * base
    else:
        t = float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else -1.0
    return x, wt, bias, round_threshold(t, dtype)


def _on_device(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _check(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor) -> None:
    assert not torch.isnan(y).any(), "kernel left unwritten (NaN-poisoned) outputs"
    dtype = y.dtype
    scale = masked_input(x, t).abs().double() @ wt.abs().double()
    tol = EPS[dtype] * ref.abs() + 1e-6 * scale + 1e-6
    err = (y.double() - ref).abs()
    worst = int((err - tol).argmax())
    assert (err <= tol).all(), (f"error {float(err.flatten()[worst]):.3g} > tolerance "
                                f"{float(tol.flatten()[worst]):.3g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0], ids=["s0", "s50", "s99", "allzero"])
def test_sparse_gemv_matches_float64_reference(dtype, batch, sparsity):
    """`choose_config`'s launch (the unrolled form, `steps`, as on a GPU, at the interpreter's small tiles; on a
    GPU its own tiles) against the float64 reference."""
    k, n = 83, 77  # not multiples of the interpreter tiles (16 x 32)
    for per_channel, bias_on in ((False, True), (True, False)):
        x, wt, bias, t = _inputs(batch, k, n, dtype, sparsity, per_channel, seed=batch * 100 + int(sparsity * 10))
        b = bias if bias_on else None
        out = torch.full((batch, n), float("nan"), dtype=dtype, device=DEVICE)
        result = sparse_gemv(*_on_device(x, wt, t, b), out=out, count_zeros=per_channel)
        y, zeros = result if per_channel else (result, None)
        _check(y.cpu(), sparse_linear_reference(x, wt, t, b), x, wt, t)
        if per_channel:  # the fused count equals the engine's (masked x == 0).sum(-1)
            assert torch.equal(zeros.cpu(), (masked_input(x, t) == 0).sum(-1))


@pytest.mark.parametrize("config", [LaunchConfig(32, 16, 1), LaunchConfig(16, 32, 3), LaunchConfig(64, 16, 8),
                                    LaunchConfig(32, 16, 1, compact_chunk=32),
                                    LaunchConfig(16, 16, 2, compact_chunk=16),
                                    LaunchConfig(64, 32, 8, compact_chunk=32),
                                    LaunchConfig(32, 16, 0, steps=2), LaunchConfig(64, 32, 0, steps=4),
                                    LaunchConfig(32, 16, 1, steps=1, gather=True),
                                    LaunchConfig(32, 16, 3, steps=1, gather=True),
                                    LaunchConfig(16, 8, 64, steps=2, gather=True),
                                    LaunchConfig(32, 16, 0, steps=2, fused_reduce=True),
                                    LaunchConfig(16, 16, 3, steps=1, gather=True, fused_reduce=True),
                                    LaunchConfig(16, 16, 2, compact_chunk=16, fused_reduce=True),
                                    LaunchConfig(64, 32, 0, steps=4, fused_reduce=True)],
                         ids=["direct", "split3", "split8", "compact", "compact-split2", "compact-split-all",
                              "steps2", "steps4-direct", "gather-one-program", "gather-3", "gather-every-slice",
                              "steps2-fused", "gather-3-fused", "compact-fused", "fused-without-split"])
@pytest.mark.parametrize("batch", [1, 4])
def test_sparse_gemv_tilings(config, batch):
    """Direct write (no split) and split-K with a partial reduce give the same float64-close result and the
    same zero counts (summed by the reduce launch, or written directly without a split); so does the compacted
    variant, whose steps follow the packed active inputs of 16- or 32-input chunks (101 inputs: a partial last
    chunk; split-all: more splits asked for than there are chunks); so does the unrolled variant (`steps`: 4
    programs of 2 x 16 inputs, the last one partial; or one program of 4 x 32 inputs, writing y directly); and
    the gathered one over the packed list (one program looping over every slice and writing y; three sharing
    the slices; more programs asked for than K could fill, most of them with no slice); and each of them with
    the fused reduce, where the last program of a column block sums the slices (nothing to fuse without a
    split). The fused reduce's tickets are back at zero after every launch."""
    x, wt, bias, t = _inputs(batch, 101, 45, torch.bfloat16, 0.5, True, seed=7)
    out = torch.full((batch, 45), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    y, zeros = sparse_gemv(*_on_device(x, wt, t, bias), config=config, out=out, count_zeros=True)
    _check(y.cpu(), sparse_linear_reference(x, wt, t, bias), x, wt, t)
    assert zeros.dtype == torch.int64 and torch.equal(zeros.cpu(), (masked_input(x, t) == 0).sum(-1))
    if config.fused_reduce:
        assert not reserve_tickets(torch.device(DEVICE)).any()


@pytest.mark.parametrize("config", [LaunchConfig(32, 16, 2, compact_chunk=32), LaunchConfig(32, 16, 2),
                                    LaunchConfig(32, 16, 2, steps=2, gather=True),
                                    LaunchConfig(32, 16, 0, steps=1, fused_reduce=True)],
                         ids=["compacted", "runtime-walk", "gathered", "fused-reduce"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0], ids=["s0", "s50", "s99", "allzero"])
def test_other_variants_match_float64_reference(config, dtype, batch, sparsity):
    """The variants the default (the unrolled form, `steps`) does not run: the compacted one (`compact_chunk`),
    the gathered one (`gather`), the runtime walk over whole K slices, and the unrolled form with the fused
    reduce (6 slices of 16 inputs), on the main test's odd shape: every
    dtype, batch, sparsity (all inputs active, none active), scalar and per-channel thresholds, with the zero
    counts."""
    k, n = 83, 77
    for per_channel, bias_on in ((False, True), (True, False)):
        x, wt, bias, t = _inputs(batch, k, n, dtype, sparsity, per_channel, seed=batch * 10 + int(sparsity * 10))
        b = bias if bias_on else None
        out = torch.full((batch, n), float("nan"), dtype=dtype, device=DEVICE)
        y, zeros = sparse_gemv(*_on_device(x, wt, t, b), config=config, out=out, count_zeros=True)
        _check(y.cpu(), sparse_linear_reference(x, wt, t, b), x, wt, t)
        assert torch.equal(zeros.cpu(), (masked_input(x, t) == 0).sum(-1))


@pytest.mark.parametrize("fused", [False, True], ids=["reduce-launch", "fused-reduce"])
@pytest.mark.parametrize("batch", [1, 8])
def test_reduce_sums_more_slices_than_one_tile(batch, fused):
    """700 inputs in 16-input programs: 44 K slices, read by the reduce launch as 16-slice tiles (three of them,
    the last partial), partial sums and zero counts alike; or by the last program of each column block, 16 (batch
    1) or 4 (batch 8: eleven tiles) slices a load."""
    x, wt, bias, t = _inputs(batch, 700, 40, torch.float32, 0.5, True, seed=3)
    out = torch.full((batch, 40), float("nan"), dtype=torch.float32, device=DEVICE)
    y, zeros = sparse_gemv(*_on_device(x, wt, t, bias), config=LaunchConfig(32, 16, 0, steps=1, fused_reduce=fused),
                           out=out, count_zeros=True)
    _check(y.cpu(), sparse_linear_reference(x, wt, t, bias), x, wt, t)
    assert torch.equal(zeros.cpu(), (masked_input(x, t) == 0).sum(-1))


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("batch", [1, 5])
def test_gathered_form_packs_more_inputs_than_one_tile(batch, per_channel):
    """2500 inputs: the packing launch takes three PACK_TILE steps, each placing its active inputs after the
    previous ones'; two programs per column block share the packed list's 64-input slices (a loop of about
    twenty each at this sparsity)."""
    from lm_sparse.kernels.sparse_gemv import PACK_TILE

    k = 2500
    assert 2 * PACK_TILE < k <= 3 * PACK_TILE
    x, wt, bias, t = _inputs(batch, k, 20, torch.float32, 0.5, per_channel, seed=11)
    out = torch.full((batch, 20), float("nan"), dtype=torch.float32, device=DEVICE)
    y, zeros = sparse_gemv(*_on_device(x, wt, t, bias), config=LaunchConfig(32, 16, 2, steps=4, gather=True),
                           out=out, count_zeros=True)
    _check(y.cpu(), sparse_linear_reference(x, wt, t, bias), x, wt, t)
    assert torch.equal(zeros.cpu(), (masked_input(x, t) == 0).sum(-1))


@pytest.mark.parametrize("config, message", [
    (LaunchConfig(32, 16, 1, compact_chunk=24), "compact_chunk=24 is not a power of two"),
    (LaunchConfig(32, 16, 1, gather=True), "gather needs steps >= 1"),
    (LaunchConfig(32, 16, 0, steps=2, gather=True), "gather needs steps >= 1, split_k >= 1"),
    (LaunchConfig(32, 16, 1, compact_chunk=32, steps=2, gather=True), "and no compact_chunk"),
], ids=["compact-chunk", "gather-without-steps", "gather-without-programs", "gather-and-compact"])
def test_bad_launch_configs_fail_with_one_line(config, message):
    x, wt, _, t = _inputs(1, 40, 24, torch.float32, 0.5, False, seed=1)
    with pytest.raises(ValueError, match=message):
        sparse_gemv(*_on_device(x, wt, t), config=config)


def test_threshold_semantics_match_engine_rule():
    """Entries equal to the threshold (in x's dtype) are dropped, NaN survives: as `Threshold` does."""
    from lm_sparse.engine.rules import Threshold

    values = [0.1, -0.1, 0.10009765625, 0.2, -0.3, 0.0, 0.05, -0.0]
    x = torch.tensor([values], dtype=torch.bfloat16)
    wt = torch.eye(8, dtype=torch.bfloat16)
    t = round_threshold(0.1, torch.bfloat16)
    y = sparse_gemv(*_on_device(x, wt, t)).cpu()
    assert torch.equal(y, Threshold(0.1)(x))
    x_nan = torch.tensor([values + [float("nan")]], dtype=torch.bfloat16)
    masked = threshold_mask_counted(*_on_device(x_nan, t))[0].cpu()
    torch.testing.assert_close(masked, Threshold(0.1)(x_nan), equal_nan=True, rtol=0, atol=0)


def test_custom_op_shapes_dense_fallback_and_opcheck():
    x, wt, bias, t = _inputs(12, 40, 24, torch.float32, 0.5, False, seed=3)
    xd, wtd, td, biasd = _on_device(x, wt, t, bias)
    # 12 rows > 8: dense GEMM on the masked input; 3-d input as the decode step passes it
    y = sparse_linear(xd.view(12, 1, 40), wtd, td, biasd)
    assert y.shape == (12, 1, 24)
    _check(y.cpu().view(12, 24), sparse_linear_reference(x, wt, t, bias), x, wt, t)
    y = sparse_linear(xd[:3].view(3, 1, 40), wtd, td, biasd)
    _check(y.cpu().view(3, 24), sparse_linear_reference(x[:3], wt, t, bias), x[:3], wt, t)
    torch.library.opcheck(torch.ops.lm_sparse.sparse_linear, (xd[:2].view(2, 1, 40), wtd, td, biasd),
                          test_utils=("test_schema", "test_faketensor"))
    for rows in (3, 12):  # kernel and dense fallback: output and per-row zero counts
        y, zeros = sparse_linear_counted(xd[:rows].view(rows, 1, 40), wtd, td, biasd)
        assert y.shape == (rows, 1, 24) and zeros.shape == (rows, 1) and zeros.dtype == torch.int64
        _check(y.cpu().view(rows, 24), sparse_linear_reference(x[:rows], wt, t, bias), x[:rows], wt, t)
        assert torch.equal(zeros.cpu().view(rows), (masked_input(x[:rows], t) == 0).sum(-1))
    torch.library.opcheck(torch.ops.lm_sparse.sparse_linear_counted, (xd[:2].view(2, 1, 40), wtd, td, biasd),
                          test_utils=("test_schema", "test_faketensor"))


def test_custom_op_traces_fullgraph():
    """The fake implementation lets torch.compile (fullgraph) trace through the op without a break."""
    import torch._dynamo.testing

    x, wt, bias, t = _inputs(2, 40, 24, torch.float32, 0.5, False, seed=4)
    xd, wtd, td, biasd = _on_device(x, wt, t, bias)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step(x):
        return torch.ops.lm_sparse.sparse_linear(x, wtd, td, biasd) * 2

    y = step(xd.view(2, 1, 40))
    assert counter.frame_count == 1
    _check(y.cpu().view(2, 24) / 2, sparse_linear_reference(x, wt, t, bias), x, wt, t)


def test_input_major_weight_is_a_view_and_linear_still_works():
    from lm_sparse.kernels.backend import make_input_major

    lin = nn.Linear(40, 24)
    x = torch.randn(5, 40)
    before = lin(x)
    wt = make_input_major(lin)
    assert wt.shape == (40, 24) and wt.is_contiguous()
    assert lin.weight.data_ptr() == wt.data_ptr() and lin.weight.shape == (24, 40)
    torch.testing.assert_close(lin(x), before)
    assert make_input_major(lin).data_ptr() == wt.data_ptr()  # idempotent, no second copy


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_threshold_mask_matches_reference(dtype, per_channel):
    # (3, 2500): rows longer than the kernel's 1024-column block, counted by several programs per row
    for shape, sparsity in (((3, 7, 83), 0.5), ((2, 130), 0.0), ((1, 1, 83), 1.0), ((5, 83), 0.99),
                            ((3, 2500), 0.5)):
        x, _, _, t = _inputs(int(torch.tensor(shape[:-1]).prod()), shape[-1], 1, dtype, sparsity, per_channel,
                             seed=len(shape))
        x = x.view(shape)
        expected = masked_input(x, t)
        y, zeros = threshold_mask_counted(*_on_device(x, t))
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y.cpu(), expected)
        assert zeros.dtype == torch.int64 and torch.equal(zeros.cpu(), (expected == 0).sum(-1))


def test_threshold_mask_ops_opcheck():
    x, _, _, t = _inputs(4, 83, 1, torch.float32, 0.5, True, seed=9)
    torch.library.opcheck(torch.ops.lm_sparse.threshold_mask_counted, tuple(_on_device(x.view(2, 2, 83), t)),
                          test_utils=("test_schema", "test_faketensor"))


def test_kernels_need_cuda_outside_the_tests():
    from lm_sparse.kernels.backend import kernel_device_problem

    assert kernel_device_problem(torch.device("cpu")) == "sparse_kernels=on needs a CUDA device (the model is on cpu)"
    if interpreting():  # the tests' and --smoke benchmarks' way in
        assert kernel_device_problem(torch.device("cpu"), allow_interpreter=True) is None


_COMPILE_FOR_H100 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lm_sparse.kernels import sparse_gemv as sg, threshold_mask as tm

target = GPUTarget("cuda", 90, 32)
ints = ("B", "K", "N", "stride_xb", "stride_wk", "stride_ob", "k_per_split")
for dtype in ("bf16", "fp16", "fp32"):
    p = f"*{dtype}"
    for use_dot in (False, True):
        sig = {"x_ptr": p, "wt_ptr": p, "t_ptr": "*fp32", "bias_ptr": p, "out_ptr": p, "partial_ptr": "*fp32",
               "zeros_ptr": "*i64", "counts_ptr": "*i64", "tickets_ptr": "*i32", **{n: "i32" for n in ints}}
        # the fused reduce (last program of a column block sums the slices) with the batch-8 path, two tiles
        consts = dict(T_PER_CHANNEL=use_dot, HAS_BIAS=True, WRITE_PARTIAL=True, COUNT=True, USE_DOT=use_dot,
                      DOT_FP32=False, BLOCK_B=16 if use_dot else 1, BLOCK_K=64 if use_dot else 32,
                      BLOCK_N=64 if use_dot else 128, FUSED_REDUCE=use_dot, REDUCE_S=4, REDUCE_TILES=2)
        sig.update({k: "constexpr" for k in consts})
        # What a launch specializes for real shapes: pointers 16-byte aligned, sizes and strides multiples of 16.
        names = sg._sparse_gemv_kernel.arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if sig[n] != "constexpr" and n != "B"}
        for steps in (0, 4):  # the runtime walk and the unrolled steps
            kernel = triton.compile(ASTSource(fn=sg._sparse_gemv_kernel, signature={**sig, "STEPS": "constexpr"},
                                              constexprs={**consts, "STEPS": steps}, attrs=attrs), target=target)
            if not use_dot:  # batch 1 streams the weight rows in 16-byte vector loads
                assert "ld.global.v4" in kernel.asm["ptx"], f"{dtype}: batch-1 weight loads not vectorized"
            else:  # the fused reduce: a barrier, then the ticket (one thread's acquire-release integer atomic at
                # GPU scope, as CUTLASS's semaphores do), and the slots read past L1
                ptx = kernel.asm["ptx"]
                assert "atom.global.gpu.acq_rel.add.u32" in ptx and "ld.global.cg" in ptx, dtype
                assert "bar.sync" in ptx[:ptx.index("atom.global.gpu.acq_rel.add.u32")], dtype
        # the compacted variant: the same arguments plus the packed indices, their counts and a chunk size
        csig = {**{n: t for n, t in sig.items() if n != "k_per_split"}, "idx_ptr": "*i32", "active_ptr": "*i32",
                "chunks_per_split": "i32", "n_chunks": "i32", "CHUNK": "constexpr"}
        cnames = sg._sparse_gemv_compact_kernel.arg_names
        cattrs = {(cnames.index(n),): [["tt.divisibility", 16]] for n in csig
                  if csig[n] != "constexpr" and n not in ("B", "chunks_per_split", "n_chunks")}
        kernel = triton.compile(ASTSource(fn=sg._sparse_gemv_compact_kernel, signature=csig,
                                          constexprs={**consts, "CHUNK": 512}, attrs=cattrs), target=target)
        if not use_dot:  # the gathered weight rows load in 16-byte vectors too
            assert "ld.global.v4" in kernel.asm["ptx"], f"{dtype}: compacted batch-1 weight loads not vectorized"
        # the gathered variant: one packed list of all of K, unrolled steps, programs sharing its slices
        gsig = {**{n: t for n, t in sig.items() if n != "k_per_split"}, "idx_ptr": "*i32", "count_ptr": "*i32",
                "programs_k": "i32", "STEPS": "constexpr"}
        gnames = sg._sparse_gemv_gather_kernel.arg_names
        gattrs = {(gnames.index(n),): [["tt.divisibility", 16]] for n in gsig
                  if gsig[n] != "constexpr" and n not in ("B", "programs_k", "count_ptr")}
        kernel = triton.compile(ASTSource(fn=sg._sparse_gemv_gather_kernel, signature=gsig,
                                          constexprs={**consts, "STEPS": 4}, attrs=gattrs), target=target)
        if not use_dot:
            assert "ld.global.v4" in kernel.asm["ptx"], f"{dtype}: gathered batch-1 weight loads not vectorized"
        pconsts = dict(T_PER_CHANNEL=use_dot, BLOCK_B=8 if use_dot else 1, TILE=1024, TILES=14)
        psig = {"x_ptr": p, "t_ptr": "*fp32", "idx_ptr": "*i32", "count_ptr": "*i32", "B": "i32", "K": "i32",
                "stride_xb": "i32", **{k: "constexpr" for k in pconsts}}
        triton.compile(ASTSource(fn=sg._pack_active_kernel, signature=psig, constexprs=pconsts), target=target)
        consts = dict(T_PER_CHANNEL=use_dot, BLOCK_B=8 if use_dot else 1, CHUNK=512)
        sig = {"x_ptr": p, "t_ptr": "*fp32", "idx_ptr": "*i32", "active_ptr": "*i32", "B": "i32", "K": "i32",
               "stride_xb": "i32", **{k: "constexpr" for k in consts}}
        triton.compile(ASTSource(fn=sg._compact_active_kernel, signature=sig, constexprs=consts), target=target)
    consts = dict(HAS_BIAS=True, COUNT=True, BLOCK=256, BLOCK_B=8, BLOCK_S=16)
    sig = {"partial_ptr": "*fp32", "bias_ptr": p, "out_ptr": p, "zeros_ptr": "*i64", "counts_ptr": "*i64",
           "B": "i32", "N": "i32", "stride_ob": "i32", "SPLIT_K": "i32", **{k: "constexpr" for k in consts}}
    triton.compile(ASTSource(fn=sg._reduce_partials_kernel, signature=sig, constexprs=consts), target=target)
    for per_channel in (False, True):
        consts = dict(T_PER_CHANNEL=per_channel, BLOCK=1024)
        sig = {"x_ptr": p, "t_ptr": "*fp32", "y_ptr": p, "zeros_ptr": "*i32", "K": "i32",
               **{k: "constexpr" for k in consts}}
        triton.compile(ASTSource(fn=tm._threshold_mask_kernel, signature=sig, constexprs=consts), target=target)
print("compiled")
"""


def test_kernels_compile_for_h100_without_a_gpu(tmp_path):
    """The GPU code path (native-dtype tl.dot, fused counts, reduce, mask, the compacted and gathered variants)
    compiles to sm_90 cubin here.

    The interpreter runs the kernels' semantics; this runs Triton's real compiler (bundled ptxas), which
    needs no GPU, so the code the GPU will run is at least valid for an H100.
    """
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path),
           "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_sparse_linear_on_gpu_native(dtype):
    """On a GPU the tensor-core dot path (native dtypes) runs instead of the interpreter's float32 dot."""
    for batch in (1, 2, 8):
        x, wt, bias, t = (v.cuda() for v in _inputs(batch, 1000, 515, dtype, 0.5, True, seed=batch))
        out = torch.full((batch, 515), float("nan"), dtype=dtype, device="cuda")
        y = sparse_gemv(x, wt, t, bias, out=out)
        _check(y.cpu(), sparse_linear_reference(x, wt, t, bias).cpu(), x.cpu(), wt.cpu(), t.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [LaunchConfig(64, 32, 0, steps=4, fused_reduce=True),
                                    LaunchConfig(64, 32, 4, steps=4, gather=True, fused_reduce=True),
                                    LaunchConfig(64, 32, 0, steps=4)],
                         ids=["fused-reduce", "gathered-fused", "unrolled"])
@pytest.mark.parametrize("batch", [1, 4])
def test_variants_replay_in_a_cuda_graph(config, batch):
    """As a compiled decode step runs them: several launches captured in one CUDA graph, replayed on new inputs
    copied into the captured ones; every replay matches the reference, and the fused reduce's tickets are back
    at zero after each (no replay inherits another's count). Real shapes, so many programs race for the
    tickets."""
    import lm_sparse.kernels.sparse_gemv as sg

    k, n, calls = 4096, 2048, 3
    sets = [_inputs(batch, k, n, torch.bfloat16, 0.8, True, seed=s) for s in range(calls)]
    xs, wts, biases, ts = ([v.cuda() for v in group] for group in zip(*sets))
    sg.reserve_tickets(xs[0].device)
    outs = [sparse_gemv(x, wt, t, b, config=config) for x, wt, t, b in zip(xs, wts, ts, biases)]  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [sparse_gemv(x, wt, t, b, config=config) for x, wt, t, b in zip(xs, wts, ts, biases)]
    for replay in range(3):
        for x, s in zip(xs, range(calls)):
            fresh, *_ = _inputs(batch, k, n, torch.bfloat16, 0.8, True, seed=100 + 10 * replay + s)
            x.copy_(fresh.cuda())
        graph.replay()
        torch.cuda.synchronize()
        for y, x, wt, t, b in zip(outs, xs, wts, ts, biases):
            _check(y.cpu(), sparse_linear_reference(x, wt, t, b).cpu(), x.cpu(), wt.cpu(), t.cpu())
        assert not sg.reserve_tickets(xs[0].device).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_reduce_without_tickets_is_an_error_during_capture(monkeypatch):
    """A buffer allocated during capture would belong to the graph: the launch says what to do instead."""
    import lm_sparse.kernels.sparse_gemv as sg

    monkeypatch.setattr(sg, "_TICKET_BUFFERS", {})
    x, wt, bias, t = (v.cuda() for v in _inputs(1, 512, 256, torch.bfloat16, 0.5, False, seed=1))
    config = LaunchConfig(64, 32, 0, steps=4, fused_reduce=True)
    sg.sparse_gemv(x, wt, t, bias, config=LaunchConfig(64, 32, 0, steps=4))  # compiles outside the capture
    sg._TICKET_BUFFERS.clear()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="reserve_tickets"):
        with torch.cuda.graph(graph):
            sg.sparse_gemv(x, wt, t, bias, config=config)
