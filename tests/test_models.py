"""The converted default model has reproducible bytes, so the threshold cache (keyed by file hashes) hits."""

from __future__ import annotations

import hashlib

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
