"""PNG plots of a sweep: score against measured sparsity per task, and activation ratio per layer.

matplotlib runs on the Agg backend (no display needed). Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .table import Run, dense_baseline  # noqa: E402

# Row order of the per-layer heat map: the inputs of the attention and MLP matrices, as in a block.
SITE_ORDER = ("qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down")


def safe_name(text: str) -> str:
    """A file-name-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def plot_score_vs_sparsity(runs: list[Run], task: str, out_dir: Path) -> Path:
    """Task score against measured overall sparsity: one line per (model, method), dense as a dashed line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    metric = next((r.scores[task].name for r in runs if task in r.scores), "score")
    lines: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if task in run.scores and not run.is_dense:
            lines.setdefault((run.model, run.method), []).append(run)
    models = sorted({r.model for r in runs})
    for (model, method), members in sorted(lines.items()):
        members.sort(key=lambda r: r.measured())
        xs = [r.measured() for r in members]
        ys = [r.scores[task].value * r.scores[task].scale for r in members]
        errs = [(r.scores[task].stderr or 0.0) * r.scores[task].scale for r in members]
        name = method if len(models) == 1 else f"{model}: {method}"
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
        for x, y, r in zip(xs, ys, members):
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for model in models:
        base = dense_baseline(runs, model)
        if base is not None and task in base.scores:
            score = base.scores[task]
            name = "dense" if len(models) == 1 else f"{model}: dense"
            ax.axhline(score.value * score.scale, linestyle="--", color="gray", label=name)
    ax.set_xlabel("measured activation sparsity (overall)")
    scored = [r.scores[task] for r in runs if task in r.scores]
    unit = " (%)" if scored and all(s.is_fraction for s in scored) else ""
    ax.set_ylabel(f"{metric}{unit}")
    ax.set_title(task)
    ax.set_xlim(left=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / f"score_vs_sparsity_{safe_name(task)}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def activation_matrix(run: Run) -> tuple[list[str], np.ndarray] | None:
    """(site names, activation ratio [sites, layers]) from a run's per-layer sparsity; None if absent."""
    per_layer = (run.sparsity or {}).get("per_layer") or {}
    names = [n for n in SITE_ORDER if n in per_layer] + sorted(n for n in per_layer if n not in SITE_ORDER)
    rows = []
    kept = []
    for name in names:
        values = per_layer[name]
        if not values or all(v is None for v in values):
            continue
        rows.append([np.nan if v is None else 1.0 - float(v) for v in values])
        kept.append(name)
    if not rows:
        return None
    width = max(len(r) for r in rows)
    matrix = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return kept, matrix


def plot_layer_heatmap(run: Run, out_dir: Path, index: int = 0) -> Path | None:
    """Heat map of the activation ratio (1 - sparsity) per layer and per matrix input of one run."""
    found = activation_matrix(run)
    if found is None:
        return None
    names, matrix = found
    layers = matrix.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * layers + 2.0), 0.45 * len(names) + 1.6), dpi=100)
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(names)), labels=[f"{n} input" for n in names])
    step = max(1, layers // 15)
    ax.set_xticks(range(0, layers, step))
    ax.set_xlabel("layer")
    ax.set_title(f"activation ratio per layer: {run.model}, {run.label} "
                 f"(measured sparsity {run.measured():.3f})", fontsize=9)
    fig.colorbar(image, ax=ax, label="activation ratio")
    fig.tight_layout()
    # The index keeps runs that differ only in their calibration apart.
    path = Path(out_dir) / f"layers_{index:02d}_{safe_name(run.model)}_{safe_name(run.label)}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(runs: list[Run], tasks: list[str], out_dir: Path) -> dict[str, list[Path]]:
    """All plots of a report: {"score": [per task], "layers": [per sparse run]}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("score_vs_sparsity_*.png"), *out_dir.glob("layers_*.png")]:
        stale.unlink()  # plots of runs no longer in the report
    score_plots = [plot_score_vs_sparsity(runs, task, out_dir) for task in tasks]
    sparse = [r for r in runs if not r.is_dense]
    layer_plots = [p for p in (plot_layer_heatmap(r, out_dir, i) for i, r in enumerate(sparse)) if p is not None]
    return {"score": score_plots, "layers": layer_plots}
