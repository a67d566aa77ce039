"""Exact accounting: real tokens only, prefill vs decode, paused forwards, sparse_prefill policies.

Expected counts come from the inputs and outputs themselves (attention masks, generated ids, zeros of the
down_proj input recorded by a hook written here), never from the engine.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from conftest import TINY_CONFIGS, dense_and_attached_logits, down_proj_pre_hooks, make_tiny_model
from lm_sparse.engine import CountOnly, SparsityCounter, SparsityEngine, TopK
from lm_sparse.testing import ACC, EXACT_MATCH, write_json_task

torch.set_num_threads(1)

WIDTH = TINY_CONFIGS["llama"]["intermediate_size"]
LAYERS = TINY_CONFIGS["llama"]["num_hidden_layers"]


def _record_down_inputs(model: nn.Module, store: list[torch.Tensor]):
    """Record what each down_proj actually receives (after the engine's hook, which runs first)."""
    return down_proj_pre_hooks(model, lambda m, a: store.append(a[0].detach()))


def _left_padded(lengths: list[int], pad: int = 0, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


# -- SparsityCounter on its own --------------------------------------------------------------------------
def test_counter_commit_with_validity_mask():
    c = SparsityCounter([4, 8])
    zeros = {0: torch.tensor([[1, 2, 3]]), 1: torch.tensor([[5, 6, 7]])}
    c.commit(0, zeros, torch.tensor([[False, True, True]]))
    c.commit(1, {1: torch.tensor([[4]])}, None)
    z, e, t = c.totals()
    assert t.tolist() == [0, 0]  # nothing synchronized yet
    c.synchronize()
    z, e, t = c.totals()
    assert z.tolist() == [[5, 13], [0, 4]]
    assert e.tolist() == [[2 * 4, 2 * 8], [0, 1 * 8]]
    assert t.tolist() == [2, 1]


def test_counter_deferred_rows_count_their_first_length_positions():
    c = SparsityCounter([4])
    zeros = torch.arange(12).view(3, 4)  # rows of 4 positions
    c.defer(0, {0: zeros})
    c.commit_row(2)  # 0 + 1
    c.commit_row(4)  # 4 + 5 + 6 + 7
    c.commit_row(1)  # 8
    c.commit_row(3)  # no pending rows left: ignored
    c.synchronize()
    z, e, t = c.totals()
    assert z.tolist() == [[1 + 22 + 8], [0]]
    assert t.tolist() == [7, 0]
    assert e.tolist() == [[7 * 4], [0]]


def test_counter_unclaimed_rows_are_flushed_in_full():
    c = SparsityCounter([4])
    c.defer(0, {0: torch.ones(2, 3, dtype=torch.long)})
    c.commit_row(1)
    c.defer(0, {0: torch.full((1, 2), 2)})  # a new forward flushes the unclaimed row: 3 positions
    c.synchronize()  # flushes the second forward's row too: 2 positions
    z, _, t = c.totals()
    assert t.tolist() == [1 + 3 + 2, 0]
    assert z.tolist() == [[1 + 3 + 4], [0]]
    c.reset()
    assert [x.sum().item() for x in c.totals()] == [0, 0, 0]


# -- padding ------------------------------------------------------------------------------------------
def test_left_padded_batch_counts_only_real_tokens():
    model = make_tiny_model("llama_relu")
    ids, mask = _left_padded([6, 2, 4])
    engine = SparsityEngine(model, pad_token_id=0)
    engine.count_natural_zeros()
    store: list[torch.Tensor] = []
    with torch.no_grad(), engine.attached(), _record_down_inputs(model, store):
        model(input_ids=ids, attention_mask=mask)
    engine.counter.synchronize()
    real = mask.bool()
    expected = sum(int((h == 0).sum(-1)[real].sum()) for h in store)
    report = engine.report()
    assert report["tokens"] == report["phases"]["prefill"]["tokens"] == 12
    assert report["zeros"] == expected > 0
    assert report["entries"] == 12 * WIDTH * LAYERS


def test_deferred_rows_count_only_their_length():
    model = make_tiny_model("llama_relu")
    lengths = [5, 2, 3]
    ids, _ = _left_padded(lengths)
    ids = torch.stack([row.roll(-(ids.shape[1] - n)) for row, n in zip(ids, lengths)])  # right-padded
    engine = SparsityEngine(model)
    engine.count_natural_zeros()
    store: list[torch.Tensor] = []
    with torch.no_grad(), engine.attached(), engine.deferring(), _record_down_inputs(model, store):
        model(ids)
    for n in lengths:
        engine.counter.commit_row(n)
    engine.counter.synchronize()
    expected = sum(int((h[row, :n] == 0).sum()) for h in store for row, n in enumerate(lengths))
    report = engine.report()
    assert report["tokens"] == sum(lengths)
    assert report["zeros"] == expected > 0


def test_paused_counts_nothing_but_still_sparsifies():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 5))
    engine = SparsityEngine(model)
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    with torch.no_grad(), engine.attached():
        counted = model(ids).logits
        with engine.paused():
            paused = model(ids).logits
    engine.counter.synchronize()
    assert engine.report()["tokens"] == ids.numel()
    torch.testing.assert_close(paused, counted, rtol=0, atol=0)
    with torch.no_grad(), engine.paused(), engine.attached():
        model(ids)
    engine.counter.synchronize()
    assert engine.report()["tokens"] == ids.numel()


# -- prefill vs decode ------------------------------------------------------------------------------------
def _generate(model, engine, ids, mask, eos: int | None, pad: int, new_tokens: int = 6) -> torch.Tensor:
    with torch.no_grad(), engine.attached():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True)


def test_generate_splits_prefill_and_decode_and_skips_finished_rows():
    model = make_tiny_model("llama")
    prompt_pad = 0
    ids, mask = _left_padded([5, 3, 4], pad=prompt_pad)
    probe = SparsityEngine(model)
    probe.set_rules({s.index: TopK(0.5, s.in_features) for s in probe.sites_named("down")})
    first = _generate(model, probe, ids, mask, eos=None, pad=prompt_pad)[:, ids.shape[1]:]
    # Row 0's second generated token becomes EOS: row 0 finishes early and is then fed the pad id,
    # a token no row generates on its own.
    eos = int(first[0, 1])
    pad = next(t for t in range(3, 128) if t not in first.tolist()[0] + first.tolist()[1] + first.tolist()[2])
    engine = SparsityEngine(model, pad_token_id=pad)
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    gen = _generate(model, engine, ids, mask, eos=eos, pad=pad)[:, ids.shape[1]:]
    engine.counter.synchronize()
    # Decode step j feeds generated token j-1 (the last generated token is never fed back).
    fed = gen[:, :-1]
    assert (fed == pad).any(), "the test needs a finished row"
    expected_decode = int((fed != pad).sum())
    report = engine.report()
    assert report["phases"]["prefill"]["tokens"] == int(mask.sum()) == 12
    assert report["phases"]["decode"]["tokens"] == expected_decode
    assert expected_decode < fed.numel()
    assert report["phases"]["prefill"]["ffn"] == report["phases"]["decode"]["ffn"] == 0.5
    assert report["zeros"] == 32 * LAYERS * (12 + expected_decode)


# -- sparse_prefill policies ----------------------------------------------------------------------------
def test_sparse_prefill_none_leaves_prompts_dense_and_sparsifies_decode():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 6))
    engine = SparsityEngine(model, sparse_prefill="none")
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    dense, prefill = dense_and_attached_logits(model, engine, ids)
    torch.testing.assert_close(prefill, dense, rtol=0, atol=0)
    _generate(model, engine, ids, torch.ones_like(ids), eos=None, pad=0, new_tokens=4)
    engine.counter.synchronize()
    phases = engine.report()["phases"]
    assert phases["prefill"]["tokens"] == 12 and phases["prefill"]["ffn"] == 0.0  # SiLU: no natural zeros
    assert phases["decode"]["tokens"] == 3 and phases["decode"]["ffn"] == 0.5


def test_sparse_prefill_last_half_sparsifies_only_the_second_half():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 7))
    half = 7 - 7 // 2  # the last 3 positions (4..6) are sparsified, as TEAL's x[:, -(7 // 2):]
    engine = SparsityEngine(model, sparse_prefill="last_half")
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    store: list[torch.Tensor] = []
    with torch.no_grad():
        dense = model(ids).logits
        with engine.attached(), _record_down_inputs(model, store):
            mixed = model(ids).logits
    engine.counter.synchronize()
    # Causal attention: the first half never sees the sparsified positions.
    torch.testing.assert_close(mixed[:, :half], dense[:, :half], rtol=0, atol=0)
    assert not torch.allclose(mixed[:, half:], dense[:, half:])
    for h in store:
        assert ((h[:, half:] == 0).sum(-1) == 32).all()
        assert ((h[:, :half] == 0).sum(-1) == 0).all()
    report = engine.report()
    assert report["zeros"] == 32 * LAYERS * 2 * (7 - half)
    assert report["ffn"] == (7 - half) * 32 / (7 * WIDTH)


def test_last_half_cuts_each_row_at_half_its_real_length():
    """Left-padded (attention mask) and right-padded (lengths from the LM) rows: each row's own second half."""
    model = make_tiny_model("llama")
    lengths = [6, 2, 5]
    ids, mask = _left_padded(lengths)
    engine = SparsityEngine(model, sparse_prefill="last_half")
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    store: list[torch.Tensor] = []
    with torch.no_grad(), engine.attached(), _record_down_inputs(model, store):
        model(input_ids=ids, attention_mask=mask)
    width = ids.shape[1]
    for row, n in enumerate(lengths):  # real tokens at width-n .. width-1; the last n//2 of them sparse
        cut = width - n // 2
        for h in store:
            assert ((h[row, cut:] == 0).sum(-1) == 32).all() and ((h[row, :cut] == 0).sum(-1) == 0).all()
    right = torch.stack([r.roll(-(width - n)) for r, n in zip(ids, lengths)])
    store.clear()
    engine.set_row_lengths(lengths)
    with torch.no_grad(), engine.attached(), engine.deferring(), _record_down_inputs(model, store):
        model(right)
    for row, n in enumerate(lengths):
        for h in store:
            cut = n - n // 2
            assert ((h[row, cut:n] == 0).sum(-1) == 32).all() and ((h[row, :cut] == 0).sum(-1) == 0).all()


def test_count_only_rule_changes_nothing():
    model = make_tiny_model("qwen3")
    ids = torch.randint(3, 128, (2, 5))
    engine = SparsityEngine(model)
    engine.set_rules({s.index: CountOnly() for s in engine.sites})
    dense, counted = dense_and_attached_logits(model, engine, ids)
    torch.testing.assert_close(counted, dense, rtol=0, atol=0)
    engine.counter.synchronize()
    assert engine.report()["tokens"] == 10


@pytest.mark.parametrize("policy", ["all", "none", "last_half"])
def test_decode_executor_runs_in_decode_and_counts(policy):
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 4))
    calls: list[int] = []
    engine = SparsityEngine(model, sparse_prefill=policy)
    rules = {s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")}
    engine.set_rules(rules)
    for s in engine.sites_named("down"):
        def executor(x, module=s.module, rule=rules[s.index]):
            calls.append(x.shape[-2])
            y = rule(x)  # executors return (output, zero entries per token)
            return nn.functional.linear(y, module.weight), (y == 0).sum(dim=-1)
        engine.set_decode_executor(s.index, executor)
    _generate(model, engine, ids, torch.ones_like(ids), eos=None, pad=0, new_tokens=3)
    engine.counter.synchronize()
    report = engine.report()
    assert calls == [1] * (2 * LAYERS)  # two decode steps, one call per layer, one token each
    assert report["phases"]["decode"] == {"tokens": 2, "sparsity": 0.5, "ffn": 0.5, "attn": None}
    assert report["execution"]["down"]["decode"] == "sparse_kernel"
    engine.set_prefill_masker(engine.sites_named("down")[0].index, lambda x: (x, (x == 0).sum(-1)))
    # a masker covers a prefill only under sparse_prefill=all; under none nothing is masked
    expected = {"all": "masked_dense_fused", "last_half": "masked_dense", "none": "unmasked"}[policy]
    assert engine.report()["execution"]["down"]["prefill"] == expected


def test_stop_sequences_finish_rows_one_by_one(tiny_tokenizer):
    """With lm-eval's stop criteria a finished row kept generating (and counting decode tokens) until every
    row was done; answered per row it is padded from its stop on, and the answers cut at the stop are equal."""
    from lm_eval.models.utils_hf import stop_sequences_criteria

    from lm_sparse.lm import per_row_stop_criteria

    model = make_tiny_model("llama")
    ids, mask = _left_padded([5, 3, 4], seed=11)
    prompt = ids.shape[1]
    engine = SparsityEngine(model, pad_token_id=0)
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    with torch.no_grad(), engine.attached():
        free = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    free = free[:, prompt:].tolist()
    # a word that some row generates at step 1 or 2 and another row never does
    stop_id = next(t for row in free for t in row[1:3] if any(t not in other for other in free) and t != row[0])
    stop = [tiny_tokenizer.decode([stop_id])]
    runs = {}
    for build in (stop_sequences_criteria, per_row_stop_criteria):
        engine.reset()
        with torch.no_grad(), engine.attached():
            # generate pads finished rows only where an EOS id is known (as for any real model)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 eos_token_id=1, stopping_criteria=build(tiny_tokenizer, stop, prompt, ids.shape[0]))
        engine.counter.synchronize()
        texts = [tiny_tokenizer.decode(row[prompt:], skip_special_tokens=True).split(stop[0])[0] for row in out]
        fed = int((out[:, prompt:-1] != 0).sum())  # decode steps feed the generated tokens but the last
        runs[build.__name__] = (texts, engine.report()["phases"]["decode"]["tokens"], fed)
    (batch_texts, batch_tokens, _), (row_texts, row_tokens, row_fed) = runs.values()
    assert row_texts == batch_texts
    assert row_tokens == row_fed < batch_tokens


# -- sparse-hf through lm-eval ------------------------------------------------------------------------
def write_tiny_tasks(folder) -> str:
    """Write tiny_mc (multiple choice; one- and two-token choices, a shared context) and tiny_gen."""
    import random

    rng = random.Random(0)
    word = lambda: f"w{rng.randrange(125)}"  # noqa: E731
    mc, gen = [], []
    for i in range(8):
        context = " ".join(word() for _ in range(rng.randrange(2, 7)))
        width = 1 if i % 2 else 2
        mc.append({"context": context, "choices": [" ".join(word() for _ in range(width)) for _ in range(3)],
                   "label": i % 3})
        gen.append({"context": context, "answer": word()})
    mc.append(dict(mc[1], label=0))  # same context and one-token choices: lm-eval's logits cache reuses rows
    write_json_task(folder, "tiny_mc", mc, output_type="multiple_choice", doc_to_text="{{context}}",
                    doc_to_choice="{{choices}}", doc_to_target="label", metric_list=ACC)
    write_json_task(folder, "tiny_gen", gen, output_type="generate_until", doc_to_text="{{context}}",
                    doc_to_target="{{answer}}", metric_list=EXACT_MATCH,
                    generation_kwargs={"until": ["w124 w124"], "max_gen_toks": 5, "do_sample": False})
    return str(folder)


@pytest.fixture(scope="module")
def lm_eval_setup(tmp_path_factory, tiny_tokenizer_dir):
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("sparse_hf")
    (root / "tasks").mkdir()
    tasks = write_tiny_tasks(root / "tasks")
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, root / "llama")
    return str(model_dir), tasks


class CountingMixin:
    """Counts the real tokens lm-eval sends to the model, from the calls' own inputs and outputs.

    Loglikelihood batches are right-padded with id 0, which no tiny-vocabulary word has; generation
    prompts carry an attention mask; a row that generated n real tokens was fed n - 1 of them (its last
    one is never fed for its own sake, whatever its batch does).
    """

    def _model_call(self, inps, attn_mask=None, labels=None):
        self.counted["prefill"] += int((inps != 0).sum())
        return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **kwargs):
        out = super()._model_generate(context, max_length, stop, **kwargs)
        self.counted["prefill"] += int(kwargs["attention_mask"].sum())
        real = (out[:, context.shape[1]:] != self.tokenizer.pad_token_id).sum(-1)
        self.counted["decode"] += int((real - 1).clamp(min=0).sum())
        return out


def _counting(cls):
    return type(f"Counting{cls.__name__}", (CountingMixin, cls), {"counted": None})


def _evaluate(model, tasks_dir: str, task: str, model_args=None, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's thousands of built-in task files takes ~10 s
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=manager,
                                   **kwargs)


def _counting_lm(cls, model_dir: str, **kwargs):
    lm = _counting(cls)(pretrained=model_dir, device="cpu", **kwargs)
    lm.counted = {"prefill": 0, "decode": 0}
    return lm


def test_sparse_hf_loglikelihood_counts_real_tokens(lm_eval_setup, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lm_sparse.lm import SparseHFLM

    model_dir, tasks = lm_eval_setup
    probes: list[int] = []
    detect = SparseHFLM._detect_batch_size

    def spy(self, *args, **kwargs):
        probes.append(1)
        return detect(self, *args, **kwargs)

    monkeypatch.setattr(SparseHFLM, "_detect_batch_size", spy)
    plain = _counting_lm(HFLM, model_dir, batch_size=1)
    _evaluate(plain, tasks, "tiny_mc")
    expected = plain.counted["prefill"]
    reports = {}
    for batch_size in (1, 4, "auto"):
        out = _evaluate("sparse-hf", tasks, "tiny_mc",
                        model_args={"pretrained": model_dir, "topk": 0.5, "device": "cpu"}, batch_size=batch_size)
        reports[batch_size] = report = out["config"]["sparsity"]
        assert report["ffn"] == 0.5 and report["method"] == "topk" and report["label"] == "topk=0.5"
        assert report["tokens"] == report["phases"]["prefill"]["tokens"] == expected, batch_size
        assert report["phases"]["decode"]["tokens"] == 0
        assert report["zeros"] == 32 * LAYERS * expected
    assert probes, "batch_size=auto ran no probe"
    assert reports[1] == reports[4] == reports["auto"]


def test_last_half_prefill_does_not_depend_on_the_batch(lm_eval_setup):
    """sparse_prefill=last_half cuts each request at half its own length, not the padded batch's: the same
    log-likelihoods and sparsity at any batch size (it depended on the batch's longest row)."""
    model_dir, tasks = lm_eval_setup
    runs = {}
    for batch_size in (1, 4):
        out = _evaluate("sparse-hf", tasks, "tiny_mc", log_samples=True, batch_size=batch_size,
                        model_args={"pretrained": model_dir, "topk": 0.3, "sparse_prefill": "last_half",
                                    "device": "cpu"})
        logprobs = [r[0][0] for s in out["samples"]["tiny_mc"] for r in s["resps"]]
        runs[batch_size] = (logprobs, out["config"]["sparsity"])
    (resps1, report1), (resps4, report4) = runs[1], runs[4]
    assert resps1 == pytest.approx(resps4, abs=1e-4)  # float noise of other GEMM shapes only
    assert report1["phases"] == report4["phases"] and 0 < report1["ffn"] < 0.7


def test_sparse_hf_generate_until_counts_decode_tokens(lm_eval_setup):
    from lm_sparse.lm import SparseHFLM

    model_dir, tasks = lm_eval_setup
    lm = _counting_lm(SparseHFLM, model_dir, topk=0.5, batch_size=3)
    out = _evaluate(lm, tasks, "tiny_gen")
    report = out["config"]["sparsity"]
    assert lm.counted["decode"] > 0
    assert report["phases"]["prefill"]["tokens"] == lm.counted["prefill"]
    assert report["phases"]["decode"]["tokens"] == lm.counted["decode"]
    assert report["phases"]["decode"]["ffn"] == report["phases"]["prefill"]["ffn"] == 0.5
    # the same LM object evaluated again (the README's "build the model yourself"): that run alone is reported
    again = _evaluate(lm, tasks, "tiny_gen")["config"]["sparsity"]
    assert again["phases"] == report["phases"]


# -- dense sparse-hf is --model hf ------------------------------------------------------------------------
def _per_sample(out, task: str) -> list:
    return [(s["doc_id"], s["resps"], s["acc"]) for s in out["samples"][task]]


def _assert_same_as_hf(model_dir: str, tasks: str, limit: int | None = None):
    common = dict(log_samples=True, limit=limit, batch_size=2)
    hf = _evaluate("hf", tasks, "tiny_mc", model_args={"pretrained": model_dir, "device": "cpu"}, **common)
    for extra in ({}, {"topk": 1.0}):
        sparse = _evaluate("sparse-hf", tasks, "tiny_mc",
                           model_args={"pretrained": model_dir, "device": "cpu", **extra}, **common)
        assert _per_sample(sparse, "tiny_mc") == _per_sample(hf, "tiny_mc")
        assert sparse["results"]["tiny_mc"]["acc,none"] == hf["results"]["tiny_mc"]["acc,none"]
        report = sparse["config"]["sparsity"]
        assert report["tokens"] > 0
        assert report["method"] == ("topk" if extra else "dense")


def test_dense_sparse_hf_equals_hf_on_tiny_model(lm_eval_setup):
    _assert_same_as_hf(*lm_eval_setup)


def test_dense_sparse_hf_equals_hf_on_smollm2(lm_eval_setup, smollm2_dir):
    _assert_same_as_hf(str(smollm2_dir), lm_eval_setup[1], limit=3)


def test_labels_keep_apart_settings_that_change_the_measurement():
    """The report's row key includes the label: a non-default teal_mode or sparse_prefill must show in it."""
    from lm_sparse.config import parse_sparsity_args
    from lm_sparse.methods import describe_method

    engine = SparsityEngine(make_tiny_model("llama"))

    def label(args: dict) -> str:
        return describe_method(parse_sparsity_args(args), engine)

    assert label({"teal": 0.5}) == "teal=0.5"
    assert label({"teal": 0.5, "teal_mode": "greedy"}) == "teal=0.5"
    assert label({"teal": 0.5, "teal_mode": "uniform"}) == "teal=0.5,teal_mode=uniform"
    assert label({"ppl_p": 1, "method": "teal", "teal_mode": "uniform"}) == "teal ppl_p=1,teal_mode=uniform"
    assert label({"topk": 0.5, "sparse_prefill": "last_half"}) == "topk=0.5,sparse_prefill=last_half"
    assert label({"ppl_p": 5, "sparse_prefill": "none"}) == "ppl_p=5,sparse_prefill=none"
    assert label({}) == "dense"
