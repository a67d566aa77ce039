"""How many kernels one compiled decode step launches, dense vs TEAL with the sparse kernels (CPU proxy).

The H200 decode benchmark found the sparse step about 27 us per layer slower than its four matmul launches
predict. On a GPU each launch in a CUDA graph costs a few microseconds however small it is, so this counts
them. The script compiles `generate_static`'s decode step with inductor on a tiny Llama-shaped model, reads
the code inductor generated, and counts the calls in it. There are three kinds: fused kernels (`cpp_fused_*`
on CPU, one Triton kernel each on a GPU), library calls (`extern_kernels.*`: matmuls, etc.) and custom ops
(`torch.ops.lm_sparse.*`: two launches each on a GPU, the GEMV and its split-K reduce). It counts them for
three setups: dense with the engine counting (as bench_decode's dense row), TEAL-style thresholds on all
seven matrices with the kernels, and the same with the engine's counting paused (the product path alone).
Inductor's CPU and GPU back ends fuse by the same scheduler, so the counts are a proxy for the GPU's, not
a measurement of it.

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
KINDS = {"fused kernels": r"\bcpp_fused_\w+\(|\btriton_\w+\.run\(", "library calls": r"\bextern_kernels\.\w+\(",
         "lm_sparse ops": r"\btorch\.ops\.lm_sparse\.\w+"}


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


def main(argv: list[str] | None = None) -> int:
    from torch._inductor.utils import run_and_get_code
    from transformers import AutoModelForCausalLM, LlamaConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=TINY["num_hidden_layers"])
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "num_hidden_layers": args.layers})).eval()
    prompt = torch.randint(3, 256, (1, 16))
    engine = SparsityEngine(model, pad_token_id=0)
    thresholds = quantile_thresholds(engine, model, prompt, [0.5])[0.5]
    decode.COMPILE_OPTIONS = {"backend": "inductor", "fullgraph": True, "dynamic": False}  # no CUDA graphs on CPU

    def step_code(paused: bool) -> dict[str, int]:
        decode.forget_compiled_step(model)
        torch._dynamo.reset()
        engine.reset()
        with engine.attached(), (engine.paused() if paused else contextlib.nullcontext()):
            _, code = run_and_get_code(lambda: decode.generate_static(model, prompt, None, 2, None, 0, [-1],
                                                                          compile=True))
        return census(code)

    rows = {"dense, engine counting": step_code(False)}
    engine.set_rules({i: Threshold(t) for i, t in thresholds.items()})
    attach_decode_kernels(engine, required=True, allow_interpreter=True)
    rows["TEAL 0.5 + kernels, engine counting"] = step_code(False)
    rows["TEAL 0.5 + kernels, counting paused"] = step_code(True)
    print(f"\nOne compiled decode step of a {args.layers}-layer tiny Llama (inductor, {sys.platform} CPU, "
          f"torch {torch.__version__}); per step and per layer\n")
    print("| setup | " + " | ".join(KINDS) + " | GPU launches (lm_sparse ops count 2) | per layer |")
    print("|---|" + "---:|" * (len(KINDS) + 2))
    for name, c in rows.items():
        launches = c["fused kernels"] + c["library calls"] + 2 * c["lm_sparse ops"]
        print(f"| {name} | " + " | ".join(str(c[k]) for k in KINDS) + f" | {launches} | {launches / args.layers:.1f} |")
        c["gpu_launches"] = launches
    meta = {**environment(torch.device("cpu")), "layers": args.layers, "model": TINY}
    write_results(args.out, meta, [{"setup": name, **c} for name, c in rows.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
