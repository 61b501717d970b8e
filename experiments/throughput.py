"""Merge throughput and candidate turnaround: evomerge in memory vs the mergekit way (disk).

    .venv/bin/python experiments/throughput.py [--zoo DIR] [--quick] [--bench-json FILE]

Settings: configs/experiments/throughput.yaml. Writes experiments/results/throughput.json and
throughput.png.

1. Merge throughput: the JSON of scripts/bench_merge.py (evomerge vs mergekit 0.1.5 on
   ~220M-parameter checkpoints), taken from --bench-json or the first of the usual places that
   exists; if none does, bench_merge.py runs here with --small (tiny models, a smoke run).
2. Candidate turnaround on the zoo (materialize + load into the engine + score N items), the
   same random TIES recipes both ways:
   - evomerge: sources resident, ``merge`` in memory, weights copied into the resident HF
     model (``HFBackend.load_weights``), score;
   - mergekit-style (what mergekit-evolve's on-disk mode and Mergenetic do): mergekit 0.1.5
     ``run_merge`` to disk (in process, .venv-mergekit), ``from_pretrained``, score -- by
     experiments/mergekit_turnaround_worker.py.
   Both score with the same greedy decoding code; the per-item agreement is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (save_figure, RESULTS, ROOT, command_line, load_settings, machine_info, one_thread, write_json,  # noqa: E402
                    zoo, zoo_fingerprint)

MERGEKIT_PY = ROOT / ".venv-mergekit" / "bin" / "python"
BENCH_PLACES = [RESULTS / "merge_bench.json", Path("/tmp/evomerge-bench/bench.json")]
EXPERTS = ["arith", "strings", "lang"]


def random_plans(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"merge_method": "ties", "base_model": "base", "dtype": "float32",
             "models": [{"model": m, "parameters": {"weight": float(rng.uniform(0, 1.2)),
                                                    "density": float(rng.uniform(0.2, 1.0))}} for m in EXPERTS]}
            for _ in range(n)]


def with_paths(plan: dict, sources: dict[str, str]) -> dict:
    out = json.loads(json.dumps(plan))
    out["base_model"] = sources[out["base_model"]]
    for m in out["models"]:
        m["model"] = sources[m["model"]]
    return out


def evomerge_turnaround(sources, plans, task_spec: str) -> dict:
    from evomerge.backends import make_backend
    from evomerge.merge.engine import SourceSet
    from evomerge.search.genome import merge_plan, plan_from_dict, plan_output_config
    from evomerge.tasks.task import load_task

    task = load_task(task_spec)
    t = time.perf_counter()
    source_set = SourceSet.load(sources, device="cpu", resident=True)
    backend = make_backend("hf", Path(sources["base"]), device="cpu")
    startup = time.perf_counter() - t
    rows = []
    for plan in plans:
        parsed = plan_from_dict(plan)
        t = time.perf_counter()
        weights = merge_plan(parsed, source_set)
        t_merge = time.perf_counter() - t
        t = time.perf_counter()
        backend.load_weights(weights, plan_output_config(parsed, source_set))
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        results = backend.score(task, range(len(task.items)))
        t_score = time.perf_counter() - t
        rows.append({"merge_s": t_merge, "load_s": t_load, "score_s": t_score,
                     "scores": [r.score for r in sorted(results, key=lambda r: r.index)]})
    return {"startup_s": startup, "candidates": rows}


def mergekit_turnaround(sources, plans, task_spec: str, workdir: Path) -> dict:
    if not MERGEKIT_PY.exists():
        return {"error": f"{MERGEKIT_PY} missing: run scripts/setup_mergekit_venv.sh"}
    workdir.mkdir(parents=True, exist_ok=True)
    plans_file = workdir / "plans.json"
    plans_file.write_text(json.dumps([with_paths(p, sources) for p in plans]))
    t = time.perf_counter()
    proc = subprocess.run([str(MERGEKIT_PY), str(ROOT / "experiments" / "mergekit_turnaround_worker.py"),
                           str(plans_file), task_spec, str(workdir / "out")], capture_output=True, text=True)
    wall = time.perf_counter() - t
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    imports = [json.loads(line[len("IMPORT "):]) for line in proc.stdout.splitlines() if line.startswith("IMPORT ")]
    out = {"process_wall_s": wall, "startup_s": imports[0]["seconds"] if imports else None, "candidates": rows}
    if proc.returncode != 0:
        out["error"] = f"worker exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"
    return out


def medians(rows: list[dict]) -> dict:
    if not rows:
        return {}
    out = {k: float(np.median([r[k] for r in rows])) for k in ("merge_s", "load_s", "score_s")}
    out["turnaround_s"] = float(np.median([r["merge_s"] + r["load_s"] + r["score_s"] for r in rows]))
    return out


def merge_benchmark(args) -> dict:
    places = [args.bench_json] if args.bench_json else BENCH_PLACES
    for place in places:
        if place and Path(place).exists():
            return {"source": str(place), "measured_by": "scripts/bench_merge.py", "quick": False,
                    "data": json.loads(Path(place).read_text())}
    target = RESULTS / "bench_merge.small.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_merge.py"), "--small", "--json", str(target)],
                   check=False)
    if target.exists():
        return {"source": str(target), "measured_by": "scripts/bench_merge.py --small", "quick": True,
                "data": json.loads(target.read_text())}
    return {"error": "scripts/bench_merge.py wrote no JSON"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bench-json", type=Path, default=None, help="scripts/bench_merge.py --json output to report")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-experiments/throughput"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    one_thread()
    S = load_settings("throughput", args.quick)
    out = args.out or RESULTS / ("throughput.quick.json" if args.quick else "throughput.json")
    started, machine_start = time.time(), machine_info()
    zoo_paths, sources = zoo(args.zoo)
    plans = random_plans(S["candidates"], S["seed"])
    evo = evomerge_turnaround(sources, plans, S["task"])
    mk = mergekit_turnaround(sources, plans, S["task"], args.workdir)
    agree = None
    if mk.get("candidates") and len(mk["candidates"]) == len(evo["candidates"]):
        a = np.array([r["scores"] for r in evo["candidates"]])
        b = np.array([r["scores"] for r in mk["candidates"]])
        agree = {"items_equal_fraction": float((a == b).mean()),
                 "accuracy_evomerge": a.mean(1).tolist(), "accuracy_mergekit": b.mean(1).tolist()}
    m_evo, m_mk = medians(evo["candidates"]), medians(mk.get("candidates", []))
    turnaround = {
        "task": S["task"], "items_per_candidate": len(evo["candidates"][0]["scores"]), "candidates": len(plans),
        "plans": plans, "evomerge": {"startup_s": evo["startup_s"], "median": m_evo},
        "mergekit": {k: v for k, v in mk.items() if k != "candidates"} | {"median": m_mk},
        "agreement": agree,
        "speedup_turnaround": (m_mk["turnaround_s"] / m_evo["turnaround_s"]) if m_mk and m_evo else None,
        "speedup_materialize_and_load": ((m_mk["merge_s"] + m_mk["load_s"]) / (m_evo["merge_s"] + m_evo["load_s"]))
        if m_mk and m_evo else None,
    }
    result = {"experiment": "throughput", "command": command_line(), "settings": S, "machine_start": machine_start,
              "machine_end": machine_info(), "wall_seconds": time.time() - started, "zoo": str(zoo_paths.root),
              "zoo_fingerprint": zoo_fingerprint(sources), "turnaround": turnaround,
              "merge_benchmark": merge_benchmark(args)}
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in turnaround.items() if k != "plans"}, indent=1))
    print(f"wrote {out}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["turnaround"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [n for n in ("evomerge", "mergekit") if t[n]["median"]]
    bottom = np.zeros(len(names))
    for phase, label in (("merge_s", "materialize (merge)"), ("load_s", "load into engine"),
                         ("score_s", f"score {t['items_per_candidate']} items")):
        values = np.array([t[n]["median"][phase] for n in names])
        ax.bar(names, values, bottom=bottom, label=label)
        bottom += values
    ax.set_ylabel("seconds per candidate (median)")
    ax.set_title("candidate turnaround on the zoo")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
