"""Small evaluators for the pool tests: deterministic, cheap, and able to misbehave on cue.

A candidate's ``plan`` tells the evaluator what to do: ``{"sleep": s}`` takes s seconds,
``{"raise": msg}`` raises, ``{"nan": True}`` returns a NaN objective, ``{"exit": True}``
kills the worker process, ``{"cuda_error": True}`` fails the way a poisoned CUDA context
does. Every call is appended to ``log_path`` (one line per candidate id), so tests can
count how often a candidate really ran, across processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from evomerge.errors import CheckpointError
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore


class QuadraticEvaluator:
    """Two objectives computed from the genome, identical in any process."""

    def __init__(self, log_path: str | None = None, fail_to_load: str | None = None):
        if fail_to_load:
            raise CheckpointError(f"cannot read source model {fail_to_load}: config.json is missing")
        self.log_path = log_path

    def evaluate(self, candidate: Candidate) -> EvalResult:
        if self.log_path:
            with open(self.log_path, "a") as log:
                log.write(f"{candidate.candidate_id} {os.getpid()}\n")
        plan = candidate.plan
        if plan.get("sleep"):
            time.sleep(plan["sleep"])
        if plan.get("exit"):
            os._exit(1)
        if plan.get("raise"):
            raise ValueError(plan["raise"])
        if plan.get("cuda_error"):
            return EvalResult(candidate.candidate_id, "failed",
                              error="RuntimeError: CUDA error: an illegal memory access was encountered")
        x = candidate.genome
        first = -sum(v * v for v in x)
        second = float("nan") if plan.get("nan") else -sum((v - 1.0) ** 2 for v in x)
        return EvalResult(candidate.candidate_id, "ok", items_scored=10, objectives={
            "near_zero": ObjectiveScore(first, 0.01, 10), "near_one": ObjectiveScore(second, 0.01, 10)})


def make_candidates(n: int, dim: int = 3, **plan) -> list[Candidate]:
    return [Candidate(i, 0, [((i * 7 + j * 3) % 11) / 10.0 for j in range(dim)], dict(plan)) for i in range(n)]


def calls(log_path: Path) -> list[int]:
    if not log_path.exists():
        return []
    return [int(line.split()[0]) for line in log_path.read_text().splitlines()]


def runs(log_path: Path) -> list[tuple[int, int]]:
    """(candidate id, worker pid) of every call, in the order they started."""
    if not log_path.exists():
        return []
    return [(int(cid), int(pid)) for cid, pid in (line.split() for line in log_path.read_text().splitlines())]
