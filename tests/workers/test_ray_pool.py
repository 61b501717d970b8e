"""RayPool on a real local Ray (2 CPUs): same results as LocalPool, dead workers replaced,
bad candidates failed once, and clear one-line errors for clusters that cannot serve."""

from __future__ import annotations

import functools
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.workers import ray_cluster  # noqa: E402
from evomerge.workers.pool import LocalPool, RayPool  # noqa: E402
from tests.workers.evaluators import QuadraticEvaluator, calls, make_candidates, runs  # noqa: E402


def drain(pool, timeout=60.0) -> dict:
    results = {}
    while pool.pending():
        result = pool.next_result(timeout=timeout)
        assert result.candidate_id not in results, "a candidate came back twice"
        results[result.candidate_id] = result
    return results


def test_two_workers_give_the_same_results_as_the_local_pool(local_ray):
    candidates = make_candidates(12)
    local = LocalPool(QuadraticEvaluator)
    for candidate in candidates:
        local.submit(candidate)
    expected = drain(local)

    with RayPool(QuadraticEvaluator, 2, num_cpus=1) as pool:
        workers = pool.workers()
        assert len(workers) == 2 and len({w.pid for w in workers}) == 2
        for candidate in make_candidates(12):
            pool.submit(candidate)
        got = drain(pool)

    assert sorted(got) == sorted(expected)
    for cid, result in got.items():
        assert result.status == "ok"
        assert result.objectives == expected[cid].objectives
    used = {result.worker for result in got.values()}
    assert used == {w.name for w in workers}, "both workers should have taken candidates"
    assert all(f":{w.pid}" in w.name for w in workers)


def test_a_killed_worker_is_replaced_and_every_candidate_ends_evaluated_or_failed(local_ray, tmp_path):
    log = tmp_path / "calls.log"
    factory = functools.partial(QuadraticEvaluator, str(log))
    with RayPool(factory, 2, num_cpus=1, max_retries=2) as pool:
        originals = {w.name for w in pool.workers()}
        victim = pool.workers()[0]
        for candidate in make_candidates(10, sleep=0.25):
            pool.submit(candidate)
        results = {}
        first = pool.next_result(timeout=30)
        results[first.candidate_id] = first
        os.kill(victim.pid, signal.SIGKILL)
        while pool.pending():
            result = pool.next_result(timeout=60)
            assert result.candidate_id not in results
            results[result.candidate_id] = result
        assert pool.replacements == 1
        replacement = next(w for w in pool.wait_for_workers(timeout=60) if w.name not in originals)
        assert replacement.slot == victim.slot and replacement.pid != victim.pid
        # The pool goes on with both workers; a fresh worker takes the next candidate first.
        for candidate in make_candidates(14)[10:]:
            pool.submit(candidate)
        later = drain(pool)

    assert sorted(results) == list(range(10))
    assert all(r.status in ("ok", "failed") for r in results.values())
    assert all(r.status == "ok" for r in results.values()), \
        [r.error for r in results.values() if r.status != "ok"]
    assert {r.worker for r in later.values()} == {replacement.name, pool_survivor(originals, victim)}
    # Only candidates the victim held ran again: the one it was running, and at most the
    # one shipped behind it (when the victim died between finishing a candidate and
    # delivering its result, both must run again). Nothing the survivor ran was repeated.
    ran = runs(log)
    ids = [cid for cid, _ in ran]
    repeated = {cid for cid in ids if ids.count(cid) > 1}
    assert len(repeated) <= pool.queue_depth, ran
    assert all(ids.count(cid) == 2 for cid in repeated), ran
    first_pid = {cid: pid for cid, pid in reversed(ran)}
    assert all(first_pid[cid] == victim.pid for cid in repeated), (ran, victim.pid)


def pool_survivor(originals: set[str], victim) -> str:
    (survivor,) = originals - {victim.name}
    return survivor


def test_a_candidate_that_kills_its_worker_is_retried_then_failed_with_the_reason(local_ray, tmp_path):
    log = tmp_path / "calls.log"
    factory = functools.partial(QuadraticEvaluator, str(log))
    with RayPool(factory, 2, num_cpus=1, max_retries=1) as pool:
        doomed = make_candidates(1, exit=True)[0]
        pool.submit(doomed)
        for candidate in make_candidates(4)[1:]:
            pool.submit(candidate)
        results = drain(pool)
        assert pool.replacements == 2

    assert results[0].status == "failed"
    assert "worker died on all 2 attempts" in results[0].error and "\n" not in results[0].error
    assert [r.status for cid, r in sorted(results.items()) if cid] == ["ok"] * 3
    assert calls(log).count(0) == 2, "tried once, retried once (max_retries=1), then given up"


def test_a_candidate_that_raises_or_gives_nan_is_failed_without_retry(local_ray, tmp_path):
    log = tmp_path / "calls.log"
    factory = functools.partial(QuadraticEvaluator, str(log))
    with RayPool(factory, 2, num_cpus=1, max_retries=3) as pool:
        raising, nan, good = make_candidates(3)
        raising.plan = {"raise": "merge produced a tensor of the wrong shape"}
        nan.plan = {"nan": True}
        for candidate in (raising, nan, good):
            pool.submit(candidate)
        results = drain(pool)
        assert pool.replacements == 0

    assert results[0].status == "failed"
    assert results[0].error == "ValueError: merge produced a tensor of the wrong shape"
    assert results[1].status == "failed" and "not finite" in results[1].error
    assert results[2].status == "ok"
    assert sorted(calls(log)) == [0, 1, 2], "failed candidates must not be retried"


def test_a_cuda_fault_replaces_the_worker_and_retries_elsewhere(local_ray, tmp_path):
    log = tmp_path / "calls.log"
    factory = functools.partial(QuadraticEvaluator, str(log))
    with RayPool(factory, 1, num_cpus=1, max_retries=1) as pool:
        pool.submit(make_candidates(1, cuda_error=True)[0])
        result = pool.next_result(timeout=60)
        assert pool.replacements == 2   # the worker is not reused after a CUDA error
    assert result.status == "failed" and "CUDA error" in result.error
    assert calls(log).count(0) == 2


def test_a_hung_worker_is_replaced_after_the_task_timeout(local_ray):
    with RayPool(QuadraticEvaluator, 1, num_cpus=1, max_retries=0, task_timeout=1.5) as pool:
        hung = make_candidates(1, sleep=600)[0]
        pool.submit(hung)
        pool.submit(make_candidates(2)[1])
        start = time.monotonic()
        first = pool.next_result(timeout=60)
        assert time.monotonic() - start < 30
        second = pool.next_result(timeout=60)
        assert pool.replacements == 1

    assert first.candidate_id == 0 and first.status == "failed"
    assert "no result within task_timeout=1.5 s" in first.error
    assert second.status == "ok" and second.worker.startswith("ray-worker-0.1@"), \
        "the candidate queued behind the hung one runs on the replacement, uncharged"


def test_a_worker_that_cannot_load_a_source_stops_the_search_with_one_line(local_ray):
    factory = functools.partial(QuadraticEvaluator, fail_to_load="zoo/missing-model")
    start = time.monotonic()
    with pytest.raises(EvomergeError) as info:
        RayPool(factory, 2, num_cpus=1)
    message = str(info.value)
    assert "cannot read source model zoo/missing-model" in message and "\n" not in message
    assert time.monotonic() - start < 30


def test_more_gpus_than_the_cluster_has_is_a_one_line_error(local_ray):
    with pytest.raises(EvomergeError, match=r"need 2 GPUs but the Ray cluster has 2 CPUs and 0 GPUs") as info:
        RayPool(QuadraticEvaluator, 2, num_cpus=1, num_gpus=1)
    assert "\n" not in str(info.value)
    with pytest.raises(EvomergeError, match="only 2 of 3 worker"):
        RayPool(QuadraticEvaluator, 3, num_cpus=1)


def test_resource_check_counts_what_fits_on_each_node():
    two_gpu_nodes = [{"CPU": 16, "GPU": 2, "memory": 64e9}, {"CPU": 16, "GPU": 2, "memory": 64e9}]
    ray_cluster.check_resources(4, num_cpus=4, num_gpus=1, per_node=two_gpu_nodes)
    ray_cluster.check_resources(8, num_cpus=1, num_gpus=0.5, per_node=two_gpu_nodes)
    with pytest.raises(EvomergeError, match="need 5 GPUs"):
        ray_cluster.check_resources(5, num_cpus=1, num_gpus=1, per_node=two_gpu_nodes)
    with pytest.raises(EvomergeError, match="only 2 of 3"):   # 3.6 of 4 GPUs, but one per node
        ray_cluster.check_resources(3, num_cpus=1, num_gpus=1.2, per_node=two_gpu_nodes)
    with pytest.raises(EvomergeError, match="only 2 of 4"):
        ray_cluster.check_resources(4, num_cpus=1, memory=int(40e9), per_node=two_gpu_nodes)


def test_an_unreachable_address_is_a_quick_one_line_error(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)   # even beside the fixture's Ray
    start = time.monotonic()
    with pytest.raises(EvomergeError, match=r"cannot reach the Ray cluster at 127.0.0.1:1 ") as info:
        ray_cluster.connect("127.0.0.1:1", timeout=5)
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < 10
    with pytest.raises(EvomergeError, match="HOST:PORT"):
        ray_cluster.connect("not-an-address", timeout=5)


def test_the_workers_section_of_a_config_reaches_the_pool(local_ray):
    from evomerge.search.config import WorkersConfig
    from evomerge.workers.pool import make_pool

    workers = WorkersConfig(backend="ray", count=1, max_retries=4, task_timeout=7.5)
    pool = make_pool(QuadraticEvaluator, **workers.model_dump())
    try:
        assert isinstance(pool, RayPool)
        assert (pool.task_timeout, pool.max_retries, len(pool.workers())) == (7.5, 4, 1)
    finally:
        pool.close()
