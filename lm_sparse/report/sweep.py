"""`lm-sparse sweep`: one lm-eval run per sparsity level plus the dense baseline, resumable.

    lm-sparse sweep --model sparse-hf --model_args pretrained=smollm2 --levels ppl_p=1,5,10 teal=0.25,0.5 \
        --tasks lmsparse_smoke --output_path runs/

Each level writes its results file under OUTPUT_PATH/<level>/ exactly as `lm_eval --output_path` does, so
`lm-sparse report OUTPUT_PATH` reads them all. A level whose results file exists (same model arguments,
every requested task present) is skipped, so an interrupted sweep resumes where it stopped. lm-eval's
request cache (`use_cache`) is kept per level and per model arguments (OUTPUT_PATH/<level>/lm_cache/<hash>):
its key is only the request, so one cache shared by levels would hand sparse runs dense answers. Calibrated
levels (ppl_p, teal) reuse lm-sparse's threshold cache by themselves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CALIBRATION_ARGS, RULE_ARGS, SparsityArgumentError, parse_sparsity_args


# TEAL's own settings: sparse-hf takes them with teal=S, or with ppl_p=P when method=teal.
TEAL_ARGS = frozenset({"teal_mode", "teal_greedy_steps", "teal_greedy_tokens"})
# sparse-hf arguments that only make sense at a calibrated level (ppl_p=P or teal=S): config's, method= and TEAL's.
CALIBRATED_LEVEL_ARGS = frozenset({"method", *TEAL_ARGS, *CALIBRATION_ARGS})


@dataclass(frozen=True)
class Level:
    """One point of a sweep: a label ('dense', 'ppl_p=1') and the sparsity arguments it adds."""

    label: str
    args: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """Directory name of the level under the output path."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label)


@dataclass
class LevelOutcome:
    """What happened to one level: its results file, whether it was skipped, how long it took."""

    level: Level
    results_file: Path
    skipped: bool
    seconds: float


def builtin_tasks_dir() -> Path:
    """lm-sparse's task folder: `tasks/` of a source checkout, or `lm_sparse/data/tasks` when installed."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "data" / "tasks", package.parent / "tasks"):
        if (candidate / "lmsparse_smoke").is_dir():
            return candidate
    raise FileNotFoundError(f"lm-sparse's tasks folder is missing (looked in {package / 'data' / 'tasks'} "
                            f"and {package.parent / 'tasks'})")


def parse_levels(tokens: list[str], dense: bool = True) -> list[Level]:
    """`["ppl_p=1,5", "teal=0.25"]` -> dense, ppl_p=1, ppl_p=5, teal=0.25 (each validated).

    Raises `SparsityArgumentError` naming the bad token.
    """
    levels = [Level("dense")] if dense else []
    for token in tokens:
        key, sep, values = token.partition("=")
        key = key.strip()
        if not sep or key not in RULE_ARGS or not values.strip():
            raise SparsityArgumentError(
                f"sweep: invalid --levels entry {token!r}: expected RULE=V1,V2,... with RULE one of "
                f"{', '.join(RULE_ARGS)}")
        for value in (v.strip() for v in values.split(",")):
            if not value:
                raise SparsityArgumentError(f"sweep: invalid --levels entry {token!r}: empty value")
            try:
                parse_sparsity_args({key: value})  # one clear error line for an out-of-range level
            except SparsityArgumentError as exc:
                reason = str(exc).removeprefix("sparse-hf: ")
                raise SparsityArgumentError(f"sweep: invalid --levels entry {token!r}: {reason}") from None
            level = Level(f"{key}={value}", {key: value})
            if level not in levels:
                levels.append(level)
    if not levels:
        raise SparsityArgumentError("sweep: nothing to run: give --levels or keep the dense baseline")
    return levels


def parse_model_args(text: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'} (lm-eval's own syntax)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise SparsityArgumentError(f"sweep: invalid --model_args entry {part!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def level_model_args(base: dict[str, str], level: Level) -> str:
    """The model_args string of one level: the base arguments plus the level's rule."""
    clash = sorted(set(base) & set(RULE_ARGS))
    if clash:
        raise SparsityArgumentError(f"sweep: put {clash[0]}= in --levels, not in --model_args")
    # Calibration arguments in --model_args apply to the calibrated levels only (sparse-hf rejects them
    # elsewhere): teal takes all but method=, ppl_p all but TEAL's own unless method=teal, the others none.
    teal_method = base.get("method", "").strip().lower() == "teal"
    calibrated = {"ppl_p": CALIBRATED_LEVEL_ARGS if teal_method else CALIBRATED_LEVEL_ARGS - TEAL_ARGS,
                  "teal": CALIBRATED_LEVEL_ARGS - {"method"}}
    allowed = next((calibrated[k] for k in level.args if k in calibrated), frozenset())
    shared = {k: v for k, v in base.items() if k not in CALIBRATED_LEVEL_ARGS or k in allowed}
    merged = {**shared, **level.args}
    return ",".join(f"{k}={v}" for k, v in merged.items())


def _same_model_args(recorded: Any, wanted: str) -> bool:
    if isinstance(recorded, dict):
        recorded = ",".join(f"{k}={v}" for k, v in recorded.items())
    return parse_model_args(str(recorded or "")) == parse_model_args(wanted)


# eval settings that change what a level measures; a results file made under other values is not reused
MEASURED_SETTINGS = ("limit", "num_fewshot")
SETTINGS_KEY = "lm_sparse_sweep"  # where the sweep records them in the results file's config


def measured_settings(eval_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The values of MEASURED_SETTINGS in `eval_kwargs` (None where absent), as the results file records them."""
    return {name: eval_kwargs.get(name) for name in MEASURED_SETTINGS}


def finished_results(level_dir: Path, model_args: str, tasks: list[str],
                     settings: dict[str, Any] | None = None) -> Path | None:
    """The newest results file under `level_dir` with these model arguments, every task and, where given,
    the same measured settings (`--limit`, `--num_fewshot`); else None."""
    for path in sorted(level_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a truncated file from an interrupted write: run the level again
        config = data.get("config") or {}
        if settings is not None and config.get(SETTINGS_KEY) != settings:
            continue
        if _same_model_args(config.get("model_args"), model_args) and all(
                t in (data.get("results") or {}) for t in tasks):
            return path
    return None


def _local_files_stamp(model_args: str) -> list:
    """(name, size, mtime) of every local file the arguments name (`pretrained` and `peft` directories, calibration
    text, thresholds files): rewritten weights or text at the same path give other answers."""
    stamps = []
    for name, value in sorted(parse_model_args(model_args).items()):
        path = Path(str(value)).expanduser()
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file() and "lm_cache" not in p.parts) \
                if path.is_dir() else [path] if path.is_file() else []
            stamps += [(name, str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        except OSError:
            continue
    return stamps


def request_cache_path(level_dir: Path, model: str, model_args: str) -> str:
    """Per-level sqlite prefix for lm-eval's request cache, keyed by the full model and model arguments, the
    local files they name and lm-sparse's version (answers cached under other weights or code are not reused)."""
    from .. import __version__

    stamp = json.dumps([model, model_args, __version__, _local_files_stamp(model_args)])
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    (level_dir / "lm_cache").mkdir(parents=True, exist_ok=True)
    return str(level_dir / "lm_cache" / digest)


def evaluate_level(model: str, model_args: str, tasks: list[str], level_dir: Path, include_path: list[str],
                   eval_kwargs: dict[str, Any], use_cache: bool) -> Path:
    """Run lm-eval once and write its results file under `level_dir`, as `lm_eval --output_path` would."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    import lm_sparse  # noqa: F401  (registers sparse-hf)

    tracker = EvaluationTracker(output_path=str(level_dir))
    # A recalibration may give new thresholds under the same arguments: cached answers would be stale.
    cache = None
    if use_cache and "recalibrate" not in parse_model_args(model_args):
        cache = request_cache_path(level_dir, model, model_args)
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, use_cache=cache, log_samples=False,
        evaluation_tracker=tracker, task_manager=TaskManager(include_path=include_path), **eval_kwargs,
    )
    if results is None:  # non-zero ranks of a multi-process run
        return level_dir
    settings = measured_settings(eval_kwargs)
    results["config"][SETTINGS_KEY] = settings
    tracker.save_results_aggregated(results=results, samples=None)
    found = finished_results(level_dir, model_args, tasks, settings)
    if found is None:
        raise RuntimeError(f"sweep: lm-eval finished but wrote no results file under {level_dir}")
    return found


def _one_line_summary(results_file: Path) -> str:
    """'sparsity 0.431 | task acc 76.25 | ...' for the progress line of a finished level."""
    from .table import load_run

    run = load_run(results_file)
    parts = [f"sparsity {run.measured():.3f}"]
    for task, score in run.scores.items():
        parts.append(f"{task} {score.name} {score.value * score.scale:.2f}")
    return " | ".join(parts)


def run_sweep(model: str, model_args: str, levels: list[Level], tasks: list[str], output_path: str | Path,
              include_path: list[str] | None = None, use_cache: bool = True,
              eval_kwargs: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> list[LevelOutcome]:
    """Evaluate every level (skipping finished ones); return where each level's results file is."""
    output_path = Path(output_path)
    base = parse_model_args(model_args)
    settings = measured_settings(eval_kwargs or {})
    builtin = builtin_tasks_dir()
    # `--include_path tasks` in a checkout names the built-in folder again: lm-eval would warn per task
    paths = [str(builtin), *(p for p in include_path or [] if Path(p).resolve() != builtin.resolve())]
    outcomes = []
    for i, level in enumerate(levels, 1):
        args = level_model_args(base, level)
        level_dir = output_path / level.slug
        prefix = f"[{i}/{len(levels)}] {level.label}"
        done = finished_results(level_dir, args, tasks, settings) if level_dir.is_dir() else None
        if done is not None:
            log(f"{prefix}: already done, skipped ({done}) | {_one_line_summary(done)}")
            outcomes.append(LevelOutcome(level, done, True, 0.0))
            continue
        log(f"{prefix}: evaluating {', '.join(tasks)} with {model} {args}")
        start = time.perf_counter()
        results_file = evaluate_level(model, args, tasks, level_dir, paths, dict(eval_kwargs or {}), use_cache)
        seconds = time.perf_counter() - start
        log(f"{prefix}: done in {seconds:.0f} s | {_one_line_summary(results_file)}")
        outcomes.append(LevelOutcome(level, results_file, False, seconds))
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-sparse sweep",
        description="Run lm-eval once per sparsity level plus the dense baseline; resumable.")
    parser.add_argument("--model", default="sparse-hf", help="lm-eval model type (default sparse-hf)")
    parser.add_argument("--model_args", default="", help="arguments shared by every level, e.g. pretrained=smollm2")
    parser.add_argument("--levels", nargs="*", default=[], metavar="RULE=V1,V2",
                        help=f"levels to sweep, RULE one of {', '.join(RULE_ARGS)} (e.g. ppl_p=1,5,10 teal=0.25,0.5)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups")
    parser.add_argument("--output_path", required=True, help="one subdirectory per level is written here")
    parser.add_argument("--include_path", action="append", default=[], help="extra task folders (repeatable)")
    parser.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense baseline")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false",
                        help="do not use lm-eval's per-level request cache")
    parser.add_argument("--batch_size", default="1", help="lm-eval batch size (an int, or auto)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="evaluate only this many (or this fraction of) docs")
    parser.add_argument("--confirm_run_unsafe_code", action="store_true", help="needed by humaneval and mbpp")
    parser.add_argument("--verbosity", default="WARNING", help="lm-eval log level (default WARNING)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lm-sparse sweep`: 0 when every level has a results file, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    try:
        levels = parse_levels(args.levels, dense=args.dense)
    except SparsityArgumentError as exc:
        print(f"lm-sparse {exc}", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    batch_size: int | str = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    eval_kwargs = {"batch_size": batch_size, "device": args.device, "num_fewshot": args.num_fewshot,
                   "limit": args.limit, "confirm_run_unsafe_code": args.confirm_run_unsafe_code,
                   "verbosity": args.verbosity}
    try:
        outcomes = run_sweep(args.model, args.model_args, levels, tasks, args.output_path, args.include_path,
                             args.use_cache, eval_kwargs)
    except SparsityArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ran = sum(not o.skipped for o in outcomes)
    print(f"sweep: {len(outcomes)} levels ({ran} run, {len(outcomes) - ran} already done) in {args.output_path}; "
          f"next: lm-sparse report {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
