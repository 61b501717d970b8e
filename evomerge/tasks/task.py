"""Tasks: a list of items plus how to score them.

A task is a YAML definition beside JSONL item files::

    name: zoo/arith
    kind: generate                 # or multiple_choice
    max_new_tokens: 8
    extract: '=(-?\\d+)'           # optional regex; group 1 (or the match) of the LAST match is the answer
    splits: {search: arith.search.jsonl, heldout: arith.heldout.jsonl}
    default_split: search          # or `data: items.jsonl` for a single split
    target: worked                 # optional: item field with the whole reference output (default: answer)
    target_eos: true               # optional: the reference output ends with end-of-sequence

``target`` / ``target_eos`` matter only to likelihood scoring (``Backend.likelihood``): the
probability the model gives the reference output, a graded score where exact match is 0/1.

Each JSONL line is ``{"id": ..., "prompt": ..., "answer": ...}``; multiple-choice items add
``"choices": [...]`` and give the answer as the correct choice's text or its index.
``load_task`` accepts a zoo task name (``zoo/arith``, ``zoo/arith:heldout``), a YAML path
(``path/task.yaml[:split]``), or an lm-eval task name / YAML directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import field_validator, model_validator

from evomerge.errors import EvomergeError, StrictModel, validate

DATA_DIR = Path(__file__).parent / "data"
KINDS = ("multiple_choice", "generate")


@dataclass
class Item:
    id: str
    prompt: str
    answer: str                        # multiple choice: the correct choice's text
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    name: str
    kind: Literal["multiple_choice", "generate"]
    items: list[Item]
    max_new_tokens: int = 16
    extract: str | None = None         # regex for generate; None = whole (stripped) output
    split: str = "all"
    stop: list[str] = field(default_factory=list)   # generation also ends at these strings
    mc_normalize: bool = False         # multiple choice: divide log-likelihood by choice length
    source: str = ""                   # where the definition came from (for messages)
    target: str | None = None          # item meta field holding the whole reference output
    target_eos: bool = False           # likelihood scoring: the reference ends with end-of-sequence
    # lm-eval tasks: lm-eval itself builds the requests and scores the responses
    # (tasks.lm_eval_adapter.Harness); backends hand score/likelihood over to it
    harness: Any = None

    def reference(self, index: int) -> str:
        """The whole output a correct model writes for item ``index`` (likelihood scoring)."""
        item = self.items[index]
        if self.target is None:
            return item.answer
        if self.target not in item.meta:
            raise EvomergeError(f"task {self.name}: item {item.id} has no field {self.target!r} (the task's 'target')")
        return str(item.meta[self.target])

    def __len__(self) -> int:
        return len(self.items)

    def extract_answer(self, output: str) -> str:
        for stop in self.stop:
            output = output.split(stop, 1)[0]
        if self.extract is None:
            return output.strip()
        matches = list(re.finditer(self.extract, output))
        if not matches:
            return ""
        last = matches[-1]
        return (last.group(1) if last.groups() else last.group(0)).strip()

    def is_correct(self, index: int, output: str) -> bool:
        return self.extract_answer(output) == self.items[index].answer.strip()


# ---------------------------------------------------------------- loading
def read_items(path: Path, kind: str) -> list[Item]:
    """Read a JSONL item file; errors name the file and line."""
    if not path.exists():
        raise EvomergeError(f"{path}: task data file not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvomergeError(f"{where}: malformed JSON item ({exc.msg})") from None
            if not isinstance(row, dict):
                raise EvomergeError(f"{where}: item must be a JSON object")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise EvomergeError(f"{where}: item has no '{key}' field")
            if not isinstance(row["prompt"], str):
                raise EvomergeError(f"{where}: 'prompt' must be a string")
            choices, answer = row.get("choices"), row["answer"]
            if kind == "multiple_choice":
                if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                    raise EvomergeError(f"{where}: multiple-choice item needs 'choices', a list of >= 2 strings")
                if isinstance(answer, int) and not isinstance(answer, bool):
                    if not 0 <= answer < len(choices):
                        raise EvomergeError(f"{where}: answer index {answer} out of range for {len(choices)} choices")
                    answer = choices[answer]
                elif answer not in choices:
                    raise EvomergeError(f"{where}: answer {answer!r} is not one of the choices")
            elif not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
                raise EvomergeError(f"{where}: 'answer' must be a string or number")
            meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "answer", "choices")}
            items.append(Item(str(row.get("id", f"{path.stem}-{lineno}")), row["prompt"], str(answer), choices, meta))
    if not items:
        raise EvomergeError(f"{path}: no items")
    return items


class TaskFile(StrictModel):
    """The fields of a task YAML (see the module docstring)."""

    name: str | None = None            # default: the file's stem
    kind: str = "generate"
    data: str | None = None            # one JSONL file, or
    splits: dict[str, str] | None = None   # {split: JSONL file}
    default_split: str | None = None
    extract: str | None = None
    max_new_tokens: int = 16
    stop: list[str] = []
    mc_normalize: bool = False
    target: str | None = None
    target_eos: bool = False

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(f"must be one of {', '.join(KINDS)}, got {v!r}")
        return v

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and not v:
            raise ValueError("must map split names to JSONL files")
        return v

    @field_validator("extract")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regex ({exc})") from None
        return v

    @field_validator("max_new_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a positive integer, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TaskFile":
        if self.data is None and self.splits is None:
            raise ValueError("data: a task needs a 'data' file or 'splits'")
        if self.target is not None and self.kind != "generate":
            raise ValueError("target: names an item field, and only for kind generate")
        return self


def load_task_yaml(path: str | Path, split: str | None = None) -> Task:
    path = Path(path)
    if not path.exists():
        raise EvomergeError(f"{path}: task file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EvomergeError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{path}: task definition must be a mapping")
    spec = validate(TaskFile, data, str(path))
    if spec.splits is not None:
        split = split or spec.default_split or next(iter(spec.splits))
        if split == "all":
            files = list(spec.splits.values())
        elif split in spec.splits:
            files = [spec.splits[split]]
        else:
            raise EvomergeError(f"{path}: unknown split {split!r} (have {', '.join(spec.splits)}, all)")
    else:
        files, split = [spec.data], split or "all"
    items = [item for f in files for item in read_items(path.parent / f, spec.kind)]
    if spec.target is not None:
        missing = next((item for item in items if spec.target not in item.meta), None)
        if missing is not None:
            raise EvomergeError(f"{path}: item {missing.id} has no field {spec.target!r} (named by 'target')")
    return Task(
        name=spec.name or path.stem, kind=spec.kind, items=items, max_new_tokens=spec.max_new_tokens,
        extract=spec.extract, split=split, stop=spec.stop, mc_normalize=spec.mc_normalize, source=str(path),
        target=spec.target, target_eos=spec.target_eos,
    )


def zoo_task_names() -> list[str]:
    return sorted(f"zoo/{p.stem}" for p in (DATA_DIR / "zoo").glob("*.yaml"))


def _native(spec: str) -> tuple[Path | None, str | None]:
    """(the evomerge task YAML ``spec`` names, its split), or (None, None) for an lm-eval task."""
    base, _, split = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if base.startswith("zoo/"):
        path = DATA_DIR / "zoo" / f"{base[4:]}.yaml"
        if not path.exists():
            raise EvomergeError(f"unknown zoo task {base!r} (have {', '.join(zoo_task_names())})")
        return path, split or None
    if base.endswith((".yaml", ".yml")) and Path(base).is_file():
        # lm-eval task YAMLs have a top-level 'task:' (or 'group:') key; ours do not. Read as
        # text: lm-eval's '!function' tags are not plain YAML.
        try:
            text = Path(base).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise EvomergeError(f"{base}: cannot read the task file ({exc})") from None
        if not any(line.startswith(("task:", "group:")) for line in text.splitlines()):
            return Path(base), split or None
    return None, None


def is_lm_eval_task(name_or_path: str | Path) -> bool:
    """Whether ``load_task`` hands this name to lm-eval (not a zoo task nor an evomerge task YAML)."""
    return _native(str(name_or_path))[0] is None


def load_task(name_or_path: str | Path, metric: str | None = None, lm_eval: dict | None = None) -> Task:
    """Load a task by zoo name (``zoo/arith[:split]``), YAML path, or lm-eval task name.

    ``metric`` (``acc_norm``, ``exact_match,strict-match``...) and ``lm_eval`` (evaluation
    options: num_fewshot, apply_chat_template, system_instruction, fewshot_as_multiturn) apply
    to lm-eval tasks only; zoo tasks score exact match (or choice accuracy) of the answer."""
    spec = str(name_or_path)
    native, split = _native(spec)
    if native is not None:
        if metric is not None or lm_eval:
            what = "metric" if metric is not None else "lm_eval options"
            raise EvomergeError(f"task {spec}: a {what} applies to lm-eval tasks only "
                                "(evomerge tasks score their answers by exact match)")
        return load_task_yaml(native, split)
    from evomerge.tasks.lm_eval_adapter import load_lm_eval_task

    return load_lm_eval_task(spec, metric=metric, options=lm_eval)
