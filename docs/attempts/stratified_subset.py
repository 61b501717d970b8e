"""Does a subset stratified by level (proportional allocation) make a better 10% estimate
than the plain random subset? The estimator-fidelity searches (configs/experiments/
estimator_fidelity.yaml) on the sweep seeds 10-19, once per subset kind, judged on the
composite rebuilt level by level (experiments/level_composite.py) against the same
searches' full-evaluation runs (same score on every item, and exact match).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/stratified_subset.py run plain 10,11,12,13,14,15,16,17,18,19
    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/stratified_subset.py run strat 10,11,12,13,14,15,16,17,18,19
    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/stratified_subset.py compare 10,11,12,13,14,15,16,17,18,19

(the two runs take about 9 minutes each here and can run side by side). Not adopted: see
docs/search-notes.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import estimator_fidelity as EF  # noqa: E402
import level_composite as LC  # noqa: E402
from common import Scorer, load_settings, one_thread, zoo  # noqa: E402

import evomerge.workers.evaluator as EV  # noqa: E402

WORK = Path("/tmp/evomerge-experiments/stratified_subset")
PLAIN = EV.subset_indices


def stratified(n_items: int, size: float, seed: int) -> np.ndarray:
    """As ``subset_indices``, but each level gets its share of the k items (largest remainder)."""
    from evomerge.tasks.task import load_task

    levels = np.array([item.meta["level"] for item in load_task("zoo/calc:search").items])
    if n_items != len(levels):
        return PLAIN(n_items, size, seed)
    k = max(1, min(n_items, round(size * n_items) if size < 1 else int(size)))
    rng = np.random.default_rng([int(seed), 0x5B5E7])
    labels = sorted(set(levels))
    share = np.array([(levels == lv).sum() for lv in labels]) * k / n_items
    alloc = np.floor(share).astype(int)
    for i in np.argsort(-(share - alloc))[: k - alloc.sum()]:
        alloc[i] += 1
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(levels == lv), a, replace=False)
                                   for lv, a in zip(labels, alloc)]))


def run(kind: str, seeds: list[int]) -> None:
    if kind == "strat":
        EV.subset_indices = stratified          # prepare_objective reads the module's function
    S = load_settings("estimator_fidelity", False)
    _, sources = zoo(None)
    scorer = Scorer(sources)
    plans = {s: EF.one_seed(scorer, sources, S, s, WORK / kind)["plans"] for s in seeds}
    (WORK / f"{kind}.json").write_text(json.dumps(plans))


def compare() -> None:
    _, sources = zoo(None)
    scorer = Scorer(sources)
    weights = LC.level_weights(scorer)
    plain, strat = (json.loads((WORK / f"{k}.json").read_text()) for k in ("plain", "strat"))
    seeds = list(plain)
    rows = [(f"{name} {pick} vs {ref}", [(runs[s][pick], runs[s][ref]) for s in seeds])
            for ref in ("graded_full_search", "full_search") for name, runs in (("plain", plain), ("strat", strat))
            for pick in ("estimate_search", "top")]
    rows.append(("strat minus plain", [(strat[s]["estimate_search"], plain[s]["estimate_search"]) for s in seeds]))
    for label, pairs in rows:
        g = LC.composite_gap(scorer, pairs, weights)
        print(f"{label:46s} {g['mean']:+.4f} ± {g['se']:.4f} (+{g['ahead']} -{g['behind']}) per level "
              + " / ".join(f"{v:+.3f}" for v in g["per_level"].values()), flush=True)


if __name__ == "__main__":
    one_thread()
    WORK.mkdir(parents=True, exist_ok=True)
    if sys.argv[1] == "run":
        run(sys.argv[2], [int(x) for x in sys.argv[3].split(",")])
    else:
        compare()
