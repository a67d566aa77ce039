"""Read lm-eval results files and turn them into leaderboard rows.

A results file is what lm-eval writes to `<output_path>/<model>/results_<timestamp>.json`. `--model
sparse-hf` runs carry a `config.sparsity` section (method, label, measured sparsity, per-layer sparsity,
calibration); `--model hf` runs have none and count as dense baselines with sparsity 0.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"  # what the alias and its converted checkpoint directory are shown as
# Which metric of a task is "the" score, in order of preference; the first one a task reports wins.
MAIN_METRICS = ("acc", "exact_match", "pass@1", "pass_at_1", "em", "f1", "mcc", "acc_norm", "word_perplexity",
                "perplexity", "byte_perplexity", "bits_per_byte")
# Metrics reported on a 0..1 scale: shown (and compared) in percentage points.
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


class ResultsError(ValueError):
    """A results file cannot be read or is not an lm-eval results file (message is one line)."""


@dataclass(frozen=True)
class Score:
    """One task's main metric in one run."""

    metric: str  # e.g. "acc,none"
    value: float
    stderr: float | None
    higher_is_better: bool

    @property
    def name(self) -> str:
        return self.metric.split(",")[0]

    @property
    def is_fraction(self) -> bool:
        """True for 0..1 metrics (accuracy, exact match): shown and compared in percentage points."""
        return self.name not in LOWER_IS_BETTER and 0.0 <= self.value <= 1.0

    @property
    def scale(self) -> float:
        return 100.0 if self.is_fraction else 1.0


@dataclass
class Run:
    """One lm-eval run: its model, sparsity method and level, per-task scores and measured sparsity."""

    path: Path
    model: str
    method: str  # dense | topk | fat | pplp | teal
    label: str  # e.g. "topk=0.5"; "dense" for baselines
    level: float | None
    scores: dict[str, Score]
    n_shot: dict[str, Any]
    n_samples: dict[str, Any]
    sparsity: dict[str, Any] | None  # the config.sparsity section, None for --model hf runs
    date: float
    model_args: Any = None
    tasks_in_file: list[str] = field(default_factory=list)

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    def measured(self, scope: str = "overall") -> float:
        """Measured sparsity (overall, ffn or attn); 0 for dense runs without a sparsity section."""
        if self.sparsity is None:
            return 0.0
        value = self.sparsity.get(scope)
        return float(value) if value is not None else 0.0

    @property
    def calibration_id(self) -> str:
        """A short identity of the calibration (its hash or file), '-' when the method has none."""
        calib = (self.sparsity or {}).get("calibration") or {}
        for key in ("identity", "cache_key", "hash", "key", "id"):
            if calib.get(key):
                return str(calib[key])[:12]
        if calib.get("path") or calib.get("file"):
            return os.path.basename(str(calib.get("path") or calib.get("file")))
        return "-"

    @property
    def row_key(self) -> tuple[str, str, str, str]:
        return (self.model, self.method, self.label, self.calibration_id)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def main_score(task_results: dict[str, Any], higher_is_better: dict[str, Any] | None = None) -> Score | None:
    """Pick the main metric of one task's entry in results['results'] (None when it has no metric)."""
    metrics = {k: v for k, v in task_results.items() if "," in k and "_stderr," not in k and _num(v) is not None}
    if not metrics:
        return None
    by_name: dict[str, str] = {}
    for key in metrics:
        by_name.setdefault(key.split(",")[0], key)
    chosen = next((by_name[n] for n in MAIN_METRICS if n in by_name), next(iter(metrics)))
    name, _, filt = chosen.partition(",")
    stderr = _num(task_results.get(f"{name}_stderr,{filt}"))
    hib = (higher_is_better or {}).get(name)
    if hib is None:
        hib = name not in LOWER_IS_BETTER
    return Score(metric=chosen, value=float(metrics[chosen]), stderr=stderr, higher_is_better=bool(hib))


def leaderboard_tasks(data: dict[str, Any]) -> list[str]:
    """The task columns of a run: top-level tasks and groups, groups without an aggregate expanded.

    A group with its own aggregate score (e.g. mmlu) stays one column; a group without one (e.g.
    lmsparse_smoke) is replaced by its subtasks, recursively. A top-level group with an aggregate also
    keeps its subtasks as columns, so a suite shows both its tasks and its mean.
    """
    results = data.get("results") or {}
    groups: dict[str, list[str]] = data.get("group_subtasks") or {}
    children = {c for subs in groups.values() for c in subs}
    has_score = {t for t, r in results.items() if main_score(r) is not None}
    out: list[str] = []

    def add(name: str, top: bool) -> None:
        subs = groups.get(name) or []
        if name in has_score and name not in out:
            out.append(name)
        if subs and (name not in has_score or top):
            for sub in subs:
                add(sub, top=False)

    top_level = [t for t in results if t not in children]
    top_level += [g for g in groups if g not in children and g not in results]
    for name in top_level:
        add(name, top=True)
    return out


def load_run(path: str | os.PathLike) -> Run:
    """Read one lm-eval results file; raise `ResultsError` (one line) when it is not one."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ResultsError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not isinstance(
            data.get("config"), dict):
        raise ResultsError(f"{path} is not an lm-eval results file (no 'results' and 'config' sections)")
    config = data["config"]
    sparsity = config.get("sparsity")
    if sparsity is not None and not isinstance(sparsity, dict):
        raise ResultsError(f"{path}: config.sparsity is not an object")
    hib_all = data.get("higher_is_better") or {}
    scores = {}
    for task in leaderboard_tasks(data):
        score = main_score(data["results"][task], hib_all.get(task))
        if score is not None:
            scores[task] = score
    method = str((sparsity or {}).get("method") or "dense")
    level = _num(((sparsity or {}).get("params") or {}).get("level"))
    label = str((sparsity or {}).get("label") or method) if method != "dense" else "dense"
    model_args = config.get("model_args")
    return Run(
        path=path, model=_model_name(data, model_args), method=method, label=label, level=level,
        scores=scores, n_shot=dict(data.get("n-shot") or {}), n_samples=dict(data.get("n-samples") or {}),
        sparsity=sparsity, date=path.stat().st_mtime, model_args=model_args,
        tasks_in_file=sorted(data["results"]),
    )


def _model_name(data: dict[str, Any], model_args: Any) -> str:
    pretrained = None
    if isinstance(model_args, dict):
        pretrained = model_args.get("pretrained")
    elif isinstance(model_args, str):
        for part in model_args.split(","):
            key, _, value = part.partition("=")
            if key.strip() == "pretrained":
                pretrained = value.strip()
    name = str(pretrained or data.get("model_name") or "model").rstrip("/")
    if name.lower() == SMOLLM2_ALIAS:
        return SMOLLM2_NAME
    # Local checkpoint directories: the last path component says which model it is; Hub ids stay whole.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        # lm-sparse's converted checkpoints end in "-<16 hex digits of the source file>": drop that.
        return re.sub(r"-[0-9a-f]{16}$", "", os.path.basename(name))
    return name


def find_results_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Every `results_*.json` under the given directories (files are taken as they are), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("results_*.json"))
        else:
            raise ResultsError(f"no such file or directory: {p}")
    return found


def load_runs(paths: list[str | os.PathLike], left_out: list[tuple[Run, Run]] | None = None) -> list[Run]:
    """Load every results file under `paths`; of repeated (model, method, level, calibration) keep the newest.

    `left_out`, when given, receives (older run, the newer run kept instead) for every run not kept.
    """
    files = find_results_files(paths)
    if not files:
        raise ResultsError(f"no results_*.json files under {', '.join(map(str, paths))}")
    newest: dict[tuple, Run] = {}
    dropped: list[Run] = []
    for f in files:
        run = load_run(f)
        old = newest.get(run.row_key)
        if old is None or run.date >= old.date:
            newest[run.row_key] = run
            if old is not None:
                dropped.append(old)
        else:
            dropped.append(run)
    if left_out is not None:
        left_out += [(run, newest[run.row_key]) for run in dropped]
    return sort_runs(list(newest.values()))


def comparison_notes(runs: list[Run], left_out: list[tuple[Run, Run]] = ()) -> list[str]:
    """What a reader of the leaderboard must know: runs left out, and changes from dense that compare
    different numbers of samples (a different --limit)."""
    notes = [f"left out {old.path}: an older run of {old.model} {old.label} ({new.path} is shown)"
             for old, new in left_out]
    for run in runs:
        base = dense_baseline(runs, run.model)
        if base is None or base is run:
            continue
        for task in run.scores:
            mine = (run.n_samples.get(task) or {}).get("effective")
            theirs = (base.n_samples.get(task) or {}).get("effective")
            if mine is not None and theirs is not None and mine != theirs:
                notes.append(f"{run.model} {run.label}: {task} ran {mine} samples, the dense run {theirs} "
                             "(a different --limit?): its change from dense compares different samples")
    return notes


def sort_runs(runs: list[Run]) -> list[Run]:
    """Dense first per model, then by method and measured sparsity."""
    return sorted(runs, key=lambda r: (r.model, not r.is_dense, r.method, r.measured(), r.label))


def dense_baseline(runs: list[Run], model: str) -> Run | None:
    """The dense run of `model` among `runs` (the newest when there are several)."""
    dense = [r for r in runs if r.model == model and r.is_dense]
    return max(dense, key=lambda r: r.date) if dense else None


def all_tasks(runs: list[Run]) -> list[str]:
    """Task columns in first-seen order over all runs."""
    out: list[str] = []
    for run in runs:
        out += [t for t in run.scores if t not in out]
    return out


def format_score(score: Score | None) -> str:
    if score is None:
        return "-"
    text = f"{score.value * score.scale:.2f}"
    if score.stderr is not None:
        text += f" ± {score.stderr * score.scale:.2f}"
    return text


def format_delta(score: Score | None, base: Score | None) -> str:
    if score is None or base is None or score.name != base.name:
        return ""
    delta = (score.value - base.value) * score.scale
    return f"{delta:+.2f}"


def _measured_cell(run: Run, scope: str) -> str:
    """The measured sparsity, or '-' where the run's report says nothing there was counted (None): a dense
    sparse-hf run counts the FFN's natural zeros, not attention's. `--model hf` runs (no report): 0."""
    if run.sparsity is not None and run.sparsity.get(scope) is None:
        return "-"
    return f"{run.measured(scope):.3f}"


def leaderboard_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leaderboard: one row per run, score ± stderr (change from dense) per task."""
    tasks = all_tasks(runs)
    header = ["model", "method", "level"]
    for task in tasks:
        metric = next((r.scores[task].name for r in runs if task in r.scores), "")
        header.append(f"{task} ({metric})")
    header += ["sparsity", "ffn", "attn", "calibration"]
    rows = []
    for run in runs:
        base = dense_baseline(runs, run.model)
        row = [run.model, run.method, run.label]
        for task in tasks:
            score = run.scores.get(task)
            cell = format_score(score)
            if base is not None and base is not run:
                delta = format_delta(score, base.scores.get(task))
                cell += f" ({delta})" if delta else ""
            row.append(cell)
        row += [_measured_cell(run, "overall"), _measured_cell(run, "ffn"), _measured_cell(run, "attn"),
                run.calibration_id]
        rows.append(row)
    return header, rows


def lower_is_better_columns(runs: list[Run]) -> set[int]:
    """Indexes of leaderboard columns whose metric is better when lower (perplexity): their deltas flip colour."""
    tasks = all_tasks(runs)
    out = set()
    for i, task in enumerate(tasks):
        score = next((r.scores[task] for r in runs if task in r.scores), None)
        if score is not None and not score.higher_is_better:
            out.add(3 + i)
    return out


def markdown_table(header: list[str], rows: list[list[str]], text_columns: tuple[str, ...] = (
        "model", "method", "level", "calibration", "task", "metric", "verdict")) -> str:
    """A GitHub-flavoured Markdown table; columns not named in `text_columns` are right-aligned."""
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---" if h in text_columns else "--:" for h in header]
    lines = ["|" + "|".join(esc(h) for h in header) + "|", "|" + "|".join(align) + "|"]
    lines += ["|" + "|".join(esc(c) for c in row) + "|" for row in rows]
    return "\n".join(lines)


def leaderboard_markdown(runs: list[Run], notes: list[str] = ()) -> str:
    """The leaderboard as Markdown, with a legend line and `notes` (see `comparison_notes`) below it."""
    header, rows = leaderboard_rows(runs)
    legend = ("Scores: accuracy-type metrics in %, ± one standard error, (change from the dense run of the "
              "same model). sparsity/ffn/attn: measured fraction of zero activations entering the matrices "
              "(- where the method sparsifies none of them).")
    return markdown_table(header, rows) + "\n\n" + legend + "".join(f"\n\nNote: {n}" for n in notes)
