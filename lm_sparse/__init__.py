"""lm-sparse: measure what activation sparsity costs and buys an LLM, inside lm-evaluation-harness.

`import lm_sparse` registers the `sparse-hf` model type with lm-eval (lazily: torch and transformers load
only when the model is built), so `lm_eval.simple_evaluate(model="sparse-hf", ...)` works after it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _register_with_lm_eval() -> None:
    try:
        import _lm_sparse_hook
    except ImportError:  # running from a source tree without the installed hook module
        return
    try:
        _lm_sparse_hook.register()
    except ImportError:  # lm-eval not installed: nothing to register with
        pass


def __getattr__(name: str) -> Any:
    # Heavy imports only on first use of the classes.
    if name in ("SparseHFLM",):
        from .lm import SparseHFLM

        return SparseHFLM
    if name in ("SparsityEngine",):
        from .engine import SparsityEngine

        return SparsityEngine
    raise AttributeError(f"module 'lm_sparse' has no attribute {name!r}")


_register_with_lm_eval()

__all__ = ["SparseHFLM", "SparsityEngine", "__version__"]
