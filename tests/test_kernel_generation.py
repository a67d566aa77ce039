"""Generation with the sparse kernels gives the masked-dense path's tokens; the static-cache loop gives generate's.

Runs on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA), where the decode
backend accepts CPU tensors, on tiny random models. sparse-hf's generate_until with the kernels, through
lm-eval, is in test_sparse_hf_kernel_generation.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE, make_tiny_model

from lm_sparse.engine.engine import SparsityEngine
from lm_sparse.engine.rules import Threshold, TopK
from lm_sparse.kernels import backend
from lm_sparse.kernels.backend import attach_decode_kernels
from lm_sparse.kernels.decode import generate_static
from transformers import StaticCache

pytestmark = pytest.mark.usefixtures("kernels_run_on_cpu", "one_thread")


def _prompts(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (3..127) with row r left-padded by 2r pad tokens (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    for r in range(batch):
        ids[r, : 2 * r] = 0
    return ids.to(DEVICE), (ids != 0).long().to(DEVICE)


def _model(name: str = "llama"):
    model = make_tiny_model(name).to(DEVICE)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_static_matches_generate(batch):
    model = _model()
    ids, mask = _prompts(batch, 7)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = generate_static(model, ids, None, max_new_tokens=10, stopping_criteria=None, pad_token_id=0,
                          eos_token_id=None)
    assert torch.equal(got, expected)


def test_generate_static_reuses_its_cache_across_calls(monkeypatch):
    """Consecutive calls (other prompts, lengths, batch sizes) reset and reuse the caches correctly.

    One cache per (batch, length bucket), kept across a switch: a CUDA graph holds its cache's addresses.
    """
    from lm_sparse.kernels import decode

    made = []
    monkeypatch.setattr(decode, "StaticCache", lambda **kw: made.append(kw) or StaticCache(**kw))
    monkeypatch.setattr(decode, "MAX_CACHES", 2)
    model = _model()
    for batch, length, new in ((3, 7, 9), (3, 9, 4), (1, 5, 6), (3, 7, 9), (2, 5, 6), (1, 5, 6)):
        ids, mask = _prompts(batch, length, seed=length)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert torch.equal(generate_static(model, ids, None, new, None, 0, None), expected)
    # batch 3 made once and reused after batch 1; batch 2 evicted the least recently used (batch 1)
    assert len(made) == 4

def test_kept_static_caches_hold_at_most_twice_the_largest_ones_memory(monkeypatch):
    """lm-eval hands generate_until its requests longest first: the length buckets shrink as a run goes on, and
    keeping every bucket's cache of a large batch would hold several times the KV memory planned for."""
    from lm_sparse.kernels import decode

    monkeypatch.setattr(decode, "CACHE_BUCKET", 8)
    model = _model()
    kept = []
    for batch, length in ((4, 30), (4, 22), (4, 14), (1, 14), (4, 6)):
        ids, _ = _prompts(batch, length)
        generate_static(model, ids, None, 2, None, 0, None)
        kept.append(sorted((b, n) for b, n, _ in decode._STATE[model]["caches"]))
    assert kept == [[(4, 32)], [(4, 24), (4, 32)], [(4, 16), (4, 24)], [(1, 16), (4, 16), (4, 24)],
                    [(1, 16), (4, 8), (4, 16)]]


def test_generate_static_passes_the_cache_under_the_models_name_for_it():
    """transformers 5.17 (and 4.x) take `past_key_values`, later 5.x `cache`: a wrong name would be swallowed by
    **kwargs and every step would decode without its history."""
    from lm_sparse.kernels.decode import cache_argument

    model = _model()
    seen = []

    class OlderSignature(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config, self.generation_config = model, model.config, model.generation_config

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, **kwargs):
            seen.append(sorted(kwargs))
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, logits_to_keep=logits_to_keep,
                              **{cache_argument(self.inner): past_key_values})

    ids, mask = _prompts(2, 7)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert cache_argument(OlderSignature()) == "past_key_values"
    assert torch.equal(generate_static(OlderSignature(), ids, None, 5, None, 0, None), expected)
    assert seen and not any(seen)  # nothing landed in **kwargs


def test_generate_static_stops_and_pads_like_generate():
    """A row that hits EOS early is padded afterwards; the loop ends when every row is done."""
    model = _model()
    ids, mask = _prompts(3, 7)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[0, 9])  # a token row 0 generates early, so it stops there
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                              eos_token_id=eos)
    got = generate_static(model, ids, mask, 10, None, 0, eos)
    assert torch.equal(got, expected)
    assert int(got[0, 9]) == eos and (got[0, 10:] == 0).all()  # row 0 stopped at EOS, then padding


def _threshold_rules(engine: SparsityEngine, model, ids, mask, sparsity: float) -> dict:
    """TEAL-like: a scalar threshold per site at the `sparsity` quantile of its prefill inputs; per-channel for down."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [s.module.register_forward_pre_hook(
        lambda m, a, i=s.index: inputs.__setitem__(i, a[0].detach().abs().float().flatten())) for s in engine.sites]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    rules = {}
    for s in engine.sites:
        q = float(torch.quantile(inputs[s.index].cpu(), sparsity))
        if s.name == "down":
            scale = torch.linspace(0.5, 1.5, s.in_features, device=DEVICE)
            rules[s.index] = Threshold(q * scale)
        else:
            rules[s.index] = Threshold(q)
    return rules


@pytest.mark.parametrize("variant", ["unrolled", "gathered", "fused-reduce"])
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_decode_with_kernels_matches_masked_dense(batch, variant, monkeypatch):
    """Batch 1 (GEMV path) through generate_static, batch 3 (left-padded, dot path) through generate; with the
    kernel the CPU tests run by default (the GPU's unrolled form on small tiles), and with the gathered form or
    the fused reduce (what a LM_SPARSE_GEMV_CONFIGS file may choose on a GPU)."""
    from lm_sparse.kernels import sparse_gemv

    variants = {"gathered": sparse_gemv.LaunchConfig(32, 16, 2, steps=2, gather=True),
                "fused-reduce": sparse_gemv.LaunchConfig(32, 16, 0, steps=1, fused_reduce=True)}
    if variant in variants:
        monkeypatch.setattr(sparse_gemv, "choose_config", lambda *a: variants[variant])
    model = _model()
    ids, mask = _prompts(batch, 8)
    engine = SparsityEngine(model, pad_token_id=0)
    engine.set_rules(_threshold_rules(engine, model, ids, mask, 0.5))

    def generate() -> torch.Tensor:
        if batch == 1:
            return generate_static(model, ids, mask, 6, None, 0, None, compile=False)  # counted: Python side effects
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)

    with engine.attached():
        dense_tokens = generate()

    launches = {"n": 0}
    run = backend._run

    def counted_run(*args):
        launches["n"] += 1
        return run(*args)

    monkeypatch.setattr(backend, "_run", counted_run)
    attached = attach_decode_kernels(engine, required=True)
    assert sorted(attached) == [s.index for s in engine.sites]  # every site has a threshold rule
    qkv = [s.module.weight for s in engine.sites_named("q", "k", "v") if s.layer == 0]
    assert len({w.untyped_storage().data_ptr() for w in qkv}) == 1  # views of one fused storage
    calls = {"n": 0}
    for index, fn in list(engine.decode_executors.items()):
        def counted(x, fn=fn):
            calls["n"] += 1
            return fn(x)
        engine.decode_executors[index] = counted
    with engine.attached():
        kernel_tokens = generate()
    assert calls["n"] == 5 * len(engine.sites)  # 5 decode steps after the prefill, every site
    # q/k/v and gate/up read one x with one threshold (same quantile): 4 launches per layer, not 7
    assert launches["n"] == 5 * 4 * len(model.model.layers)
    assert torch.equal(kernel_tokens, dense_tokens)
    engine.counter.synchronize()
    report = engine.report()
    assert report["execution"]["down"] == {"prefill": "masked_dense", "decode": "sparse_kernel"}
    assert 0.3 < report["phases"]["decode"]["sparsity"] < 0.7


def test_executor_with_counts_returns_the_engines_zero_count():
    from lm_sparse.kernels.backend import make_decode_executor, make_input_major

    model = _model()
    down = model.model.layers[0].mlp.down_proj
    make_input_major(down)
    x = torch.randn(3, 1, down.in_features, device=DEVICE)
    rule = Threshold(0.5)
    y, zeros = make_decode_executor(down, 0.5, with_counts=True)(x)
    torch.testing.assert_close(y, down(rule(x)))
    assert torch.equal(zeros, (rule(x) == 0).sum(-1))


def test_executor_masks_an_input_of_another_dtype_as_the_rule_does():
    """x in float32 at a bfloat16 site: masked in float32 first (0.04995 <= 0.05 is dropped, though it rounds
    to 0.050049 in bfloat16), then multiplied in bfloat16."""
    from lm_sparse.kernels.backend import make_decode_executor, make_input_major

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 24, bias=False).to(DEVICE, torch.bfloat16)  # on a GPU, compiled kernels need CUDA
    make_input_major(lin)
    x = torch.randn(2, 1, 48) * 0.05
    x[..., :4] = torch.tensor([0.04995, -0.04995, 0.05001, 0.05])
    x = x.to(DEVICE)
    rule = Threshold(0.05)
    y, zeros = make_decode_executor(lin, 0.05, with_counts=True)(x)
    expected = torch.nn.functional.linear(rule(x).to(torch.bfloat16), lin.weight)
    torch.testing.assert_close(y.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(zeros, (rule(x) == 0).sum(-1))


def test_static_caches_stay_where_a_compiled_step_holds_them(monkeypatch):
    """torch < 2.10 guards static-address tensors by identity: freeing the caches would free nothing and
    recompile the step at every generate_until, so they are kept there."""
    from lm_sparse.kernels import decode

    model = _model()
    ids, _ = _prompts(1, 5, seed=1)
    generate_static(model, ids, None, 3, None, 0, None)
    decode._STATE[model]["compiled"] = object()  # as after a compiled run
    monkeypatch.setattr(decode, "_static_addresses_unguarded", lambda: False)
    decode.release_static_caches(model)
    assert decode._STATE[model]["caches"]
    monkeypatch.setattr(decode, "_static_addresses_unguarded", lambda: True)
    decode.release_static_caches(model)
    assert "caches" not in decode._STATE[model]
    assert decode._static_addresses_unguarded() == (tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10))
    decode._STATE.pop(model)


def test_topk_sites_stay_masked_dense():
    model = _model()
    engine = SparsityEngine(model, pad_token_id=0)
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    assert attach_decode_kernels(engine, required=False) == []
    from lm_sparse.config import SparsityArgumentError

    with pytest.raises(SparsityArgumentError, match="sparse_kernels=on: no site has a threshold rule"):
        attach_decode_kernels(engine, required=True)
    assert engine.report()["execution"]["down"]["decode"] == "masked_dense"


def test_prefill_masks_only_where_the_kernel_takes_the_dtype():
    """float64 weights: no fused mask kernel (it compares in float32), the rule masks in float64."""
    from lm_sparse.kernels.backend import attach_prefill_masks

    engine = SparsityEngine(make_tiny_model("llama").double())
    engine.set_rules({s.index: Threshold(0.01) for s in engine.sites_in_groups("mlp_mid")})
    assert attach_prefill_masks(engine, allow_interpreter=True) == []


def _generate_and_report(engine: SparsityEngine, generate: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Fresh counts, `generate()` with the engine attached; return (tokens, sparsity report)."""
    engine.reset()
    with engine.attached():
        out = generate()
    engine.counter.synchronize()
    return out, engine.report()


def test_prefill_masks_and_dense_fallback_are_reported_and_exact():
    """The fused prefill mask gives the masked-dense tokens and counts; >8 decode rows report dense_fallback."""
    from lm_sparse.kernels.backend import attach_prefill_masks

    model = _model()
    ids, mask = _prompts(10, 6)
    engine = SparsityEngine(model, pad_token_id=0)
    engine.set_rules(_threshold_rules(engine, model, ids, mask, 0.5))

    def run() -> tuple[torch.Tensor, dict]:
        return _generate_and_report(engine, lambda: model.generate(ids, attention_mask=mask, max_new_tokens=3,
                                                                   do_sample=False, pad_token_id=0))

    dense_tokens, dense_report = run()
    assert attach_prefill_masks(engine) == sorted(engine.rules)
    attach_decode_kernels(engine, required=True)
    tokens, report = run()
    assert torch.equal(tokens, dense_tokens)
    for phase in ("prefill", "decode"):
        assert report["phases"][phase] == dense_report["phases"][phase]
    layers = list(range(len(model.model.layers)))
    assert report["execution"]["down"] == {"prefill": "masked_dense_fused", "decode": "dense_fallback",
                                           "decode_dense_layers": layers}
    with engine.attached():  # 2 rows: the kernel itself
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert engine.report()["execution"]["down"]["decode"] == "sparse_kernel+dense_fallback"


def test_sparse_rows_limit_follows_the_estimated_union_sparsity():
    """B rows of per-row sparsity s: union sparsity s**B; the kernel serves B while it stays >= 5%."""
    from lm_sparse.kernels.backend import MIN_UNION_SPARSITY, sparse_rows_limit

    assert MIN_UNION_SPARSITY == 0.05
    assert sparse_rows_limit(None) == 8  # nothing calibrated (FAT): the kernel's own limit
    assert [sparse_rows_limit(s) for s in (0.0, 0.04, 0.05, 0.3, 0.5, 0.7, 0.9, 1.0)] == [0, 0, 1, 2, 4, 8, 8, 8]
    for s in (0.1, 0.25, 0.5, 0.6, 0.69):
        b = sparse_rows_limit(s)
        assert s ** b >= MIN_UNION_SPARSITY > s ** (b + 1)


def test_nearly_dense_union_dispatches_to_dense_per_site():
    """Layer 0's down at 30% sparsity serves 2 rows sparse; 4 rows run dense there, sparse elsewhere; same tokens."""
    model = _model()
    ids, mask = _prompts(4, 6)
    engine = SparsityEngine(model, pad_token_id=0)
    downs = engine.sites_named("down")
    engine.set_rules({s.index: Threshold(0.01, expected_sparsity=0.3 if s.layer == 0 else 0.9) for s in downs})

    def run(rows: int) -> tuple[torch.Tensor, dict]:
        return _generate_and_report(engine, lambda: model.generate(ids[:rows], attention_mask=mask[:rows],
                                                                   max_new_tokens=3, do_sample=False, pad_token_id=0))

    dense_tokens, dense_report = run(4)
    launches: list[tuple[int, int]] = []
    run_op = backend._run

    def recorded(x, wt, t, bias, with_counts, max_rows):
        launches.append((x.reshape(-1, x.shape[-1]).shape[0], max_rows))
        return run_op(x, wt, t, bias, with_counts, max_rows)

    backend._run = recorded
    try:
        attach_decode_kernels(engine, required=True)
        assert {engine.executor_max_rows[s.index] for s in downs} == {2, 8}
        tokens, report = run(4)
        assert torch.equal(tokens, dense_tokens)
        assert report["phases"] == dense_report["phases"]
        assert report["execution"]["down"] == {"prefill": "masked_dense", "decode": "sparse_kernel+dense_fallback",
                                               "decode_dense_layers": [0]}
        assert sorted(set(launches)) == [(4, 2), (4, 8)]  # every decode step, both layers, their own limits
        _, report = run(2)
        assert report["execution"]["down"] == {"prefill": "masked_dense", "decode": "sparse_kernel"}
    finally:
        backend._run = run_op


def test_calibrated_rules_carry_their_expected_sparsity():
    """TEAL's rules carry their matrix's level, PPL-p%'s 1 - the layer's activation ratio (the dispatch inputs)."""
    from lm_sparse.calibrate.pplp import rules_from_tensors

    model = _model()
    engine = SparsityEngine(model)
    downs = engine.sites_in_groups("mlp_mid")
    tensors = {f"layer{s.layer}.down": torch.full((s.in_features,), 0.1) for s in downs}
    ratios = [0.7, float("nan")][: len(downs)]
    rules = rules_from_tensors(engine, tensors, ratios)
    assert [rules[s.index].expected_sparsity for s in downs] == [pytest.approx(0.3), None][: len(downs)]
    assert all(r.expected_sparsity is None for r in rules_from_tensors(engine, tensors).values())


@pytest.mark.parametrize("backend_name,fullgraph", [("eager", True), ("inductor", False)])
def test_compiled_decode_step_traces_engine_and_kernels_in_one_graph(monkeypatch, backend_name, fullgraph):
    """generate_static's compiled step runs the engine hooks and kernel ops in one graph: same tokens, same counts.

    On CPU the step compiles without CUDA graphs (they need CUDA): with the eager backend and fullgraph (the
    trace and recompilations are the ones the CUDA build sees), and with inductor under the production
    options, where a graph break would not raise: the test counts breaks (a host sync in the engine's hook
    once split the step and recompiled it at every position). Inductor lowers the custom ops and the
    engine's in-place counter updates; about 35 s on a 2-core CPU.
    """
    import torch._dynamo.utils
    import shutil

    import torch._dynamo.testing

    if backend_name == "inductor" and DEVICE == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor on CPU needs a C++ compiler")

    from lm_sparse.kernels import decode

    model = _model()
    ids, mask = _prompts(2, 8)
    engine = SparsityEngine(model, pad_token_id=0)
    engine.set_rules(_threshold_rules(engine, model, ids, mask, 0.5))

    def run(compile: bool) -> tuple[torch.Tensor, dict]:
        return _generate_and_report(engine,
                                    lambda: generate_static(model, ids, mask, 6, None, 0, None, compile=compile))

    eager_tokens, eager_report = run(False)
    attach_decode_kernels(engine, required=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend_name)
    monkeypatch.setattr(decode, "COMPILE_OPTIONS", {"backend": counter, "fullgraph": fullgraph, "dynamic": False})
    decode.forget_compiled_step(model)
    torch._dynamo.utils.counters.clear()
    tokens, report = run(True)
    assert torch.equal(tokens, eager_tokens)
    assert report["phases"] == eager_report["phases"]
    assert report["execution"]["down"]["decode"] == "sparse_kernel"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert counter.frame_count == 1, f"decode step compiled {counter.frame_count} times"
    compiled_frames = counter.frame_count
    tokens, _ = run(True)  # a second call reuses the compiled step
    assert torch.equal(tokens, eager_tokens) and counter.frame_count == compiled_frames
    assert engine.decode_rows_seen() == [2]  # the compiled step records its rows for the report
    # Another prompt length in the same cache-length bucket: the same compiled step.
    ids, mask = _prompts(2, 11, seed=5)
    with engine.attached():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(generate_static(model, ids, mask, 6, None, 0, None, compile=True), expected)
    assert counter.frame_count == compiled_frames


def test_kernels_reattached_at_another_level_reuse_the_compiled_step(monkeypatch):
    """bench_decode times several levels with one compiled step: kernels re-attached at new thresholds pass the
    step's guards (the thresholds and the re-stored weights are graph inputs), and each level's decode computes
    with its own thresholds: the eager tokens and counts of that level, which differ between the levels."""
    import torch._dynamo.testing

    from lm_sparse.kernels import decode

    model = _model()
    ids, mask = _prompts(1, 8)
    engine = SparsityEngine(model, pad_token_id=0)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    monkeypatch.setattr(decode, "COMPILE_OPTIONS", {"backend": counter, "fullgraph": True, "dynamic": False})
    decode.forget_compiled_step(model)
    reports = []
    for level in (0.3, 0.7):
        engine.set_rules(_threshold_rules(engine, model, ids, mask, level))
        engine.decode_executors.clear()
        eager_tokens, eager_report = _generate_and_report(
            engine, lambda: generate_static(model, ids, mask, 6, None, 0, None, compile=False))
        attach_decode_kernels(engine, required=True)
        tokens, report = _generate_and_report(
            engine, lambda: generate_static(model, ids, mask, 6, None, 0, None, compile=True))
        assert torch.equal(tokens, eager_tokens) and report["phases"] == eager_report["phases"]
        assert report["execution"]["q"]["decode"] == "sparse_kernel"
        assert counter.frame_count == 1, f"level {level}: decode step compiled {counter.frame_count} times"
        reports.append(report["phases"]["decode"]["sparsity"])
    assert reports[1] > reports[0] + 0.2  # the second level's thresholds were the ones applied


def test_compiled_step_reads_the_finished_rows_in_its_one_graph(monkeypatch):
    """sparse-hf's engine has no pad id: its stop criteria mark the rows that are done, and the compiled step reads
    that mask (a graph input, not a recompilation) to leave their padded steps out of the counts."""
    import torch._dynamo.testing
    from transformers import StoppingCriteria, StoppingCriteriaList

    from lm_sparse.kernels import decode

    model = _model()
    ids, mask = _prompts(2, 8)
    engine = SparsityEngine(model)
    engine.set_rules(_threshold_rules(engine, model, ids, mask, 0.5))
    stop_token = int(generate_static(model, ids, mask, 6, None, 0, None)[0, 9])  # row 0's second new token

    class StopRow(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            done = input_ids[:, -1] == stop_token
            engine.mark_finished(done)
            return done

    def run(compile: bool) -> tuple[torch.Tensor, dict]:
        criteria = StoppingCriteriaList([StopRow()])
        try:
            return _generate_and_report(engine, lambda: generate_static(model, ids, mask, 6, criteria, 0, None,
                                                                        compile=compile))
        finally:
            engine.clear_finished()

    attach_decode_kernels(engine, required=True)
    eager_tokens, eager_report = run(False)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    monkeypatch.setattr(decode, "COMPILE_OPTIONS", {"backend": counter, "fullgraph": True, "dynamic": False})
    decode.forget_compiled_step(model)
    tokens, report = run(True)
    assert torch.equal(tokens, eager_tokens) and report["phases"] == eager_report["phases"]
    assert report["phases"]["decode"]["tokens"] < 2 * 5  # row 0's steps after its stop are not counted
    assert counter.frame_count == 1


def test_attaching_kernels_keeps_one_copy_of_every_weight():
    """Input-major storage replaces the weights (fused q/k/v and gate/up included): no old copy stays alive."""
    import gc
    import weakref

    model = _model()
    ids, mask = _prompts(1, 8)
    engine = SparsityEngine(model, pad_token_id=0)
    engine.set_rules(_threshold_rules(engine, model, ids, mask, 0.5))

    def stored_bytes() -> int:
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
        return sum(storages.values())

    dense_bytes = stored_bytes()
    old = [weakref.ref(s.module.weight) for s in engine.sites]
    attach_decode_kernels(engine, required=True)
    gc.collect()
    assert all(ref() is None for ref in old)  # the engine, the executors and the model hold only the new views
    assert stored_bytes() <= 1.05 * dense_bytes
    assert stored_bytes() == dense_bytes  # the fused layout is a re-arrangement, not a copy


def test_compiled_step_keeps_compiling_past_dynamos_default_limit(monkeypatch):
    """Ten batch sizes are ten compiled variants (dynamo alone stops at 8 and runs the rest eagerly)."""
    import torch._dynamo.testing

    from lm_sparse.kernels import decode

    model = _model()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    monkeypatch.setattr(decode, "COMPILE_OPTIONS", {"backend": counter, "fullgraph": True, "dynamic": False})
    decode.forget_compiled_step(model)
    for batch in range(1, 11):
        ids, mask = _prompts(batch, 4 + 2 * batch)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert torch.equal(generate_static(model, ids, mask, 2, None, 0, None, compile=True), expected)
    assert counter.frame_count == 10
