#!/usr/bin/env python
"""evomerge on a real pretrained model nobody here made: SmolLM2-135M-Instruct (30 layers, 9/3 heads, tied).

Input: the HF directory written by scripts/smollm2_from_gguf.py. In one run:

1. ``evomerge eval`` greedy outputs on 8 prompts against transformers'
   ``generate(do_sample=False)``, prompt by prompt (token ids equal, not just text).
2. Two small fine-tunes of it (a few AdamW steps each on two toy skills: sums, capitals).
3. Merge wall time and peak RSS against mergekit 0.1.5 on its real shapes (TIES and task
   arithmetic; float32 and bfloat16), each in a fresh process, with scripts/bench_merge.py's
   measurement, and the largest difference between the two outputs.
4. A short search end to end (task arithmetic genome over the two fine-tunes, HF backend,
   NSGA-II, 2 generations of 4), its wall time, and the best merge's scores.

Writes JSON (--json) and the markdown section between the smollm2 markers of
docs/architectures.md (--doc).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/smollm2_experiment.py /tmp/smollm2 [--workdir W] [--json r.json] [--doc]
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "architectures.md"
BEGIN, END = "<!-- smollm2:begin -->", "<!-- smollm2:end -->"

_spec = importlib.util.spec_from_file_location("bench_merge", ROOT / "scripts" / "bench_merge.py")
BENCH = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BENCH)

EVAL_PROMPTS = ["The capital of France is", "2 + 2 =", "Once upon a time", "def fibonacci(n):",
                "The largest planet in the solar system is", "Water boils at", "My favourite colour is",
                "Translate to French: cat ->"]
SUMS = [(a, b) for a in range(2, 30, 3) for b in range(1, 20, 4)]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
            ("Norway", "Oslo"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran")]


def write_task(path: Path, name: str, rows: list[tuple[str, str]], max_new_tokens: int) -> Path:
    data = path.with_suffix(".jsonl")
    data.write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": p, "answer": a}) + "\n"
                            for i, (p, a) in enumerate(rows)))
    path.write_text(yaml.safe_dump({"name": name, "kind": "generate", "max_new_tokens": max_new_tokens,
                                    "data": data.name, "extract": r"^\s*(-?\d+|[A-Za-z]+)"}))
    return path


def sums_rows():
    return [(f"{a}+{b}=", str(a + b)) for a, b in SUMS]


def capital_rows():
    return [(f"The capital of {c} is", city) for c, city in CAPITALS]


# ---------------------------------------------------------------- 1. eval == generate

def eval_vs_generate(model_dir: Path, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.backends.hf import load_tokenizer
    from evomerge.cli import main as cli

    task = work / "eval_task.yaml"
    data = work / "eval_task.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "answer": "-"}) + "\n"
                            for i, p in enumerate(EVAL_PROMPTS)))
    task.write_text(yaml.safe_dump({"name": "prompts", "kind": "generate", "max_new_tokens": 16,
                                    "data": data.name}))
    out = work / "eval.jsonl"
    t0 = time.perf_counter()
    assert cli(["eval", str(model_dir), "--tasks", str(task), "--out", str(out)]) == 0
    eval_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    equal = 0
    pairs = []
    for row, prompt in zip(rows, EVAL_PROMPTS):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        gen = gen.tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        text = tok.decode(gen, skip_special_tokens=True)
        equal += row["output"] == text
        pairs.append({"prompt": prompt, "evomerge": row["output"], "generate": text})
    return {"prompts": len(EVAL_PROMPTS), "equal": equal, "eval_s": eval_s, "pairs": pairs}


# ---------------------------------------------------------------- 2. fine-tunes

def fine_tune(model_dir: Path, out: Path, rows: list[tuple[str, str]], steps: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.backends.hf import load_tokenizer
    from evomerge.io.atomic import atomic_dir

    if (out / "config.json").exists():
        return {"cached": True}
    torch.manual_seed(seed)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    texts = [f"{p} {a}{tok.eos_token}" for p, a in rows]
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        batch = [texts[(step * 8 + i) % len(texts)] for i in range(8)]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss_first": losses[0], "loss_last": losses[-1]}


# ---------------------------------------------------------------- 3. merge vs mergekit

RECIPES = {
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": [{"model": "ft_a", "parameters": {"weight": 1.0, "density": 0.5}},
                        {"model": "ft_b", "parameters": {"weight": 0.7, "density": 0.5}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": [{"model": "ft_a", "parameters": {"weight": 0.6}},
                                   {"model": "ft_b", "parameters": {"weight": 0.4}}]},
}


# A fork of this (big) process would count its pages in the child's peak RSS until exec: the
# merges are started from a small launcher that reports its own child's peak RSS.
LAUNCHER = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(p.pid, 0)
err = p.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
                             "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
                             "rc": os.waitstatus_to_exitcode(status), "error": err}))
"""


def measure(cmd: list[str], env: dict) -> dict:
    import subprocess

    load = os.getloadavg()[0]
    proc = subprocess.run(["/usr/bin/env", "python3", "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"rc": 1, "error": proc.stderr.strip().splitlines()[-1:], "load_before": load}
    out = json.loads(line[len("RESULT "):])
    if not out["rc"]:
        out.pop("error")
    return {**out, "load_before": load}


def merge_bench(models: dict[str, Path], work: Path, skip_mergekit: bool) -> dict:
    results = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for method, recipe in RECIPES.items():
        for dtype in ("float32", "bfloat16"):
            key = f"{method}_{dtype}"
            cfg = work / "recipes" / f"{key}.yaml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(yaml.safe_dump({**BENCH.with_paths(recipe, models), "dtype": dtype}))
            row = {}
            outs = {tool: work / "out" / tool / key for tool in ("mergekit", "evomerge")}
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
            if not skip_mergekit:
                m = row["mergekit"] = measure([str(BENCH.MERGEKIT_BIN / "mergekit-yaml"), str(cfg),
                                               str(outs["mergekit"]), "--no-cuda", "--copy-tokenizer",
                                               "--random-seed", "0"], env)
            e = row["evomerge"] = measure([sys.executable, "-m", "evomerge.cli", "merge", str(cfg),
                                           str(outs["evomerge"])], env)
            if not skip_mergekit and not m["rc"] and not e["rc"]:
                row["max_abs_diff"], row["worst_tensor"] = BENCH.max_diff(outs["evomerge"], outs["mergekit"])
            results[key] = row
    return results


# ---------------------------------------------------------------- 4. a search

def search(models: dict[str, Path], work: Path, tasks: dict[str, Path], population: int = 4,
           generations: int = 2) -> dict:
    from evomerge.search.archive import Archive
    from evomerge.search.run import SearchRun

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = {
        "seed": 0, "sources": {k: str(v) for k, v in models.items()}, "base": "base",
        "genome": {"kind": "parameter", "method": "task_arithmetic", "granularity": "model", "weight": [0.0, 1.5]},
        "objectives": [{"name": name, "task": str(path)} for name, path in tasks.items()],
        "evaluator": {"kind": "merge", "backend": "hf", "device": "cpu"},
        "optimizer": {"name": "nsga2", "population": population, "generations": generations}, "audit": {"every": 0},
        "workers": {"backend": "local", "count": 1},
    }
    (work / "search.yaml").write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    run = SearchRun.create(work / "search.yaml", run_dir)
    run.run(progress=False)
    run.close()
    wall = time.perf_counter() - t0
    archive = Archive(run_dir, readonly=True)
    try:
        records = [r for r in archive.records() if r["generation"] >= 0]
        sources = archive.meta().get("source_scores", {})
    finally:
        archive.close()
    ok = [r for r in records if r.status == "ok"]
    best = max(ok, key=lambda r: sum(o.value for o in r.objectives.values())) if ok else None
    return {"wall_s": wall, "candidates": len(records), "ok": len(ok),
            "source_scores": {m: {k: v["value"] for k, v in s.items()} for m, s in sources.items()},
            "best": None if best is None else {"id": best.candidate_id,
                                               "scores": {k: v.value for k, v in best.objectives.items()},
                                               "genome": best.genome}}


# ---------------------------------------------------------------- report

def markdown(r: dict) -> str:
    e = r.get("eval") or {"equal": 0, "prompts": 0, "pairs": [{"prompt": "-", "evomerge": "-"}]}
    lines = [f"Machine: 2 shared CPU cores (1-min load average at start {r['load_start']:.1f}); "
             f"conversion (scripts/smollm2_from_gguf.py): {r.get('conversion', {}).get('seconds', '?')} s, "
             f"peak RSS {r.get('conversion', {}).get('peak_rss_mb', '?')} MB.", "",
             f"- **eval = generate**: `evomerge eval` greedy outputs equal transformers' "
             f"`generate(do_sample=False)` on {e['equal']} of {e['prompts']} prompts (16 new tokens each); "
             f"e.g. {e['pairs'][0]['prompt']!r} -> {e['pairs'][0]['evomerge']!r}.",
             f"- **fine-tunes**: " + "; ".join(f"{k}: {v.get('steps')} AdamW steps, loss {v.get('loss_first', 0):.2f} -> "
                                               f"{v.get('loss_last', 0):.2f}" for k, v in r.get("fine_tunes", {}).items()
                                               if not v.get("cached")), ""]
    lines += ["| merge | mergekit 0.1.5: time / peak RSS | evomerge: time / peak RSS | max abs diff |",
              "|---|---|---|---|"]
    for key, row in r.get("merge", {}).items():
        def cell(m):
            if not m:
                return "-"
            if m.get("rc"):
                return "failed: " + " ".join(m.get("error", []))[:80]
            rss = "RSS not measured" if m.get("peak_rss_gb") is None else f"{m['peak_rss_gb']:.2f} GB"
            return f"{m['wall_s']:.0f} s wall, {m['user_s'] + m['sys_s']:.0f} s CPU / {rss} (load {m['load_before']:.0f})"
        diff = row.get("max_abs_diff")
        lines.append(f"| {key} | {cell(row.get('mergekit'))} | {cell(row.get('evomerge'))} | "
                     f"{'-' if diff is None else f'{diff:.1e}'} |")
    s = r.get("search")
    if not s:
        return "\n".join(lines + ["", "- **search**: not measured in this run."]) + "\n"
    lines += ["", f"- **search**: {s['candidates']} candidates ({s['ok']} ok), NSGA-II {s.get('generations', 2)} "
              f"generation(s) x {s.get('population', 4)}, task-arithmetic "
              f"weights of the two fine-tunes, HF backend: {s['wall_s']:.0f} s wall including scoring the "
              f"three sources. Sources: " + "; ".join(f"{m}: " + ", ".join(f"{k} {v:.2f}" for k, v in sc.items())
                                                     for m, sc in s["source_scores"].items())
              + (f". Best merge: " + ", ".join(f"{k} {v:.2f}" for k, v in s["best"]["scores"].items())
                 if s["best"] else "") + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="SmolLM2 HF directory from scripts/smollm2_from_gguf.py")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-smollm2"))
    ap.add_argument("--steps", type=int, default=12, help="AdamW steps per fine-tune")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--parts", default="eval,merge,search", help="comma-separated: eval, merge, search "
                    "(parts left out are taken from --json if it exists)")
    ap.add_argument("--conversion", type=Path, default=None, help="JSON line printed by smollm2_from_gguf.py")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--doc", action="store_true")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    r: dict = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    r["load_start"] = os.getloadavg()[0]
    if args.conversion and args.conversion.exists():
        r["conversion"] = json.loads(args.conversion.read_text())
    if "eval" in parts:
        r["eval"] = eval_vs_generate(args.model, work)
        print("eval:", json.dumps({k: v for k, v in r["eval"].items() if k != "pairs"}), flush=True)
    models = {"base": args.model, "ft_a": work / "ft_sums", "ft_b": work / "ft_capitals"}
    tunes = {"ft_a": fine_tune(args.model, models["ft_a"], sums_rows(), args.steps, 1),
             "ft_b": fine_tune(args.model, models["ft_b"], capital_rows(), args.steps, 2)}
    r["fine_tunes"] = {k: v for k, v in tunes.items() if not v.get("cached")} or r.get("fine_tunes", {})
    print("fine-tunes:", json.dumps(r["fine_tunes"]), flush=True)
    if "merge" in parts:
        r["merge"] = merge_bench(models, work, args.skip_mergekit)
        print("merge:", json.dumps(r["merge"]), flush=True)
    if "search" in parts:
        tasks = {"sums": write_task(work / "sums.yaml", "sums", sums_rows()[::5], 4),
                 "capitals": write_task(work / "capitals.yaml", "capitals", capital_rows()[::2], 4)}
        r["search"] = search(models, work, tasks, args.population, args.generations)
        r["search"].update(population=args.population, generations=args.generations)
        print("search:", json.dumps(r["search"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, default=str) + "\n")
    text = markdown(r)
    print(text)
    if args.doc:
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + text + doc[end:])
    return 0 if r.get("eval", {}).get("equal") == r.get("eval", {}).get("prompts") else 1


if __name__ == "__main__":
    sys.exit(main())
