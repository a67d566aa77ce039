"""End-to-end decode tokens/s: dense vs TEAL-style thresholds with the sparse kernels, same engine both sides.

A Llama-3-8B-shaped model with random weights (bf16) decodes 256 new tokens after a 128-token prompt at
batch 1 through `lm_sparse.kernels.decode.generate_static` (static KV cache, compiled decode step on CUDA)
with the sparsity engine attached and counting, as under sparse-hf (`--no-count`: the product path alone).
Every sparse level puts a threshold on the inputs of all seven matrices of every layer, at that quantile
of |x| seen on the prompt, one per input as TEAL's calibration makes them (q/k/v and gate/up then run one
fused launch each), and hands decode steps to the kernels. Decode tokens/s
= (new tokens - 1) / (time of the full run - time of a prefill-only run).

The sparse levels share one compiled decode step: the kernels are re-attached at each level's thresholds and
the step's guards still hold (the thresholds are graph inputs; `tests/test_kernel_generation.py` checks that
no recompilation happens and that each level computes with its own thresholds), so a run compiles twice (dense
and sparse), not once per level. Each row records the first run's seconds (compilation included), the frames
compiled so far, and the decode sparsity the engine measured, which must be near the level.

    python benchmarks/bench_decode.py --out bench_decode.json       # GPU
    python benchmarks/bench_decode.py --smoke                       # CPU: tiny model, Triton interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lm_sparse.engine.engine import SparsityEngine  # noqa: E402
from lm_sparse.engine.rules import Threshold  # noqa: E402
from lm_sparse.kernels.backend import attach_decode_kernels  # noqa: E402
from lm_sparse.kernels.decode import generate_static  # noqa: E402
from lm_sparse.kernels.sparse_gemv import CONFIGS_ENV  # noqa: E402

from bench_common import environment, median_seconds, wall_seconds, write_results  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, hidden_act="silu")
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, hidden_act="silu")


def build_model(smoke: bool, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(SMOKE if smoke else LLAMA3_8B))
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):  # built in place, in its dtype: no float32 copy of 8B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def quantile_thresholds(engine: SparsityEngine, model, prompt: torch.Tensor, levels: list[float]) -> dict:
    """{level: {site index: threshold}} at each level's quantile of the site's |input| on the prompt.

    One threshold per input of a layer (q/k/v share one, gate/up share one), as TEAL's group thresholds:
    sites that read one x with one threshold run one fused kernel launch, as they do under sparse-hf.
    """
    samples: dict[tuple[int, str], torch.Tensor] = {}
    first = {}  # the site whose hook samples each (layer, group) input
    for s in engine.sites:
        first.setdefault((s.layer, s.group), s.index)

    def keep(key: tuple[int, str]):
        def hook(module, args):
            x = args[0].detach().abs().float().flatten()
            samples[key] = x[torch.randperm(x.numel(), device=x.device)[:200_000]]
        return hook

    handles = [s.module.register_forward_pre_hook(keep((s.layer, s.group))) for s in engine.sites
               if first[(s.layer, s.group)] == s.index]
    with torch.no_grad():
        model(prompt)
    for h in handles:
        h.remove()
    q = torch.tensor(levels, device=prompt.device)
    per_group = {key: torch.quantile(v, q).tolist() for key, v in samples.items()}
    return {lvl: {s.index: per_group[(s.layer, s.group)][j] for s in engine.sites} for j, lvl in enumerate(levels)}


def _qkv_fused(engine: SparsityEngine) -> bool:
    """Whether layer 0's q/k/v weights are views of one storage (one fused launch, as under sparse-hf)."""
    qkv = [s.module.weight for s in engine.sites_named("q", "k", "v") if s.layer == 0]
    return len({w.untyped_storage().data_ptr() for w in qkv}) == 1


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(decode tokens/s, seconds of the first full run, which compiles the step where it is new)."""
    def generate(n: int):
        return lambda: generate_static(model, prompt, None, n, None, 0, [-1])

    first = wall_seconds(generate(new_tokens), prompt.device)
    full = median_seconds(generate(new_tokens), repeats, prompt.device, warmup=False)
    prefill = median_seconds(generate(1), repeats, prompt.device)
    tps = (new_tokens - 1) / (full - prefill) if full > prefill else float("nan")  # nan: below timer noise
    return tps, first


def step_profile(model, prompt: torch.Tensor, new_tokens: int, top: int = 30) -> list[dict]:
    """The `top` kernels of one generation of `new_tokens` tokens (one prefill, then the decode steps) by their
    total device time: name, calls, microseconds. On a GPU torch.profiler sees each kernel that a CUDA graph
    replays; elsewhere it lists CPU ops (smoke runs)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = prompt.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        generate_static(model, prompt, None, new_tokens, None, 0, [-1])
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key[:120], "calls": e.count, "us": getattr(e, key)} for e in events[:top]
            if getattr(e, key) > 0]


def compiled_frames() -> int:
    """Frames dynamo has compiled so far in this process."""
    return int(torch._dynamo.utils.counters["frames"].get("ok", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--levels", default="0.25,0.4,0.5,0.7")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-count", action="store_true",
                        help="pause the engine's sparsity counting (the product path alone; sparse-hf counts)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="also profile this many decode steps of the dense row and of the first sparse level "
                             "(torch.profiler: each kernel's calls and device time, in the row's `profile`)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("--smoke is required without a CUDA device")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompt_len, new_tokens = (16, 6) if args.smoke else (args.prompt, args.new_tokens)
    repeats = 2 if args.smoke else args.repeats
    levels = [float(v) for v in args.levels.split(",")]

    model = build_model(args.smoke, device)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), device=device)
    engine = SparsityEngine(model, pad_token_id=0)
    thresholds = quantile_thresholds(engine, model, prompt, levels)
    rows = []
    meta = {**environment(device),
            "model": "tiny llama (smoke)" if args.smoke else "Llama-3-8B-shaped, random weights, bf16",
            "prompt": prompt_len, "new_tokens": new_tokens, "batch": 1, "counting": not args.no_count,
            "gemv_configs": os.environ.get(CONFIGS_ENV)}  # measured launch configurations, if any

    def skips() -> int:
        """CUDA graphs skipped so far (reduce-overhead falls back silently: eager-speed numbers)."""
        return int(torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0))

    def save(skips_before: int) -> None:
        """After every row: a run cut off by a time limit keeps the levels it finished."""
        rows[-1]["cudagraph_skips"] = skips() - skips_before
        meta["cudagraph_skips"] = sum(r["cudagraph_skips"] for r in rows)
        write_results(args.out, meta, rows)

    counting = contextlib.nullcontext if not args.no_count else engine.paused

    def measure(row: dict) -> None:
        before = skips()
        engine.reset()
        with engine.attached(), counting():
            row["tokens_per_s"], row["first_run_s"] = decode_tokens_per_s(model, prompt, new_tokens, repeats)
        engine.counter.synchronize()
        report = engine.report()
        row.update(compiled_frames=compiled_frames(),
                   decode_sparsity=report["phases"]["decode"]["sparsity"] if not args.no_count else None,
                   decode_paths=sorted({p["decode"] for p in report["execution"].values()}))
        if rows:  # a sparse level, after the dense row
            row.update(speedup=row["tokens_per_s"] / rows[0]["tokens_per_s"], fused_qkv=_qkv_fused(engine))
        if args.profile_steps and len(rows) < 2:  # dense and the first sparse level: where the step's time goes
            try:  # a profiler that fails under CUDA graphs must not cost the measured row
                with engine.attached(), counting():
                    row["profile"] = step_profile(model, prompt, args.profile_steps)
            except Exception as exc:  # noqa: BLE001
                row["profile"], row["profile_error"] = [], f"{type(exc).__name__}: {exc}"
                print(f"bench_decode: profiling failed: {row['profile_error']}", file=sys.stderr)
            for k in row["profile"][:12]:
                print(f"  {row['mode']} {row['level']}: {k['us']:10.1f} us {k['calls']:6d} x {k['name']}",
                      file=sys.stderr)
        rows.append(row)
        save(before)

    measure({"mode": "dense", "level": 0.0})
    print(f"dense: {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    for level in levels:
        engine.set_rules({i: Threshold(t) for i, t in thresholds[level].items()})
        engine.decode_executors.clear()
        attach_decode_kernels(engine, required=True, allow_interpreter=args.smoke)
        measure({"mode": "teal", "level": level})
        print(f"teal {level}: {rows[-1]['tokens_per_s']:.1f} tokens/s, decode sparsity "
              f"{rows[-1]['decode_sparsity']}, {rows[-1]['compiled_frames']} frames compiled", file=sys.stderr)
    print(f"\nDevice: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['model']}, "
          f"prompt {prompt_len}, {new_tokens} new tokens, batch 1\n")
    print("| mode | level | measured decode sparsity | decode tokens/s | speedup vs dense | q/k/v one launch "
          "| first run s (compile) | frames compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fused = {True: "yes", False: "no"}.get(r.get("fused_qkv"), "")
        measured = "-" if r["decode_sparsity"] is None else f"{r['decode_sparsity']:.3f}"
        print(f"| {r['mode']} | {r['level']:.2f} | {measured} | {r['tokens_per_s']:.1f} | "
              f"{r.get('speedup', 1.0):.2f}x | {fused} | {r['first_run_s']:.1f} | {r['compiled_frames']} |")
    if meta["cudagraph_skips"]:
        print(f"WARNING: CUDA graphs were skipped {meta['cudagraph_skips']} times: these are not graph-replay "
              "numbers (run with TORCH_LOGS=cudagraphs to see why)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
