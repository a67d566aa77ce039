"""`lm-sparse report DIR [DIR ...] [--out DIR]`: leaderboard (Markdown + HTML) and plots from results files.

From Python: `write_report(["runs/"], "report/")` returns the paths it wrote.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .table import ResultsError, Run, all_tasks, comparison_notes, leaderboard_markdown, leaderboard_rows, \
    load_runs, lower_is_better_columns


@dataclass
class Report:
    """What `write_report` wrote, plus the Markdown table it printed."""

    markdown: str
    markdown_path: Path
    html_path: Path
    plots: dict[str, list[Path]]
    runs: list[Run]


def write_report(paths: list[str | Path], out_dir: str | Path, title: str = "lm-sparse report") -> Report:
    """Read every results file under `paths` and write leaderboard.md, report.html and plots/*.png to `out_dir`.

    Raises `ResultsError` when a file cannot be read or no results file is found.
    """
    from .html import render_report
    from .plots import write_plots

    left_out: list[tuple[Run, Run]] = []
    runs = load_runs(list(paths), left_out)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = leaderboard_markdown(runs, comparison_notes(runs, left_out))
    md_path = out_dir / "leaderboard.md"
    md_path.write_text(f"# {title}\n\n{markdown}\n", encoding="utf-8")
    plots = write_plots(runs, all_tasks(runs), out_dir / "plots")
    header, rows = leaderboard_rows(runs)
    legend = markdown.split("\n\n", 1)[1] if "\n\n" in markdown else ""
    html_path = out_dir / "report.html"
    html_path.write_text(render_report(header, rows, plots, legend, [str(r.path) for r in runs], title,
                                             lower_is_better_columns(runs)),
                         encoding="utf-8")
    return Report(markdown=markdown, markdown_path=md_path, html_path=html_path, plots=plots, runs=runs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-sparse report",
        description="Leaderboard table (Markdown and self-contained HTML) and plots from lm-eval results files "
                    "(sparse-hf runs, and --model hf runs as dense baselines).")
    parser.add_argument("paths", nargs="+", metavar="DIR", help="results directories or results_*.json files")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where to write leaderboard.md, report.html and plots/ (default: FIRST_DIR/report)")
    parser.add_argument("--title", default="lm-sparse report", help="page title")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lm-sparse report`; returns 0, or 2 with one error line on unreadable input."""
    args = build_parser().parse_args(argv)
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first) / "report"
    try:
        report = write_report(args.paths, out, title=args.title)
    except ResultsError as exc:
        print(f"lm-sparse report: {exc}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"\nwrote {report.markdown_path}, {report.html_path} and "
          f"{sum(len(v) for v in report.plots.values())} plots in {report.html_path.parent / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
