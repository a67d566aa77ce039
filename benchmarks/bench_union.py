"""How dense is the union of B decode rows' active inputs? Measured on SmolLM2 vs the kernel backend's s^B estimate.

A decode step of B rows reads the weight rows of every input active in *any* row. The kernel backend
(`lm_sparse.kernels.backend.sparse_rows_limit`) estimates that union's sparsity as s^B from the calibrated
per-row sparsity s, and runs a dense GEMM where the estimate falls below MIN_UNION_SPARSITY. This script
measures the real union on text: `--sequences` windows of `--seqlen` tokens (the last lines of
`--data`) go through SmolLM2-135M-Instruct with the shipped thresholds applied
(TEAL teal=0.5 greedy, PPL-1%); at every position, groups of B different windows stand for one decode step
of B rows. Per B it prints the mean per-row and union sparsity, the s^B estimate, the parameter-weighted
weights a B-row launch skips, and how many sites the policy sends to dense while their measured union is at
or above the cut (and the reverse). Needs no GPU: the union is a property of the activations.

    python benchmarks/bench_union.py --out /tmp/union_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "/work/shared/data/gsm8k_train.jsonl"
METHODS = {
    "teal=0.5": dict(teal="0.5", thresholds=str(ROOT / "thresholds" / "teal-smollm2-gsm8k.json")),
    "ppl_p=1": dict(ppl_p="1", thresholds=str(ROOT / "thresholds" / "smollm2-135m-instruct-pplp-p1.json")),
}


def heldout_windows(tokenizer, data: Path, sequences: int, seqlen: int) -> torch.Tensor:
    """`sequences` windows of `seqlen` tokens, one per document, from the end of the text file."""
    from lm_sparse.calibrate.data import load_texts

    texts, _ = load_texts(str(data))  # GSM8K jsonl: question + "\n" + answer, as calibration reads it
    windows = []
    for text in reversed(texts):
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= seqlen:
            windows.append(ids[:seqlen])
        if len(windows) == sequences:
            break
    return torch.tensor(windows)


def measure(lm, windows: torch.Tensor, rows: list[int]) -> dict:
    """Per B: mean per-row / union sparsity over sites, s^B, weights skipped, policy disagreements."""
    from lm_sparse.kernels.backend import MIN_UNION_SPARSITY, sparse_rows_limit

    engine, model = lm.engine, lm._model
    sites = [s for s in engine.sites if s.index in engine.rules]
    stats: dict[int, dict] = {}

    def hook(site):
        def record(module, args):
            active = args[0] != 0  # after the engine's pre-hook: the masked input the kernel reads
            n, length, k = active.shape
            per_row = 1.0 - float(active.float().mean())
            entry = stats.setdefault(site.index, {"row": [], "union": {b: [] for b in rows}})
            entry["row"].append(per_row)
            for b in rows:
                groups = active[: n // b * b].view(n // b, b, length, k).any(dim=1)
                entry["union"][b].append(1.0 - float(groups.float().mean()))
        return record

    with engine.attached(), torch.no_grad():
        handles = [s.module.register_forward_pre_hook(hook(s)) for s in sites]  # after the engine's own
        try:
            model(input_ids=windows, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    params = {s.index: s.num_params for s in sites}
    total = sum(params.values())
    out = {}
    for b in rows:
        s_row = {i: sum(v["row"]) / len(v["row"]) for i, v in stats.items()}
        union = {i: sum(v["union"][b]) / len(v["union"][b]) for i, v in stats.items()}
        expected = {i: engine.rules[i].expected_sparsity for i in stats}
        estimate = {i: (expected[i] if expected[i] is not None else s_row[i]) ** b for i in stats}
        dense = {i for i in stats if sparse_rows_limit(expected[i]) < b}
        out[b] = {
            "row_sparsity": sum(s_row.values()) / len(s_row),
            "union_sparsity": sum(union.values()) / len(union),
            "estimate": sum(estimate.values()) / len(estimate),
            "weights_skipped_union": sum(union[i] * params[i] for i in stats) / total,
            # what the policy keeps: dense-dispatched sites skip nothing
            "weights_skipped_policy": sum(union[i] * params[i] for i in stats if i not in dense) / total,
            "sites": len(stats),
            "policy_dense": len(dense),
            "dense_but_union_above_cut": sum(1 for i in dense if union[i] >= MIN_UNION_SPARSITY),
            "sparse_but_union_below_cut": sum(1 for i in stats if i not in dense and union[i] < MIN_UNION_SPARSITY),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    from lm_sparse.lm import SparseHFLM

    rows = [int(b) for b in args.rows.split(",")]
    results = {}
    for name in args.methods.split(","):
        start = time.perf_counter()
        lm = SparseHFLM(pretrained="smollm2", device="cpu", dtype="float32", batch_size=1, **METHODS[name])
        windows = heldout_windows(lm.tokenizer, Path(args.data), args.sequences, args.seqlen)
        results[name] = measure(lm, windows, rows)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\nSmolLM2-135M-Instruct, {args.sequences} held-out windows x {args.seqlen} tokens of "
          f"{Path(args.data).name}; "
          "union over B different windows at the same position\n")
    print("| method | B | per-row sparsity | union sparsity (measured) | s^B estimate | weights a B-row launch skips "
          "| of them, on sites the policy keeps sparse | sites sent dense | of them union >= 5% "
          "| sparse with union < 5% |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, per_b in results.items():
        for b, r in per_b.items():
            print(f"| {name} | {b} | {r['row_sparsity']:.3f} | {r['union_sparsity']:.3f} | {r['estimate']:.3f} | "
                  f"{r['weights_skipped_union']:.3f} | {r['weights_skipped_policy']:.3f} | "
                  f"{r['policy_dense']}/{r['sites']} | "
                  f"{r['dense_but_union_above_cut']} | {r['sparse_but_union_below_cut']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"sequences": args.sequences, "seqlen": args.seqlen,
                                              "data": str(args.data), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
