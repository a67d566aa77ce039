"""The engine on every supported architecture: sites, exact Top-k, hook hygiene, ReLU-family counting.

Every expectation is computed independently of the engine: Top-k by a forward pre-hook written here with
torch.sort, natural zeros by recomputing act(gate(x)) * up(x) from the gate/up outputs.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch
from torch import nn

from conftest import TINY_CONFIGS, dense_and_attached_logits, down_proj_pre_hooks, make_tiny_model
from lm_sparse.engine import SparsityEngine, Threshold, TopK, UnsupportedArchitectureError, resolve_sites
from lm_sparse.engine.arch import ARCHITECTURES, is_relu_family

torch.set_num_threads(1)

LLAMA_LIKE_SITES = ["q", "k", "v", "o", "gate", "up", "down"]
PHI3_SITES = ["qkv", "o", "gate_up", "down"]
RELU_MODELS = ("llama_relu", "llama_relu2")
SMOOTH_MODELS = sorted(set(TINY_CONFIGS) - set(RELU_MODELS))
INTERMEDIATE = TINY_CONFIGS["llama"]["intermediate_size"]
NUM_LAYERS = TINY_CONFIGS["llama"]["num_hidden_layers"]


def _inputs(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_CONFIGS["llama"]["vocab_size"], (batch, seq), generator=g)


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest |x| per row via a full sort (independent of TopK's torch.topk)."""
    order = x.abs().sort(dim=-1, descending=True).indices
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return torch.where(keep, x, torch.zeros_like(x))


def _reference_down_topk(model: nn.Module, k: int):
    return down_proj_pre_hooks(model, lambda m, a: (_reference_topk(a[0], k),))


@contextmanager
def _record_intermediate(model: nn.Module, store: list[torch.Tensor]):
    """Recompute each layer's FFN intermediate act(gate(x)) * up(x) from the gate and up outputs."""
    handles = []
    for layer in model.model.layers:
        mlp = layer.mlp
        outs: dict[str, torch.Tensor] = {}

        def keep(name, outs=outs):
            def hook(m, a, out):
                outs[name] = out
            return hook

        def combine(m, a, out, mlp=mlp, outs=outs):
            store.append(mlp.act_fn(outs["gate"]) * outs["up"])

        handles += [mlp.gate_proj.register_forward_hook(keep("gate")),
                    mlp.up_proj.register_forward_hook(keep("up")),
                    mlp.register_forward_hook(combine)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- sites --------------------------------------------------------------------------------------------
def test_sites_resolve_on_every_architecture(tiny_model_name):
    model = make_tiny_model(tiny_model_name)
    sites = resolve_sites(model)
    expected = PHI3_SITES if tiny_model_name == "phi3" else LLAMA_LIKE_SITES
    assert [s.name for s in sites] == expected * NUM_LAYERS
    assert [s.layer for s in sites] == [i for i in range(NUM_LAYERS) for _ in expected]
    assert [s.index for s in sites] == list(range(len(sites)))
    modules = dict(model.named_modules())
    for s in sites:
        assert modules["model." + s.path] is s.module
        assert isinstance(s.module, nn.Linear)
    down = [s for s in sites if s.name == "down"]
    assert all(s.in_features == INTERMEDIATE and s.group == "mlp_mid" for s in down)
    groups = {s.name: s.group for s in sites}
    if tiny_model_name == "phi3":
        assert groups == {"qkv": "attn_in", "o": "attn_out", "gate_up": "mlp_in", "down": "mlp_mid"}
    else:
        assert groups == {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
                          "gate": "mlp_in", "up": "mlp_in", "down": "mlp_mid"}


def test_every_tiny_config_is_in_the_table():
    for cfg in TINY_CONFIGS.values():
        assert cfg["model_type"] in ARCHITECTURES


# -- Top-k --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMOOTH_MODELS)
def test_topk_half_is_exactly_half_and_matches_reference(name):
    model = make_tiny_model(name)
    ids = _inputs()
    engine = SparsityEngine(model)
    down = engine.sites_named("down")
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in down})
    assert {engine.rules[s.index].k for s in down} == {32}
    dense, sparse = dense_and_attached_logits(model, engine, ids)
    with torch.no_grad(), _reference_down_topk(model, 32):
        reference = model(ids).logits
    engine.counter.synchronize()
    report = engine.report()
    assert report["ffn"] == 0.5 and report["overall"] == 0.5 and report["attn"] is None
    assert report["per_layer"] == {"down": [0.5] * NUM_LAYERS}
    assert report["tokens"] == ids.numel()
    assert report["phases"]["prefill"]["tokens"] == ids.numel()
    assert report["phases"]["decode"]["tokens"] == 0
    assert report["zeros"] == 32 * ids.numel() * NUM_LAYERS
    assert report["sites"] == ["down"]
    assert report["execution"] == {"down": {"prefill": "masked_dense", "decode": "masked_dense"}}
    torch.testing.assert_close(sparse, reference, rtol=0, atol=0)
    assert not torch.allclose(sparse, dense)


@pytest.mark.parametrize("name", RELU_MODELS)
def test_topk_on_relu_models_matches_reference(name):
    # Natural zeros may exceed the dropped half: sparsity >= 0.5, output still the reference's.
    model = make_tiny_model(name)
    ids = _inputs()
    engine = SparsityEngine(model)
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
    store: list[torch.Tensor] = []
    with torch.no_grad():
        with engine.attached():
            sparse = model(ids).logits
        with _reference_down_topk(model, 32), _record_intermediate(model, store):
            reference = model(ids).logits
    torch.testing.assert_close(sparse, reference, rtol=0, atol=0)
    engine.counter.synchronize()
    expected = sum(int(torch.clamp((h == 0).sum(-1), min=32).sum()) for h in store)
    assert engine.report()["zeros"] == expected
    assert engine.report()["ffn"] == expected / (ids.numel() * INTERMEDIATE * NUM_LAYERS)


def test_topk_on_attention_and_fused_sites_phi3():
    model = make_tiny_model("phi3")
    ids = _inputs()
    engine = SparsityEngine(model)
    engine.set_rules({s.index: TopK(0.25, s.in_features) for s in engine.sites})
    with torch.no_grad(), engine.attached():
        model(ids)
    engine.counter.synchronize()
    report = engine.report()
    # hidden 32 -> k = 8 kept, 24 zeroed; intermediate 64 -> k = 16 kept, 48 zeroed: 3/4 everywhere
    assert report["overall"] == 0.75 and report["ffn"] == 0.75 and report["attn"] == 0.75
    assert report["weights_skipped"] == pytest.approx(0.75)
    assert set(report["per_layer"]) == set(PHI3_SITES)


# -- hook hygiene ---------------------------------------------------------------------------------------
def test_hooks_removed_after_attached_and_after_an_exception():
    model = make_tiny_model("llama")
    ids = _inputs()
    before = _all_hooks(model)
    engine = SparsityEngine(model)
    engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites})
    with torch.no_grad():
        dense = model(ids).logits
        with engine.attached():
            assert _all_hooks(model) == before + 2 + len(engine.sites)
            model(ids)
        assert _all_hooks(model) == before
        with pytest.raises(RuntimeError, match="boom"):
            with engine.attached():
                model(ids)
                raise RuntimeError("boom")
        assert _all_hooks(model) == before
        # A forward that itself raises (bad input) also leaves nothing behind.
        with pytest.raises(Exception):
            with engine.attached():
                model(torch.full((1, 3), 10_000))
        assert _all_hooks(model) == before
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)


def test_decode_executor_forward_is_restored():
    model = make_tiny_model("llama")
    engine = SparsityEngine(model)
    down = engine.sites_named("down")
    engine.set_rules({s.index: Threshold(0.01) for s in down})
    for s in down:
        engine.set_decode_executor(s.index, s.module.forward)
    with pytest.raises(RuntimeError):
        with engine.attached():
            assert all("forward" in s.module.__dict__ for s in down)
            raise RuntimeError("boom")
    assert all("forward" not in s.module.__dict__ for s in down)
    assert engine.report()["execution"]["down"] == {"prefill": "masked_dense", "decode": "sparse_kernel"}


# -- unsupported architectures ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_unsupported_architecture_raises_one_line(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {"gpt2": dict(n_embd=16, n_layer=1, n_head=2, vocab_size=64),
             "opt": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                         word_embed_proj_dim=16, vocab_size=64)}[model_type]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **small))
    with pytest.raises(UnsupportedArchitectureError) as info:
        SparsityEngine(model)
    message = str(info.value)
    assert "\n" not in message
    assert repr(model_type) in message
    assert "supported: " + ", ".join(sorted(ARCHITECTURES)) in message
    assert _all_hooks(model) == 0


# -- ReLU family: natural zeros ------------------------------------------------------------------------------
def _direct_zero_count(model: nn.Module, ids: torch.Tensor, eps: float | None = None) -> tuple[int, list[int]]:
    """Zeros of each layer's intermediate; with `eps`, of the intermediate thresholded at |h| <= eps
    (applied to the down inputs too, so later layers see what the engine's model sees)."""
    store: list[torch.Tensor] = []
    threshold = nullcontext() if eps is None else down_proj_pre_hooks(model, lambda m, a: (a[0] * (a[0].abs() > eps),))
    with torch.no_grad(), threshold, _record_intermediate(model, store):
        model(ids)
    per_layer = [int((h == 0).sum() if eps is None else (h.abs() <= eps).sum()) for h in store]
    return sum(per_layer), per_layer


@pytest.mark.parametrize("name", RELU_MODELS)
def test_dense_relu_counts_natural_zeros(name):
    model = make_tiny_model(name)
    ids = _inputs()
    assert is_relu_family(model.config)
    engine = SparsityEngine(model)
    engine.count_natural_zeros()
    dense, counted = dense_and_attached_logits(model, engine, ids)
    torch.testing.assert_close(counted, dense, rtol=0, atol=0)
    engine.counter.synchronize()
    expected, per_layer = _direct_zero_count(model, ids)
    report = engine.report()
    assert expected > 0
    assert report["zeros"] == expected
    width = ids.numel() * INTERMEDIATE
    assert report["per_layer"]["down"] == [z / width for z in per_layer]
    assert report["activation"] == TINY_CONFIGS[name]["hidden_act"]


@pytest.mark.parametrize("name", RELU_MODELS)
def test_fat_on_relu_models_counts_threshold_zeros(name):
    model = make_tiny_model(name)
    ids = _inputs()
    eps = 0.01
    engine = SparsityEngine(model)
    engine.set_rules({s.index: Threshold(eps) for s in engine.sites_named("down")})
    with torch.no_grad(), engine.attached():
        model(ids)
    engine.counter.synchronize()
    expected, _ = _direct_zero_count(model, ids, eps=eps)
    natural, _ = _direct_zero_count(model, ids)
    assert engine.report()["zeros"] == expected > natural


class FATReLU(nn.Module):
    """ProSparse's FATReLU: x where x > threshold, else 0."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x > self.threshold)


def test_fatrelu_model_is_relu_family_and_counts_natural_zeros():
    from lm_sparse.config import SparsityConfig
    from lm_sparse.methods import build_rules, describe_method

    model = make_tiny_model("llama_relu")
    for layer in model.model.layers:
        layer.mlp.act_fn = FATReLU(0.05)
    model.config.hidden_act = "fatrelu"
    ids = _inputs()
    assert is_relu_family(model.config)
    engine = SparsityEngine(model)
    assert engine.activation == "fatrelu"
    rules, calibration = build_rules(engine, SparsityConfig())
    assert calibration is None and sorted(rules) == [s.index for s in engine.sites_named("down")]
    engine.set_rules(rules)
    assert describe_method(SparsityConfig(), engine) == "dense (fatrelu)"
    with torch.no_grad(), engine.attached():
        model(ids)
    engine.counter.synchronize()
    expected, _ = _direct_zero_count(model, ids)
    relu_zeros, _ = _direct_zero_count(make_tiny_model("llama_relu"), ids)
    report = engine.report()
    assert report["activation"] == "fatrelu"
    assert report["zeros"] == expected > relu_zeros  # the threshold adds zeros beyond plain ReLU


def test_peft_style_wrapper_resolves_to_the_same_layers_and_sites():
    """PEFT's PeftModel -> base_model (LoraModel) -> model (transformers): sites and TEAL's layers look through it."""
    from lm_sparse.engine.arch import decoder_layers

    model = make_tiny_model("llama")

    class LoraModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

    class PeftModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.base_model = LoraModel(inner)

    wrapped = PeftModel(model)
    assert decoder_layers(wrapped) is model.model.layers
    assert [(s.path, s.module) for s in resolve_sites(wrapped)] == [(s.path, s.module) for s in resolve_sites(model)]
