"""TEAL: training-free magnitude sparsity on the inputs of all seven projections (arXiv 2408.14690).

Calibration runs the dense model on calibration text and keeps, per layer, a histogram of |x| for each of
the four distinct matrix inputs (attn_in for q/k/v, attn_out for o, mlp_in for gate/up, mlp_mid for down).
A sparsity s for a matrix becomes the threshold t = quantile_s(|x|) of its group; the rule keeps |x| > t.
Histograms of |x| need no symmetry assumption (the reference inverts the CDF of x assuming zero mean).

`teal_mode=uniform` gives every matrix the target s. `teal_mode=greedy` (default) reads per-layer levels
from the block-wise greedy lookup (`teal_greedy`), interpolated at the target: the lookup is computed
once per model and data and serves every level. "Model-wide sparsity" is parameter-weighted, as in
TEAL: the fraction of projection weights a sparse kernel skips (the report's `weights_skipped`).
`ppl_p=P,method=teal` bisects over TEAL levels for the largest one whose calibration perplexity ratio
stays within 1 + P/100. Histograms and lookup are cached through `lm_sparse.thresholds`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import SparsityArgumentError, SparsityConfig
from ..engine.arch import Site, decoder_layers
from ..engine.engine import SparsityEngine
from ..engine.rules import Rule, Threshold
from .data import DEFAULT_SEQLEN, calibration_batches, load_texts
from .ppl import perplexity
from .teal_greedy import STOP_LEVEL, BlockRunner, GreedyPath, block_error, greedy_block, interpolate_levels, \
    uniform_block_error

logger = logging.getLogger(__name__)

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
# Log-spaced |x| histogram: bin 0 holds |x| < 2^LOG2_MIN (exact zeros too), the last bin |x| >= 2^LOG2_MAX.
LOG2_MIN, LOG2_MAX, BINS_PER_OCTAVE = -24, 16, 128
NUM_BINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE + 2
# Greedy defaults per device: (tokens, steps to reach 0.9, sequence length of the greedy windows).
GREEDY_DEFAULTS = {"cpu": (256, 80, 128), "cuda": (16384, 240, 512)}
# Histogram tokens when calib_tokens is not given: quantiles need fewer tokens than PPL-p% does.
CALIB_TOKENS = {"cpu": 8192, "cuda": 65536}
REPORT_LEVELS = (0.25, 0.4, 0.5, 0.65)
TOKENS_PER_FORWARD = {"cpu": 4096, "cuda": 32768}
FORMAT = "teal-v1"


# -- histograms of |x| ------------------------------------------------------------------------------------
def histogram_bins(a: torch.Tensor) -> torch.Tensor:
    """Bin index of every entry of `a` = |x| (float32, flattened) in the log-spaced histogram."""
    pos = (torch.log2(a) - LOG2_MIN) * BINS_PER_OCTAVE  # -inf for zeros
    return (pos.floor() + 1).clamp(0, NUM_BINS - 1).long()


def histogram_quantile(counts: torch.Tensor, abs_max: float, level: float) -> float:
    """Threshold t with a fraction `level` of the recorded |x| at or below it (log-interpolated in a bin)."""
    counts = counts.double()
    total = float(counts.sum())
    if level <= 0 or total == 0:
        return 0.0
    if level >= 1:
        return float(abs_max)
    cum = counts.cumsum(0)
    want = level * total
    b = int(torch.searchsorted(cum, torch.tensor([want], dtype=torch.float64))[0].clamp(max=NUM_BINS - 1))
    before = float(cum[b - 1]) if b > 0 else 0.0
    frac = 0.0 if counts[b] == 0 else min(1.0, max(0.0, (want - before) / float(counts[b])))
    if b == 0:
        return frac * 2.0 ** LOG2_MIN
    if b == NUM_BINS - 1:
        lo, hi = 2.0 ** LOG2_MAX, max(float(abs_max), 2.0 ** LOG2_MAX)
    else:
        lo = 2.0 ** (LOG2_MIN + (b - 1) / BINS_PER_OCTAVE)
        hi = 2.0 ** (LOG2_MIN + b / BINS_PER_OCTAVE)
    return min(lo * (hi / lo) ** frac, float(abs_max))


# -- model structure ----------------------------------------------------------------------------------------
def layer_sites(sites: list[Site]) -> list[list[Site]]:
    """Sites grouped by layer, in data-flow order within each layer."""
    num_layers = 1 + max(s.layer for s in sites)
    return [[s for s in sites if s.layer == i] for i in range(num_layers)]


def group_readers(sites: list[Site]) -> dict[tuple[int, str], Site]:
    """One site per (layer, group) whose input is that group's tensor (q reads attn_in for q, k and v)."""
    out: dict[tuple[int, str], Site] = {}
    for s in sites:
        out.setdefault((s.layer, s.group), s)
    return out


def _device_kind(model: nn.Module) -> str:
    return "cuda" if next(model.parameters()).device.type == "cuda" else "cpu"


# -- calibration -----------------------------------------------------------------------------------------
@dataclass
class TealSettings:
    """What determines a TEAL calibration file (all of it goes into the cache key)."""

    greedy: bool
    greedy_tokens: int
    greedy_steps: int
    greedy_seqlen: int
    stop_level: float = STOP_LEVEL
    histogram: str = f"log2[{LOG2_MIN},{LOG2_MAX}]x{BINS_PER_OCTAVE}"
    error: str = "relative squared error of the block output, all greedy tokens but the first of each window"
    format: str = FORMAT


def default_settings(model: nn.Module, greedy: bool, greedy_tokens: int | None = None,
                     greedy_steps: int | None = None, greedy_seqlen: int | None = None) -> TealSettings:
    """Settings with the device's defaults filled in (CPU: few tokens and coarser steps; CUDA: the paper's)."""
    tokens, steps, seqlen = GREEDY_DEFAULTS[_device_kind(model)]
    for name, value in (("teal_greedy_tokens", greedy_tokens), ("teal_greedy_steps", greedy_steps),
                        ("teal_greedy_seqlen", greedy_seqlen)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise SparsityArgumentError(f"sparse-hf: invalid {name}={value!r}: expected a positive integer")
    seqlen = greedy_seqlen or seqlen
    # whole windows, as the search runs them: 300 and 320 tokens (3 windows of 128) are one calibration
    tokens = math.ceil((greedy_tokens or tokens) / seqlen) * seqlen
    return TealSettings(greedy=greedy, greedy_tokens=tokens, greedy_steps=greedy_steps or steps, greedy_seqlen=seqlen)


@torch.inference_mode()
def collect_histograms(model: nn.Module, sites: list[Site], windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the dense model on `windows` [N, T]; return (|x| histogram counts [L, 4, NUM_BINS], max |x| [L, 4])."""
    device = next(model.parameters()).device
    num_layers = 1 + max(s.layer for s in sites)
    counts = torch.zeros(num_layers, len(GROUPS), NUM_BINS, dtype=torch.float64, device=device)
    abs_max = torch.zeros(num_layers, len(GROUPS), dtype=torch.float64, device=device)
    handles = []

    def hook_for(layer: int, g: int):
        def hook(module: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().float().reshape(-1)  # |x| once, for the bins and the max
            counts[layer, g] += torch.bincount(histogram_bins(a), minlength=NUM_BINS).double()
            abs_max[layer, g] = torch.maximum(abs_max[layer, g], a.max().double())
        return hook

    for (layer, group), site in group_readers(sites).items():
        handles.append(site.module.register_forward_pre_hook(hook_for(layer, GROUPS.index(group))))
    per_forward = TOKENS_PER_FORWARD[_device_kind(model)]
    batch = max(1, per_forward // windows.shape[1])
    try:
        for start in tqdm(range(0, windows.shape[0], batch), desc="TEAL histograms", unit="batch"):
            ids = windows[start:start + batch].to(device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return counts.cpu(), abs_max.cpu()


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Per decoder layer, the dense hidden states and the exact keyword arguments the model passes to it."""
    layers = decoder_layers(model)
    captured: list[tuple[torch.Tensor, dict[str, Any]] | None] = [None] * len(layers)
    handles = []

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kw = dict(kwargs)
            hidden = args[0] if args else kw.pop("hidden_states")
            captured[i] = (hidden.detach().clone(), kw)
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(hook_for(i), with_kwargs=True))
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured):
        raise RuntimeError("lm-sparse: a decoder layer was not called during the capture forward")
    return captured  # type: ignore[return-value]


class GroupThresholds:
    """Thresholds from the stored histograms, memoized per (layer, group, level)."""

    def __init__(self, counts: torch.Tensor, abs_max: torch.Tensor):
        self.counts, self.abs_max = counts, abs_max
        self._cache: dict[tuple[int, int, float], float] = {}

    def __call__(self, layer: int, group: str, level: float) -> float:
        key = (layer, GROUPS.index(group), round(float(level), 12))
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = histogram_quantile(self.counts[key[0], key[1]], float(self.abs_max[key[0], key[1]]),
                                                      key[2])
        return t


@torch.inference_mode()
def greedy_lookup(model: nn.Module, sites: list[Site], ids: torch.Tensor, thresholds: GroupThresholds,
                  steps: int, stop: float = STOP_LEVEL) -> tuple[list[GreedyPath], dict[str, Any]]:
    """Run the greedy search on every block of `model` on the dense inputs of `ids` up to effective sparsity
    `stop`; return paths and timings."""
    layers = decoder_layers(model)
    per_layer = layer_sites(sites)
    captured = capture_block_inputs(model, ids)
    paths: list[GreedyPath] = []
    uniform_err, greedy_err, seconds = [], [], []
    # One tick per block: moves clipped at sparsity 1 make the number of steps per block vary.
    bar = tqdm(total=len(layers), desc="TEAL greedy", unit="block")
    for i, layer in enumerate(layers):
        lsites = per_layer[i]
        hidden, kwargs = captured[i]
        runner = BlockRunner(layer, lsites, hidden, kwargs,
                             lambda pos, level, ls=lsites: thresholds(ls[pos].layer, ls[pos].group, level))
        start = time.perf_counter()
        with runner.attached():
            num_params = [s.num_params for s in lsites]
            path = greedy_block(runner, num_params, steps, stop)
            seconds.append(time.perf_counter() - start)
            target = runner.run((0.0,) * len(lsites), memo=False)
            uniform_err.append([uniform_block_error(runner, s, target) for s in REPORT_LEVELS])
            at_levels = [tuple(interpolate_levels(path.effective, path.levels, s).tolist()) for s in REPORT_LEVELS]
            greedy_err.append([block_error(runner.run(lv, memo=False), target) for lv in at_levels])
        paths.append(path)
        captured[i] = None  # type: ignore[call-overload]  # free the layer's inputs
        bar.update(1)
        bar.set_postfix(moves=len(path.effective) - 1)
    bar.close()
    n = len(layers)
    info = {
        "seconds_per_block": sum(seconds) / n,
        "seconds_total": sum(seconds),
        "block_error_at": {f"{s:g}": {"greedy": sum(g[k] for g in greedy_err) / n,
                                      "uniform": sum(u[k] for u in uniform_err) / n}
                           for k, s in enumerate(REPORT_LEVELS)},
    }
    return paths, info


def _stack_paths(paths: list[GreedyPath]) -> dict[str, torch.Tensor]:
    # Layers can end after different numbers of moves (clipping at 1): pad with each layer's last row.
    rows = max(p.effective.numel() for p in paths)

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = rows - t.shape[0]
        return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])]) if extra else t

    return {
        "greedy_effective": torch.stack([pad(p.effective) for p in paths]),
        "greedy_error": torch.stack([pad(p.error) for p in paths]),
        "greedy_levels": torch.stack([pad(p.levels) for p in paths]),
    }


def calibrate_teal(model: nn.Module, sites: list[Site], windows: torch.Tensor,
                   settings: TealSettings) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Histograms on `windows`, then (if `settings.greedy`) the greedy lookup; return (results, tensors)."""
    start = time.perf_counter()
    counts, abs_max = collect_histograms(model, sites, windows)
    results: dict[str, Any] = {"histogram_seconds": time.perf_counter() - start,
                               "histogram_tokens": int(windows.numel()),
                               "groups": list(GROUPS), "device": _device_kind(model)}
    tensors = {"hist_counts": counts, "abs_max": abs_max}
    if settings.greedy:
        seqlen = min(settings.greedy_seqlen, windows.shape[1])
        n_win = max(1, math.ceil(settings.greedy_tokens / seqlen))
        pieces = windows[:, : (windows.shape[1] // seqlen) * seqlen].reshape(-1, seqlen)
        ids = pieces[:n_win]
        thresholds = GroupThresholds(counts, abs_max)
        paths, info = greedy_lookup(model, sites, ids, thresholds, settings.greedy_steps, settings.stop_level)
        tensors.update(_stack_paths(paths))
        per_layer = layer_sites(sites)[0]
        results["greedy"] = {"tokens": int(ids.numel()), "steps": settings.greedy_steps,
                             "sites": [s.name for s in per_layer],
                             "num_params": [s.num_params for s in per_layer], **info}
    results["seconds"] = time.perf_counter() - start
    return results, tensors


# -- serving a target level -----------------------------------------------------------------------------
@dataclass
class TealLookup:
    """The loaded calibration: thresholds for any level, greedy levels for any target."""

    thresholds: GroupThresholds
    greedy_effective: torch.Tensor | None = None  # [L, R]
    greedy_levels: torch.Tensor | None = None  # [L, R, M]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "TealLookup":
        return cls(GroupThresholds(tensors["hist_counts"], tensors["abs_max"]),
                   tensors.get("greedy_effective"), tensors.get("greedy_levels"))

    def site_levels(self, sites: list[Site], target: float, mode: str) -> dict[int, float]:
        """{site index: sparsity} at model-wide (parameter-weighted) sparsity `target`."""
        if mode == "uniform":
            return {s.index: float(target) for s in sites}
        if self.greedy_levels is None or self.greedy_effective is None:
            raise RuntimeError("lm-sparse: this TEAL calibration has no greedy lookup")
        top = float(self.greedy_effective[:, -1].min())
        if target > top + 1e-9:
            raise SparsityArgumentError(
                f"sparse-hf: invalid teal={target:g}: the greedy lookup stops at {top:.2f}; "
                "use a lower level or teal_mode=uniform")
        out: dict[int, float] = {}
        for i, lsites in enumerate(layer_sites(sites)):
            levels = interpolate_levels(self.greedy_effective[i], self.greedy_levels[i], float(target))
            out.update({s.index: float(v) for s, v in zip(lsites, levels.tolist())})
        return out

    def rules(self, sites: list[Site], target: float, mode: str) -> tuple[dict[int, Rule], dict[int, float]]:
        """Threshold rules on every site at `target`; also returns the levels used."""
        levels = self.site_levels(sites, target, mode)
        return {s.index: Threshold(self.thresholds(s.layer, s.group, levels[s.index]), levels[s.index])
                for s in sites}, levels


# -- ppl_p=P with method=teal: the largest level within the perplexity budget ------------------------------------
PPL_TOKENS = {"cpu": 2048, "cuda": 32768}
LEVEL_GRID = 0.01


def search_level(engine: SparsityEngine, lookup: TealLookup, windows: torch.Tensor, ppl_p: float,
                 mode: str, dense_ppl: float | None = None) -> tuple[float, list[dict[str, float]]]:
    """Bisect over TEAL levels (grid 0.01) for the largest one with PPL ratio <= 1 + ppl_p/100.

    Assumes the ratio grows with the level (one sparse forward per probe, about 7 probes). The perplexity
    is measured on `windows` (`_ppl_windows`: PPL_TOKENS calibration tokens), with the engine's
    `sparse_prefill` policy. `dense_ppl`: the dense perplexity of `windows`, when already measured.
    """
    model = engine.model
    batch = max(1, TOKENS_PER_FORWARD[_device_kind(model)] // windows.shape[1])
    dense = perplexity(model, windows, batch_size=batch) if dense_ppl is None else dense_ppl
    top = 0.99 if mode == "uniform" else float(lookup.greedy_effective[:, -1].min())  # type: ignore[index]
    grid = [round(k * LEVEL_GRID, 6) for k in range(int(top / LEVEL_GRID + 1e-9) + 1)]
    budget = 1.0 + ppl_p / 100.0
    probes: list[dict[str, float]] = []
    previous = dict(engine.rules)
    lo, hi = 0, len(grid) - 1  # grid[lo] (level 0) is within budget
    try:
        with tqdm(desc=f"TEAL ppl_p={ppl_p:g} search", unit="probe") as bar:
            while lo < hi:
                mid = (lo + hi + 1) // 2
                engine.set_rules(lookup.rules(engine.sites, grid[mid], mode)[0])
                with engine.paused(), engine.attached():
                    ratio = perplexity(model, windows, batch_size=batch) / dense
                probes.append({"level": grid[mid], "ppl_ratio": ratio})
                bar.update(1)
                if ratio <= budget:
                    lo = mid
                else:
                    hi = mid - 1
    finally:
        engine.set_rules(previous)
    return grid[lo], [{"dense_ppl": dense, "tokens": int(windows.numel())}, *probes]


# -- entry points ----------------------------------------------------------------------------------------------
def _file_has_greedy(path: str) -> bool:
    """Whether the thresholds file at `path` was calibrated with the greedy lookup (False if unreadable:
    loading it then raises the clear error)."""
    try:
        payload = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        return bool(payload["fields"]["params"]["greedy"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return False


def load_teal(model: nn.Module, sites: list[Site], tokenizer: Any, *, calib_data: str | None,
              calib_tokens: int | None, calib_seqlen: int | None, calib_seed: int, greedy: bool,
              thresholds_path: str | None = None, recalibrate: bool = False, lm: Any = None,
              greedy_tokens: int | None = None, greedy_steps: int | None = None,
              greedy_seqlen: int | None = None,
              loaded: tuple[list[str], dict] | None = None) -> tuple[TealLookup, dict[str, Any], str, bool]:
    """Load (or calibrate and store) the TEAL file; return (lookup, payload, file path, calibrated now).

    Uniform mode reuses a greedy file of the same settings when one exists, else stores histograms only.
    With `thresholds_path` the file is loaded as given (no calibration text is read). `loaded`: what
    `load_texts(calib_data)` returned, when the caller has read the text already.
    """
    from ..identity import lm_model_identity
    from ..thresholds import CacheKey, find_existing, load_or_compute

    seqlen = calib_seqlen or DEFAULT_SEQLEN
    # whole windows, as calibration_batches cuts them (so 2048 and 2050 tokens are one key)
    tokens = max(seqlen, (calib_tokens or CALIB_TOKENS[_device_kind(model)]) // seqlen * seqlen)
    if thresholds_path is None:
        texts, data_identity = loaded if loaded is not None else load_texts(calib_data)
    else:
        texts, data_identity = [], {"source": calib_data, "sha256": None}
    identity = lm_model_identity(model, lm, tokenizer)  # hashed once, whatever the number of attempts
    ran = {"now": False}

    def fields_for(with_greedy: bool) -> tuple[TealSettings, dict]:
        settings = default_settings(model, with_greedy, greedy_tokens, greedy_steps, greedy_seqlen)
        return settings, CacheKey(model=identity, method="teal", params=asdict(settings), data=data_identity,
                                  calib_tokens=tokens, seqlen=seqlen, seed=calib_seed).fields()

    def attempt(with_greedy: bool):
        settings, fields = fields_for(with_greedy)

        def compute():
            ran["now"] = True
            windows, _ = calibration_batches(tokenizer, texts, tokens, seqlen, calib_seed)
            logger.warning("lm-sparse: calibrating TEAL (%s) on %d tokens (one time; cached after)",
                           "histograms + greedy lookup" if with_greedy else "histograms", windows.numel())
            return calibrate_teal(model, sites, windows, settings)

        return load_or_compute(fields, compute, path=thresholds_path, recalibrate=recalibrate, rank_context=lm)

    if thresholds_path is not None:
        # A greedy file also holds the histograms uniform mode reads: key it as it was made, so that using it
        # for teal_mode=uniform is not reported as "calibrated with other settings".
        payload, tensors, path = attempt(greedy or _file_has_greedy(thresholds_path))
    elif greedy:
        payload, tensors, path = attempt(True)
    else:
        # Uniform mode reuses a greedy file of the same settings. Every rank looks for one on its own (no
        # barrier), so under data parallelism all ranks then enter the same load_or_compute.
        existing = None if recalibrate else find_existing(fields_for(True)[1])
        payload, tensors, path = existing if existing is not None else attempt(False)
    lookup = TealLookup.from_tensors(tensors)
    if greedy and lookup.greedy_levels is None:
        raise SparsityArgumentError(f"sparse-hf: thresholds={path!r} holds no greedy lookup; use teal_mode=uniform")
    return lookup, payload, path, ran["now"]


def _ppl_windows(tokenizer: Any, config: SparsityConfig, payload: dict, model: nn.Module,
                 texts: list[str] | None) -> torch.Tensor:
    """Calibration windows for the ppl_p level search (the same text and seed as the calibration).

    `texts`: the calibration text when already read (None: read `calib_data` here).
    """
    fields = payload["fields"]
    if config.calib_data is None and config.thresholds is not None:
        raise SparsityArgumentError("sparse-hf: ppl_p=P,method=teal with thresholds=FILE also needs calib_data=")
    if texts is None:
        texts, _ = load_texts(config.calib_data)
    seqlen = int(fields.get("seqlen") or DEFAULT_SEQLEN)
    tokens = PPL_TOKENS[_device_kind(model)]
    windows, _ = calibration_batches(tokenizer, texts, max(tokens, seqlen), seqlen, int(fields.get("seed") or 0))
    return windows


def build_teal_rules(engine: SparsityEngine, config: SparsityConfig, tokenizer: Any,
                     lm: Any) -> tuple[dict[int, Rule], dict[str, Any]]:
    """Threshold rules on all seven projections of every layer, at `teal=S` or at the level `ppl_p=P` picks."""
    model = engine.model
    extra = config.extra or {}
    start = time.perf_counter()
    # Read the text once: it keys the calibration and, for ppl_p=P, cuts the level search's windows.
    loaded = load_texts(config.calib_data) if config.thresholds is None else None
    lookup, payload, path, ran = load_teal(
        model, engine.sites, tokenizer, calib_data=config.calib_data, calib_tokens=config.calib_tokens,
        calib_seqlen=config.calib_seqlen, calib_seed=config.calib_seed, greedy=config.teal_mode == "greedy",
        thresholds_path=config.thresholds, recalibrate=config.recalibrate, lm=lm,
        greedy_tokens=extra.get("teal_greedy_tokens"), greedy_steps=extra.get("teal_greedy_steps"), loaded=loaded)
    fields = payload["fields"]
    info: dict[str, Any] = {
        "method": "teal", "teal_mode": config.teal_mode, "file": path, "key": payload.get("key"),
        "calibrated_now": ran, "model": fields.get("model"), "data": fields.get("data"),
        "calib_tokens": fields.get("calib_tokens"), "seqlen": fields.get("seqlen"), "seed": fields.get("seed"),
        "params": fields.get("params"), "results": payload.get("results"), "sparse_prefill": engine.sparse_prefill,
        "sparsity_measure": "parameter-weighted: the report's weights_skipped",
    }
    if config.method == "teal":
        windows = _ppl_windows(tokenizer, config, payload, model, loaded[0] if loaded is not None else None)
        level, probes = search_level(engine, lookup, windows, float(config.level), config.teal_mode)
        info.update(ppl_p=float(config.level), level=level, ppl_search=probes)
    else:
        level = float(config.level)
        info["level"] = level
    rules, levels = lookup.rules(engine.sites, level, config.teal_mode)
    by_name: dict[str, list[float]] = {}
    for s in engine.sites:
        by_name.setdefault(s.name, []).append(round(levels[s.index], 4))
    info["levels"] = by_name
    info["seconds"] = time.perf_counter() - start
    return rules, info


def calibrate_cli(args: Any) -> int:
    """`lm-sparse calibrate --method teal`: write (or find) the histograms and greedy lookup, copy to --out.

    Reads args.model, dtype, device, revision, calib_data, calib_tokens, calib_seqlen, calib_seed,
    recalibrate, out, teal_mode (greedy|uniform), teal_level (optional: print the levels at it),
    teal_greedy_steps and teal_greedy_tokens (optional: override the device defaults).
    """
    import argparse

    from ..thresholds import copy_thresholds
    from .cli import _load

    mode = getattr(args, "teal_mode", None) or "greedy"
    if mode not in ("greedy", "uniform"):
        raise SparsityArgumentError(f"lm-sparse calibrate: invalid --teal-mode {mode!r}: expected greedy or uniform")
    level = getattr(args, "teal_level", None)
    if level is not None and not 0.0 <= float(level) < 1.0:
        raise SparsityArgumentError(f"lm-sparse calibrate: invalid --teal-level {level!r}: expected a value in [0, 1)")
    pretrained, model, tokenizer = _load(args)
    engine = SparsityEngine(model)
    context = argparse.Namespace(pretrained=pretrained, revision=getattr(args, "revision", None), world_size=1, rank=0)
    lookup, payload, path, ran = load_teal(
        model, engine.sites, tokenizer, calib_data=args.calib_data, calib_tokens=args.calib_tokens,
        calib_seqlen=args.calib_seqlen, calib_seed=int(args.calib_seed or 0), greedy=(mode == "greedy"),
        recalibrate=bool(getattr(args, "recalibrate", False)), lm=context,
        greedy_tokens=getattr(args, "teal_greedy_tokens", None), greedy_steps=getattr(args, "teal_greedy_steps", None))
    copy_thresholds(path, args.out)
    results = payload.get("results", {})
    print(f"file:           {path} ({'calibrated now' if ran else 'loaded'})")
    print(f"key:            {payload.get('key')}")
    print(f"histograms:     {results.get('histogram_tokens')} tokens, {results.get('histogram_seconds', 0):.1f} s")
    greedy = results.get("greedy")
    if greedy:
        print(f"greedy lookup:  {greedy['tokens']} tokens, {greedy['steps']} steps to {STOP_LEVEL}, "
              f"{greedy['seconds_per_block']:.2f} s per block, {greedy['seconds_total']:.1f} s in all")
        print("| level | block error greedy | block error uniform |")
        print("|---:|---:|---:|")
        for lv, err in greedy["block_error_at"].items():
            print(f"| {lv} | {err['greedy']:.3e} | {err['uniform']:.3e} |")
    if level is not None:
        levels = lookup.site_levels(engine.sites, float(level), mode)
        for name in dict.fromkeys(s.name for s in engine.sites):
            values = [levels[s.index] for s in engine.sites if s.name == name]
            print(f"teal={float(level):g} {mode}: {name:8s} mean sparsity {sum(values) / len(values):.3f}")
    print(f"wrote {args.out}")
    return 0
