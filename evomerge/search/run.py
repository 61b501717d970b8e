"""The search run: config -> run directory -> generations of ask / evaluate / tell.

A run directory holds

    config.yaml        the resolved config (absolute paths), written once
    meta.json          format + evomerge version + objectives, written once
    archive.sqlite     every evaluation, the front and its hypervolume (archive.py)
    checkpoints/       controller state at the start of the latest generations (state.py)
    calibration/       IRT calibrations + source abilities per objective (calibrate.py)

A merge search starts with a pre-search phase (``calibrate.presearch``): the source
models are scored as reference points and IRT estimators are calibrated; the pool of
workers starts after it, so every worker loads the finished calibration by path.

Each generation: ask ``population`` genomes, decode them to plans, submit them all to the
pool, record each result in the archive the moment it arrives, and tell the optimizer once
the generation is complete (in candidate order, so the order results arrive in does not
matter). Then the state for the next generation is checkpointed.

Resume loads the newest good checkpoint, asks again -- the same genomes, since the
optimizer's generator is part of the state -- and takes results already in the archive
instead of evaluating them again. So a run killed at any moment loses no completed
evaluation, redoes none, and (with a deterministic evaluator) ends with the same archive
as a run that was never interrupted.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import evomerge
from evomerge.errors import CheckpointError, ConfigError, EvomergeError
from evomerge.io.atomic import atomic_dir, atomic_write_text
from evomerge.search.archive import Archive
from evomerge.search.config import SearchConfig, build_genome_space, dump_config, load_config, load_run_config
from evomerge.search.optimizers import Optimizer, is_multi_objective, make_optimizer
from evomerge.search.state import ControllerState, load_latest, save_state
from evomerge.workers.evaluator import CALIBRATION_FREE, EvaluatorSpec, make_evaluator, prepare_objective
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore

RUN_FORMAT = 1
META_FILE = "meta.json"


def read_meta(run_dir: Path) -> dict[str, Any]:
    """meta.json of a run, refusing run directories of another format or evomerge version."""
    path = run_dir / META_FILE
    if not run_dir.is_dir():
        raise EvomergeError(f"{run_dir}: no such run directory")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvomergeError(f"{run_dir}: not a search run directory (no {META_FILE})") from None
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT \
            or meta.get("evomerge_version") != evomerge.__version__:
        found = meta.get("evomerge_version") if isinstance(meta, dict) else None
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise EvomergeError(f"{path}: run directory written by evomerge {found} (format {fmt}); "
                            f"this is evomerge {evomerge.__version__} (format {RUN_FORMAT})")
    return meta


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


def check_objectives(spec: EvaluatorSpec, ready: bool, run_dir: Path | None) -> None:
    """Every objective's task exists and its estimator is known; once the pre-search phase is
    done, also that its calibration loads and fits the task."""
    from evomerge.estimators.calibration import MAPPED
    from evomerge.search.calibrate import calibration_path
    from evomerge.workers.evaluator import ObjectiveSpec, task_options

    for o in spec.objectives:
        if ready:
            prepare_objective(o)
            continue
        if o.estimator not in CALIBRATION_FREE and o.estimator not in MAPPED:
            raise ConfigError(f"objectives.{o.name}.estimator: unknown estimator {o.estimator!r} "
                              f"(choose from {', '.join(CALIBRATION_FREE)}, {', '.join(MAPPED)})")
        given = o.calibration is not None and (run_dir is None or Path(o.calibration) != calibration_path(run_dir, o.name))
        if given:   # a calibration from the config: check it now (abilities come later)
            prepare_objective(ObjectiveSpec(o.name, o.task, o.estimator, o.calibration, [[0.0]], **task_options(o)))
        else:
            prepare_objective(ObjectiveSpec(o.name, o.task, scoring=o.scoring, **task_options(o)))


def _check_sources(cfg: SearchConfig) -> None:
    """Sources readable and of one architecture (shapes only; nothing is loaded)."""
    from evomerge.merge.engine import SourceSet

    SourceSet.load(cfg.sources, device="cpu", resident=False).check_compatible()


def make_pool(setup: Setup):
    from evomerge.workers.pool import make_pool as build

    factory = functools.partial(make_evaluator, setup.spec)
    return build(factory, **setup.config.workers.model_dump())


class SearchRun:
    """One search, bound to its run directory."""

    def __init__(self, run_dir: Path, setup: Setup, state: ControllerState) -> None:
        self.run_dir = run_dir
        self.setup = setup
        self.config = setup.config
        self.space = setup.space
        self.optimizer = setup.optimizer
        self.state = state
        self.archive = Archive(run_dir)
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
        state = ControllerState(generation=0, next_candidate_id=0, optimizer=setup.optimizer.state_dict())
        pool = make_pool(setup) if start_pool and setup.ready else None
        if run_dir.is_dir():
            run_dir.rmdir()  # empty (checked above); atomic_dir wants to create it
        with atomic_dir(run_dir) as tmp:
            atomic_write_text(tmp / "config.yaml", dump_config(cfg))
            meta = {"format": RUN_FORMAT, "evomerge_version": evomerge.__version__, "created": time.time(),
                    "seed": cfg.seed, "objectives": cfg.objective_names}
            atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
            Archive(tmp, objectives=cfg.objective_names, reference=cfg.optimizer.reference_point).close()
            save_state(tmp, state)
        run = cls(run_dir, setup, state)
        run.pool = pool
        return run

    @classmethod
    def resume(cls, run_dir: str | Path, start_pool: bool = False) -> "SearchRun":
        run_dir = Path(run_dir).resolve()
        read_meta(run_dir)
        setup = prepare(load_run_config(run_dir))
        state = load_latest(run_dir)
        try:
            setup.optimizer.load_state_dict(state.optimizer)
        except Exception as exc:
            raise CheckpointError(f"{run_dir}: checkpoint does not fit this run's optimizer ({exc})") from None
        run = cls(run_dir, setup, state)
        if start_pool and not state.finished and setup.ready:
            run.pool = make_pool(setup)
        return run

    @property
    def finished(self) -> bool:
        return self.state.finished

    # -- running -----------------------------------------------------------------------------
    def presearch(self, progress: bool = True) -> None:
        """Score the sources and calibrate the IRT objectives (resumable; see calibrate.py)."""
        from evomerge.search.calibrate import fill_spec, presearch

        presearch(self, progress)
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
            self.presearch(progress)
        if pool is None:
            pool = make_pool(self.setup)
        try:
            if self.config.optimizer.steady_state:
                self._steady(pool, progress)
            while (n := self._budget_left()) > 0:
                self._generation(pool, n, progress)
            self.state.finished = True
            save_state(self.run_dir, self.state)
            self.archive.set_meta(finished=True)
        finally:
            if own_pool:
                pool.close()

    def _generation(self, pool, n: int, progress: bool) -> None:
        from tqdm import tqdm

        g = self.state.generation
        xs = self.optimizer.ask(n)
        candidates = [self._candidate(self.state.next_candidate_id + i, g, x) for i, x in enumerate(xs)]
        results: dict[int, EvalResult] = {}
        by_id = {c.candidate_id: c for c in candidates}
        submitted_at: dict[int, float] = {}
        bar = tqdm(total=len(candidates), desc=f"gen {g + 1}/{self.config.optimizer.generations}",
                   disable=not progress, file=sys.stderr, leave=True, dynamic_ncols=True)
        for c in candidates:
            stored = self.archive.record(c.candidate_id) if c.candidate_id in self._stored else None
            if stored is not None:                      # evaluated before an interruption
                if not np.allclose(stored["genome"], c.genome, rtol=0, atol=1e-12):
                    raise CheckpointError(f"{self.run_dir}: archive candidate {c.candidate_id} differs from the "
                                          "genome the checkpoint asks again (archive and checkpoint disagree)")
                results[c.candidate_id] = _result_from_record(stored)
                bar.update(1)
            elif c.candidate_id in self._decode_errors:  # decoding failed: record, do not evaluate
                result = EvalResult(c.candidate_id, "failed", error=self._decode_errors.pop(c.candidate_id))
                self.archive.add(c, result, time.time())
                results[c.candidate_id] = result
                bar.update(1)
            else:
                submitted_at[c.candidate_id] = time.time()
                pool.submit(c)
        while pool.pending():
            result = pool.next_result()
            candidate = by_id[result.candidate_id]
            self.archive.add(candidate, result, submitted_at.get(result.candidate_id))
            results[result.candidate_id] = result
            bar.update(1)
            if progress:
                bar.set_postfix_str(self._best_text(result), refresh=False)
        if progress:
            bar.set_postfix_str(self._best_text())
        bar.close()
        told = np.array([self._told_values(results[c.candidate_id]) for c in candidates])
        self.optimizer.tell(xs, told)
        self.state = ControllerState(g + 1, self.state.next_candidate_id + len(candidates),
                                     self.optimizer.state_dict())
        save_state(self.run_dir, self.state)
        self.archive.set_meta(generation=g + 1)

    def _steady(self, pool, progress: bool) -> None:
        """Steady state: one new candidate asked whenever a result is told, so the pool stays
        full. Exact on resume: results are told in the archive's ``told`` order, the
        checkpoint holds the optimizer after some prefix of it (and what was out then), and
        resuming replays the rest of that order -- each tell followed by its one ask --
        before sending what is still out. Candidate ids are the ask order; a candidate's
        generation is its id // population."""
        from collections import deque

        from tqdm import tqdm

        opt = self.config.optimizer
        total = opt.population * opt.generations
        if opt.max_evaluations is not None:
            total = min(total, opt.max_evaluations)
        told, next_id = self.state.told, self.state.next_candidate_id
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

        for cid, genome in self.state.pending:
            out[cid] = self._candidate(cid, cid // opt.population, np.asarray(genome))
        if not out and told == 0 and next_id == 0:
            ask(opt.population)
        for seq, cid in self.archive.told_after(told):   # told before an interruption
            candidate, record = out.pop(cid, None), self.archive.record(cid)
            if candidate is None or not np.allclose(record["genome"], candidate.genome, rtol=0, atol=1e-12):
                raise CheckpointError(f"{self.run_dir}: archive candidate {cid} is not the one the checkpoint "
                                      "asks next (archive and checkpoint disagree)")
            self._decode_errors.pop(cid, None)
            tell(candidate, _result_from_record(record))
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
            self.archive.add(candidate, result, submitted_at.pop(candidate.candidate_id, None), told_seq=told)
            tell(candidate, result)
            launch(ask(1))
            bar.update(1)
            if progress:
                bar.set_postfix_str(self._best_text(result), refresh=False)
            if told % opt.population == 0 or not out:
                self.state = ControllerState(told // opt.population, next_id, self.optimizer.state_dict(), told=told,
                                             pending=tuple((c.candidate_id, c.genome) for c in out.values()))
                save_state(self.run_dir, self.state)
                self.archive.set_meta(generation=self.state.generation)
        bar.close()
        # Whatever the generational loop checks next sees the budget spent.
        self.state.generation = max(self.state.generation, opt.generations)

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
        self.archive.close()


def _result_from_record(record: dict[str, Any]) -> EvalResult:
    objectives = {name: ObjectiveScore(**score) for name, score in record["objectives"].items()}
    return EvalResult(record["candidate_id"], record["status"], objectives, record["error"], record["worker"],
                      record["seconds"] or 0.0, record["items_scored"] or 0, record["timings"])


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

    from evomerge.tasks.task import load_task
    from evomerge.workers.evaluator import CandidateEvaluator, EvaluatorSpec, ObjectiveSpec, task_options

    if split not in ("heldout", "search"):
        raise EvomergeError(f"split: expected 'heldout' or 'search', got {split!r}")
    run_dir = Path(run_dir)
    read_meta(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.evaluator.kind != "merge":
        raise EvomergeError(f"{run_dir}: judging needs a merge search (this run's evaluator is {cfg.evaluator.kind!r})")
    tasks = {o.name: (o.heldout_task if split == "heldout" else o.task) for o in cfg.objectives}
    tasks = {name: task for name, task in tasks.items() if task}
    tasks.update(extra_tasks or {})
    if not tasks:
        raise EvomergeError(f"{run_dir}: no objective has a held-out task (set objectives[].heldout)")
    spec = EvaluatorSpec.from_config(cfg, build_genome_space(cfg))
    spec.objectives = [ObjectiveSpec(name, task) for name, task in tasks.items()]
    evaluator = CandidateEvaluator(spec)
    options = {o.name: task_options(o) for o in cfg.objectives}      # an lm-eval objective's metric
    loaded = {name: load_task(task, **options.get(name, {})) for name, task in tasks.items()}
    out: dict[str, dict[str, dict]] = {}
    bar = tqdm(total=len(plans), desc=f"judging on {split} items", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for i, (label, plan) in enumerate(plans.items()):
        bar.set_postfix_str(label, refresh=True)
        result, item_scores = evaluator.evaluate_full(Candidate(i, 0, [], plan, audit=True), loaded)
        if result.status != "ok":
            raise EvomergeError(f"{label}: cannot be evaluated ({result.error})")
        out[label] = {name: {"value": s.value, "stderr": s.stderr, "n_items": s.n_items}
                      for name, s in result.objectives.items()}
        if per_item:
            for name, scores in item_scores.items():
                out[label][name]["scores"] = [float(v) for v in scores]
        bar.update(1)
    bar.close()
    return out


def judge_candidates(run_dir: str | Path, candidate_ids: list[int] | None = None, split: str = "heldout",
                     progress: bool = False) -> dict[int, dict[str, dict]]:
    """Judge archived candidates (default: the Pareto front) by full evaluation on ``split``."""
    archive = Archive(run_dir, readonly=True)
    try:
        records = archive.front() if candidate_ids is None else [archive.record(i) for i in candidate_ids]
    finally:
        archive.close()
    missing = [i for i, r in zip(candidate_ids or [], records) if r is None]
    if missing:
        raise EvomergeError(f"{run_dir}: no candidate {missing[0]} in the archive")
    plans = {str(r["candidate_id"]): r["plan"] for r in records if r["status"] == "ok" and r["plan"]}
    judged = judge(run_dir, plans, split=split, progress=progress)
    return {int(k): v for k, v in judged.items()}
