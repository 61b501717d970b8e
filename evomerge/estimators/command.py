"""`evomerge estimators bench`: how well does each estimator recover scores from K anchors?

Per seed the subjects are split 80/20; a Calibration is fitted on the 80 and the
20 are scored from their anchor (or random-item) responses only. Reported per
estimator: mean absolute error against the item-pool mean ("subset") and against
the full-benchmark score ("full"), in accuracy units, and the floor: the error of
a map from the mean over every item in the matrix to the full score. Two random
baselines: "random_plain" is the mean over K uniformly random items taken as the
full score (the issue's "random subset"; averaged over 20 draws per seed), "random" is
a stratified random subset with a linear map to the full score fitted on the 80.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.estimators import registry
from evomerge.estimators.calibration import Calibration, _features, _fit_map
from evomerge.estimators.data import load_responses, load_scores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="estimators_command", metavar="SUBCOMMAND", required=True)
    bench = sub.add_parser("bench", help="estimator errors on a response matrix, 80/20 split per seed")
    bench.add_argument("--responses", required=True, help="subjects x items CSV(.gz); first column names the subject")
    bench.add_argument("--scores", help="full scores CSV (llm, score); default: each subject's mean over all items")
    bench.add_argument("--score-column", default="score", help="score column in --scores (default: score)")
    bench.add_argument("--anchors", type=int, default=50, help="number of anchor items K (default 50)")
    bench.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    bench.add_argument("--dims", default="1,2,3", help="IRT dimensions to choose from by validation (default 1,2,3)")
    bench.add_argument("--method", default="select", choices=["select", "irt", "correct"],
                       help="anchor choice: forward selection for the full score (default), or k-means "
                            "over IRT embeddings / correctness columns")
    bench.add_argument("--json", help="write the summary here as JSON")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvomergeError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise EvomergeError(f"{flag}: no values in {text!r}")
    return values


def bench(responses_path: str, scores_path: str | None, n_anchors: int, seeds: list[int],
          dims: list[int] = (1, 2, 3), method: str = "select", score_column: str = "score",
          max_iter: int = 300) -> dict:
    matrix = load_responses(responses_path)
    values = matrix.values
    n, m = values.shape
    if n_anchors > m:
        raise EvomergeError(f"{responses_path}: {n_anchors} anchors requested but the file has only {m} items")
    if n < 10:
        raise EvomergeError(f"{responses_path}: {n} subjects are too few for an 80/20 split with validation")
    if int(0.8 * n * 0.8) <= max(dims) + 1:
        raise EvomergeError(f"{responses_path}: {n} subjects are too few for {max(dims)} IRT dimensions")
    full = np.nanmean(values, 1) if scores_path is None else load_scores(scores_path, matrix.subjects, score_column)
    pool_mean = np.nanmean(values, 1)
    per_seed = []
    for seed in seeds:
        start = time.perf_counter()
        perm = np.random.default_rng(seed).permutation(n)
        n_test = max(int(round(0.2 * n)), 1)
        test, train = perm[:n_test], perm[n_test:]
        calib = Calibration.fit(values[train], n_anchors, method=method, dims=dims, seed=seed,
                                full_scores=full[train], items=matrix.items, max_iter=max_iter)
        a_scores, r_scores = values[test][:, calib.anchors], values[test][:, calib.random_items]
        theta_cov = calib.theta(a_scores)
        pool = calib.estimate_many(a_scores, r_scores, scale="pool", theta_cov=theta_cov)
        mapped = calib.estimate_many(a_scores, r_scores, theta_cov=theta_cov)
        result = {"estimators": {}}
        for name, (value, _) in mapped.items():
            source = registry.get(name).pool
            result["estimators"][name] = {
                "mae_subset": float(np.mean(np.abs(pool[source][0] - pool_mean[test]))),
                "mae_full": float(np.mean(np.abs(value - full[test]))),
            }
        # The baseline: K uniformly random items, their mean taken as the score, no map.
        rng = np.random.default_rng(seed)
        draws = [rng.choice(m, n_anchors, replace=False) for _ in range(20)]
        plain = np.array([np.nanmean(values[test][:, d], 1) for d in draws])  # draws x test subjects
        result["estimators"]["random_plain"] = {
            "mae_subset": float(np.nanmean(np.abs(plain - pool_mean[test]))),
            "mae_full": float(np.nanmean(np.abs(plain - full[test]))),
        }
        floor_coef = _fit_map("cubic", pool_mean[train], None, full[train])
        floor = _features("cubic", pool_mean[test], None) @ floor_coef
        result["floor_full"] = float(np.mean(np.abs(floor - full[test])))
        result["floor_learned"] = _learned_floor(values, full, train, test, seed)
        result["dims"] = calib.info["dims"]
        result["lambda"] = calib.lam
        result["seconds"] = time.perf_counter() - start
        per_seed.append(result)
    names = list(per_seed[0]["estimators"])
    summary = {
        "estimators": {name: {k: float(np.mean([r["estimators"][name][k] for r in per_seed]))
                              for k in ("mae_subset", "mae_full")} for name in names},
        "floor_full": float(np.mean([r["floor_full"] for r in per_seed])),
        "floor_learned": float(np.mean([r["floor_learned"] for r in per_seed])),
        "anchors": n_anchors,
        "responses": str(responses_path), "subjects": n, "items": m, "seeds": list(seeds),
        "graded": matrix.graded, "per_seed": per_seed,
    }
    best = min((k for k in names if k != "random_plain"), key=lambda k: summary["estimators"][k]["mae_full"])
    summary["best"] = best
    best_mae = summary["estimators"][best]["mae_full"]
    summary["best_over_random"] = best_mae / summary["estimators"]["random_plain"]["mae_full"]
    summary["best_over_random_mapped"] = best_mae / summary["estimators"]["random"]["mae_full"]
    return summary


def _learned_floor(values, full, train, test, seed) -> float:
    """The learned map given EVERY item of the matrix (penalty picked on a split of the train)."""
    from evomerge.estimators.calibration import LEARNED_LAMBDAS
    from evomerge.estimators.estimators import fit_ridge, learned_features

    item_means = np.nan_to_num(np.nanmean(values[train], 0), nan=0.5)
    f = learned_features(values, item_means)
    perm = np.random.default_rng(seed).permutation(train)
    val, fit = perm[: len(perm) // 5], perm[len(perm) // 5:]
    scale = len(fit) / 1000.0
    errs = {lam: np.mean((f[val] @ fit_ridge(f[fit], full[fit], lam * scale) - full[val]) ** 2) for lam in LEARNED_LAMBDAS}
    coef = fit_ridge(f[train], full[train], min(errs, key=errs.get) * scale)
    return float(np.mean(np.abs(np.clip(f[test] @ coef, 0, 1) - full[test])))


def format_table(summary: dict) -> str:
    lines = [f"{summary['responses']}: {summary['subjects']} subjects x {summary['items']} items, "
             f"K={summary['anchors']}, seeds {summary['seeds']}",
             f"{'estimator':<14}{'MAE subset':>12}{'MAE full':>12}"]
    for name, row in summary["estimators"].items():
        lines.append(f"{name:<14}{row['mae_subset']:>12.4f}{row['mae_full']:>12.4f}")
    lines.append(f"{'all items':<14}{'':>12}{summary['floor_full']:>12.4f}   (floor: cubic map of the all-item mean)")
    lines.append(f"{'all items':<14}{'':>12}{summary['floor_learned']:>12.4f}   (floor: learned map on every item)")
    lines.append(f"best: {summary['best']}, {summary['best_over_random']:.2f}x random_plain, "
                 f"{summary['best_over_random_mapped']:.2f}x random (stratified + linear map)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.anchors < 1:
        raise EvomergeError(f"--anchors must be >= 1, got {args.anchors}")
    seeds = _int_list(args.seeds, "--seeds")
    dims = _int_list(args.dims, "--dims")
    if min(dims) < 1:
        raise EvomergeError(f"--dims must be >= 1, got {args.dims!r}")
    summary = bench(args.responses, args.scores, args.anchors, seeds, dims, args.method, args.score_column)
    print(format_table(summary))
    if args.json:
        from evomerge.io.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(summary, indent=1))
    return 0
