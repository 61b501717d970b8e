"""Before generation 0: sources as reference points, IRT calibration on sources + random merges.

Real tiny Llamas (a base and two noisy fine-tunes), a 40-item multiple-choice task with a
search and a held-out split, real HF scoring (the ``tiny`` / ``finished`` fixtures of conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from evomerge.estimators.calibration import Calibration
from evomerge.search.archive import Archive
from evomerge.search.calibrate import calibration_path, thetas_path
from evomerge.search.run import SearchRun, judge, judge_candidates
from evomerge.workers import evaluator as evaluator_module

def start(root, config, name):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return SearchRun.create(path, root / name)


def test_the_calibration_is_a_versioned_artifact_fitted_on_sources_and_random_merges(finished, tiny):
    calib = Calibration.load(calibration_path(finished, "mc"))        # checksummed JSON, loads
    assert len(calib.items) == 40 and len(calib.anchors) == 8           # 20% of the search items
    assert sorted(calib.info["population"]["sources"]) == ["a", "b", "base"]
    assert calib.info["population"]["random_merges"] == 9
    thetas = json.loads(thetas_path(finished, "mc").read_text())
    assert sorted(thetas["sources"]) == ["a", "b", "base"] and np.asarray(thetas["thetas"]).shape == (3, calib.a.shape[1])

    archive = Archive(finished, readonly=True)
    records = archive.records()
    calibration = [r for r in records if r.generation == -1]
    assert [r.candidate_id for r in calibration] == list(range(-9, 0))
    assert all(r.candidate.audit and r.objectives["mc"].full == r.objectives["mc"].value for r in calibration)
    responses = archive.responses("mc")
    assert set(responses) == {"source:base", "source:a", "source:b"} | {f"candidate:{i}" for i in range(-9, 0)}
    assert len({tuple(v) for v in responses.values()}) > 3, "a calibration population of identical subjects"
    # search candidates are estimated from the anchors (8 items), audited ones also scored on all 40
    search = [r for r in records if r.generation >= 0]
    assert len(search) == 8 and all(r.status == "ok" for r in search)
    assert all(r.objectives["mc"].n_items == 8 for r in search)
    assert [r.candidate_id for r in search if r.objectives["mc"].full is not None] == [0, 2, 4, 6]
    stats = archive.audit_stats()["mc"]
    assert stats["n"] == 4 and np.isfinite(stats["mae"])
    meta = archive.meta()
    archive.close()
    for name in ("base", "a", "b"):
        source = meta["source_scores"][name]["mc"]
        assert source["n_items"] == 40 and source["value"] == pytest.approx(np.mean(responses[f"source:{name}"]))
        assert meta["source_heldout_scores"][name]["mc"]["n_items"] == 20


def test_sources_judged_again_score_what_the_search_recorded(finished):
    from evomerge.search.calibrate import source_plan

    archive = Archive(finished, readonly=True)
    meta = archive.meta()
    archive.close()
    judged = judge(finished, {"a": source_plan("a")}, split="heldout")
    assert judged["a"]["mc"]["value"] == pytest.approx(meta["source_heldout_scores"]["a"]["mc"]["value"])
    front = judge_candidates(finished)
    assert front and all(s["mc"]["n_items"] == 20 for s in front.values())


def test_a_crash_during_calibration_resumes_without_redoing_finished_evaluations(tiny, finished, monkeypatch):
    root, config = tiny
    calls = []
    real = evaluator_module.CandidateEvaluator.evaluate_full

    def crashing(self, candidate, tasks=None):
        if len(calls) == 9:   # 3 sources x (search + held-out), then 3 random merges
            raise KeyboardInterrupt("killed")   # the run dies in the middle of its calibration
        calls.append(candidate.candidate_id)
        return real(self, candidate, tasks)

    monkeypatch.setattr(evaluator_module.CandidateEvaluator, "evaluate_full", crashing)
    run = start(root, config, "crash")
    with pytest.raises(KeyboardInterrupt):
        run.run(progress=False)
    run.close()
    done = list(calls)
    calls.clear()
    monkeypatch.setattr(evaluator_module.CandidateEvaluator, "evaluate_full",
                        lambda self, c, tasks=None: (calls.append(c.candidate_id), real(self, c, tasks))[1])
    resumed = SearchRun.resume(root / "crash")
    resumed.run(progress=False)
    resumed.close()
    assert sorted(c for c in done if c > -10**6) == [-3, -2, -1]
    assert sorted(calls) == list(range(-9, -3)), "resuming redid finished evaluations"
    # ... and ends with the same calibration and the same archive as the uninterrupted run
    assert calibration_path(root / "crash", "mc").read_text() == calibration_path(finished, "mc").read_text()
    one, two = Archive(finished, readonly=True), Archive(root / "crash", readonly=True)
    strip = lambda rs: [(r.candidate_id, r.genome, r.objectives) for r in rs]  # noqa: E731
    assert strip(one.records()) == strip(two.records())
    one.close(), two.close()


def test_front_and_exports_are_the_searchs_own_and_a_calibration_merge_exports_by_its_id(finished, tmp_path):
    from evomerge.cli import main
    from evomerge.search.export import load_records

    archive = Archive(finished, readonly=True)
    search = [r for r in archive.records() if r.generation >= 0 and r.status == "ok"]
    assert archive.front() and all(r.generation >= 0 for r in archive.front())
    assert archive.best() == {"mc": max(r.objectives["mc"].value for r in search)}
    archive.close()
    assert [r.candidate_id for r in load_records(finished)] == list(range(8))
    assert main(["export", str(finished), "--id", "-4", str(tmp_path / "out")]) == 0
    (exported,) = (tmp_path / "out").iterdir()
    assert exported.name == "calibration-4"
    card = (exported / "README.md").read_text()
    assert "# evomerge calibration 4" in card and "calibration merge (candidate id -4)" in card


def test_the_pre_search_phase_evaluates_on_the_workers_never_in_the_controller(tiny, finished, monkeypatch):
    from evomerge.search.calibrate import SOURCE_ID, presearch_spec
    from evomerge.workers.evaluator import make_evaluator
    from evomerge.workers.pool import LocalPool

    root, config = tiny
    run = start(root, config, "on-workers")
    worker = LocalPool(lambda: make_evaluator(presearch_spec(run)))   # stands for a worker process
    submitted = []

    class Workers:
        def submit(self, candidate):
            submitted.append(candidate)
            worker.submit(candidate)

        def pending(self):
            return worker.pending()

        def next_result(self, timeout=None):
            return worker.next_result(timeout)

        def close(self):
            worker.close()

    def no_evaluator_here(self, spec):
        raise AssertionError("the controller built an evaluator")

    monkeypatch.setattr(evaluator_module.CandidateEvaluator, "__init__", no_evaluator_here)
    run.presearch(progress=False, pool=Workers())
    run.close()
    assert sorted(c.candidate_id for c in submitted) == [SOURCE_ID - 2, SOURCE_ID - 1, SOURCE_ID, *range(-9, 0)]
    assert all(c.full for c in submitted)
    assert all((c.heldout is not None) == (c.candidate_id <= SOURCE_ID) for c in submitted)   # sources: held-out too
    # ... and it recorded what the controller-side phase recorded before
    one, two = Archive(finished, readonly=True), Archive(root / "on-workers", readonly=True)
    try:
        assert {k: list(v) for k, v in one.responses("mc").items()} == \
            {k: list(v) for k, v in two.responses("mc").items()}
        assert one.meta()["source_heldout_scores"] == two.meta()["source_heldout_scores"]
    finally:
        one.close(), two.close()
    assert calibration_path(root / "on-workers", "mc").read_text() == calibration_path(finished, "mc").read_text()
