"""What travels between the search controller and the workers.

Plain dataclasses of builtins and numpy arrays, so they pickle cheaply across Ray and
serialize to JSON for the archive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Candidate:
    """One genome to evaluate. ``candidate_id`` is unique within a run."""

    candidate_id: int
    generation: int
    genome: list[float]
    plan: dict[str, Any]              # MergePlan.to_dict(): the decoded recipe
    audit: bool = False               # also score on the full item pool (estimator audit)
    attempt: int = 0                  # retries after a worker died
    # Pre-search (sources, calibration merges): score every item of each objective's task and
    # of these held-out tasks ({objective: task}), and return the per-item scores.
    full: bool = False
    heldout: dict[str, str] | None = None


@dataclass
class ObjectiveScore:
    """A per-objective fitness: the estimate, its uncertainty, and the full score if audited."""

    value: float
    stderr: float
    n_items: int
    full: float | None = None         # full-pool accuracy (audits and held-out checks)

    def to_dict(self) -> dict[str, Any]:
        """``{value, stderr, n_items[, full]}``: how an objective's score is written wherever it
        is JSON (the archive's source scores, judging tables, result files); ``full`` only
        when known."""
        out = {"value": self.value, "stderr": self.stderr, "n_items": self.n_items}
        if self.full is not None:
            out["full"] = self.full
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ObjectiveScore":
        """The inverse of ``to_dict`` (and of an archive ``scores`` row)."""
        stderr = data.get("stderr")
        full = data.get("full")
        return cls(float(data["value"]), math.nan if stderr is None else float(stderr),
                   int(data.get("n_items") or 0), None if full is None else float(full))


@dataclass
class EvalResult:
    candidate_id: int
    status: str                       # "ok" | "failed"
    objectives: dict[str, ObjectiveScore] = field(default_factory=dict)
    error: str | None = None          # one line: why it failed
    worker: str | None = None
    seconds: float = 0.0              # wall time on the worker
    items_scored: int = 0             # cost in scored items (anchors + audits)
    timings: dict[str, float] = field(default_factory=dict)  # merge / load / score seconds
    # ``Candidate.full``: per-item scores, {"search" | "heldout": {objective: [score per item]}}
    responses: dict[str, dict[str, list[float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        """The inverse of ``to_dict``; also reads an archive row, whose other columns (the
        candidate's, the times) it leaves to the caller, and whose NULLs mean the defaults."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names and v is not None}
        kw["objectives"] = {k: ObjectiveScore.from_dict(v) for k, v in (data.get("objectives") or {}).items()}
        return cls(**kw)
