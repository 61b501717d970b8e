#!/usr/bin/env python
"""Benchmark evomerge against mergekit 0.1.5 and the I/O floor on float32 Llama checkpoints.

In one run: makes three checkpoints in code (a base and two fine-tunes = base + noise;
hidden 1024, 12 layers, intermediate 2816, vocab 32000, untied embeddings, ~220M parameters;
`--medium`: hidden 512, 8 layers, ~42M; cached under --workdir), then for every registered
merge method (or --methods) measures, each in a fresh subprocess (wall time, and the
child's peak RSS from wait4):

  floor           read the files the recipe reads and write as many bytes as its output,
                  fsynced (what no merge tool can beat on this machine, measured beside it)
  mergekit        `mergekit-yaml CONFIG OUT` from .venv-mergekit (scripts/setup_mergekit_venv.sh)
  evomerge disk   `evomerge merge CONFIG OUT`
  evomerge memory `merge(plan, sources)` with the sources resident, timed over --repeats
                  calls after loading (the per-candidate cost of a search worker; 0: skipped)

and prints them with the ratios against the targets: mergekit / evomerge wall time to disk
>= 5, evomerge / mergekit peak memory <= 0.5, mergekit run / in-memory merge >= 10.
Import times are measured separately. The machine is shared, so the 1-minute load
average is printed beside every measurement.

    .venv/bin/python scripts/bench_merge.py [--workdir /tmp/evomerge-bench] [--json bench.json]
                                            [--medium] [--methods ties,sce] [--floor-table]

``--floor-table`` prints the floor / mergekit / evomerge table (ratios to the floor, peak memory)
as markdown, for docs/merge-methods.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_BIN = ROOT / ".venv-mergekit" / "bin"
PY = sys.executable

SHAPE = dict(num_layers=12, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)

def _models(*entries) -> list[dict]:
    return [{"model": m, **({"parameters": p} if p else {})} for m, p in entries]


# One recipe per registered merge method (tests check the lists agree); mergekit 0.1.5 runs all of them.
RECIPES = {
    "linear": {"merge_method": "linear",
               "models": _models(("base", {"weight": 1.0}), ("ft_a", {"weight": 1.0}), ("ft_b", {"weight": 1.0}))},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": _models(("ft_a", {"weight": 0.6}), ("ft_b", {"weight": 0.4}))},
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": _models(("ft_a", {"weight": 1.0, "density": 0.5}), ("ft_b", {"weight": 0.7, "density": 0.5}))},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base",
                  "models": _models(("ft_a", {"weight": 1.0, "density": 0.5}), ("ft_b", {"weight": 0.7, "density": 0.5}))},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "base",
                    "models": _models(("ft_a", {"weight": 0.6, "density": 0.5}), ("ft_b", {"weight": 0.4, "density": 0.5}))},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base",
                    "models": _models(("ft_a", {"weight": 0.6, "density": 0.9}), ("ft_b", {"weight": 0.4, "density": 0.9}))},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base",
                         "models": _models(("ft_a", {"weight": 0.6, "density": 0.9}),
                                           ("ft_b", {"weight": 0.4, "density": 0.9}))},
    "della": {"merge_method": "della", "base_model": "base",
              "models": _models(("ft_a", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
                                ("ft_b", {"weight": 0.7, "density": 0.5, "epsilon": 0.1}))},
    "della_linear": {"merge_method": "della_linear", "base_model": "base",
                     "models": _models(("ft_a", {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
                                       ("ft_b", {"weight": 0.4, "density": 0.5, "epsilon": 0.1}))},
    "slerp": {"merge_method": "slerp", "base_model": "base", "models": _models(("base", None), ("ft_a", None)),
              "parameters": {"t": 0.4}},
    "model_stock": {"merge_method": "model_stock", "base_model": "base",
                    "models": _models(("ft_a", None), ("ft_b", None))},
    "passthrough": {"merge_method": "passthrough", "models": _models(("ft_a", None))},
    "nuslerp": {"merge_method": "nuslerp", "base_model": "base",
                "models": _models(("ft_a", {"weight": 0.6}), ("ft_b", {"weight": 0.4}))},
    "multislerp": {"merge_method": "multislerp", "base_model": "base",
                   "models": _models(("ft_a", {"weight": 0.6}), ("ft_b", {"weight": 0.4}))},
    "karcher": {"merge_method": "karcher", "models": _models(("base", None), ("ft_a", None), ("ft_b", None))},
    "sce": {"merge_method": "sce", "base_model": "base", "models": _models(("ft_a", None), ("ft_b", None)),
            "parameters": {"select_topk": 0.5}},
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "models": _models(("base", None), ("ft_a", None)),
                 "parameters": {"t": 0.001}},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base",
                     "models": _models(("base", None), ("ft_a", None))},
    "ram": {"merge_method": "ram", "base_model": "base", "models": _models(("ft_a", None), ("ft_b", None)),
            "parameters": {"epsilon": 0.002}},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base", "models": _models(("ft_a", None), ("ft_b", None)),
                   "parameters": {"epsilon": 0.002}},
}
for _r in RECIPES.values():
    _r["dtype"] = "float32"

# The floor: read the recipe's input files once (from the page cache, as both tools find them)
# and write the output's number of bytes in 16 MiB chunks, fsynced as evomerge's output is.
FLOOR_CHILD = r"""
import json, os, sys, time
inputs, out_path, n_bytes = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
chunk = bytearray(16 << 20)
view = memoryview(chunk)
t0 = time.perf_counter()
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(chunk):
            pass
t_read = time.perf_counter() - t0
with open(out_path, "wb", buffering=0) as f:
    left = n_bytes
    while left > 0:
        left -= f.write(view[:min(left, len(chunk))])
    os.fsync(f.fileno())
total = time.perf_counter() - t0
os.unlink(out_path)
print("RESULT " + json.dumps({"read_s": t_read, "write_s": total - t_read, "floor_s": total}))
"""


IN_MEMORY_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from evomerge.merge.plan import MergePlan
from evomerge.merge.engine import SourceSet, merge
t_import = time.perf_counter() - t0
cfg, refs, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
plan = MergePlan.from_yaml(cfg)
t0 = time.perf_counter()
sources = SourceSet.load({r: r for r in refs}, resident=True)
t_load = time.perf_counter() - t0
times, cpu_times, n_params = [], [], 0
for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    weights = merge(plan, sources)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
    n_params = sum(t.numel() for t in weights.values())
    del weights
print("RESULT " + json.dumps({"import_s": t_import, "load_s": t_load, "merge_s": times, "merge_cpu_s": cpu_times,
                              "n_params": n_params, "threads": torch.get_num_threads()}))
"""


def load1() -> float:
    return os.getloadavg()[0]


def measure_rss(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd in a fresh process: wall time, and that child's own peak RSS (reaped with wait4)."""
    load_before = load1()
    t0 = time.perf_counter()
    out_f = open(f"/tmp/bench_merge.{os.getpid()}.out", "w+")
    err_f = open(f"/tmp/bench_merge.{os.getpid()}.err", "w+")
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    for f in (out_f, err_f):
        f.close()
        os.unlink(f.name)
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "rc": proc.returncode,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "stdout": out, "stderr": err, "load_before": load_before, "load_after": load1()}


# Large enough that the embeddings and MLP matrices (32768+ entries) take the numba kernels.
TINY_SHAPE = dict(num_layers=2, hidden_size=64, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False)


def build_models(folder: Path, shape: dict) -> tuple[dict[str, Path], float]:
    sys.path.insert(0, str(ROOT))
    from evomerge.io.synthetic import make_tiny_llama

    t0 = time.perf_counter()
    models = {name: folder / name for name in ("base", "ft_a", "ft_b")}
    if not (models["base"] / "config.json").exists():
        make_tiny_llama(models["base"], seed=1, overwrite=True, **shape)
    for seed, name in ((2, "ft_a"), (3, "ft_b")):
        if not (models[name] / "config.json").exists():
            make_tiny_llama(models[name], base=models["base"], noise=0.002, seed=seed, overwrite=True)
    return models, time.perf_counter() - t0


def with_paths(recipe: dict, models: dict[str, Path]) -> dict:
    r = json.loads(json.dumps(recipe))
    if "base_model" in r:
        r["base_model"] = str(models[r["base_model"]])
    for m in r["models"]:
        m["model"] = str(models[m["model"]])
    return r


def max_diff(dir_a: Path, dir_b: Path) -> tuple[float, str | None]:
    """Worst absolute difference between two output checkpoints, streamed tensor by tensor."""
    from safetensors import safe_open

    def index(d):
        idx = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    idx[k] = f
        return idx

    ia, ib = index(dir_a), index(dir_b)
    if set(ia) != set(ib):
        return float("inf"), f"tensor names differ ({len(ia)} vs {len(ib)})"
    worst, worst_name = 0.0, None
    for k in sorted(ia):
        with safe_open(str(ia[k]), framework="pt") as ha, safe_open(str(ib[k]), framework="pt") as hb:
            d = (ha.get_tensor(k).float() - hb.get_tensor(k).float()).abs().max().item()
        if d > worst or worst_name is None:
            worst, worst_name = d, k
    return worst, worst_name


def fmt_ratio(x: float | None, target: str) -> str:
    return "-" if x is None else f"{x:.2f}x ({target})"


def print_table(results: dict) -> None:
    print("\nwall time / peak RSS per merge (fresh process each; load = 1-min load average before)")
    hdr = (f"{'method':<16} {'mergekit':>18} {'evomerge disk':>18} {'evomerge mem':>22}  "
           f"{'wall mk/evo':>16} {'mem evo/mk':>17} {'mk/in-mem':>17}  max|diff|")
    print(hdr)
    print("-" * len(hdr))
    cpu_rows: list[str] = []
    for method, row in results["methods"].items():
        mk, ed, em = row.get("mergekit"), row.get("evomerge_disk"), row.get("evomerge_memory")

        def cell(m):
            if not m or m.get("rc"):
                return "failed" if m else "-"
            return f"{m['wall_s']:.1f}s {m['peak_rss_gb']:.2f}GB L{m['load_before']:.1f}"

        mem_cell = "failed"
        t_mem = None
        if em and not em.get("rc"):
            t_mem = sorted(em["merge_s"])[len(em["merge_s"]) // 2]
            mem_cell = f"{t_mem:.2f}s {em['peak_rss_gb']:.2f}GB L{em['load_before']:.1f}"
        ok_mk = mk and not mk.get("rc")
        ok_ed = ed and not ed.get("rc")
        r_wall = mk["wall_s"] / ed["wall_s"] if ok_mk and ok_ed else None
        r_mem = ed["peak_rss_gb"] / mk["peak_rss_gb"] if ok_mk and ok_ed else None
        r_inmem = mk["wall_s"] / t_mem if ok_mk and t_mem else None
        # CPU seconds (user + sys) are far less sensitive than wall time to other users' load.
        cpu = lambda m: m["user_s"] + m["sys_s"]
        r_cpu = cpu(mk) / cpu(ed) if ok_mk and ok_ed else None
        cpu_rows.append(f"  {method}: CPU s mergekit {cpu(mk) if ok_mk else float('nan'):.1f}, "
                        f"evomerge disk {cpu(ed) if ok_ed else float('nan'):.1f}"
                        + (f" -> {r_cpu:.2f}x" if r_cpu else "")
                        + (f"; in-memory merge CPU s {min(em['merge_cpu_s']):.1f} -> "
                           f"{cpu(mk) / min(em['merge_cpu_s']):.1f}x" if ok_mk and em and em.get("merge_cpu_s") else ""))
        row["ratios"] = {"wall_mergekit_over_evomerge_disk": r_wall,
                         "cpu_mergekit_over_evomerge_disk": r_cpu,
                         "peak_mem_evomerge_disk_over_mergekit": r_mem,
                         "mergekit_wall_over_in_memory_merge": r_inmem}
        row["targets_met"] = {"wall>=5": r_wall is not None and r_wall >= 5,
                              "mem<=0.5": r_mem is not None and r_mem <= 0.5,
                              "in_memory>=10": r_inmem is not None and r_inmem >= 10}
        diff = row.get("max_abs_diff_vs_mergekit")
        print(f"{method:<16} {cell(mk):>18} {cell(ed):>18} {mem_cell:>22}  "
              f"{fmt_ratio(r_wall, '>=5'):>16} {fmt_ratio(r_mem, '<=0.5'):>17} "
              f"{fmt_ratio(r_inmem, '>=10'):>17}  {'-' if diff is None else f'{diff:.1e}'}")
    print("\n".join(cpu_rows))
    for method, row in results["methods"].items():
        em = row.get("evomerge_memory", {})
        if em and not em.get("rc"):
            print(f"  {method}: in-memory import {em['import_s']:.2f}s, load sources {em['load_s']:.1f}s, "
                  f"merges {', '.join(f'{t:.2f}s' for t in em['merge_s'])} ({em['threads']} torch threads)")


def floor_table(results: dict) -> str:
    """Markdown: per method the floor, mergekit and evomerge (disk) wall time and peak memory, with ratios;
    evomerge's fixed cost (the same recipe on tiny models) and its time beyond it against the floor."""
    shape = results.get("shape", {})
    lines = [f"{results.get('cpus')} cores, three float32 checkpoints of {results.get('model_bytes', 0) / 1e9:.2f} GB "
             f"(hidden {shape.get('hidden_size')}, {shape.get('num_layers')} layers, vocab {shape.get('vocab_size')}); "
             "each tool in a fresh process (imports included), the floor measured beside it in the same run; "
             "fixed = `evomerge merge` of the same recipe on 1.4 MB models (interpreter, imports, numba), "
             "first = the same before numba's cache held the method's kernels (once per machine); "
             "L = 1-minute load average before the measurement.", "",
             "| method | floor s (read + write) | mergekit s / GB | evomerge s / GB | mergekit / floor | "
             "evomerge / floor | evomerge fixed s (first) | evomerge - fixed / floor | evomerge / mergekit memory | "
             "CPU s mergekit / evomerge | L |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in results["methods"].items():
        fl, mk, ed = row.get("floor"), row.get("mergekit"), row.get("evomerge_disk")
        fixed, first = row.get("evomerge_fixed"), row.get("evomerge_first_run")
        ok = lambda m: bool(m) and not m.get("rc")
        cell = lambda m: f"{m['wall_s']:.1f} / {m['peak_rss_gb']:.2f}" if ok(m) else ("failed" if m else "-")
        floor = f"{fl['floor_s']:.1f} ({fl['read_s']:.1f} + {fl['write_s']:.1f})" if fl else "-"
        r_mk = f"{mk['wall_s'] / fl['floor_s']:.2f}x" if fl and ok(mk) else "-"
        r_ed = f"{ed['wall_s'] / fl['floor_s']:.2f}x" if fl and ok(ed) else "-"
        fix = f"{fixed['wall_s']:.1f} ({first['wall_s']:.1f})" if ok(fixed) and ok(first) else "-"
        r_beyond = f"{(ed['wall_s'] - fixed['wall_s']) / fl['floor_s']:.2f}x" if fl and ok(ed) and ok(fixed) else "-"
        r_mem = f"{ed['peak_rss_gb'] / mk['peak_rss_gb']:.2f}" if ok(mk) and ok(ed) else "-"
        load = f"{ed['load_before']:.1f}" if ok(ed) else "-"
        cpu = lambda m: f"{m['user_s'] + m['sys_s']:.1f}" if ok(m) else "-"
        lines.append(f"| {method} | {floor} | {cell(mk)} | {cell(ed)} | {r_mk} | {r_ed} | {fix} | {r_beyond} | "
                     f"{r_mem} | {cpu(mk)} / {cpu(ed)} | {load} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench"))
    ap.add_argument("--methods", default=",".join(RECIPES), help="comma-separated subset (default: every method)")
    ap.add_argument("--repeats", type=int, default=3, help="in-memory merges timed per method")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny models: a smoke test of this script")
    ap.add_argument("--medium", action="store_true", help="~42M-parameter models (hidden 512, 8 layers)")
    ap.add_argument("--floor-table", action="store_true",
                    help="with --table-from: print the floor / mergekit / evomerge table as markdown")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table-from", type=Path, default=None,
                    help="only print the table of an earlier run's --json file")
    args = ap.parse_args()
    if args.table_from:
        data = json.loads(args.table_from.read_text())
        if args.floor_table:
            print(floor_table(data), end="")
        else:
            print_table(data)
        return 0
    if args.medium:
        SHAPE.update(num_layers=8, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                     num_key_value_heads=8, vocab_size=16000)
    if args.small:
        SHAPE.update(num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=256)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # An empty numba cache, so each method's first run shows what compiling its kernels costs.
    numba_cache = work / "numba-cache"
    shutil.rmtree(numba_cache, ignore_errors=True)
    env["NUMBA_CACHE_DIR"] = str(numba_cache)

    print(f"cpus: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    models, t_build = build_models(work / "models", SHAPE)
    # The same recipes on 2-layer models of hidden size 64 (~1.4 MB): a merge of next to no
    # bytes, so its wall time is the command's fixed cost (interpreter, imports, numba's start).
    tiny, _ = build_models(work / "models-tiny", TINY_SHAPE)
    n_bytes = sum(f.stat().st_size for f in models["base"].glob("*.safetensors"))
    print(f"models ready in {t_build:.1f}s: 3 x {n_bytes / 1e9:.2f} GB float32 under {work / 'models'}",
          flush=True)

    results: dict = {"shape": SHAPE, "model_bytes": n_bytes, "cpus": os.cpu_count(),
                     "load_at_start": os.getloadavg(), "methods": {}}

    # Import cost alone (interpreter start included), as each tool pays it per run.
    imports = {}
    if not args.skip_mergekit:
        imports["mergekit"] = measure_rss([str(MERGEKIT_BIN / "python"), "-c",
                                           "import mergekit.scripts.run_yaml, mergekit.merge"], env)
    imports["evomerge"] = measure_rss([PY, "-c", "import evomerge.cli, evomerge.merge.command, evomerge.merge.engine"],
                                      env)
    results["import"] = {k: {"wall_s": v["wall_s"], "load": v["load_before"], "rc": v["rc"]}
                         for k, v in imports.items()}
    print("import: " + ", ".join(f"{k} {v['wall_s']:.2f}s" for k, v in imports.items()), flush=True)

    for method in args.methods.split(","):
        recipe = with_paths(RECIPES[method], models)
        cfg = work / f"{method}.yaml"
        cfg.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
        refs = sorted({recipe.get("base_model")} - {None} | {m["model"] for m in recipe["models"]})
        row: dict = {}
        out_mk, out_evo = work / "out-mergekit", work / "out-evomerge"
        for d in (out_mk, out_evo):
            shutil.rmtree(d, ignore_errors=True)

        if not args.skip_mergekit:
            r = measure_rss([str(MERGEKIT_BIN / "mergekit-yaml"), str(cfg), str(out_mk), "--no-cuda",
                             "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], env)
            row["mergekit"] = {k: r[k] for k in ("wall_s", "peak_rss_gb", "user_s", "sys_s", "rc",
                                                 "load_before", "load_after")}
            if r["rc"]:
                print(f"[{method}] mergekit failed: {r['stderr'][-500:]}")
        # Two runs on the tiny models first: the first compiles the method's numba kernels when
        # this machine's cache lacks them (once per machine and install), the second is the fixed cost.
        tiny_cfg = work / f"{method}-tiny.yaml"
        tiny_cfg.write_text(json.dumps(with_paths(RECIPES[method], tiny)))
        for key in ("evomerge_first_run", "evomerge_fixed"):
            shutil.rmtree(out_evo, ignore_errors=True)
            r = measure_rss([PY, "-m", "evomerge.cli", "merge", str(tiny_cfg), str(out_evo)], env)
            row[key] = {k: r[k] for k in ("wall_s", "peak_rss_gb", "rc", "load_before")}
        shutil.rmtree(out_evo, ignore_errors=True)
        r = measure_rss([PY, "-m", "evomerge.cli", "merge", str(cfg), str(out_evo)], env)
        row["evomerge_disk"] = {k: r[k] for k in ("wall_s", "peak_rss_gb", "user_s", "sys_s", "rc",
                                                  "load_before", "load_after")}
        if r["rc"]:
            print(f"[{method}] evomerge merge failed: {r['stderr'][-500:]}")
        elif not args.skip_mergekit and not row["mergekit"]["rc"]:
            row["max_abs_diff_vs_mergekit"], row["worst_tensor"] = max_diff(out_evo, out_mk)
        if not r["rc"]:
            # The floor for this recipe, measured now: same input files, same output bytes.
            out_bytes = sum(f.stat().st_size for f in out_evo.glob("*.safetensors"))
            files = [str(f) for ref in refs for f in sorted(Path(ref).glob("*.safetensors"))]
            fl = measure_rss([PY, "-c", FLOOR_CHILD, json.dumps(files), str(work / "floor.bin"), str(out_bytes)], env)
            line = next((l for l in fl["stdout"].splitlines() if l.startswith("RESULT ")), None)
            if fl["rc"] or line is None:
                print(f"[{method}] floor measurement failed: {fl['stderr'][-500:]}")
            else:
                row["floor"] = {**json.loads(line[len("RESULT "):]), "input_bytes": sum(os.path.getsize(f) for f in files),
                                "output_bytes": out_bytes, "load_before": fl["load_before"]}
        for d in (out_mk, out_evo):
            shutil.rmtree(d, ignore_errors=True)

        r = measure_rss([PY, "-c", IN_MEMORY_CHILD, str(cfg), json.dumps(refs), str(args.repeats)], env) \
            if args.repeats > 0 else {"rc": 0, "stdout": "", "skipped": True}
        line = next((l for l in r["stdout"].splitlines() if l.startswith("RESULT ")), None)
        if r.get("skipped"):
            pass
        elif r["rc"] or line is None:
            print(f"[{method}] in-memory merge failed: {r['stderr'][-500:]}")
            row["evomerge_memory"] = {"rc": r["rc"] or 1}
        else:
            inner = json.loads(line[len("RESULT "):])
            row["evomerge_memory"] = {"wall_s": r["wall_s"], "peak_rss_gb": r["peak_rss_gb"],
                                      "load_before": r["load_before"], "load_after": r["load_after"],
                                      "rc": 0, **inner}
        results["methods"][method] = row
        print(f"[{method}] done: " + ", ".join(
            f"{k} {v.get('wall_s', v.get('floor_s', float('nan'))):.1f}s"
            + (f" {v['peak_rss_gb']:.2f}GB" if "peak_rss_gb" in v else "")
            for k, v in row.items() if isinstance(v, dict)), flush=True)
        if args.json:  # partial results survive an interrupted run
            args.json.write_text(json.dumps(results, indent=2))

    print_table(results)
    print()
    print(floor_table(results), end="")
    results["load_at_end"] = os.getloadavg()
    print(f"load average at end: {results['load_at_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
