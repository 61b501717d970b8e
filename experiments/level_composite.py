"""The claims re-judged on the composite task rebuilt from larger item sets, level by level.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/level_composite.py [--zoo DIR --results DIR]

The composite task's 100 held-out items (20 of 1+1 digits, 40 of 2+1, 40 of 2+2) give a
seed's score a standard error of 0.05. Here each level is judged on the largest set the
zoo allows instead (experiments/unseen_items.py): the 2+2-digit level on the 1691 items no
model was trained on (calc-unseen), the 1+1- and 2+1-digit levels on the 721 items outside
the splits no model was taught end to end (calc-untaught: their halves were taught, so they
are not unseen). The levels are weighted as the held-out split weights them.

Reads the picks (plans) stored in experiments/results/search_quality.json,
search_quality_large.json and estimator_fidelity.json; scores nothing but them. The picks of
search_quality_wide.json and estimator_fidelity_wide.json, whose searches ran on half of these
sets (calc-wide), are judged on the other half only, level by level with the same weights. Writes
experiments/results/level_composite.json. Per claim: each side's composite score and the
paired gap, its standard error resampling seeds (jointly over the levels) and items (within
each level), and the gap per level.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, Scorer, bootstrap_gap, command_line, curve_plan, level_sets,  # noqa: E402
                    machine_info, one_thread, wide_task, write_json, zoo, zoo_fingerprint)

HELDOUT = "zoo/calc:heldout"


def level_tasks(zoo_dir: str | Path | None) -> dict[int, str]:
    """Each level's item set: levels 1 and 2 on calc-untaught, level 3 on calc-unseen."""
    unseen, untaught = level_sets(zoo_dir)
    return {1: untaught, 2: untaught, 3: unseen}


LEVEL_TASKS = level_tasks(None)     # the default zoo's, shipped in experiments/data


def level_weights(scorer: Scorer) -> dict[int, float]:
    levels = [item.meta["level"] for item in scorer.task(HELDOUT).items]
    return {lv: levels.count(lv) / len(levels) for lv in sorted(set(levels))}


def level_scores(scorer: Scorer, plan: dict, tasks: dict[int, str] = LEVEL_TASKS) -> dict[int, np.ndarray]:
    """The plan's 0/1 item scores per level, each on its level's set."""
    out = {}
    for level, task in tasks.items():
        mask = np.array([item.meta["level"] == level for item in scorer.task(task).items])
        out[level] = scorer.scores(plan, task)[mask]
    return out


def composite_score(scorer: Scorer, plan: dict, weights: dict[int, float],
                    tasks: dict[int, str] = LEVEL_TASKS) -> float:
    """One plan's score on the level-weighted composite."""
    per_level = level_scores(scorer, plan, tasks)
    return float(sum(w * per_level[lv].mean() for lv, w in weights.items()))


def composite_gap(scorer: Scorer, pairs: list[tuple[dict, dict]], weights: dict[int, float],
                  draws: int = 2000, tasks: dict[int, str] = LEVEL_TASKS) -> dict[str, Any]:
    """Pick a minus pick b (one pair per seed) on the level-weighted composite."""
    a = [level_scores(scorer, pa, tasks) for pa, _ in pairs]
    b = [level_scores(scorer, pb, tasks) for _, pb in pairs]
    diff = {lv: np.array([sa[lv] - sb[lv] for sa, sb in zip(a, b)]) for lv in weights}   # seeds x items

    def composite(scores: list[dict[int, np.ndarray]]) -> float:
        return float(np.mean([sum(w * s[lv].mean() for lv, w in weights.items()) for s in scores]))

    return {"a": composite(a), "b": composite(b), **bootstrap_gap(diff, weights, draws),
            "per_level": {str(lv): float(diff[lv].mean()) for lv in weights}}


def search_quality_pairs(result: dict) -> dict[str, list[tuple[dict, dict]]]:
    per = result["single_objective"]["per_seed"]
    out = {}
    for method in ("evomerge", "evomerge_top"):
        if method not in per:
            continue
        for claim, other, fraction in (("half_budget_vs_random_final", "random", 0.5),
                                       ("vs_cmaes_weights_equal_budget", "cmaes_weights", 1.0),
                                       ("vs_mergenetic_equal_budget", "mergenetic", 1.0)):
            if other not in per or any(not per[other][s].get("curve") for s in per[method]):
                continue
            pairs = [(curve_plan(per[method][s]["curve"], fraction), curve_plan(per[other][s]["curve"], 1.0))
                     for s in per[method]]
            if all(a and b for a, b in pairs):
                out[f"{method}:{claim}"] = pairs
    return out


def fidelity_pairs(result: dict) -> dict[str, list[tuple[dict, dict]]]:
    rows = list(result["per_seed"].values())
    out = {}
    for name, a, b in (("estimator_vs_full_exact", "estimate_search", "full_search"),
                       ("top_vs_full_exact", "top", "full_search"),
                       ("estimator_vs_full_same_score", "estimate_search", "graded_full_search"),
                       ("top_vs_full_same_score", "top", "graded_full_search")):
        pairs = [(r.get("plans", {}).get(a), r.get("plans", {}).get(b)) for r in rows]
        if all(x and y for x, y in pairs):
            out[name] = pairs
    return out


def main() -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None, help="the zoo the result files were measured on")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the result files are, and this one goes")
    args = ap.parse_args()
    one_thread()
    started, machine_start = time.time(), machine_info()
    zoo_paths, sources = zoo(args.zoo)
    scorer = Scorer(sources)
    weights = level_weights(scorer)
    tasks = level_tasks(args.zoo)
    sets = {str(lv): {"task": Path(task).name, "items": int(sum(item.meta["level"] == lv
                                                                for item in scorer.task(task).items))}
            for lv, task in tasks.items()}
    wide_heldout = {lv: f"{wide_task(args.zoo)}:heldout" for lv in tasks}     # every level on the other half
    experiments: dict[str, Any] = {}
    for name, pairs_of, judged_on in (
            ("search_quality", search_quality_pairs, tasks), ("search_quality_large", search_quality_pairs, tasks),
            ("estimator_fidelity", fidelity_pairs, tasks),
            ("search_quality_wide", search_quality_pairs, wide_heldout),
            ("estimator_fidelity_wide", fidelity_pairs, wide_heldout)):
        path = args.results / f"{name}.json"
        if not path.exists():
            continue
        claims = {claim: composite_gap(scorer, pairs, weights, tasks=judged_on)
                  for claim, pairs in pairs_of(json.loads(path.read_text())).items()}
        experiments[name] = {"seeds": next(iter(claims.values()))["seeds"] if claims else 0, "claims": claims,
                             "judged_on": sorted({Path(t).name for t in judged_on.values()})}
        print(name, {c: f"{g['mean']:+.4f} ± {g['se']:.4f}" for c, g in claims.items()}, flush=True)
    result = {"experiment": "level_composite", "command": command_line(), "machine_start": machine_start,
              "machine_end": machine_info(), "wall_seconds": time.time() - started, "zoo": str(zoo_paths.root),
              "zoo_fingerprint": zoo_fingerprint(sources), "level_weights": {str(k): v for k, v in weights.items()},
              "level_sets": sets, "experiments": experiments}
    out = write_json(args.results / "level_composite.json", result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
