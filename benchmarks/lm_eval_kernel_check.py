"""`lm-sparse eval` with teal=S on a local generation task: did decode steps run the sparse kernel?

Builds, offline, a random-weight Llama-shaped model (bf16) with the word-level test tokenizer, a calibration
file and a generate_until task of random word prompts, then runs

    python -m lm_sparse eval --model sparse-hf \
        --model_args pretrained=<model>,teal=0.5,calib_data=<file>,dtype=bfloat16,sparse_kernels=on \
        --tasks lmsparse_kernel_gen --include_path <dir> --device cuda --output_path <dir>

and prints the sparsity report's execution paths and per-phase sparsity from the results file. On CUDA it
fails unless every threshold site's prefill is `masked_dense_fused` and its batch-1 decode steps ran the sparse
kernel, except at the matrices whose TEAL level is below the backend's MIN_UNION_SPARSITY (nothing for a
kernel to skip): those, and only those, must report `dense_fallback`.

    python benchmarks/lm_eval_kernel_check.py --out /tmp/kcheck            # GPU (the issue's check)
    python benchmarks/lm_eval_kernel_check.py --out /tmp/kcheck --smoke    # CPU: tiny model, masked dense
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
def write_inputs(out: Path, smoke: bool, docs: int, max_gen_toks: int) -> tuple[Path, Path, Path]:
    """Model dir (random weights + word tokenizer), calibration .txt and task dir under `out`."""
    import torch

    from lm_sparse.testing import EXACT_MATCH, WORDS, save_tiny_model, save_word_tokenizer, write_json_task

    rng = random.Random(0)
    words = WORDS[3:]
    size = {} if smoke else dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    tok = save_word_tokenizer(out / "tokenizer")
    model = save_tiny_model("llama", tok, out / "model", dtype=torch.float32 if smoke else torch.bfloat16, **size)
    calib = out / "calib.txt"
    calib.write_text("\n".join(" ".join(rng.choices(words, k=200)) for _ in range(400 if not smoke else 60)))
    rows = [{"prompt": " ".join(rng.choices(words, k=24)), "target": rng.choice(words)} for _ in range(docs)]
    tasks = write_json_task(out / "tasks", "lmsparse_kernel_gen", rows, output_type="generate_until",
                            doc_to_text="{{prompt}}", doc_to_target="{{target}}", metric_list=EXACT_MATCH,
                            generation_kwargs={"until": ["<eos>"], "max_gen_toks": max_gen_toks, "do_sample": False})
    return model, calib, tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working directory (model, task, results)")
    parser.add_argument("--teal", type=float, default=0.5)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the script, not kernels")
    parser.add_argument("--results-copy", default=None, help="also copy lm-eval's results file to this path")
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    out = Path(args.out).resolve()
    model, calib, tasks = write_inputs(out, args.smoke, args.docs, args.max_gen_toks)
    dtype, kernels = "float32" if args.smoke else "bfloat16", "on" if device == "cuda" else "off"
    model_args = (f"pretrained={model},teal={args.teal},calib_data={calib},calib_seqlen=128,"
                  f"dtype={dtype},sparse_kernels={kernels}")
    # Calibration only has to produce thresholds here: keep it short (the kernel path is what is checked).
    model_args += (",calib_tokens=2048,teal_greedy_tokens=128,teal_greedy_steps=10" if args.smoke
                   else ",calib_tokens=16384,teal_greedy_tokens=4096")
    cmd = [sys.executable, "-m", "lm_sparse", "eval", "--model", "sparse-hf", "--model_args", model_args,
           "--tasks", "lmsparse_kernel_gen", "--include_path", str(tasks), "--device", device,
           "--batch_size", "1", "--output_path", str(out / "results")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LM_SPARSE_CACHE": str(out / "cache")}
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    # lm-eval's output goes straight through (a run cut off by a time limit still shows how far it got)
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return proc.returncode
    results_file = max((out / "results").rglob("results_*.json"), key=os.path.getmtime)
    if args.results_copy:
        Path(args.results_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results_file, args.results_copy)
    results = json.loads(results_file.read_text())
    report = results["config"]["sparsity"]
    decode = report["phases"]["decode"]
    print(f"device {device}, {seconds:.1f} s; weights skipped {report['weights_skipped']:.3f}; "
          f"decode tokens {decode['tokens']}, decode sparsity {decode['sparsity']}")
    print(json.dumps(report["execution"], indent=1))
    if device == "cuda":
        wrong = execution_mismatches(report)
        if wrong or not decode["tokens"]:
            print(f"FAILED: decode paths differ from the expected ones: {wrong}", file=sys.stderr)
            return 1
        print("OK: every decode step ran the sparse kernel where the kernel has inputs to skip")
    return 0


def execution_mismatches(report: dict) -> dict:
    """{site name: (expected, reported)} where the paths of batch-1 steps are not the backend's policy."""
    from lm_sparse.kernels.backend import sparse_rows_limit

    levels = (report.get("calibration") or {}).get("levels") or {}
    wrong = {}
    for name, paths in report["execution"].items():
        dense = [layer for layer, level in enumerate(levels.get(name, [])) if sparse_rows_limit(level) < 1]
        sparse = len(dense) < len(levels.get(name, [None]))
        decode = "+".join(p for p, ran in (("sparse_kernel", sparse), ("dense_fallback", bool(dense))) if ran)
        expected = {"prefill": "masked_dense_fused", "decode": decode}
        if dense:
            expected["decode_dense_layers"] = dense
        if paths != expected:
            wrong[name] = (expected, paths)
    return wrong


if __name__ == "__main__":
    sys.exit(main())
