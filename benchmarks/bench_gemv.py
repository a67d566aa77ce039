"""Microbenchmark of the input-sparse GEMV (`lm_sparse::sparse_linear`) against cuBLAS dense F.linear.

For every weight shape (in x out), batch and sparsity: the time of the kernel as decode steps run it (zero
counting on, inside a CUDA graph), with `choose_config`'s tiles ("default") and, with `--sweep`, with the
candidate that is fastest over s = 0.5 and 0.9 together ("best"); bytes the kernel actually reads (union of
active weight rows + x + y), achieved GB/s, speedup over cuBLAS F.linear on the ordinary [out, in] weight at
the same batch (and cuBLAS's time on the input-major view `wt.t()`, the layout the dense fallback and prefill
use once the kernels are attached), and the ideal 1/(1-s). The device's copy bandwidth is measured in the
same run.

Timing (GPU): one CUDA graph of R back-to-back calls, each on its own copy of the weight and its own input
(R copies hold 4x the L2 cache at the bytes read, up to 64 copies, so that calls do not find their rows in
L2), replayed; the median replay over R. This is how a compiled decode step runs them: no Python or launch overhead
between kernels, and no kernel reads weights the previous one left in L2. (`do_bench` times each call from
Python: for a kernel of tens of microseconds it measures the launch path, not the kernel.)

Every timed configuration's output is also checked against the float64 reference of the masked product on a
fresh input, into a NaN-poisoned output (`rel_error`; the script exits 1 after writing its results if one is
over its dtype's tolerance; a sweep candidate that fails the check is not timed, never wins, and is listed in
its tuning record as "rejected", with the same exit status), and the JSON is rewritten after every row, so a
run cut off by a time limit keeps what it measured. `--write-configs` writes each (batch, shape)'s best
configuration in the format `LM_SPARSE_GEMV_CONFIGS` reads (`choose_config` then uses it).
Prints a Markdown table and writes JSON.

    python benchmarks/bench_gemv.py --out bench_gemv.json           # GPU: Llama-3-8B and 70B shapes, bf16
    python benchmarks/bench_gemv.py --sweep --out bench_gemv.json   # GPU: also the fastest tiling
    python benchmarks/bench_gemv.py --shapes 8b-upgate --batches 1  # GPU: a subset
    python benchmarks/bench_gemv.py --sweep --write-configs gemv_configs.json ...  # GPU: tuned table
    python benchmarks/bench_gemv.py --smoke                         # CPU: tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lm_sparse.kernels.reference import round_threshold, sparse_linear_reference  # noqa: E402
from lm_sparse.kernels.sparse_gemv import LaunchConfig, choose_config, sparse_gemv  # noqa: E402

from bench_common import environment, write_results  # noqa: E402

SHAPES = {  # key: (name, in_features K, out_features N)
    "8b-upgate": ("8B up/gate 4096x14336", 4096, 14336),
    "8b-down": ("8B down 14336x4096", 14336, 4096),
    "8b-o": ("8B o 4096x4096", 4096, 4096),
    "8b-qkv": ("8B qkv 4096x6144", 4096, 6144),
    "8b-gateup": ("8B gate+up fused 4096x28672", 4096, 28672),  # one launch under sparse-hf (TEAL)
    "70b-up": ("70B up 8192x28672", 8192, 28672),
}
SMOKE_SHAPES = {"smoke-a": ("smoke 96x80", 96, 80), "smoke-b": ("smoke 80x112", 80, 112)}
SWEEP_SPARSITIES = (0.5, 0.9)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ||y - reference|| / ||reference|| allowed per output dtype: the output's own rounding (bf16: 2**-9 relative
# per element) plus float32 accumulation; the interpreter rounds float32 to bfloat16 toward zero (one ulp).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
MIN_COPIES, MAX_COPY_BYTES = 8, 12 << 30


def bench(fn, device: torch.device, reps: int = 5) -> float:
    """Median seconds of fn(): triton's do_bench on CUDA (long operations only, e.g. the bandwidth copy),
    perf_counter elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_seconds(calls: list, device: torch.device, replays: int = 20) -> float:
    """Seconds per call of `calls` run back to back: on CUDA one graph of all of them, replayed (median);
    elsewhere perf_counter around plain calls (smoke runs)."""
    if device.type != "cuda":  # smoke runs check the script, not the speed: one timed run
        return bench(lambda: [c() for c in calls], device, reps=1) / len(calls)
    calls[0]()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del graph
    return statistics.median(times) / len(calls)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src), device)


def rotated_inputs(batch: int, k: int, sparsity: float, dtype: torch.dtype, device: torch.device, count: int):
    """`count` (x, threshold) pairs whose rows each have about `sparsity` of |x| <= t."""
    sets = []
    for _ in range(count):
        x = torch.randn(batch, k, device=device, dtype=torch.float32)
        t = float(torch.quantile(x.abs()[0].float().cpu(), sparsity)) if sparsity > 0 else -1.0
        x = x.to(dtype)
        sets.append((x, round_threshold(t, dtype, device)))
    return sets


def copies_for(read_bytes: float, l2_bytes: int, available: int) -> int:
    """Weight copies a graph cycles through so that no call finds its rows in L2: at least 4x L2 in all."""
    return max(1, min(available, max(MIN_COPIES, -(-4 * l2_bytes // max(1, int(read_bytes))))))


def gather_programs(k: int, batch: int, sparsity: float, steps: int, block_k: int) -> int:
    """Programs per column block that give every slice of the gathered form's packed list its own program when
    each of `batch` rows keeps 1 - sparsity of its k inputs (the union keeps 1 - sparsity ** batch)."""
    return max(1, -(-round(k * (1 - sparsity**batch)) // (steps * block_k)))


def sweep_configs(batch: int, smoke: bool, grid: str = "full", k: int = 4096) -> list[LaunchConfig]:
    """`--sweep`'s candidates: the unrolled kernel (`steps`) over tiles and steps a program, the gathered form
    (programs sized for each sweep sparsity), some of each with the fused reduce, plus (grid "full") the
    runtime walk over whole K slices and the compacted variant. "small" is the unrolled and gathered ones alone
    (63 at batch 1, 41 above), for a short device lease."""
    if smoke:
        return [LaunchConfig(32, 16, 1), LaunchConfig(16, 32, 2), LaunchConfig(32, 16, 2, compact_chunk=32),
                LaunchConfig(32, 16, 0, steps=2), LaunchConfig(16, 16, 0, steps=4),
                LaunchConfig(32, 16, 2, steps=2, gather=True), LaunchConfig(32, 16, 0, steps=2, fused_reduce=True)]
    if batch == 1:  # (block_n, block_k, warps): the [BLOCK_K, BLOCK_N] float32 accumulator stays <= 64 registers.
        # The H200's winner was 64 x 32 x 4 warps on every shape (128 x 32 was 1.25-1.5x slower): narrower, smaller
        # programs are in the grid for the next sweep.
        tiles = [(64, 32, 4), (128, 16, 4), (128, 32, 4), (128, 64, 8), (256, 32, 4), (256, 16, 4), (32, 32, 4),
                 (64, 32, 2)]
        steps: tuple[int, ...] = (2, 4, 8, 16)
        variant_tiles = [(64, 32, 4), (32, 32, 4), (64, 32, 2)]
        # One or two tall steps a program: each step is one load of 128-256 weight rows, so every program's loads
        # are in flight together whatever the compiler does with unrolled steps (BENCHMARKS.md, registers).
        tall = [LaunchConfig(bn, bk, 0, w, steps=st) for bn, bk, w in [(32, 128, 4), (64, 128, 4), (16, 256, 4)]
                for st in (1, 2)]
    else:
        tiles = [(64, 64, 4), (128, 64, 4), (64, 32, 4), (128, 32, 8)]
        steps = (1, 2, 4, 8)
        variant_tiles = tiles[:3]
        tall = []
    configs = [LaunchConfig(bn, bk, 0, w, steps=st) for bn, bk, w in tiles for st in steps] + tall
    # The gathered form: programs walk the packed list of active inputs, so at high sparsity far fewer of them
    # run than the unrolled kernel's one per K slice (its floor: BENCHMARKS.md).
    gathered = [LaunchConfig(bn, bk, gather_programs(k, batch, s, st, bk), w, steps=st, gather=True)
                for bn, bk, w in variant_tiles for st in (4, 8) for s in SWEEP_SPARSITIES]
    configs += gathered
    # The fused reduce (the last program of a column block sums the slices: one launch fewer per matrix).
    configs += [LaunchConfig(bn, bk, 0, w, steps=st, fused_reduce=True) for bn, bk, w in variant_tiles
                for st in steps[1:]]
    configs += [dataclasses.replace(c, fused_reduce=True) for c in gathered[:4]]
    if grid == "full":
        for bn, bk, w in tiles:
            configs += [LaunchConfig(bn, bk, split, w) for split in (4, 8, 16)]
            configs += [LaunchConfig(bn, bk, split, w, compact_chunk=512) for split in (4, 8)]
    return configs


def relative_error(wt: torch.Tensor, batch: int, sparsity: float, config: LaunchConfig) -> float:
    """||y - ref|| / ||ref|| of the counted kernel at `config` on a fresh input, into a NaN-poisoned output
    (an element the kernel did not write fails); ref: the float64 masked product."""
    k, n = wt.shape
    (x, t), = rotated_inputs(batch, k, sparsity, wt.dtype, wt.device, 1)
    out = torch.full((batch, n), float("nan"), dtype=wt.dtype, device=wt.device)
    y, _ = sparse_gemv(x, wt, t, config=config, out=out, count_zeros=True)
    ref = sparse_linear_reference(x, wt, t)
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def kernel_seconds(wts: list[torch.Tensor], sets: list, config: LaunchConfig, device: torch.device) -> float:
    """Per-call seconds of the counted kernel (what decode steps run), call i on copy i and input i."""
    return graph_seconds([functools.partial(sparse_gemv, x, wt, t, config=config, count_zeros=True)
                          for wt, (x, t) in zip(wts, sets)], device)


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The rows (one per shape, batch and sparsity) and, with --sweep, each (shape, batch)'s tuning record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    table = SMOKE_SHAPES if args.smoke else SHAPES
    keys = list(table) if args.smoke or args.shapes == "all" else args.shapes.split(",")
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise SystemExit(f"bench_gemv: invalid --shapes {','.join(unknown)}: expected all or some of "
                         f"{','.join(SHAPES)}")
    batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
    sparsities = [0.0, 0.5, 0.9] if args.smoke else [float(s) for s in args.sparsities.split(",")]
    elt = torch.tensor([], dtype=dtype).element_size()
    bandwidth = copy_bandwidth(device, (1 << 20) if args.smoke else (1 << 30))
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) if device.type == "cuda" else 0
    meta = {**environment(device), "dtype": args.dtype, "counted": True, "sweep": args.sweep,
            "sweep_grid": args.sweep_grid if args.sweep else None, "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "timing": "CUDA graph of back-to-back calls, one weight copy each" if device.type == "cuda"
            else "perf_counter (smoke)", "l2_bytes": l2, "smoke": args.smoke, "tolerance": TOLERANCE[dtype]}
    rows, tuned = [], []
    for key in keys:
        name, k, n = table[key]
        available = max(1, min(64, MAX_COPY_BYTES // (2 * k * n * elt)))
        # the sparsest level sets how many copies every measurement of this shape may cycle through
        densest_sparse = 1 - max(sparsities + list(SWEEP_SPARSITIES if args.sweep else ()))
        n_copies = 2 if args.smoke else copies_for(max(densest_sparse, 0.01) * k * n * elt, l2, available)
        wts = [torch.randn(k, n, device=device, dtype=dtype) / k**0.5 for _ in range(n_copies)]
        weights = [wt.t().contiguous() for wt in wts]  # cuBLAS baseline: the ordinary [out, in] layout

        def copies(density: float) -> int:
            """Copies a measurement at this weight density cycles through (2 in smoke runs)."""
            return 2 if args.smoke else copies_for(density * k * n * elt, l2, n_copies)

        for batch in batches:
            r_dense = copies(1.0)
            xs = [torch.randn(batch, k, device=device, dtype=dtype) for _ in range(r_dense)]
            t_dense = graph_seconds([functools.partial(F.linear, x, w) for x, w in zip(xs, weights)], device)
            t_dense_im = graph_seconds([functools.partial(F.linear, x, wt.t()) for x, wt in zip(xs, wts)], device)
            default = choose_config(batch, k, n, device)
            best = default
            if args.sweep:  # the candidate fastest over the sweep sparsities together
                totals: dict[LaunchConfig, float] = {}
                at: dict[str, dict] = {}  # each sweep sparsity's own fastest, beside the winner over both
                candidates = list(dict.fromkeys([default] + sweep_configs(batch, args.smoke, args.sweep_grid, k)))
                # A wrong result is never a winner (nor written to --write-configs): each candidate is checked
                # against the float64 reference at every sweep sparsity first; the default is kept either way,
                # so its rows show the failure.
                rejected = [c for c in candidates if c != default and not all(
                    relative_error(wts[0], batch, s_check, c) <= TOLERANCE[dtype] for s_check in SWEEP_SPARSITIES)]
                candidates = [c for c in candidates if c not in rejected]
                for c in rejected:
                    print(f"bench_gemv: WRONG OUTPUT from sweep candidate {c} on {name} batch {batch}: not timed",
                          file=sys.stderr)
                for s_sweep in SWEEP_SPARSITIES:
                    count = copies(1 - s_sweep)
                    sets = rotated_inputs(batch, k, s_sweep, dtype, device, count)
                    times = {c: kernel_seconds(wts[:count], sets, c, device) for c in candidates}
                    for c, seconds in times.items():
                        totals[c] = totals.get(c, 0.0) + seconds
                    fastest = min(times, key=times.__getitem__)
                    at[str(s_sweep)] = {"config": dataclasses.asdict(fastest), "us": times[fastest] * 1e6,
                                        "default_us": times[default] * 1e6}
                best = min(totals, key=totals.__getitem__)
                tuned.append({"shape": name, "batch": batch, "in": k, "out": n, "config": dataclasses.asdict(best),
                              "sweep_us": totals[best] * 1e6, "default_sweep_us": totals[default] * 1e6,
                              "fastest_at": at, "rejected": [dataclasses.asdict(c) for c in rejected]})
                if args.write_configs:
                    write_results(args.write_configs, meta, [], configs=tuned)
            for s in sparsities:
                count = copies(max(1 - s, 0.01))
                sets = rotated_inputs(batch, k, s, dtype, device, count)
                t_default = kernel_seconds(wts[:count], sets, default, device)
                t_best = t_default if best == default else kernel_seconds(wts[:count], sets, best, device)
                error = max(relative_error(wts[0], batch, s, c) for c in {default, best})
                x0, t0 = sets[0]
                union = float((x0.abs().float() > t0).any(0).float().mean())
                bytes_read = union * k * n * elt + batch * k * elt + batch * n * elt
                rows.append({
                    "shape": name, "in": k, "out": n, "batch": batch, "sparsity": s, "union_density": union,
                    "dense_us": t_dense * 1e6, "dense_input_major_us": t_dense_im * 1e6,
                    "default_us": t_default * 1e6, "sparse_us": t_best * 1e6, "bytes_read": bytes_read,
                    "gb_per_s": bytes_read / t_best / 1e9, "speedup": t_dense / t_best,
                    "speedup_default": t_dense / t_default, "ideal": 1 / max(1e-9, 1 - s),
                    "config": dataclasses.asdict(best), "default_config": dataclasses.asdict(default),
                    "rel_error": error, "copies": count,
                })
                write_results(args.out, meta, rows)
                print(f"{name} b={batch} s={s}: {t_best * 1e6:.1f} us (default {t_default * 1e6:.1f} us, "
                      f"dense {t_dense * 1e6:.1f} us), rel. error {error:.1e}", file=sys.stderr)
        del wts, weights
    print_table(rows, meta)
    return rows, tuned


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\nDevice: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}; "
          f"device copy bandwidth {meta['copy_bandwidth_gb_per_s']:.0f} GB/s; timing: {meta['timing']}\n")
    print("| shape (in x out) | batch | sparsity | union density | cuBLAS us | cuBLAS on W^T view us "
          "| default tiles us | best us | MB read | GB/s (best) | speedup (best) | speedup (default) | ideal "
          "| best tiles (N, K, split, warps, steps, variant) | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        print(f"| {r['shape']} | {r['batch']} | {r['sparsity']:.2f} | {r['union_density']:.2f} | "
              f"{r['dense_us']:.1f} | {r['dense_input_major_us']:.1f} | {r['default_us']:.1f} | "
              f"{r['sparse_us']:.1f} | {r['bytes_read'] / 1e6:.1f} | {r['gb_per_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['speedup_default']:.2f}x | {r['ideal']:.2f}x | "
              f"{c['block_n']}, {c['block_k']}, {c['split_k']}, {c['num_warps']}, {c['steps'] or '-'}, "
              f"{variant(c)} | {r['rel_error']:.1e} |")


def variant(config: dict) -> str:
    """The kernel a configuration runs, in words."""
    if config.get("gather"):
        name = "gathered"
    elif config["compact_chunk"]:
        name = f"compacted ({config['compact_chunk']})"
    else:
        name = "unrolled" if config["steps"] else "runtime walk"
    return name + (", fused reduce" if config.get("fused_reduce") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", default="all", help=f"all, or some of {','.join(SHAPES)} (comma-separated)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--sparsities", default="0,0.25,0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--sweep", action="store_true",
                        help="time tile/split candidates at s = 0.5 and 0.9; report the fastest beside the default")
    parser.add_argument("--sweep-grid", choices=("full", "small"), default="full",
                        help="the sweep's candidates: all variants, or the unrolled kernel's tiles and steps alone")
    parser.add_argument("--write-configs", default=None,
                        help="write each (batch, shape)'s best configuration here (for LM_SPARSE_GEMV_CONFIGS)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("--smoke is required without a CUDA device")
    if args.write_configs and not args.sweep:
        parser.error("--write-configs needs --sweep (it writes the sweep's winners)")
    rows, tuned = run(args)
    tolerance = TOLERANCE[DTYPES[args.dtype]]
    wrong = [r for r in rows if not r["rel_error"] <= tolerance]  # NaN fails too
    for r in wrong:
        print(f"bench_gemv: WRONG OUTPUT {r['shape']} batch {r['batch']} sparsity {r['sparsity']}: relative "
              f"error {r['rel_error']:.2e} > {tolerance:.0e}", file=sys.stderr)
    return 1 if wrong or any(t["rejected"] for t in tuned) else 0


if __name__ == "__main__":
    raise SystemExit(main())
