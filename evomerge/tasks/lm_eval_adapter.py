"""lm-eval tasks as evomerge objectives (optional extra ``lmeval``).

Accepts an lm-eval task name (``arc_easy``, ``gsm8k``, ...), a directory of lm-eval task
YAMLs (``path/to/dir`` or ``path/to/dir:task_name``), or one task YAML file. Datasets are
read from local files or the local Hugging Face datasets cache only (``HF_DATASETS_OFFLINE``
is forced on), so nothing is downloaded while a search runs. Items are zero-shot prompts:
``doc_to_text`` + the task's target delimiter + each choice (multiple choice), or
``generate_until`` with the task's ``until`` stops, ``max_gen_toks`` and first regex filter.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.tasks.task import Item, Task


def _import_lm_eval():
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval.tasks
    except ImportError:
        raise EvomergeError("lm-eval tasks need the lmeval extra (pip install 'evomerge[lmeval]')") from None
    return lm_eval.tasks


@functools.lru_cache(maxsize=8)
def _manager(include: str | None):
    # indexing lm-eval's thousands of task YAMLs takes seconds: do it once per include path
    tasks_mod = _import_lm_eval()
    return tasks_mod.TaskManager(include_path=include) if include else tasks_mod.TaskManager()


def _resolve(spec: str) -> tuple[str | None, str]:
    """-> (include path or None, task name)."""
    path_part, _, name = spec.partition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    path = Path(path_part)
    if path.is_dir():
        if not name:
            yamls = sorted(path.glob("*.yaml"))
            if len(yamls) != 1:
                raise EvomergeError(f"{path}: name the lm-eval task as {path}:TASK ({len(yamls)} task YAMLs inside)")
            name = _task_name_in(yamls[0])
        return str(path), name
    if path.is_file():
        return str(path.parent), name or _task_name_in(path)
    return None, spec


def _task_name_in(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise EvomergeError(f"{path}: not an lm-eval task YAML (no 'task:' line)")


def _regex_of(config) -> str | None:
    for flt in getattr(config, "filter_list", None) or []:
        for step in flt.get("filter", []) if isinstance(flt, dict) else []:
            if step.get("function") == "regex" and step.get("regex_pattern"):
                return step["regex_pattern"]
    return None


def load_lm_eval_task(spec: str) -> Task:
    _import_lm_eval()
    include, name = _resolve(spec)
    manager = _manager(include)
    if name not in manager.all_tasks:
        raise EvomergeError(f"unknown lm-eval task {name!r}" + (f" in {include}" if include else ""))
    try:
        # lm-eval >= 0.4.10 has load() -> {"tasks": {...}}; older versions load_task_or_group()
        loaded = manager.load([name])["tasks"] if hasattr(manager, "load") else manager.load_task_or_group([name])
    except Exception as exc:  # datasets raises many kinds of errors when a dataset is absent
        raise EvomergeError(f"lm-eval task {name!r}: cannot load its dataset from local files "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    task = loaded.get(name)
    if task is None or isinstance(task, dict):
        raise EvomergeError(f"lm-eval task {name!r} is a group; name one of its tasks")
    return _convert(name, task)


def _convert(name: str, task) -> Task:
    config = task.config
    if task.has_test_docs():
        docs, split = task.test_docs(), "test"
    elif task.has_validation_docs():
        docs, split = task.validation_docs(), "validation"
    else:
        raise EvomergeError(f"lm-eval task {name!r} has no test or validation split")
    output_type = config.output_type
    delimiter = config.target_delimiter if config.target_delimiter is not None else " "
    items = []
    for i, doc in enumerate(docs):
        prompt = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if output_type == "multiple_choice":
            choices = task.doc_to_choice(doc)
            answer = choices[target] if isinstance(target, int) else str(target)
            if answer not in choices:
                raise EvomergeError(f"lm-eval task {name!r}, doc {i}: target {answer!r} is not a choice")
            items.append(Item(str(i), str(prompt), delimiter + answer, [delimiter + c for c in choices]))
        elif output_type == "generate_until":
            if isinstance(target, list):
                target = target[0]
            items.append(Item(str(i), str(prompt), str(target)))
        else:
            raise EvomergeError(f"lm-eval task {name!r}: output_type {output_type!r} is not supported "
                                "(multiple_choice or generate_until)")
    if not items:
        raise EvomergeError(f"lm-eval task {name!r}: no documents in its {split} split")
    if output_type == "multiple_choice":
        return Task(name, "multiple_choice", items, split=split, source=f"lm-eval:{name}")
    gen = dict(config.generation_kwargs or {})
    until = gen.get("until") or []
    return Task(name, "generate", items, max_new_tokens=int(gen.get("max_gen_toks", 256)),
                extract=_regex_of(config), split=split, stop=[until] if isinstance(until, str) else list(until),
                source=f"lm-eval:{name}")
