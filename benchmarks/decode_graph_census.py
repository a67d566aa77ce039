"""How many kernels one compiled decode step launches on a GPU: dense vs TEAL with the sparse kernels.

The H200 decode benchmark found the sparse step about 27 us per layer slower than its matmul launches predict.
In a CUDA graph each launch costs a few microseconds however small it is, so this counts them, in the code
inductor generates for `generate_static`'s decode step of a tiny Llama-shaped model. With no GPU here, the step
is traced on the CPU and inductor then writes its CUDA (Triton) code for a fake H100 (`fake_cuda.py`: nothing
is compiled or run); on a machine with CUDA the step is compiled for the real device. `--target cpu` counts the
CPU back end's code instead, which fuses differently (one loop nest for nodes of different sizes, where Triton
launches one kernel per size) and so undercounts the GPU's launches.

Three kinds of call: inductor's kernels (`triton_*.run`, one launch each; `cpp_fused_*` on the CPU), library
calls (`extern_kernels.*`, the matmuls, and aten ops inductor does not generate, such as attention: one launch
each) and custom ops (`torch.ops.lm_sparse.*`: two launches each on a GPU, the GEMV and its split-K reduce).
Setups: dense (the engine attached, no rules: bench_decode's dense row), TEAL-style thresholds at 0.5 on all
seven matrices with the kernels and the engine counting (as under sparse-hf), and the same with the counting
paused (the product path alone).

    python benchmarks/decode_graph_census.py             # CPU, about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lm_sparse.engine.engine import SparsityEngine  # noqa: E402
from lm_sparse.engine.rules import Threshold  # noqa: E402
from lm_sparse.kernels import decode  # noqa: E402
from lm_sparse.kernels.backend import attach_decode_kernels  # noqa: E402

from bench_common import environment, write_results  # noqa: E402
from bench_decode import quantile_thresholds  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, hidden_act="silu")
KINDS = {"inductor kernels": r"\bcpp_fused_\w+\(|\btriton_\w+\.run\(",
         "library calls": r"\bextern_kernels\.\w+\(|\btorch\.ops\.aten\.\w+",
         "lm_sparse ops": r"\btorch\.ops\.lm_sparse\.\w+"}
LAUNCHES_PER_OP = 2  # an lm_sparse op on a GPU: the GEMV, then the split-K reduce (choose_config's default)


def census(code: list[str]) -> dict[str, int]:
    """Calls of each kind in the `call` functions of inductor's generated modules."""
    counts = dict.fromkeys(KINDS, 0)
    for module in code:
        for body in re.findall(r"def call\(.*?\n(.*?)(?=\n\S|\Z)", module, flags=re.S):
            # calls only: not the comments naming source nodes, nor the asserts naming the op that made a buffer
            calls = [line for line in body.splitlines()
                     if not line.lstrip().startswith(("#", "assert_size_stride", "assert_alignment"))]
            for kind, pattern in KINDS.items():
                counts[kind] += sum(bool(re.search(pattern, line)) for line in calls)
    return counts


def launches(counts: dict[str, int]) -> int:
    """GPU launches of one step: every inductor kernel and library call once, every lm_sparse op twice."""
    return counts["inductor kernels"] + counts["library calls"] + LAUNCHES_PER_OP * counts["lm_sparse ops"]


def main(argv: list[str] | None = None) -> int:
    from torch._inductor.utils import run_and_get_code
    from transformers import AutoModelForCausalLM, LlamaConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=TINY["num_hidden_layers"])
    parser.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                        help="whose code to count: the GPU's (for a fake H100 without CUDA) or the CPU's")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    real_gpu = args.target == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda" if real_gpu else "cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "num_hidden_layers": args.layers}))
    model = model.to(device).eval()
    prompt = torch.randint(3, 256, (1, 16), device=device)
    engine = SparsityEngine(model, pad_token_id=0)
    thresholds = quantile_thresholds(engine, model, prompt, [0.5])[0.5]
    captured: list = []
    if args.target == "cuda" and not real_gpu:
        from fake_cuda import capture_backend

        backend = capture_backend(captured)  # traced here; CUDA code generated below, under a fake H100
    else:
        backend = "inductor"
    decode.COMPILE_OPTIONS = {"backend": backend, "fullgraph": True, "dynamic": False}  # no CUDA graphs needed

    def step_code(paused: bool):
        """The compiled decode step's code (or, for the fake GPU, its captured graph)."""
        decode.forget_compiled_step(model)
        torch._dynamo.reset()
        engine.reset()
        captured.clear()
        with engine.attached(), (engine.paused() if paused else contextlib.nullcontext()):
            _, code = run_and_get_code(lambda: decode.generate_static(model, prompt, None, 2, None, 0, [-1],
                                                                          compile=True))
        return captured[0] if captured else code

    steps = {"dense, engine attached": step_code(False)}
    engine.set_rules({i: Threshold(t) for i, t in thresholds.items()})
    attach_decode_kernels(engine, required=True, allow_interpreter=not real_gpu)
    steps["TEAL 0.5 + kernels, engine counting"] = step_code(False)
    steps["TEAL 0.5 + kernels, counting paused"] = step_code(True)
    if args.target == "cuda" and not real_gpu:
        from fake_cuda import cuda_wrapper_code

        steps = {name: [cuda_wrapper_code(*graph)] for name, graph in steps.items()}
    where = ("CUDA code for a fake H100 (traced on the CPU)" if args.target == "cuda" and not real_gpu
             else f"{device.type.upper()} code" + (f" ({torch.cuda.get_device_name()})" if real_gpu else ""))
    print(f"\nOne compiled decode step of a {args.layers}-layer tiny Llama, inductor's {where}, torch "
          f"{torch.__version__}, {sys.platform}; per step and per layer\n")
    print("| setup | " + " | ".join(KINDS) + f" | GPU launches (an lm_sparse op is {LAUNCHES_PER_OP}) | per layer |")
    print("|---|" + "---:|" * (len(KINDS) + 2))
    rows = []
    for name, code in steps.items():
        c = census(code)
        c["gpu_launches"] = launches(c)
        print(f"| {name} | " + " | ".join(str(c[k]) for k in KINDS)
              + f" | {c['gpu_launches']} | {c['gpu_launches'] / args.layers:.1f} |")
        rows.append({"setup": name, **c})
    meta = {**environment(device), "layers": args.layers, "model": TINY, "target": args.target,
            "code": where}
    write_results(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
