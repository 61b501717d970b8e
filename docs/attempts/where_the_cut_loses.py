"""Where does the estimator's 10x item cut lose against the same search with the same score on
every item: in the search's path (which candidates it evaluates) or in its final pick (which
of them it calls best)? And would another 20-item statistic pick better?

Every candidate of the estimator-fidelity searches (configs/experiments/estimator_fidelity.yaml)
is re-scored: its log-likelihood and token count on all 200 search items, its exact scores on
them, and its score on the composite rebuilt level by level (experiments/level_composite.py),
the truth below. Then, per seed, the truth of:
- the estimator search's own pick (highest likelihood on its 20 items);
- the best candidate that search evaluated, and the one the likelihood on all 200 items picks;
- the picks of the full-evaluation searches (the same score on every item; exact match);
and, averaged over seeds, how other statistics of the same 20 items rank and pick.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/where_the_cut_loses.py collect RUNS SEARCH SEEDS OUT.pkl
    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/where_the_cut_loses.py report RESULT.json OUT.pkl [OUT.pkl ...]
    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/where_the_cut_loses.py reallocate SEEDS

RUNS holds the searches' run folders (SEARCH-seedN, SEARCH one of estimator, graded-full,
full; the report reads the estimator searches' collections), RESULT.json their picks: for seeds 0-9
/tmp/evomerge-experiments/estimator_fidelity and experiments/results/estimator_fidelity.json
(from `.venv/bin/python experiments/estimator_fidelity.py --jobs 2`); for seeds 10-19 those of
`docs/attempts/stratified_subset.py run plain ...` (its plain.json). Collecting takes about
one minute a seed here; split the seeds over two processes. ``reallocate`` runs the search
with 14 items a candidate and re-scores its top 3 on 96 more (the same items in all), about
20 seconds a seed.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import level_composite as LC  # noqa: E402
from common import Scorer, archive_events, one_thread, zoo  # noqa: E402

SEARCH = "zoo/calc:search"


def collect(runs: Path, search: str, seeds: list[int], out: Path) -> None:
    import torch

    from evomerge.backends.base import likelihood_rows
    from evomerge.search.genome import merge_plan, plan_from_dict, plan_output_config

    _, sources = zoo(None)
    scorer = Scorer(sources)
    weights = LC.level_weights(scorer)
    task = scorer.task(SEARCH)
    backend = scorer.backend
    rows, _ = likelihood_rows(task, range(len(task.items)), backend._encode, backend.tokenizer.eos_token_id)
    data = {}
    for seed in seeds:
        candidates = []
        for e in archive_events(runs / f"{search}-seed{seed}", ["calc"]):
            if e["fitness"] is None:
                continue
            parsed = plan_from_dict(e["plan"])
            backend.load_weights(merge_plan(parsed, scorer.sources), plan_output_config(parsed, scorer.sources))
            with torch.inference_mode():
                loglik = backend._loglikelihood(rows)
            candidates.append({"plan": e["plan"], "fitness": e["fitness"]["calc"], "loglik": [ll for ll, _ in loglik],
                               "tokens": [n for _, n in loglik],
                               "exact": scorer.scores(e["plan"], SEARCH).tolist(),
                               "truth": LC.composite_score(scorer, e["plan"], weights)})
        data[seed] = candidates
        print(f"seed {seed}: {len(candidates)} candidates", flush=True)
    with open(out, "wb") as f:
        pickle.dump(data, f)


def statistics(loglik: np.ndarray, tokens: np.ndarray, exact: np.ndarray) -> dict[str, np.ndarray]:
    """Candidates x items arrays in, one value per candidate out."""
    prob = np.exp(np.minimum(loglik, 0.0))
    return {"likelihood (the search's)": prob.mean(1),
            "per-token likelihood": np.exp(loglik / tokens).mean(1),
            "log-likelihood, floor -5": np.maximum(loglik, -5.0).mean(1),
            "log-likelihood": loglik.mean(1),
            "exact match": exact.mean(1)}


def report(result_path: Path, pickles: list[Path]) -> None:
    from evomerge.workers.evaluator import subset_indices

    data: dict[int, list[dict]] = {}
    for path in pickles:
        with open(path, "rb") as f:
            data.update(pickle.load(f))
    result = json.loads(result_path.read_text())
    plans = {int(s): (v["plans"] if "plans" in v else v) for s, v in result.get("per_seed", result).items()}
    _, sources = zoo(None)
    scorer = Scorer(sources)
    weights = LC.level_weights(scorer)

    path_rows, rank, regret = [], {}, {}
    for seed, cands in sorted(data.items()):
        loglik = np.array([c["loglik"] for c in cands])
        tokens = np.array([c["tokens"] for c in cands])
        exact = np.array([c["exact"] for c in cands])
        truth = np.array([c["truth"] for c in cands])
        subset = subset_indices(loglik.shape[1], 0.1, seed)
        on_subset = statistics(loglik[:, subset], tokens[:, subset], exact[:, subset])
        on_all = statistics(loglik, tokens, exact)
        # the re-scored statistic must reproduce the search's own estimates
        assert np.allclose(on_subset["likelihood (the search's)"], [c["fitness"] for c in cands], atol=1e-4), seed
        path_rows.append([truth[np.argmax(on_subset["likelihood (the search's)"])], truth.max(),
                          truth[np.argmax(on_all["likelihood (the search's)"])],
                          LC.composite_score(scorer, plans[seed]["graded_full_search"], weights),
                          LC.composite_score(scorer, plans[seed]["full_search"], weights)])
        for where, values in (("20 items", on_subset), ("200 items", on_all)):
            for name, v in values.items():
                rank.setdefault((where, name), []).append(spearmanr(v, truth)[0])
                regret.setdefault((where, name), []).append(truth[np.argmax(v)] - truth.max())

    seeds = sorted(data)
    path = np.array(path_rows)
    print(f"seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}), composite truth, mean over seeds:")
    labels = ["estimator search's pick (20 items)", "best candidate it evaluated",
              "its candidate picked by likelihood on all 200 items",
              "full search's pick, same score on every item", "full search's pick, exact match"]
    for label, column in zip(labels, path.T):
        print(f"  {label:52s} {column.mean():.4f}")
    print("\n| statistic | on | Spearman with the truth | truth of its pick minus the best |\n|---|---|---|---|")
    for (where, name), rhos in rank.items():
        r = np.array(regret[(where, name)])
        print(f"| {name} | {where} | {np.mean(rhos):.3f} | {r.mean():+.4f} ± {r.std(ddof=1) / len(r) ** 0.5:.4f} |")
    reallocation(data)


def reallocation(data: dict[int, list[dict]], draws: int = 20) -> None:
    """The same total of items (48 x 20), some of them moved from every candidate to the top
    k by estimate, which are re-scored on that many more items; picks only (the search's path
    is the 20-item one), the smaller subset a random part of the search's own."""
    from evomerge.workers.evaluator import subset_indices

    print("\n| items a candidate | finalists | items more each | total | truth of the pick minus the best |"
          "\n|---|---|---|---|---|")
    for per, k, more in ((20, 1, 0), (18, 2, 48), (18, 3, 32), (16, 2, 96), (16, 3, 64), (14, 3, 96), (12, 4, 96)):
        regrets = []
        for seed, cands in sorted(data.items()):
            prob = np.exp(np.minimum(np.array([c["loglik"] for c in cands]), 0.0))
            truth = np.array([c["truth"] for c in cands])
            rng = np.random.default_rng(seed)
            subset = rng.permutation(subset_indices(prob.shape[1], 0.1, seed))[:per]
            rest = np.setdiff1d(np.arange(prob.shape[1]), subset)
            picks = []
            for _ in range(draws):
                top = np.argsort(-prob[:, subset].mean(1), kind="stable")[:k]
                items = np.concatenate([subset, rng.choice(rest, more, replace=False)])
                picks.append(truth[top[np.argmax(prob[top][:, items].mean(1))]] - truth.max())
            regrets.append(np.mean(picks))
        r = np.array(regrets)
        print(f"| {per} | {k} | {more} | {len(cands) * per + k * more} | "
              f"{r.mean():+.4f} ± {r.std(ddof=1) / len(r) ** 0.5:.4f} |")


def reallocated_search(seeds: list[int], per: int = 14, k: int = 3, more: int = 96) -> None:
    """The real thing for one row of the simulation: the estimator search on ``per`` items a
    candidate, then its top ``k`` re-scored by likelihood on those plus ``more`` other search
    items (the same 48 x 20 items in all); the pick's composite truth."""
    import estimator_fidelity as EF
    from common import load_settings, run_search

    from evomerge.workers.evaluator import subset_indices

    settings = load_settings("estimator_fidelity", False)
    _, sources = zoo(None)
    scorer = Scorer(sources)
    weights = LC.level_weights(scorer)
    n_items = len(scorer.task(SEARCH).items)
    picks, raws = [], []
    for seed in seeds:
        cfg = EF.config(sources, seed, settings, {"name": "calc", "task": SEARCH, "scoring": "likelihood",
                                                  "estimator": "subset"}, settings["candidates"])
        cfg["calibration"] = {"anchors": per, "random_merges": 0}
        events = [e for e in run_search(cfg, Path(f"/tmp/evomerge-experiments/reallocated/seed{seed}"))["events"]
                  if e["fitness"] is not None]
        subset = subset_indices(n_items, per, seed)
        extra = np.random.default_rng([seed, 7]).choice(np.setdiff1d(np.arange(n_items), subset), more, replace=False)
        items = np.concatenate([subset, extra])
        top = sorted(events, key=lambda e: -e["fitness"]["calc"])[:k]
        pick = max(top, key=lambda e: scorer.graded(e["plan"], SEARCH)[items].mean())
        raws.append(LC.composite_score(scorer, top[0]["plan"], weights))
        picks.append(LC.composite_score(scorer, pick["plan"], weights))
        print(f"seed {seed}: highest estimate {raws[-1]:.4f}, finalists re-scored {picks[-1]:.4f}", flush=True)
    print(f"mean: highest estimate {np.mean(raws):.4f}, finalists re-scored {np.mean(picks):.4f}")


if __name__ == "__main__":
    one_thread()
    if len(sys.argv) >= 6 and sys.argv[1] == "collect":
        collect(Path(sys.argv[2]), sys.argv[3], [int(s) for s in sys.argv[4].split(",")], Path(sys.argv[5]))
    elif len(sys.argv) == 3 and sys.argv[1] == "reallocate":
        reallocated_search([int(s) for s in sys.argv[2].split(",")])
    elif len(sys.argv) >= 4 and sys.argv[1] == "report":
        report(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    else:
        sys.exit(__doc__)
