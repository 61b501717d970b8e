"""Score a merge plan on a task's items: the one path every score in evomerge takes.

A ``PlanScorer`` keeps the source models (a ``SourceSet``) and one inference backend
resident. Per plan:

    plan --merge, a tensor at a time--> backend (each tensor checked and loaded as it comes)
         --score items (exact 0/1 | likelihood)--> per-item scores

A backend that merges inside its engine's own workers (vLLM, multiprocess) is handed the
plan instead (``load_plan``) whenever the candidate fits the running engine; this process
then reads only the sources' headers. The search's evaluator, held-out judging, the
pre-search (through the evaluator) and the experiments all score through this class.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.backends.base import NonFiniteWeights

__all__ = ["NonFiniteWeights", "PlanScorer"]


class PlanScorer:
    """Resident sources + backend; ``put(plan)`` then ``score(task, items, scoring)``, or
    ``scores(plan, task, scoring)`` for both at once."""

    def __init__(self, sources: dict[str, str], backend: str = "hf", device: str = "cpu",
                 model_dir: str | None = None, backend_options: dict[str, Any] | None = None,
                 stream_plans: bool = False) -> None:
        from evomerge.backends import make_backend
        from evomerge.merge.engine import SourceSet

        self.source_paths = dict(sources)
        # A backend that merges inside its engine's workers gets plans; this process then
        # reads only the sources' headers (output configs), never their weights.
        self.stream_plans = stream_plans
        # On a GPU the sources are read onto it once; on the CPU each tensor is mapped from the
        # page cache when a merge reads it (one copy per machine, shared by its workers).
        self.sources = SourceSet.load(sources, device=device, resident=not stream_plans and device != "cpu")
        self.sources.check_compatible()
        self.backend = make_backend(backend, Path(model_dir or next(iter(sources.values()))), device=device,
                                    **(backend_options or {}))
        self.timings: dict[str, float] = {}      # of the last ``scores`` call

    @property
    def engine_restarts(self) -> int:
        """How often the backend had to restart its engine / rebuild its model (new architecture)."""
        return int(getattr(self.backend, "restarts", getattr(self.backend, "rebuilds", 0)))

    def put(self, plan: dict) -> dict[str, float]:
        """Make ``plan`` (a plan dict) the backend's model: merged in memory and loaded, or
        merged inside the engine's workers. Returns the step's timings (merge, load, and
        restart when the engine had to restart for it); raises ``NonFiniteWeights`` when the
        merge yields NaN/inf, and whatever the merge or the backend raise for a bad plan."""
        from evomerge.backends.base import load_merged, timed_stream
        from evomerge.merge.staged import iter_merge_with_config, plan_from_dict, plan_output_config

        timings: dict[str, float] = {}
        parsed = plan_from_dict(plan)
        if self.stream_plans and self.backend.fits_in_place(plan_output_config(parsed, self.sources)):
            # merged tensor by tensor inside the engine's workers: "load" includes the merge
            t = time.perf_counter()
            self.backend.load_plan(parsed.to_dict(), self.source_paths)
            timings["load"] = time.perf_counter() - t
            return timings
        # The merge streams into the backend a tensor at a time (no merged copy of the model);
        # "merge" counts the time spent merging, "load" the rest.
        t = time.perf_counter()
        restarts = self.engine_restarts
        tensors, config = iter_merge_with_config(parsed, self.sources)
        timings["merge"] = time.perf_counter() - t
        load_merged(self.backend, timed_stream(tensors, timings, "merge"), config)
        timings["load"] = time.perf_counter() - t - timings["merge"]
        if self.engine_restarts != restarts:
            # Not loaded in place: the engine restarted (its seconds are the load's). The
            # archive keeps it per candidate; `evomerge status` counts them.
            timings["restart"] = timings["load"]
        return timings

    def score(self, task, indices, scoring: str = "exact") -> np.ndarray:
        """The model now in the backend scored on ``task``'s items ``indices`` (in that
        order): exact (0/1, the greedy output against the answer) or likelihood (graded)."""
        from evomerge.backends.base import scoring_method

        wanted = [int(i) for i in indices]
        by_index = {r.index: r.score for r in scoring_method(self.backend, scoring)(task, wanted)}
        return np.array([by_index[i] for i in wanted], dtype=float)

    def scores(self, plan: dict, task, scoring: str = "exact") -> np.ndarray:
        """``plan`` scored on every item of ``task``; its timings in ``self.timings``."""
        timings = self.put(plan)
        t = time.perf_counter()
        out = self.score(task, range(len(task.items)), scoring)
        timings["score"] = time.perf_counter() - t
        self.timings = timings
        return out
