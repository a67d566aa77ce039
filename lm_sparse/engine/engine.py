"""The sparsity engine: applies rules to the inputs of a model's linear layers and counts what it zeroed.

The engine never copies a weight and never replaces a transformers forward: it installs forward
pre-hooks on the linear layers named by the architecture table (and one pair of hooks on the model itself
to learn, per forward pass, whether it is prefill or decode and which tokens are real), inside a context
manager that removes every hook in `finally`.

Seams for the other parts of lm-sparse:
- a method builds `{site index: Rule}` (Top-k, FAT, PPL-p% thresholds, TEAL thresholds) and passes it to
  `set_rules`; sites without a rule are left alone and not counted;
- a decode backend (the Triton kernels) may take over a site's matrix product in decode steps by
  registering an executor with `set_decode_executor`; the report then says `sparse_kernel` for it (or
  `dense_fallback` for steps of more rows than the kernel serves at that site);
- a fused masker (`set_prefill_masker`: one pass that masks x and counts its zeros) may replace the
  rule's torch ops in multi-token forwards; the report then says `masked_dense_fused` for prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .accounting import PHASES, SparsityCounter
from .arch import FFN_GROUPS, Site, activation_name, resolve_activation_modules, resolve_sites
from .rules import CountOnly, OnGateScore, Rule, Threshold

PREFILL, DECODE = 0, 1


def _first_tensor(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _zeros_per_token(y: torch.Tensor) -> torch.Tensor:
    """The zero entries of y along its last dimension (count_nonzero needs no boolean copy of y)."""
    return y.shape[-1] - torch.count_nonzero(y, dim=-1)


class SparsityEngine:
    """Sparsify and count the inputs of a causal LM's linear layers.

    Typical use::

        engine = SparsityEngine(model)
        engine.set_rules({s.index: TopK(0.5, s.in_features) for s in engine.sites_named("down")})
        with engine.attached():
            model(input_ids)
        engine.counter.synchronize()
        print(engine.report())
    """

    #: decode steps of more rows are recorded as this many; executors serve at most ROWS_CAP - 1 rows sparse
    ROWS_CAP = 9

    def __init__(self, model: nn.Module, sparse_prefill: str = "all", pad_token_id: int | None = None):
        self.model = model
        self.sites: list[Site] = resolve_sites(model)
        self.activation = activation_name(model.config)
        self.sparse_prefill = sparse_prefill
        self.pad_token_id = pad_token_id
        self.rules: dict[int, Rule] = {}
        self.decode_executors: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.prefill_maskers: dict[int, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {}
        #: per site index: the most rows its executor serves with the sparse kernel (more: a dense GEMM)
        self.executor_max_rows: dict[int, int] = {}
        # where the counts live: not the meta device of weights accelerate offloaded to disk
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        # Row counts of the decode steps that ran executors (capped at ROWS_CAP), which with
        # `executor_max_rows` say which path each site took. A device tensor written in place, not a Python
        # dict: a compiled step guards on a dict's contents and would recompile when it changes.
        self._decode_rows_seen = torch.zeros(self.ROWS_CAP + 1, dtype=torch.bool, device=device)
        if device.type == "cuda":  # CUDA graphs keep writing to this very tensor
            torch._dynamo.mark_static_address(self._decode_rows_seen)
        self.counter = SparsityCounter([s.in_features for s in self.sites], device=device)
        self.counting = True
        self.deferred = False
        # Decode executors return (y, zeros per row or None) so eager counting needs no second masked copy of x.
        self.executor_counts = True
        self._handles: list[Any] = []
        # per-forward state, set by the model-level pre-hook
        self._phase = PREFILL
        self._valid: torch.Tensor | None = None
        self._half_cut: torch.Tensor | None = None  # sparse_prefill=last_half: first sparsified position per row
        self._records: dict[int, torch.Tensor] = {}
        # Real lengths of the rows of the next right-padded forward (no attention mask), from the LM
        self._next_row_lengths: list[int] | None = None
        # Rows of the running `generate` that are done (stop sequence or EOS), from the LM's stop criteria
        self._finished_rows: torch.Tensor | None = None

    # -- configuration --------------------------------------------------------------------------------
    def sites_named(self, *names: str) -> list[Site]:
        return [s for s in self.sites if s.name in names]

    def sites_in_groups(self, *groups: str) -> list[Site]:
        return [s for s in self.sites if s.group in groups]

    def set_rules(self, rules: dict[int, Rule]) -> None:
        """Install the rule of each site (by site index); sites left out are not touched or counted."""
        by_index = {s.index: s for s in self.sites}
        for index, rule in rules.items():
            if isinstance(rule, OnGateScore) and (index not in by_index or by_index[index].group != "mlp_mid"):
                raise ValueError(f"OnGateScore rules belong on down_proj sites (the FFN intermediate), "
                                 f"not site {index}")
        self.rules = dict(rules)
        for index, rule in self.rules.items():
            weight = getattr(by_index[index].module, "weight", None) if index in by_index else None
            if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
                for r in (rule, getattr(rule, "inner", None)):  # OnGateScore's inner rule sees the same dtype
                    if isinstance(r, Threshold):
                        r.prepare(weight.device, weight.dtype)

    def count_natural_zeros(self) -> None:
        """Count, without changing, the FFN intermediate of every layer (dense runs, ReLU-family models)."""
        self.set_rules({s.index: CountOnly() for s in self.sites_in_groups("mlp_mid")})

    def set_row_lengths(self, lengths: list[int] | None) -> None:
        """The real lengths of the rows of the next forward, which is right-padded without an attention mask
        (lm-eval's loglikelihood batches): `sparse_prefill=last_half` then cuts each row at half its own length,
        whatever the batch's padded length."""
        self._next_row_lengths = None if lengths is None else [int(n) for n in lengths]

    def mark_finished(self, rows: torch.Tensor) -> None:
        """Rows [B] bool of the running `generate` that are done: `generate` feeds such a row its last token
        once more before padding it, and that step is not a real token (counting it made decode counts
        depend on the batch size). Cleared by `clear_finished` when the generate call ends."""
        rows = rows.detach().bool().reshape(-1)
        previous = self._finished_rows
        self._finished_rows = rows if previous is None or previous.shape != rows.shape else previous | rows

    def clear_finished(self) -> None:
        self._finished_rows = None

    def reset(self) -> None:
        """Zero the counts and forget the decode steps seen: the next report covers what runs from now on."""
        self.counter.reset()
        self._decode_rows_seen.zero_()  # in place: a compiled step keeps writing to this tensor

    def decode_rows_seen(self) -> list[int]:
        """Row counts of the decode steps that ran executors so far (above ROWS_CAP recorded as ROWS_CAP)."""
        return self._decode_rows_seen.nonzero().flatten().tolist()

    def set_decode_executor(self, site_index: int, fn: Callable, max_rows: int | None = None) -> None:
        """Let `fn(x)` compute the site's output (bias included) in decode steps instead of masked dense.

        With `executor_counts` (the default) `fn` returns (output, zero entries per token of the masked x, or
        None where it did not count: the engine then counts with the site's rule).
        `max_rows`: the most decode rows `fn` serves with a sparse kernel (it runs a dense GEMM above), so
        the report can say which path ran; None: every step is the sparse kernel.
        """
        if max_rows is not None and not 0 <= max_rows < self.ROWS_CAP:
            raise ValueError(f"max_rows must be in [0, {self.ROWS_CAP - 1}], got {max_rows}")
        self.decode_executors[site_index] = fn
        if max_rows is None:
            self.executor_max_rows.pop(site_index, None)
        else:
            self.executor_max_rows[site_index] = int(max_rows)

    def set_prefill_masker(self, site_index: int, fn: Callable) -> None:
        """Let `fn(x) -> (masked x, zeros per row)` apply the site's rule in one pass where it covers every
        position (sparse_prefill=all, and decode steps without an executor); it must match the rule exactly.
        """
        self.prefill_maskers[site_index] = fn

    # -- hooks --------------------------------------------------------------------------------------
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = _first_tensor(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if isinstance(ids, torch.Tensor) else embeds
        # transformers 5 calls the KV cache `cache`; 4.x called it `past_key_values`.
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        past_len = 0
        if past is not None and hasattr(past, "get_seq_length"):
            # Only the decode step is compiled (kernels.decode); a StaticCache's length is a device tensor, and
            # int() of it there would be a host sync and a graph break whose resumed code recompiles at every
            # position. A compiled step with a cache is a decode step.
            past_len = 1 if torch.compiler.is_compiling() else int(past.get_seq_length())
        seq_len = ref.shape[1] if isinstance(ref, torch.Tensor) and ref.dim() >= 2 else 1
        self._phase = DECODE if (past_len > 0 and seq_len == 1) else PREFILL
        if self._phase == DECODE and self.decode_executors and isinstance(ref, torch.Tensor):
            self._decode_rows_seen[min(int(ref.shape[0]), self.ROWS_CAP)] = True  # one token per row
        valid = None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(ref, torch.Tensor):
            valid = mask[:, -seq_len:].bool()
        if self._phase == DECODE and self.pad_token_id is not None and isinstance(ids, torch.Tensor):
            # A finished row of a batched generate is fed padding: its step is not a real token. (For callers
            # of `model.generate` that say nothing else; a generated token equal to the pad id is then taken
            # for padding too, so sparse-hf gives no pad id and marks finished rows instead.)
            not_pad = ids != self.pad_token_id
            valid = not_pad if valid is None else valid & not_pad
        finished = self._finished_rows
        if self._phase == DECODE and finished is not None and isinstance(ref, torch.Tensor) \
                and finished.shape[0] == ref.shape[0]:
            live = ~finished.to(ref.device).view(-1, 1)
            valid = live if valid is None else valid & live
        self._valid = valid
        self._half_cut = None
        lengths, self._next_row_lengths = self._next_row_lengths, None
        if self.sparse_prefill == "last_half" and self._phase == PREFILL and isinstance(ref, torch.Tensor):
            self._half_cut = self._last_half_cut(ref, valid, lengths)
        self._records = {}

    @staticmethod
    def _last_half_cut(ref: torch.Tensor, valid: torch.Tensor | None,
                       lengths: list[int] | None) -> torch.Tensor | None:
        """[B, 1] first position of each row's last floor(n/2) real tokens, as TEAL's own evaluation sparsifies
        (`x[:, -(n // 2):]`; an odd row's middle token stays dense). None: from the padded length."""
        if lengths is not None and len(lengths) == ref.shape[0]:  # right-padded: real tokens first
            n = torch.tensor(lengths, device=ref.device)
            return (n - n // 2).view(-1, 1)
        if valid is not None:  # left- or right-padded with a mask: the real tokens are the valid ones
            real = valid.sum(-1)
            first = valid.int().argmax(-1)
            return (first + real - real // 2).view(-1, 1)
        return None

    def _model_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        records, self._records = self._records, {}
        if not self.counting or not records:
            return
        if self.deferred and self._phase == PREFILL:
            self.counter.defer(self._phase, records)
        else:
            self.counter.commit(self._phase, records, self._valid)

    def _prefill_applies(self, x: torch.Tensor) -> torch.Tensor | bool:
        """Which positions of a multi-token forward get the rule (`sparse_prefill`)."""
        if self._phase == DECODE or self.sparse_prefill == "all" or x.dim() < 3:
            return True
        if self.sparse_prefill == "none":
            return False
        seq = x.shape[-2]
        pos = torch.arange(seq, device=x.device)
        cut = self._half_cut
        if cut is not None and x.dim() == 3 and cut.shape[0] == x.shape[0]:
            return (pos.view(1, seq) >= cut).view(x.shape[0], seq, 1)
        return (pos >= seq - seq // 2).view(*([1] * (x.dim() - 2)), seq, 1)

    def _site_pre_hook(self, site: Site) -> Callable:
        rule = self.rules[site.index]
        masker = self.prefill_maskers.get(site.index)

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            applies = self._prefill_applies(x)
            zeros = None
            if applies is True and masker is not None:
                y, zeros = masker(x)  # one pass: mask and count
            elif applies is True:
                y = rule(x)
            elif applies is False:
                y = x
            else:
                y = torch.where(applies, rule(x), x)
            if self.counting:
                if zeros is None:
                    zeros = _zeros_per_token(y)
                self._records[site.index] = zeros.view(x.shape[0], -1) if x.dim() >= 2 else zeros.view(1, 1)
            if y is x:
                return None
            return (y, *args[1:])

        return hook

    def _gate_score_hook(self, rule: Rule) -> Callable:
        """Forward hook on a layer's activation module: `rule` on its output, the gate score (OnGateScore)."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            applies = self._prefill_applies(output)
            if applies is False:
                return None
            return rule(output) if applies is True else torch.where(applies, rule(output), output)

        return hook

    def _site_executor_hook(self, site: Site, executor: Callable) -> Callable:
        # Replaces the site's forward in decode steps: the kernel reads x and the threshold itself.
        module = site.module
        dense_forward = module.forward
        pre = self._site_pre_hook(site)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self._phase == DECODE:
                out, zeros = executor(x) if self.executor_counts else (executor(x), None)
                if self.counting:
                    if zeros is None:  # the executor did not count (a compiled step: see make_decode_executor)
                        zeros = _zeros_per_token(self.rules[site.index](x))
                    self._records[site.index] = zeros.view(x.shape[0], -1)
                return out
            new = pre(module, (x,))
            return dense_forward(new[0] if new is not None else x)

        return forward

    @contextmanager
    def attached(self) -> Iterator["SparsityEngine"]:
        """Install the hooks for the duration of the block; always remove them."""
        if self._handles:
            yield self
            return
        model = self.model
        swapped: list[tuple[nn.Module, Any]] = []
        gate_rules = {s.layer: r.inner for s in self.sites if isinstance(r := self.rules.get(s.index), OnGateScore)}
        activations = resolve_activation_modules(model) if gate_rules else []
        try:
            for layer, inner in gate_rules.items():
                self._handles.append(activations[layer].register_forward_hook(self._gate_score_hook(inner)))
            self._handles.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._model_post_hook))
            for site in self.sites:
                if site.index not in self.rules:
                    continue
                executor = self.decode_executors.get(site.index)
                if executor is not None:
                    swapped.append((site.module, site.module.__dict__.get("forward")))
                    site.module.forward = self._site_executor_hook(site, executor)  # type: ignore[method-assign]
                else:
                    self._handles.append(site.module.register_forward_pre_hook(self._site_pre_hook(site)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for module, previous in swapped:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            self._records = {}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run forwards without counting them (lm-eval's batch-size probes)."""
        previous, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = previous

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Prefill records wait for `counter.commit_row(length)` (right-padded loglikelihood batches)."""
        previous, self.deferred = self.deferred, True
        try:
            yield
        finally:
            self.deferred = previous

    # -- report -------------------------------------------------------------------------------------
    def execution_paths(self) -> dict[str, dict[str, Any]]:
        """Per site name and phase, the path that computed the product.

        prefill: `masked_dense` (rule in torch ops, then the GEMM), `masked_dense_fused` (one-pass masking
        kernel, then the GEMM) or `unmasked` (sparse_prefill=none); decode: `masked_dense`, `sparse_kernel`,
        `dense_fallback` (an executor's dense GEMM: more rows than the kernel serves, or a union of active
        inputs estimated nearly dense) or both joined by "+" when steps or layers differed;
        `decode_dense_layers` lists the layers whose decode steps ran `dense_fallback` (present only when some
        did).
        """
        out: dict[str, dict[str, Any]] = {}
        decode_paths: dict[str, set[str]] = {}
        rows_seen = self.decode_rows_seen() or [1]  # before any decode step: the path one row would take
        for site in self.sites:
            if site.index not in self.rules:
                continue
            paths = out.setdefault(site.name, {"prefill": "masked_dense", "decode": "masked_dense"})
            if self.sparse_prefill == "none":
                paths["prefill"] = "unmasked"
            elif site.index in self.prefill_maskers and self.sparse_prefill == "all":  # the masker covers all
                paths["prefill"] = "masked_dense_fused"
            if site.index not in self.decode_executors:
                continue
            limit = self.executor_max_rows.get(site.index)
            dense = limit is not None and any(r > limit for r in rows_seen)
            sparse = limit is None or any(r <= limit for r in rows_seen)
            seen = decode_paths.setdefault(site.name, set())
            seen.update(p for p, ran in (("sparse_kernel", sparse), ("dense_fallback", dense)) if ran)
            if dense:
                paths.setdefault("decode_dense_layers", []).append(site.layer)
        for name, seen in decode_paths.items():
            out[name]["decode"] = "+".join(p for p in ("sparse_kernel", "dense_fallback") if p in seen)
        return out

    def report(self) -> dict[str, Any]:
        """The measured sparsity: overall, FFN, attention, per phase and per layer for every site name."""
        zeros, entries, tokens = self.counter.totals()
        active = sorted(self.rules)
        num_layers = 1 + max((s.layer for s in self.sites), default=-1)

        def ratio(z: torch.Tensor | int, e: torch.Tensor | int) -> float | None:
            z, e = int(z), int(e)
            return z / e if e else None

        def over(site_ids: list[int], phase: slice = slice(None)) -> float | None:
            if not site_ids:
                return None
            ids = torch.tensor(site_ids)
            return ratio(zeros[phase][:, ids].sum(), entries[phase][:, ids].sum())

        ffn = [i for i in active if self.sites[i].group in FFN_GROUPS]
        attn = [i for i in active if self.sites[i].group not in FFN_GROUPS]
        # Fraction of linear-layer weights (of the decoder layers) that the zeros let a kernel skip.
        params = torch.tensor([s.num_params for s in self.sites], dtype=torch.float64)
        per_site = torch.where(entries.sum(0) > 0, zeros.sum(0) / entries.sum(0).clamp(min=1), 0.0)
        skipped = float((per_site.double() * params).sum() / params.sum()) if len(params) else 0.0

        per_layer: dict[str, list[float | None]] = {}
        for name in dict.fromkeys(self.sites[i].name for i in active):
            row: list[float | None] = [None] * num_layers
            for s in self.sites:
                if s.name == name and s.index in self.rules:
                    row[s.layer] = ratio(zeros[:, s.index].sum(), entries[:, s.index].sum())
            per_layer[name] = row
        phases = {}
        for p, phase in enumerate(PHASES):
            phases[phase] = {
                "tokens": int(tokens[p]),
                "sparsity": over(active, slice(p, p + 1)),
                "ffn": over(ffn, slice(p, p + 1)),
                "attn": over(attn, slice(p, p + 1)),
            }
        return {
            "overall": over(active),
            "ffn": over(ffn),
            "attn": over(attn),
            "weights_skipped": skipped,
            "tokens": int(tokens.sum()),
            "zeros": int(zeros[:, active].sum()) if active else 0,
            "entries": int(entries[:, active].sum()) if active else 0,
            "phases": phases,
            "per_layer": per_layer,
            "sites": sorted(dict.fromkeys(self.sites[i].name for i in active)),
            "execution": self.execution_paths(),
            "num_layers": num_layers,
            "activation": self.activation,
            "sparse_prefill": self.sparse_prefill,
        }
