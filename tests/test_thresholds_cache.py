"""The threshold cache: keys, identities, round trip, rejection of bad files, locking, ranks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lm_sparse import thresholds as th
from lm_sparse.config import SparsityArgumentError



def _fields(model_hash: str = "aaa", **extra) -> dict:
    key = th.CacheKey(model={"weights_sha256": model_hash, "model_type": "llama", "num_layers": 2, "dtype": "float32",
                             "source": "/somewhere"},
                      method="pplp", params={"ppl_p": 1.0}, data={"source": "/x.jsonl", "sha256": "d"},
                      calib_tokens=64, seqlen=16, seed=0, extra=extra)
    return key.fields()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_SPARSE_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    return shipped


def _compute_factory(calls: list, value: float = 1.5):
    def compute():
        calls.append(1)
        return {"cett": 0.1}, {"layer0.down": torch.full((8,), value)}
    return compute


def test_key_ignores_sources_and_tracks_content():
    a = _fields()
    b = _fields()
    b["model"]["source"] = "/elsewhere"
    b["data"]["source"] = "/copy.jsonl"
    assert th.cache_key(a) == th.cache_key(b)
    c = _fields()
    c["data"]["sha256"] = "e"
    assert th.cache_key(c) != th.cache_key(a)
    assert th.cache_key(_fields(seed=1)) != th.cache_key(a)
    assert len(th.cache_key(a)) == 64 and a["format_version"] == th.FORMAT_VERSION


def test_round_trip_and_shipped_lookup(cache):
    calls: list = []
    fields = _fields()
    payload, tensors, path = th.load_or_compute(fields, _compute_factory(calls), shipped_dir=cache)
    assert calls == [1] and Path(path).name == f"pplp-{th.cache_key(fields)[:16]}.json"
    assert Path(path).with_suffix(".safetensors").is_file() and not list(Path(path).parent.glob("*.tmp"))
    again, tensors2, path2 = th.load_or_compute(fields, _compute_factory(calls), shipped_dir=cache)
    assert calls == [1] and path2 == path and torch.equal(tensors2["layer0.down"], tensors["layer0.down"])
    assert again["results"] == {"cett": 0.1} and again["key"] == th.cache_key(fields)
    # a shipped copy under any name wins over the user cache
    th.write_thresholds(cache / "friendly-name.json", fields, {"cett": 0.2}, {"layer0.down": torch.zeros(8)})
    shipped, _, shipped_path = th.load_or_compute(fields, _compute_factory(calls), shipped_dir=cache)
    assert shipped_path.endswith("friendly-name.json") and shipped["results"]["cett"] == 0.2 and calls == [1]
    # recalibrate skips both
    th.load_or_compute(fields, _compute_factory(calls), shipped_dir=cache, recalibrate=True)
    assert calls == [1, 1]


@pytest.mark.parametrize("damage", ["tensors", "truncated", "fields", "version", "other_model"])
def test_bad_cache_files_warn_and_recompute(cache, damage, caplog):
    calls: list = []
    fields = _fields()
    _, _, path = th.load_or_compute(fields, _compute_factory(calls), shipped_dir=cache)
    path = Path(path)
    payload = json.loads(path.read_text())
    if damage == "tensors":
        data = bytearray(path.with_suffix(".safetensors").read_bytes())
        data[-1] ^= 0xFF
        path.with_suffix(".safetensors").write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    elif damage == "fields":
        payload["fields"]["params"]["ppl_p"] = 5.0
        path.write_text(json.dumps(payload))
    elif damage == "version":
        payload["format_version"] = 999
        path.write_text(json.dumps(payload))
    else:  # a consistent file of another model under this key's name
        th.write_thresholds(path, _fields("bbb"), {"cett": 9}, {"layer0.down": torch.ones(8)})
    with caplog.at_level(logging.WARNING, logger="lm_sparse.thresholds"):
        payload2, tensors, _ = th.load_or_compute(fields, _compute_factory(calls, 2.5), shipped_dir=cache)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("lm-sparse: ignoring thresholds file") and "\n" not in warned[0]
    assert calls == [1, 1] and float(tensors["layer0.down"][0]) == 2.5
    assert th.read_thresholds(path)[0]["key"] == th.cache_key(fields)


def test_unwritable_cache_is_read_and_calibrates_without_saving(cache, monkeypatch, caplog):
    """A cache that cannot take a lock file (read-only, shared): a valid file there is used, and a missing one is
    calibrated in memory with one warning line, not a traceback."""
    import filelock

    calls: list = []
    fields = _fields()
    _, _, path = th.load_or_compute(fields, _compute_factory(calls), shipped_dir=cache)

    class ReadOnlyLock:
        def __init__(self, name: str) -> None:
            pass

        def acquire(self):
            raise OSError(30, "Read-only file system")

    monkeypatch.setattr(filelock, "FileLock", ReadOnlyLock)
    _, tensors, found = th.load_or_compute(fields, _compute_factory(calls), shipped_dir=cache)
    assert found == path and calls == [1]
    with caplog.at_level(logging.WARNING, logger="lm_sparse.thresholds"):
        payload, tensors, where = th.load_or_compute(_fields("ccc"), _compute_factory(calls, 3.5), shipped_dir=cache)
    assert calls == [1, 1] and float(tensors["layer0.down"][0]) == 3.5 and payload["results"] == {"cett": 0.1}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "not writable" in warned[0] and "LM_SPARSE_CACHE" in warned[0]
    assert where.startswith("(not saved")


def test_explicit_thresholds_file(cache, tmp_path, caplog):
    fields = _fields()
    out = tmp_path / "mine.json"
    umask = os.umask(0o022)
    try:
        th.write_thresholds(out, fields, {"cett": 0.3}, {"layer0.down": torch.ones(8)})
    finally:
        os.umask(umask)
    # a plain file's permissions (a shared cache stays readable), not mkstemp's private 0600
    assert {oct(f.stat().st_mode & 0o777) for f in (out, out.with_suffix(".safetensors"))} == {"0o644"}
    payload, _, path = th.load_or_compute(fields, _compute_factory([]), path=str(out), shipped_dir=cache)
    assert path == str(out) and payload["results"]["cett"] == 0.3
    # the text of an explicit file is not read (its hash is unknown): only other method settings warn
    unread = {**fields, "data": {"source": "/x.jsonl", "sha256": None}, "calib_tokens": 999}
    with caplog.at_level(logging.WARNING, logger="lm_sparse.thresholds"):
        th.load_or_compute(unread, _compute_factory([]), path=str(out), shipped_dir=cache)
        assert not caplog.records
        th.load_or_compute({**unread, "params": {"ppl_p": 1.0, "steps": 3}}, _compute_factory([]), path=str(out),
                           shipped_dir=cache)
    assert [r.getMessage() for r in caplog.records] == [
        f"lm-sparse: thresholds={out} was calibrated with other settings (steps=None, not 3); using the file as given"]
    # another level is an error: the report would label the file's thresholds ppl_p=5
    with pytest.raises(SparsityArgumentError, match="calibrated for ppl_p=1.0, not ppl_p=5.0"):
        th.load_or_compute({**unread, "params": {"ppl_p": 5.0}}, _compute_factory([]), path=str(out),
                           shipped_dir=cache)
    with pytest.raises(SparsityArgumentError, match="another model"):
        th.load_or_compute(_fields("ccc"), _compute_factory([]), path=str(out), shipped_dir=cache)
    bf16 = {**fields, "model": {**fields["model"], "dtype": "bfloat16"}}
    with pytest.raises(SparsityArgumentError, match="for this model in float32, not bfloat16"):
        th.load_or_compute(bf16, _compute_factory([]), path=str(out), shipped_dir=cache)
    with pytest.raises(SparsityArgumentError, match="thresholds="):
        th.load_or_compute(fields, _compute_factory([]), path=str(tmp_path / "none.json"), shipped_dir=cache)
    out.with_suffix(".safetensors").write_bytes(b"garbage")
    with pytest.raises(SparsityArgumentError, match="sha256"):
        th.load_or_compute(fields, _compute_factory([]), path=str(out), shipped_dir=cache)


def test_two_concurrent_writers(cache, tmp_path):
    counter = tmp_path / "computed.txt"
    ready = tmp_path / "ready"
    ready.mkdir()
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        from lm_sparse import thresholds as th
        import json
        fields = json.loads({json.dumps(json.dumps(_fields()))})
        # Start together (imports can take longer than the 1.5 s compute): both reach the lock at once.
        open(os.path.join({str(ready)!r}, str(os.getpid())), "w").close()
        deadline = time.time() + 60
        while len(os.listdir({str(ready)!r})) < 2 and time.time() < deadline:
            time.sleep(0.01)
        def compute():
            with open({str(counter)!r}, "a") as f:
                f.write("x")
            time.sleep(1.5)
            return {{"cett": 0.1}}, {{"layer0.down": torch.arange(1000, dtype=torch.float32)}}
        payload, tensors, path = th.load_or_compute(fields, compute, shipped_dir={str(cache)!r})
        assert torch.equal(tensors["layer0.down"], torch.arange(1000, dtype=torch.float32))
        print(path)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert counter.read_text() == "x"  # the second process loaded the first one's file
    assert outs[0][0].strip() == outs[1][0].strip()
    th.read_thresholds(outs[0][0].strip())


def test_rank0_computes_others_wait_then_load(cache):
    events: list = []
    fields = _fields()

    class Accelerator:
        def wait_for_everyone(self):
            events.append("barrier")

    rank1 = SimpleNamespace(world_size=2, rank=1, accelerator=Accelerator())
    rank0 = SimpleNamespace(world_size=2, rank=0, accelerator=Accelerator())
    calls: list = []
    th.load_or_compute(fields, _compute_factory(calls), rank_context=rank0, shipped_dir=cache)
    assert calls == [1] and events == ["barrier"]
    _, tensors, _ = th.load_or_compute(fields, _compute_factory(calls), rank_context=rank1, shipped_dir=cache,
                                       recalibrate=True)
    assert calls == [1] and events == ["barrier", "barrier"] and float(tensors["layer0.down"][0]) == 1.5
