"""A pick with less winner's curse and no extra items: instead of the single highest
estimate, the centroid (in genome space) of the top m candidates by estimate, decoded to a
merge. On the estimator-fidelity searches of seeds 0-9 (the README's run, work dir
/tmp/evomerge-experiments/estimator_fidelity) and 10-19 (docs/attempts/stratified_subset.py
run plain), judged on the composite rebuilt level by level (experiments/level_composite.py)
against each seed's full-evaluation searches.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/centroid_pick.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import level_composite as LC  # noqa: E402
from common import RESULTS, Scorer, archive_events, load_settings, one_thread, zoo  # noqa: E402

WORK = Path("/tmp/evomerge-experiments")
RUNS = {"0-9": (WORK / "estimator_fidelity", json.loads((RESULTS / "estimator_fidelity.json").read_text())["per_seed"]),
        "10-19": (WORK / "stratified_subset" / "plain", None)}


def main() -> int:
    from evomerge.search.genome import build_space

    one_thread()
    S = load_settings("estimator_fidelity", False)
    _, sources = zoo(None)
    scorer = Scorer(sources)
    weights = LC.level_weights(scorer)
    layers = int(json.loads((Path(sources["base"]) / "config.json").read_text())["num_hidden_layers"])
    space = build_space(S["genome"], [n for n in sources if n != "base"], "base", layers)
    for label, (work, per_seed) in RUNS.items():
        plans = per_seed and {s: r["plans"] for s, r in per_seed.items()}
        plans = plans or json.loads((WORK / "stratified_subset" / "plain.json").read_text())
        for m in (1, 3, 5, 8):
            picks = []
            for seed in plans:
                events = [e for e in archive_events(work / f"estimator-seed{seed}", ["calc"]) if e["fitness"]]
                top = sorted(events, key=lambda e: -e["fitness"]["calc"])[:m]
                centroid = np.mean([np.asarray(e["genome"], float) for e in top], axis=0)
                picks.append(space.decode(centroid).to_dict())
            for ref in ("graded_full_search", "full_search"):
                g = LC.composite_gap(scorer, [(p, plans[s][ref]) for p, s in zip(picks, plans)], weights)
                print(f"seeds {label}, centroid of top {m}: vs {ref:18s} {g['mean']:+.4f} ± {g['se']:.4f} "
                      f"(+{g['ahead']} -{g['behind']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
