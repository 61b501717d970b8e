"""Where do the methods' final picks differ? Held-out `calc` accuracy of each method's final
pick by item level (1: 1+1 digits, 2: 2+1, 3: 2+2), beside the 1691 unseen 2+2-digit items
(experiments/unseen_items.py), mean over the seeds of a search_quality result.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/picks_by_level.py RESULT.json [RESULT.json ...]

RESULT: experiments/results/search_quality*.json, or a run with --seeds/--out (docs/search-notes.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from common import ROOT, Scorer, one_thread, zoo  # noqa: E402

UNSEEN = str(ROOT / "experiments" / "data" / "calc-unseen.yaml")


def main() -> int:
    one_thread()
    _, sources = zoo(None)
    scorer = Scorer(sources)
    levels = np.array([item.meta["level"] for item in scorer.task("zoo/calc:heldout").items])
    for path in sys.argv[1:]:
        per_seed = json.loads(Path(path).read_text())["single_objective"]["per_seed"]
        print(path)
        for method, seeds in per_seed.items():
            plans = [v["curve"][-1]["plan"] for v in seeds.values()]
            held = np.array([scorer.scores(p, "zoo/calc:heldout") for p in plans])
            unseen = np.mean([scorer.accuracy(p, UNSEEN) for p in plans])
            cells = " ".join(f"level {lv} ({int((levels == lv).sum())} items): {held[:, levels == lv].mean():.3f}"
                             for lv in (1, 2, 3))
            print(f"  {method:14s} {cells} | unseen level 3 ({len(scorer.task(UNSEEN).items)} items): {unseen:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
