"""The GPU benchmark scripts run end to end in their CPU `--smoke` mode (interpreted kernels, tiny shapes).

They time nothing here: the point is that a session with a GPU, whose device minutes are few, does not find
a script broken. Each writes its JSON; the checks read its structure, not its numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, cwd: Path, own_cache: bool = True) -> subprocess.CompletedProcess:
    """Run a benchmark script; `own_cache=False` shares the suite's cache (the converted SmolLM2)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if own_cache:
        env["LM_SPARSE_CACHE"] = str(cwd / "cache")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_gemv_smoke_with_sweep_writes_the_configs_choose_config_takes_on_a_gpu(tmp_path, monkeypatch):
    """The sweep's rows are checked against the float64 reference; `--write-configs F` writes the winners, and
    with LM_SPARSE_GEMV_CONFIGS=F `choose_config` returns them for the listed shapes on CUDA (the interpreter
    keeps its own small tiles), its own rule elsewhere; a file of another format is one clear error naming the
    variable."""
    from lm_sparse.kernels import sparse_gemv as sg

    out, configs = tmp_path / "gemv.json", tmp_path / "configs.json"
    _run("bench_gemv.py", "--smoke", "--sweep", "--out", str(out), "--write-configs", str(configs), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert "interpreter" in result["meta"]["device"]
    rows = result["rows"]
    assert {r["batch"] for r in rows} >= {1, 2} and {r["sparsity"] for r in rows} >= {0.0, 0.5, 0.9}
    # every timed configuration's output was checked against the float64 reference
    assert all(0 < r["rel_error"] <= result["meta"]["tolerance"] for r in rows)

    entries = json.loads(configs.read_text())["configs"]
    assert {(e["batch"], e["in"], e["out"]) for e in entries} == {(1, 96, 80), (2, 96, 80), (1, 80, 112), (2, 80, 112)}
    table = sg.load_config_table(str(configs))
    monkeypatch.setenv(sg.CONFIGS_ENV, str(configs))
    monkeypatch.setattr(sg, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    assert sg.choose_config(1, 96, 80, cuda) == table[(1, 96, 80)]
    # shapes it does not list: the rule (the H200 sweep's batch-1 winners: 8 steps at K = 4096, 16 at K = 14336)
    assert sg.choose_config(1, 4096, 4096, cuda) == sg.LaunchConfig(64, 32, 0, num_warps=4, steps=8)
    assert sg.choose_config(1, 14336, 4096, cuda) == sg.LaunchConfig(64, 32, 0, num_warps=4, steps=16)
    monkeypatch.setattr(sg, "interpreting", lambda: True)
    assert sg.choose_config(1, 96, 80, cuda) == sg.LaunchConfig(32, 16, 0, steps=2)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ValueError, match=f"^{sg.CONFIGS_ENV}=.*bad.json: not a launch-configuration file"):
        sg.load_config_table(str(bad))


def test_kernel_resources_reads_registers_from_the_sm90_cubin(tmp_path, monkeypatch):
    """kernel_resources.py compiles a candidate and the packing launch for sm_90 (no GPU) and reads their
    registers back; occupancy follows the H100's per-SM limits."""
    monkeypatch.syspath_prepend(str(BENCH))
    import kernel_resources

    assert kernel_resources.programs_per_sm(32, 4) == 16  # threads bound: 2048 / 128
    assert kernel_resources.programs_per_sm(153, 4) == 3  # 160 registers a thread (whole 256-register units a warp)
    assert kernel_resources.programs_per_sm(255, 8) == 1
    out = tmp_path / "resources.json"
    _run("kernel_resources.py", "--batches", "1", "--limit", "1", "--out", str(out), cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["unrolled", "pack (K = 14336)"]
    assert all(16 <= r["registers"] <= 255 and 1 <= r["programs_per_sm"] <= 16 for r in rows)


def test_a_sweep_candidate_with_a_wrong_result_never_wins(tmp_path, monkeypatch):
    """The fastest candidate whose output fails the float64 check is not timed, not written as a tuned
    configuration, and makes the script exit 1 (timing and checking stubbed: no kernel runs)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_gemv

    wrong, right = bench_gemv.LaunchConfig(16, 16, 0, steps=1), bench_gemv.LaunchConfig(16, 16, 0, steps=2)
    monkeypatch.setattr(bench_gemv, "sweep_configs", lambda *a: [wrong, right])
    monkeypatch.setattr(bench_gemv, "relative_error", lambda wt, b, s, c: float("nan") if c == wrong else 1e-3)
    monkeypatch.setattr(bench_gemv, "kernel_seconds", lambda wts, sets, c, d: 1e-6 if c == wrong else 5e-6)
    configs = tmp_path / "configs.json"
    status = bench_gemv.main(["--smoke", "--sweep", "--out", str(tmp_path / "gemv.json"),
                              "--write-configs", str(configs)])
    assert status == 1
    entries = json.loads(configs.read_text())["configs"]
    assert entries and all(e["config"] != dataclasses.asdict(wrong) for e in entries)
    assert all(e["rejected"] == [dataclasses.asdict(wrong)] for e in entries)


def test_sweep_grids_time_the_unrolled_and_gathered_kernels_and_the_full_grid_adds_the_other_variants(monkeypatch):
    """`--sweep-grid small` (the lease's sweep) is the unrolled kernel over tiles and steps plus the gathered form
    with programs sized for each sweep sparsity, some of both with the fused reduce; the full grid adds the
    runtime walk and the compacted variant over the same tiles."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_gemv

    small1 = bench_gemv.sweep_configs(1, False, "small", k=4096)
    assert len(small1) == len(set(small1)) == 63 and all(c.steps and not c.compact_chunk for c in small1)
    unrolled = [c for c in small1 if not c.gather and not c.fused_reduce]
    assert len(unrolled) == 38 and {c.steps for c in unrolled} == {1, 2, 4, 8, 16}
    assert {c.block_k for c in unrolled if c.steps == 1} == {128, 256}  # the tall single-load programs
    assert sum(c.gather for c in small1) == 16 and sum(c.fused_reduce for c in small1) == 13
    # batch 1 at s = 0.5 and 0.9 keeps 2048 and 410 of 4096 inputs: one 4 x 32-input slice per program
    assert {c.split_k for c in small1 if c.gather and c.steps == 4 and c.block_k == 32} == {16, 4}
    small4 = bench_gemv.sweep_configs(4, False, "small", k=4096)
    assert len(small4) == 41 and {c.steps for c in small4 if not c.gather} == {1, 2, 4, 8}
    # four rows' union: 1 - 0.5**4 and 1 - 0.9**4 of the inputs
    assert {c.split_k for c in small4 if c.gather and c.steps == 4 and c.block_k == 64} == {15, 6}
    full1 = bench_gemv.sweep_configs(1, False)
    assert set(small1) < set(full1) and any(c.compact_chunk for c in full1)
    assert any(not c.steps and not c.compact_chunk for c in full1)


def test_compiled_teal_decode_step_counts_sparsity_without_a_launch_per_site(tmp_path):
    """decode_graph_census.py on two layers, counting the launches in inductor's CUDA code for a (fake) H100:
    the TEAL step runs q/k/v and gate/up as one fused op each (4 lm_sparse ops a layer), and the engine's
    counting costs at most 2 launches a layer plus the commit's few a step. (When the kernels returned their
    zero counts, stacking those opaque outputs cost one copy launch per site: 7 a layer, 0.7-0.9 ms a token on
    the H200.)"""
    out = tmp_path / "census.json"
    _run("decode_graph_census.py", "--layers", "2", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["meta"]["target"] == "cuda"
    rows = {r["setup"]: r for r in result["rows"]}
    dense = rows["dense, engine attached"]
    teal, paused = rows["TEAL 0.5 + kernels, engine counting"], rows["TEAL 0.5 + kernels, counting paused"]
    assert teal["lm_sparse ops"] == paused["lm_sparse ops"] == 8 and dense["lm_sparse ops"] == 0
    assert dense["library calls"] >= 2 * 7  # q, k, v, o, gate, up, down a layer (and the LM head)
    assert teal["gpu_launches"] - paused["gpu_launches"] <= 2 * 2 + 10


def test_bench_decode_smoke(tmp_path):
    out = tmp_path / "decode.json"
    _run("bench_decode.py", "--smoke", "--levels", "0.3,0.6", "--repeats", "1", "--profile-steps", "2",
         "--out", str(out), cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    # --profile-steps: the dense row and the first sparse level carry where the time went, the others not
    assert [bool(r.get("profile")) for r in rows] == [True, True, False]
    assert all(p["calls"] > 0 and p["us"] > 0 for p in rows[1]["profile"])
    assert [(r["mode"], r["level"]) for r in rows] == [("dense", 0.0), ("teal", 0.3), ("teal", 0.6)]
    assert all(r["tokens_per_s"] > 0 and r["first_run_s"] > 0 for r in rows)
    # each level decodes with its own thresholds (the prompt's quantiles: near the level on a random model)
    assert rows[0]["decode_sparsity"] is None and all(abs(r["decode_sparsity"] - r["level"]) < 0.1 for r in rows[1:])
    assert rows[1]["decode_paths"] == rows[2]["decode_paths"] == ["sparse_kernel"]
    assert json.loads(out.read_text())["meta"]["cudagraph_skips"] == 0
    assert rows[2]["fused_qkv"] is True  # one threshold per input: q/k/v run one fused launch, as under sparse-hf


def test_bench_prefill_mask_smoke(tmp_path):
    out = tmp_path / "prefill.json"
    _run("bench_prefill_mask.py", "--smoke", "--repeats", "1", "--out", str(out), cwd=tmp_path)
    assert json.loads(out.read_text())["rows"]


def test_lm_eval_kernel_check_smoke(tmp_path):
    proc = _run("lm_eval_kernel_check.py", "--out", str(tmp_path / "check"), "--smoke", "--docs", "3",
                "--max-gen-toks", "6", "--results-copy", str(tmp_path / "out" / "results.json"), cwd=tmp_path)
    assert "decode tokens" in proc.stdout
    assert "lmsparse_kernel_gen" in proc.stdout  # lm-eval's own table, streamed through
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["sparsity"]["phases"]["decode"]


@pytest.fixture
def kernel_check():
    sys.path.insert(0, str(BENCH))
    try:
        import lm_eval_kernel_check

        yield lm_eval_kernel_check
    finally:
        sys.path.remove(str(BENCH))


def test_kernel_check_expects_dense_exactly_where_the_level_leaves_nothing_to_skip(kernel_check):
    """On a GPU the check passes iff batch-1 steps ran the kernel wherever the TEAL level is >= 5%."""
    fused = "masked_dense_fused"
    report = {"calibration": {"levels": {"q": [0.0, 0.6], "down": [0.7, 0.8]}},
              "execution": {"q": {"prefill": fused, "decode": "sparse_kernel+dense_fallback",
                                  "decode_dense_layers": [0]},
                            "down": {"prefill": fused, "decode": "sparse_kernel"}}}
    assert kernel_check.execution_mismatches(report) == {}
    report["execution"]["down"]["decode"] = "dense_fallback"
    assert set(kernel_check.execution_mismatches(report)) == {"down"}
    report["execution"]["down"] = {"prefill": "masked_dense", "decode": "sparse_kernel"}
    assert set(kernel_check.execution_mismatches(report)) == {"down"}


def test_bench_union_smoke(tmp_path):
    """The union measurement on SmolLM2 with the shipped PPL-1% thresholds (the repo's GSM8K excerpt as text)."""
    out = tmp_path / "union.json"
    from lm_sparse.calibrate.data import shipped_excerpt_path

    _run("bench_union.py", "--data", str(shipped_excerpt_path()), "--sequences", "4",
         "--seqlen", "16", "--rows", "1,2", "--methods", "ppl_p=1", "--out", str(out), cwd=tmp_path, own_cache=False)
    per_b = json.loads(out.read_text())["results"]["ppl_p=1"]
    one, two = per_b["1"], per_b["2"]
    assert one["union_sparsity"] == pytest.approx(one["row_sparsity"])  # one row: the union is the row
    assert 0 <= two["union_sparsity"] <= one["union_sparsity"] and two["sites"] == 30


@pytest.mark.parametrize("plan, first, skipped", [("lease", "env", 6), ("lease-tune", "gemv-b1", 4)])
def test_gpu_suite_lease_stops_at_its_deadline_with_one_log(tmp_path, plan, first, skipped):
    """`gpu_suite.sh lease` (the one device call of a 15-minute lease): a step still running at the shared
    deadline is stopped with its child processes (lm-eval runs in one), the later steps are skipped, the
    script exits 124, and $OUT holds one log (the device tool brings back at most 8 files)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    child_pid = tmp_path / "child.pid"
    # a python3 whose every run outlasts the lease (but `-m pip`, which installs carried wheels, if any)
    (fake_bin / "python3").write_text(f'#!/bin/bash\n[ "$1 $2" = "-m pip" ] && exit 0\n'
                                      f"sleep 300 &\necho $! > {child_pid}\nwait\n")
    (fake_bin / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(out), "LEASE_SECONDS": "21"}
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), plan], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["lease.log"]
    log = (out / "lease.log").read_text()
    assert f"== {first} (limit: 21 s)" in log and f"== {first}: exit 124" in log
    assert log.count("skipped, the lease's time is spent") == skipped
    assert _stopped(int(child_pid.read_text()))  # the step's child was stopped too


def _stopped(pid: int) -> bool:
    """The process is gone, or a zombie waiting for its reaper (the container's init may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_gpu_suite_refuses_unknown_steps_before_running_any(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "env", "gemv-leas"], cwd=tmp_path,
                          env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown step 'gemv-leas'" in proc.stderr
    assert not list((tmp_path / "out").iterdir())


def test_decode_bound_against_a_direct_computation(tmp_path, monkeypatch):
    """decode_bound.py on hand-made lease files: the rest of the step, the ideal and the kernel-predicted
    speedups, and the bandwidth the target needs, each computed here from the same numbers."""
    monkeypatch.syspath_prepend(str(BENCH))
    import decode_bound as db

    dense = {db.QKV: 20.0, db.O: 10.0, db.UP: 30.0, db.DOWN: 40.0, db.GATE_UP: 60.0}
    sparse = {db.QKV: {0.0: 20.0, 1.0: 10.0}, db.O: {0.0: 10.0, 1.0: 6.0}, db.GATE_UP: {0.0: 60.0, 1.0: 20.0},
              db.DOWN: {0.0: 40.0, 1.0: 20.0}, db.UP: {0.0: 30.0, 1.0: 10.0}}
    dims = {db.QKV: (4096, 6144), db.O: (4096, 4096), db.GATE_UP: (4096, 28672), db.DOWN: (14336, 4096),
            db.UP: (4096, 14336)}
    gemv = {"meta": {"device": "test", "dtype": "bf16", "copy_bandwidth_gb_per_s": 4000.0},
            "rows": [{"shape": name, "in": dims[name][0], "out": dims[name][1], "batch": 1, "sparsity": s,
                      "dense_us": dense[name], "sparse_us": t}
                     for name, times in sparse.items() for s, t in times.items()]}
    decode = {"rows": [{"mode": "dense", "level": 0.0, "tokens_per_s": 100.0},
                       {"mode": "teal", "level": 0.5, "tokens_per_s": 110.0, "decode_sparsity": 0.5}]}
    (tmp_path / "g.json").write_text(json.dumps(gemv))
    (tmp_path / "d.json").write_text(json.dumps(decode))
    b = db.bound(gemv, decode)

    step = 10.0  # ms a token at 100 tokens/s
    low = 32 * (20 + 10 + 2 * 30 + 40) / 1e3  # q/k/v as the fused launch
    high = 32 * (3 * 10 + 10 + 2 * 30 + 40) / 1e3  # k and v as long as q
    assert b["rest_ms"] == pytest.approx((step - high, step - low))
    weights = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    ideal = 0.5 * 32 * weights * 2 / 4000e9 * 1e3
    kernels = 32 * (15 + 8 + 40 + 30) / 1e3  # halfway between each shape's two points
    (level,) = b["levels"]
    assert level["ideal_sparse_linears_ms"] == pytest.approx(ideal)
    assert level["kernels_ms"] == pytest.approx(kernels)
    assert level["ideal_speedup"] == pytest.approx((step / (step - low + ideal), step / (step - high + ideal)))
    assert level["predicted_speedup"] == pytest.approx((step / (step - low + kernels),
                                                        step / (step - high + kernels)))
    assert level["measured_speedup"] == pytest.approx(1.1)
    sparse_step = 1e3 / 110
    assert level["excess_ms"] == pytest.approx((sparse_step - (step - low) - kernels,
                                                sparse_step - (step - high) - kernels))
    budget = step / 1.8 - (step - high)
    assert b["target"]["needed_gb_per_s"][0] == pytest.approx(0.5 * 32 * weights * 2 / (budget / 1e3) / 1e9)
    assert db.interpolate({0.0: 1.0, 1.0: 3.0}, 2.0) == 3.0 and db.interpolate({0.0: 1.0, 1.0: 3.0}, -1) == 1.0

    out = tmp_path / "bound.json"
    proc = _run("decode_bound.py", "--gemv", str(tmp_path / "g.json"), "--decode", str(tmp_path / "d.json"),
                "--out", str(out), cwd=tmp_path)
    assert "| 0.5 | 0.500 | 1.10x |" in proc.stdout
    assert json.loads(out.read_text())["dense_step_ms"] == pytest.approx(step)
    _run("decode_bound.py", cwd=tmp_path)  # the shipped H200 lease files
