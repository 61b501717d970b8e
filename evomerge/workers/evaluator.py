"""Turn a candidate into fitness: merge in memory, swap into the engine, score, estimate.

A ``CandidateEvaluator`` lives inside one worker (the controller's process for a local
pool, a Ray actor otherwise). Its ``PlanScorer`` (workers/scorer.py) keeps the sources and
the inference backend resident; per candidate:

    plan --PlanScorer.put (merge in memory, load)--> engine
         --PlanScorer.score: the items each objective's estimator asks for--> estimator
         --> EvalResult

Which items an objective scores and how their scores become fitness is its estimator's
business (``evomerge.estimators.registry``); nothing here knows an estimator by name.

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
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.estimators import registry
from evomerge.estimators.registry import Estimator
from evomerge.workers.scorer import NonFiniteWeights, PlanScorer
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore


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
    """One objective, ready to score: its task, its estimator, the items that estimator reads."""

    spec: ObjectiveSpec
    task: Any
    estimator: Estimator
    indices: np.ndarray                              # task item indices scored for the estimate
    calibration: Any = None


def prepare_objective(spec: ObjectiveSpec):
    """Load the task (and calibration) of one objective; errors name the objective."""
    from evomerge.tasks.task import load_task

    where = f"objectives.{spec.name}"
    estimator = registry.get(spec.estimator, f"{where}.estimator")
    try:
        task = load_task(spec.task, metric=spec.metric, lm_eval=spec.lm_eval)
    except EvomergeError as exc:
        raise EvomergeError(f"{where}.task: {exc}") from None
    if not task.items:
        raise EvomergeError(f"{where}.task: task {spec.task!r} has no items")
    if not estimator.calibrated:
        return _Objective(spec, task, estimator, estimator.items(len(task.items), subset=spec.subset,
                                                                 seed=spec.subset_seed))
    from evomerge.estimators.calibration import Calibration

    if estimator.needs_abilities and not spec.source_thetas:
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
    chosen = estimator.items(len(task.items), calib, spec.subset, spec.subset_seed)
    indices = np.array([position[calib.items[int(i)]] for i in chosen], dtype=int)
    return _Objective(spec, task, estimator, indices, calib)


def plan_scorer(spec: EvaluatorSpec, tasks: list[Any]) -> PlanScorer:
    """The PlanScorer a worker scores ``tasks`` with: an engine as deep as the deepest
    candidate, and for vLLM the engine options and every task whose requests its context
    must hold (``tasks`` plus the spec's held-out tasks)."""
    if spec.threads:
        import torch

        # Tiny models on a busy CPU: extra threads mostly wait on each other (30x slower
        # with 2 threads than with 1 on a 2-core box at load 15).
        torch.set_num_threads(spec.threads)
    if spec.backend != "vllm":
        options = {"layer_capacity": spec.layer_capacity} if spec.layer_capacity else {}
    else:
        from evomerge.tasks.task import load_task

        tasks = list(tasks)
        for name in spec.context_tasks:
            try:
                tasks.append(load_task(name))
            except EvomergeError:          # a missing held-out task is reported where it is judged
                pass
        options = {"engine": dict(spec.engine), "tasks": tasks, "layer_capacity": spec.layer_capacity,
                   "multiprocess": spec.multiprocess}
    return PlanScorer(spec.sources, spec.backend, spec.device, spec.model_dir, options,
                      stream_plans=spec.backend == "vllm" and spec.multiprocess)


def _score_of(estimate) -> ObjectiveScore:
    return ObjectiveScore(estimate.value, estimate.stderr, estimate.n_items)


# --------------------------------------------------------------------------- evaluators


class CandidateEvaluator:
    """A resident PlanScorer and the objectives' estimators; ``evaluate(candidate) -> EvalResult``."""

    def __init__(self, spec: EvaluatorSpec) -> None:
        self.spec = spec
        self.objectives = [prepare_objective(o) for o in spec.objectives]
        self.scorer = plan_scorer(spec, [obj.task for obj in self.objectives])
        self._heldout_tasks: dict[str, Any] = {}     # held-out tasks of pre-search candidates, by name

    @property
    def backend(self):
        return self.scorer.backend

    @property
    def engine_restarts(self) -> int:
        """How often the backend had to restart its engine / rebuild its model (new architecture)."""
        return self.scorer.engine_restarts

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
        start = time.perf_counter()
        try:
            timings = self.scorer.put(candidate.plan)
        except NonFiniteWeights as exc:
            return EvalResult(candidate.candidate_id, "failed", error=str(exc),
                              seconds=time.perf_counter() - start), {}
        except Exception as exc:  # the engine or backend rejected this candidate
            return self._failed(candidate, exc, start, 0, {}), {}
        return self._scored(candidate, full_tasks, start, timings)

    def _failed(self, candidate: Candidate, exc: Exception, start: float, items: int,
                timings: dict[str, float]) -> EvalResult:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return EvalResult(candidate.candidate_id, "failed", error=f"{type(exc).__name__}: {message}"[:300],
                          seconds=time.perf_counter() - start, items_scored=items, timings=timings)

    def _scored(self, candidate: Candidate, full_tasks: dict[str, tuple[Any, str]] | None, start: float,
                timings: dict[str, float]) -> tuple[EvalResult, dict[str, list[float]]]:
        """Score the candidate now in the backend (its estimators' items, or every item of
        ``full_tasks``)."""
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
                    responses[name] = self.scorer.score(task, range(len(task.items)), scoring).tolist()
                    score = _score_of(registry.mean_estimate(np.array(responses[name])))
                    score.full = score.value
                    scores[name] = score
                    items += len(task.items)
            timings["score"] = time.perf_counter() - t
        except Exception as exc:  # the engine or backend rejected this candidate
            return self._failed(candidate, exc, start, items, timings), {}
        return EvalResult(candidate.candidate_id, "ok", objectives=scores, seconds=time.perf_counter() - start,
                          items_scored=items, timings=timings), responses

    def _score(self, obj: _Objective, audit: bool) -> tuple[ObjectiveScore, int]:
        """One objective's estimate; an audit scores every item, the estimator reads its own."""
        if audit:
            every = self.scorer.score(obj.task, range(len(obj.task.items)), obj.spec.scoring)
            item_scores = every[obj.indices]
        else:
            item_scores = self.scorer.score(obj.task, obj.indices, obj.spec.scoring)
        thetas = np.asarray(obj.spec.source_thetas, float) if obj.spec.source_thetas else None
        score = _score_of(obj.estimator.estimate(item_scores, obj.calibration, source_thetas=thetas))
        if audit:
            score.full = float(np.mean(every))
        return score, len(every) if audit else len(obj.indices)


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
