"""The search run: config -> run directory -> generations of ask / evaluate / tell.

The run directory's layout is store.py's business (``RunStore``); what matters here is
that its SQLite archive holds every evaluation and, in the same transactions, the
controller's progress (the generation reached, whether the run finished) as plain data.

A merge search starts with a pre-search phase (``calibrate.presearch``): the source
models are scored as reference points and IRT estimators are calibrated; the pool of
workers starts after it, so every worker loads the finished calibration by path.

Each generation: ask ``population`` genomes, decode them to plans, submit them all to the
pool, record each result in the archive the moment it arrives, and tell the optimizer once
the generation is complete (in candidate order, so the order results arrive in does not
matter). The generation's last result is committed together with the new generation count.

Resume keeps no optimizer state from disk: it builds the optimizer afresh from the config
(same seed) and replays the archive -- asks again, checks that each genome asked is the
one archived under that candidate id, tells the archived results in the order they were
told -- until it reaches what the archive does not hold, and continues from there. Every
optimizer here is deterministic given its seed and what it was told, so a run killed at
any moment loses no completed evaluation, redoes none, and (with a deterministic evaluator)
ends with the same archive as a run that was never interrupted. An archive that does not
hold what its recorded progress implies (a deleted row, a genome that replay does not ask
again) is refused with a one-line error rather than continued differently.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import CheckpointError, ConfigError, EvomergeError
from evomerge.io.atomic import atomic_dir
from evomerge.search.archive import Archive
from evomerge.search.config import SearchConfig, build_genome_space, load_config
from evomerge.search.optimizers import Optimizer, is_multi_objective, make_optimizer
from evomerge.search.store import LOCK_FILE, RunLock, RunStore
from evomerge.workers.evaluator import EvaluatorSpec, make_evaluator, prepare_objective
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The run's recorded state (archive meta), refusing runs of another format or version."""
    return RunStore(run_dir).meta()


@dataclass
class ControllerState:
    """Where the controller is, in memory only: the archive holds what it takes to get
    back here (replay), so nothing of this is written as it is."""

    generation: int = 0              # the generation about to be asked
    next_candidate_id: int = 0       # first candidate id of that generation
    finished: bool = False


@dataclass
class Setup:
    """What a config turns into before anything is written: validated, ready to run."""

    config: SearchConfig
    space: Any
    optimizer: Optimizer
    spec: EvaluatorSpec
    ready: bool = True          # False: the pre-search phase (sources, calibration) is still to run


def prepare(cfg: SearchConfig) -> Setup:
    """Validate everything a run needs (space, optimizer, tasks, calibrations)."""
    space = build_genome_space(cfg)
    multi = is_multi_objective(cfg.optimizer.name)
    n_obj = len(cfg.objectives) if multi else 1
    budget = cfg.optimizer.max_evaluations or cfg.optimizer.population * cfg.optimizer.generations
    optimizer = make_optimizer(cfg.optimizer.name, space, n_obj, cfg.seed, population=cfg.optimizer.population,
                               budget=budget, options=cfg.optimizer.options, start=cfg.optimizer.start)
    spec = EvaluatorSpec.from_config(cfg, space)
    ready = True
    if spec.kind == "merge":
        from evomerge.search.calibrate import fill_spec

        ready = cfg.run_dir is not None and fill_spec(spec, cfg, Path(cfg.run_dir))
        check_objectives(spec, ready, Path(cfg.run_dir) if cfg.run_dir else None)
        _check_sources(cfg)
    return Setup(cfg, space, optimizer, spec, ready)


def check_can_start(setup: Setup) -> None:
    """What would otherwise stop a search after its directory is written, checked first: the
    inference backend, the device a local pool evaluates on, and the Ray cluster (reachable,
    able to place every worker)."""
    import importlib.util

    cfg = setup.config
    if cfg.evaluator.kind == "merge":
        from evomerge.backends import BACKENDS
        from evomerge.io.device import check_device

        if cfg.evaluator.backend not in BACKENDS:
            raise ConfigError(f"evaluator.backend: unknown backend {cfg.evaluator.backend!r} "
                              f"(choose from {', '.join(BACKENDS)})")
        if cfg.workers.backend == "local":    # evaluated in this process (Ray workers check their own)
            check_device(cfg.evaluator.device, "evaluator.device")
            if cfg.evaluator.backend == "vllm" and importlib.util.find_spec("vllm") is None:
                raise ConfigError("evaluator.backend: 'vllm' needs the vllm extra (pip install 'evomerge[vllm]')")
    if cfg.workers.backend == "ray":
        from evomerge.workers import ray_cluster

        w = cfg.workers
        ray_cluster.connect(w.address, num_cpus=max(1, math.ceil(w.count * w.num_cpus)))
        ray_cluster.check_resources(w.count, num_cpus=w.num_cpus, num_gpus=w.num_gpus, memory=w.memory)


def check_objectives(spec: EvaluatorSpec, ready: bool, run_dir: Path | None) -> None:
    """Every objective's task exists and its estimator is known; once the pre-search phase is
    done, also that its calibration loads and fits the task."""
    from evomerge.estimators import registry
    from evomerge.search.calibrate import calibration_path
    from evomerge.workers.evaluator import ObjectiveSpec, task_options

    for o in spec.objectives:
        if ready:
            prepare_objective(o)
            continue
        try:
            registry.get(o.estimator, f"objectives.{o.name}.estimator")
        except EvomergeError as exc:
            raise ConfigError(str(exc)) from None
        given = o.calibration is not None and (run_dir is None or Path(o.calibration) != calibration_path(run_dir, o.name))
        if given:   # a calibration from the config: check it now (abilities come later)
            prepare_objective(ObjectiveSpec(o.name, o.task, o.estimator, o.calibration, [[0.0]], **task_options(o)))
        else:
            prepare_objective(ObjectiveSpec(o.name, o.task, scoring=o.scoring, **task_options(o)))


def _check_sources(cfg: SearchConfig) -> None:
    """Sources readable and of one architecture (shapes only; nothing is loaded)."""
    from evomerge.merge.engine import SourceSet

    SourceSet.load(cfg.sources, device="cpu", resident=False).check_compatible()


def make_pool(setup: Setup, spec: EvaluatorSpec | None = None):
    """The config's workers, evaluating with ``spec`` (default: the search's evaluator)."""
    from evomerge.workers.pool import make_pool as build

    factory = functools.partial(make_evaluator, spec or setup.spec)
    return build(factory, **setup.config.workers.model_dump())


def start_pool_for(setup: Setup, run_stub) -> Any:
    """The workers the run needs first: the search's, or, while the pre-search phase is still
    to run, the pre-search evaluator's (sources scored on every item) -- on the workers either
    way, so a worker that cannot load a source stops the search before anything is written."""
    if setup.ready:
        return make_pool(setup)
    from evomerge.search.calibrate import presearch_spec

    return make_pool(setup, presearch_spec(run_stub))


@dataclass
class _PresearchStub:
    """What ``presearch_spec`` reads of a run, before the run exists."""

    setup: Setup

    @property
    def config(self) -> SearchConfig:
        return self.setup.config


class SearchRun:
    """One search, bound to its run directory."""

    def __init__(self, run_dir: Path, setup: Setup, lock: RunLock, finished: bool = False,
                 completed_generations: int = 0) -> None:
        self.run_dir = run_dir
        self.store = RunStore(run_dir)
        self.setup = setup
        self.config = setup.config
        self.space = setup.space
        self.optimizer = setup.optimizer        # fresh from the config: replay brings it up to date
        self.state = ControllerState(finished=finished)
        self._lock = lock
        self.archive = self.store.open_archive(readonly=False)
        try:
            self.archive.verify()
        except BaseException:
            self.archive.close()
            raise
        # Generations the archive says are complete: replay must find every one of their rows.
        self._completed = completed_generations
        self.multi = is_multi_objective(self.config.optimizer.name)
        self.objectives = self.config.objective_names
        self.weights = np.array([o.weight for o in self.config.objectives], dtype=float)
        self.pool = None                     # a pool started before the run directory was written
        self._decode_errors: dict[int, str] = {}
        # Search candidates evaluated before an interruption: asked again on resume, their
        # stored results are reused. Read once, so a fresh run never queries per candidate.
        self._stored = {row[0] for row in self.archive.db.execute(
            "SELECT candidate_id FROM evaluations WHERE generation >= 0")}
        self._best: dict[str, float] | None = None   # best search value per objective, for the bar

    # -- creating and reopening --------------------------------------------------------------
    @classmethod
    def create(cls, config: str | Path | SearchConfig, run_dir: str | Path | None = None,
               start_pool: bool = False) -> "SearchRun":
        """Validate the config, then write a fresh run directory (all at once or not at all).

        ``start_pool=True`` also starts the workers first, so a worker that cannot load a
        source stops the search before anything is written."""
        cfg = load_config(config) if not isinstance(config, SearchConfig) else config
        target = run_dir or cfg.run_dir
        if target is None:
            raise ConfigError("run_dir: no run directory given (set run_dir in the config or pass --run-dir)")
        run_dir = Path(target).resolve()
        cfg.run_dir = str(run_dir)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise EvomergeError(f"{run_dir}: run directory already exists (use `evomerge resume {run_dir}` "
                                "or choose another run_dir)")
        setup = prepare(cfg)
        check_can_start(setup)
        pool = start_pool_for(setup, _PresearchStub(setup)) if start_pool else None
        lock = None
        try:
            if run_dir.is_dir():
                run_dir.rmdir()  # empty (checked above); atomic_dir wants to create it
            with atomic_dir(run_dir) as tmp:
                RunStore.write_new(tmp, cfg)
                # Locked before the directory appears under its name: no second process can
                # take it over between creation and the first result.
                lock = RunLock(tmp / LOCK_FILE, run_dir)
            run = cls(run_dir, setup, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            if pool is not None:
                pool.close()
            raise
        run.pool = pool
        return run

    @classmethod
    def resume(cls, run_dir: str | Path, start_pool: bool = False) -> "SearchRun":
        """Reopen a run: its config and progress from the archive, the optimizer by replay."""
        run_dir = Path(run_dir).resolve()
        store = RunStore(run_dir)
        meta = store.meta()
        lock = store.lock()
        try:
            setup = prepare(store.config(meta))
            if not meta.get("finished"):
                check_can_start(setup)
            run = cls(run_dir, setup, lock, finished=bool(meta.get("finished")),
                      completed_generations=int(meta.get("generation") or 0))
            if start_pool and not run.finished:
                run.pool = start_pool_for(setup, run)
        except BaseException:
            lock.release()
            raise
        return run

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def completed_generations(self) -> int:
        """Generations the archive recorded as complete when the run was opened."""
        return self._completed

    # -- running -----------------------------------------------------------------------------
    def presearch(self, progress: bool = True, pool=None) -> None:
        """Score the sources and calibrate the IRT objectives (resumable; see calibrate.py),
        on ``pool`` (a pre-search pool, closed afterwards) or on workers started for it."""
        from evomerge.search.calibrate import fill_spec, presearch

        presearch(self, progress, pool)
        self.setup.ready = fill_spec(self.setup.spec, self.config, self.run_dir)
        check_objectives(self.setup.spec, True, self.run_dir)

    def _budget_left(self) -> int:
        opt = self.config.optimizer
        if self.state.generation >= opt.generations:
            return 0
        left = opt.population
        if opt.max_evaluations is not None:
            left = min(left, opt.max_evaluations - self.state.next_candidate_id)
        return max(left, 0)

    def run(self, pool=None, progress: bool = True) -> None:
        """Run generations until the budget is spent; ``pool`` defaults to the config's."""
        own_pool = pool is None
        if own_pool:
            pool, self.pool = self.pool, None
        if self.state.finished:
            if own_pool and pool is not None:
                pool.close()
            return
        if not self.setup.ready:
            # a pool this run started before the pre-search phase evaluates for that phase
            self.presearch(progress, pool if own_pool else None)
            if own_pool:
                pool = None
        if pool is None:
            pool = make_pool(self.setup)
        try:
            if self.config.optimizer.steady_state:
                self._steady(pool, progress)
            while (n := self._budget_left()) > 0:
                self._generation(pool, n, progress)
            self.state.finished = True
            self.archive.set_meta(finished=True)
        finally:
            if own_pool:
                pool.close()

    def _generation(self, pool, n: int, progress: bool) -> None:
        """One generation: results the archive holds are taken from it (replay), the rest
        evaluated; the last new result is committed with the generation count."""
        from tqdm import tqdm

        g = self.state.generation
        xs = self.optimizer.ask(n)
        candidates = [self._candidate(self.state.next_candidate_id + i, g, x) for i, x in enumerate(xs)]
        results: dict[int, EvalResult] = {}
        by_id = {c.candidate_id: c for c in candidates}
        fresh = []
        for c in candidates:
            stored = self._stored_result(c)
            if stored is not None:                      # evaluated before an interruption
                results[c.candidate_id] = stored
            else:
                fresh.append(c)
        if fresh and g < self._completed:
            raise CheckpointError(f"{self.archive.path}: candidate {fresh[0].candidate_id} of generation {g} is "
                                  f"missing, yet the archive records {self._completed} generations done; this run "
                                  "cannot be continued exactly")
        left = len(fresh)
        submitted_at: dict[int, float] = {}

        def record(candidate: Candidate, result: EvalResult) -> None:
            nonlocal left
            left -= 1
            self.archive.add(candidate, result, submitted_at.get(candidate.candidate_id),
                             meta={"generation": g + 1} if left == 0 else None)
            results[candidate.candidate_id] = result

        bar = tqdm(total=len(candidates), initial=len(candidates) - len(fresh),
                   desc=f"gen {g + 1}/{self.config.optimizer.generations}",
                   disable=not progress or not fresh, file=sys.stderr, leave=True, dynamic_ncols=True)
        for c in fresh:
            if c.candidate_id in self._decode_errors:  # decoding failed: record, do not evaluate
                record(c, EvalResult(c.candidate_id, "failed", error=self._decode_errors.pop(c.candidate_id)))
                bar.update(1)
            else:
                submitted_at[c.candidate_id] = time.time()
                pool.submit(c)
        while pool.pending():
            result = pool.next_result()
            record(by_id[result.candidate_id], result)
            bar.update(1)
            if progress:
                bar.set_postfix_str(self._best_text(result), refresh=False)
        if progress and fresh:
            bar.set_postfix_str(self._best_text())
        bar.close()
        told = np.array([self._told_values(results[c.candidate_id]) for c in candidates])
        self.optimizer.tell(xs, told)
        self.state = ControllerState(g + 1, self.state.next_candidate_id + len(candidates))

    def _stored_result(self, candidate: Candidate) -> EvalResult | None:
        """The archived result of a candidate asked again during replay (None: not archived),
        after checking that replay asked the very genome the archive holds."""
        if candidate.candidate_id not in self._stored:
            return None
        stored = self.archive.record(candidate.candidate_id)
        if stored is None:
            return None
        if not np.allclose(stored.genome, candidate.genome, rtol=0, atol=1e-12):
            raise CheckpointError(f"{self.archive.path}: candidate {candidate.candidate_id} holds another genome "
                                  "than replaying the run asks for (the archive was changed, or the optimizer "
                                  "is not deterministic); this run cannot be continued exactly")
        self._decode_errors.pop(candidate.candidate_id, None)
        return stored.result

    def _steady(self, pool, progress: bool) -> None:
        """Steady state: one new candidate asked whenever a result is told, so the pool stays
        full. Exact on resume: each result is archived with its place in the order results
        reached the optimizer (the ``told`` table, same transaction), and resuming replays
        that order -- the first population asked, then each archived tell followed by its one
        ask -- before sending what is still out. Candidate ids are the ask order; a
        candidate's generation is its id // population."""
        from collections import deque

        from tqdm import tqdm

        opt = self.config.optimizer
        total = opt.population * opt.generations
        if opt.max_evaluations is not None:
            total = min(total, opt.max_evaluations)
        told, next_id = 0, 0
        out: dict[int, Candidate] = {}          # asked, not yet told, in ask order

        def ask(k: int) -> list[Candidate]:
            nonlocal next_id
            fresh = []
            for x in self.optimizer.ask(min(k, total - next_id)):
                fresh.append(self._candidate(next_id, next_id // opt.population, x))
                out[next_id] = fresh[-1]
                next_id += 1
            return fresh

        def tell(candidate: Candidate, result: EvalResult) -> None:
            self.optimizer.tell([np.asarray(candidate.genome)], self._told_values(result)[None, :])

        ask(opt.population)
        for seq, cid in self.archive.told_after(0):   # told before an interruption: replay
            candidate = out.pop(cid, None)
            if seq != told + 1 or candidate is None:
                raise CheckpointError(f"{self.archive.path}: told result {seq} (candidate {cid}) is not the one "
                                      "replaying the run tells next; this run cannot be continued exactly")
            stored = self._stored_result(candidate)
            if stored is None:
                raise CheckpointError(f"{self.archive.path}: candidate {cid} was told but is not archived; "
                                      "this run cannot be continued exactly")
            tell(candidate, stored)
            told = seq
            ask(1)
        instant: deque[tuple[Candidate, EvalResult]] = deque()
        submitted_at: dict[int, float] = {}

        def launch(candidates: list[Candidate]) -> None:
            for c in candidates:
                if c.candidate_id in self._decode_errors:   # decoding failed: record, do not evaluate
                    instant.append((c, EvalResult(c.candidate_id, "failed",
                                                  error=self._decode_errors.pop(c.candidate_id))))
                else:
                    submitted_at[c.candidate_id] = time.time()
                    pool.submit(c)

        launch(list(out.values()))
        bar = tqdm(total=total, initial=told, desc="steady state", disable=not progress, file=sys.stderr,
                   leave=True, dynamic_ncols=True)
        while out:
            if instant:
                candidate, result = instant.popleft()
            else:
                result = pool.next_result()
                candidate = out[result.candidate_id]
            del out[candidate.candidate_id]
            told += 1
            # progress (durable) once per population's worth of results, and with the last one
            progress_mark = told % opt.population == 0 or told == total
            self.archive.add(candidate, result, submitted_at.pop(candidate.candidate_id, None), told_seq=told,
                             meta={"generation": told // opt.population} if progress_mark else None)
            tell(candidate, result)
            launch(ask(1))
            bar.update(1)
            if progress:
                bar.set_postfix_str(self._best_text(result), refresh=False)
        bar.close()
        # Whatever the generational loop checks next sees the budget spent.
        self.state = ControllerState(max(told // opt.population, opt.generations), next_id)

    def _candidate(self, candidate_id: int, generation: int, x: np.ndarray) -> Candidate:
        every = self.config.audit.every
        plan = None
        try:
            decoded = self.space.decode(x)
            plan = decoded.to_dict() if decoded is not None else None
        except Exception as exc:  # a genome the decoder rejects is a failed candidate, not a crash
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._decode_errors[candidate_id] = f"decode: {type(exc).__name__}: {message}"
        return Candidate(candidate_id, generation, [float(v) for v in x], plan,
                         audit=bool(every) and candidate_id % every == 0)

    def _told_values(self, result: EvalResult) -> np.ndarray:
        failed = self.config.optimizer.failed_value
        if result.status == "ok" and all(o in result.objectives for o in self.objectives):
            values = np.array([result.objectives[o].value for o in self.objectives], dtype=float)
            values = np.where(np.isfinite(values), values, failed)
        else:
            values = np.full(len(self.objectives), failed, dtype=float)
        return values if self.multi else np.array([float(self.weights @ values)])

    def _best_text(self, result: EvalResult | None = None) -> str:
        """Best search value per objective so far: read from the archive once, then kept
        current from each new result (no query per result)."""
        if self._best is None:
            self._best = self.archive.best()
        elif result is not None and result.status == "ok":
            for name, score in result.objectives.items():
                if name in self.objectives and math.isfinite(score.value):
                    self._best[name] = max(score.value, self._best.get(name, -math.inf))
        return " ".join(f"{name}={self._best[name]:.3f}" for name in self.objectives if name in self._best)

    def close(self) -> None:
        """Close the archive and release the run's lock (another process may resume it)."""
        self.archive.close()
        self._lock.release()


# --------------------------------------------------------------------------- held-out judging


def judge(run_dir: str | Path, plans: dict[str, dict], split: str = "heldout",
          extra_tasks: dict[str, str] | None = None, progress: bool = False,
          per_item: bool = False) -> dict[str, dict[str, dict]]:
    """Score merge plans by FULL evaluation: {label: {objective: {value, stderr, n_items}}}.

    ``plans`` maps a row label to a plan dict (a candidate's stored plan, a one-shot
    recipe, ``calibrate.source_plan(name)`` for a source model); model names in the plans
    are the run's source names. ``split="heldout"`` scores each objective's held-out task
    (objectives without one are skipped), ``"search"`` the task searched on;
    ``extra_tasks`` ({column: task}) adds columns, e.g. the other skills; ``per_item`` adds
    each item's score (``scores``, in item order), for paired comparisons between rows."""
    from tqdm import tqdm

    from evomerge.estimators.registry import mean_estimate
    from evomerge.tasks.task import load_task
    from evomerge.workers.evaluator import EvaluatorSpec, plan_scorer, task_options

    if split not in ("heldout", "search"):
        raise EvomergeError(f"split: expected 'heldout' or 'search', got {split!r}")
    run_dir = Path(run_dir)
    cfg = RunStore(run_dir).config()
    if cfg.evaluator.kind != "merge":
        raise EvomergeError(f"{run_dir}: judging needs a merge search (this run's evaluator is {cfg.evaluator.kind!r})")
    tasks = {o.name: (o.heldout_task if split == "heldout" else o.task) for o in cfg.objectives}
    tasks = {name: task for name, task in tasks.items() if task}
    tasks.update(extra_tasks or {})
    if not tasks:
        raise EvomergeError(f"{run_dir}: no objective has a held-out task (set objectives[].heldout)")
    options = {o.name: task_options(o) for o in cfg.objectives}      # an lm-eval objective's metric
    loaded = {}
    for name, task in tasks.items():
        try:
            loaded[name] = load_task(task, **options.get(name, {}))
        except EvomergeError as exc:
            raise EvomergeError(f"objectives.{name}.task: {exc}") from None
    scorer = plan_scorer(EvaluatorSpec.from_config(cfg, build_genome_space(cfg)), list(loaded.values()))
    out: dict[str, dict[str, dict]] = {}
    bar = tqdm(total=len(plans), desc=f"judging on {split} items", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for label, plan in plans.items():
        bar.set_postfix_str(label, refresh=True)
        try:
            scorer.put(plan)
            item_scores = {name: scorer.score(task, range(len(task.items))) for name, task in loaded.items()}
        except Exception as exc:   # the merge or the engine rejected this plan
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise EvomergeError(f"{label}: cannot be evaluated ({type(exc).__name__}: {first})") from None
        out[label] = {}
        for name, scores in item_scores.items():
            score = mean_estimate(scores)
            out[label][name] = ObjectiveScore(score.value, score.stderr, score.n_items).to_dict()
            if per_item:
                out[label][name]["scores"] = [float(v) for v in scores]
        bar.update(1)
    bar.close()
    return out


def judge_candidates(run_dir: str | Path, candidate_ids: list[int] | None = None, split: str = "heldout",
                     progress: bool = False) -> dict[int, dict[str, dict]]:
    """Judge archived candidates (default: the Pareto front) by full evaluation on ``split``."""
    archive = RunStore(run_dir).open_archive()
    try:
        records = archive.front() if candidate_ids is None else [archive.record(i) for i in candidate_ids]
    finally:
        archive.close()
    missing = [i for i, r in zip(candidate_ids or [], records) if r is None]
    if missing:
        raise EvomergeError(f"{run_dir}: no candidate {missing[0]} in the archive")
    plans = {str(r.candidate_id): r.plan for r in records if r.status == "ok" and r.plan}
    judged = judge(run_dir, plans, split=split, progress=progress)
    return {int(k): v for k, v in judged.items()}
