"""Decode attention with the query heads of a group packed as rows: the same attention as repeating the
key/value heads, without copying the cache; everything else is transformers' SDPA unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_model

from lm_sparse.kernels import decode
from lm_sparse.kernels.grouped_attention import NAME, grouped_query_decoding, grouped_sdpa


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from their module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


def _reference(query, key, value, mask, scale) -> torch.Tensor:
    """Float64 attention with every key/value head repeated for its query heads: [B, T, H, D]."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(groups, dim=1) for t in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def _inputs(dtype, batch=3, heads=8, kv_heads=2, tokens=1, length=37, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(batch, 1, tokens, length, generator=g) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    return q, k, v, mask


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [True, False])
def test_one_query_token_packed_matches_repeated_heads(dtype, tol, masked):
    q, k, v, mask = _inputs(dtype)
    mask = mask if masked else None
    out, weights = grouped_sdpa(_Attention(4), q, k, v, mask, scaling=0.25)
    assert weights is None and out.shape == (3, 1, 8, 16) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, 0.25), atol=tol, rtol=tol)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](_Attention(4), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(out, sdpa, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", ["prefill", "per-head mask", "no groups", "softcap"])
def test_everything_else_is_transformers_sdpa(case):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    tokens, heads, kv_heads, kwargs = 1, 8, 2, {}
    if case == "prefill":
        tokens = 5
    elif case == "no groups":
        kv_heads = 8
    elif case == "softcap":
        kwargs["softcap"] = 30.0
    q, k, v, mask = _inputs(torch.float32, heads=heads, kv_heads=kv_heads, tokens=tokens)
    if case == "per-head mask":
        mask = mask.expand(-1, heads, -1, -1)
    module = _Attention(heads // kv_heads)
    try:  # newer transformers refuse softcapping in sdpa; this refuses it the same way
        expected, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=0.25, **kwargs)
    except ValueError as refused:
        with pytest.raises(ValueError, match=str(refused)[:20]):
            grouped_sdpa(module, q, k, v, mask, scaling=0.25, **kwargs)
        return
    out, _ = grouped_sdpa(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("grouped", [True, False])
def test_compiled_decode_step_reads_the_cache_without_repeating_heads(monkeypatch, grouped):
    """The tiny llama has 4 query heads on 2 key/value heads. transformers' SDPA under torch.compile repeats
    them (repeat_kv, traced into the step: 2 calls a layer, each a copy of the whole cache at every step);
    generate_static's compiled step does not. `grouped=False` takes grouped_query_decoding out, to show what
    the count catches. Tokens are generate's either way; the model's attention is "sdpa" again afterwards."""
    import contextlib

    import torch._dynamo.testing
    from transformers.integrations import sdpa_attention

    model = make_tiny_model("llama")
    model.generation_config.pad_token_id = 0
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads == 2
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    calls = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: calls.append(x.shape) or real(x, n))
    monkeypatch.setattr(decode, "COMPILE_OPTIONS", {"backend": torch._dynamo.testing.CompileCounterWithBackend(
        "eager"), "fullgraph": True, "dynamic": False})
    if not grouped:
        monkeypatch.setattr(decode, "grouped_query_decoding", lambda model: contextlib.nullcontext(False))
    decode.forget_compiled_step(model)
    try:
        got = decode.generate_static(model, ids, None, 5, None, 0, None, compile=True)
    finally:
        decode.forget_compiled_step(model)
    assert torch.equal(got, expected)
    # without grouping: each layer's key and value caches, whole, in every trace of the step
    cache_shape = (2, 2, decode.CACHE_BUCKET, model.config.head_dim)
    assert (calls == []) if grouped else (len(calls) >= 4 and set(calls) == {cache_shape})
    assert model.config._attn_implementation == "sdpa"


def test_other_attention_implementations_are_left_alone():
    model = make_tiny_model("llama")
    model.config._attn_implementation = "eager"
    with grouped_query_decoding(model) as grouped:
        assert not grouped and model.config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    with grouped_query_decoding(model) as grouped:
        assert grouped and model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_compiled_static_decoding_generates_like_generate_on_every_architecture(name, monkeypatch):
    """Left-padded prompts, a compiled step (eager backend, fullgraph) and the eager loop: generate's tokens.
    Gemma 2's softcapping, sliding-window layers and models without grouped heads take transformers' path."""
    monkeypatch.setattr(decode, "COMPILE_OPTIONS", {"backend": "eager", "fullgraph": True, "dynamic": False})
    model = make_tiny_model(name)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[1, :3] = 0
    mask = (ids != 0).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    decode.forget_compiled_step(model)
    try:
        for compile in (True, False):
            assert torch.equal(decode.generate_static(model, ids, mask, 6, None, 0, None, compile=compile), expected)
    finally:
        decode.forget_compiled_step(model)
