"""A whole search through RayPool: the same archive as the single-process path, and a
search that survives a worker killed in the middle of it."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import yaml

pytest.importorskip("ray")

from evomerge.search.archive import Archive  # noqa: E402
from evomerge.search.run import SearchRun  # noqa: E402


def comparable(records: list[dict]) -> list[tuple]:
    """What must match between runs: everything but where and when it was evaluated."""
    return [(r.candidate_id, r.generation, r.genome, r.plan, r.status, r.result.error,
             {name: (s.value, s.stderr, s.n_items) for name, s in r.objectives.items()})
            for r in sorted(records, key=lambda r: r.candidate_id)]


def run_search(config: dict, root, name: str) -> list[dict]:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SearchRun.create(path, root / f"run-{name}", start_pool=True)
    run.run(progress=False)
    run.close()
    archive = Archive(root / f"run-{name}", readonly=True)
    try:
        return archive.records()
    finally:
        archive.close()


@pytest.fixture(scope="module")
def tiny_merge_config(tmp_path_factory):
    """Three tiny Llamas (a base and two noisy 'fine-tunes') and two small multiple-choice
    tasks: real merges, real HF scoring, in well under a second per candidate."""
    from evomerge.io.synthetic import make_tiny_llama
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("tiny-merge")
    save_tokenizer(root / "tok")
    vocab = build_tokenizer().get_vocab_size()
    base = make_tiny_llama(root / "base", vocab_size=vocab, hidden_size=32, num_layers=2, tokenizer_from=root / "tok")
    a = make_tiny_llama(root / "a", base=base, noise=0.5, seed=1, tokenizer_from=root / "tok")
    b = make_tiny_llama(root / "b", base=base, noise=0.5, seed=2, tokenizer_from=root / "tok")
    for name, words in (("t1", ["cat", "dog", "sun", "sea"]), ("t2", ["red", "blue", "one", "two"])):
        rows = [{"id": f"{name}-{i}", "prompt": f"{i} {w} is", "choices": words[:3], "answer": words[i % 3]}
                for i, w in enumerate(words * 2)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "kind": "multiple_choice",
                                                           "data": f"{name}.jsonl"}))
    return root, {
        "seed": 3, "sources": {"base": str(base), "a": str(a), "b": str(b)}, "base": "base",
        "genome": {"kind": "parameter", "method": "task_arithmetic", "granularity": "model"},
        "objectives": [{"name": "t1", "task": str(root / "t1.yaml")}, {"name": "t2", "task": str(root / "t2.yaml")}],
        "evaluator": {"kind": "merge", "backend": "hf", "device": "cpu"},
        "optimizer": {"name": "nsga2", "population": 4, "generations": 2}, "audit": {"every": 0},
    }


@pytest.mark.slow
def test_a_search_on_two_ray_workers_writes_the_same_archive_as_one_process(local_ray, tiny_merge_config):
    root, config = tiny_merge_config
    local = run_search({**config, "workers": {"backend": "local"}}, root, "local")
    on_ray = run_search({**config, "workers": {"backend": "ray", "count": 2, "num_cpus": 1}}, root, "ray")

    assert len(local) == 8 and all(r.status == "ok" for r in local)
    assert comparable(on_ray) == comparable(local)
    scores = {(r.objectives["t1"].value, r.objectives["t2"].value) for r in local}
    assert len(scores) > 1, "the merges should differ in score, or the comparison proves little"
    workers = {r.result.worker.split("@")[0] for r in on_ray}
    assert workers == {"ray-worker-0.0", "ray-worker-1.0"}


@pytest.mark.slow
def test_likelihood_objectives_score_the_same_on_ray_workers(local_ray, tiny_merge_config):
    """Graded scores computed in Ray actors equal the local ones (to float rounding): one
    generation, so the genomes cannot drift apart."""
    root, config = tiny_merge_config
    graded = {**config, "objectives": [
        {"name": "t1", "task": str(root / "t1.yaml"), "scoring": "likelihood", "estimator": "full"},
        {"name": "t2", "task": str(root / "t2.yaml"), "scoring": "likelihood", "estimator": "subset"}],
        "calibration": {"anchors": 4}, "optimizer": {"name": "nsga2", "population": 4, "generations": 1}}
    local = run_search({**graded, "workers": {"backend": "local"}}, root, "graded-local")
    on_ray = run_search({**graded, "workers": {"backend": "ray", "count": 2, "num_cpus": 1}}, root, "graded-ray")
    assert [r.status for r in local] == ["ok"] * 4
    pairs = zip(sorted(local, key=lambda r: r.candidate_id), sorted(on_ray, key=lambda r: r.candidate_id))
    for here, there in pairs:
        assert here.genome == there.genome
        for name in ("t1", "t2"):
            assert there.objectives[name].value == pytest.approx(here.objectives[name].value, rel=1e-5)
        assert here.objectives["t2"].n_items == 4 and here.objectives["t1"].n_items == 8
        assert 0 < here.objectives["t1"].value < 1        # a probability share, not a 0/1 mean


def test_a_search_finishes_when_a_worker_is_killed_in_the_middle(local_ray, tmp_path):
    config = {
        "seed": 1, "genome": {"kind": "box", "dim": 3, "lower": 0.0, "upper": 1.0},
        "objectives": [{"name": "f1", "task": "synthetic"}, {"name": "f2", "task": "synthetic"}],
        "evaluator": {"kind": "synthetic", "sleep": 0.15},
        "optimizer": {"name": "nsga2", "population": 6, "generations": 3}, "audit": {"every": 0},
        "workers": {"backend": "ray", "count": 2, "num_cpus": 1, "max_retries": 2},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SearchRun.create(path, tmp_path / "run", start_pool=True)
    pool = run.pool
    victim = pool.workers()[1]
    killer = threading.Timer(0.8, os.kill, (victim.pid, signal.SIGKILL))
    killer.start()
    try:
        run.run(progress=False)
    finally:
        killer.cancel()
        run.close()
    assert pool.replacements == 1

    archive = Archive(tmp_path / "run", readonly=True)
    records = archive.records()
    archive.close()
    assert sorted(r.candidate_id for r in records) == list(range(18))
    assert all(r.status in ("ok", "failed") for r in records)
    assert all(r.result.error is None for r in records if r.status == "ok")
    assert sum(r.status == "ok" for r in records) >= 17, "only the killed worker's candidate may fail"


def synthetic_config(**workers) -> dict:
    return {
        "seed": 0, "genome": {"kind": "box", "dim": 2, "lower": 0.0, "upper": 1.0},
        "objectives": [{"name": "f1", "task": "synthetic"}], "evaluator": {"kind": "synthetic"},
        "optimizer": {"name": "random", "population": 2, "generations": 1}, "audit": {"every": 0},
        "workers": {"backend": "ray", **workers},
    }


def test_more_gpus_than_the_cluster_has_stops_the_search_before_it_writes_anything(local_ray, tmp_path):
    from evomerge.errors import EvomergeError

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(synthetic_config(count=2, num_gpus=1)))
    with pytest.raises(EvomergeError, match="need 2 GPUs but the Ray cluster has 2 CPUs and 0 GPUs"):
        SearchRun.create(path, tmp_path / "run", start_pool=True)
    assert not (tmp_path / "run").exists()


def test_search_with_an_unreachable_address_is_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(synthetic_config(count=1)))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(path), "--run-dir",
                           str(tmp_path / "run"), "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused); start it with "
                     "`ray start --head`, or leave out --address to run locally"]
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - start < 60


def test_a_steady_state_search_keeps_both_ray_workers_fed(local_ray, tmp_path):
    config = {
        "seed": 2, "genome": {"kind": "box", "dim": 3, "lower": 0.0, "upper": 1.0},
        "objectives": [{"name": "f1", "task": "synthetic"}], "evaluator": {"kind": "synthetic", "sleep": 0.05},
        "optimizer": {"name": "cmaes", "population": 4, "generations": 3, "steady_state": True},
        "audit": {"every": 0}, "workers": {"backend": "ray", "count": 2, "num_cpus": 1},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SearchRun.create(path, tmp_path / "run", start_pool=True)
    pool, out_at_result = run.pool, []
    next_result = pool.next_result
    pool.next_result = lambda timeout=None: (out_at_result.append(pool.pending()), next_result(timeout))[1]
    run.run(progress=False)
    run.close()
    # a new candidate goes out with every result: 4 out (2 running, 2 queued) until the budget ends
    assert out_at_result == [4] * 9 + [3, 2, 1]
    archive = Archive(tmp_path / "run", readonly=True)
    records = archive.records()
    told = [cid for _, cid in archive.told_after(0)]
    archive.close()
    assert sorted(r.candidate_id for r in records) == list(range(12))
    assert all(r.status == "ok" for r in records) and sorted(told) == list(range(12))
    assert {r.result.worker.split("@")[0] for r in records} == {"ray-worker-0.0", "ray-worker-1.0"}
