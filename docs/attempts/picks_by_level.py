"""Where do the methods' final picks differ? `calc` accuracy of each method's final pick by item
level (1: 1+1 digits, 2: 2+1, 3: 2+2) on the held-out and on the search items (the latter
favour the methods that chose their pick by exact score on them), beside the 1691 unseen
2+2-digit items (experiments/unseen_items.py), mean over the seeds of a search_quality result.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/picks_by_level.py RESULT.json [RESULT.json ...]

RESULT: experiments/results/search_quality*.json, or a run with --seeds/--out (docs/search-notes.md);
or experiments/results/estimator_fidelity.json, whose picks are the estimator search's, its top 3
re-scored, and the full-evaluation search's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from common import UNSEEN_TASK as UNSEEN, Scorer, one_thread, zoo  # noqa: E402



def _final_picks(result: dict) -> dict[str, list[dict]]:
    """Per method, its final pick in every seed."""
    if result.get("experiment") == "estimator_fidelity":
        per_seed = result["per_seed"].values()
        return {pick: [r["plans"][pick] for r in per_seed] for pick in ("estimate_search", "top", "full_search")}
    return {method: [v["curve"][-1]["plan"] for v in seeds.values()]
            for method, seeds in result["single_objective"]["per_seed"].items()}


def main() -> int:
    one_thread()
    _, sources = zoo(None)
    scorer = Scorer(sources)
    for path in sys.argv[1:]:
        result = json.loads(Path(path).read_text())
        print(path)
        for method, plans in _final_picks(result).items():
            cells = []
            for split in ("heldout", "search"):
                levels = np.array([item.meta["level"] for item in scorer.task(f"zoo/calc:{split}").items])
                acc = np.array([scorer.scores(p, f"zoo/calc:{split}") for p in plans])
                cells.append(f"{split}: " + " ".join(f"L{lv} ({int((levels == lv).sum())}) {acc[:, levels == lv].mean():.3f}"
                                                     for lv in (1, 2, 3)))
            unseen = np.mean([scorer.accuracy(p, UNSEEN) for p in plans])
            print(f"  {method:14s} {' | '.join(cells)} | unseen L3 ({len(scorer.task(UNSEEN).items)}) {unseen:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
