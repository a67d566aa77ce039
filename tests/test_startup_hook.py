"""The start-up hook: `lm_eval --model sparse-hf` works with nothing imported first, and costs nothing else."""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import _lm_sparse_hook

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> str:
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=300)
    return out.stdout.strip()


def test_plain_python_imports_nothing_heavy():
    out = _run("import sys; print(sorted(m for m in ('torch', 'lm_eval', 'lm_sparse', 'transformers') "
               "if m in sys.modules)); print('_lm_sparse_hook' in sys.modules)")
    assert out.splitlines() == ["[]", "True"]


def test_startup_cost_is_negligible():
    # -X importtime reports the hook module's own import time in microseconds.
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                         check=True).stderr
    line = next(x for x in out.splitlines() if x.rstrip().endswith("_lm_sparse_hook"))
    self_us = int(line.split("|")[0].split(":")[1])
    assert self_us < 5000, line


def test_registry_resolves_sparse_hf_and_builtin_models_without_importing_lm_sparse():
    out = _run(
        "import sys\n"
        "from lm_eval.api.registry import get_model\n"
        "print('lm_sparse' in sys.modules)\n"
        "print(get_model('hf').__name__, get_model('vllm' if False else 'dummy').__name__)\n"
        "print(get_model('sparse-hf').__name__)\n"
    )
    assert out.splitlines() == ["False", "HFLM DummyLM", "SparseHFLM"]


def test_hook_can_be_disabled():
    out = _run("from lm_eval.api.registry import model_registry\n"
               "import lm_eval.models\n"
               "print('sparse-hf' in model_registry)", LM_SPARSE_NO_HOOK="1")
    assert out == "False"


def test_import_lm_sparse_registers_even_without_hook():
    out = _run("import lm_sparse\nfrom lm_eval.api.registry import get_model\n"
               "print(get_model('sparse-hf').__name__, get_model('hf').__name__)", LM_SPARSE_NO_HOOK="1")
    assert out == "SparseHFLM HFLM"


def _fake_registry(tmp_path: Path, source: str) -> types.SimpleNamespace:
    path = tmp_path / "registry.py"
    path.write_text(source)
    registered: dict[str, str] = {}

    class Models(dict):
        def register(self, name, target):
            registered[name] = target

    return types.SimpleNamespace(__file__=str(path), model_registry=Models(), registered=registered)


def test_hook_steps_aside_when_lm_eval_discovers_entry_points(tmp_path):
    reg = _fake_registry(tmp_path, "import importlib.metadata as md\n"
                                   "eps = md.entry_points(group='lm_eval.models')\n")
    assert _lm_sparse_hook.lm_eval_discovers_plugins(reg)
    assert _lm_sparse_hook.register(reg) is False
    assert reg.registered == {}


def test_hook_registers_lazily_otherwise(tmp_path):
    reg = _fake_registry(tmp_path, "MODEL = 1\n")
    assert not _lm_sparse_hook.lm_eval_discovers_plugins(reg)
    assert _lm_sparse_hook.register(reg) is True
    assert reg.registered == {"sparse-hf": "lm_sparse.lm:SparseHFLM"}


def test_installed_lm_eval_has_no_plugin_discovery_of_its_own():
    # If this fails, lm-eval grew entry-point discovery: the hook steps aside and the entry point is used.
    import lm_eval.api.registry as registry

    assert not _lm_sparse_hook.lm_eval_discovers_plugins(registry)


def test_wheel_ships_hook_pth_and_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("lm_sparse-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"lm_sparse.pth", "_lm_sparse_hook.py", "lm_sparse/lm.py"} <= names
    assert "[lm_eval.models]" in entry_points and "sparse-hf = lm_sparse.lm:SparseHFLM" in entry_points
    assert "lm-sparse = lm_sparse.cli:main" in entry_points
