"""Single-token attention over a static KV cache without copying the cache for every query head.

With grouped-query attention (Llama 3: 32 query heads share 8 key/value heads), transformers' SDPA attention
copies each key/value head once for every query head that reads it (`repeat_kv`), unless SDPA does GQA itself.
On CUDA that needs no attention mask, and a static cache always has one. transformers avoids the copy for one
query token by other means, but not under torch.compile. So in a compiled decode step every layer copies its
whole key and value caches, times the group size: two more launches a layer, and writes that grow with the cache.

For one query token, the query heads of a group can instead be the rows of one query:
[B, H, 1, D] -> [B, H_kv, H / H_kv, D]. Every row of a group attends to the same keys under the same mask, so
the result is the same attention, with the cache read in place. `grouped_query_decoding(model)` makes a model
with SDPA attention use this while it decodes; anything else (prefill, per-head masks, biases, softcapping)
goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lm_sparse_grouped_sdpa"  # the attention implementation's name in transformers' registries


def grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: [B, H, T, D] query, [B, H_kv, S, D] key and value ->
    ([B, T, H, D] output, None). One query token with grouped heads runs packed; the rest runs as "sdpa"."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, heads, tokens, dim = query.shape
    groups = heads // key.shape[1]
    packable = (tokens == 1 and groups > 1 and groups * key.shape[1] == heads
                and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                and (attention_mask is None or attention_mask.shape[1] == 1))
    if not packable:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
    packed = query.reshape(batch, heads // groups, groups, dim)
    # a [B, 1, 1, S] mask broadcasts over the packed rows: all of them are the same position
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register `grouped_sdpa` under NAME, with SDPA's mask function (a name without one would get no mask)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def grouped_query_decoding(model: nn.Module) -> Iterator[bool]:
    """While open, a model whose attention is transformers' "sdpa" runs `grouped_sdpa`; yields whether it
    does. Other implementations (eager, flash attention, a user's own) are left as they are."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
