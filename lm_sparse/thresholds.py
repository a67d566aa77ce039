"""The threshold cache shared by PPL-p% and TEAL: one JSON + safetensors pair per calibration.

A calibration is identified by a key, the sha256 of the canonical JSON of everything that determines its
result (the model's identity from `identity.model_identity`: weights, config, tokenizer, adapters, dtype;
method and parameters, data identity, token count, sequence length, seed, format version, lm-sparse
version). Fields named `source` say where something was read from and are kept in the file but left out
of the key: the same weights or the same text at another path hit the same entry.

Files: `<method>-<key[:16]>.json` (human-readable: key fields, measured results, sha256 of the tensors)
and `<method>-<key[:16]>.safetensors` (the threshold vectors). Lookup order in `load_or_compute`:
an explicit `path` (thresholds=FILE), the shipped files (repo `thresholds/`, installed
`lm_sparse/data/thresholds`), then the user cache `<cache_root()>/thresholds`. A file that is corrupt,
truncated, tampered with, from another model or another format version is never used: one warning line,
then the calibration runs again. Writes are atomic (temp file + os.replace, the JSON last) and run under
a file lock, so a second process calibrating the same key waits and loads the first one's result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import SparsityArgumentError
from .models import cache_root, file_sha256

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_REPO_SHIPPED = Path(__file__).resolve().parent.parent / "thresholds"
_INSTALLED_SHIPPED = Path(__file__).resolve().parent / "data" / "thresholds"
SHIPPED_DIRS = (_REPO_SHIPPED, _INSTALLED_SHIPPED)


class ThresholdsFileError(ValueError):
    """A thresholds file is unreadable, inconsistent, or not for this model/method."""


def _strip_sources(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_sources(v) for k, v in value.items() if k != "source"}
    if isinstance(value, (list, tuple)):
        return [_strip_sources(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces (what the cache key and identity fingerprints hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass
class CacheKey:
    """Everything that determines a calibration's content (the cache key's fields)."""

    model: dict
    method: str
    params: dict
    data: dict
    calib_tokens: int
    seqlen: int
    seed: int
    format_version: int = FORMAT_VERSION
    lm_sparse_version: str = __version__
    extra: dict = field(default_factory=dict)

    def fields(self) -> dict:
        return asdict(self)


def cache_key(fields: dict) -> str:
    """sha256 of the canonical JSON of `fields`, without descriptive `source` entries."""
    return hashlib.sha256(canonical_json(_strip_sources(fields)).encode()).hexdigest()


# -- files ---------------------------------------------------------------------------------------------
def file_stem(method: str, key: str) -> str:
    return f"{method}-{key[:16]}"


def tensors_path(json_path: Path) -> Path:
    return Path(json_path).with_suffix(".safetensors")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Make `path` appear whole or not at all: `write(tmp)` fills a temp file beside it, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); the cache may be shared: the permissions of a plain new file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def copy_thresholds(src_json: str | Path, dst_json: str | Path) -> None:
    """Copy a thresholds file and its tensors to `dst_json` atomically (tensors first, JSON last); the JSON
    names its tensors file, so that name is rewritten. Nothing to do when both paths are the same file."""
    import shutil

    src_json, dst_json = Path(src_json).resolve(), Path(dst_json).resolve()
    if src_json == dst_json:
        return
    dst_json.parent.mkdir(parents=True, exist_ok=True)
    payload = json.loads(src_json.read_text(encoding="utf-8"))
    atomic_write(tensors_path(dst_json), lambda tmp: shutil.copyfile(tensors_path(src_json), tmp))
    payload["tensors"]["file"] = tensors_path(dst_json).name
    atomic_write(dst_json, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8"))


def write_thresholds(json_path: str | Path, fields: dict, results: dict,
                     tensors: dict[str, torch.Tensor]) -> dict:
    """Write `<json_path>` and its `.safetensors` atomically (tensors first, JSON last); return the payload."""
    from safetensors.torch import save_file

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    st_path = tensors_path(json_path)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(st_path, lambda tmp: save_file(clean, tmp, metadata={"format": "lm-sparse-thresholds"}))
    payload = {
        "format_version": FORMAT_VERSION,
        "lm_sparse_version": __version__,
        "method": fields.get("method"),
        "key": cache_key(fields),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fields": fields,
        "results": results,
        "tensors": {"file": st_path.name, "sha256": file_sha256(st_path), "names": sorted(clean)},
    }
    text = json.dumps(payload, indent=1, default=str) + "\n"

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(json_path, write_json)
    return payload


def read_thresholds(json_path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a thresholds file; raise `ThresholdsFileError` (one line) if it cannot be trusted."""
    from safetensors.torch import load_file

    json_path = Path(json_path)
    try:
        payload = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ThresholdsFileError(f"{json_path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise ThresholdsFileError(f"{json_path}: not a thresholds file")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ThresholdsFileError(f"{json_path}: format version {version!r}, expected {FORMAT_VERSION}")
    fields, tensors_info = payload.get("fields"), payload.get("tensors")
    if not isinstance(fields, dict) or not isinstance(tensors_info, dict):
        raise ThresholdsFileError(f"{json_path}: missing fields or tensors entries")
    if payload.get("key") != cache_key(fields):
        raise ThresholdsFileError(f"{json_path}: key does not match its fields (edited or tampered with)")
    st_path = json_path.parent / str(tensors_info.get("file", ""))
    if not st_path.is_file():
        raise ThresholdsFileError(f"{json_path}: tensors file {st_path.name} is missing")
    if file_sha256(st_path) != tensors_info.get("sha256"):
        raise ThresholdsFileError(f"{json_path}: tensors file {st_path.name} fails its sha256 check")
    try:
        tensors = load_file(str(st_path))
    except Exception as exc:
        raise ThresholdsFileError(f"{json_path}: tensors unreadable ({type(exc).__name__})") from None
    return payload, tensors


def _model_matches(stored: dict, current: dict) -> bool:
    return _strip_sources(stored) == _strip_sources(current)


# -- lookup --------------------------------------------------------------------------------------------
def _warn(message: str) -> None:
    # a log line, like lm-eval's own warnings: Python's warnings module would add a second line of source
    logger.warning(f"lm-sparse: {message}")


def _try_load(path: Path, key: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Load `path` if it is a valid file for `key`; warn in one line and return None otherwise."""
    try:
        payload, tensors = read_thresholds(path)
    except ThresholdsFileError as exc:
        _warn(f"ignoring thresholds file: {exc}; calibrating again")
        return None
    if payload["key"] != key:
        _warn(f"ignoring thresholds file {path}: made for another model or settings; calibrating again")
        return None
    return payload, tensors


def _find_shipped(key: str, shipped_dirs: tuple[Path, ...]) -> Path | None:
    for directory in shipped_dirs:
        if not directory.is_dir():
            continue
        for candidate in sorted(directory.glob("*.json")):
            try:
                if json.loads(candidate.read_text(encoding="utf-8")).get("key") == key:
                    return candidate
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
    return None


def _load_explicit(path: str | Path, fields: dict) -> tuple[dict, dict[str, torch.Tensor], str]:
    """thresholds=FILE: must be valid and for this model and method, else one clear error line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SparsityArgumentError(f"sparse-hf: invalid thresholds={str(path)!r}: no such file")
    try:
        payload, tensors = read_thresholds(path)
    except ThresholdsFileError as exc:
        raise SparsityArgumentError(f"sparse-hf: invalid thresholds={str(path)!r}: {exc}") from None
    stored = payload["fields"]
    stored_model, model = stored.get("model", {}), fields.get("model", {})
    if not _model_matches(stored_model, model) and _model_matches({**stored_model, "dtype": None},
                                                                 {**model, "dtype": None}):
        raise SparsityArgumentError(
            f"sparse-hf: thresholds={str(path)!r} was calibrated for this model in {stored_model.get('dtype')}, "
            f"not {model.get('dtype')} (activations, hence thresholds, depend on the dtype): load the model in "
            f"{stored_model.get('dtype')}, or drop thresholds= to calibrate")
    if not _model_matches(stored_model, model):
        raise SparsityArgumentError(
            f"sparse-hf: thresholds={str(path)!r} was calibrated for another model "
            f"({_describe_model(stored_model)}), not this one ({_describe_model(model)}); "
            f"they differ in {', '.join(_differing_keys(stored_model, model))}"
        )
    if stored.get("method") != fields.get("method"):
        raise SparsityArgumentError(
            f"sparse-hf: thresholds={str(path)!r} holds {stored.get('method')} thresholds, "
            f"not {fields.get('method')}"
        )
    # Only the method's settings are compared: the calibration text is not read for an explicit file (its
    # hash is unknown here), and its token counts (those derived from calib_tokens too) and seed are the
    # file's business.
    stored_params, params = _strip_sources(stored.get("params") or {}), _strip_sources(fields.get("params") or {})
    differing = [k for k in _differing_keys(stored_params, params) if not k.endswith(("_tokens", "_seqlen"))]
    if "ppl_p" in differing:  # the level itself: the report would label the file's thresholds with another p
        raise SparsityArgumentError(
            f"sparse-hf: thresholds={str(path)!r} was calibrated for ppl_p={stored_params.get('ppl_p')!r}, not "
            f"ppl_p={params.get('ppl_p')!r}: pass ppl_p={stored_params.get('ppl_p')!r} with this file, or drop "
            "thresholds= to calibrate")
    if differing:
        logger.warning("lm-sparse: thresholds=%s was calibrated with other settings (%s); using the file as given",
                       path, ", ".join(f"{k}={stored_params.get(k)!r}, not {params.get(k)!r}" for k in differing))
    return payload, tensors, str(path)


def _differing_keys(a: dict, b: dict) -> list[str]:
    """Sorted keys whose values differ between `a` and `b` (`source` entries aside)."""
    a, b = _strip_sources(a), _strip_sources(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _describe_model(model: dict) -> str:
    ident = model.get("hub_id") or model.get("weights_sha256") or model.get("params_sha256") or "?"
    return f"{model.get('model_type')} {str(ident)[:16]} {model.get('dtype')}"


def cache_dir() -> Path:
    """The user cache directory of thresholds files."""
    return cache_root() / "thresholds"


def _wait_for_everyone(rank_context: Any) -> None:
    accelerator = getattr(rank_context, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "wait_for_everyone"):
        accelerator.wait_for_everyone()
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _cache_target(fields: dict, key: str) -> Path:
    return cache_dir() / f"{file_stem(str(fields.get('method')), key)}.json"


def _load_shipped(key: str, shipped_dirs: tuple[Path, ...]) -> tuple[dict, dict[str, torch.Tensor], str] | None:
    shipped = _find_shipped(key, shipped_dirs)
    loaded = _try_load(shipped, key) if shipped is not None else None
    return (loaded[0], loaded[1], str(shipped)) if loaded is not None else None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load_cached(target: Path, key: str) -> tuple[dict, dict[str, torch.Tensor], str] | None:
    loaded = _try_load(target, key) if target.is_file() else None
    return (loaded[0], loaded[1], str(target)) if loaded is not None else None


def _lookup_or_compute(fields: dict, key: str, compute: Callable, recalibrate: bool,
                       shipped_dirs: tuple[Path, ...]) -> tuple[dict, dict[str, torch.Tensor], str]:
    target = _cache_target(fields, key)
    seen = _stamp(target)
    if not recalibrate:
        # Files are written atomically, so a valid one is read without the lock (a read-only cache works).
        found = _load_shipped(key, shipped_dirs) or _load_cached(target, key)
        if found is not None:
            return found
    from filelock import FileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        lock.acquire()
    except OSError as exc:
        logger.warning("lm-sparse: the threshold cache %s is not writable (%s): calibrating without saving "
                       "(set LM_SPARSE_CACHE to a writable directory to keep the result)", target.parent, exc)
        results, tensors = compute()
        payload = {"format_version": FORMAT_VERSION, "lm_sparse_version": __version__, "method": fields.get("method"),
                   "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fields": fields,
                   "results": results, "tensors": {"file": None, "names": sorted(tensors)}}
        return payload, {k: v.detach().cpu() for k, v in tensors.items()}, "(not saved: cache not writable)"
    try:
        # Checked again under the lock where the file changed: a process that waited here loads what the first
        # one wrote (an unchanged bad file was already warned about).
        found = None if recalibrate or _stamp(target) == seen else _load_cached(target, key)
        if found is not None:
            return found
        results, tensors = compute()
        payload = write_thresholds(target, fields, results, tensors)
        return payload, {k: v.detach().cpu() for k, v in tensors.items()}, str(target)
    finally:
        lock.release()


def _as_dirs(shipped_dir: Path | tuple[Path, ...] | None) -> tuple[Path, ...]:
    if shipped_dir is None:
        return SHIPPED_DIRS
    return (Path(shipped_dir),) if isinstance(shipped_dir, (str, Path)) else tuple(Path(d) for d in shipped_dir)


def find_existing(fields: dict, shipped_dir: Path | tuple[Path, ...] | None = None
                  ) -> tuple[dict, dict[str, torch.Tensor], str] | None:
    """A valid shipped or cached file for `fields` (as `load_or_compute` finds it), or None: never
    calibrates, never waits for other ranks."""
    key = cache_key(fields)
    return _load_shipped(key, _as_dirs(shipped_dir)) or _load_cached(_cache_target(fields, key), key)


def load_or_compute(fields: dict, compute: Callable[[], tuple[dict, dict[str, torch.Tensor]]], *,
                    path: str | None = None, recalibrate: bool = False, rank_context: Any = None,
                    shipped_dir: Path | tuple[Path, ...] | None = None
                    ) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Return (payload, tensors, file path) for `fields`: load a valid file or run `compute` and store it.

    `compute()` returns (results: JSON-able measured values, tensors: {name: tensor}); the payload is the
    stored JSON: {format_version, lm_sparse_version, method, key, created, fields, results, tensors}.
    Under data parallelism (`rank_context.world_size > 1`), rank 0 looks up or computes while the other
    ranks wait at a barrier and then load rank 0's file.
    """
    if path is not None:
        return _load_explicit(path, fields)
    shipped_dirs = _as_dirs(shipped_dir)
    key = cache_key(fields)
    world = int(getattr(rank_context, "world_size", 1) or 1)
    if world <= 1:
        return _lookup_or_compute(fields, key, compute, recalibrate, shipped_dirs)
    rank = int(getattr(rank_context, "rank", 0) or 0)
    if rank == 0:
        result = _lookup_or_compute(fields, key, compute, recalibrate, shipped_dirs)
        _wait_for_everyone(rank_context)
        return result
    _wait_for_everyone(rank_context)
    # The cache first: after recalibrate=True it holds rank 0's new file, which a shipped one must not shadow.
    found = _load_cached(_cache_target(fields, key), key) or _load_shipped(key, shipped_dirs)
    if found is not None:
        return found
    raise RuntimeError(f"lm-sparse: rank {rank} found no thresholds file for key {key[:16]} after rank 0's calibration")
