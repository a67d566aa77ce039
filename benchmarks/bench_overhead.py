"""Wall time and peak memory of `--model sparse-hf` (topk=0.5 and dense) against `--model hf`, side by side.

A loglikelihood task of N requests (multiple choice built from GSM8K training problems: the real final
answer against three wrong numbers) runs on SmolLM2-135M-Instruct on the CPU. Each configuration runs in
its own process (so peak RSS is its own), the configurations alternate, and every one is repeated; the
table gives the median wall time of `simple_evaluate` and the peak resident memory.

Children run with MALLOC_MMAP_THRESHOLD_=131072 (all configurations alike): with glibc's default, the mmap
threshold grows after large frees and peak RSS then measures heap fragmentation, which varied by 8% between
identical runs here (BENCHMARKS.md); a fixed threshold makes peak RSS track the memory actually in use.
`--malloc-default` keeps glibc's default.

    python benchmarks/bench_overhead.py --data ../shared/data/gsm8k_train.jsonl --requests 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lm_sparse.testing import ACC, write_json_task

def build_task(data: Path, docs: int, out_dir: Path, seed: int = 0) -> Path:
    """Write a multiple-choice task of `docs` questions x 4 choices into `out_dir`."""
    rng = random.Random(seed)
    rows = []
    with open(data) as f:
        for line in f:
            item = json.loads(line)
            answer = item["answer"].split("####")[-1].strip().replace(",", "")
            if not re.fullmatch(r"-?\d+", answer):
                continue
            value = int(answer)
            wrong = set()
            while len(wrong) < 3:
                cand = value + rng.choice([-1, 1]) * rng.randint(1, max(3, abs(value) // 2 + 1))
                if cand != value:
                    wrong.add(cand)
            choices = [str(value), *map(str, wrong)]
            rng.shuffle(choices)
            rows.append({"question": item["question"], "choices": [f" {c}" for c in choices],
                         "label": choices.index(str(value))})
            if len(rows) == docs:
                break
    return write_json_task(out_dir, "bench_gsm8k_mc", rows, output_type="multiple_choice",
                           doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="{{choices}}",
                           doc_to_target="label", metric_list=ACC)


def run_one(model: str, model_args: str, task_dir: str, batch_size: int) -> dict:
    """Child process: one simple_evaluate; print wall time and peak RSS as JSON."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lm_sparse  # noqa: F401

    tm = TaskManager(include_path=task_dir)
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["bench_gsm8k_mc"],
                                  task_manager=tm, batch_size=batch_size, device="cpu")
    wall = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sp = res["config"].get("sparsity") or {}
    return {"wall_s": wall, "peak_rss_mb": rss_mb, "acc": res["results"]["bench_gsm8k_mc"]["acc,none"],
            "ffn_sparsity": sp.get("ffn")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data/gsm8k_train.jsonl")
    ap.add_argument("--requests", type=int, default=200, help="loglikelihood requests (4 per question)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--malloc-default", action="store_true", help="do not fix glibc's mmap threshold")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "ARGS", "TASKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(*args.child, batch_size=args.batch_size)), flush=True)
        return

    from lm_sparse.models import smollm2_dir

    pretrained = str(smollm2_dir())
    configs = [("hf", "hf", f"pretrained={pretrained}"),
               ("sparse-hf dense", "sparse-hf", f"pretrained={pretrained}"),
               ("sparse-hf topk=0.5", "sparse-hf", f"pretrained={pretrained},topk=0.5")]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        build_task(Path(args.data), args.requests // 4, Path(tmp))
        for rep in range(args.repeats):
            for name, model, margs in configs:  # alternate configurations: drift hits all alike
                env = dict(os.environ) if args.malloc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                out = subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size), "--child",
                                      model, margs, tmp], capture_output=True, text=True, check=True, env=env)
                line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
                results[name].append(json.loads(line[7:]))
                print(f"repeat {rep + 1}/{args.repeats} {name}: {results[name][-1]}", file=sys.stderr)
    base_wall = statistics.median(r["wall_s"] for r in results["hf"])
    base_rss = statistics.median(r["peak_rss_mb"] for r in results["hf"])
    print(f"\n{args.requests} loglikelihood requests, batch size {args.batch_size}, SmolLM2-135M-Instruct fp32, "
          f"CPU, median of {args.repeats}\n")
    print("|model|wall s|x hf|peak RSS MiB|x hf|acc|FFN sparsity|")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, _, _ in configs:
        wall = statistics.median(r["wall_s"] for r in results[name])
        rss = statistics.median(r["peak_rss_mb"] for r in results[name])
        sp = results[name][0]["ffn_sparsity"]
        print(f"|{name}|{wall:.1f}|{wall / base_wall:.3f}|{rss:.0f}|{rss / base_rss:.3f}|"
              f"{results[name][0]['acc']:.3f}|{'-' if sp is None else f'{sp:.4f}'}|")


if __name__ == "__main__":
    main()
