"""Turn a candidate into fitness: merge in memory, swap into the engine, score, estimate.

A ``CandidateEvaluator`` lives inside one worker (the controller's process for a local
pool, a Ray actor otherwise). It loads the sources once and keeps them and the inference
backend resident; per candidate:

    plan --merge (in memory)--> weights --backend.load_weights--> engine
         --score anchor items of each objective's task--> estimator --> EvalResult

A candidate that cannot be evaluated -- the engine raises, the merge yields NaN/inf
weights -- comes back as ``status="failed"`` with a one-line reason; ``evaluate`` never
raises for a bad candidate. ``candidate.audit`` additionally scores every item of each
task (the "full" score), which is how the search measures its estimators as it goes.

``SyntheticEvaluator`` is for tests and benchmarks only: an analytic, deterministic
function of the genome standing in for merging and scoring (optionally with a sleep), so
that controller and pool overheads can be measured with near-zero-cost evaluations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore


# Estimators that need no IRT calibration: every item, or a fixed random subset of them.
CALIBRATION_FREE = ("full", "subset")


@dataclass
class ObjectiveSpec:
    name: str
    task: str
    estimator: str = "full"
    calibration: str | None = None
    source_thetas: list[list[float]] | None = None  # sources x dims: the merge-aware estimators' prior
    scoring: str = "exact"                          # exact (0/1 per item) | likelihood (graded, Backend.likelihood)
    subset: float = 0.1                             # estimator "subset": < 1 a fraction of the items, else a count
    subset_seed: int = 0                            # ... drawn once from this seed, the same in every worker
    metric: str | None = None                       # lm-eval tasks: "acc_norm", "exact_match,strict-match"...
    lm_eval: dict | None = None                     # lm-eval tasks: evaluation options (LMEvalOptions)


def task_options(objective) -> dict:
    """The ``ObjectiveSpec`` / ``load_task`` keywords an objective config gives its task."""
    options = getattr(objective, "lm_eval", None)
    return {"metric": getattr(objective, "metric", None),
            "lm_eval": options.model_dump(exclude_defaults=True) if hasattr(options, "model_dump") else options}


@dataclass
class EvaluatorSpec:
    """Everything a worker needs to build its evaluator; plain data, so it pickles to Ray."""

    kind: str                                       # "merge" | "synthetic"
    objectives: list[ObjectiveSpec]
    sources: dict[str, str] = field(default_factory=dict)
    backend: str = "hf"
    device: str = "cpu"
    model_dir: str | None = None
    lower: list[float] | None = None                # synthetic: the genome box
    upper: list[float] | None = None
    sleep: float = 0.0
    fail_every: int = 0
    threads: int | None = None                      # torch CPU threads per worker (None: torch's default)
    engine: dict[str, Any] = field(default_factory=dict)   # vllm: engine arguments (evaluator.engine)
    layer_capacity: int | None = None               # most layers a candidate can have (data_flow max_layers)
    context_tasks: list[str] = field(default_factory=list)  # more tasks the engine's context must fit (held-out)
    multiprocess: bool = False                      # vllm: engine workers in their own processes, merging plans

    @classmethod
    def from_config(cls, cfg, space) -> "EvaluatorSpec":
        ev = cfg.evaluator
        objectives = [ObjectiveSpec(o.name, o.task, o.estimator, o.calibration, scoring=o.scoring,
                                    subset=cfg.calibration.anchors, subset_seed=cfg.calibration_seed,
                                    **task_options(o))
                      for o in cfg.objectives]
        model_dir = ev.model_dir or (cfg.sources.get(cfg.base) if cfg.base else None) \
            or next(iter(cfg.sources.values()), None)
        heldout = [o.heldout_task for o in cfg.objectives if o.heldout_task]
        return cls(kind=ev.kind, objectives=objectives, sources=dict(cfg.sources), backend=ev.backend,
                   device=ev.device, model_dir=model_dir, lower=[float(v) for v in space.lower],
                   upper=[float(v) for v in space.upper], sleep=ev.sleep, fail_every=ev.fail_every,
                   threads=ev.threads, engine=dict(ev.engine), layer_capacity=layer_capacity(space),
                   context_tasks=heldout, multiprocess=ev.multiprocess)


def layer_capacity(space) -> int | None:
    """The most layers a candidate of ``space`` can have, where the genome varies the layer
    count (data_flow and combined spaces: ``max_layers``); None where it follows the sources."""
    flow = getattr(space, "flow", space)             # a combined space's data-flow part
    capacity = getattr(flow, "max_layers", None)
    return int(capacity) if capacity else None


def make_evaluator(spec: EvaluatorSpec):
    """The evaluator factory pools call once per worker: ``partial(make_evaluator, spec)``."""
    return SyntheticEvaluator(spec) if spec.kind == "synthetic" else CandidateEvaluator(spec)


# --------------------------------------------------------------------------- objective items


@dataclass
class _Objective:
    """One objective, ready to score: its task, the items to score, how to estimate."""

    spec: ObjectiveSpec
    task: Any
    indices: np.ndarray                              # task item indices scored for the estimate
    calibration: Any = None


def prepare_objective(spec: ObjectiveSpec):
    """Load the task (and calibration) of one objective; errors name the objective."""
    from evomerge.tasks.task import load_task

    where = f"objectives.{spec.name}"
    try:
        task = load_task(spec.task, metric=spec.metric, lm_eval=spec.lm_eval)
    except EvomergeError as exc:
        raise EvomergeError(f"{where}.task: {exc}") from None
    if not task.items:
        raise EvomergeError(f"{where}.task: task {spec.task!r} has no items")
    if spec.estimator == "full":
        return _Objective(spec, task, np.arange(len(task.items)))
    if spec.estimator == "subset":
        return _Objective(spec, task, subset_indices(len(task.items), spec.subset, spec.subset_seed))
    from evomerge.estimators.calibration import MAPPED, Calibration

    if spec.estimator not in MAPPED:
        raise EvomergeError(f"{where}.estimator: unknown estimator {spec.estimator!r} "
                            f"(choose from full, {', '.join(MAPPED)})")
    if MAPPED[spec.estimator][0] in ("mpirt", "gmpirt") and not spec.source_thetas:
        raise EvomergeError(f"{where}.estimator: {spec.estimator!r} needs the sources' abilities "
                            "(the search computes them before generation 0)")
    try:
        calib = Calibration.load(spec.calibration)
    except EvomergeError as exc:
        raise EvomergeError(f"{where}.calibration: {exc}") from None
    # The calibration names its items; map them onto this task's items by id.
    position = {item.id: i for i, item in enumerate(task.items)}
    missing = [item for item in calib.items if item not in position]
    if missing:
        raise EvomergeError(f"{where}.calibration: item {missing[0]!r} is not in task {spec.task!r} "
                            f"({len(missing)} of {len(calib.items)} missing)")
    chosen = calib.random_items if MAPPED[spec.estimator][0] == "random" else calib.anchors
    indices = np.array([position[calib.items[int(i)]] for i in chosen], dtype=int)
    return _Objective(spec, task, indices, calib)


def subset_indices(n_items: int, size: float, seed: int) -> np.ndarray:
    """The "subset" estimator's items: a fixed random sample (sorted), a pure function of the
    seed, so every worker and every resumed run scores the same items."""
    k = max(1, min(n_items, round(size * n_items) if size < 1 else int(size)))
    return np.sort(np.random.default_rng([int(seed), 0x5B5E7]).choice(n_items, k, replace=False))


def mean_estimate(scores: np.ndarray) -> ObjectiveScore:
    """The mean and its standard error (binomial for 0/1 scores, sample-based for graded ones)."""
    p = float(np.mean(scores))
    n = len(scores)
    if n < 2:
        return ObjectiveScore(p, 0.0, n)
    binary = bool(np.all((scores == 0) | (scores == 1)))
    var = p * (1 - p) if binary else float(np.var(scores, ddof=1))
    return ObjectiveScore(p, math.sqrt(max(var, 0.0) / n), n)


# --------------------------------------------------------------------------- evaluators


class CandidateEvaluator:
    """Resident sources + backend; ``evaluate(candidate) -> EvalResult``."""

    def __init__(self, spec: EvaluatorSpec) -> None:
        import torch

        from evomerge.backends import make_backend
        from evomerge.merge.engine import SourceSet

        self.spec = spec
        self.torch = torch
        if spec.threads:
            # Tiny models on a busy CPU: extra threads mostly wait on each other (30x slower
            # with 2 threads than with 1 on a 2-core box at load 15).
            torch.set_num_threads(spec.threads)
        self.objectives = [prepare_objective(o) for o in spec.objectives]
        # A backend that merges inside its engine's workers gets plans; this process then
        # reads only the sources' headers (output configs), never their weights.
        self.streams_plans = spec.backend == "vllm" and spec.multiprocess
        # On a GPU the sources are read onto it once; on the CPU each tensor is mapped from the
        # page cache when a merge reads it (one copy per machine, shared by its workers).
        self.sources = SourceSet.load(spec.sources, device=spec.device,
                                      resident=not self.streams_plans and spec.device != "cpu")
        self.sources.check_compatible()
        model_dir = spec.model_dir or next(iter(spec.sources.values()))
        self.backend = make_backend(spec.backend, Path(model_dir), device=spec.device,
                                    **self._backend_options(spec))
        self._heldout_tasks: dict[str, Any] = {}     # held-out tasks of pre-search candidates, by name

    def _backend_options(self, spec: EvaluatorSpec) -> dict[str, Any]:
        """What the backend is built with: an engine as deep as the deepest candidate, and for
        vLLM the engine options and every task whose requests its context must hold."""
        if spec.backend != "vllm":
            return {"layer_capacity": spec.layer_capacity} if spec.layer_capacity else {}
        from evomerge.tasks.task import load_task

        tasks = [obj.task for obj in self.objectives]
        for name in spec.context_tasks:
            try:
                tasks.append(load_task(name))
            except EvomergeError:          # a missing held-out task is reported where it is judged
                pass
        return {"engine": dict(spec.engine), "tasks": tasks, "layer_capacity": spec.layer_capacity,
                "multiprocess": spec.multiprocess}

    @property
    def engine_restarts(self) -> int:
        """How often the backend had to restart its engine / rebuild its model (new architecture)."""
        return int(getattr(self.backend, "restarts", getattr(self.backend, "rebuilds", 0)))

    def evaluate(self, candidate: Candidate) -> EvalResult:
        if candidate.full:
            return self._evaluate_every_item(candidate)
        result, _ = self._evaluate(candidate, None)
        return result

    def _evaluate_every_item(self, candidate: Candidate) -> EvalResult:
        """A pre-search evaluation on a worker: every item of the objectives' tasks (and of
        the candidate's held-out tasks), the per-item scores in ``result.responses``."""
        from evomerge.tasks.task import load_task

        result, responses = self.evaluate_full(candidate)
        result.responses = {"search": responses}
        if result.status == "ok" and candidate.heldout:
            for task in candidate.heldout.values():
                if task not in self._heldout_tasks:
                    self._heldout_tasks[task] = load_task(task)
            tasks = {name: self._heldout_tasks[task] for name, task in candidate.heldout.items()}
            held, held_responses = self.evaluate_full(candidate, tasks)
            if held.status != "ok":
                held.error = f"held-out evaluation: {held.error}"
                return held
            result.responses["heldout"] = held_responses
            result.items_scored += held.items_scored
            result.seconds += held.seconds
        return result

    def evaluate_full(self, candidate: Candidate, tasks: dict[str, Any] | None = None
                      ) -> tuple[EvalResult, dict[str, list[float]]]:
        """Score every item (of each objective's task, with the objective's scoring; or of
        ``tasks``: {name: Task}, exact) and return the per-item scores too: calibration
        populations, sources, held-out judging. Each value is then the mean over every item,
        and ``full`` equals it."""
        if tasks is None:
            full = {obj.spec.name: (obj.task, obj.spec.scoring) for obj in self.objectives}
        else:
            full = {name: (task, "exact") for name, task in tasks.items()}
        return self._evaluate(candidate, full)

    def _evaluate(self, candidate: Candidate, full_tasks: dict[str, tuple[Any, str]] | None
                  ) -> tuple[EvalResult, dict[str, list[float]]]:
        from evomerge.backends.base import load_merged, timed_stream
        from evomerge.merge.staged import iter_merge_with_config, plan_from_dict, plan_output_config

        start = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            plan = plan_from_dict(candidate.plan)
            if self.streams_plans and self.backend.fits_in_place(plan_output_config(plan, self.sources)):
                # merged tensor by tensor inside the engine's workers: "load" includes the merge
                t = time.perf_counter()
                self.backend.load_plan(plan.to_dict(), self.spec.sources)
                timings["load"] = time.perf_counter() - t
                return self._scored(candidate, full_tasks, start, timings)
            # The merge streams into the backend a tensor at a time (no merged copy of the model);
            # "merge" counts the time spent merging, "load" the rest.
            t = time.perf_counter()
            restarts = self.engine_restarts
            tensors, config = iter_merge_with_config(plan, self.sources)
            timings["merge"] = time.perf_counter() - t
            load_merged(self.backend, timed_stream(tensors, timings, "merge"), config)
            timings["load"] = time.perf_counter() - t - timings["merge"]
            if self.engine_restarts != restarts:
                # Not loaded in place: the engine restarted (its seconds are the load's). The
                # archive keeps it per candidate; `evomerge status` counts them.
                timings["restart"] = timings["load"]
        except Exception as exc:  # the engine or backend rejected this candidate
            return self._failed(candidate, exc, start, 0, timings), {}
        return self._scored(candidate, full_tasks, start, timings)

    def _failed(self, candidate: Candidate, exc: Exception, start: float, items: int,
                timings: dict[str, float]) -> EvalResult:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return EvalResult(candidate.candidate_id, "failed", error=f"{type(exc).__name__}: {message}"[:300],
                          seconds=time.perf_counter() - start, items_scored=items, timings=timings)

    def _scored(self, candidate: Candidate, full_tasks: dict[str, tuple[Any, str]] | None, start: float,
                timings: dict[str, float]) -> tuple[EvalResult, dict[str, list[float]]]:
        """Score the candidate now in the backend (anchors, or every item of ``full_tasks``)."""
        items = 0
        responses: dict[str, list[float]] = {}
        try:
            t = time.perf_counter()
            scores = {}
            if full_tasks is None:
                for obj in self.objectives:
                    scores[obj.spec.name], n = self._score(obj, candidate.audit)
                    items += n
            else:
                for name, (task, scoring) in full_tasks.items():
                    results = self._scorer(scoring)(task, range(len(task.items)))
                    by_index = {r.index: r.score for r in results}
                    responses[name] = [float(by_index[i]) for i in range(len(task.items))]
                    score = mean_estimate(np.array(responses[name]))
                    score.full = score.value
                    scores[name] = score
                    items += len(task.items)
            timings["score"] = time.perf_counter() - t
        except Exception as exc:  # the engine or backend rejected this candidate
            return self._failed(candidate, exc, start, items, timings), {}
        return EvalResult(candidate.candidate_id, "ok", objectives=scores, seconds=time.perf_counter() - start,
                          items_scored=items, timings=timings), responses

    def _scorer(self, scoring: str):
        from evomerge.backends.base import scoring_method

        return scoring_method(self.backend, scoring)

    def _score(self, obj: _Objective, audit: bool) -> tuple[ObjectiveScore, int]:
        full_indices = np.arange(len(obj.task.items))
        wanted = full_indices if audit else obj.indices
        results = self._scorer(obj.spec.scoring)(obj.task, [int(i) for i in wanted])
        by_index = {r.index: r.score for r in results}
        anchor_scores = np.array([by_index[int(i)] for i in obj.indices], dtype=float)
        if obj.calibration is None:
            score = mean_estimate(anchor_scores)
        else:
            thetas = np.asarray(obj.spec.source_thetas, float) if obj.spec.source_thetas else None
            est = obj.calibration.estimate(obj.spec.estimator, anchor_scores, source_thetas=thetas)
            score = ObjectiveScore(est.value, est.stderr, est.n_items)
        if audit:
            score.full = float(np.mean([by_index[int(i)] for i in full_indices]))
        return score, len(wanted)


class SyntheticEvaluator:
    """A deterministic stand-in for merging + scoring (tests, benchmarks).

    With the genome scaled to ``u`` in [0, 1]^D, objective k of K peaks at
    ``u = (k + 1) / (K + 1)``: ``full_k = 1 - mean((u - c_k)^2)``, so the objectives
    conflict and the front is a real trade-off. The "estimate" is the full value plus a
    small deterministic wobble (an imperfect estimator, so audits have something to
    measure); ``stderr`` is the wobble's amplitude.
    """

    WOBBLE = 0.02

    def __init__(self, spec: EvaluatorSpec) -> None:
        self.spec = spec
        self.lower = np.asarray(spec.lower, float)
        self.span = np.maximum(np.asarray(spec.upper, float) - self.lower, 1e-12)

    def evaluate(self, candidate: Candidate) -> EvalResult:
        start = time.perf_counter()
        if self.spec.sleep:
            time.sleep(self.spec.sleep)
        if self.spec.fail_every and candidate.candidate_id % self.spec.fail_every == self.spec.fail_every - 1:
            return EvalResult(candidate.candidate_id, "failed", error="synthetic failure (evaluator.fail_every)",
                              seconds=time.perf_counter() - start)
        u = (np.asarray(candidate.genome, float) - self.lower) / self.span
        k_total = len(self.spec.objectives)
        scores = {}
        for k, obj in enumerate(self.spec.objectives):
            full = float(1.0 - np.mean((u - (k + 1) / (k_total + 1)) ** 2))
            wobble = self.WOBBLE * math.sin(97.0 * float(np.sum(u)) + 13.0 * k)
            scores[obj.name] = ObjectiveScore(full + wobble, self.WOBBLE, len(u),
                                              full if candidate.audit else None)
        return EvalResult(candidate.candidate_id, "ok", objectives=scores, seconds=time.perf_counter() - start,
                          items_scored=len(u) * k_total * (2 if candidate.audit else 1))
