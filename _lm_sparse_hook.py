"""Start-up hook of lm-sparse: makes `lm_eval --model sparse-hf` work without importing anything first.

Installed as `lm_sparse.pth` next to this file in site-packages, which runs `install()` at interpreter
start. `install()` only puts a tiny finder on `sys.meta_path`; nothing else is imported, so Python
processes that never touch lm-eval pay a few microseconds. When (and only when) `lm_eval.api.registry` is
imported, the finder lets the real import run, then registers `sparse-hf` as a lazy placeholder
(`lm_sparse.lm:SparseHFLM`; torch and lm_sparse load only if that model is asked for) and removes itself.

lm-eval's `get_model` imports its own model table only while the registry is empty, so the hook imports
`lm_eval.models` before registering: `hf` and every built-in model keep resolving. lm-eval versions that
discover the `lm_eval.models` entry point themselves are left alone. Set LM_SPARSE_NO_HOOK=1 to disable.
"""

import os
import sys

_TARGET = "lm_eval.api.registry"
MODEL_NAME = "sparse-hf"
MODEL_PATH = "lm_sparse.lm:SparseHFLM"


def lm_eval_discovers_plugins(registry) -> bool:
    """True when this lm-eval reads the `lm_eval.models` entry-point group on its own."""
    for mod_name in (_TARGET, "lm_eval.models"):
        mod = sys.modules.get(mod_name) if mod_name != _TARGET else registry
        path = getattr(mod, "__file__", None)
        if not path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                if "entry_points(" in f.read():
                    return True
        except OSError:
            continue
    return False


def register(registry=None) -> bool:
    """Register `sparse-hf` in lm-eval's model registry (idempotent). Returns True if it is registered."""
    if registry is None:
        import importlib

        registry = importlib.import_module(_TARGET)
    models = registry.model_registry
    if MODEL_NAME in models:
        return True
    if lm_eval_discovers_plugins(registry):
        return False
    import lm_eval.models  # noqa: F401  -- lm-eval's own table first, or get_model() would skip it

    try:
        models.register(MODEL_NAME, target=MODEL_PATH)
    except ValueError:  # registered meanwhile (lm_sparse.lm imported): same class, nothing to do
        pass
    return True


class _Loader:
    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._finder.uninstall()
        try:
            register(module)
        except Exception as exc:  # never break lm-eval because of the hook
            print(f"lm-sparse: could not register {MODEL_NAME}: {exc}", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def uninstall(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Put the finder on sys.meta_path (called from lm_sparse.pth at start-up)."""
    if os.environ.get("LM_SPARSE_NO_HOOK"):
        return
    if _TARGET in sys.modules:  # already imported (install() called late): register now
        register(sys.modules[_TARGET])
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
