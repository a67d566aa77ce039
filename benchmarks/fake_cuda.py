"""Inductor's CUDA code for a graph, generated on a machine without a GPU (a diagnostic, not a product path).

A compiled decode step's speed on a GPU depends on how many kernels its CUDA graph replays: each costs a few
microseconds however little it does. Inductor decides that when it generates code, and its CPU back end fuses
differently from its Triton one (the CPU one fuses nodes of different sizes into one loop nest; Triton
launches one kernel per size). So counting launches on the CPU's code misleads. This module makes inductor
write the Triton code for an H100 on a CPU-only torch:

- `capture_backend` is a torch.compile backend that traces the step on the CPU as inductor would (AOT
  autograd, inductor's decompositions, input mutations kept in the graph) and keeps the graph and inputs;
- `cuda_wrapper_code(graph, inputs)` moves that graph to "cuda" (fake tensors: nothing is allocated or run),
  and, under `fake_h100()`, runs inductor's lowering, scheduler and code generation, and returns the
  wrapper's source: one `triton_*.run(...)` line per kernel launch, `extern_kernels.*` for library calls,
  and custom ops by name.

`fake_h100()` patches what inductor asks of the device (properties, capability, the current device and
stream, Triton's driver and target) and restores it all on exit. Tensor.copy_ is routed to the aten op
because the Python binding takes a CUDA device guard, which a CPU-only build does not have. The kernels are
generated, not compiled: their modules load as stand-ins. Tested with torch 2.13; another torch may ask for
something else, which fails loudly (the census then says so), never silently.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from unittest import mock

import torch

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (fake)", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30,
    warp_size=32, max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536, max_threads_per_block=1024,
    shared_memory_per_block_optin=232448, max_shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472, L2_cache_size=50 * 2**20, gcnArchName="", clock_rate=1980000,
    memory_clock_rate=2619000, memory_bus_width=5120)


class _FakeDriver:
    """What inductor's code generation asks Triton's active driver (the target it hashes kernels for)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, *args) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def get_device_interface(self):
        return torch.cuda

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def fake_h100() -> Iterator[None]:
    """Make inductor believe one H100 is present, for code generation only; undone on exit."""
    from triton.runtime import driver as triton_driver  # the DriverConfig object
    import torch._inductor.config as inductor_config
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as torch_triton
    from torch._dynamo import device_interface

    def const(value):
        return lambda *args, **kwargs: value

    cuda_interface = device_interface.CudaInterface
    patches = [
        *(mock.patch.object(torch.cuda, name, fn, create=True) for name, fn in dict(
            get_device_properties=const(H100), _get_device_properties=const(H100),
            get_device_capability=const((9, 0)), is_available=const(True), device_count=const(1),
            current_device=const(0), is_bf16_supported=const(True), _lazy_init=const(None),
            get_rng_state=lambda *a, **k: torch.zeros(16, dtype=torch.uint8), set_rng_state=const(None),
            synchronize=const(None), _exchange_device=const(0), _maybe_exchange_device=const(0),
            set_device=const(None)).items()),
        *(mock.patch.object(cuda_interface, name, staticmethod(fn)) for name, fn in dict(
            get_device_properties=const(H100), get_compute_capability=const(90), is_available=const(True),
            device_count=const(1), current_device=const(0), is_bf16_supported=const(True),
            get_raw_stream=const(0), synchronize=const(None)).items()),
        mock.patch.object(cuda_interface.Worker, "get_device_properties", staticmethod(const(H100))),
        mock.patch.object(torch_triton, "has_triton", const(True)),
        mock.patch.object(inductor_config, "compile_threads", 1),  # no worker would find the fake GPU
        mock.patch.object(scheduler, "has_triton", const(True)),
        mock.patch.object(torch.Tensor, "copy_",
                          lambda self, src, non_blocking=False: torch.ops.aten.copy_.default(self, src, non_blocking)),
    ]
    previous = triton_driver._active  # not `.active`, which would make the real driver (and fail: no GPU)
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        triton_driver.set_active(_FakeDriver())
        try:
            yield
        finally:
            triton_driver._active = previous


def capture_backend(captured: list) -> Callable:
    """A torch.compile backend that appends (aten graph, example inputs) of each compiled graph to `captured`
    and runs the graph as traced (eagerly)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    def backend(gm: torch.fx.GraphModule, inputs: list) -> Callable:
        def keep(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
            captured.append((graph, list(example_inputs)))
            return graph.forward

        return aot_module_simplified(gm, inputs, fw_compiler=keep, decompositions=select_decomp_table(),
                                     keep_inference_input_mutations=True)

    return backend


def _to_cuda(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph with every device argument that names the CPU naming the GPU instead."""
    cuda = torch.device("cuda", 0)

    def move(arg):
        return cuda if isinstance(arg, torch.device) and arg.type == "cpu" else arg

    for node in graph.graph.nodes:
        node.args = tuple(move(a) for a in node.args)
        node.kwargs = {k: move(v) for k, v in node.kwargs.items()}
    graph.recompile()
    return graph


class _WrapperCode(Exception):
    """Carries the generated wrapper out of inductor once it is written (nothing is compiled or run)."""

    def __init__(self, source: str):
        super().__init__("inductor's wrapper code")
        self.source = source


def cuda_wrapper_code(graph: torch.fx.GraphModule, inputs: list) -> str:
    """Inductor's CUDA wrapper source for a graph `capture_backend` kept (its CPU inputs give shapes only)."""
    from torch._inductor import codecache
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    with mode:
        fake = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                if isinstance(t, torch.Tensor) else t for t in inputs]

    def grab(key, path, *args, **kwargs):
        with open(path) as f:
            source = f.read()
        if "def call(" in source:  # the wrapper: done
            raise _WrapperCode(source)
        return mock.MagicMock()  # a kernel's module: generated, not compiled

    with fake_h100(), mock.patch.object(codecache.PyCodeCache, "load_by_key_path", grab):
        try:
            with mode:
                retraced = make_fx(_to_cuda(graph))(*fake)  # metadata of CUDA tensors for inductor's passes
                compile_fx_inner(retraced, fake)
        except _WrapperCode as done:
            return done.source
        except Exception as exc:  # inductor wraps what its loader raised
            cause = exc
            while cause is not None and not isinstance(cause, _WrapperCode):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                return cause.source
            raise
    raise RuntimeError("inductor returned without writing its wrapper code")
