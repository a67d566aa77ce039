"""What sparse kernels can buy a decode step at most: a bound from a lease's measured kernel and step times.

A decode step is its seven linear layers a layer plus the rest (attention, norms, RoPE, the cache writes, the LM
head, sampling, the engine's own work). The rest does not shrink with activation sparsity. `bench_gemv.py`
times the linears' cuBLAS calls in CUDA graphs and `bench_decode.py` the whole step, so the rest is their
difference. At sparsity s a kernel can at best read the active (1 - s) of a matrix's bytes at the device's copy
bandwidth, so the step can at best fall to rest + (1 - s) * bytes / bandwidth (Amdahl's law).

The dense engine launches q, k and v separately, and k and v (4096x1024) were not timed on their own. So the
linears' time is given as a range. The low end takes the fused q/k/v launch's time for the three; three
launches take at least that. The high end gives k and v each q's time; each reads a quarter of q's bytes.
The rest is then a range too, and so is every figure below. Needs no GPU: it reads the JSON files a lease
brought back.

    python benchmarks/decode_bound.py        # the H200 lease of 2026-12-04
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LEASE = os.path.join(HERE, "results", "h200-2026-12-04", "lease-tune")
LAYERS = 32  # bench_decode's Llama-3-8B
BYTES_PER_WEIGHT = {"bf16": 2, "fp16": 2, "fp32": 4}  # bench_gemv's --dtype
# bench_gemv's shape names: the four launches of a TEAL decode layer, and the up/gate alone
QKV, O, GATE_UP, DOWN, UP = ("8B qkv 4096x6144", "8B o 4096x4096", "8B gate+up fused 4096x28672",
                             "8B down 14336x4096", "8B up/gate 4096x14336")
TARGET_SPEEDUP, TARGET_LEVEL = 1.8, 0.5


def interpolate(points: dict[float, float], s: float) -> float:
    """Linear interpolation of a sparsity -> time table (clamped to its ends)."""
    xs = sorted(points)
    return float(np.interp(s, xs, [points[x] for x in xs]))


def bound(gemv: dict, decode: dict) -> dict:
    """Per decode level: measured speedup, the speedup the measured kernels predict, and the ideal bound;
    each as (low, high) over the range of the rest of the step. Times in ms a token."""
    rows = [r for r in gemv["rows"] if r["batch"] == 1]
    dense_us = {r["shape"]: r["dense_us"] for r in rows}
    # a layer's seven matrices are the four launches of a TEAL layer (q/k/v and gate/up fused)
    size = {r["shape"]: r["in"] * r["out"] for r in rows}
    layer_bytes = sum(size[name] for name in (QKV, O, GATE_UP, DOWN)) * BYTES_PER_WEIGHT[gemv["meta"]["dtype"]]
    sparse_us: dict[str, dict[float, float]] = {}
    for r in rows:
        sparse_us.setdefault(r["shape"], {})[r["sparsity"]] = r["sparse_us"]
    bandwidth = gemv["meta"]["copy_bandwidth_gb_per_s"] * 1e9
    q = dense_us[O]  # same shape
    linears_low = dense_us[QKV] + dense_us[O] + 2 * dense_us[UP] + dense_us[DOWN]
    linears_high = linears_low - dense_us[QKV] + 3 * q
    dense_row = next(r for r in decode["rows"] if r["mode"] == "dense")
    step = 1e3 / dense_row["tokens_per_s"]
    linears = (LAYERS * linears_low / 1e3, LAYERS * linears_high / 1e3)
    rest = (step - linears[1], step - linears[0])  # the more the linears take, the less is left
    ideal_dense = LAYERS * layer_bytes / bandwidth * 1e3
    out = {"dense_step_ms": step, "linears_ms": linears, "rest_ms": rest, "ideal_dense_linears_ms": ideal_dense,
           "copy_bandwidth_gb_per_s": bandwidth / 1e9, "levels": []}
    for r in sorted(decode["rows"], key=lambda r: r["level"]):
        if r["mode"] == "dense":
            continue
        s = r["decode_sparsity"]
        kernels = LAYERS * sum(interpolate(sparse_us[name], s) for name in (QKV, O, GATE_UP, DOWN)) / 1e3
        ideal = (1 - s) * ideal_dense
        out["levels"].append({
            "level": r["level"], "decode_sparsity": s, "measured_speedup": step * r["tokens_per_s"] / 1e3,
            "kernels_ms": kernels, "ideal_sparse_linears_ms": ideal,
            # what the measured step took beyond the rest and its kernels: the engine's own extra work
            "excess_ms": (1e3 / r["tokens_per_s"] - rest[1] - kernels, 1e3 / r["tokens_per_s"] - rest[0] - kernels),
            # the speedup is higher where the rest is smaller: low end with the larger rest
            "predicted_speedup": (step / (rest[1] + kernels), step / (rest[0] + kernels)),
            "ideal_speedup": (step / (rest[1] + ideal), step / (rest[0] + ideal))})
    # what the target asks of the linears at its level: their time, and the bandwidth that reads (1 - s) of them
    budget = [step / TARGET_SPEEDUP - r for r in rest]
    active = (1 - TARGET_LEVEL) * LAYERS * layer_bytes
    out["target"] = {"speedup": TARGET_SPEEDUP, "level": TARGET_LEVEL, "linears_budget_ms": budget,
                     "needed_gb_per_s": [active / (b / 1e3) / 1e9 if b > 0 else None for b in budget]}
    return out


def fmt_range(pair, spec: str = ".2f", unit: str = "") -> str:
    low, high = sorted(pair)
    return f"{low:{spec}}{unit}" if f"{low:{spec}}" == f"{high:{spec}}" else f"{low:{spec}}-{high:{spec}}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemv", default=os.path.join(LEASE, "bench_gemv_b1.json"))
    parser.add_argument("--decode", default=os.path.join(LEASE, "bench_decode_tuned.json"))
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    with open(args.gemv, encoding="utf-8") as f:
        gemv = json.load(f)
    with open(args.decode, encoding="utf-8") as f:
        decode = json.load(f)
    b = bound(gemv, decode)
    print(f"{gemv['meta']['device']}: dense step {b['dense_step_ms']:.3f} ms a token; linears (cuBLAS, "
          f"{LAYERS} layers) {fmt_range(b['linears_ms'], '.2f', ' ms')}; "
          f"the rest {fmt_range(b['rest_ms'], '.2f', ' ms')}"
          f" ({fmt_range([r / b['dense_step_ms'] * 100 for r in b['rest_ms']], '.0f', '%')} of the step); "
          f"the linears at copy bandwidth ({b['copy_bandwidth_gb_per_s']:.0f} GB/s) "
          f"{b['ideal_dense_linears_ms']:.2f} ms\n")
    print("| level | decode sparsity | measured x dense | kernels ms | predicted from the kernels | "
          "measured step beyond that, ms | ideal kernels ms | at most (ideal kernels) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in b["levels"]:
        print(f"| {r['level']} | {r['decode_sparsity']:.3f} | {r['measured_speedup']:.2f}x | {r['kernels_ms']:.2f} | "
              f"{fmt_range(r['predicted_speedup'], '.2f', 'x')} | {fmt_range(r['excess_ms'])} | "
              f"{r['ideal_sparse_linears_ms']:.2f} | "
              f"{fmt_range(r['ideal_speedup'], '.2f', 'x')} |")
    t = b["target"]
    needed = ", ".join("more than the step allows" if n is None else f"{n:.0f} GB/s" for n in t["needed_gb_per_s"])
    print(f"\n{t['speedup']}x at s = {t['level']} leaves the linears {fmt_range(t['linears_budget_ms'], '.2f', ' ms')}"
          f" a token: reading the active half of their bytes in that time takes {needed} (smaller rest first)")
    if args.out:
        meta = {k: gemv["meta"].get(k) for k in ("device", "torch", "triton")}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": {**meta, "gemv": args.gemv, "decode": args.decode}, **b}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
