"""LocalPool: the single-process pool, and the failure policy both pools share."""

from __future__ import annotations

import functools

import pytest

from evomerge.errors import EvomergeError
from evomerge.workers.pool import LocalPool, make_pool
from tests.workers.evaluators import QuadraticEvaluator, calls, make_candidates


def test_local_pool_evaluates_every_candidate_in_submit_order():
    pool = LocalPool(QuadraticEvaluator)
    for candidate in make_candidates(5):
        pool.submit(candidate)
    assert pool.pending() == 5
    order = [pool.next_result().candidate_id for _ in range(5)]
    assert order == [0, 1, 2, 3, 4]
    assert pool.pending() == 0
    with pytest.raises(RuntimeError):
        pool.next_result()


def test_local_pool_results_carry_objectives_worker_and_time():
    pool = LocalPool(QuadraticEvaluator)
    candidate = make_candidates(2)[1]
    pool.submit(candidate)
    result = pool.next_result()
    assert result.status == "ok"
    assert result.objectives["near_zero"].value == pytest.approx(-sum(v * v for v in candidate.genome))
    assert result.worker.startswith("local@") and result.worker.endswith(f":{__import__('os').getpid()}")
    assert result.seconds > 0


def test_a_candidate_that_raises_is_failed_once_with_the_reason(tmp_path):
    log = tmp_path / "calls.log"
    pool = LocalPool(functools.partial(QuadraticEvaluator, str(log)))
    bad = make_candidates(1)[0]
    bad.plan = {"raise": "engine exploded on layer 3"}
    pool.submit(bad)
    pool.submit(make_candidates(2)[1])
    first, second = pool.next_result(), pool.next_result()
    assert first.status == "failed"
    assert first.error == "ValueError: engine exploded on layer 3"
    assert "\n" not in first.error
    assert second.status == "ok", "one bad candidate must not stop the others"
    assert calls(log) == [0, 1]


def test_a_nan_objective_is_a_failed_candidate():
    pool = LocalPool(QuadraticEvaluator)
    pool.submit(make_candidates(1, nan=True)[0])
    result = pool.next_result()
    assert result.status == "failed"
    assert "near_one" in result.error and "not finite" in result.error


def test_an_evaluator_that_cannot_load_its_sources_is_a_one_line_error():
    factory = functools.partial(QuadraticEvaluator, fail_to_load="zoo/base")
    with pytest.raises(EvomergeError, match="cannot read source model zoo/base") as info:
        LocalPool(factory)
    assert "\n" not in str(info.value)


def test_make_pool_builds_a_local_pool_and_rejects_unknown_backends():
    assert isinstance(make_pool(QuadraticEvaluator, backend="local", count=1), LocalPool)
    with pytest.raises(EvomergeError, match="workers.backend"):
        make_pool(QuadraticEvaluator, backend="dask")
