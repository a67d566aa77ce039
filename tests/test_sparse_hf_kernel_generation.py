"""sparse-hf's generate_until with the sparse kernels, through lm-eval: the texts of the masked-dense path and of
hf, the model's generation config, autocast, stops and beam search.

Runs on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA), on a tiny random
llama with the word-level test tokenizer. The engine-level decode tests are in test_kernel_generation.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE, make_tiny_model, save_tiny_model

from lm_sparse.engine.engine import SparsityEngine
from lm_sparse.engine.rules import Threshold

pytestmark = pytest.mark.usefixtures("kernels_run_on_cpu", "one_thread")
# FAT's epsilon on the tiny llama's gate scores act(gate(x)): about 40% of the FFN neurons drop
FAT_EPS = "0.03"


def _until(lm, contexts: list[str], **gen_kwargs) -> list[str]:
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["w111"], "max_gen_toks": 8, "do_sample": False, **gen_kwargs}
    requests = [Instance(request_type="generate_until", doc={}, idx=i, arguments=(c, dict(kwargs)))
                for i, c in enumerate(contexts)]
    return lm.generate_until(requests, disable_tqdm=True)


# The first prompt meets the stop sequence after two tokens, the others run to max_gen_toks (tiny llama, seed 0).
EARLY_STOP_CONTEXTS = ["w3 w9 w27 w81", "w5 w10 w15 w20 w25 w30", "w100"]


@pytest.mark.parametrize("mode", ["off", "on"])  # generate, and the static-cache loop
def test_a_generated_token_equal_to_the_pad_id_is_counted(tmp_path, tiny_tokenizer_dir, mode):
    """lm-eval pads with the unk or EOS id where a tokenizer has no pad token: a model may generate that id as a
    real token, and its next decode step is a real step (it was dropped from the counts)."""
    from lm_sparse.lm import SparseHFLM

    from transformers import AutoTokenizer

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = "w42"  # generated from the first context: 'w2 w42 w111 ...'
    lm = SparseHFLM(pretrained=str(model_dir), tokenizer=tokenizer, fat=FAT_EPS, sparse_kernels=mode,
                    device=DEVICE, batch_size=1, dtype="float32")
    assert lm.tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("w42")
    forwards = []
    hook = lm.model.register_forward_pre_hook(
        lambda m, a, k: forwards.append((k.get("input_ids") if "input_ids" in k else a[0]).shape[1]),
        with_kwargs=True)
    text = _until(lm, EARLY_STOP_CONTEXTS[:1], until=["w999"], max_gen_toks=6)
    hook.remove()
    assert "w42" in text[0].split()[:-1]  # fed back as the input of a later decode step
    assert lm.sparsity_report()["phases"]["decode"]["tokens"] == sum(1 for n in forwards if n == 1) == 5


def test_topk_decodes_through_the_kernel_with_the_masked_dense_text(tmp_path, tiny_tokenizer_dir):
    """Top-k ranks gate scores upstream, so down_proj's input is exactly zero at the dropped neurons: its decode
    steps run the kernel (threshold 0), with the text and counts of the masked-dense path."""
    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    texts, reports = {}, {}
    for mode in ("off", "on"):
        lm = SparseHFLM(pretrained=str(model_dir), topk=0.5, sparse_kernels=mode, device=DEVICE, batch_size=3,
                        dtype="float32")
        texts[mode] = _until(lm, EARLY_STOP_CONTEXTS, until=["w7"])
        reports[mode] = lm.sparsity_report()
    assert texts["on"] == texts["off"]
    assert reports["on"]["execution"]["down"] == {"prefill": "masked_dense", "decode": "sparse_kernel"}
    assert reports["on"]["phases"] == reports["off"]["phases"] and reports["on"]["phases"]["decode"]["ffn"] == 0.5


def test_sparse_hf_generate_until_kernels_match_masked_dense(tmp_path, tiny_tokenizer_dir):
    """`sparse-hf` with fat=EPS: down_proj runs the kernel in decode steps, and the text is the same."""
    from lm_sparse.kernels import decode
    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    contexts = ["w3 w9 w27 w81", "w5 w10 w15 w20 w25 w30", "w100"]
    outputs, reports = {}, {}
    for mode in ("off", "on"):
        lm = SparseHFLM(pretrained=str(model_dir), fat=FAT_EPS, sparse_kernels=mode, device=DEVICE,
                        batch_size=3, dtype="float32")
        outputs[mode] = _until(lm, contexts, until=["w7"])
        reports[mode] = lm.sparsity_report()
        if mode == "on":  # its static KV caches are freed when generate_until returns, made anew next time
            assert "caches" not in decode._STATE.get(lm.model, {})
            assert _until(lm, contexts, until=["w7"]) == outputs["on"]
    assert outputs["on"] == outputs["off"]
    assert all(len(o.split()) > 0 for o in outputs["off"])
    assert reports["off"]["execution"]["down"]["decode"] == "masked_dense"
    assert reports["on"]["execution"]["down"] == {"prefill": "masked_dense", "decode": "sparse_kernel"}
    for phase in ("prefill", "decode"):
        on, off = reports["on"]["phases"][phase], reports["off"]["phases"][phase]
        assert on["tokens"] == off["tokens"] > 0 and on["sparsity"] == off["sparsity"]
        assert 0.1 < on["sparsity"] < 0.9


def test_decode_counts_do_not_depend_on_the_batch_size(tmp_path, tiny_tokenizer_dir):
    """A row that finished before the others of its batch was fed its last token once more, and that step was
    counted: decode tokens and sparsity then differed between batch sizes."""
    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    seen = {}
    for mode in ("off", "on"):
        for batch_size in (1, 3):
            lm = SparseHFLM(pretrained=str(model_dir), fat=FAT_EPS, sparse_kernels=mode, device=DEVICE,
                            batch_size=batch_size, dtype="float32")
            text = _until(lm, EARLY_STOP_CONTEXTS)
            decode = lm.sparsity_report()["phases"]["decode"]
            seen[mode, batch_size] = (tuple(text), decode["tokens"], decode["sparsity"])
    assert seen[("off", 1)][0][0] == "w2 w42 "  # the early stop this test is about
    assert len(set(seen.values())) == 1, seen


def _with_generation_config(model_dir, **settings) -> None:
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(model_dir)
    for name, value in settings.items():
        setattr(config, name, value)
    config.save_pretrained(model_dir)


def _count_static_decoding(monkeypatch) -> list:
    """A list that gets one entry per `generate_static` call made through sparse-hf (the static-cache loop)."""
    from lm_sparse.kernels import decode

    calls: list = []
    real = decode.generate_static
    monkeypatch.setattr(decode, "generate_static", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("settings, static", [({"repetition_penalty": 1.5}, True), ({"max_new_tokens": 3}, True),
                                              ({"no_repeat_ngram_size": 2}, False)])
def test_kernel_decoding_follows_the_models_generation_config(tmp_path, tiny_tokenizer_dir, monkeypatch,
                                                               settings, static):
    """The static-cache loop applies what it can of the generation config (a repetition penalty, max_new_tokens)
    and leaves the rest to `generate`: the text is --model hf's either way."""
    from lm_eval.models.huggingface import HFLM

    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    _with_generation_config(model_dir, **settings)
    calls = _count_static_decoding(monkeypatch)
    hf = HFLM(pretrained=str(model_dir), device=DEVICE, batch_size=3, dtype="float32")
    # a FAT epsilon mild enough (about 3% of the neurons) to leave the text --model hf's, kernels still running
    lm = SparseHFLM(pretrained=str(model_dir), fat="0.002", sparse_kernels="on", device=DEVICE, batch_size=3,
                    dtype="float32")
    # with the early stop lifted, the first prompt loops on "w42 w111" without the penalty
    assert _until(lm, EARLY_STOP_CONTEXTS, until=["w999"]) == _until(hf, EARLY_STOP_CONTEXTS, until=["w999"])
    assert bool(calls) == static


def test_no_new_tokens_is_generates_error_with_kernels_too(tmp_path, tiny_tokenizer_dir):
    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    lm = SparseHFLM(pretrained=str(model_dir), fat=FAT_EPS, sparse_kernels="on", device=DEVICE, batch_size=1,
                    dtype="float32")
    with pytest.raises(ValueError, match="max_length"):  # as --model hf (it returned '' before)
        _until(lm, ["w3 w9"], max_gen_toks=0)


def test_kernel_decoding_runs_under_autocast_in_the_weights_dtype(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """mixed_precision_dtype equal to the weights' dtype: the static-cache loop runs under HFLM's autocast and
    gives the masked-dense text."""
    from lm_sparse.lm import SparseHFLM

    static_calls = _count_static_decoding(monkeypatch)
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    texts = {}
    for mode in ("off", "on"):
        lm = SparseHFLM(pretrained=str(model_dir), fat=FAT_EPS, sparse_kernels=mode, device=DEVICE, batch_size=2,
                        dtype="bfloat16", mixed_precision_dtype="bfloat16")
        texts[mode] = _until(lm, EARLY_STOP_CONTEXTS, until=["w7"], max_gen_toks=10)
    assert texts["on"] == texts["off"] and static_calls


def test_kernels_are_not_attached_under_autocast_to_another_dtype(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Autocast runs the masked-dense GEMMs in mixed_precision_dtype, a kernel would multiply the float32 weights
    as stored (outputs differed by 1.5e-3): sparse_kernels=on says so in one line, before loading where the dtype
    is given; auto leaves the kernels out."""
    from lm_sparse.config import SparsityArgumentError
    from lm_sparse.kernels.backend import attach_decode_kernels
    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")  # float32
    loads = []
    real_load = SparseHFLM._create_model
    monkeypatch.setattr(SparseHFLM, "_create_model", lambda self, *a, **k: loads.append(1) or real_load(self, *a, **k))
    args = dict(pretrained=str(model_dir), fat=FAT_EPS, sparse_kernels="on", device=DEVICE,
                mixed_precision_dtype="bfloat16")
    with pytest.raises(SparsityArgumentError, match="mixed_precision_dtype=bfloat16 .* dtype=bfloat16") as err:
        SparseHFLM(dtype="float32", **args)
    assert "\n" not in str(err.value) and not loads
    with pytest.raises(SparsityArgumentError, match="weights as stored \\(float32\\)"):
        SparseHFLM(**args)  # dtype=auto: known once loaded
    engine = SparsityEngine(make_tiny_model("llama").to(DEVICE))  # on a GPU, kernels attach to a CUDA model only
    engine.set_rules({s.index: Threshold(0.01) for s in engine.sites_in_groups("mlp_mid")})
    assert attach_decode_kernels(engine, required=False, allow_interpreter=True, autocast_dtype=torch.bfloat16) == []
    assert attach_decode_kernels(engine, required=False, allow_interpreter=True, autocast_dtype=torch.float32)
    # a model object: HFLM ignores dtype=, so only its weights' dtype decides (bfloat16 here: attached)
    bf16_model = make_tiny_model("llama").to(torch.bfloat16)
    lm = SparseHFLM(**{**args, "pretrained": bf16_model}, tokenizer=str(model_dir), dtype="float32", batch_size=1)
    assert lm.engine.decode_executors


def test_text_after_a_stop_reaches_the_answer_as_with_hf(tmp_path, tiny_tokenizer_dir):
    """lm-eval generates a batch until every row met a stop, and with think_end_token the answer is the text
    after it, which can lie beyond a row's stop: sparse-hf, dense or with kernels, answers what hf does."""
    from lm_eval.models.huggingface import HFLM

    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    contexts = EARLY_STOP_CONTEXTS[:2]
    free = _until(HFLM(pretrained=str(model_dir), device=DEVICE, batch_size=2, dtype="float32"), contexts,
                  until=["w999"])
    assert free[0].startswith("w2 w42 w111") and "w42" not in free[1]  # row 0 stops at w42, w111 comes after
    kwargs = dict(until=["w42"], max_gen_toks=8)
    common = dict(pretrained=str(model_dir), device=DEVICE, batch_size=2, dtype="float32", think_end_token="w111")
    expected = _until(HFLM(**common), contexts, **kwargs)
    assert _until(SparseHFLM(**common), contexts, **kwargs) == expected
    # the static-cache loop pads a row at its stop: it leaves such requests to generate
    with_kernels = SparseHFLM(fat=FAT_EPS, sparse_kernels="on", **common)
    reference = SparseHFLM(fat=FAT_EPS, sparse_kernels="off", **common)
    assert _until(with_kernels, contexts, **kwargs) == _until(reference, contexts, **kwargs)


def test_beam_search_in_a_batch_generates_like_hf(tmp_path, tiny_tokenizer_dir):
    """Beam search has more rows than prompts: the per-row stop answer falls back to lm-eval's (it crashed)."""
    from lm_eval.models.huggingface import HFLM

    from lm_sparse.lm import SparseHFLM

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "tiny")
    kwargs = dict(num_beams=2, max_gen_toks=6)
    hf = HFLM(pretrained=str(model_dir), device=DEVICE, batch_size=3, dtype="float32")
    lm = SparseHFLM(pretrained=str(model_dir), topk=0.5, device=DEVICE, batch_size=3, dtype="float32")
    dense = SparseHFLM(pretrained=str(model_dir), device=DEVICE, batch_size=3, dtype="float32")
    assert _until(dense, EARLY_STOP_CONTEXTS, **kwargs) == _until(hf, EARLY_STOP_CONTEXTS, **kwargs)
    assert len(_until(lm, EARLY_STOP_CONTEXTS, **kwargs)) == 3
