"""Calibration text: file formats, content identity, disjoint shuffled windows, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from lm_sparse.calibrate.data import (DEFAULT_SEQLEN, calibration_batches, default_calib_tokens, load_texts,
                                      parse_hf_spec)
from lm_sparse.config import SparsityArgumentError


def _words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + i) % 125}" for i in range(n))


def test_txt_paragraphs_and_identity_by_content(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("first para\nline two\n\n\nsecond para\n\n")
    texts, ident = load_texts(str(a))
    assert texts == ["first para\nline two", "second para"]
    b = tmp_path / "sub" / "copy.txt"
    b.parent.mkdir()
    b.write_text(a.read_text())
    _, ident_b = load_texts(str(b))
    assert ident_b["sha256"] == ident["sha256"] and ident_b["source"] != ident["source"]
    b.write_text("first para\n\nsecond para changed")
    assert load_texts(str(b))[1]["sha256"] != ident["sha256"]


def test_jsonl_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "plain"}, {"question": "q?", "answer": "a."}, {"title": "t", "body": "b", "n": 3}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts, ident = load_texts(str(path))
    assert texts == ["plain", "q?\na.", "t\nb"]
    assert ident["documents"] == 3


def test_bad_files_name_calib_data(tmp_path):
    with pytest.raises(SparsityArgumentError, match="calib_data"):
        load_texts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(SparsityArgumentError, match="line 2"):
        load_texts(str(bad))
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(SparsityArgumentError, match="calib_data"):
        load_texts(str(other))


def test_default_corpus_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparsityArgumentError) as info:
        load_texts(None)
    message = str(info.value)
    assert "calib_data" in message and "local" in message and "\n" not in message


def test_hf_spec_and_wikitext_regrouping(monkeypatch):
    assert parse_hf_spec("hf:wikitext/wikitext-2-raw-v1:train") == ("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_hf_spec("hf:owner/name/cfg:validation") == ("owner/name", "cfg", "validation")
    assert parse_hf_spec("hf:name") == ("name", None, "train")
    import datasets

    rows = {"text": ["", " = Title = \n", "", " line one \n", " line two \n", "", " other \n"]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows))
    texts, ident = load_texts("hf:wikitext/wikitext-2-raw-v1:train")
    assert texts == ["= Title =", "line one \n line two", "other"]
    assert ident["source"] == "hf:wikitext/wikitext-2-raw-v1:train"
    # One document per row and no blank separator rows (TinyStories-like): the rows stay documents.
    rows = {"text": ["Story one ends.", "Story two starts.", "Story three."]}
    texts, _ = load_texts("hf:owner/stories:train")
    assert texts == rows["text"]


def test_windows_disjoint_shuffled_and_seeded(tiny_tokenizer):
    texts = [_words(100, start=7 * d) for d in range(40)]  # 4000 words + 40 EOS
    calib, held = calibration_batches(tiny_tokenizer, texts, num_tokens=1000, seqlen=50, seed=3, heldout_tokens=500)
    assert calib.shape == (20, 50) and held.shape == (10, 50) and calib.dtype == torch.long
    stream = torch.tensor(sum((tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [1] for t in texts), []))
    windows = stream[: stream.numel() // 50 * 50].view(-1, 50)

    def index_of(row):
        return int(torch.nonzero((windows == row).all(dim=1))[0])

    calib_idx = {index_of(r) for r in calib}
    held_idx = {index_of(r) for r in held}
    assert len(calib_idx) == 20 and len(held_idx) == 10 and not calib_idx & held_idx
    assert calib_idx != set(range(20))  # shuffled, not the first windows
    again, _ = calibration_batches(tiny_tokenizer, texts, 1000, 50, seed=3)
    assert torch.equal(again, calib)
    other, _ = calibration_batches(tiny_tokenizer, texts, 1000, 50, seed=4)
    assert not torch.equal(other, calib)
    assert (torch.cat([calib, held]) == 1).any()  # EOS between documents reaches the windows


def test_too_short_text_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(SparsityArgumentError, match="calib_tokens"):
        calibration_batches(tiny_tokenizer, [_words(30)], num_tokens=64, seqlen=16, seed=0, heldout_tokens=16)
    with pytest.raises(SparsityArgumentError, match="calib_tokens"):
        calibration_batches(tiny_tokenizer, [_words(30)], num_tokens=8, seqlen=16, seed=0)


def test_defaults():
    assert default_calib_tokens("cpu") == 16384
    assert default_calib_tokens(torch.device("cuda", 0)) == 65536
    assert DEFAULT_SEQLEN == 512


def test_shipped_excerpt_is_gsm8k_lines():
    from lm_sparse.calibrate.data import shipped_excerpt_path

    texts, ident = load_texts(str(shipped_excerpt_path()))
    assert len(texts) == 250 and "\n" in texts[0] and ident["documents"] == 250


def test_calib_data_file_checked_before_the_model_loads(tmp_path):
    """parse_sparsity_args (run before any weight loads) rejects a missing or non-text calib_data file."""
    from lm_sparse.config import parse_sparsity_args

    with pytest.raises(SparsityArgumentError, match=r"calib_data=.*no such file"):
        parse_sparsity_args({"ppl_p": 1, "calib_data": str(tmp_path / "missing.jsonl")})
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(SparsityArgumentError, match=r"expected a \.txt or \.jsonl"):
        parse_sparsity_args({"teal": 0.5, "calib_data": str(other)})
    good = tmp_path / "ok.txt"
    good.write_text("some text")
    assert parse_sparsity_args({"ppl_p": 1, "calib_data": str(good)}).calib_data == str(good)
    assert parse_sparsity_args({"ppl_p": 1, "calib_data": "hf:wikitext/wikitext-2-raw-v1:train"}).calib_data


def test_integer_errors_echo_the_integer_written():
    """lm_eval's CLI hands `calib_tokens=-5` over as -5.0; the error shows -5."""
    from lm_sparse.config import parse_sparsity_args

    with pytest.raises(SparsityArgumentError, match=r"invalid calib_tokens=-5: "):
        parse_sparsity_args({"ppl_p": 1, "calib_tokens": -5.0})
