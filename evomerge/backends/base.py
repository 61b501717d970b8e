"""The contract every evaluation backend fulfils (see DESIGN.md, "Backends")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from evomerge.tasks.task import Task


@dataclass
class ItemResult:
    index: int                         # position of the item in task.items
    score: float                       # 0/1, or graded in [0, 1]
    output: str                        # generated text, or the chosen choice for multiple choice


@runtime_checkable
class Backend(Protocol):
    def load_weights(self, weights: dict[str, Tensor], config: dict) -> None:
        """Install candidate weights; in place when the architecture is unchanged."""
        ...

    def score(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        """Score the items ``task.items[i] for i in indices``, results in the same order."""
        ...


def choice_rows(task: Task, indices: Sequence[int], encode: Callable[..., list[int]]
                ) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, int]]]:
    """For multiple choice: one (context tokens, continuation tokens) row per (item, choice),
    and the (item index, choice index) each row belongs to.

    The continuation is taken from the tokenized prompt+choice when the prompt's tokens are a
    prefix of it, so both backends score exactly the tokens the model would see; when the
    tokenizer merged across the boundary the choice is tokenized on its own.
    """
    rows, owners = [], []
    for i in indices:
        item = task.items[i]
        context = encode(item.prompt)
        for c, choice in enumerate(item.choices or []):
            whole = encode(item.prompt + choice)
            if whole[: len(context)] == context and len(whole) > len(context):
                continuation = whole[len(context):]
            else:
                continuation = encode(choice, special=False)
            rows.append((context, continuation))
            owners.append((i, c))
    return rows, owners


def pick_choices(task: Task, indices: Sequence[int], owners: list[tuple[int, int]],
                 logliks: Sequence[float]) -> list[ItemResult]:
    """Per item, the choice with the highest log-likelihood (per character when the task asks
    for ``mc_normalize``); the score is whether it is the answer."""
    best: dict[int, tuple[float, int]] = {}
    for (i, c), ll in zip(owners, logliks):
        value = ll / max(1, len(task.items[i].choices[c])) if task.mc_normalize else ll
        if i not in best or value > best[i][0]:
            best[i] = (value, c)
    results = []
    for i in indices:
        choice = task.items[i].choices[best[i][1]]
        results.append(ItemResult(i, float(choice == task.items[i].answer), choice))
    return results
