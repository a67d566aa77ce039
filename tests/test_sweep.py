"""lm-sparse sweep: levels, per-level model arguments and request caches, resuming, one real tiny run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import save_tiny_model
from lm_sparse.config import SparsityArgumentError, parse_sparsity_args
from lm_sparse.report import sweep
from lm_sparse.report.sweep import (Level, level_model_args, parse_levels, parse_model_args, request_cache_path,
                                    run_sweep)


def test_parse_levels_expands_values_and_puts_dense_first():
    levels = parse_levels(["ppl_p=1,5", "teal=0.25"])
    assert [lv.label for lv in levels] == ["dense", "ppl_p=1", "ppl_p=5", "teal=0.25"]
    assert levels[1].args == {"ppl_p": "1"} and levels[1].slug == "ppl_p-1"
    assert [lv.label for lv in parse_levels(["topk=0.5"], dense=False)] == ["topk=0.5"]


@pytest.mark.parametrize("bad, message", [("topk", "RULE=V1,V2"), ("sparsity=0.5", "RULE=V1,V2"),
                                          ("topk=0.5,,0.3", "empty value"), ("topk=1.5", "topk=")])
def test_bad_levels_are_one_clear_error(bad, message):
    with pytest.raises(SparsityArgumentError, match=message):
        parse_levels([bad])


def test_calibration_arguments_go_to_calibrated_levels_only():
    base = {"pretrained": "m", "calib_data": "c.txt", "method": "pplp"}
    assert level_model_args(base, Level("dense")) == "pretrained=m"
    assert level_model_args(base, Level("topk=0.5", {"topk": "0.5"})) == "pretrained=m,topk=0.5"
    assert level_model_args(base, Level("teal=0.4", {"teal": "0.4"})) == "pretrained=m,calib_data=c.txt,teal=0.4"
    assert level_model_args(base, Level("ppl_p=1", {"ppl_p": "1"})) == \
        "pretrained=m,calib_data=c.txt,method=pplp,ppl_p=1"
    with pytest.raises(SparsityArgumentError, match="in --levels"):
        level_model_args({"pretrained": "m", "topk": "0.5"}, Level("dense"))


@pytest.mark.parametrize("method", [None, "pplp", "teal"])
def test_teal_settings_go_to_teal_levels_only(method):
    """teal_mode and the greedy settings reach teal levels, and ppl_p levels only when method=teal."""
    base = {"pretrained": "m", "teal_mode": "greedy", "teal_greedy_steps": "4", "teal_greedy_tokens": "512"}
    if method:
        base["method"] = method
    teal_settings = {k: v for k, v in base.items() if k.startswith("teal_")}
    levels = [Level("dense"), Level("topk=0.5", {"topk": "0.5"}), Level("fat=0.1", {"fat": "0.1"}),
              Level("teal=0.4", {"teal": "0.4"}), Level("ppl_p=1", {"ppl_p": "1"})]
    for level in levels:
        args = parse_model_args(level_model_args(base, level))
        passed = {k: v for k, v in args.items() if k.startswith("teal_")}
        to_teal = "teal" in level.args or ("ppl_p" in level.args and method == "teal")
        assert passed == (teal_settings if to_teal else {}), level.label
        # what the level hands to sparse-hf is a valid combination
        parse_sparsity_args({k: v for k, v in args.items() if k != "pretrained"})


def test_request_cache_is_per_level_and_per_model_args(tmp_path: Path):
    a = request_cache_path(tmp_path / "topk-0.5", "sparse-hf", "pretrained=m,topk=0.5")
    b = request_cache_path(tmp_path / "topk-0.3", "sparse-hf", "pretrained=m,topk=0.3")
    c = request_cache_path(tmp_path / "topk-0.5", "sparse-hf", "pretrained=other,topk=0.5")
    assert len({a, b, c}) == 3 and a.startswith(str(tmp_path / "topk-0.5"))


def test_request_cache_changes_with_the_local_files_the_arguments_name(tmp_path: Path):
    """New weights at the same path must not be answered from the old weights' cached requests."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"seed 0 weights")
    args = f"pretrained={model_dir},topk=0.5"
    before = request_cache_path(tmp_path / "lvl", "sparse-hf", args)
    assert request_cache_path(tmp_path / "lvl", "sparse-hf", args) == before
    (model_dir / "model.safetensors").write_bytes(b"seed 19 weights, longer")
    assert request_cache_path(tmp_path / "lvl", "sparse-hf", args) != before


def _fake_results(level_dir: Path, model_args: str, tasks: list[str], eval_kwargs: dict) -> Path:
    out = level_dir / "m" / f"results_{len(list(level_dir.rglob('results_*.json')))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": {t: {"acc,none": 0.5} for t in tasks},
                               "config": {"model_args": model_args,
                                          sweep.SETTINGS_KEY: sweep.measured_settings(eval_kwargs)}}))
    return out


@pytest.fixture
def evaluated(monkeypatch) -> SimpleNamespace:
    """model_args and include_path of every level the sweep evaluates; lm-eval replaced by a fake results file."""
    seen = SimpleNamespace(model_args=[], include_paths=[])

    def fake_evaluate(model, model_args, tasks, level_dir, include_path, eval_kwargs, use_cache):
        seen.model_args.append(model_args)
        seen.include_paths.append(include_path)
        return _fake_results(level_dir, model_args, tasks, eval_kwargs)

    monkeypatch.setattr(sweep, "evaluate_level", fake_evaluate)
    return seen


def test_finished_levels_are_skipped_and_changed_args_rerun(tmp_path: Path, evaluated):
    calls = evaluated.model_args
    lines: list[str] = []
    levels = parse_levels(["topk=0.5,0.3"])
    run_sweep("sparse-hf", "pretrained=m", levels, ["t"], tmp_path, log=lines.append)
    assert calls == ["pretrained=m", "pretrained=m,topk=0.5", "pretrained=m,topk=0.3"]
    assert [ln.split(":")[0] for ln in lines if "done in" in ln] == ["[1/3] dense", "[2/3] topk=0.5",
                                                                    "[3/3] topk=0.3"]
    outcomes = run_sweep("sparse-hf", "pretrained=m", levels, ["t"], tmp_path, log=lines.append)
    assert len(calls) == 3 and all(o.skipped for o in outcomes)
    assert "already done, skipped" in lines[-1]
    run_sweep("sparse-hf", "pretrained=m,dtype=float32", levels[:1], ["t"], tmp_path, log=lines.append)
    assert calls[-1] == "pretrained=m,dtype=float32"  # other model arguments: not the finished level
    run_sweep("sparse-hf", "pretrained=m", levels[:1], ["t", "u"], tmp_path, log=lines.append)
    assert len(calls) == 5  # a task missing from the results file: run again
    for kwargs in ({"limit": 4.0}, {"num_fewshot": 2}, {"limit": 4.0, "num_fewshot": 2}):
        run_sweep("sparse-hf", "pretrained=m", levels[:1], ["t"], tmp_path, eval_kwargs=kwargs, log=lines.append)
    assert len(calls) == 8  # another --limit or --num_fewshot measures something else: run again
    run_sweep("sparse-hf", "pretrained=m", levels[:1], ["t"], tmp_path, eval_kwargs={"limit": 4.0},
              log=lines.append)
    assert len(calls) == 8 and "already done, skipped" in lines[-1]


def test_include_path_naming_the_builtin_tasks_is_not_passed_twice(tmp_path: Path, evaluated):
    builtin = sweep.builtin_tasks_dir()
    run_sweep("sparse-hf", "pretrained=m", parse_levels([]), ["t"], tmp_path,
              include_path=[str(builtin / "."), str(tmp_path)], log=lambda line: None)
    assert evaluated.include_paths == [[str(builtin), str(tmp_path)]]


def test_real_sweep_on_a_tiny_model_resumes(tmp_path: Path, tiny_tokenizer_dir: Path, capsys):
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    argv = ["--model_args", f"pretrained={model_dir}", "--levels", "topk=0.5", "--tasks", "lmsparse_smoke_mc",
            "--output_path", str(tmp_path / "runs"), "--limit", "2", "--device", "cpu", "--batch_size", "4"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/2] dense: done in" in out and "[2/2] topk=0.5: done in" in out
    files = sorted((tmp_path / "runs").rglob("results_*.json"))
    assert [f.relative_to(tmp_path / "runs").parts[0] for f in files] == ["dense", "topk-0.5"]
    sparse = json.loads(files[1].read_text())
    assert sparse["config"]["sparsity"]["label"].startswith("topk")
    assert sparse["config"]["use_cache"].startswith(str(tmp_path / "runs" / "topk-0.5" / "lm_cache"))
    assert sparse["config"]["sparsity"]["ffn"] == pytest.approx(0.5, abs=0.02)
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 2


def test_sweep_cli_bad_levels_exit_2(capsys):
    assert sweep.main(["--levels", "topk=2", "--tasks", "t", "--output_path", "x"]) == 2
    assert "topk=" in capsys.readouterr().err
