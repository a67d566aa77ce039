"""`lm-sparse calibrate`: calibrate thresholds into a file (and the cache) from the command line.

    lm-sparse calibrate --model smollm2 --ppl-p 1 --calib-data gsm8k.jsonl --out thresholds/p1.json

`--method pplp` (default) runs PPL-p% here; `--method teal` is handed to `lm_sparse.calibrate.teal`.
Arguments are declared in one table (`ARGUMENTS`) so a method adds its own with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# (flags, argparse keyword arguments); one line per argument
ARGUMENTS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--model",), dict(required=True, help="Hub id, local checkpoint directory, or smollm2")),
    (("--method",), dict(default="pplp", choices=["pplp", "teal"], help="calibrated method (default pplp)")),
    (("--ppl-p",), dict(type=float, help="target perplexity rise in percent, > 0")),
    (("--dtype",), dict(default="auto", help="torch dtype to load the model in (float32, bfloat16, auto)")),
    (("--device",), dict(default="cpu", help="cpu, cuda, cuda:0, ...")),
    (("--revision",), dict(default=None, help="Hub revision of --model")),
    (("--calib-data",), dict(default=None, help="local .txt/.jsonl file or hf:dataset/config:split")),
    (("--calib-tokens",), dict(type=int, default=None,
                                      help="calibration tokens (default: PPL-p%% 16384 CPU, 65536 CUDA; "
                                           "TEAL 8192 CPU, 65536 CUDA)")),
    (("--calib-seqlen",), dict(type=int, default=None, help="calibration window length (default 512)")),
    (("--calib-seed",), dict(type=int, default=0, help="seed for sampling calibration windows")),
    (("--recalibrate",), dict(action="store_true", help="ignore cached files and calibrate again")),
    (("--out",), dict(required=True, help="thresholds file to write (JSON; tensors beside it)")),
    (("--teal-mode",), dict(default="greedy", choices=["greedy", "uniform"], help="TEAL allocation (default greedy)")),
    (("--teal-level",), dict(type=float, default=None, help="TEAL: print the per-matrix levels at this sparsity")),
    (("--teal-greedy-steps",), dict(type=int, default=None,
                                    help="TEAL greedy moves to 0.9 (default 80 CPU, 240 CUDA)")),
    (("--teal-greedy-tokens",), dict(type=int, default=None, help="TEAL greedy tokens (default 256 CPU, 16384 CUDA)")),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm-sparse calibrate", description=__doc__.splitlines()[0])
    for flags, kwargs in ARGUMENTS:
        parser.add_argument(*flags, **kwargs)
    return parser


def _load(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import resolve_pretrained

    pretrained = str(resolve_pretrained(args.model))
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(pretrained, revision=args.revision, dtype=dtype)
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(pretrained, revision=args.revision)
    return pretrained, model, tokenizer


def _print_pplp(info: dict) -> None:
    print(f"file:            {info['file']}")
    print(f"key:             {info['key']}")
    print(f"calibrated now:  {info['calibrated_now']}")
    print(f"CETT:            {info['cett']:.6f}")
    print(f"calib PPL ratio: {info['calib_ppl_ratio']:.4f} (target {1 + info['ppl_p'] / 100:.4f}; {info['tolerance']})")
    held = info.get("heldout_ppl_ratio")
    print(f"held-out ratio:  {held:.4f} on {info['heldout_tokens']} tokens" if held is not None else "held-out: none")
    print(f"activation ratio (mean over layers): {info['mean_activation_ratio']:.4f}")
    print(f"tokens: {info['calib_tokens']} calibration, {info['cett_tokens']} for CETT, seqlen {info['seqlen']}, "
          f"seed {info['seed']}, {info['iterations']} iterations, {info['seconds']} s")
    print("| layer | threshold t_l | activation ratio |")
    print("|---:|---:|---:|")
    for layer, (t, active) in enumerate(zip(info["layer_thresholds"], info["activation_ratio"])):
        print(f"| {layer} | {t:.6g} | {active:.4f} |")


def run_pplp(args: argparse.Namespace) -> int:
    """Calibrate (or load from the cache) PPL-p% thresholds, print them, write --out."""
    from ..config import parse_sparsity_args
    from ..engine.engine import SparsityEngine
    from ..thresholds import copy_thresholds
    from .pplp import build_pplp_rules

    values = {"ppl_p": args.ppl_p, "calib_seed": args.calib_seed, "recalibrate": args.recalibrate}
    for name in ("calib_data", "calib_tokens", "calib_seqlen"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    config = parse_sparsity_args(values)
    pretrained, model, tokenizer = _load(args)
    context = argparse.Namespace(pretrained=pretrained, revision=args.revision, world_size=1, rank=0)
    _, info = build_pplp_rules(SparsityEngine(model), config, tokenizer, context)
    copy_thresholds(info["file"], args.out)
    _print_pplp(info)
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lm-sparse calibrate`; returns the exit code."""
    from ..config import SparsityArgumentError

    args = build_parser().parse_args(argv)
    try:
        if args.method == "teal":
            from .teal import calibrate_cli

            return int(calibrate_cli(args) or 0)
        if args.ppl_p is None:
            raise SparsityArgumentError("lm-sparse calibrate: --ppl-p P is required with --method pplp (P > 0)")
        return run_pplp(args)
    except SparsityArgumentError as exc:
        print(f"error: {command_line_wording(str(exc))}", file=sys.stderr)
        return 2


def command_line_wording(message: str) -> str:
    """An error worded for sparse-hf's model_args, in this command's terms: `--calib-data PATH`, not
    `calib_data=PATH`."""
    if message.startswith("sparse-hf: "):
        message = "lm-sparse calibrate: " + message.removeprefix("sparse-hf: ")
    for name in ("calib_data", "calib_tokens", "calib_seqlen", "calib_seed", "thresholds", "ppl_p", "teal_mode",
                 "teal_greedy_steps", "teal_greedy_tokens"):
        message = message.replace(f"{name}=", f"--{name.replace('_', '-')} ")
    return message


if __name__ == "__main__":
    sys.exit(main())
