"""Registers, spills and register-limited occupancy of the decode kernels as compiled for an H100 (sm_90).

No GPU needed: Triton's own compiler (bundled ptxas) builds each variant for sm_90 and the bundled cuobjdump
reads the cubin's resource usage. What it answers: how many programs of a launch configuration an SM can hold
at once (65,536 registers per SM, at most 2,048 threads and 32 programs), i.e. how many waves a launch of a
given grid takes, which is what bounds a kernel whose programs each wait on a memory round trip or two.

    python benchmarks/kernel_resources.py                      # the batch-1 and batch-8 candidates, bf16
    python benchmarks/kernel_resources.py --out resources.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # compile, whatever the caller's environment says (read when kernels are decorated)
    os.environ["TRITON_INTERPRET"] = "0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lm_sparse.kernels import sparse_gemv as sg  # noqa: E402

REGISTERS_PER_SM, THREADS_PER_SM, PROGRAMS_PER_SM = 65536, 2048, 32
# Pointer arguments by name: the activations' dtype, or a fixed one.
POINTERS = {"t_ptr": "*fp32", "partial_ptr": "*fp32", "zeros_ptr": "*i64", "counts_ptr": "*i64",
            "tickets_ptr": "*i32", "idx_ptr": "*i32", "active_ptr": "*i32", "count_ptr": "*i32"}
NOT_DIVISIBLE = {"B", "programs_k", "count_ptr", "chunks_per_split", "n_chunks"}  # runtime values, any size


def compile_for_sm90(fn, constexprs: dict, dtype: str, num_warps: int):
    """Triton's compiled kernel of `fn` for sm_90; every other argument typed by name (sizes and strides i32,
    specialized as multiples of 16 as real shapes are)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = POINTERS.get(name, f"*{dtype}") if name.endswith("_ptr") else "i32"
        if name not in NOT_DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def resources(kernel) -> dict:
    """{"registers", "stack_bytes"} per thread, read from the cubin by the cuobjdump Triton ships."""
    tool = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not tool:
        raise SystemExit("kernel_resources: Triton's bundled cuobjdump was not found")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool[0], "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(part.split(":", 1) for line in text.splitlines() if "REG:" in line for part in line.split())
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}


def programs_per_sm(registers: int, num_warps: int) -> int:
    """Programs an SM holds at once, as its registers (allocated per warp in units of 256) and threads allow."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(REGISTERS_PER_SM // (per_warp * num_warps), THREADS_PER_SM // (32 * num_warps), PROGRAMS_PER_SM)


def candidates(batch: int) -> list[tuple[str, sg.LaunchConfig]]:
    """The variants and tiles a sweep times: `choose_config`'s H100/H200 default at K = 4096 and 14336, and the
    gathered form at the same tiles; the first tile also with the fused reduce."""
    if batch == 1:
        tiles = [(64, 32, 4), (32, 32, 4), (64, 32, 2), (128, 32, 4)]
    else:
        tiles = [(64, 64, 4), (128, 64, 4), (64, 32, 4)]
    out = []
    for bn, bk, warps in tiles:
        for steps in (4, 8, 16):
            out.append(("unrolled", sg.LaunchConfig(bn, bk, 0, warps, steps=steps)))
            out.append(("gathered", sg.LaunchConfig(bn, bk, 1, warps, steps=steps, gather=True)))
    bn, bk, warps = tiles[0]
    for steps in (8, 16):
        out.append(("unrolled, fused reduce", sg.LaunchConfig(bn, bk, 0, warps, steps=steps, fused_reduce=True)))
    return out


def run(batches: list[int], dtype: str, limit: int | None = None) -> list[dict]:
    """One row per (batch, candidate) (the first `limit` candidates of each batch), then the packing launch."""
    rows = []
    for batch in batches:
        use_dot = batch > 1
        for variant, cfg in candidates(batch)[:limit]:
            consts = dict(T_PER_CHANNEL=False, HAS_BIAS=False, WRITE_PARTIAL=True, COUNT=True, USE_DOT=use_dot,
                          DOT_FP32=False, BLOCK_B=16 if use_dot else 1, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
                          STEPS=cfg.steps, FUSED_REDUCE=cfg.fused_reduce, REDUCE_S=sg.fused_reduce_slices(use_dot),
                          REDUCE_TILES=2 if cfg.fused_reduce else 1)
            fn = sg._sparse_gemv_gather_kernel if cfg.gather else sg._sparse_gemv_kernel
            used = resources(compile_for_sm90(fn, consts, dtype, cfg.num_warps))
            rows.append({"batch": batch, "variant": variant, "block_n": cfg.block_n, "block_k": cfg.block_k,
                         "num_warps": cfg.num_warps, "steps": cfg.steps, **used,
                         "programs_per_sm": programs_per_sm(used["registers"], cfg.num_warps)})
    for batch in batches:  # the gathered form's packing launch as sparse_gemv runs it: one program of 8 warps
        tiles = -(-14336 // sg.PACK_TILE)
        consts = dict(T_PER_CHANNEL=False, BLOCK_B=triton.next_power_of_2(batch), TILE=sg.PACK_TILE, TILES=tiles)
        used = resources(compile_for_sm90(sg._pack_active_kernel, consts, dtype, 8))
        rows.append({"batch": batch, "variant": "pack (K = 14336)", "block_n": None, "block_k": sg.PACK_TILE,
                     "num_warps": 8, "steps": tiles, **used, "programs_per_sm": programs_per_sm(used["registers"], 8)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--limit", type=int, default=None, help="only the first N candidates of each batch")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    rows = run([int(b) for b in args.batches.split(",")], args.dtype, args.limit)
    print(f"sm_90, {args.dtype}, triton {triton.__version__}\n")
    print("| batch | variant | BLOCK_N x BLOCK_K | warps | steps | registers | spill stack bytes | programs per SM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['block_n'] or '-'} x {r['block_k']} | {r['num_warps']} | "
              f"{r['steps']} | {r['registers']} | {r['stack_bytes']} | {r['programs_per_sm']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"target": "sm_90", "dtype": args.dtype, "triton": triton.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
