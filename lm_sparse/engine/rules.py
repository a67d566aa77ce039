"""Sparsity rules: functions from a matrix input x (..., D) to the sparsified input.

Every rule keeps an entry or zeroes it; none rescales. A threshold rule keeps |x| > t, the same mask the
sparse kernels apply (`lm_sparse.kernels`), so the masked-dense path and the kernel path agree exactly.
"""

from __future__ import annotations

import math

import torch

from ..kernels.reference import round_threshold


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


class Rule:
    """Base class: `rule(x)` returns x with some entries set to zero."""

    #: threshold the kernels can fuse (scalar or per-input-channel tensor), or None if the rule is not a threshold
    threshold: float | torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"rule": type(self).__name__}


class CountOnly(Rule):
    """Leaves x unchanged; the engine still counts its natural zeros (ReLU-family FFNs, dense runs)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TopK(Rule):
    """Keep the `fraction` of entries with the largest |x| in every token (row), zero the rest.

    Per token, as a decoder sees it; the Sparsing Law reference code ranks all tokens of a layer together.
    Exactly k = round(fraction * D) entries survive per token (ties broken by torch.topk).
    """

    def __init__(self, fraction: float, width: int):
        self.fraction = fraction
        self.k = min(width, max(1, int(math.floor(fraction * width + 0.5))))
        self.width = width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.k >= x.shape[-1]:
            return x
        magnitude = x.abs()
        # Non-negative IEEE floats order like their bit patterns read as signed integers, and integer
        # top-k is markedly faster than float top-k on CPU (see BENCHMARKS.md, sparse-hf overhead).
        int_view = _INT_VIEW.get(magnitude.dtype)
        keys = magnitude.view(int_view) if int_view is not None else magnitude
        idx = keys.topk(self.k, dim=-1, sorted=False).indices
        return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))

    def describe(self) -> dict:
        return {"rule": "topk", "fraction": self.fraction, "k": self.k}


class Threshold(Rule):
    """Keep entries with |x| > t; t is a scalar (FAT, TEAL) or a per-input-channel vector (PPL-p%).

    `expected_sparsity`: the fraction of x the calibration zeroed (TEAL's level for this matrix, PPL-p%'s
    1 - activation ratio), None where nothing was calibrated (FAT). The kernel backend uses it to tell when
    the union of a decode batch's active inputs would be nearly dense.
    """

    def __init__(self, threshold: float | torch.Tensor, expected_sparsity: float | None = None):
        self.threshold = threshold
        self.expected_sparsity = expected_sparsity
        self._cache: dict[tuple, torch.Tensor] = {}

    def prepare(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The threshold as compared with inputs of this device and dtype, made once. The engine prepares the
        site's weight (device, dtype) ahead: a compiled step that filled the cache on its first call would fail
        its own guard and compile twice."""
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            # Compare in x's dtype against t rounded down to it (exactly |x| <= t), cast once, not per call.
            cached = self._cache[key] = round_threshold(self.threshold, dtype, device).to(dtype)
        return cached

    def _t(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepare(x.device, x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(x.abs() <= self._t(x), 0)

    def describe(self) -> dict:
        t = self.threshold
        if isinstance(t, torch.Tensor):
            return {"rule": "threshold", "per_channel": True, "mean": float(t.float().mean())}
        return {"rule": "threshold", "value": float(t)}


class OnGateScore(Threshold):
    """Sparsing Law's Top-k and FAT: `inner` picks the FFN neurons by their gate score act(gate(x)).

    The engine applies `inner` to the layer's activation output (zeroed gate scores zero their neurons'
    products), so this rule sits on down_proj's input, where those neurons are exactly zero: it counts them,
    changes nothing, and is a threshold of 0 for the kernels, which then skip exactly those columns.
    `expected_sparsity`: as for `Threshold` (Top-k: 1 - its fraction).
    """

    def __init__(self, inner: Rule, expected_sparsity: float | None = None):
        super().__init__(0.0, expected_sparsity)
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def describe(self) -> dict:
        return {**self.inner.describe(), "on": "gate_score"}
