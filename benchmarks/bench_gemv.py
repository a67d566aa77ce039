"""Microbenchmark of the input-sparse GEMV (`lm_sparse::sparse_linear`) against cuBLAS dense F.linear.

For every weight shape (in x out), batch and sparsity: median time (triton's do_bench, which flushes L2
before every run, cycling through rotated inputs so no run sees the previous one's x) of the kernel as
decode steps run it (zero counting on, `count_zeros=True`), with `choose_config`'s tiles ("default") and,
with `--sweep`, with the fastest of the tile/split candidates timed at s = 0.5 and s = 0.9 ("best");
bytes the kernel actually reads (union of active weight rows + x + y), achieved GB/s, speedup over cuBLAS
F.linear on the ordinary [out, in] weight at the same batch (and cuBLAS's time on the input-major view
`wt.t()`, the layout the dense fallback and prefill use once the kernels are attached), and the ideal
1/(1-s). The device's copy bandwidth is measured in the same run. Every timed configuration's output is
also checked against the float64 reference of the masked product on a fresh input, into a NaN-poisoned
output (`rel_error`; the script exits 1 after writing its results if one is over its dtype's tolerance), and
the JSON is rewritten after every row, so a run cut off by a time limit keeps what it measured.
The sweep's candidates include the compacted variant (`LaunchConfig.compact_chunk`: a first launch packs the
active inputs, and the steps follow them rather than K). `--sweep-grid small` times 30 candidates per shape and
batch around `choose_config`'s (for a short device lease), `full` (default) the whole grid of `sweep_configs`.
Prints a Markdown table and writes JSON.

    python benchmarks/bench_gemv.py --out bench_gemv.json           # GPU: Llama-3-8B and 70B shapes, bf16
    python benchmarks/bench_gemv.py --sweep --out bench_gemv.json   # GPU: also the fastest tiling
    python benchmarks/bench_gemv.py --shapes 8b-upgate --batches 1  # GPU: a subset
    python benchmarks/bench_gemv.py --sweep --sweep-grid small ...  # GPU: a sweep that fits a short lease
    python benchmarks/bench_gemv.py --smoke                         # CPU: tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import time

import torch

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
    "70b-up": ("70B up 8192x28672", 8192, 28672),
}
SMOKE_SHAPES = {"smoke-a": ("smoke 96x80", 96, 80), "smoke-b": ("smoke 80x112", 80, 112)}
SWEEP_SPARSITIES = (0.5, 0.9)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ||y - reference|| / ||reference|| allowed per output dtype: the output's own rounding (bf16: 2**-9 relative
# per element) plus float32 accumulation; the interpreter rounds float32 to bfloat16 toward zero (one ulp).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def _xt(pair: tuple[torch.Tensor, torch.Tensor]) -> dict:
    return {"x": pair[0], "threshold": pair[1]}


def bench(fn, device: torch.device, reps: int = 5, quick: bool = False) -> float:
    """Median seconds of fn(): triton's do_bench on CUDA (`quick`: shorter, for the sweep's candidates),
    perf_counter elsewhere (smoke runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 100)
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def sweep_configs(batch: int, k: int, n: int, smoke: bool, grid: str = "full",
                  default: LaunchConfig | None = None) -> list[LaunchConfig]:
    """Tile/split candidates for `--sweep` (the GPU defaults in `choose_config` come from these), and the
    compacted variant's (`compact_chunk`: steps over the packed active inputs of each chunk).

    `grid="small"`: two K tiles, three N tiles, `default`'s split halved, kept and doubled (18), and the
    compacted variant at 512-input chunks, one and two chunks a program (12)."""
    if smoke:
        return [LaunchConfig(32, 16, 1), LaunchConfig(16, 32, 2), LaunchConfig(32, 16, 2, compact_chunk=32)]
    blocks_n = (64, 128, 256) if batch == 1 else (32, 64, 128)
    blocks_k = (16, 32, 64) if batch == 1 else (32, 64, 128)
    splits: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    chunks: tuple[int, ...] = (256, 512, 1024)
    if grid == "small":
        blocks_k = blocks_k[1:]
        base = default.split_k if default is not None else 4
        splits = tuple(sorted({max(1, base // 2), base, base * 2}))
        chunks = (512,)
    configs = []
    for bn, bk in itertools.product(blocks_n, blocks_k):
        warps = 4 if bn * bk <= 4096 else 8
        for split in splits:
            if k // split >= bk:
                configs.append(LaunchConfig(bn, bk, split, warps))
        for chunk in chunks:
            n_chunks = -(-k // chunk)
            for per_program in (1, 2):
                configs.append(LaunchConfig(bn, bk, -(-n_chunks // per_program), warps, compact_chunk=chunk))
    return list(dict.fromkeys(configs))


def relative_error(wt: torch.Tensor, batch: int, sparsity: float, config: LaunchConfig) -> float:
    """||y - ref|| / ||ref|| of the counted kernel at `config` on a fresh input, into a NaN-poisoned output
    (an element the kernel did not write fails); ref: the float64 masked product."""
    k, n = wt.shape
    (x, t), = rotated_inputs(batch, k, sparsity, wt.dtype, wt.device, 1)
    out = torch.full((batch, n), float("nan"), dtype=wt.dtype, device=wt.device)
    y, _ = sparse_gemv(x, wt, t, config=config, out=out, count_zeros=True)
    ref = sparse_linear_reference(x, wt, t)
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def _timer(sets: list, wt: torch.Tensor, device: torch.device):
    """seconds(config, quick) of the counted kernel (what decode steps run) over the rotated `sets`."""
    def seconds(config: LaunchConfig, quick: bool = False) -> float:
        it = itertools.cycle(sets)
        return bench(lambda: sparse_gemv(**_xt(next(it)), wt=wt, config=config, count_zeros=True), device,
                     quick=quick)
    return seconds


def run(args: argparse.Namespace) -> list[dict]:
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
    meta = {**environment(device), "dtype": args.dtype, "counted": True, "sweep": args.sweep,
            "sweep_grid": args.sweep_grid if args.sweep else None, "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "rotate": args.rotate, "smoke": args.smoke, "tolerance": TOLERANCE[dtype]}
    rows = []
    for key in keys:
        name, k, n = table[key]
        weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5  # cuBLAS baseline: ordinary layout
        wt = weight.t().contiguous()
        for batch in batches:
            dense_sets = [torch.randn(batch, k, device=device, dtype=dtype) for _ in range(args.rotate)]
            it = itertools.cycle(dense_sets)
            t_dense = bench(lambda: torch.nn.functional.linear(next(it), weight), device)
            t_dense_im = bench(lambda: torch.nn.functional.linear(next(it), wt.t()), device)
            default = choose_config(batch, k, n, device)
            candidates = {default}
            if args.sweep:  # the fastest tiling at each sweep sparsity joins the candidates
                for s_sweep in SWEEP_SPARSITIES:
                    seconds = _timer(rotated_inputs(batch, k, s_sweep, dtype, device, args.rotate), wt, device)
                    grid = sweep_configs(batch, k, n, args.smoke, args.sweep_grid, default)
                    timed = [(seconds(c, quick=True), c) for c in grid]
                    candidates.add(min(timed, key=lambda tc: tc[0])[1])
            for s in sparsities:
                sets = rotated_inputs(batch, k, s, dtype, device, args.rotate)
                seconds = _timer(sets, wt, device)
                t_default = seconds(default)
                t_best, best = min([(t_default, default)] + [(seconds(c), c) for c in candidates - {default}],
                                   key=lambda tc: tc[0])
                error = max(relative_error(wt, batch, s, c) for c in {default, best})
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
                    "rel_error": error,
                })
                write_results(args.out, meta, rows)
                print(f"{name} b={batch} s={s}: {t_best * 1e6:.1f} us (default {t_default * 1e6:.1f} us, "
                      f"dense {t_dense * 1e6:.1f} us), rel. error {error:.1e}", file=sys.stderr)
    print_table(rows, meta)
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\nDevice: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}; "
          f"device copy bandwidth {meta['copy_bandwidth_gb_per_s']:.0f} GB/s\n")
    print("| shape (in x out) | batch | sparsity | union density | cuBLAS us | cuBLAS on W^T view us "
          "| default tiles us | best us | MB read | GB/s (best) | speedup (best) | speedup (default) | ideal "
          "| best tiles (N, K, split, warps, compact chunk) | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        print(f"| {r['shape']} | {r['batch']} | {r['sparsity']:.2f} | {r['union_density']:.2f} | "
              f"{r['dense_us']:.1f} | {r['dense_input_major_us']:.1f} | {r['default_us']:.1f} | "
              f"{r['sparse_us']:.1f} | {r['bytes_read'] / 1e6:.1f} | {r['gb_per_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['speedup_default']:.2f}x | {r['ideal']:.2f}x | "
              f"{c['block_n']}, {c['block_k']}, {c['split_k']}, {c['num_warps']}, {c['compact_chunk'] or '-'} | "
              f"{r['rel_error']:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", default="all", help=f"all, or some of {','.join(SHAPES)} (comma-separated)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--sparsities", default="0,0.25,0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--rotate", type=int, default=8, help="distinct inputs cycled through")
    parser.add_argument("--sweep", action="store_true",
                        help="time tile/split candidates at s = 0.5 and 0.9; report the fastest beside the default")
    parser.add_argument("--sweep-grid", choices=("full", "small"), default="full",
                        help="the sweep's candidates: the whole grid, or 30 around the default tiles")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("--smoke is required without a CUDA device")
    rows = run(args)
    tolerance = TOLERANCE[DTYPES[args.dtype]]
    wrong = [r for r in rows if not r["rel_error"] <= tolerance]  # NaN fails too
    for r in wrong:
        print(f"bench_gemv: WRONG OUTPUT {r['shape']} batch {r['batch']} sparsity {r['sparsity']}: relative "
              f"error {r['rel_error']:.2e} > {tolerance:.0e}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
