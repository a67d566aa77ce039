"""TEAL on SmolLM2-135M-Instruct: held-out perplexity ratio and measured sparsity, greedy vs uniform.

    python benchmarks/bench_teal.py                       # teal = 0.25 0.4 0.5 0.65, greedy and uniform
    python benchmarks/bench_teal.py --pplp 1 5 10         # plus PPL-p% at ppl_p = 1, 5, 10, side by side
    python benchmarks/bench_teal.py --teal-ppl-p 1 5 10   # plus ppl_p=P,method=teal
    python benchmarks/bench_teal.py --recalibrate         # time the full calibration (histograms + greedy)

The TEAL lookup comes from the shipped file / the cache (`lm-sparse calibrate --method teal`), calibrated
on the first `--calib-tokens` tokens of `--calib-data` with seed 0; the held-out windows are disjoint
windows of the same text (data.calibration_batches' held-out split). Prints a Markdown table and writes
JSON. "weights skipped" is the parameter-weighted sparsity of all seven projections (TEAL's model-wide
sparsity); "sparsity" is over the sparsified inputs only (for PPL-p%: the down projections).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from lm_sparse.calibrate import teal as T  # noqa: E402
from lm_sparse.calibrate.data import calibration_batches, load_texts  # noqa: E402
from lm_sparse.calibrate.ppl import perplexity  # noqa: E402
from lm_sparse.config import SparsityConfig  # noqa: E402
from lm_sparse.engine.engine import SparsityEngine  # noqa: E402

from bench_common import write_results  # noqa: E402

DEFAULT_DATA = "/work/shared/data/gsm8k_train.jsonl"


def measure(engine: SparsityEngine, rules: dict, heldout: torch.Tensor, dense_ppl: float) -> dict:
    """Held-out perplexity ratio and measured sparsity of `rules` (sparse_prefill=all: every token)."""
    engine.counter.reset()
    engine.set_rules(rules)
    with engine.attached():
        ppl = perplexity(engine.model, heldout, batch_size=4)
    engine.counter.synchronize()
    report = engine.report()
    engine.counter.reset()
    return {"ppl": ppl, "ppl_ratio": ppl / dense_ppl, "sparsity": report["overall"],
            "weights_skipped": report["weights_skipped"], "ffn": report["ffn"], "attn": report["attn"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-data", default=DEFAULT_DATA)
    parser.add_argument("--calib-tokens", type=int, default=None, help="TEAL histogram tokens (default: TEAL's)")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.4, 0.5, 0.65])
    parser.add_argument("--pplp", type=float, nargs="*", default=[], help="PPL-p%% levels to add (e.g. 1 5 10)")
    parser.add_argument("--pplp-calib-tokens", type=int, default=None,
                        help="PPL-p%% calibration tokens (default: TEAL's, so both calibrate on the same windows)")
    parser.add_argument("--teal-ppl-p", type=float, nargs="*", default=[], help="ppl_p=P,method=teal levels")
    parser.add_argument("--recalibrate", action="store_true", help="calibrate TEAL again (times it)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-out", default="benchmarks/results/bench_teal.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_sparse.models import smollm2_dir

    directory = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    engine = SparsityEngine(model, sparse_prefill="all")
    ctx = argparse.Namespace(pretrained=directory, revision=None, rank=0, world_size=1)
    start = time.perf_counter()
    lookup, payload, path, ran = T.load_teal(model, engine.sites, tokenizer, calib_data=args.calib_data,
                                             calib_tokens=args.calib_tokens, calib_seqlen=args.seqlen, calib_seed=0,
                                             greedy=True, recalibrate=args.recalibrate, lm=ctx)
    calib_seconds = time.perf_counter() - start
    calib_tokens = int(payload["fields"]["calib_tokens"])
    pplp_calib_tokens = args.pplp_calib_tokens or calib_tokens
    texts, _ = load_texts(args.calib_data)
    # Held-out windows come after every window either method calibrated on (same seed, same split).
    _, heldout = calibration_batches(tokenizer, texts, max(calib_tokens, pplp_calib_tokens), args.seqlen, 0,
                                     heldout_tokens=args.heldout_tokens)
    with torch.no_grad():
        dense_ppl = perplexity(model, heldout, batch_size=4)

    rows = []
    for level in args.levels:
        for mode in ("greedy", "uniform"):
            rules, _ = lookup.rules(engine.sites, level, mode)
            rows.append({"method": f"teal {mode}", "level": f"teal={level:g}",
                         **measure(engine, rules, heldout, dense_ppl)})
    if args.teal_ppl_p:
        # What build_teal_rules does for ppl_p=P,method=teal, with the lookup, the search's windows and their
        # dense perplexity made once for every P.
        config = SparsityConfig(rule="teal", method="teal", calib_data=args.calib_data,
                                calib_tokens=args.calib_tokens, calib_seqlen=args.seqlen)
        windows = T._ppl_windows(tokenizer, config, payload, model, texts)
        search_dense = None
        for p in args.teal_ppl_p:
            level, probes = T.search_level(engine, lookup, windows, p, "greedy", dense_ppl=search_dense)
            search_dense = probes[0]["dense_ppl"]
            rules, _ = lookup.rules(engine.sites, level, "greedy")
            rows.append({"method": "teal greedy (ppl_p)", "level": f"ppl_p={p:g} -> teal={level:g}",
                         **measure(engine, rules, heldout, dense_ppl)})
    for p in args.pplp:
        from lm_sparse.calibrate.pplp import build_pplp_rules

        config = SparsityConfig(rule="pplp", level=p, method="pplp", calib_data=args.calib_data,
                                calib_tokens=pplp_calib_tokens, calib_seqlen=args.seqlen)
        rules, _ = build_pplp_rules(engine, config, tokenizer, ctx)
        rows.append({"method": "PPL-p%", "level": f"ppl_p={p:g}", **measure(engine, rules, heldout, dense_ppl)})

    results = payload.get("results", {})
    greedy = results.get("greedy", {})
    meta = {"model": "SmolLM2-135M-Instruct (float32)", "file": path, "calibrated_now": ran,
            "calibration_seconds": calib_seconds if ran else None, "histogram_tokens": results.get("histogram_tokens"),
            "greedy_tokens": greedy.get("tokens"), "greedy_steps": greedy.get("steps"),
            "greedy_seconds_total": greedy.get("seconds_total"),
            "greedy_seconds_per_block": greedy.get("seconds_per_block"),
            "pplp_calib_tokens": pplp_calib_tokens if args.pplp else None,
            "heldout_tokens": int(heldout.numel()), "dense_ppl": dense_ppl, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"SmolLM2-135M-Instruct, held-out {heldout.numel()} tokens of {os.path.basename(args.calib_data)}, "
          f"dense PPL {dense_ppl:.3f}; TEAL lookup {os.path.basename(path)} "
          f"({greedy.get('tokens')} greedy tokens, {greedy.get('steps')} steps, "
          f"{greedy.get('seconds_total') or 0:.0f} s greedy)")
    print()
    print("| method | level | held-out PPL ratio | weights skipped (7 projections) | sparsity (sparsified inputs) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['level']} | {r['ppl_ratio']:.4f} | {r['weights_skipped']:.3f} "
              f"| {r['sparsity']:.3f} |")
    write_results(args.json_out, meta, rows)


if __name__ == "__main__":
    main()
