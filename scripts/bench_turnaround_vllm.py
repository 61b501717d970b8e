"""Candidate turnaround on one running vLLM engine, for every genome kind, with the shipped zoo.

    .venv-vllm/bin/python scripts/bench_turnaround_vllm.py [--candidates 4] [--items 100]
        [--search 16] [--max-layers 16] [--out experiments/results/turnaround_vllm.json]

Part 1, per candidate (median over ``--candidates``): merge + load + score ``--items`` items
of zoo/arith:search, through the search's own evaluator (``CandidateEvaluator``):

- ``parameter``: a TIES candidate, loaded into the running engine in place;
- ``data_flow in place``: a data-flow candidate on an engine built ``--max-layers`` deep, its
  spare layers identity layers (no restart);
- ``data_flow restart``: the same kind of candidate on an engine as deep as the sources,
  which restarts on each new layer count (the path before identity padding).

Part 2: a ``--search``-candidate data_flow search whose layer counts vary (``max_layers``
``--max-layers`` over 4-layer sources) against a parameter search of the same size, both with
``evaluator.backend: vllm`` (random optimizer, one generation): wall time of the whole search
and of its candidate evaluations, and the ratio (goal: at most 1.2x). The data_flow search is
also run with the engine at the sources' depth (restarts), as a before.

Everything runs in one process (vLLM in-process, as the search's local pool runs it); the
per-item outputs of the in-place and restart paths are compared (``mismatches``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _spec(zoo, genome: dict, items: int, capacity: bool = True):
    from evomerge.search.config import build_genome_space, parse_config
    from evomerge.workers.evaluator import EvaluatorSpec

    cfg = parse_config(_config(zoo, genome, items), "bench", Path.cwd())
    space = build_genome_space(cfg)
    spec = EvaluatorSpec.from_config(cfg, space)
    if not capacity:
        spec.layer_capacity = None
    return spec, space


def _config(zoo, genome: dict, items: int, population: int = 1) -> dict:
    return {"seed": 0, "sources": {k: str(v) for k, v in zoo.models.items()}, "base": "base", "genome": genome,
            "objectives": [{"name": "arith", "task": "zoo/arith:search", "estimator": "subset"}],
            "calibration": {"anchors": items}, "evaluator": {"backend": "vllm"},
            "optimizer": {"name": "random", "population": population, "generations": 1}, "audit": {"every": 0}}


def _depth(plan: dict) -> int:
    return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in plan.get("slices", []))


def per_candidate(zoo, n: int, items: int, max_layers: int) -> dict:
    """Merge / load / score seconds per candidate for the three paths (medians)."""
    from evomerge.workers.evaluator import CandidateEvaluator
    from evomerge.workers.types import Candidate

    parameter = {"kind": "parameter", "method": "ties", "granularity": "block:2"}
    flow = {"kind": "data_flow", "max_layers": max_layers}
    rng = np.random.default_rng(0)
    rows, outputs = {}, {}
    flow_spec, flow_space = _spec(zoo, flow, items)
    # data-flow candidates with a new layer count each time (so the restart path restarts every time)
    genomes, last = [], 4               # the engine starts at the sources' 4 layers
    while len(genomes) < n:
        x = flow_space.random(rng)
        depth = _depth(flow_space.decode(x).to_dict())
        if depth != last:
            genomes.append(x)
            last = depth
    for label, genome_cfg, capacity in (("parameter", parameter, True), ("data_flow in place", flow, True),
                                        ("data_flow restart", flow, False)):
        spec, space = _spec(zoo, genome_cfg, items, capacity)
        t = time.perf_counter()
        evaluator = CandidateEvaluator(spec)
        start_s = time.perf_counter() - t
        xs = [space.random(rng) for _ in range(n)] if genome_cfg["kind"] == "parameter" else genomes
        # warm-up: the first request pays one-off costs (not a candidate's); the weights stay
        obj = evaluator.objectives[0]
        evaluator.backend.score(obj.task, [int(i) for i in obj.indices[:4]])
        timings, depths, outs = [], [], []
        for i, x in enumerate(xs):
            plan = space.decode(x).to_dict()
            t = time.perf_counter()
            result = evaluator.evaluate(Candidate(i, 0, list(x), plan))
            total = time.perf_counter() - t
            if result.status != "ok":
                raise SystemExit(f"{label}: candidate {i} failed: {result.error}")
            timings.append({**result.timings, "total": total})
            depths.append(_depth(plan) or 4)
            outs.append(result.objectives["arith"].value)
        rows[label] = {
            "engine_start_s": start_s, "layers": depths,
            "restarts": int(getattr(evaluator.backend, "restarts", 0)),
            **{f"{stage}_s": statistics.median(t.get(stage, 0.0) for t in timings)
               for stage in ("merge", "load", "score", "total")},
        }
        outputs[label] = outs
        evaluator.backend.close()
    base = rows["parameter"]["total_s"]
    for row in rows.values():
        row["ratio_to_parameter"] = row["total_s"] / base
    rows["data_flow restart"]["ratio_to_in_place"] = rows["data_flow restart"]["total_s"] / rows["data_flow in place"]["total_s"]
    mismatches = sum(a != b for a, b in zip(outputs["data_flow in place"], outputs["data_flow restart"]))
    return {"rows": rows, "in_place_vs_restart_score_mismatches": mismatches}


def search_wall(zoo, genome: dict, n: int, items: int, root: Path, capacity: bool = True) -> dict:
    """Wall time of a whole n-candidate search (pre-search source scoring included) and of its
    candidate evaluations alone."""
    import yaml

    import evomerge.workers.evaluator as evaluator_module
    from evomerge.search.archive import Archive
    from evomerge.search.run import SearchRun

    path = root / f"{genome['kind']}-{'capacity' if capacity else 'restart'}.yaml"
    path.write_text(yaml.safe_dump(_config(zoo, genome, items, population=n)))
    keep = evaluator_module.layer_capacity
    if not capacity:                    # the path before identity padding: an engine at the sources' depth
        evaluator_module.layer_capacity = lambda space: None
    try:
        t = time.perf_counter()
        run = SearchRun.create(path, path.with_suffix(""))
        try:
            run.run(progress=False)
        finally:
            run.close()
        wall = time.perf_counter() - t
    finally:
        evaluator_module.layer_capacity = keep
    archive = Archive(path.with_suffix(""), readonly=True)
    try:
        records = [r for r in archive.records() if r.generation >= 0]
    finally:
        archive.close()
    return {"wall_s": wall, "candidates_s": sum(r.result.seconds for r in records), "candidates": len(records),
            "restarts": sum("restart" in r.result.timings for r in records),
            "layer_counts": sorted({_depth(r.plan) for r in records}) if genome["kind"] == "data_flow" else [4]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--search", type=int, default=16, help="candidates per search in part 2 (0: skip)")
    ap.add_argument("--max-layers", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import numba  # noqa: F401  -- as in a worker: the merge kernels are loaded before the engine starts

    from evomerge.zoo.build import ensure_zoo

    zoo = ensure_zoo()
    result = {"items": args.items, "max_layers": args.max_layers, "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0]}
    result.update(per_candidate(zoo, args.candidates, args.items, args.max_layers))
    print(f"vLLM (CPU) turnaround per candidate, {args.items} items of zoo/arith:search, "
          f"median of {args.candidates}, load average {result['load_average']:.1f}")
    print(f"{'path':<20} {'layers':<16} {'merge s':>8} {'load s':>8} {'score s':>8} {'total s':>8} {'ratio':>6}")
    for label, row in result["rows"].items():
        print(f"{label:<20} {str(sorted(set(row['layers']))):<16} {row['merge_s']:8.3f} {row['load_s']:8.3f} "
              f"{row['score_s']:8.3f} {row['total_s']:8.3f} {row['ratio_to_parameter']:5.2f}x")
    print(f"restart / in place: {result['rows']['data_flow restart']['ratio_to_in_place']:.2f}x; "
          f"score mismatches in place vs restart: {result['in_place_vs_restart_score_mismatches']}")
    if args.search:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            flow = {"kind": "data_flow", "max_layers": args.max_layers}
            searches = {
                "parameter": search_wall(zoo, {"kind": "parameter", "method": "ties", "granularity": "block:2"},
                                         args.search, args.items, root),
                "data_flow": search_wall(zoo, flow, args.search, args.items, root),
                "data_flow (restarts)": search_wall(zoo, flow, args.search, args.items, root, capacity=False),
            }
        for row in searches.values():
            row["wall_ratio"] = row["wall_s"] / searches["parameter"]["wall_s"]
            row["candidates_ratio"] = row["candidates_s"] / searches["parameter"]["candidates_s"]
        result["searches"] = searches
        print(f"\n{args.search}-candidate searches on the vLLM backend (random optimizer)")
        print(f"{'search':<22} {'layer counts':<18} {'restarts':>8} {'wall s':>8} {'ratio':>6} {'cand. s':>8} {'ratio':>6}")
        for label, row in searches.items():
            counts = row["layer_counts"]
            span = f"{min(counts)}..{max(counts)} ({len(counts)})" if len(counts) > 1 else str(counts[0])
            print(f"{label:<22} {span:<18} {row['restarts']:>8} {row['wall_s']:8.1f} {row['wall_ratio']:5.2f}x "
                  f"{row['candidates_s']:8.1f} {row['candidates_ratio']:5.2f}x")
    if args.out:
        from evomerge.io.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if result["in_place_vs_restart_score_mismatches"]:
        sys.exit("in-place (identity-padded) and restarted engines disagree")


if __name__ == "__main__":
    main()
