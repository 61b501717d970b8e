"""Measure the zoo's accuracy matrix (models x tasks) and standard merges, with `evomerge eval`.

    .venv/bin/python experiments/zoo_matrix.py [--zoo DIR] [--split all|search|heldout] [--limit N]

Builds the zoo if missing, writes merge recipes (task arithmetic and TIES of the experts at
default parameters, plus the arith+lang pair the composite task needs) to a temp dir, runs
`evomerge eval` on every model and recipe, and writes experiments/results/zoo_matrix.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

from evomerge.io.atomic import atomic_write_text
from evomerge.zoo.build import EXPERTS, ensure_zoo
from evomerge.zoo.skills import TASKS

RESULTS = Path(__file__).parent / "results"


def recipes(zoo) -> dict[str, dict]:
    base = str(zoo.base)
    experts = [str(zoo.experts[s]) for s in EXPERTS]
    pair = [str(zoo.experts["arith"]), str(zoo.experts["lang"])]

    def ta(models, weight):
        return {"merge_method": "task_arithmetic", "base_model": base,
                "models": [{"model": m, "parameters": {"weight": weight}} for m in models]}

    def ties(models):
        return {"merge_method": "ties", "base_model": base, "parameters": {"normalize": True},
                "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models]}

    return {
        "linear(3 experts, uniform)": {"merge_method": "linear",
                                       "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts]},
        "task_arithmetic(3 experts, w=1)": ta(experts, 1.0),
        "task_arithmetic(3 experts, w=0.5)": ta(experts, 0.5),
        "ties(3 experts, d=0.5, w=1)": ties(experts),
        "task_arithmetic(arith+lang, w=1)": ta(pair, 1.0),
        "task_arithmetic(arith+lang, w=0.7)": ta(pair, 0.7),
        "ties(arith+lang, d=0.5, w=1)": ties(pair),
        # per-layer probe: lang's task vector in the outer layers (+ embeddings, t = 0), arith's
        # in the middle ones -- does a non-uniform merge beat the uniform recipes on calc?
        "hand per-layer recipe": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": str(zoo.experts["arith"]), "parameters": {"weight": [0.0, 1.0, 1.0, 0.0]}},
            {"model": str(zoo.experts["lang"]), "parameters": {"weight": [1.0, 0.0, 0.0, 1.0]}}]},
    }


def verdicts(matrix: dict[str, dict[str, float]], scores: dict[str, dict[str, list[float]]] | None = None) -> list[str]:
    """What the matrix says about merging, computed from it (nothing typed by hand); with the
    per-item ``scores``, the composite margin comes with its paired standard error."""
    from evomerge.demo import margin_verdict, paired_margin

    sources = ["base", *EXPERTS.values()]
    merges = [m for m in matrix if m not in sources]
    calc = "zoo/calc"
    best_source = max(sources, key=lambda m: matrix[m][calc])
    best_merge = max(merges, key=lambda m: matrix[m][calc])
    if scores is not None:
        gap, se = paired_margin(scores[best_merge][calc], scores[best_source][calc])
        said = f"margin {gap:+.3f} ± {se:.3f} (paired standard error): merging is {margin_verdict(gap, se)}."
    else:
        said = "merging " + ("helps." if matrix[best_merge][calc] > matrix[best_source][calc] else "does not help.")
    out = [f"- Composite task: best source {best_source} {matrix[best_source][calc]:.3f}, best merge "
           f"{best_merge} {matrix[best_merge][calc]:.3f}: {said}"]
    for skill, expert in EXPERTS.items():
        task = f"zoo/{skill}"
        between = [m for m in merges if matrix["base"][task] < matrix[m][task] < matrix[expert][task]]
        out.append(f"- {task}: {len(between)} of {len(merges)} merges land above the base "
                   f"({matrix['base'][task]:.3f}) and below {expert} ({matrix[expert][task]:.3f}).")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--split", default="all", choices=["all", "search", "heldout"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="run this many `evomerge eval` processes at once")
    args = parser.parse_args()

    zoo = ensure_zoo(args.zoo, verbose=True)
    tmp = Path(tempfile.mkdtemp(prefix="zoo-matrix-"))
    labels: dict[str, str] = {str(p): name for name, p in zoo.models.items()}
    for name, recipe in recipes(zoo).items():
        path = tmp / f"{len(labels)}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        labels[str(path)] = name
    tasks = ",".join(f"zoo/{t}:{args.split}" for t in TASKS)
    start = time.perf_counter()
    outs, running = [], []
    for i, model in enumerate(labels):
        out = tmp / f"items-{i}.jsonl"
        outs.append(out)
        cmd = [sys.executable, "-m", "evomerge.cli", "eval", model, "--tasks", tasks, "--out", str(out)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
        running.append(subprocess.Popen(cmd + (["--limit", str(args.limit)] if args.limit else []), env=env))
        while len(running) >= args.jobs or (i == len(labels) - 1 and running):
            if running[0].wait() != 0:
                return 1
            running.pop(0)
    seconds = time.perf_counter() - start
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in (ln for out in outs for ln in out.read_text().splitlines()):
        row = json.loads(line)
        scores[labels[row["model"]]][row["task"].split(":")[0]].append(row["score"])
    matrix = {m: {t: sum(v) / len(v) for t, v in per.items()} for m, per in scores.items()}
    n_items = len(next(iter(next(iter(scores.values())).values())))
    meta = json.loads((zoo.root / "zoo.json").read_text())

    tnames = [f"zoo/{t}" for t in TASKS]
    lines = [f"| model | {' | '.join(tnames)} |", "|---" * (len(tnames) + 1) + "|"]
    for model, row in matrix.items():
        best = {t: max(matrix[m][t] for m in ["base", *EXPERTS.values()]) for t in tnames}
        cells = [f"**{row[t]:.3f}**" if model in ["base", *EXPERTS.values()] and row[t] == best[t] else f"{row[t]:.3f}"
                 for t in tnames]
        lines.append(f"| {model} | {' | '.join(cells)} |")
    md = (
        f"# Zoo accuracy matrix ({args.split} split, {n_items} items per task)\n\n"
        f"Measured with `evomerge eval` by `experiments/zoo_matrix.py` (HF backend, CPU, greedy). "
        f"Zoo build: {meta['build_seconds']} s wall"
        + (f", {meta['build_cpu_seconds']} CPU-s" if "build_cpu_seconds" in meta else "")
        + " (1 thread, shared machine). Bold: best source model per task.\n\n"
        + "\n".join(lines) + "\n\n" + "\n".join(verdicts(matrix, scores)) + "\n\n"
        "Merges: linear / task_arithmetic / TIES of the fine-tuned experts over the base, mergekit "
        "parameter names and defaults.\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "zoo_matrix.md", md)
    atomic_write_text(RESULTS / "zoo_matrix.json", json.dumps(
        {"split": args.split, "n_items": n_items, "eval_seconds": round(seconds, 1), "zoo": meta,
         "recipes": recipes(zoo), "matrix": matrix}, indent=2, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
