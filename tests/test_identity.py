"""The model identity behind the threshold cache key: weights, config, tokenizer, adapters, file-hash memo."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lm_sparse import identity as ident
from lm_sparse.thresholds import _strip_sources, cache_key

from conftest import make_tiny_model, save_tiny_model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path / "cache"))


def _key(model_id: dict) -> str:
    return cache_key({"model": model_id})


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_local_checkpoint_is_keyed_by_weights_config_and_tokenizer(tmp_path, tiny_tokenizer_dir):
    model = make_tiny_model("llama")
    one = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "one", model=model)
    two = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "two", model=model)
    tok = _load_tokenizer(one)
    a = ident.model_identity(model, str(one), tokenizer=tok)
    b = ident.model_identity(model, str(two), tokenizer=_load_tokenizer(two))
    # the same checkpoint at another path is the same model
    assert _key(a) == _key(b) and a["hash_mode"] == "full" and a["source"] != b["source"]
    assert a["model_type"] == "llama" and a["num_layers"] == 2 and a["dtype"] == "float32"
    assert a["config_sha256"] and a["tokenizer_sha256"]

    config = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}))
    assert _key(ident.model_identity(model, str(two), tokenizer=tok)) == _key(a)  # descriptive only
    (two / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    changed = ident.model_identity(model, str(two), tokenizer=tok)
    assert changed["weights_sha256"] == a["weights_sha256"] and changed["config_sha256"] != a["config_sha256"]

    # a tokenizer with two ids swapped turns the same text into other ids
    vocab_file = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    vocab = vocab_file["model"]["vocab"]
    w1, w2 = list(vocab)[10], list(vocab)[11]
    vocab[w1], vocab[w2] = vocab[w2], vocab[w1]
    swapped_dir = tmp_path / "swapped"
    swapped_dir.mkdir()
    for f in tiny_tokenizer_dir.iterdir():
        (swapped_dir / f.name).write_bytes(f.read_bytes())
    (swapped_dir / "tokenizer.json").write_text(json.dumps(vocab_file))
    swapped = ident.model_identity(model, str(one), tokenizer=_load_tokenizer(swapped_dir))
    assert swapped["tokenizer_sha256"] != a["tokenizer_sha256"] and _key(swapped) != _key(a)


def test_gguf_file_keys_only_the_file_loaded(tmp_path):
    (tmp_path / "q8.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    (tmp_path / "q4.gguf").write_bytes(b"GGUF" + bytes(range(100)))
    q8 = ident.source_identity(str(tmp_path), gguf_file="q8.gguf")
    q4 = ident.source_identity(str(tmp_path), gguf_file="q4.gguf")
    both = ident.source_identity(str(tmp_path))
    assert len({q8["weights_sha256"], q4["weights_sha256"], both["weights_sha256"]}) == 3


def test_hub_gguf_file_enters_the_identity(monkeypatch):
    """One Hub repository, one commit, several quantizations: each GGUF file is its own model."""
    monkeypatch.setattr(ident, "hub_commit", lambda name, revision=None: "0123abcd" * 5)
    q8 = ident.source_identity("org/Model-GGUF", gguf_file="model.Q8_0.gguf")
    q4 = ident.source_identity("org/Model-GGUF", gguf_file="model.Q4_K_M.gguf")
    assert q8["commit"] == q4["commit"] and q8 != q4 and q4["gguf_file"] == "model.Q4_K_M.gguf"
    assert "gguf_file" not in ident.source_identity("org/Model")


def test_adapter_config_enters_the_identity(tmp_path):
    """LoRA's scaling (lora_alpha, r) lives in adapter_config.json, beside unchanged adapter weights."""
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16, "r": 8}))
    before = ident.source_identity(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 64, "r": 8}))
    after = ident.source_identity(str(tmp_path))
    assert before["weights_sha256"] == after["weights_sha256"] and before["config_sha256"] != after["config_sha256"]


def test_cache_root_expands_the_users_home(monkeypatch, tmp_path):
    from lm_sparse.models import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LM_SPARSE_CACHE", "~/lmsc")
    assert cache_root() == tmp_path / "lmsc"
    monkeypatch.delenv("LM_SPARSE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert cache_root() == tmp_path / "xdg" / "lm_sparse"


def test_adapters_and_quantization_enter_the_identity(tmp_path, tiny_tokenizer_dir):
    model = make_tiny_model("llama")
    base = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "base", model=model)
    d1 = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "d1", seed=1)
    d2 = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "d2", seed=2)
    plain = ident.lm_model_identity(model, SimpleNamespace(pretrained=str(base), revision=None, peft=None,
                                                           delta=None, gguf_file=None))
    with_d1 = ident.lm_model_identity(model, SimpleNamespace(pretrained=str(base), revision=None, delta=str(d1)))
    with_d2 = ident.lm_model_identity(model, SimpleNamespace(pretrained=str(base), revision=None, delta=str(d2)))
    assert len({_key(plain), _key(with_d1), _key(with_d2)}) == 3 and "weights_sha256" in with_d1["delta"]
    assert with_d1["weights_sha256"] == plain["weights_sha256"]  # the base checkpoint is the same
    offline = ident.lm_model_identity(model, SimpleNamespace(pretrained=str(base), revision=None,
                                                             peft="nobody/adapter"))
    assert offline["peft"] == {"name": "nobody/adapter"}
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    quantized = ident.model_identity(model, str(base))
    assert quantized["quantization"]["load_in_4bit"] is True and _key(quantized) != _key(plain)


def test_subfolder_and_from_pretrained_keywords_enter_the_identity(tmp_path, tiny_tokenizer_dir):
    top = make_tiny_model("llama")
    save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m", model=top)
    save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m" / "sub", seed=3)
    lm = SimpleNamespace(pretrained=str(tmp_path / "m"), revision=None)
    plain = ident.lm_model_identity(top, lm)
    sub = ident.lm_model_identity(top, SimpleNamespace(**vars(lm), subfolder="sub"))
    assert sub["weights_sha256"] != plain["weights_sha256"]
    override = ident.lm_model_identity(top, SimpleNamespace(**vars(lm), load_kwargs={"rms_norm_eps": 1.0}))
    assert override["load_kwargs"] == {"rms_norm_eps": "1.0"} and _key(override) != _key(plain)


def test_in_memory_models_are_keyed_by_parameters_and_config(monkeypatch):
    model = make_tiny_model("llama")
    mem = ident.model_identity(model, None)
    assert mem["hash_mode"] == "full" and mem["config_sha256"]
    assert ident.model_identity(make_tiny_model("llama", seed=1), None)["params_sha256"] != mem["params_sha256"]
    # an unknown hub id offline falls back to the parameters, without blocking
    assert ident.model_identity(model, "nobody/not-a-model")["params_sha256"] == mem["params_sha256"]
    other_act = make_tiny_model("llama", hidden_act="gelu")
    assert ident.model_identity(other_act, None)["config_sha256"] != mem["config_sha256"]

    # above the exact limit: a strided sample plus moments still see a change away from the sampled values
    monkeypatch.setattr(ident, "EXACT_PARAMS_LIMIT", 0)
    monkeypatch.setattr(ident, "_SAMPLE", 16)
    big = ident.hash_parameters(model)
    assert big[1].startswith("names+shapes+strided") and big == ident.hash_parameters(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    flat = weight.data.view(-1)
    step = flat.numel() // 16
    with torch.no_grad():
        flat[step // 2] += 0.5  # between two sampled values
    assert ident.hash_parameters(model)[0] != big[0]


def test_file_hashes_are_remembered_by_path_size_times_and_inode(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    reads = []
    real_sha256 = ident.file_sha256
    monkeypatch.setattr(ident, "file_sha256", lambda *a, **k: reads.append(a[0]) or real_sha256(*a, **k))
    first = ident.file_digests([f])[0]
    assert ident.file_digests([f])[0] == first and len(reads) == 1  # unchanged: the remembered digest
    stat = f.stat()
    # rewritten in place with the same size, its mtime put back: the change time still moved
    with open(f, "r+b") as fh:
        fh.write(b"b")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = ident.file_digests([f])[0]
    assert second != first and len(reads) == 2
    # a corrupt memo is ignored, not trusted
    (tmp_path / "cache" / "file_hashes.json").write_text("{not json")
    assert ident.file_digests([f])[0] == second and len(reads) == 3


def test_source_entries_stay_out_of_the_key(tmp_path, tiny_tokenizer_dir):
    model = make_tiny_model("llama")
    path = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m", model=model)
    out = ident.model_identity(model, str(path))
    assert "source" in out and "source" not in _strip_sources(out)
