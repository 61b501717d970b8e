"""How should evomerge re-score its top candidates to pick its result? The top k by estimate
of evomerge's searches on the sweep seeds (none of the README's runs), re-scored on every
search item by exact match (what `evomerge demo` and the experiments' "top 3 re-scored" do)
or by the likelihood of the reference (the search's own graded score, on all items instead
of its subset); each rule's pick judged on the held-out items and on the 1691 unseen items.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/rescoring_pick.py

Runs read: the partial results of `search_quality.py --seeds 10,11,12 --skip-multi
--skip-mergenetic` at both budgets (work dirs /tmp/evomerge-experiments/sq-sweepseeds and
sql-sweepseeds, docs/search-notes.md) and the archives of `optimizer_sweep.py
'{"g_de16_30": {...}}' 12000 13,14,15,16,17,18` (sweep/g_de16_30-12000).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from common import UNSEEN_TASK as UNSEEN, Scorer, archive_events, one_thread, zoo  # noqa: E402

WORK = Path("/tmp/evomerge-experiments")
KS = (3, 5, 10)


def runs() -> dict[str, list[list[dict]]]:
    """Per budget, per seed: evomerge's scored candidates (plan, fitness)."""
    out: dict[str, list[list[dict]]] = {"3000": [], "12000": []}
    for budget, folder in (("3000", "sq-sweepseeds"), ("12000", "sql-sweepseeds")):
        for part in sorted((WORK / folder).glob("partial-seed*.json")):
            out[budget].append(json.loads(part.read_text())["single"]["events"]["evomerge"])
    for seed_dir in sorted((WORK / "sweep" / "g_de16_30-12000").glob("s*")):
        out["12000"].append(archive_events(next(seed_dir.glob("evomerge-seed*")), ["calc"]))
    return out


def main() -> int:
    one_thread()
    _, sources = zoo(None)
    scorer = Scorer(sources)
    for budget, seeds in runs().items():
        for k in KS:
            picks = {"exact": [], "likelihood": []}
            for events in seeds:
                scored = [e for e in events if e["fitness"] and e["fitness"].get("calc") is not None]
                top = sorted(scored, key=lambda e: -e["fitness"]["calc"])[:k]
                picks["exact"].append(max(top, key=lambda e: scorer.accuracy(e["plan"], "zoo/calc:search"))["plan"])
                picks["likelihood"].append(
                    max(top, key=lambda e: scorer.graded(e["plan"], "zoo/calc:search").mean())["plan"])
            cells = []
            for judged_on in ("zoo/calc:heldout", UNSEEN):
                a = np.array([scorer.accuracy(p, judged_on) for p in picks["likelihood"]])
                b = np.array([scorer.accuracy(p, judged_on) for p in picks["exact"]])
                d = a - b
                cells.append(f"{'held-out' if 'heldout' in judged_on else 'unseen'}: exact {b.mean():.3f} "
                             f"likelihood {a.mean():.3f} (gap {d.mean():+.4f} ± {d.std(ddof=1) / len(d) ** 0.5:.4f}, "
                             f"+{(d > 0).sum()} -{(d < 0).sum()})")
            print(f"budget {budget}, {len(seeds)} seeds, top {k:2d} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
