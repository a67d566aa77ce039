"""What identifies a model for the threshold cache: its weights, its config, its tokenizer, its adapters.

A calibration depends on all four, so the cache key holds a fingerprint of each (`model_identity`):
- weights: a Hub id + commit, else the sha256 of the local weight files (the one `gguf_file` when given),
  else a fingerprint of the parameters in memory;
- config: the config file of a local checkpoint (or the in-memory config), without fields that describe
  rather than define the model (`transformers_version`, `_name_or_path`, ...);
- tokenizer: its vocabulary, special tokens and the ids of a fixed probe text (BOS handling included);
- `peft=`, `delta=` and `subfolder=` of lm-eval's HFLM, the keywords it passes on to `from_pretrained`
  (config overrides such as `rms_norm_eps=`), and a quantization config.
Full file hashes are remembered in `<cache_root()>/file_hashes.json` by (real path, size, mtime, ctime, inode),
so a 16 GB checkpoint is read once, not on every load. The change time (ctime) catches an edit whose mtime was
put back (`cp -p`, `rsync -t`, `touch -d`): no user call can set it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .models import cache_root, env_flag_set, file_sha256
from .thresholds import atomic_write, canonical_json

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
CONFIG_FILES = ("config.json",)  # plus top-level *.py: remote code defines the computation too
# config entries that describe the checkpoint or the runtime, not what the model computes
DESCRIPTIVE_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash", "architectures", "dtype",
    "torch_dtype", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "_attn_implementation_autoset", "_attn_implementation",
})
PROGRESS_BYTES = 1 << 30  # show a progress bar when at least this much has to be hashed
EXACT_PARAMS_LIMIT = 1 << 30  # in-memory models up to this size are hashed byte for byte
_SAMPLE = 1 << 16  # values per tensor hashed exactly when an in-memory model is fingerprinted
_CHUNK = 1 << 24
_TOKENIZER_PROBE = "lm-sparse probe: The 3 quick brown foxes jumped 12.5% higher, didn't they?\n  Yes!"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- files ---------------------------------------------------------------------------------------------
def _memo_path() -> Path:
    return cache_root() / "file_hashes.json"


def _read_memo() -> dict:
    try:
        memo = json.loads(_memo_path().read_text(encoding="utf-8"))
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(memo: dict) -> None:
    """Best effort and atomic: a lost update (two processes at once) only means hashing a file again."""
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(canonical_json(memo), encoding="utf-8"))
    except OSError as exc:
        logger.debug("lm-sparse: could not remember file hashes: %s", exc)


def file_digests(files: list[Path]) -> list[str]:
    """Full sha256 of each file. A file whose (real path, size, mtime, ctime, inode) is unchanged since it was
    last hashed is not read again."""
    from tqdm.auto import tqdm

    memo = _read_memo()
    stamps = {}
    todo = []
    for f in files:
        st = f.stat()
        stamps[f] = (str(f.resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        real, stamp = stamps[f]
        if (memo.get(real) or {}).get("stamp") != stamp:
            todo.append(f)
    if todo:
        total = sum(f.stat().st_size for f in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc="lm-sparse: hashing weights (once)",
                  disable=total < PROGRESS_BYTES) as bar:
            for f in todo:
                real, stamp = stamps[f]
                memo[real] = {"stamp": stamp, "sha256": file_sha256(f, 8 << 20, on_block=bar.update)}
        _write_memo(memo)
    return [memo[stamps[f][0]]["sha256"] for f in files]


def hash_files(files: list[Path]) -> str:
    """One sha256 over the names, sizes and full contents (via `file_digests`) of `files`."""
    lines = [f"{f.name}\0{f.stat().st_size}\0{digest}" for f, digest in zip(files, file_digests(files))]
    return _sha256_text("\n".join(lines))


def weight_files(directory: Path, gguf_file: str | None = None) -> list[Path]:
    """The checkpoint files of a local model directory; only `gguf_file` when one is named."""
    if gguf_file:
        path = directory / gguf_file
        return [path] if path.is_file() else []
    return sorted(f for f in directory.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def config_digest(directory: Path) -> str | None:
    """sha256 of a local checkpoint's config.json (descriptive entries dropped), a PEFT adapter's
    adapter_config.json (LoRA's scaling lives there) and its remote-code files."""
    parts = []
    adapter = directory / "adapter_config.json"
    if adapter.is_file():
        parts.append(f"adapter_config.json\0{adapter.read_text(encoding='utf-8', errors='replace')}")
    config = directory / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except ValueError:
            data = config.read_text(encoding="utf-8", errors="replace")
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in DESCRIPTIVE_CONFIG_KEYS}
        parts.append(canonical_json(data))
    parts += [f"{f.name}\0{f.read_text(encoding='utf-8', errors='replace')}" for f in sorted(directory.glob("*.py"))]
    return _sha256_text("\n".join(parts)) if parts else None


def in_memory_config_digest(config: Any) -> str | None:
    """sha256 of a transformers config object's non-default, non-descriptive entries."""
    if config is None or not hasattr(config, "to_diff_dict"):
        return None
    data = {k: v for k, v in config.to_diff_dict().items() if k not in DESCRIPTIVE_CONFIG_KEYS}
    return _sha256_text(canonical_json(data))


# -- parameters in memory ------------------------------------------------------------------------------
def _tensor_fingerprint(t: torch.Tensor, exact: bool) -> bytes:
    flat = t.detach().reshape(-1)
    if exact or flat.numel() <= 2 * _SAMPLE:
        return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()
    # A strided sample across the whole tensor, plus float64 moments of every value (computed on the
    # tensor's device, in chunks): any change that touches many values moves the moments.
    step = flat.numel() // _SAMPLE
    sample = flat[::step][:_SAMPLE].cpu().contiguous().view(torch.uint8).numpy().tobytes()
    moments = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK].to(torch.float64)
        index = torch.arange(start, start + chunk.numel(), device=flat.device, dtype=torch.float64)
        moments += torch.stack([chunk.sum(), (chunk * chunk).sum(), (chunk * index).sum()])
    # rounded, so the same values give the same text on CPU and GPU (summation order differs)
    return sample + " ".join(f"{m:.9e}" for m in moments.tolist()).encode()


def hash_parameters(model: torch.nn.Module) -> tuple[str, str]:
    """sha256 of the state dict in memory: every byte up to 1 GiB, above it a strided sample and the
    float64 moments of each tensor. Returns (digest, hash_mode)."""
    h = hashlib.sha256()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    exact = total <= EXACT_PARAMS_LIMIT
    for name, p in model.state_dict().items():
        h.update(f"{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
        h.update(_tensor_fingerprint(p, exact))
    return h.hexdigest(), ("full" if exact else "names+shapes+strided samples+float64 moments")


# -- hub ---------------------------------------------------------------------------------------------------
def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of `repo_id@revision`: from the local HF cache first (no network), else the Hub (5 s)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True)
        return Path(snapshot).name
    except Exception:
        pass
    if env_flag_set("HF_HUB_OFFLINE"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=5).sha
    except Exception:
        return None


def source_identity(name: Any, revision: str | None = None, gguf_file: str | None = None) -> dict | None:
    """Identity of a checkpoint named by a local path or a Hub id: file hashes, else the Hub commit."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        directory = path.resolve()
        out: dict[str, Any] = {"source": str(directory)}
        files = weight_files(directory, gguf_file)
        if files:
            out["weights_sha256"] = hash_files(files)
            out["hash_mode"] = "full"
        config = config_digest(directory)
        if config is not None:
            out["config_sha256"] = config
        return out if "weights_sha256" in out else None
    if path.is_file():
        return {"source": str(path.resolve()), "weights_sha256": hash_files([path]), "hash_mode": "full"}
    commit = hub_commit(str(name), revision)
    if commit is None:
        return None
    # One Hub repository often holds several GGUF files (Q4_K_M, Q8_0, ...) of one config and tokenizer.
    return {"hub_id": str(name), "commit": commit, **({"gguf_file": str(gguf_file)} if gguf_file else {})}


# -- tokenizer ---------------------------------------------------------------------------------------------
def tokenizer_digest(tokenizer: Any) -> str | None:
    """sha256 of what turns calibration text into ids: vocabulary, special tokens, the ids of a probe text."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    try:
        vocab = sorted(tokenizer.get_vocab().items())
        probe = list(tokenizer(_TOKENIZER_PROBE)["input_ids"])
        special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    except Exception as exc:  # an exotic tokenizer: the model's other fields still key the cache
        logger.debug("lm-sparse: tokenizer not fingerprinted: %s", exc)
        return None
    return _sha256_text(canonical_json([vocab, special, probe]))


# -- the model ---------------------------------------------------------------------------------------------
def _num_layers(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def _quantization(config: Any) -> Any:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    return quant.to_dict() if hasattr(quant, "to_dict") else quant


def model_identity(model: torch.nn.Module, pretrained: Any = None, revision: str | None = None, *,
                   tokenizer: Any = None, gguf_file: str | None = None, peft: Any = None,
                   delta: Any = None, subfolder: str | None = None, load_kwargs: dict | None = None) -> dict:
    """Everything about the model that changes a calibration (the cache key's `model` field).

    Never blocks offline: a Hub commit comes from the local HF cache, the Hub is asked only when
    HF_HUB_OFFLINE is not set (5 s timeout). `source` entries (local paths) are not part of the key.
    """
    config = getattr(model, "config", None)
    if subfolder and isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).expanduser().is_dir():
        pretrained = Path(pretrained).expanduser() / subfolder
    out: dict[str, Any] = dict(source_identity(pretrained, revision, gguf_file) or {})
    if subfolder and "commit" in out:
        out["subfolder"] = subfolder
    if not out:
        out["params_sha256"], out["hash_mode"] = hash_parameters(model)
        if pretrained is not None and not isinstance(pretrained, torch.nn.Module):
            out["source"] = str(pretrained)
    if "commit" not in out and "config_sha256" not in out:
        out["config_sha256"] = in_memory_config_digest(config)
    for name, value in (("peft", peft), ("delta", delta)):
        if value:
            out[name] = source_identity(value, revision) or {"name": str(value)}
    if load_kwargs:  # from_pretrained keywords (config overrides such as rms_norm_eps=, attn_implementation=)
        out["load_kwargs"] = {k: str(v) for k, v in sorted(load_kwargs.items())}
    quant = _quantization(config)
    if quant is not None:
        out["quantization"] = quant
    out["tokenizer_sha256"] = tokenizer_digest(tokenizer)
    dtype = next(model.parameters()).dtype
    out.update(model_type=getattr(config, "model_type", None), num_layers=_num_layers(model),
               dtype=str(dtype).replace("torch.", ""))
    return out


def lm_model_identity(model: torch.nn.Module, lm: Any = None, tokenizer: Any = None) -> dict:
    """`model_identity` of a model an lm-eval LM loaded (its `pretrained`, `revision`, `peft`, `delta`,
    `gguf_file`, `subfolder`, `load_kwargs`); without one, the name transformers recorded in the model's
    config. Every method keys a model this same way."""
    pretrained = getattr(lm, "pretrained", None)
    if pretrained is None:
        pretrained = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return model_identity(model, pretrained, getattr(lm, "revision", None), tokenizer=tokenizer,
                          gguf_file=getattr(lm, "gguf_file", None), peft=getattr(lm, "peft", None),
                          delta=getattr(lm, "delta", None), subfolder=getattr(lm, "subfolder", None),
                          load_kwargs=getattr(lm, "load_kwargs", None))
