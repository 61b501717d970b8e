"""Candidate turnaround on one running vLLM engine, for every genome kind: the shipped zoo and
(``--smollm2 DIR``) SmolLM2-135M-Instruct, in one run, as ratios.

    .venv-vllm/bin/python scripts/bench_turnaround_vllm.py [--candidates 4] [--items 100]
        [--search 16] [--extra-layers 2] [--smollm2 /tmp/smollm2] [--out turnaround_vllm.json]

Each model set has two sources of the same depth D (the zoo: base and expert-arith, D = 4;
SmolLM2: the model and a perturbed copy, D = 30). The data_flow genome runs over those two
sources once (``repetitions: 1``): 2D slots, each in or out, so a random candidate has about D
layers (binomially spread, 1..2D) -- its depth varies around the sources' depth, as a
parameter candidate's is D -- capped at ``max_layers`` = D + ``--extra-layers``. That is the
fair comparison: the same scoring work per candidate on average, with layer counts that
would each have restarted the engine before identity padding.

Part 1, per candidate (median over ``--candidates``): merge + load + score ``--items`` items
of zoo/arith:search, through the search's own evaluator (``CandidateEvaluator``):

- ``parameter``: a TIES candidate, loaded into the running engine in place;
- ``data_flow in place``: a data-flow candidate on an engine built ``max_layers`` deep, its
  spare layers identity layers and skipped (no restart);
- ``data_flow restart``: the same candidates on an engine as deep as the sources, which
  restarts on each new layer count (the path before identity padding, emulated:
  ``restart_on_every_new_depth``).
- with ``--multiprocess``, ``parameter, mp`` and ``data_flow in place, mp``: vLLM in its own
  worker process, the plan merged there tensor by tensor (the served merge; "load" includes
  the merge).

Part 2: a ``--search``-candidate data_flow search against a parameter search of the same size,
both with ``evaluator.backend: vllm`` (random optimizer, one generation): per-candidate layer
counts, engine restarts, wall time of the whole search and the sum of its candidates'
seconds, the ratios (goal: at most 1.2x), and scoring seconds per layer-item (score seconds
/ (layers x items)), which says whether a data-flow layer costs what a parameter layer does.
``--restart-search`` also runs the data_flow search with the engine at the sources' depth.

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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PARAMETER = {"kind": "parameter", "method": "ties", "granularity": "block:2"}


def flow_genome(models: dict[str, Path], depth: int, extra_layers: int) -> dict:
    return {"kind": "data_flow", "sources": list(models), "repetitions": 1, "max_layers": depth + extra_layers}


def _config(models: dict[str, Path], genome: dict, items: int, population: int = 1) -> dict:
    return {"seed": 0, "sources": {k: str(v) for k, v in models.items()}, "base": "base", "genome": genome,
            "objectives": [{"name": "arith", "task": "zoo/arith:search", "estimator": "subset"}],
            "calibration": {"anchors": items}, "evaluator": {"backend": "vllm"},
            "optimizer": {"name": "random", "population": population, "generations": 1}, "audit": {"every": 0}}


@contextmanager
def restart_on_every_new_depth():
    """The path before identity padding: the engine is as deep as the sources and restarts
    whenever a candidate's layer count differs from the running engine's (today a shallower
    candidate would load in place, padded to the engine's depth)."""
    import evomerge.workers.evaluator as evaluator_module
    from evomerge.backends.vllm_backend import VLLMBackend

    keep_capacity, keep_fits = evaluator_module.layer_capacity, VLLMBackend.fits_in_place
    evaluator_module.layer_capacity = lambda space: None
    VLLMBackend.fits_in_place = lambda self, config: (
        keep_fits(self, config) and int(config.get("num_hidden_layers", 0)) == self.capacity)
    try:
        yield
    finally:
        evaluator_module.layer_capacity, VLLMBackend.fits_in_place = keep_capacity, keep_fits


def _spec(models, genome: dict, items: int):
    from evomerge.search.config import build_genome_space, parse_config
    from evomerge.workers.evaluator import EvaluatorSpec

    cfg = parse_config(_config(models, genome, items), "bench", Path.cwd())
    space = build_genome_space(cfg)
    return EvaluatorSpec.from_config(cfg, space), space


def _depth(plan: dict, default: int) -> int:
    slices = plan.get("slices")
    if not slices:
        return default
    return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices)


def per_candidate(models: dict[str, Path], depth: int, flow: dict, n: int, items: int,
                  multiprocess: bool = False) -> dict:
    """Merge / load / score seconds per candidate for the three paths (medians)."""
    from evomerge.workers.evaluator import CandidateEvaluator
    from evomerge.workers.types import Candidate

    rng = np.random.default_rng(0)
    rows, outputs = {}, {}
    _, flow_space = _spec(models, flow, items)
    # data-flow candidates with a new layer count each time (so the restart path restarts every time)
    genomes, last = [], depth           # the restart path's engine starts at the sources' depth
    while len(genomes) < n:
        x = flow_space.random(rng)
        layers = _depth(flow_space.decode(x).to_dict(), depth)
        if layers != last:
            genomes.append(x)
            last = layers
    _, parameter_space = _spec(models, PARAMETER, items)
    parameter_genomes = [parameter_space.random(rng) for _ in range(n)]
    paths = [("parameter", PARAMETER, True, False), ("data_flow in place", flow, True, False),
             ("data_flow restart", flow, False, False)]
    if multiprocess:                   # the served merge: plans merged inside vLLM's worker process
        paths += [("parameter, mp", PARAMETER, True, True), ("data_flow in place, mp", flow, True, True)]
    for label, genome_cfg, capacity, mp in paths:
        spec, space = _spec(models, genome_cfg, items)
        spec.multiprocess = mp
        with nullcontext() if capacity else restart_on_every_new_depth():
            if not capacity:
                spec.layer_capacity = None
            t = time.perf_counter()
            evaluator = CandidateEvaluator(spec)
            start_s = time.perf_counter() - t
            xs = parameter_genomes if genome_cfg["kind"] == "parameter" else genomes
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
                depths.append(_depth(plan, depth))
                outs.append(result.objectives["arith"].value)
        rows[label] = {
            "engine_start_s": start_s, "layers": depths,
            "restarts": int(getattr(evaluator.backend, "restarts", 0)),
            **{f"{stage}_s": statistics.median(t.get(stage, 0.0) for t in timings)
               for stage in ("merge", "load", "score", "total")},
            "score_s_per_layer_item": sum(t.get("score", 0.0) for t in timings) / (sum(depths) * items),
        }
        outputs[label] = outs
        evaluator.backend.close()
    base = rows["parameter"]["total_s"]
    for row in rows.values():
        row["ratio_to_parameter"] = row["total_s"] / base
    rows["data_flow restart"]["ratio_to_in_place"] = rows["data_flow restart"]["total_s"] / rows["data_flow in place"]["total_s"]
    mismatches = sum(a != b for a, b in zip(outputs["data_flow in place"], outputs["data_flow restart"]))
    if multiprocess:                   # the same candidates through the worker-process merge
        mismatches += sum(a != b for a, b in zip(outputs["data_flow in place"], outputs["data_flow in place, mp"]))
        mismatches += sum(a != b for a, b in zip(outputs["parameter"], outputs["parameter, mp"]))
    return {"rows": rows, "in_place_vs_restart_score_mismatches": mismatches}


def search_wall(models: dict[str, Path], depth: int, genome: dict, n: int, items: int, root: Path,
                capacity: bool = True) -> dict:
    """Wall time of a whole n-candidate search (engine start and pre-search source scoring
    included) and of its candidate evaluations alone, with each candidate's layer count."""
    import yaml

    from evomerge.search.archive import Archive
    from evomerge.search.run import SearchRun

    path = root / f"{genome['kind']}-{'capacity' if capacity else 'restart'}.yaml"
    path.write_text(yaml.safe_dump(_config(models, genome, items, population=n)))
    with nullcontext() if capacity else restart_on_every_new_depth():
        t = time.perf_counter()
        run = SearchRun.create(path, path.with_suffix(""))
        try:
            run.run(progress=False)
        finally:
            run.close()
        wall = time.perf_counter() - t
    archive = Archive(path.with_suffix(""), readonly=True)
    try:
        records = [r for r in archive.records() if r.generation >= 0]
    finally:
        archive.close()
    bad = [r for r in records if r.status != "ok"]
    if bad:
        raise SystemExit(f"{path.stem}: candidate {bad[0].candidate_id} failed: {bad[0].result.error}")
    layers = [_depth(r.plan, depth) for r in records]
    scored = [r.objectives["arith"].n_items for r in records]
    score_s = [r.result.timings.get("score", 0.0) for r in records]
    return {"wall_s": wall, "candidates_s": sum(r.result.seconds for r in records), "candidates": len(records),
            "restarts": sum("restart" in r.result.timings for r in records), "layers": layers,
            "mean_layers": statistics.mean(layers),
            **{f"{stage}_s": sum(r.result.timings.get(stage, 0.0) for r in records) for stage in ("merge", "load", "score")},
            "score_s_per_layer_item": sum(score_s) / sum(n_l * n_i for n_l, n_i in zip(layers, scored))}


def perturbed_copy(model: Path, out: Path, scale: float = 0.02) -> Path:
    """A second source of the same architecture: every floating tensor plus Gaussian noise of
    ``scale`` x its own standard deviation (seeded), written once."""
    import torch

    from evomerge.io.checkpoint import Checkpoint, write_checkpoint

    if (out / "config.json").exists():
        return out
    ck = Checkpoint(model)
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name in ck.tensor_names:
            t = ck.get(name)
            if t.is_floating_point() and t.numel() > 1:
                t = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * (scale * float(t.float().std()))
            yield name, t

    write_checkpoint(out, tensors(), ck.config, tokenizer_from=model)
    return out


def bench(label: str, models: dict[str, Path], depth: int, args, search_n: int, candidates: int,
          restart_search: bool) -> dict:
    flow = flow_genome(models, depth, args.extra_layers)
    result = {"models": {k: str(v) for k, v in models.items()}, "depth": depth, "flow_genome": flow,
              "load_average_start": os.getloadavg()[0]}
    if candidates:
        result.update(per_candidate(models, depth, flow, candidates, args.items, args.multiprocess))
        print(f"\n[{label}] turnaround per candidate, {args.items} items of zoo/arith:search, median of "
              f"{candidates}, load average {result['load_average_start']:.1f}")
        print(f"{'path':<24} {'layers':<18} {'merge s':>8} {'load s':>8} {'score s':>8} {'total s':>8} {'ratio':>6}")
        for name, row in result["rows"].items():
            print(f"{name:<24} {str(row['layers']):<18} {row['merge_s']:8.3f} {row['load_s']:8.3f} "
                  f"{row['score_s']:8.3f} {row['total_s']:8.3f} {row['ratio_to_parameter']:5.2f}x")
        print(f"restart / in place: {result['rows']['data_flow restart']['ratio_to_in_place']:.2f}x; "
              f"score mismatches in place vs restart: {result['in_place_vs_restart_score_mismatches']}", flush=True)
    if search_n:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            searches = {"parameter": search_wall(models, depth, PARAMETER, search_n, args.items, root),
                        "data_flow": search_wall(models, depth, flow, search_n, args.items, root)}
            if restart_search:
                searches["data_flow (restarts)"] = search_wall(models, depth, flow, search_n, args.items, root,
                                                               capacity=False)
        for row in searches.values():
            for key in ("wall", "candidates", "score_s_per_layer_item"):
                value = row[key if key.endswith("item") else f"{key}_s"]
                base = searches["parameter"][key if key.endswith("item") else f"{key}_s"]
                row[f"{key}_ratio"] = value / base
        result["searches"] = searches
        print(f"\n[{label}] {search_n}-candidate searches on the vLLM backend (random optimizer), "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'search':<22} {'layers (mean)':<16} {'restarts':>8} {'wall s':>8} {'ratio':>6} {'cand. s':>8} "
              f"{'ratio':>6} {'us/layer-item':>13}")
        for name, row in searches.items():
            span = f"{min(row['layers'])}..{max(row['layers'])} ({row['mean_layers']:.1f})"
            print(f"{name:<22} {span:<16} {row['restarts']:>8} {row['wall_s']:8.1f} {row['wall_ratio']:5.2f}x "
                  f"{row['candidates_s']:8.1f} {row['candidates_ratio']:5.2f}x "
                  f"{row['score_s_per_layer_item'] * 1e6:13.0f}", flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=4, help="part 1 candidates per path, zoo (0: skip)")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--search", type=int, default=16, help="candidates per search in part 2, zoo (0: skip)")
    ap.add_argument("--extra-layers", type=int, default=2, help="max_layers = the sources' depth + this")
    ap.add_argument("--restart-search", action="store_true", help="also the data_flow search with restarts (zoo)")
    ap.add_argument("--multiprocess", action="store_true",
                    help="part 1 also in multiprocess mode (the served merge: plans merged in vLLM's worker)")
    ap.add_argument("--smollm2", type=Path, default=None, help="SmolLM2 directory (scripts/smollm2_from_gguf.py)")
    ap.add_argument("--smollm2-candidates", type=int, default=2)
    ap.add_argument("--smollm2-search", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-bench-vllm")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import numba  # noqa: F401  -- as in a worker: the merge kernels are loaded before the engine starts

    from evomerge.zoo.build import ensure_zoo

    zoo = ensure_zoo()
    result = {"items": args.items, "extra_layers": args.extra_layers, "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0], "sets": {}}
    sets = {"zoo": ({"base": zoo.models["base"], "expert-arith": zoo.models["expert-arith"]}, 4,
                    args.search, args.candidates, args.restart_search)}
    if args.smollm2:
        other = perturbed_copy(args.smollm2, args.workdir / "smollm2-perturbed")
        depth = json.loads((args.smollm2 / "config.json").read_text())["num_hidden_layers"]
        sets["smollm2"] = ({"base": args.smollm2, "perturbed": other}, depth, args.smollm2_search,
                           args.smollm2_candidates, False)
    for label, (models, depth, search_n, candidates, restart_search) in sets.items():
        result["sets"][label] = bench(label, models, depth, args, search_n, candidates, restart_search)
        if args.out:                    # after each set: a late failure keeps the finished ones
            from evomerge.io.atomic import atomic_write_text

            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if any(s.get("in_place_vs_restart_score_mismatches") for s in result["sets"].values()):
        sys.exit("in-place (identity-padded) and restarted engines disagree")


if __name__ == "__main__":
    main()
