"""Hand the decode-step products of threshold sites to the sparse kernel (`lm_sparse::sparse_linear`).

Which sites: every site whose rule is a `Threshold` (PPL-p%, TEAL, and Top-k and FAT through `OnGateScore`).
TEAL thresholds the inputs of all seven matrices, so all of them run the kernel; PPL-p% thresholds the FFN
intermediate, so only down_proj runs it (gate and up read the dense hidden state). Top-k and FAT pick neurons
by their gate score upstream, which leaves down_proj's input exactly zero there: down_proj runs the kernel
with threshold 0. A `TopK` rule put on a site's own input (not a method's) is a rank, not a threshold, and
stays masked dense; the sparsity report says per site which path ran.

A decode step of B rows reads the union of the rows' active inputs. Where the calibrated sparsity s of a
site makes that union nearly dense (estimated s**B < MIN_UNION_SPARSITY), the step runs a dense GEMM
instead (`sparse_rows_limit`), and the report says `dense_fallback` for it.

Each attached site's weight is re-stored once, input-major: wt = W^T [K, N] contiguous, and the module's
`weight` becomes the view `wt.t()`. Prefill keeps running the module's ordinary F.linear (cuBLAS reads
the transposed view as a plain NN GEMM, no copy) and memory does not grow.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import SparsityArgumentError
from ..engine.rules import OnGateScore, Threshold
from .reference import masked_input, round_threshold


def kernel_device_problem(device: torch.device, allow_interpreter: bool = False) -> str | None:
    """Why the kernels cannot run on `device` (None when they can): they need CUDA and triton.

    `allow_interpreter` also accepts CPU models when TRITON_INTERPRET=1 (tests, `--smoke` benchmarks).
    """
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # triton missing or broken
        return f"sparse_kernels=on needs triton, which is not importable ({exc})"
    if device.type == "cuda":
        return None
    if allow_interpreter and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    return f"sparse_kernels=on needs a CUDA device (the model is on {device.type})"


def make_input_major(module: nn.Linear) -> torch.Tensor:
    """Re-store `module.weight` as W^T [K, N] contiguous and make the weight a view of it; return W^T.

    Idempotent: a weight that already is such a view is returned as is. The old storage is freed once
    nothing else references it, so the model keeps one copy of every weight.
    """
    weight = module.weight
    wt = weight.t()
    if wt.is_contiguous() and not weight.is_contiguous():
        return wt
    wt = weight.detach().t().contiguous()
    module.weight = nn.Parameter(wt.t(), requires_grad=False)
    return wt


def _static_address(t: torch.Tensor | None) -> torch.Tensor | None:
    """Mark a tensor the decode step reads from a closure (not a module parameter) as having a fixed address:
    CUDA graphs then read it in place; a tensor they did not know to be static would be copied into the
    graph's inputs at every replay (for a fused weight, a second copy of the weights and their traffic)."""
    if t is not None and t.device.type == "cuda":
        torch._dynamo.mark_static_address(t)
    return t


def _threshold_for(threshold: float | torch.Tensor, weight: torch.Tensor):
    """t rounded to x's dtype, on x's device, computed once per (device, dtype).

    The weight's (device, dtype), the one decode steps run in, is filled in now: a compiled step that filled
    it on its first call would fail its own guard on the dict and compile a second time.
    """
    cache: dict[tuple, torch.Tensor] = {
        (weight.device, weight.dtype): _static_address(round_threshold(threshold, weight.dtype, weight.device))}

    def get(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        t = cache.get(key)
        if t is None:
            t = cache[key] = _static_address(round_threshold(threshold, x.dtype, x.device))
        return t

    return get


#: Below this union sparsity a sparse launch could skip at most 5% of the weight bytes, less than what its
#: tiles lose to cuBLAS's dense GEMV: run the dense GEMM.
MIN_UNION_SPARSITY = 0.05


def sparse_rows_limit(expected_sparsity: float | None) -> int:
    """The most decode rows (0..8) one sparse launch serves for inputs of per-row sparsity `expected_sparsity`.

    B rows read the union of their active inputs; its sparsity is estimated as s**B, the value for rows that
    are independent (activations share outlier channels, which keeps the real union sparser: the estimate
    errs towards dense). None (nothing calibrated, e.g. FAT): the kernel's own limit of 8 rows.
    """
    from .sparse_gemv import MAX_SPARSE_BATCH

    if expected_sparsity is None:
        return MAX_SPARSE_BATCH
    s = min(max(float(expected_sparsity), 0.0), 1.0)
    rows = 0
    while rows < MAX_SPARSE_BATCH and s ** (rows + 1) >= MIN_UNION_SPARSITY:
        rows += 1
    return rows


def _run(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, bias: torch.Tensor | None, with_counts: bool,
         max_rows: int):
    """y; with `with_counts`, (y, zero entries of the masked x per row), or (y, None) in a step being compiled.

    There the engine counts with the site's rule instead: inductor fuses that count into the kernel that made x
    (the RMSNorm, act * up), while a count the kernel returns is an opaque op's output, and stacking the step's
    records then costs one copy launch per site, 7 a layer (`benchmarks/decode_graph_census.py`).
    """
    if not with_counts:
        return torch.ops.lm_sparse.sparse_linear(x, wt, t, bias, max_rows)
    if torch.compiler.is_compiling():
        return torch.ops.lm_sparse.sparse_linear(x, wt, t, bias, max_rows), None
    return torch.ops.lm_sparse.sparse_linear_counted(x, wt, t, bias, max_rows)


def _premasked(x: torch.Tensor, threshold_of, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x in another dtype than the weights' (the kernel multiplies in theirs): masked in its own dtype, as the
    rule masks it, then cast, with a zero threshold for the kernel (which then skips exactly the zeros).
    No supported architecture feeds a site another dtype; this keeps such a model exact, not fast."""
    return masked_input(x, threshold_of(x)).to(dtype), round_threshold(0.0, dtype, x.device)


def make_decode_executor(module: nn.Linear, threshold: float | torch.Tensor, with_counts: bool = False,
                         max_rows: int | None = None):
    """fn(x [B, 1, K]) -> the module's output (bias included) through the sparse kernel.

    With `with_counts` it returns (y, zeros [B, 1]): the zero entries of the masked x per row, counted
    in the kernel's own pass, for an engine that records them instead of re-masking x; zeros is None in a
    step being compiled, where the engine's own count costs less (`_run`). Steps of more than
    `max_rows` rows (default and at most 8) run a dense GEMM on the masked x.
    """
    from .sparse_gemv import MAX_SPARSE_BATCH, sparse_linear  # noqa: F401  (registers the torch.ops.lm_sparse ops)

    threshold_of = _threshold_for(threshold, module.weight)
    limit = MAX_SPARSE_BATCH if max_rows is None else int(max_rows)

    def execute(x: torch.Tensor):
        wt = module.weight.t()  # the input-major storage (make_input_major)
        if x.dtype != wt.dtype:
            x, t = _premasked(x, threshold_of, wt.dtype)
        else:
            t = threshold_of(x)
        return _run(x, wt, t, module.bias, with_counts, limit)

    return execute


def make_fused_input_major(modules: list[nn.Linear]) -> torch.Tensor:
    """Store the weights of linears that read the same x (q/k/v, gate/up) as one W^T [K, sum N].

    Each module's weight becomes the view of its column block (cuBLAS takes the row stride as its leading
    dimension, no copy); returns the fused storage.
    """
    wt = torch.cat([m.weight.detach().t() for m in modules], dim=1).contiguous()
    start = 0
    for m in modules:
        n = m.out_features
        m.weight = nn.Parameter(wt[:, start:start + n].t(), requires_grad=False)
        start += n
    return wt


def make_fused_decode_executors(modules: list[nn.Linear], threshold: float | torch.Tensor,
                                with_counts: bool = False, max_rows: int | None = None) -> list:
    """One executor per module; the first one called with a new x runs a single launch for all of them.

    The group's modules share x and the threshold, so the union of active inputs is read once and the
    others' outputs are handed out from that launch (two launches saved for q/k/v, one for gate/up).
    `max_rows`: as in `make_decode_executor`.
    """
    from .sparse_gemv import MAX_SPARSE_BATCH, sparse_linear  # noqa: F401

    limit = MAX_SPARSE_BATCH if max_rows is None else int(max_rows)

    wt = _static_address(make_fused_input_major(modules))
    sizes = [m.out_features for m in modules]
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else wt.new_zeros(n) for b, n in zip(biases, sizes)])
        _static_address(bias)
    threshold_of = _threshold_for(threshold, wt)
    # Every key present from the start: a compiled step guards on the dict's length.
    state: dict = {"x": None, "outs": None, "zeros": None, "served": 0}

    def executor(i: int):
        def execute(x: torch.Tensor):
            if state["x"] is not x:
                xin, t = _premasked(x, threshold_of, wt.dtype) if x.dtype != wt.dtype else (x, threshold_of(x))
                out = _run(xin, wt, t, bias, with_counts, limit)
                y, zeros = out if with_counts else (out, None)
                state.update(x=x, outs=y.split(sizes, dim=-1), zeros=zeros, served=0)
            y, zeros = state["outs"][i], state["zeros"]
            state["served"] += 1
            if state["served"] == len(modules):  # every member served: drop the references to x and y
                state.update(x=None, outs=None, zeros=None)
            return (y, zeros) if with_counts else y
        return execute

    return [executor(i) for i in range(len(modules))]


def make_prefill_masker(threshold: float | torch.Tensor, weight: torch.Tensor):
    """fn(x) -> (x with |x| <= t zeroed, zero entries per row): the fused one-pass `threshold_mask_counted`.

    `weight`: the site's weight, whose device and dtype x normally has.
    """
    from .threshold_mask import threshold_mask_counted  # noqa: F401  (registers the op)

    threshold_of = _threshold_for(threshold, weight)

    def mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.lm_sparse.threshold_mask_counted(x, threshold_of(x))

    return mask


def attach_prefill_masks(engine, allow_interpreter: bool = False) -> list[int]:
    """Give every threshold site the fused masking kernel for multi-token forwards; return their indices.

    Prefill stays a dense GEMM on the masked input, but masking and counting then cost one read and one
    write of x instead of the torch ops' four passes. Does nothing where the kernels cannot run.
    """
    device = next(engine.model.parameters()).device
    if kernel_device_problem(device, allow_interpreter) is not None:
        return []
    from .sparse_gemv import SUPPORTED_DTYPES

    attached = []
    for site in engine.sites:
        rule = engine.rules.get(site.index)
        # OnGateScore leaves x as it is (its zeros were made upstream): nothing for a masker to do
        if isinstance(rule, Threshold) and not isinstance(rule, OnGateScore) \
                and site.module.weight.dtype in SUPPORTED_DTYPES:
            engine.set_prefill_masker(site.index, make_prefill_masker(rule.threshold, site.module.weight))
            attached.append(site.index)
    return attached


def _same_threshold(rules: list[Threshold]) -> bool:
    first = rules[0].threshold
    for rule in rules[1:]:
        t = rule.threshold
        if isinstance(first, torch.Tensor) != isinstance(t, torch.Tensor):
            return False
        if isinstance(t, torch.Tensor) and not (t.shape == first.shape and torch.equal(t.to(first.device), first)):
            return False
        if not isinstance(t, torch.Tensor) and float(t) != float(first):
            return False
    return True


def autocast_conflict(weight_dtype: torch.dtype, autocast_dtype: torch.dtype) -> str:
    """The one-line error for sparse_kernels=on when autocast would compute in another dtype than the weights'."""
    name = str(autocast_dtype).removeprefix("torch.")
    return (f"sparse_kernels=on: mixed_precision_dtype={name} runs the masked-dense GEMMs in {name}, but the "
            f"kernels read the weights as stored ({str(weight_dtype).removeprefix('torch.')}) and would compute "
            f"otherwise: load the model with dtype={name}, or use sparse_kernels=auto or off")


def attach_decode_kernels(engine, required: bool, fuse: bool = True, allow_interpreter: bool = False,
                          autocast_dtype: torch.dtype | None = None) -> list[int]:
    """Register the sparse kernel as decode executor of every threshold site; return their site indices.

    Sites of one layer that read the same input with the same threshold (q/k/v, gate/up: TEAL's group
    thresholds) share one fused launch when `fuse`. A site's kernel serves up to `sparse_rows_limit(rule's
    expected sparsity)` rows; larger steps run a dense GEMM. Does nothing (returns []) where the kernels
    cannot run (no CUDA, no triton) or no site has a threshold rule; with `required` (sparse_kernels=on)
    those cases raise one clear error instead. `allow_interpreter`: see `kernel_device_problem`.
    `autocast_dtype` (HFLM's mixed_precision_dtype): where it differs from the weights' dtype, autocast runs the
    masked-dense GEMMs in it while a kernel would read and multiply the weights as stored, so no kernel is
    attached (the decode tokens stay the masked-dense ones).
    """
    from .sparse_gemv import SUPPORTED_DTYPES, reserve_tickets

    device = next(engine.model.parameters()).device
    problem = kernel_device_problem(device, allow_interpreter)
    if problem is not None:
        if required:
            raise SparsityArgumentError(problem)
        return []
    reserve_tickets(device)  # before any compiled step captures a launch that may use it (fused_reduce)
    # An engine that sets `executor_counts = True` takes (y, zeros) from executors (no re-masking).
    with_counts = bool(getattr(engine, "executor_counts", False))
    groups: dict[tuple[int, str], list] = {}
    for site in engine.sites:
        rule = engine.rules.get(site.index)
        if not isinstance(rule, Threshold):
            continue
        if autocast_dtype is not None and site.module.weight.dtype != autocast_dtype:
            if required:
                raise SparsityArgumentError(autocast_conflict(site.module.weight.dtype, autocast_dtype))
            continue
        if site.module.weight.dtype not in SUPPORTED_DTYPES:
            if required:
                raise SparsityArgumentError(
                    f"sparse_kernels=on: weight dtype {site.module.weight.dtype} of {site.name} is not one of "
                    "bfloat16, float16, float32")
            continue
        groups.setdefault((site.layer, site.group), []).append(site)
    attached: list[int] = []
    for sites in groups.values():
        rules = [engine.rules[s.index] for s in sites]
        modules = [s.module for s in sites]
        fusable = (fuse and len(sites) > 1 and _same_threshold(rules)
                   and len({(m.weight.dtype, m.weight.device) for m in modules}) == 1)
        if fusable:
            # One launch serves the group: the densest member's limit (equal thresholds: equal levels in TEAL).
            limit = min(sparse_rows_limit(r.expected_sparsity) for r in rules)
            fns = make_fused_decode_executors(modules, rules[0].threshold, with_counts, limit)
            for site, fn in zip(sites, fns):
                engine.set_decode_executor(site.index, fn, max_rows=limit)
        else:
            for site, rule in zip(sites, rules):
                make_input_major(site.module)
                limit = sparse_rows_limit(rule.expected_sparsity)
                engine.set_decode_executor(site.index, make_decode_executor(site.module, rule.threshold,
                                                                            with_counts, limit), max_rows=limit)
        attached.extend(s.index for s in sites)
    if required and not attached:
        raise SparsityArgumentError(
            "sparse_kernels=on: no site has a threshold rule (a dense run has nothing to skip); "
            "use sparse_kernels=auto or off")
    return sorted(attached)
