"""Peak memory of one worker, before and after streaming: search (K candidates) and export.

For N = 2..4 synthetic Llama sources of about 100 MB each (``evomerge.io.synthetic``: a
base and N-1 noisy fine-tunes of it, float32), each measurement runs in a fresh process
and reports its peak resident set (``VmHWM``, which counts mapped file pages while they
are mapped) above the process's baseline (after importing torch and transformers,
before any model is touched), in units of S, one source's bytes:

- search, before: sources read into memory, each candidate merged into a dict, the dict
  checked and copied into the HF model (``load_weights``): the evaluator up to issue 21.
- search, after: ``CandidateEvaluator`` as it is: sources mapped from the page cache, the
  merge streamed into the model tensor by tensor (``HFBackend.load_stream``).
- search, after, sources resident: the same streaming, sources read into memory (what
  a worker with the sources on its GPU does; here on the CPU).
- export, before: sources read into memory, the merge buffered into a shard of up to
  1 GiB (the whole model here), then written.
- export, after: ``export_records`` as it is (sources mapped, each tensor written as it
  is merged).
- ... staged: the same "after" paths for staged candidates (``combined`` genome: TIES, then
  data flow over its output; the first stage's output is held while the last streams).

Then, in this process, one merge's time from mapped and from resident sources.

``--backend vllm`` (run with ``.venv-vllm/bin/python``) measures a worker whose backend is
a vLLM engine (vLLM's CPU build), sources mapped:

- search-dict: the in-process engine as it was up to issue 21: each candidate's merge
  collected into a dict (``merge_with_config``), checked, handed to ``load_weights``.
- search-after: ``CandidateEvaluator`` as it is: the merge streamed into vLLM's
  ``reload_weights`` tensor by tensor (``VLLMBackend.load_stream``).
- search-multiprocess: ``evaluator.multiprocess: true``: vLLM's engine runs in a process of
  its own, which merges each plan itself (``backends.vllm_extension``). The figure is the
  worker's peak plus the engine process's (``VmHWM``, its own start included) less the
  engine process's peak in the warm-up on small models.

K candidates are TIES merges of all N sources (genomes drawn from the search's own
parameter space), each scored on 10 zoo/arith items (likelihood scoring: a graded score,
so before and after are compared on more than 0/1 answers of random models). The model's prediction is printed
next to each figure (see docs/cluster.md, "Memory per worker").

    PYTHONPATH=. .venv/bin/python scripts/bench_memory.py [--sources 2 3 4] [--candidates 3]
    PYTHONPATH=. .venv-vllm/bin/python scripts/bench_memory.py --backend vllm --sources 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# About 100 MB in float32 (25.4M parameters) with the zoo's 125-token tokenizer.
SHAPE = dict(num_layers=4, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=128)
MODES = ("search-before", "search-after", "search-after-resident", "search-after-staged",
         "export-before", "export-after", "export-after-staged")
# A staged candidate: a TIES merge, then data flow over its output and the sources (at most
# as deep as the sources, so the engine is not rebuilt deeper).
VLLM_MODES = ("search-dict", "search-after", "search-multiprocess")
STAGED = {"kind": "combined", "parameter": {"method": "ties"},
          "data_flow": {"repetitions": 1, "max_layers": SHAPE["num_layers"]}}


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def engine_processes_hwm_kb() -> int:
    """Summed peak RSS (``VmHWM``) of this process's descendants: vLLM's engine process (and
    its workers) in multiprocess mode, 0 otherwise."""
    todo, total = [os.getpid()], 0
    while todo:
        pid = todo.pop()
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in children.read_text().split():
                todo.append(int(child))
                try:
                    total += int(next(line.split()[1] for line in Path(f"/proc/{child}/status").read_text()
                                      .splitlines() if line.startswith("VmHWM:")))
                except (OSError, StopIteration):   # ended meanwhile, or a zombie
                    pass
    return total


def make_sources(root: Path, n: int, shape: dict = SHAPE) -> dict[str, str]:
    from evomerge.io.synthetic import make_tiny_llama
    from evomerge.zoo.tokenizer import save_tokenizer

    tok = root / "tokenizer"
    if not tok.exists():
        tok.mkdir(parents=True)
        save_tokenizer(tok)
    base = root / "s0"
    if not base.exists():
        make_tiny_llama(base, seed=0, tokenizer_from=tok, **shape)
    paths = {"s0": str(base)}
    for i in range(1, n):
        path = root / f"s{i}"
        if not path.exists():
            make_tiny_llama(path, base=base, noise=0.01, seed=i, tokenizer_from=tok)
        paths[f"s{i}"] = str(path)
    return paths


def plans(paths: dict[str, str], k: int, staged: bool = False) -> list[dict]:
    import numpy as np

    from evomerge.search.genome import build_space

    names = list(paths)
    space = build_space(STAGED if staged else {"method": "ties"}, names, names[0], SHAPE["num_layers"])
    rng = np.random.default_rng(0)
    return [space.decode(space.random(rng)).to_dict() for _ in range(k)]


# --------------------------------------------------------------------------- one measurement (child)

def measure(mode: str, paths: dict[str, str], k: int, out_dir: Path, backend: str = "hf") -> dict:
    """Peak RSS of ``mode`` above the process's own baseline. The baseline is taken after the
    same mode ran once on small models (code loaded and paged in, merge kernels compiled by
    numba, the peak then reset through /proc/self/clear_refs), so what remains is what
    the models' size costs. ``VmHWM`` counts every resident page, file-backed ones too
    (mapped source tensors; a few MB of library code paged in for the first large
    tensors); the anonymous part (memory the process owns, ``RssAnon``) is sampled
    every millisecond besides."""
    import threading

    small = make_sources(out_dir / "warm", len(paths), dict(SHAPE, hidden_size=256, intermediate_size=512,
                                                             num_attention_heads=4, num_key_value_heads=2))
    warm = run_mode(mode, small, 1, out_dir / "warm-out", backend)
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
    baseline, anon0 = status_kb("VmRSS"), status_kb("RssAnon")
    anon_peak, done = [anon0], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            anon_peak[0] = max(anon_peak[0], status_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        detail = run_mode(mode, paths, k, out_dir, backend)
    finally:
        done.set()
        sampler.join()
    peak, seconds = status_kb("VmHWM") - baseline, round(time.perf_counter() - t0, 2)
    if "start_hwm_kb" in detail:
        detail["start_kb"] = detail.pop("start_hwm_kb") - baseline - warm.get("engine_hwm_kb", 0)
    if detail.get("engine_hwm_kb"):     # the engine's own process: its peak above the warm-up's
        detail["worker_peak_kb"] = peak
        peak += detail["engine_hwm_kb"] - warm["engine_hwm_kb"]
    if "exported" in detail:          # after the peak was read: checking the output costs memory too
        detail["tensors_sha256"] = [tensors_digest(Path(d)) for d in detail.pop("exported")]
    return {"mode": mode, "peak_kb": peak, "anon_peak_kb": anon_peak[0] - anon0, "baseline_kb": baseline,
            "seconds": seconds, **detail}


def run_mode(mode: str, paths: dict[str, str], k: int, out_dir: Path, backend: str = "hf") -> dict:
    from evomerge.merge.engine import SourceSet
    from evomerge.workers.evaluator import CandidateEvaluator, EvaluatorSpec, ObjectiveSpec
    from evomerge.workers.types import Candidate

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = plans(paths, k, staged=mode.endswith("staged"))
    detail: dict = {}
    if mode.startswith("search"):
        spec = EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec("arith", "zoo/arith", "subset", subset=10,
                                                         scoring="likelihood")],
                             sources=dict(paths), model_dir=paths["s0"], threads=1, backend=backend,
                             multiprocess=mode == "search-multiprocess")
        evaluator = CandidateEvaluator(spec)
        # the peak so far: the engine's start (and for vLLM its first load), before any candidate
        detail["start_hwm_kb"] = status_kb("VmHWM") + engine_processes_hwm_kb()
        if mode == "search-before":
            evaluator.sources = SourceSet.load(paths, resident=True)
            run = lambda c: evaluate_before(evaluator, c)   # noqa: E731
        elif mode == "search-dict":     # the sources stay mapped: only the merged dict is the old path's
            evaluator.sources = evaluator.scorer.sources
            run = lambda c: evaluate_before(evaluator, c)   # noqa: E731
        elif mode == "search-after-resident":
            evaluator.sources = SourceSet.load(paths, resident=True)
            run = evaluator.evaluate
        else:
            run = evaluator.evaluate
        results = [run(Candidate(i, 0, [], plan)) for i, plan in enumerate(todo)]
        bad = [r.error for r in results if r.status != "ok"]
        if bad:
            raise SystemExit(f"{mode}: candidate failed: {bad[0]}")
        detail["scores"] = [f'{r.objectives["arith"].value:.6e}' for r in results]
        detail["merge_s"] = [round(r.timings.get("merge", 0.0), 3) for r in results]
        detail["load_s"] = [round(r.timings.get("load", 0.0), 3) for r in results]
        if backend == "vllm":          # read while the engine (process) still runs, then shut it down
            detail["engine_hwm_kb"] = engine_processes_hwm_kb()
            detail["kv_cache_bytes"] = evaluator.backend.engine_options.get("kv_cache_memory_bytes", 0)
            evaluator.backend.close()
    else:
        from evomerge.search.archive import Record
        from evomerge.search.export import export_records
        from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore

        records = [Record(Candidate(candidate_id=i, generation=0, genome=[], plan=plan),
                          EvalResult(candidate_id=i, status="ok",
                                     objectives={"arith": ObjectiveScore(value=0.0, stderr=0.0, n_items=0)}))
                   for i, plan in enumerate(todo)]
        run_dir = out_dir / "run"
        run_dir.mkdir(exist_ok=True)
        if mode == "export-before":
            export_before(records, paths, out_dir / "export")
        else:
            export_records(records, run_dir, out_dir / "export", paths=paths)
        detail["exported"] = [str(d) for d in sorted((out_dir / "export").iterdir())]
    return detail


def tensors_digest(model_dir: Path) -> str:
    """A digest of every tensor's name, dtype, shape and bytes (not of the file: the two
    writers lay out the safetensors header differently)."""
    import hashlib

    import torch

    from evomerge.io.checkpoint import Checkpoint

    digest, ck = hashlib.sha256(), Checkpoint(model_dir)
    for name in sorted(ck.tensor_names):
        t = ck.get(name)
        digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    ck.close()
    return digest.hexdigest()[:16]


def evaluate_before(evaluator, candidate):
    """The evaluator's merge + load as it was before streaming: the whole merged model as a
    dict, each tensor checked for NaN/inf, then copied into the model by ``load_weights``."""
    from evomerge.merge.staged import merge_with_config, plan_from_dict
    from evomerge.workers.types import EvalResult

    start = time.perf_counter()
    t = time.perf_counter()
    weights, config = merge_with_config(plan_from_dict(candidate.plan), evaluator.sources)
    timings = {"merge": time.perf_counter() - t}
    bad = next((n for n, w in weights.items() if w.is_floating_point() and not bool(w.isfinite().all())), None)
    if bad is not None:
        return EvalResult(candidate.candidate_id, "failed", error=f"merged tensor {bad} has NaN/inf values")
    t = time.perf_counter()
    evaluator.backend.load_weights(weights, config)
    del weights
    timings["load"] = time.perf_counter() - t
    return evaluator._scored(candidate, None, start, timings)[0]


def export_before(records, paths: dict[str, str], out: Path) -> None:
    """The export's writing path before streaming: resident sources, buffered shards."""
    from evomerge.io.checkpoint import write_checkpoint
    from evomerge.merge.engine import SourceSet, iter_merge, output_config
    from evomerge.merge.staged import plan_from_dict

    sources = SourceSet.load(paths)
    for rec in records:
        plan = plan_from_dict(rec.plan)
        write_checkpoint(out / f"candidate-{rec.candidate_id}", iter_merge(plan, sources),
                         output_config(plan, sources), tokenizer_from=paths["s0"])


# --------------------------------------------------------------------------- the memory model

def predicted(mode: str, n: int, largest: float, kv: float = 0.0) -> float:
    """Peak above the baseline in units of S (docs/cluster.md): N resident sources, the
    engine's own weights (1), the merged dict (1, before), a staged plan's first-stage
    output (1), and a few tensors in flight (``largest``: the biggest tensor, as a fraction
    of S; about N + 2 of them: the N inputs being merged, the result, the method's
    temporaries). A vLLM engine adds its KV cache (``kv``, in S)."""
    flight = (n + 2) * largest
    return {"search-before": n + 2, "search-after": 1, "search-after-resident": n + 1,
            "search-after-staged": 2, "export-before": n + 1, "export-after": 0,
            "export-after-staged": 1, "search-dict": 2, "search-multiprocess": 1}[mode] + flight + kv


def merge_speed(paths: dict[str, str], k: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one merge (iter_merge run to its end, one torch thread) from mapped
    sources and from resident ones, interleaved: what mapping each tensor again costs."""
    import statistics

    import torch

    from evomerge.merge.engine import SourceSet, iter_merge
    from evomerge.merge.staged import plan_from_dict

    torch.set_num_threads(1)
    sets = {"mapped": SourceSet.load(paths, resident=False), "resident": SourceSet.load(paths, resident=True)}
    todo = [plan_from_dict(p) for p in plans(paths, k)]
    seconds: dict[str, list[float]] = {name: [] for name in sets}
    for _ in range(repeats):
        for name, sources in sets.items():
            for plan in todo:
                t = time.perf_counter()
                for _ in iter_merge(plan, sources):
                    pass
                seconds[name].append(time.perf_counter() - t)
    return {name: round(statistics.median(v), 3) for name, v in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                        help="the worker's backend (vllm: run with .venv-vllm/bin/python)")
    parser.add_argument("--modes", nargs="+", choices=MODES + VLLM_MODES,
                        help=f"default: {' '.join(MODES)}; with --backend vllm: {' '.join(VLLM_MODES)}")
    parser.add_argument("--workdir", type=Path, help="keep the synthetic sources here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure(job["mode"], job["paths"], job["k"], Path(job["out"]), job["backend"])))
        return 0
    args.modes = args.modes or list(VLLM_MODES if args.backend == "vllm" else MODES)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        paths = make_sources(root / "sources", max(args.sources))
        from evomerge.io.checkpoint import Checkpoint

        ck = Checkpoint(paths["s0"])
        sizes = [ck.shape(n) for n in ck.tensor_names]
        import math

        s_bytes = sum(math.prod(s) for s in sizes) * 4
        largest = max(math.prod(s) for s in sizes) * 4 / s_bytes
        print(f"S = {s_bytes / 1e6:.1f} MB per source (float32, {SHAPE}), largest tensor {largest:.3f} S; "
              f"K = {args.candidates} candidates, backend {args.backend}")
        print(f"{'N':>2} {'measurement':<24} {'peak/S':>7} {'anon/S':>7} {'model':>6} {'seconds':>8}  detail")
        rows = []
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        for n in args.sources:
            sub = {k: v for k, v in list(paths.items())[:n]}
            for mode in args.modes:
                out = Path(tempfile.mkdtemp(dir=root))
                job = json.dumps({"mode": mode, "paths": sub, "k": args.candidates, "out": str(out),
                                  "backend": args.backend})
                proc = subprocess.run([sys.executable, __file__, "--child", job], env=env, capture_output=True,
                                      text=True)
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(n=n, peak_S=round(row["peak_kb"] * 1024 / s_bytes, 2),
                           anon_S=round(row["anon_peak_kb"] * 1024 / s_bytes, 2),
                           model_S=round(predicted(mode, n, largest, row.get("kv_cache_bytes", 0) / s_bytes), 2))
                if "start_kb" in row:
                    row["start_S"] = round(row["start_kb"] * 1024 / s_bytes, 2)
                if "worker_peak_kb" in row:
                    row["worker_S"] = round(row["worker_peak_kb"] * 1024 / s_bytes, 2)
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
                extra = {k: row[k] for k in ("start_S", "worker_S", "merge_s", "load_s", "scores", "tensors_sha256")
                         if k in row}
                print(f"{n:>2} {mode:<24} {row['peak_S']:>7.2f} {row['anon_S']:>7.2f} {row['model_S']:>6.2f} "
                      f"{row['seconds']:>8.1f}  "
                      f"{json.dumps(extra)}", flush=True)
        same = all(a.get("scores") == b.get("scores") and a.get("tensors_sha256") == b.get("tensors_sha256")
                   for a in rows for b in rows if a["n"] == b["n"] and a["mode"].split("-")[0] == b["mode"].split("-")[0]
                   and a["mode"].endswith("staged") == b["mode"].endswith("staged"))
        print(f"before and after give the same scores / the same exported bytes: {same}")
        speed = None                    # the merge's speed does not depend on the backend: HF runs only
        if args.backend == "hf":
            speed = merge_speed(paths, args.candidates)
            print(f"one TIES merge of the {max(args.sources)} sources (median, one thread): "
                  f"{speed['mapped']:.3f} s mapped, {speed['resident']:.3f} s resident")
        if args.json:
            args.json.write_text(json.dumps({"backend": args.backend, "S_bytes": s_bytes, "largest_tensor_S": largest,
                                             "rows": rows, "merge_seconds": speed}, indent=2))
        return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
