"""The contract every evaluation backend fulfils (see DESIGN.md, "Backends")."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.tasks.task import Task


@dataclass
class ItemResult:
    index: int                         # position of the item in task.items
    score: float                       # 0/1, or graded in [0, 1]
    output: str                        # generated text, or the chosen choice for multiple choice
    metrics: dict | None = None        # lm-eval tasks: every "metric,filter" value of this item


@runtime_checkable
class Backend(Protocol):
    def load_weights(self, weights: dict[str, Tensor], config: dict) -> None:
        """Install candidate weights; in place when the architecture is unchanged."""
        ...

    def score(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        """Score the items ``task.items[i] for i in indices``, results in the same order."""
        ...

    def likelihood(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        """Graded scores in [0, 1]: for generate tasks the probability of the reference output
        (``task.reference``) given the prompt, teacher-forced; for multiple choice the correct
        choice's share of the choices' probability mass. One forward pass per item, no decoding."""
        ...


def scoring_method(backend: Backend, scoring: str) -> Callable[[Task, Sequence[int]], list[ItemResult]]:
    """``backend.score`` for exact scoring, ``backend.likelihood`` for likelihood scoring."""
    return backend.likelihood if scoring == "likelihood" else backend.score


def harness_results(backend: Backend, task: Task, indices: Sequence[int], scoring: str) -> list[ItemResult]:
    """An lm-eval task's results (``task.harness``: lm-eval builds and scores the requests,
    ``backend`` answers them through its token-level methods)."""
    return [ItemResult(r.index, r.score, r.output, r.metrics) for r in task.harness.score(backend, indices, scoring)]


def check_indices(task: Task, indices: Sequence[int]) -> list[int]:
    indices = list(indices)
    for i in indices:
        if not 0 <= i < len(task.items):
            raise EvomergeError(f"task {task.name}: item index {i} out of range (0..{len(task.items) - 1})")
    return indices


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
            rows.append((context, _continuation(encode, item.prompt, context, choice)))
            owners.append((i, c))
    return rows, owners


def _continuation(encode: Callable[..., list[int]], prompt: str, context: list[int], text: str) -> list[int]:
    """The tokens of ``text`` after ``prompt``: taken from the tokenized prompt+text when the
    prompt's tokens are a prefix of it, else ``text`` tokenized on its own."""
    whole = encode(prompt + text)
    if whole[: len(context)] == context and len(whole) > len(context):
        return whole[len(context):]
    return encode(text, special=False)


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


def reference_rows(task: Task, indices: Sequence[int], encode: Callable[..., list[int]],
                   eos_token_id: int | None) -> list[tuple[list[int], list[int]]]:
    """For likelihood scoring of a generate task: one (prompt tokens, reference tokens) row per
    item, the reference ending with end-of-sequence when the task says its outputs do."""
    rows = []
    for i in indices:
        prompt = task.items[i].prompt
        context = encode(prompt)
        continuation = _continuation(encode, prompt, context, task.reference(i))
        if task.target_eos and eos_token_id is not None:
            continuation = continuation + [eos_token_id]
        rows.append((context, continuation))
    return rows


def likelihood_rows(task: Task, indices: Sequence[int], encode: Callable[..., list[int]],
                    eos_token_id: int | None) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, int]]]:
    """The rows a backend scores for ``likelihood``, and the (item, choice) each belongs to
    (choice 0 for generate tasks)."""
    if task.kind == "multiple_choice":
        return choice_rows(task, indices, encode)
    return reference_rows(task, indices, encode, eos_token_id), [(i, 0) for i in indices]


def graded_results(task: Task, indices: Sequence[int], owners: list[tuple[int, int]],
                   logliks: Sequence[float]) -> list[ItemResult]:
    """Likelihood scores from the rows' log-likelihoods (see ``Backend.likelihood``)."""
    per_item: dict[int, dict[int, float]] = {}
    for (i, c), ll in zip(owners, logliks):
        per_item.setdefault(i, {})[c] = float(ll)
    results = []
    for i in indices:
        lls = per_item[i]
        if task.kind == "multiple_choice":
            correct = task.items[i].choices.index(task.items[i].answer)
            top = max(lls.values())
            total = sum(math.exp(v - top) for v in lls.values())
            results.append(ItemResult(i, math.exp(lls[correct] - top) / total, task.items[i].answer))
        else:
            results.append(ItemResult(i, math.exp(min(lls[0], 0.0)), task.reference(i)))
    return results
