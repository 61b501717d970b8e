"""The contract every evaluation backend fulfils (see DESIGN.md, "Backends")."""

from __future__ import annotations

from collections.abc import Sequence
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
