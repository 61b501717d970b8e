"""What the experiments share: the zoo's sources, a resident scorer, calibration, bookkeeping.

Every experiment counts cost in *scored items* (one item = one prompt answered by one
candidate), so methods with different per-candidate costs get the same budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CONFIGS = ROOT / "configs" / "experiments"
UNSEEN_TASK = str(ROOT / "experiments" / "data" / "calc-unseen.yaml")   # written by experiments/unseen_items.py
UNTAUGHT_TASK = str(ROOT / "experiments" / "data" / "calc-untaught.yaml")  # the same script
EXPERT_NAMES = {"arith": "expert-arith", "strings": "expert-strings", "lang": "expert-lang"}

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def one_thread() -> None:
    """The machine's 2 cores are shared by many processes; a second torch thread then
    mostly spins. Measured on this machine at load ~15: 200 items in 20 s with 2 threads,
    1 s with 1."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def load_settings(name: str, quick: bool) -> dict[str, Any]:
    """configs/experiments/NAME.yaml; its ``quick:`` mapping overrides for --quick."""
    import yaml

    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    quick_part = data.pop("quick", {}) or {}
    if quick:
        data.update(quick_part)
    return data


def add_seeded_arguments(ap, settings: str, settings_help: str) -> None:
    """The options of an experiment run seed by seed in child processes (run_seeds)."""
    import argparse

    ap.add_argument("--zoo", type=Path, default=None, help="zoo directory (default: the shipped zoo; another directory is built first if it holds none)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, one seed: a plumbing check")
    ap.add_argument("--settings", default=settings, help=settings_help)
    ap.add_argument("--jobs", type=int, default=3, help="seeds run in parallel processes")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds instead of the settings' (e.g. 0,1,2,3,4,5)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="default /tmp/evomerge-experiments/NAME (NAME: the settings)")
    ap.add_argument("--out", type=Path, default=None, help="default experiments/results/NAME.json")
    ap.add_argument("--only-seed", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--partial", type=Path, default=None, help=argparse.SUPPRESS)


def seeded_settings(args) -> dict[str, Any]:
    """The settings the arguments of ``add_seeded_arguments`` name, their seeds overridden by
    --seeds; fills in the default work dir and result path."""
    one_thread()
    settings = load_settings(args.settings, args.quick)
    if args.seeds:
        settings["seeds"] = [int(x) for x in args.seeds.split(",")]
    if settings.get("unseen"):      # the unseen items of the zoo measured on
        settings["unseen"] = level_sets(args.zoo)[0]
    if settings.get("task") == "calc-wide":     # the zoo's own (experiments/unseen_items.py)
        settings["task"] = wide_task(args.zoo)
    args.workdir = args.workdir or Path("/tmp/evomerge-experiments") / args.settings
    args.out = args.out or RESULTS / (f"{args.settings}.quick.json" if args.quick else f"{args.settings}.json")
    return settings


def child_arguments(args) -> list[str]:
    """What every seed's child process is passed on (run_seeds adds --only-seed, --partial)."""
    return (["--workdir", str(args.workdir), "--settings", args.settings] + (["--zoo", str(args.zoo)] if args.zoo else [])
            + (["--quick"] if args.quick else []))


def level_sets_folder(zoo_dir: str | Path | None) -> tuple[int | None, Path]:
    """A zoo's seed (None: not built) and the folder of its calc-unseen / calc-untaught task
    files: which items are unseen depends on the seed. The repo ships them for the default
    seed; for another, ``experiments/unseen_items.py --zoo DIR`` writes them into DIR/eval."""
    from evomerge.zoo.build import SEED, built_seed, zoo_paths

    seed = SEED if zoo_dir is None else built_seed(zoo_paths(zoo_dir))
    return seed, (Path(UNSEEN_TASK).parent if seed in (SEED, None) else Path(zoo_dir) / "eval")


def level_sets(zoo_dir: str | Path | None) -> tuple[str, str]:
    """(calc-unseen, calc-untaught) task files of a zoo (``level_sets_folder``)."""
    _, folder = level_sets_folder(zoo_dir)
    if folder != Path(UNSEEN_TASK).parent and not (folder / "calc-unseen.yaml").exists():
        raise SystemExit(f"{folder}: no unseen items for this zoo; run experiments/unseen_items.py --zoo {zoo_dir}")
    return str(folder / "calc-unseen.yaml"), str(folder / "calc-untaught.yaml")


def wide_task(zoo_dir: str | Path | None) -> str:
    """A zoo's calc-wide task file: its level sets halved into search and held-out splits."""
    return str(Path(level_sets(zoo_dir)[0]).parent / "calc-wide.yaml")


def curve_plan(curve: list[dict], fraction: float) -> dict | None:
    """The pick (plan) a best-so-far curve holds at a budget fraction, None when it has none."""
    return next((p.get("plan") for p in curve if abs(p["fraction"] - fraction) < 1e-9), None)


def unseen_task(settings: dict[str, Any]) -> str | None:
    """The settings' ``unseen:`` task file (repo-relative), an absolute path for load_task."""
    return str(ROOT / settings["unseen"]) if settings.get("unseen") else None


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def command_line() -> str:
    rel = Path(sys.argv[0]).resolve()
    try:
        rel = rel.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(rel), *sys.argv[1:]])


def save_figure(fig, path: Path) -> None:
    """Lay out, write (110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: dict) -> Path:
    from evomerge.io.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=1, default=_jsonable))


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def zoo(zoo_dir: str | Path | None):
    """The zoo (built first if missing) and its sources as {plan name: model dir}."""
    from evomerge.zoo.build import ensure_zoo

    paths = ensure_zoo(zoo_dir, verbose=True)
    sources = {"base": str(paths.base), **{s: str(paths.experts[s]) for s in EXPERT_NAMES}}
    return paths, sources


def zoo_fingerprint(sources: dict[str, str]) -> dict[str, str]:
    """SHA-256 (first 16 hex) of each source's weights: which zoo a result was measured on."""
    out = {}
    for name, path in sources.items():
        digest = hashlib.sha256()
        for f in sorted(Path(path).glob("*.safetensors")):
            digest.update(f.read_bytes())
        out[name] = digest.hexdigest()[:16]
    return out


def source_plan(name: str) -> dict:
    """A plan that reproduces one source model unchanged (the product's)."""
    from evomerge.search.calibrate import source_plan as plan

    return plan(name)


def mean_spread(values) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


class Scorer:
    """A cache over the product's PlanScorer (sources and one HF model resident): a plan's
    scores on every item of a task, by task spec.

    Used for what every method gets the same way: calibration populations, the baselines'
    full evaluations, and the final held-out evaluation. Results are cached by plan.
    """

    def __init__(self, sources: dict[str, str], model_dir: str | None = None) -> None:
        from evomerge.workers.scorer import PlanScorer

        self.plan_scorer = PlanScorer(sources, "hf", "cpu", model_dir or sources["base"])
        self.sources = self.plan_scorer.sources
        self._tasks: dict[str, Any] = {}
        self._cache: dict[tuple[str, str, bool], np.ndarray] = {}
        self.seconds = 0.0
        self.items = 0

    def task(self, spec: str):
        from evomerge.tasks.task import load_task

        if spec not in self._tasks:
            self._tasks[spec] = load_task(spec)
        return self._tasks[spec]

    def scores(self, plan: dict, task_spec: str, likelihood: bool = False) -> np.ndarray:
        key = (hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(), task_spec, likelihood)
        if key not in self._cache:
            t = time.perf_counter()
            task = self.task(task_spec)
            self._cache[key] = self.plan_scorer.scores(plan, task, "likelihood" if likelihood else "exact")
            self.seconds += time.perf_counter() - t
            self.items += len(task.items)
        return self._cache[key]

    def accuracy(self, plan: dict, task_spec: str) -> float:
        return float(self.scores(plan, task_spec).mean())

    def graded(self, plan: dict, task_spec: str) -> np.ndarray:
        """Likelihood scores (``Backend.likelihood``) of every item: for measuring estimators."""
        return self.scores(plan, task_spec, likelihood=True)


def paired_gap(scorer: Scorer, pairs: list[tuple[dict, dict]], task_spec: str, draws: int = 2000) -> dict[str, Any]:
    """Pick a minus pick b, one pair per seed, both scored on every item of ``task_spec``.

    Every seed is judged on the same items, so the spread over seeds leaves out the draw of
    the items; ``se`` resamples seeds and items together (a two-way bootstrap), the error a
    different draw of the evaluation items would also have given. ``se_seeds``: seeds only."""
    diff = np.array([scorer.scores(a, task_spec) - scorer.scores(b, task_spec) for a, b in pairs])
    gap = bootstrap_gap({0: diff}, {0: 1.0}, draws)
    per_seed = diff.mean(axis=1)
    return {**gap, "se_seeds": float(per_seed.std(ddof=1) / len(pairs) ** 0.5) if len(pairs) > 1 else None,
            "items": int(diff.shape[1])}


def bootstrap_gap(diffs: dict[Any, np.ndarray], weights: dict[Any, float], draws: int = 2000) -> dict[str, Any]:
    """The weighted gap over parts (each a seeds x items array of per-item differences, the
    same seeds in every part): its mean, and a standard error that resamples the seeds
    (jointly over the parts) and each part's items."""
    per_seed = sum(w * diffs[k].mean(axis=1) for k, w in weights.items())
    n = len(per_seed)
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(draws):
        seeds = rng.integers(0, n, n)
        boot.append(sum(w * diffs[k][np.ix_(seeds, rng.integers(0, diffs[k].shape[1], diffs[k].shape[1]))].mean()
                        for k, w in weights.items()))
    return {"mean": float(per_seed.mean()), "se": float(np.std(boot)), "ahead": int((per_seed > 1e-12).sum()),
            "behind": int((per_seed < -1e-12).sum()), "seeds": n}


# Estimators the experiments' searches choose among (calibrated, needing no source abilities:
# these searches are given a calibration file, so the pre-search computes none; "learned"
# came later and is measured on its own, so the committed choices stay reproducible).
SEARCH_ESTIMATORS = ("anchor", "irt", "pirt", "gpirt", "gpirt_reg", "random", "random_cubic")


def calibrate(scorer: Scorer, space, tasks: dict[str, str], n_random: int, anchor_frac: float, seed: int,
              out_dir: Path, estimator: str | None = None) -> dict[str, Any]:
    """Fit one calibration per objective on the sources + ``n_random`` random merges, each
    scored on every item (that cost is returned: it belongs to the search's budget).

    The estimator is ``estimator`` when given (the demo's setup names one); otherwise the one
    with the lowest held-out error in the calibration's own validation split (no look at the
    search or held-out results)."""
    from evomerge.estimators import registry
    from evomerge.search.calibrate import fit_calibration
    from evomerge.search.config import CalibrationConfig

    # The product's calibration with the settings these results were measured with: anchors
    # chosen by forward selection, 1-3 IRT dimensions (a search config's defaults: irt, 1-2).
    settings = CalibrationConfig(anchors=anchor_frac, random_merges=n_random, method="select", dims=[1, 2, 3])
    rng = np.random.default_rng(10_000 + seed)
    plans = [source_plan(name) for name in scorer.sources.names]
    plans += [space.decode(rng.uniform(space.lower, space.upper)).to_dict() for _ in range(n_random)]
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"objectives": {}, "items_spent": 0, "population": len(plans), "candidates": []}
    per_plan: list[dict[str, float]] = [{} for _ in plans]
    t0 = time.perf_counter()
    for name, spec in tasks.items():
        task = scorer.task(spec)
        responses = np.stack([scorer.scores(p, spec) for p in plans])
        result["items_spent"] += int(responses.size)
        for i, row in enumerate(responses):
            per_plan[i][name] = float(row.mean())
        n_anchors = settings.n_anchors(responses.shape[1])
        calib = fit_calibration(responses, [it.id for it in task.items], settings, seed, f"objectives.{name}")
        path = calib.save(out_dir / f"calibration-{name}-seed{seed}.json")
        errors = calib.info.get("validation_rmse", {})
        if estimator is not None and estimator not in SEARCH_ESTIMATORS:
            registry.get(estimator)      # an unknown name: the registry's one message
            raise ValueError(f"estimator {estimator!r} is not one of {', '.join(SEARCH_ESTIMATORS)}")
        chosen = estimator or min((e for e in SEARCH_ESTIMATORS if e in errors), key=lambda e: errors[e])
        result["objectives"][name] = {"path": str(path), "estimator": chosen, "anchors": n_anchors,
                                      "estimator_chosen_by": "config" if estimator else "validation error",
                                      "validation_rmse": {k: float(v) for k, v in errors.items()},
                                      "irt_dims": calib.info.get("dims")}
    result["seconds"] = time.perf_counter() - t0
    # Calibration merges are fully scored candidates: the search may pick them as its result.
    per_candidate = result["items_spent"] // len(plans)
    result["candidates"] = [{"plan": p, "fitness": per_plan[i], "items": per_candidate}
                            for i, p in enumerate(plans)]
    return result


def archive_events(run_dir: Path, objectives: list[str]) -> list[dict[str, Any]]:
    """A finished search's evaluations in order: items spent, fitness per objective, plan."""
    from evomerge.search.archive import Archive

    archive = Archive(run_dir, readonly=True)
    try:
        events = []
        for r in archive.records():
            ok = r.status == "ok" and all(o in r.objectives for o in objectives)
            events.append({"items": int(r.result.items_scored or 0), "plan": r.plan, "seconds": r.result.seconds,
                           "genome": r.genome,
                           "fitness": {o: r.objectives[o].value for o in objectives} if ok else None,
                           "full": {o: r.objectives[o].full for o in objectives} if ok else None})
        return events
    finally:
        archive.close()


def run_search(config: dict, run_dir: Path) -> dict[str, Any]:
    """Run evomerge's own search (SearchRun, local pool) on a config mapping."""
    import shutil

    from evomerge.search.config import parse_config
    from evomerge.search.run import SearchRun

    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = parse_config(config, "experiment config", ROOT)
    t = time.perf_counter()
    run = SearchRun.create(cfg, run_dir)
    try:
        run.run(progress=False)
    finally:
        run.close()
    return {"seconds": time.perf_counter() - t,
            "events": archive_events(run_dir, [o["name"] for o in config["objectives"]])}


def run_seeds(script: Path, seeds: list[int], jobs: int, args: list[str], workdir: Path) -> dict[int, dict]:
    """Run ``script --only-seed S --partial FILE`` for every seed, ``jobs`` at a time, and
    collect the partial results. Separate processes: the machine's cores are shared, and
    one process per seed is the simplest way to use what is free."""
    import subprocess

    workdir.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(seeds), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            partial = workdir / f"partial-seed{seed}.json"
            partial.unlink(missing_ok=True)
            log = open(workdir / f"seed{seed}.log", "w")
            cmd = [sys.executable, str(script), "--only-seed", str(seed), "--partial", str(partial), *args]
            running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), partial, log)
            print(f"started seed {seed}: {' '.join(cmd)}", flush=True)
        time.sleep(2)
        for seed, (proc, partial, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[seed]
            if proc.returncode != 0 or not partial.exists():
                tail = (workdir / f"seed{seed}.log").read_text().strip().splitlines()[-3:]
                raise RuntimeError(f"seed {seed} failed (exit {proc.returncode}): {' | '.join(tail)}")
            results[seed] = json.loads(partial.read_text())
            print(f"seed {seed} done", flush=True)
    return results
