"""Prefill masking overhead: dense forward vs masked forwards of a Llama-3-8B-shaped model (bf16).

Rows, each the median time of one no-grad forward over the whole batch:
- dense: no engine;
- dense, input-major weights: the same, after every weight became a view of its W^T storage, q/k/v and
  gate/up fused (the layout the decode kernels need): the cost of cuBLAS reading that layout;
- naive mask: the engine's `Threshold` rule (`x.masked_fill(x.abs() <= t, 0)`) before all seven matrices,
  counting paused (the masking alone);
- naive mask + count: the same with the engine's zero counting on (`count_nonzero` per site);
- fused mask + count: `attach_prefill_masks` puts the one-pass Triton kernel
  `lm_sparse::threshold_mask_counted` (mask and per-row zero count in one read and one write) on every site;
- fused mask + count, input-major weights: what sparse-hf runs on CUDA with TEAL (the decode kernels'
  layout and the fused masks together): the row the 1.05x target is judged on.
Thresholds are the 50% quantile of each layer input's |x| (one per input, as TEAL's). Forwards run without
a KV cache (`use_cache=False`, as lm-eval's loglikelihood requests): cache writes are not masking cost.

    python benchmarks/bench_prefill_mask.py --out bench_prefill_mask.json   # GPU: 8x1024 and 32x256 tokens
    python benchmarks/bench_prefill_mask.py --smoke                         # CPU: tiny model, interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lm_sparse.engine.engine import SparsityEngine  # noqa: E402
from lm_sparse.engine.rules import Threshold  # noqa: E402
from lm_sparse.kernels.backend import attach_prefill_masks, make_fused_input_major, make_input_major  # noqa: E402

from bench_common import environment, median_seconds, write_results  # noqa: E402
from bench_decode import build_model, quantile_thresholds  # noqa: E402


def time_forward(model, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of one no-grad forward (last position's logits only), after a warm-up."""
    with torch.no_grad():
        return median_seconds(lambda: model(ids, use_cache=False, logits_to_keep=1), repeats, ids.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--shapes", default="8x1024,32x256", help="batch x tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("--smoke is required without a CUDA device")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(2, 16)] if args.smoke else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    repeats = 2 if args.smoke else args.repeats

    model = build_model(args.smoke, device)
    engine = SparsityEngine(model, pad_token_id=0)
    probe = torch.randint(3, model.config.vocab_size, (1, 128 if not args.smoke else 16), device=device)
    thresholds = quantile_thresholds(engine, model, probe, [0.5])[0.5]
    rows = []
    for batch, seq in shapes:
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
        times = {"dense": time_forward(model, ids, repeats)}
        engine.set_rules({i: Threshold(t) for i, t in thresholds.items()})
        for mode in ("naive mask", "naive mask + count", "fused mask + count"):
            engine.prefill_maskers.clear()
            if mode.startswith("fused"):
                attach_prefill_masks(engine, allow_interpreter=True)
            counting = mode.endswith("count")
            with engine.attached(), (contextlib.nullcontext() if counting else engine.paused()):
                times[mode] = time_forward(model, ids, repeats)
            engine.counter.reset()
        rows.append({"batch": batch, "tokens": seq, **{k: v * 1e3 for k, v in times.items()}})
        print(f"{batch}x{seq}: {times}", file=sys.stderr)
    # The layout attach_decode_kernels makes: q/k/v and gate/up fused into one W^T each, o and down alone.
    layers: dict[tuple[int, str], list] = {}
    for s in engine.sites:
        layers.setdefault((s.layer, s.group), []).append(s.module)
    for modules in layers.values():
        if len(modules) > 1:
            make_fused_input_major(modules)
        else:
            make_input_major(modules[0])
    attach_prefill_masks(engine, allow_interpreter=True)
    for row in rows:
        ids = torch.randint(3, model.config.vocab_size, (row["batch"], row["tokens"]), device=device)
        row["dense, input-major weights"] = time_forward(model, ids, repeats) * 1e3
        with engine.attached():
            row["fused mask + count, input-major weights"] = time_forward(model, ids, repeats) * 1e3
        engine.counter.reset()

    meta = {**environment(device),
            "model": "tiny llama (smoke)" if args.smoke else "Llama-3-8B-shaped, random weights, bf16"}
    modes = ["dense", "dense, input-major weights", "naive mask", "naive mask + count", "fused mask + count",
             "fused mask + count, input-major weights"]
    print(f"\nDevice: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['model']}\n")
    print("| batch x tokens | " + " | ".join(f"{m} ms (x dense)" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for r in rows:
        cells = [f"{r[m]:.2f} ({r[m] / r['dense']:.3f}x)" for m in modes]
        print(f"| {r['batch']}x{r['tokens']} | " + " | ".join(cells) + " |")
    write_results(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
