"""Issue 4's zoo check: do anchors (10% of items) rank random merges of the zoo like full evaluation?

    .venv/bin/python experiments/estimators_zoo.py [--zoo DIR] [--calib-merges 30] [--test-merges 50]

1. Calibration population: the zoo's source models (base + experts) plus --calib-merges
   random merges, each scored on every search item of the zoo tasks (one pooled item set).
2. `Calibration.fit` on that matrix with K = 10% of the items (target: pooled accuracy).
3. --test-merges fresh random merges: each is scored on the full pool (the truth) and,
   separately and timed, on the anchors only (what a search pays); estimates come from the
   anchor scores. Reported: Spearman(estimate, full accuracy) per estimator, MAE, and the
   cost ratio in items and in scoring wall time.
Writes experiments/results/estimators_zoo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evomerge.estimators import Calibration  # noqa: E402
from evomerge.io.atomic import atomic_write_text  # noqa: E402
from evomerge.search.calibrate import source_plan  # noqa: E402
from evomerge.tasks.task import load_task  # noqa: E402
from evomerge.workers.scorer import PlanScorer  # noqa: E402
from evomerge.zoo.build import ensure_zoo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ["zoo/arith", "zoo/strings", "zoo/lang", "zoo/calc"]
SHOWN = ["learned", "gpirt_reg", "pirt", "gpirt", "anchor", "random", "random_plain"]


def random_plan(rng: np.random.Generator, experts: list[str]) -> dict:
    """A random merge of the experts onto the base: method, which experts, weights, densities."""
    method = str(rng.choice(["task_arithmetic", "ties", "dare_ties", "linear"]))
    chosen = [e for e in experts if rng.random() < 0.7] or [str(rng.choice(experts))]
    models = []
    for e in chosen:
        params = {"weight": float(rng.uniform(0.1, 1.2))}
        if method in ("ties", "dare_ties"):
            params["density"] = float(rng.uniform(0.3, 1.0))
        models.append({"model": e, "parameters": params})
    plan = {"merge_method": method, "models": models, "random_seed": int(rng.integers(1 << 30))}
    if method == "linear":
        plan["models"].append({"model": "base", "parameters": {"weight": float(rng.uniform(0.0, 1.0))}})
    else:
        plan["base_model"] = "base"
    return plan


class Scorer:
    """The product's PlanScorer on the zoo, its tasks' items pooled into one index range."""

    def __init__(self, zoo, tasks: list[str]):
        paths = {"base": str(zoo.base), **{s: str(p) for s, p in zoo.experts.items()}}
        self.plan_scorer = PlanScorer(paths, "hf", "cpu", str(zoo.base))
        self.tasks = [load_task(t) for t in tasks]
        self.offsets = np.cumsum([0] + [len(t.items) for t in self.tasks])  # pooled item index ranges

    @property
    def n_items(self) -> int:
        return int(self.offsets[-1])

    def load_source(self, name: str) -> None:
        self.plan_scorer.put(source_plan(name))

    def load_plan(self, plan: dict) -> None:
        self.plan_scorer.put(plan)

    def score(self, pooled: np.ndarray) -> tuple[np.ndarray, float]:
        """Scores of the loaded model on the given pooled item indices, and the seconds it took."""
        out = np.full(len(pooled), np.nan)
        start = time.perf_counter()
        for t, task in enumerate(self.tasks):
            lo, hi = self.offsets[t], self.offsets[t + 1]
            where = np.flatnonzero((pooled >= lo) & (pooled < hi))
            if len(where):
                out[where] = self.plan_scorer.score(task, [int(pooled[w] - lo) for w in where], "exact")
        return out, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--calib-merges", type=int, default=30)
    ap.add_argument("--test-merges", type=int, default=50)
    ap.add_argument("--frac", type=float, default=0.1, help="anchors as a fraction of the items (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where estimators_zoo.{json,md} go")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    zoo = ensure_zoo(args.zoo, verbose=True)
    scorer = Scorer(zoo, TASKS)
    experts = list(zoo.experts)
    every = np.arange(scorer.n_items)
    rng = np.random.default_rng(args.seed)

    # 1. calibration population, scored on every item
    rows, names, full_seconds = [], [], []
    for name in ["base", *experts]:
        scorer.load_source(name)
        y, sec = scorer.score(every)
        rows.append(y), names.append(name), full_seconds.append(sec)
    calib_plans = [random_plan(rng, experts) for _ in range(args.calib_merges)]
    for i, plan in enumerate(calib_plans):
        scorer.load_plan(plan)
        y, sec = scorer.score(every)
        rows.append(y), names.append(f"calib-{i}"), full_seconds.append(sec)
        print(f"calibration merge {i}: acc {np.mean(y):.3f} ({sec:.1f}s)", flush=True)
    calib_matrix = np.array(rows)

    # 2. calibration
    k = max(1, int(round(args.frac * scorer.n_items)))
    t = time.perf_counter()
    calib = Calibration.fit(calib_matrix, n_anchors=k, dims=(1, 2), seed=args.seed)
    fit_seconds = time.perf_counter() - t

    # 3. fresh merges: full truth vs anchors only (timed separately)
    truth, anchor_rows, random_rows, plain_rows, est_seconds, full_sec_test = [], [], [], [], [], []
    plain_items = np.random.default_rng(args.seed + 1).choice(scorer.n_items, k, replace=False)
    for i in range(args.test_merges):
        scorer.load_plan(random_plan(rng, experts))
        y, sec = scorer.score(every)
        a, sec_a = scorer.score(calib.anchors)
        t = time.perf_counter()
        calib.estimate("learned", a)
        sec_a += time.perf_counter() - t
        truth.append(np.mean(y)), full_sec_test.append(sec)
        anchor_rows.append(a), random_rows.append(y[calib.random_items]), plain_rows.append(y[plain_items])
        est_seconds.append(sec_a)
        print(f"test merge {i}: full {np.mean(y):.3f} ({sec:.1f}s), anchors {sec_a:.2f}s", flush=True)
    truth = np.array(truth)
    est = calib.estimate_many(np.array(anchor_rows), np.array(random_rows))
    est["random_plain"] = (np.array(plain_rows).mean(1), None)
    table = {}
    for name in SHOWN:
        v = est[name][0]
        rho = spearmanr(v, truth).statistic
        table[name] = {"spearman": float(rho), "mae": float(np.mean(np.abs(v - truth)))}
    summary = {
        "tasks": TASKS, "items": scorer.n_items, "anchors": k, "calibration_subjects": len(rows),
        "calibration_merges": args.calib_merges, "test_merges": args.test_merges, "seed": args.seed,
        "dims": calib.info["dims"], "learned_lambda": calib.learned["lam"],
        "estimators": table,
        "truth_range": [float(truth.min()), float(truth.max())], "truth_sd": float(truth.std()),
        "cost_items": k / scorer.n_items,
        "cost_seconds": float(np.sum(est_seconds) / np.sum(full_sec_test)),
        "full_eval_seconds_mean": float(np.mean(full_sec_test)), "anchor_eval_seconds_mean": float(np.mean(est_seconds)),
        "calibration_fit_seconds": fit_seconds, "wall_s": time.perf_counter() - t_all,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "estimators_zoo.json", json.dumps(summary, indent=1))
    atomic_write_text(args.results / "estimators_zoo.md", markdown(summary))
    print(markdown(summary))
    return 0


def markdown(s: dict) -> str:
    lines = [f"Zoo check: {s['test_merges']} fresh random merges of the zoo (base + 3 experts; task arithmetic, "
             f"TIES, DARE-TIES, linear with random experts / weights / densities), scored on all {s['items']} "
             f"search items of {', '.join(s['tasks'])} (pooled) and on K = {s['anchors']} anchors "
             f"({100 * s['cost_items']:.0f}% of the items).",
             f"Calibration: {s['calibration_subjects']} subjects (4 sources + {s['calibration_merges']} random "
             f"merges) scored on every item; IRT dims {s['dims']}; fit {s['calibration_fit_seconds']:.1f} s.",
             f"Full accuracy of the test merges: {s['truth_range'][0]:.3f}-{s['truth_range'][1]:.3f} "
             f"(sd {s['truth_sd']:.3f}).", "",
             "| estimator | Spearman vs full | MAE |", "|---|---|---|"]
    for name, row in s["estimators"].items():
        lines.append(f"| {name} | {row['spearman']:.3f} | {row['mae']:.4f} |")
    lines += ["", f"Cost of an estimate relative to a full evaluation: {s['cost_items']:.3f} in items, "
                  f"{s['cost_seconds']:.3f} in scoring wall time (anchors {s['anchor_eval_seconds_mean']:.2f} s "
                  f"vs full {s['full_eval_seconds_mean']:.2f} s per merge, HF backend on CPU; merging the weights, "
                  "the same for both, excluded).",
              f"Target (issue 4): Spearman >= 0.9 and cost <= 0.1. Whole run: {s['wall_s']:.0f} s "
              "(`.venv/bin/python experiments/estimators_zoo.py`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
