"""Offline tiny models for tests and device checks: random weights from a config, a word-level tokenizer.

Nothing here downloads anything: the test suite, the `--smoke` benchmarks and the GPU lm-eval check
(`benchmarks/lm_eval_kernel_check.py`) build their models from these configs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

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
# lm-eval metric entries of the local tasks below
ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
EXACT_MATCH = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
# The word-level tokenizer's vocabulary: ids 0-2 special, then "w0" .. "w124" (128 ids, the tiny vocab).
WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(125)]


def make_tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-weight causal LM of the named tiny config (eval mode); `overrides` change config fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_CONFIGS[name], **overrides}
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_word_tokenizer(out: Path) -> Path:
    """Save a whitespace word-level tokenizer over `WORDS` (pad 0, eos 1, unk 2) into `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return Path(out)


def save_tiny_model(name: str, tokenizer_dir: Path, out: Path, seed: int = 0,
                    dtype: torch.dtype = torch.float32, model: Any = None, **overrides) -> Path:
    """Save a tiny model plus the word tokenizer into `out`, loadable with pretrained=out.

    `model`: a tiny model the caller built or changed (else `make_tiny_model(name, ...)` builds one).
    """
    if model is None:
        model = make_tiny_model(name, seed=seed, dtype=dtype, **overrides)
    model.config.pad_token_id = 0
    model.config.eos_token_id = 1
    # generate stops at the generation config's EOS: the tokenizer's, as in a real checkpoint
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, Path(out) / f.name)
    return Path(out)


def write_json_task(folder: Path, name: str, rows: list[dict], **config: Any) -> Path:
    """Write `rows` to <folder>/<name>.jsonl and the lm-eval task <folder>/<name>.yaml that reads them.

    The task reads the file as its test split; `config` is the rest of the task (output_type, doc_to_text,
    doc_to_target, metric_list, ...), written as YAML. Returns `folder` (an `--include_path`).
    """
    import yaml  # lm-eval's own dependency

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder
