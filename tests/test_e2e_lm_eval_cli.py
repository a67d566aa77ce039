"""The literal `lm_eval --model sparse-hf ...` command on the real SmolLM2-135M-Instruct, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_sparse.testing import ACC, write_json_task

ITEMS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a dog have?", ["two", "four", "six", "eight"], 1),
    ("Which animal says moo?", ["cat", "dog", "cow", "bird"], 2),
    ("What is two plus two?", ["three", "five", "six", "four"], 3),
    ("What do bees make?", ["honey", "milk", "bread", "glass"], 0),
    ("Which season is the coldest?", ["summer", "spring", "winter", "autumn"], 2),
]


def write_task(root: Path) -> Path:
    rows = [{"question": q, "choices": c, "label": a} for q, c, a in ITEMS]
    return write_json_task(root, "e2e_mc", rows, output_type="multiple_choice",
                           doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="{{choices}}",
                           doc_to_target="label", metric_list=ACC)


def test_lm_eval_cli_topk_reports_measured_sparsity(tmp_path, smollm2_dir):
    tasks = write_task(tmp_path / "tasks")
    out_dir = tmp_path / "out"
    lm_eval_bin = Path(sys.executable).parent / "lm_eval"
    cmd = [str(lm_eval_bin), "--model", "sparse-hf", "--model_args", f"pretrained={smollm2_dir},topk=0.5",
           "--tasks", "e2e_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(out_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    assert "|e2e_mc" in stdout and "acc" in stdout  # lm-eval's own table
    assert stdout.index("|e2e_mc") < stdout.index("sparse-hf: topk=0.5")  # our summary comes after it
    assert "weights skipped (parameter-weighted" in stdout
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    sparsity = results["config"]["sparsity"]
    assert abs(sparsity["ffn"] - 0.5) <= 0.01
    assert sparsity["method"] == "topk" and sparsity["params"]["level"] == 0.5
    assert len(sparsity["per_layer"]["down"]) == 30
    assert sparsity["phases"]["prefill"]["tokens"] > 0 and sparsity["phases"]["decode"]["tokens"] == 0
    assert sparsity["execution"]["down"] == {"prefill": "masked_dense", "decode": "masked_dense"}


def test_lm_sparse_eval_matches_lm_eval_arguments(tmp_path, smollm2_dir):
    tasks = write_task(tmp_path / "tasks")
    lm_sparse_bin = Path(sys.executable).parent / "lm-sparse"
    cmd = [str(lm_sparse_bin), "eval", "--model", "sparse-hf", "--model_args", f"pretrained={smollm2_dir},fat=0.05",
           "--tasks", "e2e_mc", "--include_path", str(tasks), "--device", "cpu", "--limit", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sparse-hf: fat=0.05" in proc.stdout


@pytest.mark.parametrize("argv,prints", [
    (["/venv/bin/lm_eval", "--model", "sparse-hf"], True), (["/venv/bin/lm-sparse", "eval"], True),
    (["/venv/bin/lm-sparse", "sweep"], False), (["/venv/bin/lm-sparse", "demo"], False), (["pytest"], False)])
def test_summary_printed_by_single_evaluations_only(monkeypatch, argv, prints):
    """sweep and demo print their own tables; an exit-time summary would repeat the last level after them."""
    from lm_sparse import lm

    monkeypatch.setattr(sys, "argv", argv)
    assert lm._prints_summary() is prints
