"""How fast does evaluation scale with Ray workers, and how many can one controller feed?

Three measurements:

1. throughput (candidates/minute) with 1 and 2 Ray workers, on real merges (each worker
   keeps tiny Llama sources resident, merges a candidate in memory with the merge engine,
   swaps the weights into a resident model and scores fixed items -- CPU-bound, so on a
   shared 2-core box it measures the cores as much as the pool) and on device-bound
   candidates (the worker waits, as on a GPU: this shows the pool's own scaling);
2. the controller's own cost per candidate, with evaluations that cost nothing: many
   candidates through RayPool with a no-op evaluator (wall and controller CPU time), the
   cost of one ``ray.wait`` over the in-flight list of a 256-worker pool, and the whole
   SearchRun loop (optimizer ask/tell, archive writes, checkpoints) on the synthetic
   evaluator;
3. workers_supported = candidate turnaround / controller overhead per candidate: how many
   workers one controller keeps busy before it becomes the bottleneck.

    .venv/bin/python scripts/bench_scaling.py --json bench_scaling.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.workers.pool import LocalPool, RayPool  # noqa: E402
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore  # noqa: E402


class NoopEvaluator:
    """Returns a fixed result at once: what is left is the pool's and Ray's own cost."""

    def evaluate(self, candidate: Candidate) -> EvalResult:
        return EvalResult(candidate.candidate_id, "ok",
                          objectives={"score": ObjectiveScore(float(sum(candidate.genome)), 0.0, 1)})


class SleepEvaluator:
    """Stands for a device-bound candidate: the worker waits (as on a GPU) without using
    the CPU, so the scaling it shows is the pool's, not this machine's core count."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def evaluate(self, candidate: Candidate) -> EvalResult:
        time.sleep(self.seconds)
        return EvalResult(candidate.candidate_id, "ok", seconds=self.seconds,
                          objectives={"score": ObjectiveScore(float(sum(candidate.genome)), 0.0, 1)})


class TinyMergeEvaluator:
    """A linear merge of resident tiny Llama sources by the real merge engine, swapped into
    one resident model, scored on fixed token items (next-token agreement with source 0)."""

    def __init__(self, source_dirs: list[str], n_items: int = 32, seq_len: int = 32):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from evomerge.merge.engine import SourceSet, merge
        from evomerge.merge.plan import MergePlan

        torch.set_num_threads(1)   # one core per worker, as Ray's num_cpus=1 promises
        self.torch, self.merge, self.MergePlan = torch, merge, MergePlan
        self.names = list(source_dirs)
        self.sources = SourceSet.load({name: name for name in self.names}, resident=True)
        config = json.loads((Path(source_dirs[0]) / "config.json").read_text())
        self.model = LlamaForCausalLM(LlamaConfig(**config)).eval()
        gen = torch.Generator().manual_seed(0)
        self.items = torch.randint(3, config["vocab_size"], (n_items, seq_len), generator=gen)
        with torch.no_grad():
            self.model.load_state_dict(self._merged([1.0] + [0.0] * (len(self.names) - 1)), strict=False)
            self.reference = self.model(self.items).logits[:, -1].argmax(-1)

    def _merged(self, weights) -> dict:
        plan = self.MergePlan.from_dict({"merge_method": "linear", "models": [
            {"model": name, "parameters": {"weight": float(w)}} for name, w in zip(self.names, weights)]})
        return self.merge(plan, self.sources)

    def evaluate(self, candidate: Candidate) -> EvalResult:
        torch = self.torch
        t0 = time.perf_counter()
        merged = self._merged(np.abs(np.asarray(candidate.genome, dtype=float)) + 1e-6)
        t1 = time.perf_counter()
        with torch.no_grad():
            self.model.load_state_dict(merged, strict=False)   # in place: same shapes
            t2 = time.perf_counter()
            predicted = self.model(self.items).logits[:, -1].argmax(-1)
        agree = (predicted == self.reference).float()
        t3 = time.perf_counter()
        n = len(agree)
        return EvalResult(candidate.candidate_id, "ok", items_scored=n, seconds=t3 - t0,
                          objectives={"agreement": ObjectiveScore(float(agree.mean()),
                                                                  float(agree.std()) / n**0.5, n)},
                          timings={"merge": t1 - t0, "load": t2 - t1, "score": t3 - t2})


def candidates(n: int, dim: int, seed: int = 0) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    return [Candidate(i, 0, rng.uniform(0, 1, dim).tolist(), {}) for i in range(n)]


def run_through(pool, items: list[Candidate]) -> dict[str, float]:
    """Push candidates through a pool with a steady queue; wall and controller CPU time."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for candidate in items:
        pool.submit(candidate)
    statuses = []
    while pool.pending():
        statuses.append(pool.next_result(timeout=600).status)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert statuses.count("ok") == len(items), f"{len(items) - statuses.count('ok')} candidates failed"
    return {"candidates": len(items), "wall_s": wall, "controller_cpu_s": cpu}


def make_sources(root: Path, n_sources: int, hidden: int, layers: int) -> list[str]:
    from evomerge.io.synthetic import make_tiny_llama

    base = make_tiny_llama(root / "base", num_layers=layers, hidden_size=hidden,
                           intermediate_size=hidden * 2, num_attention_heads=8, num_key_value_heads=4,
                           vocab_size=2048, seed=0)
    dirs = [str(base)]
    for i in range(1, n_sources):
        dirs.append(str(make_tiny_llama(root / f"ft{i}", base=base, noise=0.01, seed=i)))
    return dirs


def bench_throughput(factory, n_per_worker: int, dim: int, label: str) -> list[dict]:
    rows = []
    for n_workers in (1, 2):
        t0 = time.perf_counter()
        with RayPool(factory, n_workers, num_cpus=1) as pool:
            startup = time.perf_counter() - t0
            run_through(pool, candidates(2 * n_workers, dim, seed=99))   # warm up
            row = run_through(pool, candidates(n_per_worker * n_workers, dim))
        per_min = 60 * row["candidates"] / row["wall_s"]
        row.update(workers=n_workers, startup_s=startup, candidates_per_minute=per_min,
                   turnaround_s=n_workers * row["wall_s"] / row["candidates"])
        rows.append(row)
    speedup = rows[1]["candidates_per_minute"] / rows[0]["candidates_per_minute"]
    for row in rows:
        print(f"  {label}, {row['workers']} worker(s): {row['candidates_per_minute']:7.1f} candidates/min "
              f"(turnaround {row['turnaround_s']:.3f} s, worker startup {row['startup_s']:.1f} s)")
    print(f"  {label}: 2 workers / 1 worker = {speedup:.2f}x")
    return rows


def bench_pool_overhead(n: int) -> dict:
    local = run_through(LocalPool(NoopEvaluator), candidates(n, 4))
    with RayPool(NoopEvaluator, 2, num_cpus=1) as pool:
        run_through(pool, candidates(50, 4))
        ray_row = run_through(pool, candidates(n, 4))
    out = {"local_pool": local, "ray_pool": ray_row}
    for name, row in out.items():
        row["wall_per_candidate_ms"] = 1e3 * row["wall_s"] / row["candidates"]
        row["controller_cpu_per_candidate_ms"] = 1e3 * row["controller_cpu_s"] / row["candidates"]
        print(f"  {name:10s} no-op: {row['wall_per_candidate_ms']:.3f} ms wall, "
              f"{row['controller_cpu_per_candidate_ms']:.3f} ms controller CPU per candidate")
    return out


def bench_wait_cost(in_flight: int, repeats: int = 50) -> float:
    """Seconds for one ray.wait over ``in_flight`` unfinished refs plus one finished one:
    what each next_result pays in a pool of in_flight/2 workers."""
    import ray

    @ray.remote(num_cpus=0, max_concurrency=in_flight + 8)
    class Gate:
        def __init__(self):
            self.event = asyncio.Event()

        async def wait(self):
            await self.event.wait()

        async def open(self):
            self.event.set()

    gate = Gate.remote()
    blocked = [gate.wait.remote() for _ in range(in_flight)]
    done = ray.put(1)
    ray.wait([done])
    t0 = time.perf_counter()
    for _ in range(repeats):
        ready, _ = ray.wait(blocked + [done], num_returns=1, timeout=10)
        assert ready == [done]
    cost = (time.perf_counter() - t0) / repeats
    ray.get(gate.open.remote())
    ray.get(blocked)
    ray.kill(gate)
    return cost


def bench_search_loop(population: int, generations: int) -> dict:
    """The whole SearchRun loop (optimizer ask/tell, SQLite archive writes, a controller
    checkpoint per generation) on the near-zero-cost synthetic evaluator, in process and
    through a 2-worker RayPool."""
    from evomerge.search.run import SearchRun

    out = {}
    for backend in ("local", "ray"):
        config = {
            "seed": 0, "genome": {"kind": "box", "dim": 16, "lower": 0.0, "upper": 1.0},
            "objectives": [{"name": "f1", "task": "synthetic"}, {"name": "f2", "task": "synthetic"}],
            "evaluator": {"kind": "synthetic"}, "audit": {"every": 0},
            "optimizer": {"name": "nsga2", "population": population, "generations": generations},
            "workers": {"backend": backend, "count": 2, "num_cpus": 1},
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "search.yaml"
            path.write_text(json.dumps(config))   # JSON is YAML
            run = SearchRun.create(path, Path(tmp) / "run", start_pool=True)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            run.run(progress=False)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            run.close()
        n = population * generations
        out[backend] = {"candidates": n, "wall_s": wall, "controller_cpu_s": cpu,
                        "wall_per_candidate_ms": 1e3 * wall / n, "controller_cpu_per_candidate_ms": 1e3 * cpu / n}
        print(f"  SearchRun (nsga2, population {population}, archive + checkpoints), workers.backend={backend}: "
              f"{1e3 * wall / n:.3f} ms wall, {1e3 * cpu / n:.3f} ms controller CPU per candidate")
    # The loop's own share: local wall time with evaluations that cost nothing.
    out["loop_overhead_per_candidate_ms"] = out["local"]["wall_per_candidate_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--candidates-per-worker", type=int, default=12)
    parser.add_argument("--noop-candidates", type=int, default=2000)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256, help="tiny source model width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds per device-bound candidate")
    parser.add_argument("--turnaround", type=float, nargs="*", default=[1.0, 10.0, 60.0],
                        help="candidate turnaround times (s) to state workers_supported for")
    parser.add_argument("--target-workers", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as tmp:
        sources = make_sources(Path(tmp), args.sources, args.hidden, args.layers)
        print(f"throughput, real in-memory merges of {args.sources} tiny Llama sources "
              f"(hidden {args.hidden}, {args.layers} layers; CPU-bound, so bounded by free cores):")
        report["throughput"] = bench_throughput(functools.partial(TinyMergeEvaluator, sources),
                                                args.candidates_per_worker, args.sources, "tiny merges")
    print(f"throughput, device-bound candidates ({args.sleep:g} s each, CPU idle while waiting):")
    report["throughput_device_bound"] = bench_throughput(functools.partial(SleepEvaluator, args.sleep),
                                                         args.candidates_per_worker, 4, "device-bound")
    print(f"controller overhead, {args.noop_candidates} no-op candidates:")
    report["pool_overhead"] = bench_pool_overhead(args.noop_candidates)
    in_flight = 2 * args.target_workers
    wait_small, wait_big = bench_wait_cost(4), bench_wait_cost(in_flight)
    report["ray_wait_s"] = {"in_flight_4": wait_small, f"in_flight_{in_flight}": wait_big}
    print(f"  ray.wait over 4 / {in_flight} in-flight refs: {1e3 * wait_small:.3f} / {1e3 * wait_big:.3f} ms")
    print(f"controller overhead of the whole search loop, {args.population * args.generations} synthetic candidates:")
    search = report["search_loop"] = bench_search_loop(args.population, args.generations)
    ray.shutdown()

    # The controller's time per candidate at the target size: the whole search loop's wall
    # time per candidate with evaluations that cost nothing (the slower of the in-process
    # and the Ray run: it includes the pool, the optimizer, archive writes and fsyncs, and
    # this box's CPU contention, so it errs high), plus the extra ray.wait cost of the
    # in-flight list of a pool that size. The CPU-only figure is given beside it.
    wait_extra_ms = 1e3 * max(0.0, wait_big - wait_small)
    loop_wall_ms = max(search["local"]["wall_per_candidate_ms"], search["ray"]["wall_per_candidate_ms"])
    loop_cpu_ms = search["ray"]["controller_cpu_per_candidate_ms"]
    overhead_s = (loop_wall_ms + wait_extra_ms) / 1e3
    overhead_cpu_s = (loop_cpu_ms + wait_extra_ms) / 1e3
    measured_turnaround = report["throughput"][0]["turnaround_s"]
    turnarounds = [measured_turnaround, *args.turnaround]
    report["controller_overhead_per_candidate_s"] = {"wall": overhead_s, "cpu": overhead_cpu_s}
    report["workers_supported"] = {f"{t:g}": {"wall": t / overhead_s, "cpu": t / overhead_cpu_s}
                                   for t in turnarounds}
    report["break_even_turnaround_s"] = {"wall": args.target_workers * overhead_s,
                                         "cpu": args.target_workers * overhead_cpu_s}
    print(f"controller time per candidate with {args.target_workers} workers: {1e3 * overhead_s:.2f} ms wall "
          f"({1e3 * overhead_cpu_s:.2f} ms CPU) = search loop {loop_wall_ms:.2f} ms wall ({loop_cpu_ms:.2f} CPU) "
          f"+ longer ray.wait {wait_extra_ms:.3f} ms")
    for t in turnarounds:
        workers, workers_cpu = t / overhead_s, t / overhead_cpu_s
        verdict = "ok" if workers >= args.target_workers else "CONTROLLER-BOUND"
        print(f"  turnaround {t:8.3f} s -> one controller keeps {workers:8.0f} workers busy "
              f"({workers_cpu:.0f} by CPU time) [{verdict} at {args.target_workers}]")
    print(f"  the controller is not the bottleneck at {args.target_workers} workers for candidates slower than "
          f"{args.target_workers * overhead_s:.2f} s ({args.target_workers * overhead_cpu_s:.2f} s by CPU time)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
