"""`sparse-hf`: lm-eval's HFLM with activation sparsity applied and measured.

Every HFLM argument works unchanged; the sparsity arguments (`lm_sparse.config.SPARSITY_ARGS`) are taken
out and validated before the model loads. The engine's hooks are installed around each model call (the
shape of lm-eval's `hf_steered`), so the wrapped model is untouched between calls. With no sparsity
argument the forward is the dense one: the hooks only count, and logprobs equal `--model hf` exactly.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock  # patch.object: swap an lm-eval module attribute for one call, always restored

import torch
import lm_eval.models.huggingface as hf_module  # HFLM's module: some of its names are swapped per call
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import __version__
from .config import SPARSITY_ARGS, SparsityArgumentError, SparsityConfig, parse_sparsity_args, \
    split_sparsity_kwargs
from .engine.arch import UnsupportedArchitectureError, check_model_type
from .engine.engine import SparsityEngine
from .methods import build_rules, describe_method
from .models import resolve_pretrained

logger = logging.getLogger(__name__)

_HFLM_PARAMS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
# from_pretrained keywords close to a sparsity argument's name (HFLM passes unknown keys on to it)
_FROM_PRETRAINED_LOOKALIKES = frozenset({"use_kernels", "kernel_config", "allow_all_kernels"})
_SPARSE_PREFIXES = ("calib", "teal", "sparse", "ppl", "top", "threshold", "recalib")


def _reject_misspelled(kwargs: dict[str, Any]) -> None:
    """Unknown keys close to a sparsity argument are typos, not from_pretrained kwargs: say so."""
    for key in kwargs:
        if key in SPARSITY_ARGS or key in _HFLM_PARAMS or key in _FROM_PRETRAINED_LOOKALIKES:
            continue
        close = difflib.get_close_matches(key.lower(), list(SPARSITY_ARGS), n=1, cutoff=0.75)
        if close or key.lower().startswith(_SPARSE_PREFIXES):
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SparsityArgumentError(
                f"sparse-hf: unknown sparsity argument {key!r}{hint}; allowed: {', '.join(SPARSITY_ARGS)}"
            )


def _early_architecture_check(pretrained: Any, kwargs: dict[str, Any]) -> None:
    """Read only the config, so an unsupported architecture fails before any weight is loaded."""
    if not isinstance(pretrained, str):
        config = getattr(pretrained, "config", None)
        if config is not None:
            check_model_type(getattr(config, "model_type", None))
        return
    try:
        from transformers import AutoConfig

        extra = {k: kwargs[k] for k in ("gguf_file", "subfolder") if kwargs.get(k)}
        config = AutoConfig.from_pretrained(
            pretrained, revision=kwargs.get("revision") or "main",
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)), **extra,
        )
    except Exception as exc:  # HFLM raises the real loading error a moment later, with its own message
        logger.debug("sparse-hf: early config read failed: %s", exc)
        return
    check_model_type(getattr(config, "model_type", None))


def _early_autocast_check(pretrained: Any, config: SparsityConfig, kwargs: dict[str, Any]) -> None:
    """sparse_kernels=on with a mixed_precision_dtype other than an explicit dtype: the error, before loading
    (with dtype=auto it comes from attach_decode_kernels once the weights' dtype is known)."""
    mixed, dtype = kwargs.get("mixed_precision_dtype"), kwargs.get("dtype")
    # (HFLM takes dtype= only for a model it loads: not for a model object passed as pretrained=)
    if config.sparse_kernels != "on" or mixed is None or dtype in (None, "auto") or not isinstance(pretrained, str):
        return
    try:
        mixed, dtype = hf_module.get_dtype(mixed), hf_module.get_dtype(dtype)
    except AttributeError:  # not a dtype name: HFLM says so, in its own words
        return
    if isinstance(mixed, torch.dtype) and isinstance(dtype, torch.dtype) and mixed != dtype:
        from .kernels.backend import autocast_conflict

        raise SparsityArgumentError(autocast_conflict(dtype, mixed))


def per_row_stop_criteria(tokenizer: Any, stop: list[str], initial_length: int, batch: int,
                          on_done: Callable[[torch.Tensor], None] | None = None, eos_ids: Sequence[int] = (),
                          per_row: bool = True):
    """lm-eval's stop-sequence criteria, which also say which rows are done.

    lm-eval's criteria say "done" only when every row has met a stop sequence, so a row that finished early
    goes on generating real tokens until the last one does. `on_done` receives the rows done after each
    step (stop sequence, or an EOS among `eos_ids`), so the engine does not count their later steps (the
    decode counts would otherwise depend on the batch size). `per_row=False` keeps lm-eval's answer, so
    `generate` produces exactly what `--model hf` does: the text after a stop can reach an answer (a stop
    string that is a special token is dropped by the decode before lm-eval cuts at it; `think_end_token` is
    split off before the cut). `per_row=True` answers per row (finished rows are padded, as after EOS), for
    the static-cache loop where that text cannot matter. With beam search (more rows than prompts) the
    answer is lm-eval's.
    """
    from lm_eval.models.utils_hf import stop_sequences_criteria
    from transformers import StoppingCriteria, StoppingCriteriaList

    batch_level = stop_sequences_criteria(tokenizer, stop, initial_length, batch)

    class PerRow(StoppingCriteria):
        eos: torch.Tensor | None = None  # `eos_ids` on the rows' device, made at the first step, not at each

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            n = input_ids.shape[0]
            done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
            for criterion in batch_level:
                answer = criterion(input_ids, scores, **kwargs)
                rows = getattr(criterion, "done_tracker", None)  # lm-eval's per-row record behind its answer
                if rows is not None and len(rows) == n:
                    done |= torch.tensor(rows, device=done.device)
                else:  # beam search: n rows are beams, lm-eval tracks prompts; its batch-level answer holds
                    done |= torch.as_tensor(bool(answer), device=done.device).expand(n)
            if on_done is not None:  # rows whose last token is EOS are done too (generate's own criterion)
                if self.eos is None:
                    self.eos = torch.tensor(list(eos_ids), dtype=input_ids.dtype, device=input_ids.device)
                on_done(done | torch.isin(input_ids[:, -1], self.eos))
            return done if per_row else done.all().expand(n)

    return StoppingCriteriaList([PerRow()])


@register_model("sparse-hf")
class SparseHFLM(HFLM):
    """HFLM that sparsifies activations (Top-k, FAT, PPL-p%, TEAL) and reports the sparsity it measured."""

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        sparse_args, hf_kwargs = split_sparsity_kwargs(kwargs)
        _reject_misspelled(hf_kwargs)
        self.sparsity_config: SparsityConfig = parse_sparsity_args(sparse_args)
        if pretrained is None:
            raise SparsityArgumentError("sparse-hf: pretrained= is required (a Hub id, a local directory or smollm2)")
        pretrained = resolve_pretrained(pretrained)
        _early_architecture_check(pretrained, hf_kwargs)
        _early_autocast_check(pretrained, self.sparsity_config, hf_kwargs)
        super().__init__(pretrained=pretrained, **hf_kwargs)
        # HFLM does not keep these; the threshold cache keys by them (identity.lm_model_identity)
        self.gguf_file = hf_kwargs.get("gguf_file")
        self.subfolder = hf_kwargs.get("subfolder") or None
        self.load_kwargs = {k: v for k, v in hf_kwargs.items() if k not in _HFLM_PARAMS}  # to from_pretrained
        # No pad_token_id: a generated token equal to it is a real token (lm-eval pads with the unk or EOS id);
        # the stop criteria tell the engine which rows are done (per_row_stop_criteria), in both decode loops.
        self.engine = SparsityEngine(self._model, sparse_prefill=self.sparsity_config.sparse_prefill)
        rules, self.calibration = build_rules(self.engine, self.sparsity_config, self.tokenizer, self)
        self.engine.set_rules(rules)
        self._setup_decode_backend()
        _register_summary(self)

    def _setup_decode_backend(self) -> None:
        """Hand decode-step products to the sparse kernels and prefill masking to the fused mask kernel
        where they apply (CUDA, threshold rules)."""
        mode = self.sparsity_config.sparse_kernels
        if mode == "off" or self.sparsity_config.is_dense:
            return
        try:
            from .kernels.backend import attach_decode_kernels, attach_prefill_masks
        except ImportError:
            if mode == "on":
                raise
            return
        attach_decode_kernels(self.engine, required=(mode == "on"), autocast_dtype=self.mixed_precision_dtype)
        attach_prefill_masks(self.engine)

    # -- model calls: hooks live only inside them ----------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        with self.engine.attached():
            if attn_mask is None and self.backend == "causal":
                # Right-padded loglikelihood batch: rows are committed by `_select_cont_toks`.
                with self.engine.deferring():
                    return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.sparsity_config.sparse_prefill != "last_half" or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # last_half needs each row's real length during the forward; HFLM right-pads the batch without an
        # attention mask, and its pad_and_concat is where the lengths are known: record them on the way.
        pad_and_concat = hf_module.pad_and_concat

        def recording(max_length: int, tensors: list, padding_side: str = "right"):
            if padding_side == "right":
                self.engine.set_row_lengths([len(t) for t in tensors])
            return pad_and_concat(max_length, tensors, padding_side=padding_side)

        try:
            with mock.patch.object(hf_module, "pad_and_concat", recording):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self.engine.set_row_lengths(None)

    def _select_cont_toks(self, logits: torch.Tensor, contlen: int | None = None,
                          inplen: int | None = None) -> torch.Tensor:
        if self.backend == "causal" and inplen:
            self.engine.counter.commit_row(int(inplen))
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any):
        from .kernels.decode import eos_token_ids

        with self.engine.attached():
            plan = self._static_decode_plan(context, max_length, stop, kwargs)
            if plan is not None:
                # Sparse kernels on CUDA: static KV cache + compiled decode step, so kernel time is not
                # hidden behind Python overhead (lm_sparse/kernels/decode.py).
                from .kernels.decode import generate_static

                processors, max_new = plan
                criteria = per_row_stop_criteria(self.tokenizer, stop, context.shape[1], context.shape[0],
                                                 on_done=self.engine.mark_finished,
                                                 eos_ids=eos_token_ids(self.model))
                mixed = self.mixed_precision_dtype
                try:
                    with torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None):
                        return generate_static(self.model, context, kwargs.get("attention_mask"), max_new,
                                               criteria, self.tokenizer.pad_token_id, None,
                                               logits_processor=processors)
                finally:
                    self.engine.clear_finished()

            # HFLM builds its criteria from this name; the engine learns which rows are done from them
            criteria = functools.partial(per_row_stop_criteria, on_done=self.engine.mark_finished,
                                         eos_ids=eos_token_ids(self.model), per_row=False)
            try:
                with mock.patch.object(hf_module, "stop_sequences_criteria", criteria):
                    return super()._model_generate(context, max_length, stop, **kwargs)
            finally:
                self.engine.clear_finished()

    def _static_decode_plan(self, context: torch.Tensor, max_length: int, stop: list[str],
                            kwargs: dict[str, Any]):
        """(logits processors, new tokens) when this request decodes with the static-cache engine: sparse
        kernels attached, greedy, at least one new token, and nothing in the model's generation config that
        only `generate` applies, nor a stop whose later text lm-eval could keep (else None: `generate` runs, with
        the same kernels and Python's overhead)."""
        if not self.engine.decode_executors or not self._is_greedy(kwargs) or max_length - context.shape[1] < 1:
            return None
        from .kernels import decode

        # The loop pads a row once it meets a stop; where lm-eval's answer can keep text after the stop (see
        # per_row_stop_criteria), `generate` runs instead.
        # (lm-eval always adds the EOS token's text to the stops: an EOS of the generation config ends a row in
        # both loops alike, so that stop does not count.)
        eos = decode.eos_token_ids(self.model)
        eos_text = {self.tokenizer.decode([i]) for i in eos} | set(self.tokenizer.convert_ids_to_tokens(eos))
        special = set(getattr(self.tokenizer, "all_special_tokens", []) or []) - eos_text
        if getattr(self, "think_end_token", None) or any(s in special for s in (stop or [])):
            return None
        return decode.static_generation_plan(self.model, max_length - context.shape[1])

    @staticmethod
    def _is_greedy(kwargs: dict[str, Any]) -> bool:
        sampling = {k for k in kwargs if k not in ("attention_mask", "do_sample", "temperature", "until")}
        return not kwargs.get("do_sample") and not kwargs.get("temperature") and not sampling

    def _detect_batch_size(self, requests: Any = None, pos: int = 0) -> int:
        # The probe batches are not real tokens: run them sparse (same cost) but do not count them.
        with self.engine.paused():
            return super()._detect_batch_size(requests, pos)

    # -- request types: reduce the counts over ranks after each ----------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self.engine.counter.synchronize(distributed=self.world_size > 1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.engine.counter.synchronize(distributed=self.world_size > 1)

    def generate_until(self, requests, disable_tqdm: bool = False):
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self.engine.counter.synchronize(distributed=self.world_size > 1)
            if self.engine.decode_executors:  # the static-cache loop ran: free its KV caches
                from .kernels.decode import release_static_caches

                release_static_caches(self.model)

    # -- reporting ------------------------------------------------------------------------------------
    def sparsity_report(self) -> dict[str, Any]:
        """The measured sparsity and everything that defines it (lands in results['config']['sparsity'])."""
        cfg = self.sparsity_config
        report = {
            "method": cfg.rule,
            "label": describe_method(cfg, self.engine),
            "params": cfg.params(),
            "lm_sparse_version": __version__,
            "world_size": int(self.world_size),
            "calibration": self.calibration,
        }
        report.update(self.engine.report())
        return report

    def get_model_info(self) -> dict:
        """HFLM's model info plus the sparsity report. lm-eval asks for it once per evaluation, after the
        requests ran; the counts then restart, so an LM object reused for another `simple_evaluate` reports
        that run alone (single process: under data parallelism only rank 0 is asked, and the ranks' counts
        must stay in step, so there they keep adding up)."""
        info = super().get_model_info()
        info["sparsity"] = self.sparsity_report()
        _LAST_REPORT["report"] = info["sparsity"]
        if not info["sparsity"].get("tokens") and not self.sparsity_config.is_dense:
            from .report.summary import NOTHING_MEASURED

            logger.warning("sparse-hf: %s", NOTHING_MEASURED)
        if int(self.world_size) == 1:
            self.engine.reset()
        return info


# -- the short summary printed after lm-eval's own table (CLI runs only) -------------------------------
_LAST_REPORT: dict[str, Any] = {}
_SUMMARY_REGISTERED = False


def _is_cli_run() -> bool:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return prog in ("lm_eval", "lm-eval", "lm-sparse", "lm_sparse") or getattr(spec, "name", "") in (
        "lm_eval", "lm_eval.__main__")


def _print_summary() -> None:
    report = _LAST_REPORT.get("report")
    if report is None:
        return
    from .report.summary import format_summary

    print(format_summary(report), flush=True)


def _prints_summary() -> bool:
    """lm_eval and `lm-sparse eval` print the summary after lm-eval's table; `lm-sparse sweep`/`demo` run many
    evaluations in one process and print their own tables (an exit-time one would repeat the last level)."""
    if not _is_cli_run():
        return False
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return prog not in ("lm-sparse", "lm_sparse") or (len(sys.argv) > 1 and sys.argv[1] == "eval")


def _register_summary(lm: SparseHFLM) -> None:
    global _SUMMARY_REGISTERED
    if _SUMMARY_REGISTERED or lm.rank != 0 or not _prints_summary():
        return
    _SUMMARY_REGISTERED = True
    atexit.register(_print_summary)


__all__ = ["SparseHFLM", "SparsityArgumentError", "UnsupportedArchitectureError"]


def _install_clean_errors() -> None:
    """Under the lm_eval CLI, our argument errors print as one line instead of a traceback."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # noqa: ANN001
        if issubclass(exc_type, (SparsityArgumentError, UnsupportedArchitectureError)):
            print(f"error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    sys.excepthook = hook


if _is_cli_run():
    _install_clean_errors()
