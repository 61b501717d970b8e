"""Where each method's final picks stand on the graded proxy and on exact match
(docs/search-notes.md: why CMA-ES wins at 12000 items).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/picks_on_proxy.py RESULT_JSON

RESULT_JSON: a search_quality.py result, e.g. the 6-seed 12000-item run
(`experiments/search_quality.py --jobs 2 --settings search_quality_large --skip-multi
--seeds 0,1,2,3,4,5 --out /tmp/sq_large6.json`). Printed per method, mean over seeds: the
likelihood and the exact accuracy of its final pick on all 200 search items, and held-out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from common import Scorer, one_thread, zoo  # noqa: E402


def main() -> int:
    one_thread()
    result = json.loads(Path(sys.argv[1]).read_text())
    _, sources = zoo(None)
    scorer = Scorer(sources)
    per_seed = result["single_objective"]["per_seed"]
    for method in ("cmaes_weights", "evomerge", "evomerge_top", "random"):
        picks = [seed["curve"][-1]["plan"] for seed in per_seed.get(method, {}).values() if seed.get("curve")]
        if not picks:
            continue
        graded = np.mean([scorer.graded(p, "zoo/calc:search").mean() for p in picks])
        exact = np.mean([scorer.accuracy(p, "zoo/calc:search") for p in picks])
        heldout = np.mean([scorer.accuracy(p, "zoo/calc:heldout") for p in picks])
        print(f"{method:14s} likelihood (search) {graded:.3f}  exact (search) {exact:.3f}  held-out {heldout:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
