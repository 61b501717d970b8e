"""Is there a graded score closer to exact match than the likelihood? Tried for the notes
(docs/search-notes.md): a per-token margin score, prod_t sigmoid((logit_gold - best other
logit) / tau), which tends to teacher-forced exact match as tau -> 0.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/margin_proxy.py [N_RANDOM_MERGES]

The 4 zoo sources + N random merges of the demo's space (seed 0), zoo/calc search items.
Printed per score: Spearman of the 200-item mean against held-out exact accuracy over all
models and over the better ones (held-out >= 0.25), the same for 20-item means (200 draws),
and the held-out accuracy of the model the score ranks first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import one_thread  # noqa: E402
from graded_vs_exact import sources_and_random_merges  # noqa: E402


def token_margins(backend, rows) -> list[np.ndarray]:
    """Per reference token: its logit minus the best other token's logit (teacher-forced)."""
    out, pad = [], backend.tokenizer.pad_token_id
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            part = rows[start:start + 64]
            seqs = [c + t for c, t in part]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            logits = backend.model(input_ids=ids, attention_mask=mask).logits.float()
            for r, (ctx, cont) in enumerate(part):
                steps = torch.arange(len(cont))
                lg = logits[r, torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)].clone()
                gold = lg[steps, torch.tensor(cont)].clone()
                lg[steps, torch.tensor(cont)] = -1e9
                out.append((gold - lg.max(-1).values).numpy())
    return out


def main() -> int:
    one_thread()
    from evomerge.backends.base import likelihood_rows
    from evomerge.search.genome import merge_plan, plan_from_dict, plan_output_config

    scorer, plans = sources_and_random_merges(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
    backend, task = scorer.backend, scorer.task("zoo/calc:search")
    rows, _ = likelihood_rows(task, range(len(task.items)), backend._encode, backend.tokenizer.eos_token_id)
    margins, graded, exact, heldout = [], [], [], []
    for plan in plans:
        parsed = plan_from_dict(plan)
        backend.load_weights(merge_plan(parsed, scorer.sources), plan_output_config(parsed, scorer.sources))
        margins.append(token_margins(backend, rows))
        graded.append(scorer.graded(plan, "zoo/calc:search"))
        exact.append(scorer.scores(plan, "zoo/calc:search"))
        heldout.append(scorer.accuracy(plan, "zoo/calc:heldout"))
    heldout, good = np.array(heldout), np.array(heldout) >= 0.25

    def margin_score(tau: float) -> np.ndarray:
        if tau == 0:
            return np.array([[float(np.all(m > 0)) for m in ms] for ms in margins])
        return np.array([[float(np.prod(1 / (1 + np.exp(-m / tau)))) for m in ms] for ms in margins])

    draw = np.random.default_rng(1)
    draws = [draw.choice(200, 20, replace=False) for _ in range(200)]
    scores = [("exact", np.array(exact)), ("likelihood", np.array(graded))]
    scores += [(f"margin tau={t}", margin_score(t)) for t in (0, 0.5, 1, 2, 4)]
    print(f"{len(plans)} models, {good.sum()} with held-out >= 0.25")
    for name, s in scores:
        rho_all = spearmanr(s.mean(1), heldout).statistic
        rho_good = spearmanr(s[good].mean(1), heldout[good]).statistic
        rho_20 = np.nanmean([spearmanr(s[good][:, i].mean(1), heldout[good]).statistic for i in draws])
        print(f"{name:16s} all {rho_all:.3f}  better ones: 200 items {rho_good:.3f}, 20 items {rho_20:.3f}"
              f" | ranked first: held-out {heldout[np.argmax(s.mean(1))]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
