"""Which per-item score picks the merges that generalize? Candidates of evomerge's 12000-item
search on the sweep seeds 10-12 (ng_de, population 16, likelihood on a 30% subset; the search is
run first if its work dir is missing), each scored on every search item by: the likelihood of
the reference (P, the search's score), teacher-forced exact match (every reference token is
the argmax: what greedy decoding reproduces), their mean, and greedy exact match. Per score,
the candidate it ranks first on 100 random 60-item subsets (and on all 200 items) per seed,
judged on the held-out items and on the 1691 unseen items (experiments/unseen_items.py).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/proxy_picks.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import search_quality as SQ  # noqa: E402
from common import UNSEEN_TASK as UNSEEN, Scorer, one_thread, zoo  # noqa: E402
from optimizer_sweep import BASE  # noqa: E402

SETTINGS = {"optimizer": "ng_de", "population": 16, "anchor_frac": 0.3, "estimator": "subset", "scoring": "likelihood"}


def teacher_forced(backend, rows) -> tuple[np.ndarray, np.ndarray]:
    """Per row: P(reference), and whether every reference token is the argmax."""
    probs, argmax_ok, pad = [], [], backend.tokenizer.pad_token_id
    with torch.inference_mode():
        for start in range(0, len(rows), 100):
            part = rows[start:start + 100]
            width = max(len(c) + len(t) for c, t in part)
            ids = torch.tensor([c + t + [pad] * (width - len(c) - len(t)) for c, t in part])
            mask = torch.tensor([[1] * (len(c) + len(t)) + [0] * (width - len(c) - len(t)) for c, t in part])
            logits = backend.model(input_ids=ids, attention_mask=mask).logits.float()
            for r, (ctx, cont) in enumerate(part):
                step = logits[r, len(ctx) - 1: len(ctx) + len(cont) - 1]
                gold = torch.tensor(cont)
                probs.append(float(torch.log_softmax(step, -1)[torch.arange(len(cont)), gold].sum().exp()))
                argmax_ok.append(float(bool((step.argmax(-1) == gold).all())))
    return np.array(probs), np.array(argmax_ok)


def main() -> int:
    one_thread()
    from evomerge.backends.base import likelihood_rows
    from evomerge.search.genome import merge_plan, plan_from_dict, plan_output_config

    _, sources = zoo(None)
    scorer = Scorer(sources)
    backend, task = scorer.backend, scorer.task("zoo/calc:search")
    rows, _ = likelihood_rows(task, range(len(task.items)), backend._encode, backend.tokenizer.eos_token_id)
    by_seed = {}
    for seed in (10, 11, 12):
        run = SQ.run_evomerge(scorer, sources, {"calc": "zoo/calc"}, {**BASE, **SETTINGS}, 12000, seed,
                              Path(f"/tmp/evomerge-experiments/sweep/g_de16_30pct-12000/s{seed}"))
        plans = [e["plan"] for e in run["events"] if e.get("plan") and e["fitness"] is not None]
        p_scores, tf_scores = [], []
        for plan in plans:
            parsed = plan_from_dict(plan)
            backend.load_weights(merge_plan(parsed, scorer.sources), plan_output_config(parsed, scorer.sources))
            p, tf = teacher_forced(backend, rows)
            p_scores.append(p)
            tf_scores.append(tf)
        p_scores, tf_scores = np.array(p_scores), np.array(tf_scores)
        exact = np.array([scorer.scores(plan, "zoo/calc:search") for plan in plans])
        by_seed[seed] = (plans, {"likelihood P": p_scores, "teacher-forced exact": tf_scores,
                                 "(P + teacher-forced) / 2": (p_scores + tf_scores) / 2, "greedy exact": exact})
        print(f"seed {seed}: {len(plans)} candidates scored", flush=True)
    rng = np.random.default_rng(0)
    draws = [rng.choice(200, 60, replace=False) for _ in range(100)]
    for name in by_seed[10][1]:
        for label, subsets in (("60 items", draws), ("200 items", [np.arange(200)])):
            picked = [plans[int(np.argmax(scores[name][:, d].mean(1)))]
                      for plans, scores in by_seed.values() for d in subsets]
            held = np.mean([scorer.accuracy(p, "zoo/calc:heldout") for p in picked])
            unseen = np.mean([scorer.accuracy(p, UNSEEN) for p in picked])
            print(f"{name:26s} picked on {label:9s}: held-out {held:.3f}  unseen {unseen:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
