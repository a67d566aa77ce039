"""The short sparsity table printed after lm-eval's own results table."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_summary(report: dict[str, Any]) -> str:
    """Render `results['config']['sparsity']` as a small Markdown table (overall, per phase, per site)."""
    lines = [
        f"sparse-hf: {report.get('label', report.get('method'))}  "
        f"(activation {report.get('activation')}, prefill policy {report.get('sparse_prefill')})",
        "",
        "|scope|tokens|sparsity|ffn|attn|",
        "|-----|-----:|-------:|--:|---:|",
        f"|all|{report.get('tokens', 0)}|{_pct(report.get('overall'))}|{_pct(report.get('ffn'))}|"
        f"{_pct(report.get('attn'))}|",
    ]
    for phase, row in (report.get("phases") or {}).items():
        lines.append(f"|{phase}|{row.get('tokens', 0)}|{_pct(row.get('sparsity'))}|{_pct(row.get('ffn'))}|"
                     f"{_pct(row.get('attn'))}|")
    if report.get("weights_skipped") is not None:
        # TEAL's levels (teal=S) are parameter-weighted: this is the number to compare them with.
        lines += ["", f"weights skipped (parameter-weighted over the decoder's linear layers): "
                      f"{_pct(report.get('weights_skipped'))}"]
    execution = report.get("execution") or {}
    per_layer = report.get("per_layer") or {}
    if per_layer:
        lines += ["", "|input of|mean|min|max|prefill path|decode path|", "|---|---:|---:|---:|---|---|"]
        for name, values in per_layer.items():
            vals = [v for v in values if v is not None]
            paths = execution.get(name, {})
            if vals:
                lines.append(f"|{name}|{sum(vals) / len(vals):.4f}|{min(vals):.4f}|{max(vals):.4f}|"
                             f"{paths.get('prefill', '-')}|{paths.get('decode', '-')}|")
    if not report.get("tokens") and report.get("method") not in (None, "dense"):
        lines += ["", NOTHING_MEASURED]
    return "\n".join(lines)


# lm-eval's --use_cache answers repeated requests from a cache keyed by the request alone, so a sparse run
# after a dense one (or another level) with the same cache path silently returns the earlier answers.
NOTHING_MEASURED = ("warning: no token went through the sparse model, so these results are not this setting's. "
                    "With lm_eval --use_cache, answers come from a cache keyed by request only, not by sparsity "
                    "settings: give each setting its own cache path.")
