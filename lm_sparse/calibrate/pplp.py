"""PPL-p% (Sparsing Law, arXiv 2411.02335): per-layer FFN thresholds for a target perplexity rise.

For layer l with FFN intermediate a (the input of down_proj) and W = W_down, neuron i's output norm is
n_i = |a_i| * ||W[:, i]|| (column norms in float32). A layer threshold t drops D = {i : n_i <= t} (the
same "keep |x| > t" mask the Threshold rule and the kernels apply) and

    CETT_l(t) = mean over tokens of ||W a_D|| / ||W a||.

One CETT target c is shared by all layers; t_l(c) is the largest candidate threshold (a value of n on the
CETT tokens) with CETT_l(t) <= c, or 0 when none qualifies (then only exact zeros are dropped, never a
wrap-around to the largest candidate). The outer search finds c with PPL(sparse)/PPL(dense) = 1 + p/100
on the calibration tokens, to |ratio - (1 + p/100)| <= 0.1 * p/100.

Cost: one dense pass stores the intermediates of `cett_tokens` sampled calibration tokens (float32, on
CPU) and the dense NLL; each outer iteration is one sparse forward over the calibration windows plus
exact threshold searches (interpolation + bisection over sorted candidates, memoised across iterations);
the outer search interpolates log(PPL ratio) against log(c) (secant, safeguarded by the bracket).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import SparsityConfig
from ..engine.engine import SparsityEngine
from ..engine.rules import Rule, Threshold
from ..identity import lm_model_identity
from ..thresholds import CacheKey, load_or_compute
from .data import DEFAULT_SEQLEN, calibration_batches, default_calib_tokens, load_texts
from .ppl import windows_nll

logger = logging.getLogger(__name__)

REL_TOLERANCE = 0.1  # stop when |ratio - (1 + p/100)| <= REL_TOLERANCE * p/100
MAX_ITERATIONS = 8
CETT_TOKENS_CPU = 2048  # tokens the threshold search evaluates CETT on (all calibration tokens up to this)
CETT_TOKENS_CUDA = 4096  # 8B: 4096 x 14336 x 20 B x 32 layers = 38 GB of search state in CPU RAM
FIRST_CETT_GUESS = 0.2  # initial CETT target; the PPL ratio is roughly quadratic in c below ~0.5
SPARSE_UPDATE_FRACTION = 512  # update W a_D sparsely when fewer than 1/512 of the entries change
UPDATE_CHUNK = 8192  # entries per gathered block of W rows (8192 x H floats)


def default_cett_tokens(device: Any, calib_tokens: int) -> int:
    return min(calib_tokens, CETT_TOKENS_CUDA if "cuda" in str(device) else CETT_TOKENS_CPU)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 in float32 for a [H, I] weight (one definition, so scores and rules round alike)."""
    return weight.detach().float().norm(dim=0)


class LayerThresholdSearch:
    """Exact CETT of one layer on stored intermediates, and the largest threshold meeting a target."""

    # per-token tensors; with offload=True they wait on the CPU between solves (large models on a GPU)
    _BULK = ("acts", "scores", "order", "candidates", "counts")

    def __init__(self, acts: torch.Tensor, weight: torch.Tensor, device: torch.device | str = "cpu",
                 offload: bool = False):
        self.device = torch.device(device)
        self.acts = acts.to(self.device, torch.float32)  # [S, I]
        self.weight_t = weight.detach().to(self.device, torch.float32).t().contiguous()  # [I, H]
        self.col_norms = column_norms(weight).to(self.device)
        self.scores = self.acts.abs() * self.col_norms  # n_i per token
        flat_sorted, order = self.scores.flatten().sort()
        self.order = order.int()  # int32 indices: half the memory of the sort's int64
        self.candidates = torch.unique_consecutive(flat_sorted)  # sorted ascending, distinct
        # entries dropped at candidate k: the first counts[k] entries of `order`
        self.counts = torch.searchsorted(flat_sorted, self.candidates, right=True).int()
        del flat_sorted, order
        dense = (self.acts @ self.weight_t).norm(dim=-1)
        self.valid = dense > 0  # tokens whose FFN output is zero have no CETT
        self.dense_norms = dense[self.valid]
        self.memo: dict[int, float] = {-1: 0.0, len(self.candidates): 1.0}
        self.evaluations = 0
        self._base: tuple[int, torch.Tensor] | None = None  # (dropped count, W a_D) of the last evaluation
        self.offload = offload
        if offload:
            self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        for name in self._BULK:
            setattr(self, name, getattr(self, name).to(device))
        if self._base is not None:
            self._base = (self._base[0], self._base[1].to(device))

    def cett(self, t: float) -> float:
        """CETT_l(t) with D = {n <= t}, from scratch (one masked matmul), averaged over tokens."""
        dropped = torch.where(self.scores <= t, self.acts, torch.zeros((), device=self.device))
        residual = dropped @ self.weight_t
        self._base = (int((self.scores <= t).sum()), residual)
        return self._cett_of(residual)

    def _cett_of(self, residual: torch.Tensor) -> float:
        self.evaluations += 1
        return float((residual.norm(dim=-1)[self.valid] / self.dense_norms).double().mean())

    def _cett_count(self, k: int) -> float:
        """CETT with candidate k's dropped set; near the last evaluation, update W a_D sparsely.

        W a_D changes by the entries between the two dropped counts only: gathering those rows of W costs
        |band| * H instead of S * I * H, which makes the end of every bisection cheap.
        """
        count = int(self.counts[k])
        if self._base is None or abs(count - self._base[0]) * SPARSE_UPDATE_FRACTION > self.scores.numel():
            t = self.candidates[k]
            residual = torch.where(self.scores <= t, self.acts, torch.zeros((), device=self.device)) @ self.weight_t
        else:
            base_count, base = self._base
            lo, hi = sorted((base_count, count))
            sign = 1.0 if count > base_count else -1.0
            residual = base.clone()
            width = self.acts.shape[1]
            flat_acts = self.acts.flatten()
            for start in range(lo, hi, UPDATE_CHUNK):
                idx = self.order[start:min(hi, start + UPDATE_CHUNK)].long()
                rows = self.weight_t[idx % width] * (sign * flat_acts[idx]).unsqueeze(1)
                residual.index_add_(0, idx // width, rows)
        self._base = (count, residual)
        return self._cett_of(residual)

    def _cett_at(self, k: int) -> float:
        # k = -1: threshold 0 (exact zeros only, CETT 0); k = len: every entry dropped (CETT 1)
        if k not in self.memo:
            self.memo[k] = self._cett_count(k)
        return self.memo[k]

    def threshold_at(self, k: int) -> float:
        return 0.0 if k < 0 else float(self.candidates[k])

    def solve(self, target: float) -> tuple[float, float, int]:
        """(t, CETT_l(t), candidate index) with CETT_l(t) <= target < CETT_l(next larger candidate).

        CETT grows with t but is not strictly monotone (dropping more entries can cancel a little), so
        this is the crossing the bracket converges to; it is the largest qualifying t wherever CETT is
        monotone, and never wraps around: when no candidate qualifies, t = 0 (exact zeros only).
        Invariant CETT(lo) <= target < CETT(hi); the bracket starts from every memoised evaluation and
        shrinks by interpolation on CETT, with a bisection step whenever interpolation shrinks it too little.
        """
        if self.offload:
            self._move(self.device)
        try:
            return self._solve(target)
        finally:
            if self.offload:
                self._move(torch.device("cpu"))

    def _solve(self, target: float) -> tuple[float, float, int]:
        lo, hi = -1, len(self.candidates)
        for k, value in self.memo.items():
            if value <= target and k > lo:
                lo = k
            elif value > target and k < hi:
                hi = k
        while hi - lo > 1:
            width = hi - lo
            c_lo, c_hi = self.memo[lo], self.memo[hi]
            frac = (target - c_lo) / (c_hi - c_lo) if c_hi > c_lo else 0.5
            # interpolate in threshold value (CETT is smooth in t, not in the index of sorted candidates)
            t_lo, t_hi = self.threshold_at(lo), float(self.candidates[min(hi, len(self.candidates) - 1)])
            guess = torch.tensor(t_lo + frac * (t_hi - t_lo), dtype=self.candidates.dtype, device=self.device)
            mid = int(torch.searchsorted(self.candidates, guess))
            mid = min(max(mid, lo + 1), hi - 1)
            if self._cett_at(mid) <= target:
                lo = mid
            else:
                hi = mid
            if hi - lo > width // 2 and hi - lo > 1:  # interpolation was too timid: bisect once
                mid = (lo + hi) // 2
                if self._cett_at(mid) <= target:
                    lo = mid
                else:
                    hi = mid
        return self.threshold_at(lo), self._cett_at(lo), lo

    def neuron_thresholds(self, t: float) -> torch.Tensor:
        """Per-neuron thresholds on a: |a_i| <= t / ||W[:, i]|| is dropped (dead columns: always)."""
        out = torch.full_like(self.col_norms, float("inf"))
        alive = self.col_norms > 0
        out[alive] = t / self.col_norms[alive]
        return out.cpu()


def _sample_positions(n_windows: int, seqlen: int, count: int, seed: int) -> torch.Tensor:
    """Flat token positions (window * seqlen + offset) sampled without replacement, sorted."""
    total = n_windows * seqlen
    if count >= total:
        return torch.arange(total)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    return torch.randperm(total, generator=gen)[:count].sort().values


@torch.no_grad()
def dense_pass(model: nn.Module, down_modules: list[nn.Module], windows: torch.Tensor, positions: torch.Tensor,
               batch_size: int) -> tuple[list[torch.Tensor], float, int]:
    """One dense forward: the down-proj inputs at `positions` per layer (float32, CPU) and the dense NLL."""
    seqlen = windows.shape[1]
    stored: list[list[torch.Tensor]] = [[] for _ in down_modules]
    current: dict[str, torch.Tensor] = {}

    def on_batch(start: int, stop: int) -> None:
        lo, hi = start * seqlen, stop * seqlen
        current["rows"] = positions[(positions >= lo) & (positions < hi)] - lo

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            stored[layer].append(flat[current["rows"].to(flat.device)].float().cpu())
        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(down_modules)]
    try:
        nll, count = windows_nll(model, windows, batch_size, desc="pplp: dense pass", on_batch=on_batch)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(parts) for parts in stored], nll, count


def _sparse_nll(model: nn.Module, rules_by_layer: list[torch.Tensor], windows: torch.Tensor, batch_size: int,
                desc: str) -> tuple[float, int, list[float]]:
    """NLL under per-neuron down-proj thresholds, and the per-layer activation ratio (1 - sparsity)."""
    engine = SparsityEngine(model)
    downs = engine.sites_in_groups("mlp_mid")
    engine.set_rules({s.index: Threshold(rules_by_layer[s.layer]) for s in downs})
    with engine.attached():
        nll, count = windows_nll(model, windows, batch_size, desc=desc)
    engine.counter.synchronize()
    sparsity = engine.report()["per_layer"].get("down", [])
    return nll, count, [1.0 - float(s) if s is not None else float("nan") for s in sparsity]


def _next_target(points: list[tuple[float, float]], goal: float) -> float:
    """Next CETT target from (c, log PPL ratio) points: secant on log r vs log c inside the bracket."""
    below = [p for p in points if p[1] < goal]
    above = [p for p in points if p[1] >= goal]
    lo = max(below, key=lambda p: p[0]) if below else None
    hi = min(above, key=lambda p: p[0]) if above else None
    usable = [p for p in points if p[1] > 0]
    if lo is not None and hi is not None and lo[1] > 0:
        (c0, r0), (c1, r1) = lo, hi
    elif len(usable) >= 2:
        (c0, r0), (c1, r1) = sorted(usable, key=lambda p: abs(math.log(p[1] / goal)))[:2]
    elif usable:
        c, r = usable[0]
        guess = c * math.sqrt(goal / r)  # quadratic model until a second point gives the slope
        return _clamp(guess, lo, hi)
    else:
        c = max(p[0] for p in points)
        return _clamp(min(1.0, 2 * c), lo, hi)
    if c0 == c1 or r0 == r1:
        guess = c0 * math.sqrt(goal / r0)
    else:
        slope = (math.log(r1) - math.log(r0)) / (math.log(c1) - math.log(c0))
        # Bounded, so two noisy points cannot send the guess far; the upper bound is wide because ratio curves
        # are steep (a cap of 6 made a log r ~ c^8 curve overshoot back and forth and not converge in 8 steps).
        slope = min(max(slope, 0.5), 16.0)
        guess = math.exp(math.log(c0) + (math.log(goal) - math.log(r0)) / slope)
    return _clamp(guess, lo, hi)


def _clamp(c: float, lo: tuple | None, hi: tuple | None) -> float:
    low = lo[0] if lo is not None else 0.0
    high = hi[0] if hi is not None else 1.0
    if not low < c < high:
        c = math.sqrt(max(low, 1e-6) * high) if low > 0 else 0.5 * high
    return min(c, 1.0)


def calibrate_pplp(model: nn.Module, calib: torch.Tensor, heldout: torch.Tensor | None, ppl_p: float, *,
                   cett_tokens: int, seed: int = 0, batch_size: int = 4, device: Any = None,
                   max_iterations: int = MAX_ITERATIONS) -> tuple[dict, dict[str, torch.Tensor]]:
    """Calibrate PPL-p% thresholds on `calib` windows; return (results, {"layer{l}.down": thresholds})."""
    started = time.perf_counter()
    device = device or next(model.parameters()).device
    probe = SparsityEngine(model)
    downs = probe.sites_in_groups("mlp_mid")
    positions = _sample_positions(calib.shape[0], calib.shape[1], cett_tokens, seed)
    timings = {"dense_pass": 0.0, "candidates": 0.0, "threshold_search": 0.0, "sparse_forward": 0.0, "heldout": 0.0}
    mark = time.perf_counter()
    acts, dense_nll, count = dense_pass(model, [s.module for s in downs], calib, positions, batch_size)
    timings["dense_pass"], mark = time.perf_counter() - mark, time.perf_counter()
    searches = []
    for site, layer_acts in zip(tqdm(downs, desc="pplp: candidate thresholds", leave=False), acts):
        searches.append(LayerThresholdSearch(layer_acts, site.module.weight, device,
                                             offload=torch.device(device).type != "cpu"))
    del acts
    timings["candidates"] = time.perf_counter() - mark
    dense_ppl = math.exp(dense_nll / count)
    goal = math.log1p(ppl_p / 100.0)
    tol = REL_TOLERANCE * ppl_p / 100.0
    points: list[tuple[float, float]] = []
    history: list[dict] = []
    best: dict | None = None
    c = FIRST_CETT_GUESS
    bar = tqdm(range(max_iterations), desc=f"pplp: search CETT for p={ppl_p:g}%", leave=False)
    for iteration in bar:
        mark = time.perf_counter()
        solved = [s.solve(c) for s in searches]
        thresholds = [s.neuron_thresholds(t) for s, (t, _, _) in zip(searches, solved)]
        timings["threshold_search"] += time.perf_counter() - mark
        mark = time.perf_counter()
        nll, n, active = _sparse_nll(model, thresholds, calib, batch_size, desc=f"pplp: sparse pass {iteration + 1}")
        timings["sparse_forward"] += time.perf_counter() - mark
        ratio = math.exp((nll - dense_nll) / n)
        step = {"iteration": iteration + 1, "cett": c, "ppl_ratio": ratio,
                "activation_ratio": sum(active) / len(active)}
        history.append(step)
        bar.set_postfix(cett=f"{c:.4f}", ratio=f"{ratio:.4f}")
        candidate = {"cett": c, "ratio": ratio, "solved": solved, "thresholds": thresholds, "active": active}
        if best is None or abs(ratio - (1 + ppl_p / 100)) < abs(best["ratio"] - (1 + ppl_p / 100)):
            best = candidate
        if abs(ratio - (1 + ppl_p / 100)) <= tol:
            break
        points.append((c, math.log(ratio)))
        c = _next_target(points, goal)
    bar.close()
    assert best is not None
    heldout_info: dict[str, Any] = {"heldout_tokens": 0, "heldout_ppl_ratio": None}
    mark = time.perf_counter()
    if heldout is not None:
        d_nll, d_n = windows_nll(model, heldout, batch_size, desc="pplp: held-out dense")
        s_nll, _, _ = _sparse_nll(model, best["thresholds"], heldout, batch_size, desc="pplp: held-out sparse")
        heldout_info = {"heldout_tokens": int(heldout.numel()), "heldout_ppl_ratio": math.exp((s_nll - d_nll) / d_n),
                        "heldout_dense_ppl": math.exp(d_nll / d_n)}
    timings["heldout"] = time.perf_counter() - mark
    results = {
        "ppl_p": ppl_p,
        "cett": best["cett"],
        "calib_ppl_ratio": best["ratio"],
        "target_ppl_ratio": 1 + ppl_p / 100,
        "tolerance": f"|ratio - (1 + p/100)| <= {REL_TOLERANCE} * p/100 = {tol:.6g}, "
                     f"at most {max_iterations} iterations",
        "converged": abs(best["ratio"] - (1 + ppl_p / 100)) <= tol,
        "dense_ppl": dense_ppl,
        **heldout_info,
        "layer_thresholds": [t for t, _, _ in best["solved"]],
        "layer_cett": [v for _, v, _ in best["solved"]],
        "activation_ratio": best["active"],
        "mean_activation_ratio": sum(best["active"]) / len(best["active"]),
        "calib_tokens": int(calib.numel()),
        "cett_tokens": int(positions.numel()),
        "iterations": len(history),
        "history": history,
        "cett_evaluations": sum(s.evaluations for s in searches),
        "seconds": round(time.perf_counter() - started, 2),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    tensors = {f"layer{s.layer}.down": t.float() for s, t in zip(downs, best["thresholds"])}
    return results, tensors


def rules_from_tensors(engine: SparsityEngine, tensors: dict[str, torch.Tensor],
                       activation_ratio: list[float] | None = None) -> dict[int, Rule]:
    """Threshold rules on the down sites from stored per-neuron thresholds; one clear error if they do not fit.

    `activation_ratio` (per layer, from the calibration results) gives each rule its expected sparsity.
    """
    rules: dict[int, Rule] = {}
    for site in engine.sites_in_groups("mlp_mid"):
        t = tensors.get(f"layer{site.layer}.down")
        if t is None or t.numel() != site.in_features:
            raise ValueError(f"lm-sparse: thresholds file has no {site.in_features}-vector for layer {site.layer}")
        expected = None
        if activation_ratio is not None and site.layer < len(activation_ratio):
            ratio = activation_ratio[site.layer]
            expected = 1.0 - float(ratio) if ratio is not None and ratio == ratio else None  # NaN: unmeasured
        rules[site.index] = Threshold(t.float(), expected)
    return rules


def pplp_cache_fields(model_id: dict, config: SparsityConfig, data_identity: dict, calib_tokens: int,
                      seqlen: int, cett_tokens: int, heldout_tokens: int) -> dict:
    """The cache key fields of a PPL-p% calibration (`model_id`: `identity.lm_model_identity`)."""
    return CacheKey(
        model=model_id, method="pplp",
        params={"ppl_p": float(config.level), "rel_tolerance": REL_TOLERANCE, "max_iterations": MAX_ITERATIONS,
                "cett_tokens": cett_tokens, "heldout_tokens": heldout_tokens, "first_cett": FIRST_CETT_GUESS},
        data=data_identity, calib_tokens=calib_tokens, seqlen=seqlen, seed=int(config.calib_seed),
    ).fields()


def build_pplp_rules(engine: SparsityEngine, config: SparsityConfig, tokenizer: Any,
                     lm: Any = None) -> tuple[dict[int, Rule], dict]:
    """Load or calibrate PPL-p% thresholds for `engine`'s model; return (rules, calibration info)."""
    model = engine.model
    device = next(model.parameters()).device
    seqlen = int(config.calib_seqlen or DEFAULT_SEQLEN)
    calib_tokens = int(config.calib_tokens or default_calib_tokens(device))
    calib_tokens = max(seqlen, calib_tokens // seqlen * seqlen)
    heldout_tokens = max(seqlen, calib_tokens // 4 // seqlen * seqlen)
    cett_tokens = default_cett_tokens(device, calib_tokens)
    if config.thresholds is None:
        texts, data_identity = load_texts(config.calib_data)
    else:
        texts, data_identity = [], {"source": config.calib_data, "sha256": None}
    fields = pplp_cache_fields(lm_model_identity(model, lm, tokenizer), config, data_identity, calib_tokens,
                               seqlen, cett_tokens, heldout_tokens)
    computed = {"ran": False}

    def compute() -> tuple[dict, dict[str, torch.Tensor]]:
        computed["ran"] = True
        calib, heldout = calibration_batches(tokenizer, texts, calib_tokens, seqlen, int(config.calib_seed),
                                             heldout_tokens=heldout_tokens)
        logger.warning("lm-sparse: calibrating PPL-%g%% thresholds on %d tokens (one time; cached after)",
                       float(config.level), calib.numel())
        return calibrate_pplp(model, calib, heldout, float(config.level), cett_tokens=cett_tokens,
                              seed=int(config.calib_seed))

    payload, tensors, path = load_or_compute(fields, compute, path=config.thresholds,
                                             recalibrate=bool(config.recalibrate), rank_context=lm)
    results = payload.get("results", {})
    if results.get("converged") is False:  # said on every run that uses the file, not only when calibrating
        logger.warning("lm-sparse: the PPL-p%% search did not reach ppl_p=%g within its tolerance in %s iterations: "
                       "using the closest CETT (%.4g), whose calibration PPL ratio is %.4f, not %.4f",
                       float(results.get("ppl_p") or config.level), results.get("iterations"),
                       float(results.get("cett") or 0.0), float(results.get("calib_ppl_ratio") or 0.0),
                       1 + float(results.get("ppl_p") or config.level) / 100)
    rules = rules_from_tensors(engine, tensors, results.get("activation_ratio"))
    info = {
        "method": "pplp",
        "file": path,
        "key": payload.get("key"),
        "calibrated_now": computed["ran"],
        "model": payload.get("fields", {}).get("model"),
        "data": payload.get("fields", {}).get("data"),
        "params": payload.get("fields", {}).get("params"),
        "seqlen": payload.get("fields", {}).get("seqlen"),
        "seed": payload.get("fields", {}).get("seed"),
        **{k: results.get(k) for k in ("ppl_p", "cett", "calib_ppl_ratio", "heldout_ppl_ratio", "tolerance",
                                       "converged", "dense_ppl", "calib_tokens", "heldout_tokens", "cett_tokens",
                                       "iterations", "seconds", "layer_thresholds", "activation_ratio",
                                       "mean_activation_ratio")},
    }
    return rules, info
