"""Rules against direct references, and bad sparsity arguments failing in one line before any weight loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, save_tiny_model
from lm_sparse.config import SparsityArgumentError, SparsityConfig, parse_sparsity_args
from lm_sparse.engine import CountOnly, Threshold, TopK, UnsupportedArchitectureError
from lm_sparse.kernels.reference import masked_input, round_threshold

torch.set_num_threads(1)


# -- rules ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction,width,k", [(0.5, 64, 32), (0.25, 10, 3), (0.3, 5, 2), (0.001, 64, 1),
                                               (1.0, 7, 7), (0.99, 64, 63)])
def test_topk_k_is_rounded_fraction_of_width(fraction, width, k):
    assert TopK(fraction, width).k == k


def test_topk_keeps_largest_magnitudes_per_row():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    y = TopK(0.5, 64)(x)
    order = x.abs().sort(dim=-1, descending=True).indices
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order[..., :32], True)
    assert torch.equal(y, torch.where(keep, x, torch.zeros_like(x)))
    assert ((y != 0).sum(-1) == 32).all()


def test_topk_full_fraction_is_identity():
    x = torch.randn(4, 16)
    assert TopK(1.0, 16)(x) is x


def test_threshold_keeps_strictly_greater_magnitudes():
    x = torch.tensor([[-0.3, -0.1, 0.0, 0.1, 0.2, 0.5]], dtype=torch.float64)
    assert Threshold(0.1)(x).tolist() == [[-0.3, 0.0, 0.0, 0.0, 0.2, 0.5]]
    per_channel = torch.tensor([0.5, 0.0, 0.0, 0.2, 0.1, 0.6], dtype=torch.float64)
    assert Threshold(per_channel)(x).tolist() == [[0.0, -0.1, 0.0, 0.0, 0.2, 0.0]]
    half = Threshold(per_channel)(x.half())
    assert half.dtype == torch.float16 and (half != 0).tolist() == [[False, True, False, False, True, False]]
    assert Threshold(per_channel).describe()["per_channel"] is True
    assert Threshold(0.1).describe() == {"rule": "threshold", "value": 0.1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_threshold_mask_is_exact_in_every_dtype(dtype):
    """|x| <= t with t the calibrated real number, not t rounded to nearest in x's dtype (which dropped values
    up to half an ulp above t: in bf16, FAT's EPS=0.05 acted as 0.050049)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 512, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    # Thresholds at the dtype's own values, just above and below them, and anywhere (float64 scalars and
    # float32 per-channel vectors, as calibration stores them).
    grid = x.abs().flatten()[:512].to(torch.float64)
    anywhere = torch.rand(512, generator=gen, dtype=torch.float64) * 0.2
    nudges = [grid, grid * (1 + 2.0 ** -12), grid * (1 - 2.0 ** -12), anywhere]
    for t in nudges:
        t32 = t.float()
        want = ~(x.double().abs() <= t32.double())
        assert torch.equal(Threshold(t32)(x) != 0, want & (x != 0))
        for scalar in t[:16].tolist():
            assert torch.equal(Threshold(scalar)(x) != 0, (x.double().abs() > scalar) & (x != 0))
    bf = torch.tensor([0.0498046875, 0.050048828125, -0.050048828125], dtype=torch.bfloat16)  # around 0.05
    assert Threshold(0.05)(bf).tolist() == [0.0, 0.050048828125, -0.050048828125]
    # an integer threshold tensor, and float64 activations (the reference compares in their precision too)
    assert Threshold(torch.tensor(259))(torch.tensor([258.0, 260.0], dtype=torch.bfloat16)).tolist() == [0.0, 260.0]
    f64 = torch.tensor([0.1 - 1e-12, 0.1, 0.1 + 1e-12], dtype=torch.float64)
    assert Threshold(0.1)(f64).tolist() == [0.0, 0.0, 0.1 + 1e-12]
    assert torch.equal(masked_input(f64, round_threshold(0.1, torch.float64)), Threshold(0.1)(f64))


def test_thresholds_prepared_by_the_engine_compile_once():
    """The engine rounds each Threshold for its site's weight ahead; one filled on its first call inside a
    compiled step fails the step's own guard on the rule's cache and compiles twice."""
    from torch._dynamo.testing import CompileCounter

    from lm_sparse.engine.engine import SparsityEngine

    model = make_tiny_model("llama")
    engine = SparsityEngine(model)
    downs = engine.sites_in_groups("mlp_mid")
    engine.set_rules({s.index: Threshold(0.01) for s in downs})
    x = torch.randn(2, downs[0].module.in_features)
    frames = []
    from lm_sparse.engine import OnGateScore

    engine_fat = SparsityEngine(make_tiny_model("llama"))
    engine_fat.set_rules({s.index: OnGateScore(Threshold(0.01)) for s in engine_fat.sites_in_groups("mlp_mid")})
    gate_rule = next(iter(engine_fat.rules.values())).inner  # FAT's rule on the gate score: prepared too
    for rule in (engine.rules[downs[0].index], gate_rule, Threshold(0.01)):  # prepared by set_rules, and not
        torch._dynamo.reset()
        counter = CompileCounter()
        step = torch.compile(lambda v, rule=rule: rule(v) * 2, backend=counter, fullgraph=True)
        step(x)
        step(x)
        frames.append(counter.frame_count)
    assert frames == [1, 1, 2]


def test_count_only_is_identity():
    x = torch.randn(2, 3)
    assert CountOnly()(x) is x



def _ffn_gate_and_up(model: torch.nn.Module, arch: str, ids: torch.Tensor) -> list[tuple]:
    """Per layer: (the MLP's input, act(gate(x)), up(x), the MLP) of a dense forward."""
    seen = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda mlp, args: seen.append((mlp, args[0].detach())))
    with torch.no_grad():
        model(ids)
    for layer in model.model.layers:
        layer.mlp._forward_pre_hooks.clear()
    out = []
    for mlp, x in seen:
        if arch == "phi3":
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
            out.append((x, mlp.activation_fn(gate), up, mlp))
        else:
            out.append((x, mlp.act_fn(mlp.gate_proj(x)), mlp.up_proj(x), mlp))
    return out


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("args", [{"topk": 0.3}, {"fat": 0.03}])
def test_topk_and_fat_pick_neurons_by_gate_score(arch, args):
    """Sparsing Law's Top-k and FAT (reference code: prune_topk/prune_fat on act(gate(x))) rank and threshold the
    gate score, not the product act(gate(x)) * up(x), and zero the picked neurons' products: each MLP's output is
    down(mask(gate) * up) with the mask made per token."""
    from lm_sparse.engine import OnGateScore, SparsityEngine
    from lm_sparse.methods import build_rules

    model = make_tiny_model(arch)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    dense = _ffn_gate_and_up(model, arch, ids)
    engine = SparsityEngine(model)
    rules, _ = build_rules(engine, parse_sparsity_args(args))
    assert all(isinstance(r, OnGateScore) for r in rules.values()) and len(rules) == len(dense)
    engine.set_rules(rules)
    outputs = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda mlp, a, out: outputs.append(out.detach()))
    with engine.attached(), torch.no_grad():
        model(ids)
    engine.counter.synchronize()
    x, gate, up, mlp = dense[0]  # layer 0's MLP input is the dense one (attention is not sparsified)
    if "topk" in args:
        k = round(0.3 * gate.shape[-1])
        keep = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, gate.abs().topk(k, dim=-1).indices, True)
    else:
        keep = gate.abs() > 0.03
    expected = mlp.down_proj(torch.where(keep, gate, 0.0) * up)
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6)
    # the product's own magnitudes pick other neurons: the two rules really differ here
    product = gate * up
    by_product = product.abs() > 0.03 if "fat" in args else torch.zeros_like(keep).scatter_(
        -1, product.abs().topk(keep.sum(-1).max().item(), dim=-1).indices, True)
    assert not torch.equal(by_product, keep)
    report = engine.report()
    assert abs(report["ffn"] - float((~keep).float().mean())) < 0.2  # counted at down_proj's input, all layers


# -- argument parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1, 1.0, "1", " 1.0 "])
def test_ppl_p_int_float_and_string_parse_the_same(value):
    assert parse_sparsity_args({"ppl_p": value}) == SparsityConfig(rule="pplp", level=1.0, method="pplp")


def test_integer_arguments_parse_exactly():
    """A seed above 2**53 written as digits is kept as written, not rounded through a float."""
    assert parse_sparsity_args({"ppl_p": 1, "calib_seed": str(2**60 + 1)}).calib_seed == 2**60 + 1
    assert parse_sparsity_args({"ppl_p": 1, "calib_seed": 7.0}).calib_seed == 7


def test_valid_arguments_parse():
    assert parse_sparsity_args({}) == SparsityConfig()
    assert parse_sparsity_args({"topk": "0.5"}) == SparsityConfig(rule="topk", level=0.5)
    assert parse_sparsity_args({"topk": 1}).level == 1.0
    assert parse_sparsity_args({"fat": 0}) == SparsityConfig(rule="fat", level=0.0)
    assert parse_sparsity_args({"teal": 0.4}) == SparsityConfig(rule="teal", level=0.4)
    teal_pplp = parse_sparsity_args({"ppl_p": 2, "method": "TEAL"})
    assert (teal_pplp.rule, teal_pplp.level, teal_pplp.method) == ("teal", 2.0, "teal")
    assert parse_sparsity_args({"topk": 0.5, "sparse_prefill": "last_half"}).sparse_prefill == "last_half"
    greedy = parse_sparsity_args({"teal": 0.5, "teal_greedy_steps": "40", "teal_greedy_tokens": 128})
    assert greedy.extra == {"teal_greedy_steps": 40, "teal_greedy_tokens": 128}


BAD_ARGS = [
    ({"topk": 0}, "topk"), ({"topk": -1}, "topk"), ({"topk": 1.5}, "topk"), ({"topk": "abc"}, "topk"),
    ({"topk": "nan"}, "topk"), ({"topk": True}, "topk"),
    ({"fat": -0.1}, "fat"), ({"fat": "x"}, "fat"),
    ({"ppl_p": 0}, "ppl_p"), ({"ppl_p": -1}, "ppl_p"), ({"ppl_p": "inf"}, "ppl_p"),
    ({"teal": 1.0}, "teal"), ({"teal": -0.1}, "teal"),
    ({"topk": 0.5, "fat": 0.1}, "topk and fat"), ({"ppl_p": 1, "teal": 0.5}, "ppl_p and teal"),
    ({"topk": 0.5, "method": "teal"}, "method"), ({"ppl_p": 1, "method": "magic"}, "method"),
    ({"topk": 0.5, "sparse_prefill": "half"}, "sparse_prefill"), ({"topk": 0.5, "calib_tokens": 10}, "calib_tokens"),
    ({"ppl_p": 1, "calib_tokens": 0}, "calib_tokens"), ({"ppl_p": 1, "calib_tokens": 2.5}, "calib_tokens"),
    ({"ppl_p": 1, "recalibrate": "maybe"}, "recalibrate"), ({"tpok": 0.5}, "tpok"),
    ({"ppl_p": "-0.5"}, "ppl_p"),
    ({"topk": 0.5, "teal_greedy_steps": 40}, "teal_greedy_steps"),
    ({"teal": 0.5, "teal_greedy_tokens": 0}, "teal_greedy_tokens"),
    ({"ppl_p": 1, "calib_seed": 2**64}, "calib_seed"), ({"ppl_p": 1, "calib_seed": -1}, "calib_seed"),
    ({"topk": 0.5, "teal_mode": "uniform"}, "teal_mode"),
    ({"ppl_p": 1, "thresholds": "/nonexistent/thresholds.json"}, "thresholds"),
    ({"ppl_p": 1, "thresholds": "thresholds/smollm2-135m-instruct-pplp-p1.json", "recalibrate": "true"},
     "recalibrate=true and thresholds"),
    ({"sparse_kernels": "on"}, "sparse_kernels=on"),
    ({"calib_data": "/nonexistent/calib.jsonl", "ppl_p": 1}, "calib_data"),
]


@pytest.mark.parametrize("args,named", BAD_ARGS)
def test_bad_arguments_raise_one_line_naming_the_argument(args, named):
    with pytest.raises(SparsityArgumentError) as info:
        parse_sparsity_args(args)
    message = str(info.value)
    assert "\n" not in message and message.startswith("sparse-hf: ")
    assert named in message


# -- SparseHFLM: errors come before any weight is loaded -------------------------------------------------
@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if anything tries to load model weights."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the argument error")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return save_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny_gpt2")
    config = AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("args,named", [
    ({"topK": 0.5}, "'topK'"), ({"tpok": 0.5}, "'tpok'"), ({"top_k": 0.5}, "'top_k'"),
    ({"topk": 0.5, "fat": 0.1}, "topk and fat"), ({"topk": 0}, "topk"), ({"topk": -1}, "topk"),
    ({"topk": 1.5}, "topk"), ({"topk": "abc"}, "topk"), ({"fat": -1}, "fat"), ({"ppl_p": 0}, "ppl_p"),
    ({"ppl_p": -2}, "ppl_p"),
])
def test_sparse_hf_rejects_bad_arguments_before_loading(tiny_dir, no_weight_loading, args, named):
    from lm_sparse.lm import SparseHFLM

    with pytest.raises(SparsityArgumentError) as info:
        SparseHFLM(pretrained=str(tiny_dir), device="cpu", **args)
    assert "\n" not in str(info.value) and named in str(info.value)


def test_sparse_hf_rejects_unsupported_architecture_before_loading(gpt2_dir, no_weight_loading):
    from lm_sparse.engine.arch import ARCHITECTURES
    from lm_sparse.lm import SparseHFLM

    with pytest.raises(UnsupportedArchitectureError) as info:
        SparseHFLM(pretrained=str(gpt2_dir), device="cpu", topk=0.5)
    message = str(info.value)
    assert "\n" not in message and "'gpt2'" in message
    assert all(name in message for name in ARCHITECTURES)


def test_sparse_hf_ppl_p_spellings_parse_the_same(tiny_dir, no_weight_loading):
    # Parsing happens before loading, so the refused load proves the value was accepted.
    from lm_sparse.lm import SparseHFLM

    for value in (1, 1.0, "1"):
        with pytest.raises(AssertionError, match="weights were loaded"):
            SparseHFLM(pretrained=str(tiny_dir), device="cpu", ppl_p=value)


# -- command lines ---------------------------------------------------------------------------------------
def test_cli_bad_argument_is_one_error_line(tiny_dir, tmp_path):
    """`lm_eval --model sparse-hf` and `lm-sparse eval` both exit non-zero with one `error:` line."""
    import os

    from test_accounting import write_tiny_tasks

    tasks = write_tiny_tasks(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    bin_dir = Path(sys.executable).parent
    args = ["--model", "sparse-hf", "--model_args", f"pretrained={tiny_dir},topk=2", "--tasks", "tiny_mc",
            "--include_path", tasks, "--device", "cpu"]
    # Both start lm-eval (a few seconds of task indexing each): run them side by side.
    procs = [subprocess.Popen(argv + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for argv in ([str(bin_dir / "lm_eval")], [str(bin_dir / "lm-sparse"), "eval"])]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, stderr[-3000:]
        assert "topk=2" in errors[0] and "(0, 1]" in errors[0]
        assert "Traceback" not in stderr
