"""lm-sparse report: leaderboard rows, Markdown, plots and the HTML page, from synthetic results files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from lm_sparse.report.cli import main as report_main
from lm_sparse.report.cli import write_report
from lm_sparse.report.table import ResultsError, comparison_notes, leaderboard_rows, load_run, load_runs, main_score

TASKS = ("task_a", "task_b")
NUM_LAYERS = 4


def make_results(out_dir: Path, method: str = "dense", level: float | None = None, acc: dict | None = None,
                 sparsity: float = 0.0, n: int = 100, n_shot: int = 0, with_section: bool = True,
                 per_matrix: bool = False, name: str | None = None, ppl: float | None = 20.0) -> Path:
    """Write an lm-eval-shaped results file (sparse-hf layout unless with_section=False) and return it."""
    acc = acc or {t: 0.6 for t in TASKS}
    results = {}
    for task, value in acc.items():
        results[task] = {"alias": task, "acc,none": value,
                         "acc_stderr,none": math.sqrt(value * (1 - value) / (n - 1)),
                         "acc_norm,none": value - 0.05, "acc_norm_stderr,none": 0.04}
    if ppl is not None:
        results["task_ppl"] = {"alias": "task_ppl", "word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"}
    tasks = list(results)
    config = {"model": "sparse-hf" if with_section else "hf", "model_args": "pretrained=org/tiny",
              "batch_size": 1}
    if with_section:
        label = "dense" if method == "dense" else f"{'ppl_p' if method == 'pplp' else method}={level}"
        per_layer = {"down": [sparsity] * NUM_LAYERS}
        if per_matrix:
            per_layer.update({name: [sparsity * (0.5 + i / NUM_LAYERS) for i in range(NUM_LAYERS)]
                              for name in ("q", "k", "v", "o", "gate", "up")})
        config["sparsity"] = {
            "method": method, "label": label, "params": {"rule": method, "level": level},
            "calibration": {"key": "abcdef0123456789ffff", "method": method} if method in ("pplp", "teal") else None,
            "overall": sparsity, "ffn": sparsity, "attn": sparsity / 2 if per_matrix else None,
            "weights_skipped": sparsity, "tokens": 1000, "phases": {}, "per_layer": per_layer,
            "execution": {}, "num_layers": NUM_LAYERS, "activation": "silu", "sparse_prefill": "all",
            "lm_sparse_version": "0.1.0", "world_size": 1,
        }
    data = {
        "results": results, "group_subtasks": {}, "configs": {}, "versions": {t: 1.0 for t in tasks},
        "n-shot": {t: n_shot for t in tasks}, "higher_is_better": {t: {"acc": True, "acc_norm": True,
                                                                       "word_perplexity": False} for t in tasks},
        "n-samples": {t: {"original": n, "effective": n} for t in tasks}, "config": config,
    }
    folder = out_dir / (name or f"{method}-{level}") / "org__tiny"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results_2026-11-24T00-00-00.000000.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    make_results(tmp_path, "dense", acc={"task_a": 0.60, "task_b": 0.50}, sparsity=0.01)
    make_results(tmp_path, "topk", 0.5, acc={"task_a": 0.58, "task_b": 0.51}, sparsity=0.5, ppl=21.0)
    make_results(tmp_path, "topk", 0.3, acc={"task_a": 0.55, "task_b": 0.47}, sparsity=0.7, ppl=23.0)
    make_results(tmp_path, "teal", 0.4, acc={"task_a": 0.59, "task_b": 0.49}, sparsity=0.4, per_matrix=True)
    return tmp_path


def test_main_score_prefers_acc_and_reads_stderr():
    score = main_score({"acc_norm,none": 0.7, "acc,none": 0.5, "acc_stderr,none": 0.05})
    assert score.metric == "acc,none" and score.value == 0.5 and score.stderr == 0.05 and score.higher_is_better
    ppl = main_score({"word_perplexity,none": 12.0, "word_perplexity_stderr,none": "N/A"})
    assert ppl.stderr is None and not ppl.higher_is_better and not ppl.is_fraction
    assert main_score({"alias": "group"}) is None


def test_dense_hf_run_is_a_baseline_with_zero_sparsity(tmp_path: Path):
    run = load_run(make_results(tmp_path, with_section=False))
    assert run.is_dense and run.label == "dense" and run.measured() == 0.0 and run.model == "org/tiny"


def test_leaderboard_rows_scores_deltas_and_sparsity(sweep_dir: Path):
    runs = load_runs([sweep_dir])
    header, rows = leaderboard_rows(runs)
    assert header[:3] == ["model", "method", "level"]
    assert header[3:6] == ["task_a (acc)", "task_b (acc)", "task_ppl (word_perplexity)"]
    assert [r[2] for r in rows] == ["dense", "teal=0.4", "topk=0.5", "topk=0.3"]  # dense first, then by sparsity
    dense, topk5 = rows[0], rows[2]
    stderr = math.sqrt(0.6 * 0.4 / 99) * 100
    assert dense[3] == f"60.00 ± {stderr:.2f}"
    assert topk5[3].endswith("(-2.00)") and topk5[4].endswith("(+1.00)") and topk5[5] == "21.00 (+1.00)"
    assert topk5[6:9] == ["0.500", "0.500", "-"]  # attention inputs: nothing sparsified (None), not 0
    assert rows[1][-1] == "abcdef012345"  # the calibration identity
    assert dense[-1] == "-"
    assert dense[6:9] == ["0.010", "0.010", "-"]  # a dense sparse-hf run counts the FFN, not attention


def test_newest_file_wins_for_the_same_run(tmp_path: Path):
    old = make_results(tmp_path, "topk", 0.5, acc={"task_a": 0.1, "task_b": 0.1}, name="a")
    new = make_results(tmp_path, "topk", 0.5, acc={"task_a": 0.2, "task_b": 0.2}, name="b")
    import os

    os.utime(old, (1, 1))
    left_out: list = []
    (run,) = load_runs([tmp_path], left_out)
    assert run.path == new and run.scores["task_a"].value == 0.2
    assert comparison_notes([run], left_out) == [f"left out {old}: an older run of org/tiny topk=0.5 ({new} is shown)"]


def test_changes_from_dense_over_other_sample_counts_are_noted(tmp_path: Path):
    make_results(tmp_path, "dense", n=20)
    make_results(tmp_path, "topk", 0.5, n=8)
    runs = load_runs([tmp_path])
    notes = comparison_notes(runs)
    assert "org/tiny topk=0.5: task_a ran 8 samples, the dense run 20" in notes[0] and len(notes) == 3
    report = write_report([tmp_path], tmp_path / "out")
    assert "Note: org/tiny topk=0.5: task_a ran 8 samples" in report.markdown


def test_write_report_files_plots_and_self_contained_html(sweep_dir: Path, tmp_path: Path):
    report = write_report([sweep_dir], tmp_path / "out")
    assert report.markdown_path.read_text().count("\n|") >= 5
    assert len(report.plots["score"]) == 3  # one per task
    assert len(report.plots["layers"]) == 3  # one per sparse run
    for png in report.plots["score"] + report.plots["layers"]:
        width, height = _png_size(png)
        assert width > 300 and height > 100
    page = report.html_path.read_text()
    assert page.count('src="data:image/png;base64,') == 6
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert 'id="leaderboard"' in page and "teal=0.4" in page


def test_teal_heatmap_has_one_row_per_matrix(sweep_dir: Path):
    from lm_sparse.report.plots import activation_matrix

    teal = next(r for r in load_runs([sweep_dir]) if r.method == "teal")
    names, matrix = activation_matrix(teal)
    assert names == ["q", "k", "v", "o", "gate", "up", "down"]
    assert matrix.shape == (7, NUM_LAYERS)
    assert matrix[0, 0] == pytest.approx(1 - 0.4 * 0.5)


def test_cli_prints_table_and_fails_cleanly(sweep_dir: Path, tmp_path: Path, capsys):
    assert report_main([str(sweep_dir), "--out", str(tmp_path / "r")]) == 0
    assert "|topk|topk=0.5|" in capsys.readouterr().out
    bad = tmp_path / "bad" / "results_x.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    assert report_main([str(bad.parent)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not valid JSON" in err
    assert report_main([str(tmp_path / "missing")]) == 2
    with pytest.raises(ResultsError, match="no results_"):
        load_runs([tmp_path / "r"])


def test_summary_warns_when_no_token_was_measured():
    """lm_eval --use_cache can answer every request of a sparse run from a dense run's cache: say so."""
    from lm_sparse.report.summary import NOTHING_MEASURED, format_summary

    assert NOTHING_MEASURED in format_summary({"method": "topk", "label": "topk=0.5", "tokens": 0})
    assert NOTHING_MEASURED not in format_summary({"method": "topk", "label": "topk=0.5", "tokens": 12, "ffn": 0.5})
    assert NOTHING_MEASURED not in format_summary({"method": "dense", "label": "dense", "tokens": 0})
