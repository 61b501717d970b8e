"""Tried: pick the candidate a Gaussian process over the genomes ranks first (posterior mean at
the evaluated points), instead of the highest raw estimate: it pools neighbouring candidates'
estimates, so one lucky subset score should weigh less. Judged on the 1691 unseen items.

Needs the event logs of: search_quality.py --seeds 10,11,12 --skip-multi --skip-mergenetic
--workdir /tmp/evomerge-experiments/sq-sweepseeds (and the same with --settings
search_quality_large --workdir /tmp/evomerge-experiments/sql-sweepseeds), and
estimator_fidelity.py --seeds 0,...,8 --workdir /tmp/evomerge-experiments/ef9 (seeds 3-8 used).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/smoothed_pick.py

Judged again later on the composite rebuilt level by level (experiments/level_composite.py),
on every search of the estimator-fidelity runs (seeds 0-9 from `experiments/estimator_fidelity.py
--jobs 2`, seeds 10-19 from `docs/attempts/stratified_subset.py run plain ...`) and on
evomerge's searches of the search-quality runs (both budgets, seeds 0-9, at half and at the
full budget):

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/smoothed_pick.py composite
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from common import UNSEEN_TASK as UNSEEN, Scorer, archive_events, one_thread, zoo  # noqa: E402

EXPERIMENTS = Path("/tmp/evomerge-experiments")


def features(plan: dict) -> np.ndarray:
    """TIES normalizes the weights, so their scale is not a feature."""
    weights = np.array([m["parameters"]["weight"] for m in plan["models"]])
    densities = np.array([m["parameters"]["density"] for m in plan["models"]])
    return np.concatenate([weights / max(weights.sum(), 1e-9), densities])


def smoothed_pick(events: list[dict]) -> dict:
    x = np.array([features(e["plan"]) for e in events])
    y = np.array([e["fitness"]["calc"] for e in events])
    kernel = ConstantKernel(1.0) * RBF(0.3, (0.02, 5)) + WhiteKernel(0.5)
    gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(x, y)
    return events[int(np.argmax(gp.predict(x)))]


def main() -> int:
    warnings.filterwarnings("ignore")     # the GP's convergence warnings
    one_thread()
    _, sources = zoo(None)
    scorer = Scorer(sources)
    runs = []
    for seed in (10, 11, 12):
        for workdir, budget in (("sq-sweepseeds", 3000), ("sql-sweepseeds", 12000)):
            events = json.loads((EXPERIMENTS / workdir / f"partial-seed{seed}.json").read_text())["single"]["events"]
            runs.append((f"search {budget}, seed {seed}", events["evomerge"]))
    for seed in range(3, 9):
        runs.append((f"fidelity, seed {seed}", archive_events(EXPERIMENTS / "ef9" / f"estimator-seed{seed}", ["calc"])))
    gaps = []
    for name, events in runs:
        events = [e for e in events if e["fitness"] is not None]
        raw = max(events, key=lambda e: e["fitness"]["calc"])
        smooth = smoothed_pick(events)
        unseen = [scorer.accuracy(p["plan"], UNSEEN) for p in (raw, smooth)]
        held = [scorer.accuracy(p["plan"], "zoo/calc:heldout") for p in (raw, smooth)]
        gaps.append((unseen[1] - unseen[0], held[1] - held[0]))
        print(f"{name:22s} unseen: raw {unseen[0]:.3f} smoothed {unseen[1]:.3f} | "
              f"held-out: raw {held[0]:.2f} smoothed {held[1]:.2f}", flush=True)
    gaps = np.array(gaps)
    print(f"smoothed - raw: unseen {gaps[:, 0].mean():+.4f} ± {gaps[:, 0].std(ddof=1) / len(gaps) ** 0.5:.4f}, "
          f"held-out {gaps[:, 1].mean():+.4f}")
    return 0


def composite() -> int:
    """The smoothed pick minus the highest estimate, on the level-weighted composite."""
    import level_composite as LC

    warnings.filterwarnings("ignore")
    one_thread()
    _, sources = zoo(None)
    scorer = Scorer(sources)
    weights = LC.level_weights(scorer)

    def truth(plan: dict) -> float:
        return LC.composite_score(scorer, plan, weights)

    def line(label: str, runs: list[list[dict]]) -> None:
        pairs = []
        for events in runs:
            events = [e for e in events if e["fitness"] is not None]
            raw = max(events, key=lambda e: e["fitness"]["calc"])
            pairs.append((truth(raw["plan"]), truth(smoothed_pick(events)["plan"])))
        p = np.array(pairs)
        d = p[:, 1] - p[:, 0]
        print(f"{label:40s} highest {p[:, 0].mean():.4f} smoothed {p[:, 1].mean():.4f} difference "
              f"{d.mean():+.4f} ± {d.std(ddof=1) / len(d) ** 0.5:.4f} (ahead {(d > 0).sum()}, behind {(d < 0).sum()})",
              flush=True)

    for workdir, seeds in (("estimator_fidelity", range(10)), ("stratified_subset/plain", range(10, 20))):
        for search in ("estimator", "graded-full", "full"):
            line(f"fidelity, {search} search, seeds {seeds[0]}-{seeds[-1]}",
                 [archive_events(EXPERIMENTS / workdir / f"{search}-seed{s}", ["calc"]) for s in seeds])
    for workdir, budget in (("search_quality", 3000), ("search_quality_large", 12000)):
        for fraction in (0.5, 1.0):
            runs = []
            for seed in range(10):
                events = json.loads((EXPERIMENTS / workdir / f"partial-seed{seed}.json").read_text())
                spent, paid = 0, []
                for e in events["single"]["events"]["evomerge"]:
                    spent += e["items"]
                    if spent > fraction * budget:
                        break
                    paid.append(e)
                runs.append(paid)
            line(f"search quality {budget}, at {fraction:g} of it", runs)
    return 0


if __name__ == "__main__":
    sys.exit(composite() if sys.argv[1:] == ["composite"] else main())
