"""TEAL: histogram thresholds, block-wise greedy allocation, cache, serving, ppl_p=P,method=teal.

Tiny random models and random word text; the real SmolLM2 only to check the shipped lookup.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, save_tiny_model
from lm_sparse.calibrate import teal as T
from lm_sparse.calibrate.teal_greedy import BlockRunner, effective_sparsity, greedy_block, step_sizes, \
    uniform_block_error
from lm_sparse.config import SparsityArgumentError, SparsityConfig
from lm_sparse.engine.engine import SparsityEngine

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Random word text over the tiny tokenizer's vocabulary (about 20k tokens)."""
    rng = random.Random(0)
    paragraphs = [" ".join(f"w{rng.randrange(125)}" for _ in range(200)) for _ in range(100)]
    path = tmp_path_factory.mktemp("teal_text") / "words.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def _windows(n: int = 16, seqlen: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _dense_group_inputs(model, sites, windows) -> dict[tuple[int, str], torch.Tensor]:
    """|x| of each (layer, group) input on `windows`, captured from the dense model."""
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for (layer, group), site in T.group_readers(sites).items():
        def hook(module, args, key=(layer, group)):
            out.setdefault(key, []).append(args[0].detach().abs().reshape(-1).double())
        handles.append(site.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_thresholds_hit_target_sparsity_for_each_matrix(name):
    model = make_tiny_model(name)
    engine = SparsityEngine(model)
    windows = _windows()
    settings = T.default_settings(model, True, greedy_tokens=128, greedy_steps=30, greedy_seqlen=64)
    _, tensors = T.calibrate_teal(model, engine.sites, windows, settings)
    lookup = T.TealLookup.from_tensors(tensors)
    inputs = _dense_group_inputs(model, engine.sites, windows)
    for mode, target in (("uniform", 0.1), ("uniform", 0.5), ("uniform", 0.8), ("greedy", 0.5)):
        levels = lookup.site_levels(engine.sites, target, mode)
        for site in engine.sites:
            t = lookup.thresholds(site.layer, site.group, levels[site.index])
            measured = float((inputs[(site.layer, site.group)] <= t).double().mean())
            assert abs(measured - levels[site.index]) <= 0.005, (mode, target, site.path, measured)
            if mode == "uniform":
                assert levels[site.index] == target
    # The rules served at a level carry each matrix's level (the kernel backend's dense-union estimate).
    rules, levels = lookup.rules(engine.sites, 0.5, "greedy")
    assert {i: r.expected_sparsity for i, r in rules.items()} == levels


def test_histogram_quantile_matches_exact_quantile():
    x = torch.randn(200_000, dtype=torch.float64) * torch.rand(200_000, dtype=torch.float64).pow(3) * 10
    x[:1000] = 0.0
    counts = torch.bincount(T.histogram_bins(x.abs().float()), minlength=T.NUM_BINS).double()
    for level in (0.01, 0.3, 0.5, 0.9, 0.999):  # above the 0.5% of exact zeros
        t = T.histogram_quantile(counts, float(x.abs().max()), level)
        assert abs(float((x.abs() <= t).double().mean()) - level) < 1e-3
    assert T.histogram_quantile(counts, 7.0, 0.0) == 0.0
    assert T.histogram_quantile(counts, 7.0, 1.0) == 7.0


def test_step_sizes_follow_real_gqa_shapes():
    model = make_tiny_model("llama")  # 4 query heads, 2 key/value heads: k and v are half of q
    sites = T.layer_sites(SparsityEngine(model).sites)[0]
    params = [s.num_params for s in sites]
    shapes = {s.name: tuple(s.module.weight.shape) for s in sites}
    assert shapes["k"][0] * 2 == shapes["q"][0] and params[1] * 2 == params[0]
    steps = dict(zip([s.name for s in sites], step_sizes(params, steps=90)))
    for s in sites:  # every move adds the same parameter-weighted sparsity: 0.9 / 90
        assert steps[s.name] * s.num_params / sum(params) == pytest.approx(0.01)
    assert steps["k"] == pytest.approx(2 * steps["q"])
    assert steps["gate"] == pytest.approx(steps["q"] * shapes["q"][0] * shapes["q"][1] /
                                          (shapes["gate"][0] * shapes["gate"][1]))


def _runner(model, layer_index: int, windows: torch.Tensor):
    engine = SparsityEngine(model)
    counts, amax = T.collect_histograms(model, engine.sites, windows)
    thresholds = T.GroupThresholds(counts, amax)
    captured = T.capture_block_inputs(model, windows[:4])
    sites = T.layer_sites(engine.sites)[layer_index]
    layer = T.decoder_layers(model)[layer_index]
    hidden, kwargs = captured[layer_index]
    runner = BlockRunner(layer, sites, hidden, kwargs,
                         lambda pos, level: thresholds(sites[pos].layer, sites[pos].group, level))
    return runner, sites, captured


@pytest.mark.parametrize("name", ["llama", "gemma2", "phi3"])
def test_memoized_block_equals_plain_block(name):
    model = make_tiny_model(name)
    runner, sites, captured = _runner(model, 0, _windows())
    rng = random.Random(1)
    with torch.no_grad(), runner.attached():
        dense = runner.run((0.0,) * len(sites))
        assert torch.allclose(dense, captured[1][0], atol=1e-5)  # the next layer's dense input
        state = [0.0] * len(sites)
        for _ in range(12):
            i = rng.randrange(len(sites))
            trial = list(state)
            trial[i] = min(1.0, trial[i] + rng.choice([0.1, 0.25]))
            assert torch.equal(runner.run(tuple(trial)), runner.run(tuple(trial), memo=False))
            if rng.random() < 0.5:
                state = trial
                runner.keep_only(tuple(state))


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_greedy_error_never_above_uniform(name):
    model = make_tiny_model(name)
    for layer_index in (0, 1):
        runner, sites, _ = _runner(model, layer_index, _windows())
        params = [s.num_params for s in sites]
        with torch.no_grad(), runner.attached():
            path = greedy_block(runner, params, steps=40)
            target = runner.run((0.0,) * len(sites), memo=False)
            for eff, err, levels in zip(path.effective.tolist(), path.error.tolist(), path.levels.tolist()):
                assert effective_sparsity(levels, params) == pytest.approx(eff)
                assert err <= uniform_block_error(runner, eff, target) + 1e-9, (layer_index, eff)
        assert path.effective[-1] >= 0.9 - 1e-9
        assert torch.all(path.effective[1:] > path.effective[:-1])


def _config(text_file: Path, level: float, **kw) -> SparsityConfig:
    return SparsityConfig(rule="teal", level=level, calib_data=str(text_file), calib_tokens=2048, calib_seqlen=64,
                          extra={"teal_greedy_steps": 30, "teal_greedy_tokens": 128}, **kw)


def _heldout_report(engine, rules, windows) -> dict:
    engine.set_rules(rules)
    with torch.no_grad(), engine.attached():
        engine.model(input_ids=windows, use_cache=False)
    engine.counter.synchronize()
    report = engine.report()
    engine.counter.reset()
    return report


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_build_rules_cache_and_heldout_sparsity(name, cache, text_file, tiny_tokenizer):
    model = make_tiny_model(name)
    engine = SparsityEngine(model, sparse_prefill="all")
    rules, info = T.build_teal_rules(engine, _config(text_file, 0.5), tiny_tokenizer, None)
    assert info["calibrated_now"] and info["sparse_prefill"] == "all" and Path(info["file"]).is_file()
    assert sorted(rules) == [s.index for s in engine.sites]  # every projection, fused ones included
    assert Path(info["file"]).name.startswith("teal-")
    payload = json.loads(Path(info["file"]).read_text())
    assert payload["fields"]["params"]["greedy_steps"] == 30 and payload["results"]["greedy"]["tokens"] == 128
    # held-out: other words, same distribution; parameter-weighted model-wide sparsity within 2 points
    report = _heldout_report(engine, rules, _windows(8, 64, seed=7))
    assert report["weights_skipped"] == pytest.approx(0.5, abs=0.02)
    # second build: loaded from the cache, same thresholds; uniform mode reuses the greedy file
    again, info2 = T.build_teal_rules(engine, _config(text_file, 0.5), tiny_tokenizer, None)
    assert not info2["calibrated_now"] and info2["file"] == info["file"]
    assert all(again[i].threshold == rules[i].threshold for i in rules)
    uniform, info3 = T.build_teal_rules(engine, _config(text_file, 0.4, teal_mode="uniform"), tiny_tokenizer, None)
    assert info3["file"] == info["file"] and set(sum(info3["levels"].values(), [])) == {0.4}
    report = _heldout_report(engine, uniform, _windows(8, 64, seed=7))
    assert report["weights_skipped"] == pytest.approx(0.4, abs=0.02)


def test_greedy_file_serves_uniform_mode_without_warning(cache, text_file, tiny_tokenizer, caplog):
    engine = SparsityEngine(make_tiny_model("llama"))
    _, info = T.build_teal_rules(engine, _config(text_file, 0.5), tiny_tokenizer, None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rules, info2 = T.build_teal_rules(engine, _config(text_file, 0.4, teal_mode="uniform", thresholds=info["file"]),
                                          tiny_tokenizer, None)
    assert info2["file"] == info["file"] and set(sum(info2["levels"].values(), [])) == {0.4}
    assert not [r for r in caplog.records if "other settings" in r.getMessage()]


def _count_calls(monkeypatch, module, name: str) -> dict:
    calls = {"n": 0}
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_uniform_only_calibration_stores_histograms(cache, text_file, tiny_tokenizer, monkeypatch):
    import lm_sparse.identity as identity

    model = make_tiny_model("llama")
    engine = SparsityEngine(model)
    hashes = _count_calls(monkeypatch, identity, "model_identity")
    _, info = T.build_teal_rules(engine, _config(text_file, 0.3, teal_mode="uniform"), tiny_tokenizer, None)
    assert info["calibrated_now"] and info["params"]["greedy"] is False
    assert hashes["n"] == 1  # the greedy probe and the uniform calibration share one hash of the weights
    with pytest.raises(SparsityArgumentError, match="no greedy lookup"):
        T.build_teal_rules(engine, _config(text_file, 0.3, thresholds=info["file"]), tiny_tokenizer, None)


def test_uniform_mode_under_data_parallelism_every_rank_meets_the_same_barriers(cache, text_file, tiny_tokenizer):
    """Rank 0 calibrates histograms, rank 1 waits once and loads them: the greedy-file lookup of uniform mode
    must not put a barrier on one rank only (rank 1 then left early and failed)."""
    from types import SimpleNamespace

    model = make_tiny_model("llama")
    sites = SparsityEngine(model).sites
    barriers = {0: 0, 1: 0}

    def rank(r: int) -> SimpleNamespace:
        class Accelerator:
            def wait_for_everyone(self) -> None:
                barriers[r] += 1
        return SimpleNamespace(pretrained=None, revision=None, world_size=2, rank=r, accelerator=Accelerator())

    kw = dict(calib_data=str(text_file), calib_tokens=1024, calib_seqlen=64, calib_seed=0, greedy=False)
    _, payload0, path0, ran0 = T.load_teal(model, sites, tiny_tokenizer, lm=rank(0), **kw)
    _, payload1, path1, ran1 = T.load_teal(model, sites, tiny_tokenizer, lm=rank(1), **kw)
    assert ran0 and not ran1 and path0 == path1 and payload0["key"] == payload1["key"]
    assert payload0["fields"]["params"]["greedy"] is False and barriers == {0: 1, 1: 1}


def test_token_counts_that_cut_the_same_windows_share_a_key():
    model = make_tiny_model("llama")
    assert T.default_settings(model, True, greedy_tokens=300, greedy_seqlen=128) == \
        T.default_settings(model, True, greedy_tokens=384, greedy_seqlen=128)


def test_ppl_p_with_method_teal_picks_largest_level_within_budget(cache, text_file, tiny_tokenizer, monkeypatch):
    model = make_tiny_model("llama")
    engine = SparsityEngine(model)
    # a random tiny model barely reacts to sparsity: a budget of 0.02% makes the search stop inside the grid
    config = _config(text_file, 0.02, method="teal")
    reads = _count_calls(monkeypatch, T, "load_texts")
    _, info = T.build_teal_rules(engine, config, tiny_tokenizer, None)
    assert reads["n"] == 1  # one read of the text keys the calibration and cuts the search's windows
    probes = info["ppl_search"][1:]
    level = info["level"]
    assert 0.0 < level < 0.9 and len(probes) <= 8
    budget = 1.0002
    assert [p["ppl_ratio"] for p in probes if p["level"] == level][0] <= budget
    above = [p for p in probes if p["level"] > level]
    assert above and min(above, key=lambda p: p["level"])["level"] == pytest.approx(level + 0.01)
    assert min(above, key=lambda p: p["level"])["ppl_ratio"] > budget


def test_teal_above_lookup_is_one_clear_error(cache, text_file, tiny_tokenizer):
    engine = SparsityEngine(make_tiny_model("llama"))
    with pytest.raises(SparsityArgumentError, match="teal=0.95"):
        T.build_teal_rules(engine, _config(text_file, 0.95), tiny_tokenizer, None)


def test_calibrate_cli_teal(cache, tmp_path, text_file, tiny_tokenizer_dir, capsys):
    from lm_sparse.calibrate.cli import main

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    out = tmp_path / "teal-tiny.json"
    argv = ["--model", str(model_dir), "--method", "teal", "--dtype", "float32", "--calib-data", str(text_file),
            "--calib-tokens", "1024", "--calib-seqlen", "64", "--out", str(out), "--teal-level", "0.5",
            "--teal-greedy-steps", "20", "--teal-greedy-tokens", "128"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "greedy lookup:  128 tokens, 20 steps" in printed and "teal=0.5 greedy: down" in printed
    from lm_sparse.thresholds import read_thresholds

    payload, tensors = read_thresholds(out)
    assert payload["method"] == "teal" and tensors["greedy_levels"].shape[0] == 2
    assert main(argv) == 0 and "(loaded)" in capsys.readouterr().out


def test_shipped_smollm2_lookup_serves_any_level(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shipped = sorted((REPO / "thresholds").glob("teal-smollm2*.json"))
    if not shipped:
        pytest.skip("thresholds/teal-smollm2-gsm8k.json not made yet: see thresholds/README.md (TEAL)")
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    engine = SparsityEngine(model)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))  # part of the model's identity
    lookup, payload, path, ran = T.load_teal(model, engine.sites, tokenizer, calib_data=None, calib_tokens=None,
                                             calib_seqlen=None, calib_seed=0, greedy=True,
                                             thresholds_path=str(shipped[0]))
    assert not ran and payload["fields"]["model"]["model_type"] == "llama"
    per_layer = T.layer_sites(engine.sites)
    params = [s.num_params for s in per_layer[0]]
    for target in (0.25, 0.5, 0.65):
        levels = lookup.site_levels(engine.sites, target, "greedy")
        for sites in per_layer:
            assert effective_sparsity([levels[s.index] for s in sites], params) == pytest.approx(target)
