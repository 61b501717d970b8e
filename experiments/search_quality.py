"""Search quality per budget on the zoo: evomerge vs random search, a mergekit-evolve style
CMA-ES and Mergenetic, all paid in scored items.

    .venv/bin/python experiments/search_quality.py [--zoo DIR] [--quick] [--skip-mergenetic] [--settings NAME]

Settings: configs/experiments/NAME.yaml (default search_quality; search_quality_large is the
same comparison at a 4x budget). Writes experiments/results/NAME.json and NAME.png.

Single objective (the composite task ``zoo/calc``), per seed and method, with the same item
budget B:
- ``evomerge``: its genome space (TIES weight + density per expert per layer), CMA-ES, and the
  IRT-family estimator on 10% anchors. Its calibration (4 sources + random merges scored on every
  search item) is paid from B; those merges are fully scored candidates it may also return.
- ``random``: evomerge's random optimizer on the same genome space, full evaluation.
- ``cmaes_weights``: what mergekit-evolve does -- pycma over one weight and one density per model
  (TIES), x0 and sigma0 as mergekit-evolve's defaults, full evaluation.
- ``mergenetic``: Mergenetic's own Searcher + pymoo GA + TiesMerger (mergekit 0.0.6 to disk), run
  in .venv-mergenetic by experiments/mergenetic_adapter.py, full evaluation.
Each method's result at a budget point is the candidate with the best *search fitness* among
those paid for so far, re-evaluated in full on the task's held-out items (the same scorer for all).

Multi-objective (calc + strings): evomerge (NSGA-II + estimator) vs random search (full
evaluation); hypervolume (reference 0, 0) of the held-out scores of each front found so far.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, Scorer, add_seeded_arguments, calibrate, child_arguments, command_line,  # noqa: E402
                    curve_plan, machine_info, mean_spread, paired_gap, run_search, run_seeds, save_figure, seeded_settings,
                    source_plan, unseen_task, write_json, zoo, zoo_fingerprint)
from evomerge.estimators import registry  # noqa: E402

MERGENETIC_PY = ROOT / ".venv-mergenetic" / "bin" / "python"
EXPERTS = ["arith", "strings", "lang"]


# --------------------------------------------------------------------------- methods
def n_items(task_spec: str) -> int:
    from evomerge.tasks.task import load_task

    return len(load_task(task_spec).items)


def num_layers(sources: dict[str, str]) -> int:
    return int(json.loads((Path(sources["base"]) / "config.json").read_text())["num_hidden_layers"])


def make_space(genome: dict, sources: dict[str, str]):
    from evomerge.search.genome import build_space

    return build_space(genome, [n for n in sources if n != "base"], "base", num_layers(sources))


def search_config(sources, seed, genome, objectives: list[dict], optimizer: str, population: int,
                  n_candidates: int) -> dict:
    return {"seed": seed, "sources": sources, "base": "base", "genome": genome, "objectives": objectives,
            "optimizer": {"name": optimizer, "population": population,
                          "generations": math.ceil(n_candidates / population), "max_evaluations": n_candidates},
            "audit": {"every": 0}, "workers": {"backend": "local", "count": 1}}


def run_evomerge(scorer, sources, tasks: dict[str, str], settings: dict, budget: int, seed: int,
                 workdir: Path) -> dict[str, Any]:
    """Search with the estimator on a tenth of the items. With ``scoring: likelihood`` (graded
    scores on a fixed random subset) nothing is calibrated; otherwise IRT is calibrated first,
    paid from the budget."""
    genome = settings.get("genome") or {"kind": "parameter", "method": "ties", "granularity": "layer"}
    named = settings.get("estimator")       # none: chosen by the calibration's validation error
    if settings.get("scoring") == "likelihood" or (named is not None and not registry.get(named).calibrated):
        return _run_evomerge_uncalibrated(sources, tasks, settings, genome, budget, seed, workdir)
    space = make_space(genome, sources)
    calib = calibrate(scorer, space, {n: f"{t}:search" for n, t in tasks.items()},
                      settings["calibration_random"], settings["anchor_frac"], seed, workdir / "calibration",
                      estimator=settings.get("estimator"))
    per_candidate = sum(o["anchors"] for o in calib["objectives"].values())
    n = (budget - calib["items_spent"]) // per_candidate
    objectives = [{"name": name, "task": f"{tasks[name]}:search", "estimator": o["estimator"],
                   "calibration": o["path"]} for name, o in calib["objectives"].items()]
    config = search_config(sources, seed, genome, objectives, settings["optimizer"], settings["population"], max(n, 1))
    result = run_search(config, workdir / f"evomerge-seed{seed}") if n > 0 else {"seconds": 0.0, "events": []}
    events = [{"items": c["items"], "plan": c["plan"], "fitness": c["fitness"], "kind": "calibration"}
              for c in calib["candidates"]]
    events += [dict(e, kind="search") for e in result["events"]]
    return {"events": events, "seconds": result["seconds"] + calib["seconds"], "search_candidates": n,
            "items_per_candidate": per_candidate, "calibration": {k: v for k, v in calib.items() if k != "candidates"},
            "config": _portable(config)}


def _run_evomerge_uncalibrated(sources, tasks, settings, genome, budget, seed, workdir) -> dict[str, Any]:
    """Estimators that need no calibration: ``subset`` or ``full``, either scoring."""
    frac, estimator = settings["anchor_frac"], settings.get("estimator", "subset")
    scoring = settings.get("scoring", "exact")
    chosen = registry.get(estimator, "evomerge.estimator")
    if chosen.calibrated:
        raise ValueError(f"evomerge.estimator: likelihood scoring runs with subset or full, not {estimator!r}")
    per_candidate = sum(len(chosen.items(n_items(f"{t}:search"), subset=frac, seed=seed)) for t in tasks.values())
    objectives = [{"name": name, "task": f"{t}:search", "scoring": scoring, "estimator": estimator}
                  for name, t in tasks.items()]
    refine = settings.get("refine")
    explore_budget = budget - (int(budget * refine["share"]) if refine else 0)
    n = explore_budget // per_candidate
    config = search_config(sources, seed, genome, objectives, settings["optimizer"], settings["population"], n)
    config["calibration"] = {"anchors": frac, "random_merges": 0}
    result = run_search(config, workdir / f"evomerge-seed{seed}")
    out = {"events": [dict(e, kind="search") for e in result["events"]], "seconds": result["seconds"],
           "search_candidates": n, "items_per_candidate": per_candidate, "config": _portable(config)}
    if refine:
        out.update(_refine(sources, tasks, refine, genome, budget - n * per_candidate, seed, workdir, out["events"]))
    return out


def _refine(sources, tasks, refine: dict, genome: dict, budget: int, seed: int, workdir: Path,
            explored: list[dict]) -> dict[str, Any]:
    """Stage two: exact full evaluation, the optimizer centred on the best genome the graded
    search found. Its events are marked ``refine``: once there are any, the pick is the best
    of them by exact score (``best_curve``)."""
    best = max((e for e in explored if e["fitness"] is not None), key=lambda e: sum(e["fitness"].values()))
    per_candidate = sum(n_items(f"{t}:search") for t in tasks.values())
    n = budget // per_candidate
    objectives = [{"name": name, "task": f"{t}:search"} for name, t in tasks.items()]
    config = search_config(sources, seed, genome, objectives, refine["optimizer"], refine["population"], n)
    config["optimizer"].update(start=best["genome"], options=refine.get("options", {}))
    result = run_search(config, workdir / f"evomerge-refine-seed{seed}")
    return {"events": explored + [dict(e, kind="refine") for e in result["events"]],
            "refine": {"candidates": n, "items_per_candidate": per_candidate, "start": best["genome"],
                       "config": _portable(config)}}


def run_random(sources, tasks: dict[str, str], settings: dict, budget: int, seed: int, workdir: Path):
    per_candidate = sum(n_items(f"{t}:search") for t in tasks.values())
    n = budget // per_candidate
    objectives = [{"name": name, "task": f"{t}:search"} for name, t in tasks.items()]
    config = search_config(sources, seed, settings["genome"], objectives, "random", settings["population"], n)
    result = run_search(config, workdir / f"random-seed{seed}")
    return {"events": [dict(e, kind="search") for e in result["events"]], "seconds": result["seconds"],
            "search_candidates": n, "items_per_candidate": per_candidate, "config": _portable(config)}


def mergekit_evolve_plan(x: np.ndarray) -> dict:
    """mergekit-evolve's decoding of a (weight..., density...) genotype: |w|, clamp(|d|, 0, 1), TIES, normalize."""
    k = len(EXPERTS)
    weights, densities = np.abs(x[:k]), np.clip(np.abs(x[k:]), 0.0, 1.0)
    return {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
            "models": [{"model": m, "parameters": {"weight": float(w), "density": float(d)}}
                       for m, w, d in zip(EXPERTS, weights, densities)]}


def run_cmaes_weights(scorer, task: str, settings: dict, budget: int, seed: int) -> dict[str, Any]:
    import cma

    per_candidate = n_items(f"{task}:search")
    n = budget // per_candidate
    k = len(EXPERTS)
    x0 = np.concatenate([np.full(k, 1.0 / k), np.ones(k)])        # mergekit-evolve's initial genotype
    es = cma.CMAEvolutionStrategy(x0, settings["sigma0"], {"seed": seed + 1, "verbose": -9, "maxfevals": n})
    events, t0 = [], time.perf_counter()
    while len(events) < n and not es.stop():
        xs = es.ask()
        losses = []
        for x in xs:
            if len(events) >= n:
                losses.append(0.0)  # budget spent: not scored (pycma still needs a value)
                continue
            plan = mergekit_evolve_plan(np.asarray(x))
            t = time.perf_counter()
            acc = scorer.accuracy(plan, f"{task}:search")
            events.append({"items": per_candidate, "plan": plan, "fitness": {"calc": acc}, "kind": "search",
                           "seconds": time.perf_counter() - t})
            losses.append(-acc)
        es.tell(xs, losses)
    return {"events": events, "seconds": time.perf_counter() - t0, "search_candidates": len(events),
            "items_per_candidate": per_candidate, "popsize": es.popsize, "x0": x0.tolist()}


def mergenetic_plan(config: dict, zoo_paths) -> dict:
    """Mergenetic's mergekit config with model paths mapped to our source names."""
    names = {str(zoo_paths.base): "base", **{str(p): s for s, p in zoo_paths.experts.items()}}
    models = [{"model": names[m["model"]], "parameters": {k: v for k, v in m["parameters"].items()}}
              for m in config["models"] if m.get("parameters")]
    return {"merge_method": config["merge_method"], "base_model": names[config["base_model"]], "models": models}


def run_mergenetic(zoo_paths, task: str, settings: dict, budget: int, seed: int, workdir: Path) -> dict[str, Any]:
    per_candidate = n_items(f"{task}:search")
    n = budget // per_candidate
    pop = settings["pop"]
    iters = math.ceil(n / pop) + 1    # a spare generation for refused merges; --max-evals caps the scoring
    out = workdir / f"mergenetic-seed{seed}" / "evals.jsonl"
    if out.parent.exists():
        shutil.rmtree(out.parent)
    out.parent.mkdir(parents=True)
    if not MERGENETIC_PY.exists():
        return {"error": f"{MERGENETIC_PY} missing: run scripts/setup_mergenetic_venv.sh", "events": []}
    cmd = [str(MERGENETIC_PY), str(ROOT / "experiments" / "mergenetic_adapter.py"), "--zoo", str(zoo_paths.root),
           "--task", f"{task}:search", "--seed", str(seed), "--pop", str(pop), "--iters", str(iters), "--max-evals", str(n),
           "--workdir", str(out.parent), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    summary = next((json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                    if line.startswith("MERGENETIC_SUMMARY ")), None)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    events = [{"items": r["items_scored"], "plan": mergenetic_plan(r["config"], zoo_paths),
               "fitness": {"calc": r["accuracy"]}, "kind": "search", "seconds": r["seconds"],
               "timings": r["timings"]} for r in records if "error" not in r]
    result = {"events": events, "seconds": seconds, "search_candidates": len(events), "items_per_candidate": per_candidate,
              "pop": pop, "iters": iters, "summary": summary, "command": " ".join(cmd),
              "failed_merges": [r["error"] for r in records if "error" in r]}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        result["error"] = f"mergenetic_adapter exited {proc.returncode}: {tail[0][:300]}"
    return result


def _portable(config: dict) -> dict:
    """A config as it would be written in a YAML file (paths shortened for the JSON)."""
    return json.loads(json.dumps(config).replace(str(ROOT) + "/", ""))


# --------------------------------------------------------------------------- analysis
def _within(events: list[dict], limit: float) -> list[dict]:
    out, spent = [], 0
    for e in events:
        spent += e["items"]
        if spent > limit + 1e-9:
            break
        out.append(e)
    return out


def _paid(events: list[dict], limit: float, search_only: bool) -> list[dict]:
    """Scored events within ``limit`` items (``search_only``: without calibration candidates)."""
    return [e for e in _within(events, limit) if e["fitness"] is not None
            and not (search_only and e.get("kind") == "calibration")]


def best_curve(scorer, events, budget, fractions, objective: str, heldout: str, search_only: bool = False,
               unseen: str | None = None) -> list[dict]:
    """Best-by-fitness candidate at each budget point, re-evaluated on held-out items (and on
    the ``unseen`` task when given: experiments/unseen_items.py). ``search_only``: ignore
    calibration candidates (the sources and random merges evomerge scores before searching),
    so only merges the optimizer proposed can be returned."""
    curve = []
    for f in fractions:
        paid = _paid(events, f * budget, search_only)
        if not paid:
            curve.append({"fraction": f, "items": f * budget, "candidates": 0, "heldout": None, "fitness": None})
            continue
        # first of equals: earliest; a refine stage's exact scores outrank the graded search's
        best = max(paid, key=lambda e: (e.get("kind") == "refine", e["fitness"][objective]))
        curve.append({"fraction": f, "items": f * budget, "candidates": len(paid),
                      "fitness": best["fitness"][objective], "heldout": scorer.accuracy(best["plan"], heldout),
                      "search_full": scorer.accuracy(best["plan"], heldout.replace(":heldout", ":search")),
                      **_unseen(scorer, best["plan"], unseen), "plan": best["plan"]})
    return curve


def _unseen(scorer, plan: dict, unseen: str | None) -> dict[str, float]:
    return {"unseen": scorer.accuracy(plan, unseen)} if unseen else {}


def rescored_curve(scorer, events, budget, fractions, objective: str, heldout: str, k: int, full_cost: int,
                   search_only: bool = False, unseen: str | None = None) -> list[dict]:
    """evomerge's own way of picking its result (as the demo does): the top ``k`` candidates by
    estimate are scored on every search item -- ``k x full_cost`` items reserved from the budget
    point -- and the best exact search score wins (calibration candidates are exact already)."""
    search = heldout.replace(":heldout", ":search")
    curve = []
    for f in fractions:
        paid = _paid(events, f * budget - k * full_cost, search_only)
        if not paid:
            curve.append({"fraction": f, "items": f * budget, "candidates": 0, "heldout": None, "fitness": None})
            continue
        exact = [(e["fitness"][objective], e) for e in paid if e.get("kind") in ("calibration", "refine")]
        estimated = sorted((e for e in paid if e.get("kind") not in ("calibration", "refine")),
                           key=lambda e: -e["fitness"][objective])[:k]
        exact += [(scorer.accuracy(e["plan"], search), e) for e in estimated]
        score, best = max(exact, key=lambda pair: pair[0])
        curve.append({"fraction": f, "items": f * budget, "candidates": len(paid), "fitness": score,
                      "heldout": scorer.accuracy(best["plan"], heldout), "search_full": score,
                      **_unseen(scorer, best["plan"], unseen), "plan": best["plan"]})
    return curve


def hv_curve(scorer, events, budget, fractions, tasks: dict[str, str], search_only: bool = False) -> list[dict]:
    """Hypervolume of the held-out scores of the front (by search fitness) at each budget
    point; ``search_only`` as in ``best_curve``. Budget positions always count every event."""
    from evomerge.search.archive import hypervolume, non_dominated

    names = list(tasks)
    curve = []
    for f in fractions:
        paid = _paid(events, f * budget, search_only)
        if not paid:
            curve.append({"fraction": f, "items": f * budget, "hypervolume": 0.0, "front": 0})
            continue
        points = np.array([[e["fitness"][n] for n in names] for e in paid])
        front = [paid[i] for i in np.flatnonzero(non_dominated(points))]
        held = np.array([[scorer.accuracy(e["plan"], f"{tasks[n]}:heldout") for n in names] for e in front])
        curve.append({"fraction": f, "items": f * budget, "candidates": len(paid), "front": len(front),
                      "hypervolume": float(hypervolume(held, np.zeros(len(names)))),
                      "search_hypervolume": float(hypervolume(points[non_dominated(points)], np.zeros(len(names))))})
    return curve


def summarize(curves: dict[str, list[list[dict]]], key: str) -> dict[str, list[dict]]:
    out = {}
    for method, per_seed in curves.items():
        rows = []
        for i, point in enumerate(per_seed[0]):
            rows.append({"fraction": point["fraction"], "items": point["items"],
                         **mean_spread([seed_curve[i].get(key) for seed_curve in per_seed])})
        out[method] = rows
    return out


def at(summary_rows, fraction):
    return next((r for r in summary_rows if abs(r["fraction"] - fraction) < 1e-9), None)


# --------------------------------------------------------------------------- main
def run_one_seed(args, S: dict, seed: int) -> dict[str, Any]:
    """Every method on one seed (single objective, then multi-objective); curves included."""
    zoo_paths, sources = zoo(args.zoo)
    scorer = Scorer(sources)
    task, budget, fractions = S["task"], S["budget_items"], S["fractions"]
    heldout, unseen = f"{task}:heldout", unseen_task(S)
    workdir = args.workdir / f"seed{seed}"
    runs: dict[str, dict] = {}

    # Mergenetic runs in its own venv and process: start it now, beside the rest.
    thread = None
    if not args.skip_mergenetic:
        def mergenetic():
            runs["mergenetic"] = run_mergenetic(zoo_paths, task, S["mergenetic"], budget, seed, workdir)
        thread = threading.Thread(target=mergenetic, daemon=True)
        thread.start()
    print(f"[seed {seed}] evomerge", flush=True)
    runs["evomerge"] = run_evomerge(scorer, sources, {"calc": task}, S["evomerge"], budget, seed, workdir)
    print(f"[seed {seed}] random", flush=True)
    runs["random"] = run_random(sources, {"calc": task}, S["random"], budget, seed, workdir)
    print(f"[seed {seed}] cmaes_weights", flush=True)
    runs["cmaes_weights"] = run_cmaes_weights(scorer, task, S["cmaes_weights"], budget, seed)
    if thread is not None:
        print(f"[seed {seed}] waiting for mergenetic", flush=True)
        thread.join()
    curves, curves_search_only, info = {}, {}, {}
    for method, run in runs.items():
        curves[method] = best_curve(scorer, run["events"], budget, fractions, "calc", heldout,
                                    unseen=unseen) if run["events"] else None
        curves_search_only[method] = best_curve(scorer, run["events"], budget, fractions, "calc", heldout,
                                                search_only=True, unseen=unseen) if run["events"] else None
        info[method] = {**{k: v for k, v in run.items() if k != "events"}, "evaluations": len(run["events"]),
                        "items_spent": sum(e["items"] for e in run["events"]),
                        "wall_seconds_per_candidate": _per_candidate_seconds(run)}
    k = S["evomerge"].get("rescore_top", 0)
    if k and runs["evomerge"]["events"]:
        cost = n_items(f"{task}:search")
        for target, only in ((curves, False), (curves_search_only, True)):
            target["evomerge_top"] = rescored_curve(scorer, runs["evomerge"]["events"], budget, fractions, "calc",
                                                    heldout, k, cost, search_only=only, unseen=unseen)
        info["evomerge_top"] = {**info["evomerge"], "rescore_top": k}
    out = {"single": {"curves": curves, "curves_search_only": curves_search_only, "info": info,
                      "events": {m: _compact(r["events"]) for m, r in runs.items()}}}
    if not args.skip_multi:
        out["multi"] = run_multi(scorer, sources, S["multi_objective"], S.get("evomerge", {}), seed, workdir / "multi")
    return out


def _compact(events: list[dict]) -> list[dict]:
    """Events as kept in the partial results (for re-analysis): cost, fitness, kind, recipe."""
    return [{k: e.get(k) for k in ("items", "fitness", "kind", "plan", "seconds")} for e in events]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_seeded_arguments(ap, "search_quality", "settings file configs/experiments/NAME.yaml (default "
                         "search_quality); results go to experiments/results/NAME.json")
    ap.add_argument("--skip-mergenetic", action="store_true")
    ap.add_argument("--skip-multi", action="store_true", help="skip the multi-objective (hypervolume) part")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the PNG from the result JSON")
    ap.add_argument("--reanalyze-multi", action="store_true",
                    help="only add the search-only hypervolume to an existing result, from its work dir's archives")
    ap.add_argument("--reanalyze-top", action="store_true",
                    help="only add evomerge's re-scored pick (settings evomerge.rescore_top) from the work dir's partials")
    args = ap.parse_args()
    S = seeded_settings(args)
    if args.only_seed is not None:          # a child: one seed, partial result
        write_json(args.partial, run_one_seed(args, S, args.only_seed))
        return 0

    out = args.out
    if args.reanalyze_multi:
        reanalyze_multi(args, S, out)
    if args.reanalyze_top:
        reanalyze_top(args, S, out)
    if args.reanalyze_multi or args.reanalyze_top or args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0
    started, machine_start = time.time(), machine_info()
    zoo_paths, sources = zoo(args.zoo)     # built here once, before the children start
    child_args = child_arguments(args) + (["--skip-mergenetic"] if args.skip_mergenetic else []) \
        + (["--skip-multi"] if args.skip_multi else [])
    parts = run_seeds(Path(__file__).resolve(), S["seeds"], args.jobs, child_args, args.workdir)
    seeds = S["seeds"]
    scorer = Scorer(sources)
    task, budget, fractions = S["task"], S["budget_items"], S["fractions"]
    methods = [m for m in parts[seeds[0]]["single"]["curves"]
               if all(parts[s]["single"]["curves"].get(m) for s in seeds)]
    curves = {m: [parts[s]["single"]["curves"][m] for s in seeds] for m in methods}
    curves_so = {m: [parts[s]["single"]["curves_search_only"][m] for s in seeds] for m in methods}
    single = {
        "budget_items": budget, "fractions": fractions, "task": task,
        "search_items": n_items(f"{task}:search"), "heldout_items": n_items(f"{task}:heldout"),
        "heldout": summarize(curves, "heldout"), "search_full": summarize(curves, "search_full"),
        "heldout_search_only": summarize(curves_so, "heldout"),
        "per_seed": {m: {str(s): {"curve": parts[s]["single"]["curves"].get(m),
                                  "curve_search_only": parts[s]["single"]["curves_search_only"].get(m),
                                  **parts[s]["single"]["info"][m]}
                         for s in seeds} for m in parts[seeds[0]]["single"]["info"]},
        "sources_heldout": {n: scorer.accuracy(source_plan(n), f"{task}:heldout") for n in sources},
    }
    single["claims"] = claims(single["heldout"])
    single["claims_search_only"] = claims(single["heldout_search_only"])
    if "evomerge_top" in single["heldout"]:
        single["claims_top"] = claims(single["heldout"], "evomerge_top")
    if unseen_task(S):
        single["unseen_task"], single["unseen_items"] = S["unseen"], len(scorer.task(unseen_task(S)).items)
        single["unseen"] = summarize(curves, "unseen")
        single["sources_unseen"] = {n: scorer.accuracy(source_plan(n), unseen_task(S)) for n in sources}
        single["claims_unseen"] = claims(single["unseen"])
        if "evomerge_top" in single["unseen"]:
            single["claims_top_unseen"] = claims(single["unseen"], "evomerge_top")
    for key, method, judged_on in (("claims", "evomerge", f"{task}:heldout"),
                                   ("claims_top", "evomerge_top", f"{task}:heldout"),
                                   ("claims_unseen", "evomerge", unseen_task(S)),
                                   ("claims_top_unseen", "evomerge_top", unseen_task(S))):
        if key in single:
            add_gaps(scorer, single[key], curves, seeds, method, judged_on)
    for s in seeds:  # the per-seed event logs stay in the work dir's partial files
        parts[s]["single"].pop("events", None)
    multi = None
    if not args.skip_multi:
        M = S["multi_objective"]
        hv = {m: [parts[s]["multi"]["curves"][m] for s in seeds] for m in parts[seeds[0]]["multi"]["curves"]}
        hv_so = {m: [parts[s]["multi"]["curves_search_only"][m] for s in seeds] for m in hv}
        multi = {"budget_items": M["budget_items"], "fractions": M["fractions"], "objectives": M["objectives"],
                 "hypervolume": summarize(hv, "hypervolume"),
                 "hypervolume_search_only": summarize(hv_so, "hypervolume"),
                 "per_seed": {m: {str(s): {"curve": parts[s]["multi"]["curves"][m], **parts[s]["multi"]["info"][m]}
                                  for s in seeds} for m in hv},
                 "sources_heldout": {n: {t: scorer.accuracy(source_plan(n), f"{spec}:heldout")
                                         for t, spec in M["objectives"].items()} for n in sources}}
    result = {"experiment": "search_quality", "command": command_line(), "settings": S,
              "machine_start": machine_start, "machine_end": machine_info(),
              "wall_seconds": time.time() - started, "zoo": str(zoo_paths.root),
              "zoo_fingerprint": zoo_fingerprint(sources), "single_objective": single, "multi_objective": multi}
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"claims": single["claims"], "heldout_final": {m: at(r, 1.0) for m, r in single["heldout"].items()}},
                     indent=1))
    print(f"wrote {out}")
    return 0


def _per_candidate_seconds(run: dict) -> float | None:
    secs = [e.get("seconds") for e in run["events"] if e.get("seconds") is not None and e["kind"] == "search"]
    return float(np.median(secs)) if secs else None


def claims(heldout: dict[str, list[dict]], method: str = "evomerge") -> dict[str, Any]:
    out: dict[str, Any] = {}
    evo, rnd, cma_ = heldout.get(method), heldout.get("random"), heldout.get("cmaes_weights")
    if evo and rnd:
        half, final = at(evo, 0.5), at(rnd, 1.0)
        if half and final and half["mean"] is not None and final["mean"] is not None:
            out["evomerge_half_budget_reaches_random_final"] = {
                "evomerge_at_half": half["mean"], "random_at_full": final["mean"],
                "met": bool(half["mean"] >= final["mean"])}
    if evo and cma_:
        a, b = at(evo, 1.0), at(cma_, 1.0)
        if a and b and a["mean"] is not None and b["mean"] is not None:
            out["evomerge_beats_cmaes_weights_at_equal_budget"] = {
                "evomerge": a["mean"], "cmaes_weights": b["mean"], "met": bool(a["mean"] > b["mean"])}
    return out


def add_gaps(scorer, claims_: dict[str, Any], curves: dict[str, list[list[dict]]], seeds: list[int],
             method: str, judged_on: str) -> None:
    """Beside each claim's two means, the paired gap per seed, item by item (common.paired_gap),
    and whether it is more than two standard errors from zero."""
    def plans(name: str, fraction: float) -> list[dict | None]:
        return [curve_plan(curves[name][i], fraction) for i in range(len(seeds))]

    for claim, other, evomerge_fraction in (("evomerge_half_budget_reaches_random_final", "random", 0.5),
                                            ("evomerge_beats_cmaes_weights_at_equal_budget", "cmaes_weights", 1.0)):
        pairs = list(zip(plans(method, evomerge_fraction), plans(other, 1.0))) if claim in claims_ else []
        if pairs and all(a and b for a, b in pairs):        # a method with no candidate by then has no pick
            gap = paired_gap(scorer, pairs, judged_on)
            claims_[claim]["gap"] = gap
            claims_[claim]["beyond_noise"] = bool(abs(gap["mean"]) > 2 * gap["se"])


def run_multi(scorer, sources, M: dict, evo: dict, seed: int, workdir: Path) -> dict[str, Any]:
    tasks, budget, fractions = M["objectives"], M["budget_items"], M["fractions"]
    genome = evo.get("genome") or {"kind": "parameter", "method": "ties", "granularity": "layer"}
    runs = {}
    print(f"[multi seed {seed}] evomerge", flush=True)
    runs["evomerge"] = run_evomerge(scorer, sources, tasks, {**M["evomerge"], "genome": genome}, budget, seed, workdir)
    print(f"[multi seed {seed}] random", flush=True)
    runs["random"] = run_random(sources, tasks, {**M["random"], "genome": genome}, budget, seed, workdir)
    curves = {m: hv_curve(scorer, r["events"], budget, fractions, tasks) for m, r in runs.items()}
    curves_so = {m: hv_curve(scorer, r["events"], budget, fractions, tasks, search_only=True) for m, r in runs.items()}
    info = {m: {**{k: v for k, v in r.items() if k != "events"}, "evaluations": len(r["events"]),
                "items_spent": sum(e["items"] for e in r["events"])} for m, r in runs.items()}
    return {"curves": curves, "curves_search_only": curves_so, "info": info}


def reanalyze_top(args, S: dict, out: Path) -> None:
    """Add evomerge's re-scored pick (``rescored_curve``) to a finished run's JSON, from the
    event logs its seeds left in the work dir's partial files: no search is re-run."""
    result = json.loads(out.read_text())
    single, k = result["single_objective"], S["evomerge"]["rescore_top"]
    _, sources = zoo(args.zoo)
    scorer = Scorer(sources)
    task, budget, fractions = single["task"], single["budget_items"], single["fractions"]
    cost = n_items(f"{task}:search")
    curves: dict[bool, list] = {False: [], True: []}
    for seed in S["seeds"]:
        events = json.loads((args.workdir / f"partial-seed{seed}.json").read_text())["single"]["events"]["evomerge"]
        for only in curves:
            curves[only].append(rescored_curve(scorer, events, budget, fractions, "calc", f"{task}:heldout", k, cost,
                                               search_only=only))
    single["heldout"]["evomerge_top"] = summarize({"m": curves[False]}, "heldout")["m"]
    single["heldout_search_only"]["evomerge_top"] = summarize({"m": curves[True]}, "heldout")["m"]
    single["per_seed"]["evomerge_top"] = {
        str(seed): {**single["per_seed"]["evomerge"][str(seed)], "curve": c, "curve_search_only": c_so,
                    "rescore_top": k} for seed, c, c_so in zip(S["seeds"], curves[False], curves[True])}
    single["claims_top"] = claims(single["heldout"], "evomerge_top")
    single["evomerge_top_by"] = command_line()
    result["settings"] = {**result["settings"], "evomerge": {**result["settings"]["evomerge"], "rescore_top": k}}
    write_json(out, result)


def reanalyze_multi(args, S: dict, out: Path) -> None:
    """Add the search-only hypervolume to a finished run's JSON, from the archives in its
    work dir (calibration candidates come first, so budget positions shift by their cost)."""
    from common import archive_events

    M = S["multi_objective"]
    tasks, budget, fractions = M["objectives"], M["budget_items"], M["fractions"]
    result = json.loads(out.read_text())
    _, sources = zoo(args.zoo)
    scorer = Scorer(sources)
    curves: dict[str, list] = {"evomerge": [], "random": []}
    for seed in S["seeds"]:
        base = args.workdir / f"seed{seed}" / "multi"
        for method in curves:
            events = [dict(e, kind="search") for e in archive_events(base / f"{method}-seed{seed}", list(tasks))]
            if method == "evomerge":
                calib = result["multi_objective"]["per_seed"]["evomerge"][str(seed)]["calibration"]
                events = [{"items": calib["items_spent"], "fitness": None, "kind": "calibration"}] + events
            curves[method].append(hv_curve(scorer, events, budget, fractions, tasks, search_only=True))
    result["multi_objective"]["hypervolume_search_only"] = summarize(curves, "hypervolume")
    result["multi_objective"]["hypervolume_search_only_by"] = command_line()
    for method, per in curves.items():
        for seed, curve in zip(S["seeds"], per):
            result["multi_objective"]["per_seed"][method][str(seed)]["curve_search_only"] = curve
    write_json(out, result)


def _accuracy_panel(ax, summary: dict[str, list[dict]], sources: dict[str, float], ylabel: str, title: str) -> None:
    """Mean and min-max band over seeds per method, and the best source as a line."""
    for method, rows in summary.items():
        rows = [r for r in rows if r["mean"] is not None]
        ax.plot([r["items"] for r in rows], [r["mean"] for r in rows], marker="o", label=method)
        ax.fill_between([r["items"] for r in rows], [r["min"] for r in rows], [r["max"] for r in rows], alpha=0.15)
    name, best = max(sources.items(), key=lambda kv: kv[1])
    ax.axhline(best, color="gray", ls="--", lw=1, label=f"best source ({name})")
    ax.set_xlabel("budget (scored items)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n(mean, min-max over seeds)")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single, multi = result["single_objective"], result["multi_objective"]
    unseen = single.get("unseen")
    panels = 1 + bool(unseen) + bool(multi)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    _accuracy_panel(ax, single["heldout"], single["sources_heldout"], f"held-out accuracy on {single['task']}",
                    "best-by-search-fitness candidate, held-out")
    for method, rows in single.get("heldout_search_only", {}).items():
        pts = [(r["items"], r["mean"]) for r in rows if r["mean"] is not None]
        if method == "evomerge" and pts:
            ax.plot(*zip(*pts), ls="--", marker="x", label=f"{method}, optimizer's merges only")
    ax.legend(fontsize=8)
    if unseen:
        _accuracy_panel(axes[0][1], unseen, single["sources_unseen"],
                        f"accuracy on the {single['unseen_items']} unseen items",
                        "the same picks on the unseen 2+2-digit items")
        axes[0][1].legend(fontsize=8)
    if multi:
        ax = axes[0][-1]
        for method, rows in multi["hypervolume"].items():
            x = [r["items"] for r in rows]
            ax.errorbar(x, [r["mean"] for r in rows], yerr=[r["std"] or 0 for r in rows], marker="o", capsize=3,
                        label=method)
        rows = (multi.get("hypervolume_search_only") or {}).get("evomerge")
        if rows:
            ax.plot([r["items"] for r in rows], [r["mean"] for r in rows], ls="--", marker="x",
                    label="evomerge, optimizer's merges only")
        ax.set_xlabel("budget (scored items)")
        ax.set_ylabel("hypervolume of the front, held-out scores")
        ax.set_title(" + ".join(multi["objectives"]) + " (mean, std over seeds)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
