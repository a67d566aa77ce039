"""Sparsity arguments of `sparse-hf`: parsing and validation, done before any weight is loaded.

lm-eval hands `--model_args` values over as strings, ints, floats or bools depending on how they were
written (`ppl_p=1` arrives as the int 1, `topk=0.5` as a float, `recalibrate=true` as a bool or a string),
so every field is coerced here and every error is one `SparsityArgumentError` line that names the argument
and what it accepts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class SparsityArgumentError(ValueError):
    """A sparsity argument is missing, unknown, out of range, or combined with a conflicting one."""


# Rules that pick the sparsity level themselves; at most one may be given per run.
RULE_ARGS = ("topk", "fat", "ppl_p", "teal")
METHODS = ("pplp", "teal")
TEAL_MODES = ("greedy", "uniform")
PREFILL_POLICIES = ("all", "last_half", "none")
KERNEL_MODES = ("auto", "on", "off")

# Every argument sparse-hf takes on top of HFLM's, with a one-line description for errors and the README.
SPARSITY_ARGS: dict[str, str] = {
    "topk": "fraction of FFN intermediate neurons kept per token, in (0, 1]",
    "fat": "FAT-epsilon: zero FFN intermediate entries with |value| <= EPS, EPS >= 0",
    "ppl_p": "calibrate for a perplexity rise of P percent, P > 0",
    "method": f"calibrated method used with ppl_p, one of {'|'.join(METHODS)} (default pplp)",
    "teal": "TEAL target model-wide sparsity, in [0, 1)",
    "teal_mode": f"TEAL allocation, one of {'|'.join(TEAL_MODES)} (default greedy)",
    "teal_greedy_steps": "TEAL greedy moves from 0 to 0.9 sparsity per layer, a positive integer",
    "teal_greedy_tokens": "tokens each TEAL greedy block search runs on (rounded up to whole windows), "
                          "a positive integer",
    "sparse_prefill": f"which tokens of a multi-token forward are sparsified: {'|'.join(PREFILL_POLICIES)}",
    "calib_data": "calibration text: a local .txt/.jsonl file or hf:dataset/config:split",
    "calib_tokens": "number of calibration tokens, a positive integer",
    "calib_seqlen": "calibration sequence length in tokens, a positive integer",
    "calib_seed": "seed for sampling calibration text, an integer in [0, 2**63)",
    "thresholds": "path of a calibrated thresholds file to load (skips calibration)",
    "recalibrate": "true to ignore cached thresholds and calibrate again",
    "sparse_kernels": f"sparse decode kernels: {'|'.join(KERNEL_MODES)} (auto: on CUDA when available)",
}


# Arguments that only apply to calibrated rules (ppl_p=P or teal=S).
CALIBRATION_ARGS = ("calib_data", "calib_tokens", "calib_seqlen", "calib_seed", "thresholds", "recalibrate")
CALIB_SUFFIXES = (".jsonl", ".txt", ".text", ".md")


def local_calib_path(calib_data: str) -> Path | None:
    """The local file `calib_data` names (None for `hf:` specs); one error line if it is missing or not text."""
    if calib_data.startswith("hf:"):
        return None
    path = Path(calib_data).expanduser()
    if not path.is_file():
        raise SparsityArgumentError(
            f"sparse-hf: invalid calib_data={calib_data!r}: no such file "
            "(expected a local .txt/.jsonl file or hf:dataset/config:split)"
        )
    if path.suffix.lower() not in CALIB_SUFFIXES:
        raise SparsityArgumentError(
            f"sparse-hf: invalid calib_data={calib_data!r}: expected a .txt or .jsonl file "
            "or hf:dataset/config:split"
        )
    return path


def _err(name: str, value: Any) -> SparsityArgumentError:
    return SparsityArgumentError(f"sparse-hf: invalid {name}={value!r}: expected {SPARSITY_ARGS[name]}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _err(name, value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _err(name, value) from None
    if not math.isfinite(out):
        raise _err(name, value)
    return out


def _as_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise _err(name, value)
    out = value if isinstance(value, int) else None
    if isinstance(value, str):
        try:
            out = int(value.strip())  # exactly: through a float, integers above 2**53 would change
        except ValueError:
            pass
    if out is None:
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise _err(name, value) from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise _err(name, value)
        out = int(as_float)
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        # lm_eval's CLI hands `-5` over as -5.0: echo the integer the user wrote
        raise _err(name, out)
    return out


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise SparsityArgumentError(f"sparse-hf: invalid {name}={value!r}: expected true or false")


def _as_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise _err(name, value)
    return text


@dataclass(frozen=True)
class SparsityConfig:
    """The validated sparsity settings of one `sparse-hf` model."""

    rule: str = "dense"  # dense | topk | fat | pplp | teal
    level: float | None = None  # topk fraction, fat epsilon, ppl_p percent or teal sparsity
    method: str | None = None  # for ppl_p: which calibrated method picks the level
    teal_mode: str = "greedy"
    sparse_prefill: str = "all"
    calib_data: str | None = None
    calib_tokens: int | None = None
    calib_seqlen: int | None = None
    calib_seed: int = 0
    thresholds: str | None = None
    recalibrate: bool = False
    sparse_kernels: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_dense(self) -> bool:
        return self.rule == "dense"

    @property
    def needs_calibration(self) -> bool:
        return self.rule in ("pplp", "teal")

    def params(self) -> dict[str, Any]:
        """The arguments that apply to this rule, for the results file: calibration settings only for
        calibrated rules, `teal_mode` only for TEAL, nothing unset."""
        skip = {"extra"}
        if not self.needs_calibration:
            skip.update(CALIBRATION_ARGS)
        if self.rule != "teal":
            skip.add("teal_mode")
        return {k: v for k, v in asdict(self).items() if k not in skip and v is not None}


def split_sparsity_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `kwargs` into (sparsity arguments, everything else for HFLM)."""
    sparse = {k: kwargs[k] for k in kwargs if k in SPARSITY_ARGS}
    rest = {k: v for k, v in kwargs.items() if k not in SPARSITY_ARGS}
    return sparse, rest


def parse_sparsity_args(args: dict[str, Any]) -> SparsityConfig:
    """Validate sparse-hf's own arguments and return a `SparsityConfig`.

    Raises `SparsityArgumentError` (one line, naming the argument) on any bad value or combination.
    """
    unknown = sorted(set(args) - set(SPARSITY_ARGS))
    if unknown:
        raise SparsityArgumentError(
            f"sparse-hf: unknown sparsity argument {unknown[0]!r}; allowed: {', '.join(SPARSITY_ARGS)}"
        )
    given = [k for k in RULE_ARGS if args.get(k) is not None]
    if len(given) > 1:
        raise SparsityArgumentError(
            f"sparse-hf: give at most one of {', '.join(RULE_ARGS)}; got {' and '.join(given)}"
        )
    values: dict[str, Any] = {}
    rule = given[0] if given else None
    if rule == "topk":
        level = _as_float("topk", args["topk"])
        if not 0.0 < level <= 1.0:
            raise _err("topk", args["topk"])
        values.update(rule="topk", level=level)
    elif rule == "fat":
        level = _as_float("fat", args["fat"])
        if level < 0.0:
            raise _err("fat", args["fat"])
        values.update(rule="fat", level=level)
    elif rule == "ppl_p":
        level = _as_float("ppl_p", args["ppl_p"])
        if level <= 0.0:
            raise _err("ppl_p", args["ppl_p"])
        method = _as_choice("method", args.get("method", "pplp"), METHODS)
        values.update(rule=method, level=level, method=method)
    elif rule == "teal":
        level = _as_float("teal", args["teal"])
        if not 0.0 <= level < 1.0:
            raise _err("teal", args["teal"])
        values.update(rule="teal", level=level)
    if "method" in args and rule != "ppl_p":
        raise SparsityArgumentError("sparse-hf: method= only applies together with ppl_p=P")
    if "teal_mode" in args:
        values["teal_mode"] = _as_choice("teal_mode", args["teal_mode"], TEAL_MODES)
        if values.get("rule") != "teal":
            raise SparsityArgumentError("sparse-hf: teal_mode= only applies to TEAL (teal=S or method=teal)")
    if "sparse_prefill" in args:
        values["sparse_prefill"] = _as_choice("sparse_prefill", args["sparse_prefill"], PREFILL_POLICIES)
    if "sparse_kernels" in args:
        values["sparse_kernels"] = _as_choice("sparse_kernels", args["sparse_kernels"], KERNEL_MODES)
        if values["sparse_kernels"] == "on" and values.get("rule", "dense") == "dense":
            raise SparsityArgumentError(
                "sparse-hf: sparse_kernels=on needs a sparsity rule (topk=K, fat=E, ppl_p=P or teal=S): "
                "dense runs have no sparse kernel; use sparse_kernels=auto or off")
    for name in ("calib_tokens", "calib_seqlen"):
        if args.get(name) is not None:
            values[name] = _as_int(name, args[name], minimum=1)
    extra = {}
    for name in ("teal_greedy_steps", "teal_greedy_tokens"):
        if args.get(name) is not None:
            if values.get("rule") != "teal":
                raise SparsityArgumentError(f"sparse-hf: {name}= only applies to TEAL (teal=S or method=teal)")
            extra[name] = _as_int(name, args[name], minimum=1)
    if extra:
        values["extra"] = extra
    if args.get("calib_seed") is not None:
        values["calib_seed"] = _as_int("calib_seed", args["calib_seed"], minimum=0, maximum=2**63 - 1)
    for name in ("calib_data", "thresholds"):
        if args.get(name) is not None:
            text = str(args[name]).strip()
            if not text:
                raise _err(name, args[name])
            values[name] = text
    if "recalibrate" in args:
        values["recalibrate"] = _as_bool("recalibrate", args["recalibrate"])
    if values.get("thresholds") is not None:
        if values.get("recalibrate"):
            raise SparsityArgumentError("sparse-hf: recalibrate=true and thresholds=FILE contradict each other "
                                        "(a given file is used as it is): drop one of them")
        if not Path(values["thresholds"]).expanduser().is_file():
            raise SparsityArgumentError(f"sparse-hf: invalid thresholds={values['thresholds']!r}: no such file")
    if values.get("calib_data") is not None:
        local_calib_path(values["calib_data"])  # a missing file fails here, before the weights load
    calib_only = [k for k in CALIBRATION_ARGS if k in args]
    if calib_only and values.get("rule") not in ("pplp", "teal"):
        raise SparsityArgumentError(
            f"sparse-hf: {calib_only[0]}= only applies to calibrated rules (ppl_p=P or teal=S)"
        )
    return SparsityConfig(**values)
