"""What the kernel benchmarks share: the run's environment, synchronized timing, the JSON they write."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch


def environment(device: torch.device) -> dict:
    """Device name and the torch / triton versions, for the results' meta block."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__}


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one `fn()`, the GPU synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after one warm-up (which may compile; `warmup=False`
    for a caller that ran and timed it already), GPU synchronized."""
    if warmup:
        wall_seconds(fn, device)
    return statistics.median(wall_seconds(fn, device) for _ in range(repeats))


def write_results(path: str | None, meta: dict, rows: list[dict], **extra: object) -> None:
    """Write {"meta", "rows", **extra} as JSON to `path`, making its folder (nothing when `path` is None);
    atomically, so a run stopped mid-write leaves the previous complete file."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows, **extra}, f, indent=1)
        os.replace(tmp, path)
