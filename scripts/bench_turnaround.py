"""Candidate turnaround with the HF backend on the zoo: in-memory merge + in-place weight swap
vs writing each candidate to disk and loading a fresh model from it.

    .venv/bin/python scripts/bench_turnaround.py [--candidates 5] [--items 100] [--task zoo/calc:heldout]
        [--threads 1] [--zoo DIR]

Per candidate (a TIES merge of the zoo's experts with its own weights and densities):
- in place: ``evomerge.merge.merge`` from resident sources + ``HFBackend.load_weights`` + ``score``;
- reload:   ``merge_to_disk`` + ``from_pretrained`` (a new ``HFBackend`` on the directory) + ``score``.
Both must give identical per-item outputs (checked). Prints the median seconds per phase, the
CPU time per scored item, and the reload / in-place ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def candidate_plans(zoo, n: int) -> list[dict]:
    from evomerge.zoo.build import EXPERTS

    plans = []
    for c in range(n):
        models = [{"model": str(zoo.experts[s]),
                   "parameters": {"weight": round(0.4 + 0.15 * ((c + k) % 5), 2), "density": round(0.3 + 0.1 * ((c + 2 * k) % 6), 2)}}
                  for k, s in enumerate(EXPERTS)]
        plans.append({"merge_method": "ties", "base_model": str(zoo.base), "models": models})
    return plans


def main() -> int:
    from evomerge.backends.hf import HFBackend
    from evomerge.merge.engine import SourceSet, merge, merge_to_disk, output_config
    from evomerge.merge.plan import MergePlan
    from evomerge.tasks.task import load_task
    from evomerge.zoo.build import ensure_zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--task", default="zoo/calc:heldout")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zoo", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    zoo = ensure_zoo(args.zoo, verbose=True)
    task = load_task(args.task)
    indices = list(range(min(args.items, len(task.items))))
    plans = [MergePlan.from_dict(p) for p in candidate_plans(zoo, args.candidates)]
    sources = SourceSet.load({str(p): p for p in zoo.models.values()})
    backend = HFBackend(zoo.base, num_threads=args.threads)
    backend.score(task, indices[:4])                   # warm-up outside the timings

    inplace = {"merge": [], "load": [], "score": [], "total": [], "cpu": []}
    outputs = []
    for plan in plans:
        c0, t0 = cpu_seconds(), time.perf_counter()
        weights = merge(plan, sources)
        t1 = time.perf_counter()
        backend.load_weights(weights, output_config(plan, sources))
        t2 = time.perf_counter()
        outputs.append([r.output for r in backend.score(task, indices)])
        t3 = time.perf_counter()
        inplace["merge"].append(t1 - t0); inplace["load"].append(t2 - t1)
        inplace["score"].append(t3 - t2); inplace["total"].append(t3 - t0)
        inplace["cpu"].append(cpu_seconds() - c0)

    reload = {"merge_to_disk": [], "load": [], "score": [], "total": [], "cpu": []}
    mismatches = 0
    with tempfile.TemporaryDirectory(prefix="turnaround-") as tmp:
        for c, plan in enumerate(plans):
            c0, t0 = cpu_seconds(), time.perf_counter()
            out = merge_to_disk(plan, sources, Path(tmp) / f"cand{c}", tokenizer_from=zoo.base)
            t1 = time.perf_counter()
            fresh = HFBackend(out, num_threads=args.threads)
            t2 = time.perf_counter()
            got = [r.output for r in fresh.score(task, indices)]
            t3 = time.perf_counter()
            mismatches += sum(a != b for a, b in zip(got, outputs[c]))
            reload["merge_to_disk"].append(t1 - t0); reload["load"].append(t2 - t1)
            reload["score"].append(t3 - t2); reload["total"].append(t3 - t0)
            reload["cpu"].append(cpu_seconds() - c0)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    n = len(indices)
    print(f"zoo {zoo.root}; task {args.task}; {n} items; {len(plans)} candidates; torch threads {args.threads}")
    print(f"in place: merge {med(inplace['merge']):.3f} s + load_weights {med(inplace['load']):.4f} s + "
          f"score {med(inplace['score']):.3f} s = {med(inplace['total']):.3f} s per candidate "
          f"({1000 * med(inplace['cpu']) / n:.2f} ms CPU per item, merge included)")
    print(f"reload:   merge_to_disk {med(reload['merge_to_disk']):.3f} s + from_pretrained {med(reload['load']):.3f} s + "
          f"score {med(reload['score']):.3f} s = {med(reload['total']):.3f} s per candidate "
          f"({1000 * med(reload['cpu']) / n:.2f} ms CPU per item)")
    print(f"ratio reload / in place: {med(reload['total']) / med(inplace['total']):.2f}x wall, "
          f"{med(reload['cpu']) / med(inplace['cpu']):.2f}x CPU; per-item output mismatches: {mismatches}")
    print(json.dumps({"in_place": {k: med(v) for k, v in inplace.items()},
                      "reload": {k: med(v) for k, v in reload.items()}, "mismatches": mismatches}))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
