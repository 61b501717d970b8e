"""Before generation 0: the source models as reference points, and IRT calibration.

A merge search first

1. scores every source model on every item of each objective's task (and of its
   held-out task, where there is one) -- the reference points of the report's Pareto
   plot (``archive.meta()["source_scores"]``) and the abilities (thetas) that the
   merge-aware mp-IRT / gmp-IRT estimators pull a candidate toward;
2. for objectives whose estimator needs item parameters and whose config gives no
   calibration file: scores ``calibration.random_merges`` random genomes of the space on
   every item (random merges make the population diverse enough for IRT when there are
   only 2-4 sources), fits the item parameters on sources + random merges, picks the
   anchors and saves the result as ``calibration/<objective>.json`` (a versioned JSON
   artifact with a checksum, see ``evomerge.estimators.calibration``) that every worker
   loads by path.

Everything is recorded as it completes: source responses in the archive's ``responses``
table, calibration merges as ordinary archive evaluations (``generation = -1``, negative
candidate ids, never told to the optimizer) together with their per-item scores. So a
run killed during calibration resumes without redoing a finished evaluation, and since
the random genomes come from the run's seed, it ends with the same calibration.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.estimators import registry
from evomerge.io.atomic import atomic_write_text
from evomerge.search.store import RunStore
from evomerge.workers.types import Candidate, ObjectiveScore

CALIBRATION_GENERATION = -1
SOURCE_ID = -10**6            # candidate id of a source model's evaluation (not archived as a candidate)


def is_calibrated(objective) -> bool:
    """An objective whose estimator needs a calibration (IRT item parameters, anchors)."""
    return registry.get(objective.estimator, f"objectives.{objective.name}.estimator").calibrated


def needs_calibration(objective) -> bool:
    """An objective whose estimator needs item parameters the config does not give."""
    return is_calibrated(objective) and objective.calibration is None


def calibration_path(run_dir: Path, name: str) -> Path:
    return RunStore(run_dir).calibration_path(name)


def thetas_path(run_dir: Path, name: str) -> Path:
    return RunStore(run_dir).thetas_path(name)


def source_plan(name: str) -> dict:
    """A plan that reproduces one source model exactly (linear, weight 1)."""
    return {"merge_method": "linear", "models": [{"model": name, "parameters": {"weight": 1.0}}]}


def calibration_genomes(space, seed: int, n: int) -> list[np.ndarray]:
    """The random merges of the calibration population: a pure function of the seed."""
    rng = np.random.default_rng([int(seed), 0xCA11B])
    return [space.random(rng) for _ in range(n)]


def fill_spec(spec, cfg, run_dir: Path) -> bool:
    """Point the evaluator spec at the run's calibration artifacts; True when every
    objective that needs them has them (i.e. the pre-search phase is done)."""
    ready = RunStore(run_dir).presearch_done_path.is_file()
    for obj_spec, obj in zip(spec.objectives, cfg.objectives):
        if not is_calibrated(obj):
            continue
        if needs_calibration(obj):
            obj_spec.calibration = str(calibration_path(run_dir, obj.name))
            ready &= Path(obj_spec.calibration).is_file()
        path = thetas_path(run_dir, obj.name)
        if path.is_file():
            obj_spec.source_thetas = _read_thetas(path)
        else:
            ready = False
    return ready


def _read_thetas(path: Path) -> list:
    """Source abilities from a run's calibration folder (JSON); one line if damaged."""
    try:
        thetas = json.loads(path.read_text())["thetas"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise EvomergeError(f"{path}: unreadable source abilities ({type(exc).__name__}); delete the file and "
                            "resume to compute them again") from None
    if not isinstance(thetas, list):
        raise EvomergeError(f"{path}: unreadable source abilities (no list of thetas)")
    return thetas


def _subject(name: str) -> str:
    return f"source:{name}"


def presearch_spec(run):
    """The evaluator of the pre-search phase: every objective scored on every item with its
    own scoring (no calibration needed), on the run's sources, backend and device."""
    from evomerge.workers.evaluator import EvaluatorSpec, ObjectiveSpec, task_options

    spec = run.setup.spec
    return EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec(o.name, o.task, scoring=o.scoring, **task_options(o))
                                                   for o in run.config.objectives],
                         sources=dict(spec.sources), backend=spec.backend, device=spec.device,
                         model_dir=spec.model_dir, threads=spec.threads, engine=dict(spec.engine),
                         layer_capacity=spec.layer_capacity, context_tasks=list(spec.context_tasks),
                         multiprocess=spec.multiprocess)


def presearch(run, progress: bool = True, pool=None) -> None:
    """Source scores + calibration for ``run`` (a SearchRun); idempotent and resumable.

    The evaluations run on the workers (``pool``: one started for ``presearch_spec``, or a
    new one from the config's ``workers``), not in the controller: on a cluster the head
    node never loads the sources. Each result is recorded as it arrives."""
    from tqdm import tqdm

    from evomerge.search.run import make_pool
    from evomerge.workers.types import EvalResult

    cfg, archive, run_dir = run.config, run.archive, run.run_dir
    calibrated = [o for o in cfg.objectives if needs_calibration(o)]
    irt = [o for o in cfg.objectives if is_calibrated(o)]
    heldout = {o.name: o.heldout_task for o in cfg.objectives if o.heldout_task}
    genomes = calibration_genomes(run.space, cfg.calibration_seed, cfg.calibration.random_merges) if calibrated else []

    have = {o.name: archive.responses(o.name) for o in cfg.objectives}
    have_heldout = {name: archive.responses(name, "heldout") for name in heldout}
    todo_sources = [s for s in cfg.sources
                    if any(_subject(s) not in have[o] for o in have)
                    or any(_subject(s) not in have_heldout[o] for o in have_heldout)]
    todo_merges = [i for i in range(len(genomes)) if archive.record(-(i + 1)) is None]
    if not (todo_sources or todo_merges):
        if pool is not None:
            pool.close()
    else:
        # Sources and calibration merges are scored on every item with each objective's own
        # scoring, so they sit on the same scale as the search's candidates (front, report).
        if pool is None:
            pool = make_pool(run.setup, presearch_spec(run))
        try:
            bar = tqdm(total=len(todo_sources) + len(todo_merges), desc="sources + calibration",
                       disable=not progress, file=sys.stderr, leave=True, dynamic_ncols=True)
            sources: dict[int, str] = {}
            merges: dict[int, tuple] = {}
            for k, s in enumerate(todo_sources):
                cand = Candidate(SOURCE_ID - k, CALIBRATION_GENERATION, [], source_plan(s), audit=True, full=True,
                                 heldout=heldout or None)
                sources[cand.candidate_id] = s
                pool.submit(cand)
            for i in todo_merges:
                cand = run._candidate(-(i + 1), CALIBRATION_GENERATION, genomes[i])
                cand.audit, cand.full = True, True
                if cand.plan is None:   # the decoder rejected it: recorded as failed, not evaluated
                    archive.add(cand, EvalResult(cand.candidate_id, "failed",
                                                 error=run._decode_errors.pop(cand.candidate_id, "decode failed")))
                    bar.update(1)
                    continue
                merges[cand.candidate_id] = (cand, time.time())
                pool.submit(cand)
            while pool.pending():
                result = pool.next_result()
                if result.candidate_id in sources:
                    s = sources.pop(result.candidate_id)
                    if result.status != "ok":
                        raise EvomergeError(f"sources.{s}: the source model cannot be evaluated ({result.error})")
                    if "heldout" in (result.responses or {}):
                        archive.add_responses(_subject(s), result.responses["heldout"], split="heldout")
                    archive.add_responses(_subject(s), result.responses["search"])  # last: marks this source done
                    bar.set_postfix_str(s, refresh=False)
                else:
                    cand, submitted = merges.pop(result.candidate_id)
                    responses = (result.responses or {}).get("search", {})
                    result.responses = None
                    archive.add(cand, result, submitted, responses=responses)
                    bar.set_postfix_str(f"random merge {-cand.candidate_id}/{len(genomes)}", refresh=False)
                bar.update(1)
            bar.close()
        finally:
            pool.close()

    _record_source_scores(cfg, archive)
    for obj in irt:
        _calibrate(obj, cfg, run_dir, archive)
    meta = archive.meta()
    done = RunStore(run_dir).presearch_done_path
    done.parent.mkdir(exist_ok=True)
    atomic_write_text(done, json.dumps({"source_scores": meta["source_scores"],
                                        "source_heldout_scores": meta["source_heldout_scores"]}, indent=2))


def _score(values: np.ndarray) -> dict[str, Any]:
    score = registry.mean_estimate(values)
    return ObjectiveScore(score.value, score.stderr, score.n_items, full=score.value).to_dict()


def _source_score(values: np.ndarray, objective, cfg) -> dict[str, Any]:
    """A source's score as the objective's estimator sees candidates where it needs no
    calibration (``subset``: the mean over the same items, so the front and the sources
    compare on one footing); ``full`` is the mean over every item either way. A calibrated
    estimator's map is fitted on these very sources, so they keep their full scores."""
    score = _score(values)
    estimator = registry.get(objective.estimator)
    if not estimator.calibrated:
        items = estimator.items(len(values), subset=cfg.calibration.anchors, seed=cfg.calibration_seed)
        sub = estimator.estimate(np.asarray(values, float)[items])
        score.update(value=sub.value, stderr=sub.stderr, n_items=sub.n_items)
    return score


def _record_source_scores(cfg, archive) -> None:
    search = {o.name: archive.responses(o.name) for o in cfg.objectives}
    held = {o.name: archive.responses(o.name, "heldout") for o in cfg.objectives}
    objectives = {o.name: o for o in cfg.objectives}
    scores = {s: {o: _source_score(search[o][_subject(s)], objectives[o], cfg) for o in search
                  if _subject(s) in search[o]} for s in cfg.sources}
    heldout = {s: {o: _score(held[o][_subject(s)]) for o in held if _subject(s) in held[o]} for s in cfg.sources}
    archive.set_meta(source_scores=scores, source_heldout_scores={s: v for s, v in heldout.items() if v})


def fit_calibration(responses: np.ndarray, items: list[str], settings, seed: int, where: str):
    """A calibration fitted on a population's responses (subjects x ``items``, every item
    scored) as ``settings`` (a CalibrationConfig: anchors, method, dims) ask."""
    from evomerge.estimators.calibration import Calibration

    try:
        return Calibration.fit(responses, settings.n_anchors(len(items)), method=settings.method, dims=settings.dims,
                               seed=seed, items=items)
    except EvomergeError as exc:
        raise EvomergeError(f"{where}: calibration failed ({exc}); raise calibration.random_merges") from None


def _calibrate(obj, cfg, run_dir: Path, archive) -> None:
    from evomerge.estimators.calibration import Calibration
    from evomerge.tasks.task import load_task

    task = load_task(obj.task)
    items = [item.id for item in task.items]
    responses = archive.responses(obj.name)
    sources = [_subject(s) for s in cfg.sources]
    where = f"objectives.{obj.name}"
    if needs_calibration(obj):
        path = calibration_path(run_dir, obj.name)
        if not path.is_file():
            merges = [k for k in responses if k.startswith("candidate:")]
            rows = np.array([responses[k] for k in sources + merges], dtype=float)
            c = cfg.calibration
            calib = fit_calibration(rows, items, c, c.seed if c.seed is not None else cfg.seed, where)
            calib.info["population"] = {"sources": list(cfg.sources), "random_merges": len(merges)}
            path.parent.mkdir(exist_ok=True)
            calib.save(path)
    else:
        path = Path(obj.calibration)
    calib = Calibration.load(path)
    position = {item: i for i, item in enumerate(items)}
    missing = [i for i in calib.items if i not in position]
    if missing:
        raise EvomergeError(f"{where}.calibration: item {missing[0]!r} is not in task {obj.task!r}")
    order = [position[i] for i in calib.items]
    source_rows = np.array([responses[k][order] for k in sources], dtype=float)
    theta, _ = calib.theta_full(source_rows)
    out = thetas_path(run_dir, obj.name)
    out.parent.mkdir(exist_ok=True)
    atomic_write_text(out, json.dumps({"sources": list(cfg.sources), "calibration": str(path),
                                       "thetas": np.asarray(theta, float).tolist()}, indent=2))
