"""lm-sparse check: the CI gate's verdicts and exit codes on planted regressions and broken inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm_sparse.report.check import main as check_main
from test_report import make_results

DENSE = {"task_a": 0.60, "task_b": 0.50}


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    return make_results(tmp_path, "dense", acc=DENSE, with_section=False, name="dense")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = check_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_run_passes(tmp_path: Path, baseline: Path, capsys):
    sparse = make_results(tmp_path, "topk", 0.5, acc={"task_a": 0.598, "task_b": 0.50}, sparsity=0.5, ppl=20.1)
    code, out, _ = _run([str(sparse), "--baseline", str(baseline), "--min-sparsity", "0.4"], capsys)
    assert code == 0 and "PASS" in out


def test_planted_accuracy_drop_fails_and_names_the_task(tmp_path: Path, baseline: Path, capsys):
    sparse = make_results(tmp_path, "topk", 0.5, acc={"task_a": 0.55, "task_b": 0.50}, sparsity=0.5)
    code, out, _ = _run([str(sparse), "--baseline", str(baseline)], capsys)
    assert code == 1
    failed = out.split("checks failed:")[1]
    assert "task_a" in failed and "task_b" not in failed and "drop 5.00 > 1" in failed


def test_perplexity_rise_is_a_drop(tmp_path: Path, baseline: Path, capsys):
    sparse = make_results(tmp_path, "topk", 0.5, acc=DENSE, sparsity=0.5, ppl=25.0)
    code, out, _ = _run([str(sparse), "--baseline", str(baseline), "--max-drop", "none"], capsys)
    assert code == 1 and "recovery 0.8000 < 0.98" in out.split("checks failed:")[1]


def test_sparsity_below_the_floor_fails(tmp_path: Path, baseline: Path, capsys):
    sparse = make_results(tmp_path, "topk", 0.9, acc=DENSE, sparsity=0.1)
    code, out, _ = _run([str(sparse), "--baseline", str(baseline), "--min-sparsity", "0.3"], capsys)
    assert code == 1 and "sparsity 0.1000 < floor 0.3" in out
    code, _, _ = _run([str(sparse), "--baseline", str(baseline), "--min-sparsity", "0.05"], capsys)
    assert code == 0


def test_sigma_forgives_drops_within_the_noise(tmp_path: Path, baseline: Path, capsys):
    # stderr of each score is ~4.9-5.0 points: a 3-point drop is < 2 sigma of the difference (~14 points)
    sparse = make_results(tmp_path, "topk", 0.5, acc={"task_a": 0.57, "task_b": 0.50}, sparsity=0.5)
    argv = [str(sparse), "--baseline", str(baseline)]
    assert _run(argv, capsys)[0] == 1
    assert _run(argv + ["--sigma", "2"], capsys)[0] == 0
    big = make_results(tmp_path, "topk", 0.2, acc={"task_a": 0.30, "task_b": 0.50}, sparsity=0.8)
    code, out, _ = _run([str(big), "--baseline", str(baseline), "--sigma", "2"], capsys)
    assert code == 1 and "> 2 sigma" in out


def test_sparse_baseline_and_directory_arguments(tmp_path: Path, capsys):
    earlier = make_results(tmp_path, "topk", 0.5, acc=DENSE, sparsity=0.5, name="earlier")
    now = make_results(tmp_path, "topk", 0.5, acc=DENSE, sparsity=0.5, name="now")
    assert _run([str(now.parent.parent), "--baseline", str(earlier)], capsys)[0] == 0


@pytest.mark.parametrize("case, message", [
    ("tasks", "different tasks"),
    ("n_shot", "different n-shot"),
    ("no_section", "no sparsity section"),
    ("unreadable", "not valid JSON"),
    ("missing", "no such file"),
    ("samples", "different number of samples"),
])
def test_mismatched_or_unreadable_inputs_exit_2_with_one_line(tmp_path: Path, baseline: Path, capsys, case, message):
    if case == "tasks":
        results = make_results(tmp_path, "topk", 0.5, acc={"task_a": 0.6}, sparsity=0.5)
    elif case == "n_shot":
        results = make_results(tmp_path, "topk", 0.5, acc=DENSE, sparsity=0.5, n_shot=5)
    elif case == "no_section":
        results = make_results(tmp_path, acc=DENSE, with_section=False, name="hf2")
    elif case == "samples":
        results = make_results(tmp_path, "topk", 0.5, acc=DENSE, sparsity=0.5, n=50)
    elif case == "unreadable":
        results = tmp_path / "broken.json"
        results.write_text('{"results": ')
    else:
        results = tmp_path / "nope.json"
    code, out, err = _run([str(results), "--baseline", str(baseline)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_bad_option_values_exit_2(tmp_path: Path, baseline: Path, capsys):
    sparse = make_results(tmp_path, "topk", 0.5, acc=DENSE, sparsity=0.5)
    assert _run([str(sparse), "--baseline", str(baseline), "--min-sparsity", "5"], capsys)[0] == 2
    assert _run([str(sparse), "--baseline", str(baseline), "--max-drop", "lots"], capsys)[0] == 2
