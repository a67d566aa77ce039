"""Generation with a static KV cache and a compiled single-token decode step.

`model.generate` spends most of a decode step in Python when the matrices are small or sparse; with a
static cache every step has the same shapes, so the step compiles once (CUDA graphs on CUDA) and the
sparse kernels' time is not hidden behind overhead. On CPU the same loop runs eagerly.

Greedy only: it returns what `model.generate(do_sample=False)` returns for the same inputs (left-padded
batches included): finished rows are filled with `pad_token_id`, and the loop stops when every row hit
EOS or a stopping criterion, or after `max_new_tokens`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StaticCache, StoppingCriteriaList

from lm_sparse.kernels.grouped_attention import grouped_query_decoding


def eos_token_ids(model: nn.Module, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """The EOS ids generation stops at: `eos_token_id` if given, else the model's generation config's."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


# Generation-config settings generate_static does not reproduce, each with its no-op values: a model whose
# generation_config sets one decodes through `generate` instead (sampling-only settings such as top_p are
# ignored by greedy `generate` too, and renormalize_logits/remove_invalid_values do not move an argmax).
UNSUPPORTED_GENERATION = {
    "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None, []), "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []), "sequence_bias": (None, {}), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,), "num_beams": (None, 1), "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0), "penalty_alpha": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "max_time": (None,), "stop_strings": (None, []), "dola_layers": (None,),
    "encoder_repetition_penalty": (None, 1.0),
}


def static_generation_plan(model: nn.Module, max_new_tokens: int) -> tuple[LogitsProcessorList, int] | None:
    """What greedy `model.generate` would do on top of argmax, as generate_static can do it: the logits
    processors (a repetition penalty) and the number of new tokens (the generation config's max_new_tokens
    takes precedence over lm-eval's max_length in `generate`). None: a setting of the model's generation
    config that only `generate` applies (named in UNSUPPORTED_GENERATION)."""
    config = getattr(model, "generation_config", None)
    processors = LogitsProcessorList()
    if config is None:
        return processors, max_new_tokens
    for name, neutral in UNSUPPORTED_GENERATION.items():
        if getattr(config, name, None) not in neutral:
            return None
    penalty = getattr(config, "repetition_penalty", None)
    if penalty is not None and float(penalty) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(penalty)))
    configured = getattr(config, "max_new_tokens", None)
    return processors, (int(configured) if configured is not None else max_new_tokens)


def default_attention_mask(input_ids: torch.Tensor, pad_token_id: int | None, eos_ids: list[int]) -> torch.Tensor:
    """transformers' rule: mask out pad tokens when a pad id is given, present and not an EOS id."""
    if pad_token_id is not None and pad_token_id not in eos_ids and bool((input_ids == pad_token_id).any()):
        return (input_ids != pad_token_id).long()
    return torch.ones_like(input_ids)


# Per model: the reusable StaticCache (and its key) and the compiled decode step.
_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CACHE_BUCKET = 256  # cache lengths are rounded up to a multiple of this, to bound recompilations
MAX_CACHES = 4  # static caches kept per model, one per (batch size, cache-length bucket)
# ... and all of them together at most this many times the largest one's memory: an lm-eval run's requests
# come longest first, so its buckets shrink as it goes, and four caches of a large batch would hold four times
# the KV memory that `batch_size=auto` planned for.
MAX_CACHE_MEMORY = 2
# torch.compile options of the decode step (CUDA graphs through "reduce-overhead"); the tests swap in a
# counting backend with fullgraph=True to prove the engine's hooks and the kernel ops trace without a break.
COMPILE_OPTIONS: dict = {"mode": "reduce-overhead", "dynamic": False}
# Every (batch size, cache-length bucket) is one compiled variant of the step; an lm-eval run meets a handful
# per task. Past dynamo's default limit of 8 the step would silently run eagerly, so decoding raises it.
RECOMPILE_LIMIT = 64


def _recompile_limit() -> object:
    """A context that lets the decode step keep RECOMPILE_LIMIT compiled variants (torch >= 2.4 names)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(int(getattr(config, name)), RECOMPILE_LIMIT)})


def forget_compiled_step(model: nn.Module) -> None:
    """Drop the model's compiled decode step and static cache (and dynamo's caches): the next call compiles
    afresh, e.g. under other compile options (the tests' counting backends).

    Not needed between levels of one method: kernels re-attached at other thresholds pass the step's guards
    (the thresholds are graph inputs), so one compiled step serves every level (bench_decode.py relies on it).
    """
    _STATE.pop(model, None)
    torch._dynamo.reset()


def _static_addresses_unguarded() -> bool:
    """Whether dynamo leaves tensors marked as static addresses (transformers marks the StaticCache's) unguarded,
    as since torch 2.10. Before, each was guarded by identity and held by the compiled step: a cache made anew
    recompiled the step, and the old one stayed alive there."""
    try:
        return inspect.signature(torch._dynamo.mark_static_address).parameters["guard"].default is False
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


def release_static_caches(model: nn.Module) -> None:
    """Free the model's static KV caches; the compiled step stays. They are kept across the batches of one
    `generate_until` (its batch sizes alternate); sparse-hf frees them when it returns, so the tasks that
    follow (loglikelihood batches sized by `batch_size=auto`) have that memory. Caches made later get other
    addresses, so CUDA graphs recorded before re-record once. Where a compiled step holds its caches
    (torch < 2.10, see `_static_addresses_unguarded`), they are kept: freeing would free nothing and
    recompile the step at every call."""
    state = _STATE.get(model)
    if state is not None and ("compiled" not in state or _static_addresses_unguarded()):
        state.pop("caches", None)


def _static_cache(model: nn.Module, batch: int, total: int, device: torch.device) -> tuple[StaticCache, int]:
    """The model's StaticCache for this batch and length bucket (reset and reused, or made anew), its length.

    Up to MAX_CACHES are kept, most recently used last, holding together at most MAX_CACHE_MEMORY times the
    largest one's memory: a compiled variant's CUDA graph holds its cache's addresses, so an lm-eval run that
    alternates batch sizes (the last batch of a task is smaller) reuses recorded graphs instead of re-recording
    one at every switch.
    """
    caches = _STATE.setdefault(model, {}).setdefault("caches", {})
    cache_len = -(-total // CACHE_BUCKET) * CACHE_BUCKET
    key = (batch, cache_len, device)
    cache = caches.pop(key, None)
    if cache is not None:
        cache.reset()
    else:
        # Free the least recently used buffers before allocating. One model's cache memory grows with
        # batch x length (sliding-window layers cap theirs, so this overestimates them).
        def too_much() -> bool:
            sizes = [b * n for b, n, _ in caches] + [batch * cache_len]
            return len(caches) >= MAX_CACHES or sum(sizes) > MAX_CACHE_MEMORY * max(sizes)

        while caches and too_much():
            caches.pop(next(iter(caches)))
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
    caches[key] = cache
    return cache, cache_len


def cache_argument(model: nn.Module) -> str:
    """The name `model.forward` takes its KV cache under: `cache` in newer transformers 5 releases,
    `past_key_values` before (5.17 and 4.x). Passing the wrong one would be swallowed by `**kwargs` and
    the model would decode every step without its history."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decode_step(model: nn.Module) -> Callable:
    cache_name = cache_argument(model)

    def step(ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
             cache: StaticCache) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_name: cache})
        return out.logits[:, -1, :].float()

    return step


@torch.no_grad()
def generate_static(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 256, stopping_criteria: StoppingCriteriaList | None = None,
                    pad_token_id: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                    compile: bool | None = None, logits_processor: LogitsProcessorList | None = None
                    ) -> torch.Tensor:
    """Greedy decoding with a StaticCache: [B, prompt] ids -> [B, prompt + generated] ids.

    `attention_mask` defaults to transformers' rule (pad tokens masked); `eos_token_id` to the model's
    generation config; `compile` to True on CUDA (`torch.compile(mode="reduce-overhead")` on the decode
    step), False elsewhere. `stopping_criteria` are called like in `generate` (ids, scores) -> [B] bool;
    `logits_processor` (ids, float32 scores) -> scores runs before each argmax, as in `generate`.
    A row that is done is fed padding from its next step on, so the engine never counts a step of it.
    """
    eos_ids = eos_token_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    if attention_mask is None:
        attention_mask = default_attention_mask(input_ids, pad_token_id, eos_ids)
    if max_new_tokens < 1:
        return input_ids
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if compile is None:
        compile = device.type == "cuda"
    cache, cache_len = _static_cache(model, batch, total, device)
    # One mask of the cache's length for every step: fixed shapes, so the compiled step does not
    # recompile from step to step (nor from call to call within one cache-length bucket).
    mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
    mask[:, :prompt_len] = attention_mask
    mask[:, prompt_len:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, device=device, dtype=input_ids.dtype)
    criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()

    state = _STATE.setdefault(model, {})
    step = _decode_step(model)
    if compile:
        if "compiled" not in state:  # compiled once per model, reused by every later call
            state["compiled"] = torch.compile(step, **COMPILE_OPTIONS)
    ids = torch.empty(batch, total, dtype=input_ids.dtype, device=device)
    ids[:, :prompt_len] = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    length = prompt_len
    # decode steps read the grouped KV cache in place (no per-head copy of it); prefill runs as before
    with grouped_query_decoding(model), _recompile_limit() if compile else nullcontext():
        logits = step(input_ids, positions[:, :prompt_len], mask[:, :prompt_len], cache)  # prefill, eager
        step = state["compiled"] if compile else step
        while True:
            if logits_processor:
                logits = logits_processor(ids[:, :length], logits)
            next_tokens = torch.where(unfinished, logits.argmax(-1), pad_token_id).to(ids.dtype)
            ids[:, length] = next_tokens
            length += 1
            done = torch.isin(next_tokens, eos) if len(eos_ids) else torch.zeros_like(unfinished)
            if len(criteria):
                done = done | criteria(ids[:, :length], logits)
            unfinished = unfinished & ~done
            if length >= total or not bool(unfinished.any()):
                break
            # A row that just finished would feed its last real token once more (as `generate` does): feed
            # padding instead, which its output ignores and the engine does not count.
            fed = torch.where(unfinished, next_tokens, pad_token_id).to(ids.dtype)
            logits = step(fed[:, None], positions[:, length - 1:length], mask, cache)
    return ids[:, :length]
