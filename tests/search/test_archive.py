"""The Pareto archive: front and hypervolume on hand-made points, one row per result,
readable by another connection while it is written."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from evomerge.search.archive import Archive, hypervolume, non_dominated
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore

POINTS = {  # candidate id -> (a, b); maximised
    0: (0.2, 0.2),   # dominated by 1
    1: (0.5, 0.5),   # dominated by 3 later
    2: (0.9, 0.1),
    3: (0.6, 0.6),
    4: (0.1, 0.9),
    5: (0.6, 0.6),   # equal to 3: both stay on the front
}


def add(archive: Archive, cid: int, point, status: str = "ok", audit_full=None) -> None:
    objectives = {} if status != "ok" else {
        name: ObjectiveScore(v, 0.01, 10, None if audit_full is None else audit_full[i])
        for i, (name, v) in enumerate(zip(["a", "b"], point))}
    candidate = Candidate(cid, cid // 3, [float(cid), 0.5], {"merge_method": "linear"}, audit=audit_full is not None)
    archive.add(candidate, EvalResult(cid, status, objectives, None if status == "ok" else "boom", "w0", 1.5, 20))


def test_hypervolume_of_hand_made_fronts():
    ref = np.zeros(2)
    assert hypervolume(np.array([[0.5, 0.5]]), ref) == pytest.approx(0.25)
    # staircase: 0.9*0.1 + 0.6*(0.6-0.1) + 0.1*(0.9-0.6)
    pts = np.array([[0.9, 0.1], [0.6, 0.6], [0.1, 0.9]])
    assert hypervolume(pts, ref) == pytest.approx(0.09 + 0.30 + 0.03)
    # dominated points and points outside the reference box add nothing
    assert hypervolume(np.vstack([pts, [[0.2, 0.2]], [[-0.1, 2.0]]]), ref) == pytest.approx(0.42)
    assert hypervolume(pts, np.array([0.5, 0.5])) == pytest.approx(0.1 * 0.1)
    # three objectives: two boxes overlapping in [0,1]x[0,1]x[0,1]
    pts3 = np.array([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0]])
    assert hypervolume(pts3, np.zeros(3)) == pytest.approx(2 + 2 - 1)
    assert hypervolume(np.zeros((0, 2)), ref) == 0.0


def test_non_dominated_keeps_ties_and_drops_dominated():
    pts = np.array(list(POINTS.values()))
    assert sorted(non_dominated(pts).tolist()) == [2, 3, 4, 5]


def test_front_and_hypervolume_follow_each_added_result(tmp_path):
    archive = Archive(tmp_path, objectives=["a", "b"])
    expected_fronts = {0: {0}, 1: {1}, 2: {1, 2}, 3: {2, 3}, 4: {2, 3, 4}, 5: {2, 3, 4, 5}}
    for cid, point in POINTS.items():
        add(archive, cid, point)
        assert {r.candidate_id for r in archive.front()} == expected_fronts[cid]
        front = np.array([POINTS[i] for i in expected_fronts[cid]])
        assert archive.hypervolume() == pytest.approx(hypervolume(front, np.zeros(2)))
    add(archive, 6, None, status="failed")  # failures are recorded, never on the front
    assert archive.counts() == {"ok": 6, "failed": 1, "total": 7}
    assert {r.candidate_id for r in archive.front()} == {2, 3, 4, 5}
    assert archive.best() == {"a": 0.9, "b": 0.9}
    failed = archive.record(6)
    assert failed.status == "failed" and failed.result.error == "boom" and failed.objectives == {}


def test_rows_carry_everything_and_another_process_can_read_while_writing(tmp_path):
    writer = Archive(tmp_path, objectives=["a", "b"], reference=[0.1, 0.1])
    add(writer, 0, (0.5, 0.7), audit_full=(0.55, 0.6))
    reader = Archive(tmp_path, readonly=True)
    row = reader.record(0)
    assert row.genome == [0.0, 0.5] and row.plan == {"merge_method": "linear"} and row.candidate.audit is True
    assert row.objectives["a"] == ObjectiveScore(0.5, 0.01, 10, 0.55)
    assert row.result.worker == "w0" and row.result.seconds == 1.5 and row.result.items_scored == 20
    assert row.finished_at is not None
    assert reader.hypervolume() == pytest.approx(0.4 * 0.6)  # reference (0.1, 0.1) from creation
    add(writer, 1, (0.8, 0.8))  # the reader sees the next committed result
    assert reader.counts()["total"] == 2 and reader.hypervolume() == pytest.approx(0.7 * 0.7)
    with pytest.raises(sqlite3.OperationalError):  # read-only really is read-only
        reader.db.execute("DELETE FROM evaluations")
    assert writer.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_duplicate_candidate_is_rejected_without_touching_the_archive(tmp_path):
    archive = Archive(tmp_path, objectives=["a", "b"])
    add(archive, 0, (0.5, 0.5))
    with pytest.raises(sqlite3.IntegrityError):
        add(archive, 0, (0.9, 0.9))
    assert archive.counts()["total"] == 1 and archive.hypervolume() == pytest.approx(0.25)
    assert archive.record(0).objectives["a"].value == 0.5


def test_audit_statistics(tmp_path):
    archive = Archive(tmp_path, objectives=["a", "b"])
    estimates = [(0.1, 0.5), (0.3, 0.4), (0.5, 0.3), (0.7, 0.2)]
    fulls = [(0.2, 0.5), (0.3, 0.3), (0.5, 0.35), (0.6, 0.2)]
    for cid, (est, full) in enumerate(zip(estimates, fulls)):
        add(archive, cid, est, audit_full=full)
    add(archive, 9, (0.9, 0.9))  # not audited: not in the statistics
    stats = archive.audit_stats()
    assert stats["a"]["n"] == 4
    assert stats["a"]["mae"] == pytest.approx(np.mean([0.1, 0.0, 0.0, 0.1]))
    assert stats["a"]["bias"] == pytest.approx(0.0)
    assert stats["a"]["spearman"] == pytest.approx(1.0)
    assert stats["b"]["spearman"] == pytest.approx(0.8)  # ranks (4,3,2,1) vs (4,2,3,1)


def test_calibration_merges_stay_in_the_archive_but_out_of_the_front_and_best(tmp_path):
    archive = Archive(tmp_path, objectives=["a", "b"])
    for cid, point in POINTS.items():
        add(archive, cid, point)
    calibration = Candidate(-4, -1, [0.3, 0.3], {"merge_method": "linear"}, audit=True)
    archive.add(calibration, EvalResult(-4, "ok", {"a": ObjectiveScore(0.95, 0.0, 40, 0.95),
                                                   "b": ObjectiveScore(0.95, 0.0, 40, 0.95)}))
    # it would dominate every search candidate, yet the search's front, best and
    # hypervolume are the search's own
    assert {r.candidate_id for r in archive.front()} == {2, 3, 4, 5}
    assert archive.best() == {"a": 0.9, "b": 0.9}
    assert archive.hypervolume() == pytest.approx(0.09 + 0.30 + 0.03)
    # ... and the audit views still see it
    assert archive.record(-4).objectives["a"].value == 0.95
    assert [r.candidate_id for r in archive.front(calibration=True)] == [-4]
    assert archive.best(calibration=True) == {"a": 0.95, "b": 0.95}
    # An archive written before calibration rows were kept out of the front is repaired
    # when the search reopens it.
    with archive.transaction():
        archive.db.execute("DELETE FROM front")
        archive.db.execute("INSERT INTO front VALUES (-4)")
    archive.close()
    reopened = Archive(tmp_path)
    assert {r.candidate_id for r in reopened.front()} == {2, 3, 4, 5}
    assert reopened.hypervolume() == pytest.approx(0.42)
    reopened.close()


def test_records_filtered_by_a_where_carry_only_their_own_scores(tmp_path):
    archive = Archive(tmp_path, objectives=["a", "b"])
    for cid, point in POINTS.items():
        add(archive, cid, point)
    (record,) = archive.records("WHERE candidate_id = ?", (4,))
    assert record.objectives["a"].value == 0.1 and record.objectives["b"].value == 0.9
    assert [r.candidate_id for r in archive.records("WHERE generation = ?", (1,))] == [3, 4, 5]
    assert archive.record(99) is None
    archive.close()


def test_a_result_reads_back_as_it_was_told_and_scores_have_one_json_shape(tmp_path):
    told = EvalResult(3, "ok", {"a": ObjectiveScore(0.25, 0.05, 8, full=0.3), "b": ObjectiveScore(0.5, 0.1, 4)},
                      worker="w1", seconds=2.0, items_scored=12, timings={"merge": 0.5})
    assert EvalResult.from_dict(told.to_dict()) == told
    assert told.objectives["b"].to_dict() == {"value": 0.5, "stderr": 0.1, "n_items": 4}   # no full: not written
    assert ObjectiveScore.from_dict(told.objectives["a"].to_dict()) == told.objectives["a"]
    archive = Archive(tmp_path, objectives=["a", "b"])
    archive.add(Candidate(3, 0, [0.1, 0.2], {"merge_method": "linear"}, audit=True), told, submitted_at=1.0)
    (record,) = archive.records()
    assert record.result == told and record.candidate == Candidate(3, 0, [0.1, 0.2], {"merge_method": "linear"}, True)
    assert record.submitted_at == 1.0 and record.finished_at >= record.submitted_at and record.value("b") == 0.5
    archive.close()
