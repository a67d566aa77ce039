"""HFLM's own arguments pass through sparse-hf untouched, next to the sparsity arguments."""

from __future__ import annotations

import torch

from conftest import save_tiny_model
from lm_sparse import SparseHFLM


def test_hflm_arguments_keep_working(tmp_path, tiny_tokenizer_dir):
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "llama")
    lm = SparseHFLM(pretrained=str(model_dir), topk="0.5", device="cpu", dtype="bfloat16", max_length=48,
                    batch_size="auto", max_batch_size=4, revision="main", trust_remote_code=False,
                    add_bos_token=True, logits_cache=False, attn_implementation="eager")
    assert lm.model.dtype == torch.bfloat16
    assert lm.max_length == 48
    assert lm.batch_size_per_gpu == "auto" and lm.max_batch_size == 4
    assert lm.add_bos_token is True and lm.logits_cache is False
    assert lm.model.config._attn_implementation == "eager"  # a from_pretrained kwarg, passed through
    assert lm.sparsity_config.rule == "topk" and lm.sparsity_config.level == 0.5
    assert type(lm).loglikelihood_rolling.__qualname__.startswith("SparseHFLM")  # counts are reduced after it


def test_prebuilt_model_instance(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny_model("qwen2", tiny_tokenizer_dir, tmp_path / "qwen2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = SparseHFLM(pretrained=model, tokenizer=tok, fat=0.0)
    assert lm.engine.sites[0].module is model.model.layers[0].self_attn.q_proj
    # no copy of any weight: the engine holds the model's own modules
    params = {p.data_ptr() for p in model.parameters()}
    assert all(s.module.weight.data_ptr() in params for s in lm.engine.sites)


def test_from_pretrained_keywords_that_look_like_sparsity_arguments_pass(tmp_path, tiny_tokenizer_dir):
    """use_kernels= is transformers' (close to sparse_kernels=, once rejected as its typo); the keywords passed
    on to from_pretrained are part of the threshold cache's model identity."""
    import pytest

    from lm_sparse.config import SparsityArgumentError

    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "llama")
    lm = SparseHFLM(pretrained=str(model_dir), topk="0.5", device="cpu", use_kernels=False)
    assert lm.load_kwargs == {"use_kernels": False}
    with pytest.raises(SparsityArgumentError, match="did you mean sparse_kernels"):
        SparseHFLM(pretrained=str(model_dir), topk="0.5", device="cpu", sparse_kernel="off")


def test_weights_offloaded_to_disk(tmp_path, tiny_tokenizer_dir):
    """Weights on the meta device (accelerate's disk offload): the counts live on a real device, the report is
    made, and calibration says in one line that it cannot run."""
    import pytest

    from lm_sparse.config import SparsityArgumentError, parse_sparsity_args
    from lm_sparse.engine.engine import SparsityEngine
    from lm_sparse.methods import build_rules
    from lm_sparse.testing import make_tiny_model

    model = make_tiny_model("llama")
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.empty_like(model.model.embed_tokens.weight,
                                                                          device="meta"))
    engine = SparsityEngine(model)
    assert engine.counter.device.type == "cpu"
    assert engine.report()["tokens"] == 0
    with pytest.raises(SparsityArgumentError, match="calibrating pplp needs every weight in memory"):
        (tmp_path / "x.txt").write_text("w1 w2 w3")
        build_rules(engine, parse_sparsity_args({"ppl_p": 1, "calib_data": str(tmp_path / "x.txt")}))
