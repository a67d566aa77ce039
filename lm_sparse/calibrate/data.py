"""Calibration text: where it comes from, what identifies it, and how it becomes token windows.

`load_texts` reads documents from a local .txt/.jsonl file or a Hub dataset and returns them with their
identity (a sha256 of the text content, so a copy of the same file at another path is the same data).
`calibration_batches` cuts the concatenated documents into non-overlapping windows, shuffles them with a
seed and returns disjoint calibration and held-out windows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..config import SparsityArgumentError, local_calib_path
from ..models import env_flag_set

DEFAULT_SEQLEN = 512
DEFAULT_DATASET = "hf:wikitext/wikitext-2-raw-v1:train"
CALIB_TOKENS_CPU = 16384
CALIB_TOKENS_CUDA = 65536


def default_calib_tokens(device: Any) -> int:
    """Default number of calibration tokens: 16384 on CPU, 65536 on CUDA (the results file records it)."""
    return CALIB_TOKENS_CUDA if "cuda" in str(device) else CALIB_TOKENS_CPU


def texts_sha256(texts: list[str]) -> str:
    """Content hash of a list of documents (order and boundaries included)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _jsonl_text(record: Any) -> str:
    # "text" if present, else a Q/A pair (GSM8K-like), else every string field joined.
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return ""
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return record["question"] + "\n" + record["answer"]
    return "\n".join(v for v in record.values() if isinstance(v, str))


def _read_txt(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    return [p for p in paragraphs if p]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SparsityArgumentError(
                    f"sparse-hf: invalid calib_data={str(path)!r}: line {lineno} is not JSON ({exc.msg})"
                ) from None
            text = _jsonl_text(record)
            if text.strip():
                texts.append(text)
    return texts


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:dataset/config:split` -> (dataset, config, split).

    `hf:name` has no config and split train; `hf:owner/name/config:split` keeps the owner in the name;
    `hf:owner/name/:split` is an owned dataset without a config.
    """
    rest = spec[3:]
    path, _, split = rest.rpartition(":") if ":" in rest else (rest, "", "train")
    parts = path.split("/")
    if len(parts) == 1:
        dataset, config = parts[0], None
    elif len(parts) == 2:
        dataset, config = parts[0], parts[1]
    else:
        dataset, config = "/".join(parts[:-1]), parts[-1]
    if not dataset or not split:
        raise SparsityArgumentError(
            f"sparse-hf: invalid calib_data={spec!r}: expected hf:dataset/config:split"
        )
    return dataset, config or None, split


def _load_hf(spec: str, default: bool) -> list[str]:
    dataset, config, split = parse_hf_spec(spec)
    offline = env_flag_set("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    hint = "; pass a local .txt/.jsonl file with calib_data=PATH" if default else ""
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset, config, split=split)
    except Exception as exc:  # offline, unknown dataset, no such split: one line either way
        why = "the Hugging Face Hub is not reachable (offline)" if offline else f"{type(exc).__name__}: " \
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        name = "calib_data (default " + spec + ")" if default else f"calib_data={spec!r}"
        raise SparsityArgumentError(f"sparse-hf: cannot load {name}: {why}{hint}") from None
    texts = [_jsonl_text(row) for row in ds]
    # wikitext keeps one line per row, documents separated by blank rows: regroup consecutive non-empty rows
    # into documents. A text-only dataset without blank rows holds one document per row: keep it as is.
    text_only = all(isinstance(row, dict) and set(row) == {"text"} for row in ds.select(range(min(8, len(ds)))))
    if texts and text_only and any(not t.strip() for t in texts):
        docs, current = [], []
        for t in texts:
            if t.strip():
                current.append(t)
            elif current:
                docs.append("".join(current).strip())
                current = []
        if current:
            docs.append("".join(current).strip())
        texts = docs
    return [t for t in texts if t.strip()]


def load_texts(calib_data: str | None) -> tuple[list[str], dict]:
    """Read calibration documents; return (texts, identity {"source", "sha256"}).

    `calib_data` is a local `.txt` file (paragraphs split on blank lines), a `.jsonl` file (field "text",
    else "question" + "answer", else all string fields joined), or `hf:dataset/config:split`.
    None means wikitext-2-raw-v1 train from the Hub; offline that raises one `SparsityArgumentError` line.
    """
    if calib_data is None:
        texts = _load_hf(DEFAULT_DATASET, default=True)
        source = DEFAULT_DATASET
    elif calib_data.startswith("hf:"):
        texts = _load_hf(calib_data, default=False)
        source = calib_data
    else:
        path = local_calib_path(calib_data)
        texts = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_txt(path)
        source = str(path.resolve())
    if not texts:
        raise SparsityArgumentError(f"sparse-hf: invalid calib_data={calib_data!r}: it contains no text")
    return texts, {"source": source, "sha256": texts_sha256(texts), "documents": len(texts)}


def _token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents tokenized (no special tokens) and joined with EOS between them."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in encoded:
        ids.extend(doc)
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer: Any, texts: list[str], num_tokens: int, seqlen: int, seed: int,
                        heldout_tokens: int = 0) -> tuple[torch.LongTensor, torch.LongTensor | None]:
    """Cut the text into windows: ([num_tokens // seqlen, seqlen] calibration, disjoint held-out or None).

    Windows are non-overlapping slices of the concatenated token stream, shuffled with `seed`; the first
    ones calibrate, the next `heldout_tokens // seqlen` are held out.
    """
    if seqlen < 1:
        raise SparsityArgumentError(f"sparse-hf: invalid calib_seqlen={seqlen!r}: expected a positive integer")
    n_calib, n_held = num_tokens // seqlen, heldout_tokens // seqlen
    if n_calib < 1:
        raise SparsityArgumentError(
            f"sparse-hf: invalid calib_tokens={num_tokens}: must be at least calib_seqlen={seqlen}"
        )
    stream = _token_stream(tokenizer, texts)
    n_windows = stream.numel() // seqlen
    if n_windows < n_calib + n_held:
        raise SparsityArgumentError(
            f"sparse-hf: calib_data has {stream.numel()} tokens ({n_windows} windows of {seqlen}), "
            f"need {(n_calib + n_held) * seqlen} for calib_tokens={num_tokens}"
            + (f" plus {n_held * seqlen} held out" if n_held else "")
            + ": pass more text or lower calib_tokens"
        )
    windows = stream[: n_windows * seqlen].view(n_windows, seqlen)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(int(seed)))
    calib = windows[order[:n_calib]].clone()
    held = windows[order[n_calib:n_calib + n_held]].clone() if n_held else None
    return calib, held


SHIPPED_EXCERPT = "calib_gsm8k_excerpt.jsonl"


def shipped_excerpt_path() -> Path:
    """The GSM8K excerpt the shipped SmolLM2 thresholds were calibrated on (repo or installed copy).

    Passing it as calib_data (with calib_tokens=4096) makes `ppl_p=1|5|10` on SmolLM2 hit the shipped files.
    """
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "thresholds" / SHIPPED_EXCERPT, here / "data" / "thresholds" / SHIPPED_EXCERPT):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"lm-sparse: {SHIPPED_EXCERPT} is missing from thresholds/ and lm_sparse/data/thresholds/")
