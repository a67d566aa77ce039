"""TEAL's block-wise greedy allocation (arXiv 2408.14690), made cheap without changing what it finds.

One decoder layer ("block") is run on its captured dense inputs. All its matrices start at sparsity 0;
each greedy step tries raising every matrix by its own step and keeps the move whose block output is
closest to the dense block output. A matrix's step is inversely proportional to its parameter count
(read from the real module shapes), so every move raises the block's parameter-weighted ("effective")
sparsity by the same amount and GQA's small k and v need no hand-written weight table.

What makes it cheap: `BlockRunner` memoizes every linear layer's output (and the attention module's
output) under the sparsity levels it depends on. A trial move recomputes only what it changes: an MLP
move reuses the cached attention output, a `down` move reuses the cached gate/up products, a `q` move
reuses k and v. The decoder layer's own forward is called every time (norms, residuals, attention
masks are the model's), only the memoized sub-modules are short-circuited.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.arch import Site
from ..engine.rules import Threshold

# Data-flow order of the four inputs inside a block: a site's input depends on every earlier group.
GROUP_ORDER = {"attn_in": 0, "attn_out": 1, "mlp_in": 2, "mlp_mid": 3}
STOP_LEVEL = 0.9


def step_sizes(num_params: list[int], steps: int, stop: float = STOP_LEVEL) -> list[float]:
    """Per-matrix sparsity step: each move adds `stop / steps` to the block's parameter-weighted sparsity."""
    if steps < 1:
        raise ValueError(f"greedy steps must be a positive integer, got {steps}")
    total = float(sum(num_params))
    delta = stop / steps
    return [delta * total / p for p in num_params]


def effective_sparsity(levels: list[float] | torch.Tensor, num_params: list[int]) -> float:
    """Parameter-weighted sparsity of a block: the fraction of its weights a sparse kernel skips."""
    total = float(sum(num_params))
    return float(sum(float(s) * p for s, p in zip(levels, num_params)) / total)


class BlockRunner:
    """Run one decoder layer on fixed dense inputs with a sparsity level per site, memoizing sub-results.

    `threshold(position, level)` maps a site (by its position in `sites`) and a level to the magnitude
    threshold. The memo assumes the inputs never change, which holds: a runner owns its inputs.
    """

    def __init__(self, layer: nn.Module, sites: list[Site], hidden: torch.Tensor, kwargs: dict[str, Any],
                 threshold: Callable[[int, float], float]):
        self.layer, self.sites, self.hidden, self.kwargs = layer, sites, hidden, kwargs
        self.threshold = threshold
        # One rule per (position, level): a rule rounds its threshold once per dtype and device, not per call.
        self._rules: dict[tuple[int, float], Threshold] = {}
        self.levels: tuple[float, ...] = (0.0,) * len(sites)
        self.use_memo = True
        order = [GROUP_ORDER[s.group] for s in sites]
        # Which levels each site's output depends on: every site upstream of its input, and itself.
        self.deps = [tuple(j for j in range(len(sites)) if order[j] < order[i]) + (i,)
                     for i in range(len(sites))]
        self.attn_deps = tuple(j for j in range(len(sites)) if order[j] <= GROUP_ORDER["attn_out"])
        self.attn_module = self._attention_module()
        self.memo: dict[int, dict[tuple, Any]] = {}

    def _attention_module(self) -> nn.Module | None:
        """The sub-module of the layer that holds every attention site (e.g. `self_attn`), if any."""
        paths = {id(m): p for p, m in self.layer.named_modules()}
        attn_paths = [paths.get(id(s.module), "") for s in self.sites if s.group in ("attn_in", "attn_out")]
        if not attn_paths or any(not p or "." not in p for p in attn_paths):
            return None
        parents = {p.rsplit(".", 1)[0] for p in attn_paths}
        if len(parents) != 1:
            return None
        return self.layer.get_submodule(parents.pop())

    def _key(self, deps: tuple[int, ...]) -> tuple:
        return tuple(self.levels[j] for j in deps)

    def _rule(self, position: int, level: float) -> Threshold:
        rule = self._rules.get((position, level))
        if rule is None:
            rule = self._rules[(position, level)] = Threshold(self.threshold(position, level))
        return rule

    def _linear_forward(self, position: int, dense_forward: Callable) -> Callable:
        memo = self.memo.setdefault(position, {})
        deps = self.deps[position]

        def forward(x: torch.Tensor) -> torch.Tensor:
            key = self._key(deps)
            out = memo.get(key) if self.use_memo else None
            if out is None:
                level = self.levels[position]
                out = dense_forward(self._rule(position, level)(x) if level > 0 else x)
                if self.use_memo:
                    memo[key] = out
            return out

        return forward

    def _attention_forward(self, dense_forward: Callable) -> Callable:
        memo = self.memo.setdefault(-1, {})

        def forward(*args: Any, **kwargs: Any) -> Any:
            key = self._key(self.attn_deps)
            out = memo.get(key) if self.use_memo else None
            if out is None:
                out = dense_forward(*args, **kwargs)
                if self.use_memo:
                    memo[key] = out
            return out

        return forward

    @contextmanager
    def attached(self) -> Iterator["BlockRunner"]:
        """Patch the sites' and the attention module's forwards for the duration of the block."""
        patched: list[nn.Module] = []
        try:
            for position, site in enumerate(self.sites):
                site.module.forward = self._linear_forward(position, site.module.forward)  # type: ignore[method-assign]
                patched.append(site.module)
            if self.attn_module is not None:
                self.attn_module.forward = self._attention_forward(self.attn_module.forward)  # type: ignore[method-assign]
                patched.append(self.attn_module)
            yield self
        finally:
            for module in patched:
                del module.forward
            self.memo.clear()

    def run(self, levels: tuple[float, ...], memo: bool = True) -> torch.Tensor:
        """The block output with each site at its level (call inside `attached()`)."""
        self.levels, self.use_memo = tuple(float(v) for v in levels), memo
        out = self.layer(self.hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def keep_only(self, levels: tuple[float, ...]) -> None:
        """Drop memo entries that do not belong to the accepted state `levels` (bounds memory)."""
        self.levels = tuple(float(v) for v in levels)
        for position, memo in self.memo.items():
            deps = self.attn_deps if position == -1 else self.deps[position]
            key = self._key(deps)
            kept = memo.get(key)
            memo.clear()
            if kept is not None:
                memo[key] = kept


def block_error(output: torch.Tensor, target: torch.Tensor) -> float:
    """Relative squared error ||y - y_dense||^2 / ||y_dense||^2 of a block output [B, T, H], in float64.

    The first position of each window is left out: it has no context and its massive activations would
    dominate the sum.
    """
    if output.dim() == 3 and output.shape[1] > 1:
        output, target = output[:, 1:], target[:, 1:]
    diff = (output.float() - target.float()).pow(2).sum(dtype=torch.float64)
    return float(diff / target.float().pow(2).sum(dtype=torch.float64))


@dataclass
class GreedyPath:
    """One block's greedy lookup: row r holds the allocation reached after r accepted moves."""

    effective: torch.Tensor  # [R] parameter-weighted sparsity of each row
    error: torch.Tensor  # [R] relative block-output error of each row
    levels: torch.Tensor  # [R, M] sparsity of each site


def greedy_block(runner: BlockRunner, num_params: list[int], steps: int, stop: float = STOP_LEVEL) -> GreedyPath:
    """TEAL's greedy search on one block (inside `runner.attached()`); stops at effective sparsity `stop`.

    A matrix already at sparsity 1 is not moved again; its last step is clipped at 1.
    """
    sizes = step_sizes(num_params, steps, stop)
    m = len(num_params)

    def levels_of(counts: list[int]) -> tuple[float, ...]:
        return tuple(min(1.0, n * s) for n, s in zip(counts, sizes))

    counts = [0] * m
    target = runner.run(levels_of(counts))
    rows_eff, rows_err, rows_lv = [0.0], [0.0], [levels_of(counts)]
    while effective_sparsity(levels_of(counts), num_params) < stop - 1e-9:
        best: tuple[float, int] | None = None
        for i in range(m):
            if levels_of(counts)[i] >= 1.0:
                continue
            trial = counts.copy()
            trial[i] += 1
            err = block_error(runner.run(levels_of(trial)), target)
            if best is None or err < best[0]:
                best = (err, i)
        if best is None:
            break
        counts[best[1]] += 1
        levels = levels_of(counts)
        runner.keep_only(levels)
        rows_eff.append(effective_sparsity(levels, num_params))
        rows_err.append(best[0])
        rows_lv.append(levels)
    return GreedyPath(torch.tensor(rows_eff, dtype=torch.float64), torch.tensor(rows_err, dtype=torch.float64),
                      torch.tensor(rows_lv, dtype=torch.float64))


def uniform_block_error(runner: BlockRunner, level: float, target: torch.Tensor) -> float:
    """Block-output error with every site at `level` (no memo: every input changes)."""
    return block_error(runner.run((level,) * len(runner.sites), memo=False), target)


def interpolate_levels(path_effective: torch.Tensor, path_levels: torch.Tensor, target: float) -> torch.Tensor:
    """Site levels at effective sparsity `target`, linearly between the two lookup rows around it.

    Effective sparsity is linear in the levels, so the result sits exactly at `target`.
    """
    eff = path_effective.double()
    if target <= float(eff[0]):
        return path_levels[0].double().clone()
    if target >= float(eff[-1]):
        return path_levels[-1].double().clone()
    hi = int(torch.searchsorted(eff, torch.tensor([target], dtype=torch.float64), right=False)[0])
    lo = hi - 1
    span = float(eff[hi] - eff[lo])
    w = 0.0 if span <= 0 else (target - float(eff[lo])) / span
    return (1 - w) * path_levels[lo].double() + w * path_levels[hi].double()
