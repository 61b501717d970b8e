"""Run `evomerge estimators bench` on every metabench matrix and AlpacaEval 2.0.

Writes experiments/results/estimators_metabench.json and .md. Also checks the IRT
fit against metabench's published mirt item parameters (1-D fit, correlation of
discriminations a1 and intercepts d). Usage: .venv/bin/python experiments/estimators_metabench.py
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from evomerge.estimators.command import bench
from evomerge.estimators.data import load_responses
from evomerge.estimators.irt import binarize, fit_irt
from evomerge.io.atomic import atomic_write_text

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "results"
K, SEEDS = 50, [0, 1, 2]
PUBLISHED = ("Published, for comparison: tinyBenchmarks reports MAE 0.010-0.029 (accuracy units) for "
             "IRT / p-IRT / gp-IRT with 100 anchors drawn from the full item pools; metabench reports "
             "about 0.012-0.015 (1.2-1.5 points) reconstructing full scores from all of its reduced items.")


def mirt_check(tag: str) -> dict:
    """Correlation of a 1-D MAP fit's (a, -b) with mirt's (a1, d) from the *__items.csv file."""
    matrix = load_responses(DATA / "metabench" / f"{tag}__train_responses.csv.gz")
    params, _ = fit_irt(binarize(matrix.values)[0], dims=1, seed=0)
    with open(DATA / "metabench" / f"{tag}__items.csv") as f:
        rows = {r["item"]: r for r in csv.DictReader(f)}
    a1 = np.array([float(rows[i]["a1.x"]) for i in matrix.items])
    d = np.array([float(rows[i]["d.x"]) for i in matrix.items])
    # mirt's ability axis may point the other way: align the sign before correlating.
    sign = np.sign(np.corrcoef(params.a[:, 0], a1)[0, 1]) or 1.0
    return {"corr_a": float(np.corrcoef(sign * params.a[:, 0], a1)[0, 1]),
            "corr_d": float(np.corrcoef(-params.b, d)[0, 1]),
            "model": tag.split("-")[1]}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    tags = sorted(p.name.replace("__train_responses.csv.gz", "") for p in (DATA / "metabench").glob("*__train_responses.csv.gz"))
    only = sys.argv[1:]
    results = {}
    for tag in tags:
        if only and not any(o in tag for o in only):
            continue
        t = time.perf_counter()
        summary = bench(str(DATA / "metabench" / f"{tag}__train_responses.csv.gz"),
                        str(DATA / "metabench" / f"{tag}__scores.csv"), K, SEEDS)
        summary["mirt"] = mirt_check(tag)
        summary["wall_s"] = time.perf_counter() - t
        results[tag] = summary
        print(tag, summary["best"], round(summary["estimators"][summary["best"]]["mae_full"], 4),
              "random", round(summary["estimators"]["random"]["mae_full"], 4), f"{summary['wall_s']:.0f}s", flush=True)
    if not only or "alpaca" in only:
        t = time.perf_counter()
        summary = bench(str(DATA / "alpaca_eval2" / "weighted_gpt4_turbo_preference_minus1.csv"), None, K, SEEDS)
        summary["wall_s"] = time.perf_counter() - t
        results["alpaca_eval2"] = summary
        print("alpaca_eval2", summary["best"], round(summary["estimators"][summary["best"]]["mae_full"], 4), flush=True)
    atomic_write_text(OUT / "estimators_metabench.json", json.dumps(results, indent=1))
    atomic_write_text(OUT / "estimators_metabench.md", markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    names = ["random", "random_cubic", "anchor", "irt", "pirt", "gpirt", "gpirt_reg"]
    head = "| benchmark | " + " | ".join(names) + " | floor | best - floor | best / random | dims | mirt r(a), r(d) |"
    lines = [f"Full-score MAE (accuracy units), K={K} anchors, seeds {SEEDS}, 80/20 subject split; "
             "in brackets: MAE against the mean over the matrix's own items.", "", head,
             "|" + "---|" * (len(names) + 6)]
    ratios, bests = [], []
    for tag, s in results.items():
        e = s["estimators"]
        best = e[s["best"]]["mae_full"]
        cells = [f"{e[n]['mae_full']:.4f} ({e[n]['mae_subset']:.3f})" for n in names]
        dims = ",".join(str(r["dims"]) for r in s["per_seed"])
        mirt = f"{s['mirt']['corr_a']:.3f}, {s['mirt']['corr_d']:.3f}" if "mirt" in s else "-"
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {s['floor_full']:.4f} | {best - s['floor_full']:+.4f} | "
                     f"{s['best_over_random']:.2f} | {dims} | {mirt} |")
        if tag != "alpaca_eval2":
            ratios.append(s["best_over_random"])
            bests.append(best)
    if ratios:
        lines += ["", f"metabench, averaged over benchmarks: best/random = {np.mean(ratios):.2f} "
                      f"(target <= 0.80); worst benchmark best MAE = {max(bests):.4f} (target <= 0.027)."]
    lines += ["", PUBLISHED, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
