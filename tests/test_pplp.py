"""PPL-p%: the exact threshold search against a float64 CETT, the outer search, the lm-eval path, errors."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_model, save_tiny_model
from lm_sparse.calibrate.cli import main as calibrate_main
from lm_sparse.calibrate.pplp import LayerThresholdSearch, calibrate_pplp, column_norms, dense_pass
from lm_sparse.config import parse_sparsity_args
from lm_sparse.engine.engine import SparsityEngine
from lm_sparse.engine.rules import Threshold

pytestmark = pytest.mark.usefixtures("one_thread")  # per test, not for the whole session from import time


def cett_reference(acts: torch.Tensor, weight: torch.Tensor, t: float) -> float:
    """CETT in float64, straight from the definition: mean ||W a_D|| / ||W a||, D = {|a_i| ||W_i|| <= t}.

    D uses the float32 scores the rule applies (n_i = |a_i| * ||W_i|| with float32 column norms).
    """
    a, w = acts.double(), weight.detach().double()
    scores = acts.abs() * column_norms(weight)
    dropped = torch.where(scores <= t, a, 0.0)
    num = (dropped @ w.T).norm(dim=-1)
    den = (a @ w.T).norm(dim=-1)
    keep = den > 0
    return float((num[keep] / den[keep]).mean())


def _responsive_tiny_model(name: str):
    """A tiny random model whose perplexity reacts to its FFN (weights x8: random init is near uniform)."""
    model = make_tiny_model(name)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in param_name:
                param.mul_(8.0)
    return model


def _tiny_acts(name: str = "llama", tokens: int = 48):
    model = make_tiny_model(name)
    engine = SparsityEngine(model)
    downs = engine.sites_in_groups("mlp_mid")
    ids = torch.randint(3, 128, (2, tokens), generator=torch.Generator().manual_seed(0))
    acts, _, _ = dense_pass(model, [s.module for s in downs], ids, torch.arange(ids.numel()), batch_size=2)
    return model, downs, acts


@pytest.mark.parametrize("name", ["llama", "llama_relu"])
def test_threshold_search_is_exact(name):
    _, downs, acts = _tiny_acts(name)
    weight = downs[1].module.weight
    search = LayerThresholdSearch(acts[1], weight)
    candidates = search.candidates
    for target in (0.02, 0.1, 0.3, 0.6):
        t, cett, k = search.solve(target)
        assert k >= 0 and t == float(candidates[k])
        assert cett_reference(acts[1], weight, t) <= target + 1e-6
        assert abs(cett_reference(acts[1], weight, t) - cett) < 1e-5
        assert cett_reference(acts[1], weight, float(candidates[k + 1])) > target - 1e-6  # next larger exceeds it
        assert search.cett(t) == pytest.approx(cett, abs=1e-6)  # sparse updates agree with a fresh matmul
    # far fewer CETT evaluations than candidates (memoised interpolation search)
    assert search.evaluations < 120 < candidates.numel()


def test_applied_bf16_mask_is_the_searched_one():
    """In bf16 the per-neuron rule |a_i| <= t / ||W_i|| drops what the search dropped (n_i <= t), up to a float32
    rounding of the division at the candidate itself; rounding t / ||W_i|| to nearest bf16 moved ~30 entries."""
    _, downs, acts = _tiny_acts("llama", tokens=256)
    weight = downs[1].module.weight
    a16 = acts[1].to(torch.bfloat16)
    search = LayerThresholdSearch(a16.float(), weight)
    scores = a16.float().abs() * column_norms(weight)
    for target in (0.02, 0.1, 0.3, 0.6):
        t, _, _ = search.solve(target)
        applied = Threshold(search.neuron_thresholds(t))(a16) == 0
        assert int((applied != (scores <= t)).sum()) <= 2


def test_no_candidate_qualifies_means_zero_not_wraparound():
    _, downs, acts = _tiny_acts("llama")
    search = LayerThresholdSearch(acts[0], downs[0].module.weight)
    t, cett, k = search.solve(0.0)
    assert (t, cett, k) == (0.0, 0.0, -1)
    thresholds = search.neuron_thresholds(t)
    assert torch.all(thresholds == 0)


def test_relu_natural_zeros_are_dropped_and_counted():
    _, downs, acts = _tiny_acts("llama_relu")
    search = LayerThresholdSearch(acts[0], downs[0].module.weight)
    natural = float((acts[0] == 0).float().mean())
    assert natural > 0.2
    t, _, _ = search.solve(0.05)
    dropped = float((search.scores <= t).float().mean())
    assert dropped >= natural


@pytest.mark.parametrize("name,p", [("llama", 5.0), ("llama_relu", 5.0)])
def test_calibration_meets_ppl_target(name, p):
    model = _responsive_tiny_model(name)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(3, 128, (4, 32), generator=gen)
    held = torch.randint(3, 128, (2, 32), generator=gen)
    results, tensors = calibrate_pplp(model, calib, held, p, cett_tokens=96, batch_size=4)
    target, tol = 1 + p / 100, 0.1 * p / 100
    assert results["converged"] and abs(results["calib_ppl_ratio"] - target) <= tol
    assert results["iterations"] <= 8 and results["heldout_ppl_ratio"] > 0
    # the stored per-neuron vectors reproduce the ratio through the engine
    engine = SparsityEngine(model)
    from lm_sparse.calibrate.pplp import rules_from_tensors
    from lm_sparse.calibrate.ppl import windows_nll

    dense, n = windows_nll(model, calib)
    engine.set_rules(rules_from_tensors(engine, tensors))
    with engine.attached():
        sparse, _ = windows_nll(model, calib)
    assert math.exp((sparse - dense) / n) == pytest.approx(results["calib_ppl_ratio"], rel=1e-6)
    assert len(results["activation_ratio"]) == 2 and all(0 < r <= 1 for r in results["activation_ratio"])


def test_cli_rejects_bad_ppl_p(capsys):
    assert calibrate_main(["--model", "x", "--ppl-p", "0", "--out", "/tmp/never.json"]) == 2
    assert "invalid --ppl-p 0" in capsys.readouterr().err  # the flag, not the model_args name
    assert calibrate_main(["--model", "x", "--out", "/tmp/never.json"]) == 2


def test_calibrate_errors_name_the_command_line_flags():
    from lm_sparse.calibrate.cli import command_line_wording

    assert command_line_wording("sparse-hf: cannot load calib_data (default hf:x): offline; pass a local "
                                ".txt/.jsonl file with calib_data=PATH") == (
        "lm-sparse calibrate: cannot load calib_data (default hf:x): offline; pass a local .txt/.jsonl file with "
        "--calib-data PATH")


def test_sparse_hf_calibrates_once_then_loads_cache(tmp_path, monkeypatch, tiny_tokenizer_dir):
    from lm_sparse.lm import SparseHFLM

    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path / "cache"))
    # weights that react, saved with the pad/eos ids and the tokenizer every tiny model gets
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "model", model=_responsive_tiny_model("llama"))
    data = tmp_path / "calib.txt"
    gen = torch.Generator().manual_seed(2)
    data.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 125, (60,), generator=gen))
                                for _ in range(20)))
    args = dict(pretrained=str(model_dir), ppl_p=5, calib_data=str(data), calib_tokens=256, calib_seqlen=32,
                device="cpu", batch_size=1)
    first = SparseHFLM(**args)
    info = first.calibration
    assert info["calibrated_now"] and info["method"] == "pplp" and info["file"].startswith(str(tmp_path / "cache"))
    assert abs(info["calib_ppl_ratio"] - 1.05) <= 0.005 and info["heldout_ppl_ratio"] is not None
    second = SparseHFLM(**args)
    assert not second.calibration["calibrated_now"] and second.calibration["key"] == info["key"]
    assert second.engine.rules and all(r.threshold is not None for r in second.engine.rules.values())
    # thresholds=FILE loads without calibrating; the report carries the identity
    third = SparseHFLM(pretrained=str(model_dir), ppl_p=5, thresholds=info["file"], device="cpu", batch_size=1)
    assert third.calibration["file"] == info["file"] and not third.calibration["calibrated_now"]
    assert third.sparsity_report()["calibration"]["key"] == info["key"]


def test_smollm2_end_to_end_few_tokens(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_sparse.calibrate.data import calibration_batches

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = ("The quick brown fox jumps over the lazy dog. A farmer has 12 cows and buys 7 more; how many cows "
            "does he have now? He has 19 cows. ") * 40
    calib, held = calibration_batches(tok, [text], num_tokens=256, seqlen=128, seed=0, heldout_tokens=128)
    results, tensors = calibrate_pplp(model, calib, held, 5.0, cett_tokens=128, batch_size=2)
    assert abs(results["calib_ppl_ratio"] - 1.05) <= 0.005 and len(tensors) == 30
    assert 0 < results["mean_activation_ratio"] < 1


@pytest.mark.parametrize("k, a, p", [(0.05, 8, 1), (1, 8, 10), (300, 8, 5), (0.3, 8, 5), (0.02, 12, 1)])
def test_outer_search_converges_on_steep_ratio_curves(k, a, p):
    """The CETT search on ratio(c) = 1 + k c^a: the secant's slope bound once made steep curves overshoot to
    and fro without converging in MAX_ITERATIONS."""
    from lm_sparse.calibrate.pplp import FIRST_CETT_GUESS, MAX_ITERATIONS, REL_TOLERANCE, _next_target

    goal, target = math.log1p(p / 100), 1 + p / 100
    points, c = [], FIRST_CETT_GUESS
    for _ in range(MAX_ITERATIONS):
        ratio = 1 + k * c ** a
        if abs(ratio - target) <= REL_TOLERANCE * p / 100:
            break
        points.append((c, math.log(ratio)))
        c = _next_target(points, goal)
    else:
        pytest.fail(f"no convergence in {MAX_ITERATIONS} iterations: {points}")


def test_an_unconverged_search_is_said_on_every_load(tmp_path, monkeypatch, caplog, tiny_tokenizer):
    import logging

    from lm_sparse.calibrate import pplp

    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(60)) for i in range(20)))
    model = make_tiny_model("llama")

    def unconverged(model, calib, heldout, ppl_p, **kw):
        layers = len(SparsityEngine(model).sites_in_groups("mlp_mid"))
        return ({"ppl_p": ppl_p, "cett": 0.3, "calib_ppl_ratio": 1.002, "converged": False, "iterations": 8,
                 "activation_ratio": [0.5] * layers},
                {f"layer{i}.down": torch.zeros(model.config.intermediate_size) for i in range(layers)})

    monkeypatch.setattr(pplp, "calibrate_pplp", unconverged)
    config = parse_sparsity_args({"ppl_p": 5, "calib_data": str(data), "calib_tokens": 256, "calib_seqlen": 32})
    with caplog.at_level(logging.WARNING, logger="lm_sparse.calibrate.pplp"):
        for _ in range(2):  # calibrated, then loaded from the cache
            pplp.build_pplp_rules(SparsityEngine(model), config, tiny_tokenizer)
    said = [r.getMessage() for r in caplog.records if "did not reach ppl_p=5" in r.getMessage()]
    assert len(said) == 2 and "ratio is 1.0020, not 1.0500" in said[0]


def test_offloaded_search_matches():
    _, downs, acts = _tiny_acts("llama")
    weight = downs[0].module.weight
    plain, offloaded = LayerThresholdSearch(acts[0], weight), LayerThresholdSearch(acts[0], weight, offload=True)
    for target in (0.05, 0.2):
        assert plain.solve(target) == offloaded.solve(target)


@pytest.mark.parametrize("p", [1, 5, 10])
def test_shipped_smollm2_files_are_found_by_key(smollm2_dir, tmp_path, monkeypatch, p):
    """The demo's arguments (excerpt as calib_data, calib_tokens=4096, CPU) load a shipped file, no calibration."""
    from pathlib import Path
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_sparse.calibrate.data import shipped_excerpt_path
    from lm_sparse.calibrate.pplp import build_pplp_rules

    shipped = Path(__file__).resolve().parent.parent / "thresholds" / f"smollm2-135m-instruct-pplp-p{p}.json"
    if not shipped.is_file():
        pytest.skip(f"{shipped.name} not shipped")
    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    copy = tmp_path / "my_excerpt.jsonl"  # same content at another path hits the same key
    copy.write_bytes(shipped_excerpt_path().read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)  # part of the key, as in a real run
    config = parse_sparsity_args({"ppl_p": p, "calib_data": str(copy), "calib_tokens": 4096})
    lm = SimpleNamespace(pretrained=str(smollm2_dir), revision=None, world_size=1, rank=0)
    engine = SparsityEngine(model)
    rules, info = build_pplp_rules(engine, config, tokenizer=tokenizer, lm=lm)
    assert not info["calibrated_now"] and Path(info["file"]) == shipped
    assert len(rules) == 30 and 0.99 < info["heldout_ppl_ratio"] < 1 + 2 * p / 100


def test_demo_says_whether_the_shipped_files_match_on_its_device(capsys):
    """The shipped keys hold CPU's CETT token count: the demo does not promise a cache hit on CUDA."""
    from lm_sparse.demo import choose_levels

    for device, says in (("cpu", "match it"), ("cuda", "on cuda it calibrates once")):
        levels = choose_levels("ppl_p=1", None, device)
        assert levels[-1].args["calib_tokens"] == 4096
        assert says in capsys.readouterr().out
