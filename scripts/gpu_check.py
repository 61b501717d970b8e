"""The merge-and-score path on a GPU: agreement with the CPU, candidate turnaround, merge speed.

    python3 scripts/gpu_check.py --device cpu  --zoo DIR --out cpu.json                     # reference
    python3 scripts/gpu_check.py --device cuda --zoo DIR --reference cpu.json --out gpu.json

1. Agreement: the 4 zoo sources and 3 TIES merges of the experts, merged on DEVICE from
   resident sources and scored on zoo/calc:heldout (100 items) with the HF backend in float32,
   exact and likelihood; with --reference, compared item by item with the CPU's file.
2. Turnaround per candidate (merge + swap into the resident model + score the 100 items),
   exact and likelihood, float32 and bfloat16: median over the 7 models.
3. Merge speed: TIES of two fine-tunes of a ~220M-parameter float32 Llama (the shape of
   scripts/bench_merge.py), in memory on DEVICE: median of 3 after one warm-up.
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

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIG = dict(num_layers=12, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)


def plans(zoo) -> dict[str, dict]:
    out = {name: {"merge_method": "linear", "models": [{"model": name, "parameters": {"weight": 1.0}}]}
           for name in zoo}
    for label, (wa, wl, da, dl) in {"ties-a": (1.0, 1.0, 0.5, 0.5), "ties-b": (0.6, 0.8, 0.7, 0.9),
                                    "ties-c": (0.9, 0.5, 0.4, 0.6)}.items():
        out[label] = {"merge_method": "ties", "base_model": "base", "models": [
            {"model": "expert-arith", "parameters": {"weight": wa, "density": da}},
            {"model": "expert-lang", "parameters": {"weight": wl, "density": dl}},
            {"model": "expert-strings", "parameters": {"weight": 0.1, "density": 0.5}}]}
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - t


def agreement_and_turnaround(zoo_dir: Path, device: str) -> dict:
    from evomerge.backends.hf import HFBackend
    from evomerge.merge.engine import SourceSet, merge, output_config
    from evomerge.merge.plan import MergePlan
    from evomerge.tasks.task import load_task

    zoo = {p.name: str(p) for p in sorted(zoo_dir.iterdir()) if (p / "config.json").exists()}
    sources = SourceSet.load(zoo, device=device, resident=True)
    task = load_task("zoo/calc:heldout")
    items = range(len(task.items))
    out: dict = {"models": {}, "turnaround": {}}
    for dtype in ("float32", "bfloat16"):
        backend = HFBackend(zoo["base"], device=device, dtype=dtype)
        phases: dict[str, list[float]] = {"merge": [], "load": [], "score_exact": [], "score_likelihood": []}
        for label, spec in plans(zoo).items():
            plan = MergePlan.from_dict(spec)
            weights, t_merge = timed(device, lambda: merge(plan, sources))
            _, t_load = timed(device, lambda: backend.load_weights(weights, output_config(plan, sources)))
            exact, t_exact = timed(device, lambda: backend.score(task, items))
            graded, t_graded = timed(device, lambda: backend.likelihood(task, items))
            for key, value in (("merge", t_merge), ("load", t_load), ("score_exact", t_exact),
                               ("score_likelihood", t_graded)):
                phases[key].append(value)
            if dtype == "float32":
                out["models"][label] = {"outputs": [r.output for r in exact], "exact": [r.score for r in exact],
                                        "likelihood": [r.score for r in graded]}
            else:
                out["models"][label]["bf16_accuracy"] = sum(r.score for r in exact) / len(exact)
        # the first candidate pays for warm-up (CUDA context, kernels): the median leaves it out
        out["turnaround"][dtype] = {k: statistics.median(v) for k, v in phases.items()}
        out["turnaround"][dtype]["total_exact"] = sum(out["turnaround"][dtype][k] for k in ("merge", "load", "score_exact"))
        del backend
    return out


def merge_speed(device: str, workdir: Path) -> dict:
    from evomerge.io.synthetic import make_tiny_llama
    from evomerge.merge.engine import SourceSet, merge
    from evomerge.merge.plan import MergePlan

    models = {name: workdir / name for name in ("base", "ft_a", "ft_b")}
    t0 = time.perf_counter()
    make_tiny_llama(models["base"], seed=1, overwrite=True, **BIG)
    for seed, name in ((2, "ft_a"), (3, "ft_b")):
        make_tiny_llama(models[name], base=models["base"], noise=0.002, seed=seed, overwrite=True)
    built = time.perf_counter() - t0
    sources, t_load = timed(device, lambda: SourceSet.load({k: str(v) for k, v in models.items()}, device=device))
    plan = MergePlan.from_dict({"merge_method": "ties", "base_model": "base", "dtype": "float32", "models": [
        {"model": "ft_a", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "ft_b", "parameters": {"weight": 0.7, "density": 0.5}}]})
    params = sum(t.numel() for t in merge(plan, sources).values())     # warm-up
    times = [timed(device, lambda: merge(plan, sources))[1] for _ in range(3)]
    return {"parameters": params, "build_checkpoints_s": built, "load_sources_s": t_load,
            "ties_merge_s": statistics.median(times), "ties_merge_all_s": times}


def compare(mine: dict, reference: dict) -> dict:
    rows = {}
    for label, m in mine["models"].items():
        r = reference["models"][label]
        rows[label] = {
            "outputs_equal": sum(a == b for a, b in zip(m["outputs"], r["outputs"])),
            "exact_equal": sum(a == b for a, b in zip(m["exact"], r["exact"])),
            "accuracy": sum(m["exact"]) / len(m["exact"]), "accuracy_reference": sum(r["exact"]) / len(r["exact"]),
            "likelihood_max_abs_diff": max(abs(a - b) for a, b in zip(m["likelihood"], r["likelihood"])),
            "items": len(m["exact"])}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True, help="zoo directory (base + experts)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reference", type=Path, default=None, help="this script's JSON from the CPU")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-merge-speed", action="store_true")
    args = ap.parse_args()

    info = {"device": args.device, "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "command": "python3 scripts/gpu_check.py " + " ".join(sys.argv[1:])}
    if args.device == "cpu":
        torch.set_num_threads(1)
    result = {"info": info, **agreement_and_turnaround(args.zoo, args.device)}
    if args.reference:
        result["agreement"] = compare(result, json.loads(args.reference.read_text()))
    if not args.skip_merge_speed:
        with tempfile.TemporaryDirectory() as tmp:
            result["merge_speed"] = merge_speed(args.device, Path(tmp))
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k != "models"}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
