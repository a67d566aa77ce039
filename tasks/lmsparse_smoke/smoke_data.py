"""Loaders for lm-sparse's offline smoke tasks.

The data files sit next to this module; loading them through `custom_dataset: !function` makes the tasks
work from any working directory and from the installed package (lm-eval resolves `data_files` against the
current directory, not against the YAML's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def _read_jsonl(name: str) -> list[dict[str, Any]]:
    with open(HERE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _as_test_split(rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**_: Any) -> datasets.DatasetDict:
    """Multiple-choice knowledge items: question, four choices, index of the right one."""
    return _as_test_split(_read_jsonl("mc.jsonl"))


def load_gen(**_: Any) -> datasets.DatasetDict:
    """Short-answer questions scored by exact match."""
    return _as_test_split(_read_jsonl("gen.jsonl"))


def load_ppl(**_: Any) -> datasets.DatasetDict:
    """The perplexity text, one document per paragraph."""
    text = (HERE / "ppl.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return _as_test_split([{"text": p} for p in paragraphs])
