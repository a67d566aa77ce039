"""`lm-sparse check RESULTS --baseline BASELINE`: the CI gate.

Per task, the main metric of RESULTS is compared with BASELINE (a dense run or an earlier sparse run):

- drop: how much worse RESULTS is, in percentage points for 0..1 metrics (accuracy, exact match) and in the
  metric's own units otherwise (perplexity); a task fails when drop > --max-drop;
- recovery: RESULTS / BASELINE (BASELINE / RESULTS for lower-is-better metrics); fails when < --min-recovery;
- --sigma K: a task fails only when, in addition, the drop exceeds K standard errors of the difference
  (sqrt(se_results^2 + se_baseline^2)); tasks without a standard error (perplexity) keep the plain rule;
- --min-sparsity S: RESULTS fails when its measured sparsity (overall, or --sparsity-scope ffn|attn) < S.

Exit codes: 0 pass, 1 fail (a table names every failing task), 2 unreadable or mismatched files
(different tasks, different n-shot or sample counts, RESULTS without a sparsity section), one line.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .table import ResultsError, Run, Score, find_results_files, load_run, markdown_table


class MismatchError(ValueError):
    """RESULTS and BASELINE cannot be compared (one line)."""


@dataclass
class TaskVerdict:
    """The comparison of one task (or of the measured sparsity, task '(sparsity)')."""

    task: str
    metric: str
    baseline: str
    result: str
    drop: str
    recovery: str
    failed: bool
    reason: str


@dataclass
class CheckOutcome:
    """Every verdict and whether the gate passed."""

    verdicts: list[TaskVerdict]

    @property
    def failed(self) -> list[TaskVerdict]:
        return [v for v in self.verdicts if v.failed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def table(self, only_failed: bool = False) -> str:
        header = ["task", "metric", "baseline", "result", "drop", "recovery", "verdict"]
        rows = [[v.task, v.metric, v.baseline, v.result, v.drop, v.recovery, v.reason or "ok"]
                for v in self.verdicts if v.failed or not only_failed]
        return markdown_table(header, rows)


def resolve_results_file(path: str | Path, role: str) -> Run:
    """Load RESULTS/BASELINE: a results file, or a directory holding exactly one run (the newest file)."""
    path = Path(path)
    if path.is_dir():
        files = find_results_files([path])
        if not files:
            raise ResultsError(f"{role}: no results_*.json file under {path}")
        runs = [load_run(f) for f in files]
        keys = {r.row_key for r in runs}
        if len(keys) > 1:
            raise ResultsError(f"{role}: {path} holds {len(keys)} different runs; pass one results file")
        return max(runs, key=lambda r: r.date)
    if not path.exists():
        raise ResultsError(f"{role}: no such file or directory: {path}")
    return load_run(path)


def check_comparable(results: Run, baseline: Run) -> None:
    """Raise `MismatchError` when the two runs did not evaluate the same thing."""
    if results.sparsity is None:
        raise MismatchError(f"RESULTS {results.path} has no sparsity section (not a --model sparse-hf run)")
    if set(results.scores) != set(baseline.scores):
        only_r = sorted(set(results.scores) - set(baseline.scores))
        only_b = sorted(set(baseline.scores) - set(results.scores))
        raise MismatchError(f"different tasks: only in RESULTS {only_r or '[]'}, only in BASELINE {only_b or '[]'}")
    for task in sorted(results.scores):
        shot_r, shot_b = results.n_shot.get(task), baseline.n_shot.get(task)
        if shot_r != shot_b:
            raise MismatchError(f"different n-shot for {task}: RESULTS {shot_r}, BASELINE {shot_b}")
        samples_r, samples_b = results.n_samples.get(task), baseline.n_samples.get(task)
        if samples_r and samples_b and samples_r.get("effective") != samples_b.get("effective"):
            raise MismatchError(f"different number of samples for {task}: RESULTS {samples_r.get('effective')}, "
                                f"BASELINE {samples_b.get('effective')} (was --limit different?)")
        if results.scores[task].metric != baseline.scores[task].metric:
            raise MismatchError(f"different metric for {task}: RESULTS {results.scores[task].metric}, "
                                f"BASELINE {baseline.scores[task].metric}")


def compare_task(task: str, result: Score, base: Score, max_drop: float | None, min_recovery: float | None,
                 sigma: float | None) -> TaskVerdict:
    """The verdict of one task under the thresholds (None disables a threshold)."""
    sign = 1.0 if base.higher_is_better else -1.0
    drop = sign * (base.value - result.value) * base.scale
    if base.higher_is_better:
        recovery = result.value / base.value if base.value else (1.0 if result.value >= base.value else 0.0)
    else:
        recovery = base.value / result.value if result.value else 1.0
    reasons = []
    if max_drop is not None and drop > max_drop + 1e-12:
        reasons.append(f"drop {drop:.2f} > {max_drop:g}")
    if min_recovery is not None and recovery < min_recovery - 1e-12:
        reasons.append(f"recovery {recovery:.4f} < {min_recovery:g}")
    if reasons and sigma is not None and result.stderr is not None and base.stderr is not None:
        noise = math.sqrt(result.stderr ** 2 + base.stderr ** 2) * base.scale
        if drop <= sigma * noise:
            reasons = []  # within the noise: not a regression under --sigma
        else:
            reasons.append(f"> {sigma:g} sigma ({sigma * noise:.2f})")
    return TaskVerdict(
        task=task, metric=base.metric, baseline=f"{base.value * base.scale:.4g}",
        result=f"{result.value * result.scale:.4g}", drop=f"{drop:+.2f}", recovery=f"{recovery:.4f}",
        failed=bool(reasons), reason="FAIL: " + ", ".join(reasons) if reasons else "",
    )


def run_check(results: Run, baseline: Run, max_drop: float | None = 1.0, min_recovery: float | None = 0.98,
              sigma: float | None = None, min_sparsity: float | None = None,
              sparsity_scope: str = "overall") -> CheckOutcome:
    """Compare RESULTS with BASELINE task by task; raise `MismatchError` when they are not comparable."""
    check_comparable(results, baseline)
    verdicts = [compare_task(t, results.scores[t], baseline.scores[t], max_drop, min_recovery, sigma)
                for t in results.scores]
    if min_sparsity is not None:
        measured = results.measured(sparsity_scope)
        low = measured < min_sparsity
        verdicts.append(TaskVerdict(
            task=f"(sparsity, {sparsity_scope})", metric="measured",
            baseline=f"{baseline.measured(sparsity_scope):.4f}",
            result=f"{measured:.4f}", drop="", recovery="", failed=low,
            reason=f"FAIL: sparsity {measured:.4f} < floor {min_sparsity:g}" if low else ""))
    return CheckOutcome(verdicts)


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-sparse check",
        description="CI gate: fail (exit 1) when a task's score dropped more than allowed against the baseline "
                    "or the measured sparsity fell below a floor; exit 2 for unreadable or mismatched files.")
    parser.add_argument("results", metavar="RESULTS", help="results file (or a directory holding one run)")
    parser.add_argument("--baseline", required=True, metavar="BASELINE",
                        help="results file of the dense run (or an earlier sparse run) to compare with")
    parser.add_argument("--max-drop", type=_optional_float, default=1.0, metavar="POINTS",
                        help="largest allowed drop: percentage points for accuracy-type metrics, metric units "
                             "otherwise (default 1.0; 'none' disables)")
    parser.add_argument("--min-recovery", type=_optional_float, default=0.98, metavar="RATIO",
                        help="smallest allowed score ratio to the baseline (default 0.98; 'none' disables)")
    parser.add_argument("--sigma", type=float, default=None, metavar="K",
                        help="fail only when the drop also exceeds K standard errors of the difference")
    parser.add_argument("--min-sparsity", type=float, default=None, metavar="S",
                        help="fail when the measured sparsity of RESULTS is below S (a fraction in [0, 1])")
    parser.add_argument("--sparsity-scope", choices=("overall", "ffn", "attn"), default="overall",
                        help="which measured sparsity --min-sparsity applies to (default overall)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lm-sparse check`: 0 pass, 1 fail, 2 unreadable or mismatched input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return 0 if exc.code == 0 else 2
    if args.sigma is not None and args.sigma < 0:
        print("lm-sparse check: --sigma must be >= 0", file=sys.stderr)
        return 2
    if args.min_sparsity is not None and not 0.0 <= args.min_sparsity <= 1.0:
        print("lm-sparse check: --min-sparsity must be a fraction in [0, 1]", file=sys.stderr)
        return 2
    try:
        results = resolve_results_file(args.results, "RESULTS")
        baseline = resolve_results_file(args.baseline, "BASELINE")
        outcome = run_check(results, baseline, args.max_drop, args.min_recovery, args.sigma, args.min_sparsity,
                            args.sparsity_scope)
    except (ResultsError, MismatchError) as exc:
        print(f"lm-sparse check: {exc}", file=sys.stderr)
        return 2
    print(f"RESULTS  {results.path} ({results.label})\nBASELINE {baseline.path} ({baseline.label})\n")
    print(outcome.table())
    if outcome.passed:
        print(f"\nPASS: {len(outcome.verdicts)} checks")
        return 0
    print(f"\nFAIL: {len(outcome.failed)} of {len(outcome.verdicts)} checks failed:\n")
    print(outcome.table(only_failed=True))
    return 1


if __name__ == "__main__":
    sys.exit(main())
