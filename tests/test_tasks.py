"""tasks/: the Sparsing Law suites resolve in lm-eval's task index, and the smoke tasks load offline."""

from __future__ import annotations

import os

import pytest
import yaml

from lm_sparse.report.sweep import builtin_tasks_dir

TASKS_DIR = builtin_tasks_dir()
SUITES = {
    "sparsing_law_commonsense": ["piqa", "social_iqa", "hellaswag", "winogrande", "copa"],
    "sparsing_law_reading": ["boolq", "lambada_openai"],
    "sparsing_law_general": ["gsm8k", "mmlu", "bbh", "humaneval", "mbpp", "agieval"],
}
SMOKE = ["lmsparse_smoke_mc", "lmsparse_smoke_ppl", "lmsparse_smoke_gen"]


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@pytest.fixture(scope="module")
def task_manager():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def _group_members(name: str) -> list[str]:
    (path,) = [p for p in TASKS_DIR.rglob("*.yaml") if yaml.load(p.read_text(), _Loader).get("group") == name]
    return yaml.load(path.read_text(), _Loader)["task"]


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_suite_members_resolve_in_lm_eval(task_manager, suite):
    members = _group_members(suite)
    assert members == SUITES[suite]
    assert suite in task_manager.all_groups
    missing = [m for m in members if m not in task_manager.all_tasks]
    assert not missing, f"{suite}: not in lm-eval's task index: {missing}"


def test_tydiqa_only_where_lm_eval_has_it(task_manager):
    # lm-eval 0.4.13 has no task named "tydiqa"; if a later version adds one, the reading suite should list it.
    assert ("tydiqa" in _group_members("sparsing_law_reading")) == ("tydiqa" in task_manager.all_tasks)


def test_smoke_tasks_load_offline_from_another_directory(task_manager, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data paths must not depend on the working directory
    loaded = task_manager.load_task_or_group(SMOKE)
    tasks = {name: task for name, task in _flatten(loaded).items()}
    assert set(tasks) == set(SMOKE)
    mc, ppl, gen = (tasks[n] for n in SMOKE)
    docs = list(mc.test_docs())
    assert 60 <= len(docs) <= 100
    assert all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in docs)
    counts = [sum(d["answer"] == i for d in docs) for i in range(4)]
    assert min(counts) >= len(docs) // 4 - 2  # answers spread over the positions: chance is 25%
    assert mc.doc_to_text(docs[0]).startswith("Question: ")
    assert len({d["question"] for d in docs}) == len(docs)
    ppl_docs = list(ppl.test_docs())
    assert 5 <= len(ppl_docs) <= 20 and sum(len(d["text"].split()) for d in ppl_docs) > 400
    gen_docs = list(gen.test_docs())
    assert len(gen_docs) == 20 and all(len(d["answer"].split()) == 1 for d in gen_docs)
    assert gen.config.generation_kwargs["max_gen_toks"] <= 8


def _flatten(loaded: dict) -> dict:
    out = {}
    for key, value in loaded.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return out


def test_smoke_group_lists_the_three_tasks():
    assert _group_members("lmsparse_smoke") == SMOKE
