"""The Pareto archive: every evaluation of a run in one SQLite file.

``archive.sqlite`` in the run directory, WAL mode, so ``evomerge status`` or a notebook
can read it while the search writes. Each result is one transaction that inserts the
evaluation, its per-objective scores and the updated non-dominated front and
hypervolume together: a reader never sees a result without its front. The controller's
progress lives in the same file and the same transactions (``meta``), so no crash or power
loss can leave the two out of step. Transactions that carry progress (a generation's last
result, the end of the run) are durable -- ``synchronous=FULL``, on disk before the next
generation is asked -- and so is every commit before them; the results in between are
committed with ``synchronous=NORMAL`` (WAL: consistent, not yet fsynced), which saves an
fsync per result: a power loss can take back at most the current generation's results,
and resume evaluates those again.

Every write transaction also records how many rows each table holds (``meta.rows``);
``verify()`` compares that with what the tables hold, so a deleted row is noticed before
a run is continued from a damaged archive.

Objectives are maximised. The hypervolume is the volume dominated by the front and
bounded below by the reference point (default: 0 for every objective, the worst
accuracy); points that do not strictly dominate the reference point add nothing.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore

ARCHIVE_FILE = "archive.sqlite"
COUNTED_TABLES = ("evaluations", "scores", "responses", "told")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    candidate_id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    genome TEXT NOT NULL,          -- JSON list of floats
    plan TEXT,                     -- JSON merge plan (mergekit-style dict)
    audit INTEGER NOT NULL,
    status TEXT NOT NULL,          -- ok | failed
    error TEXT,
    worker TEXT,
    seconds REAL,
    items_scored INTEGER,
    timings TEXT,                  -- JSON {stage: seconds}
    submitted_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS scores (
    candidate_id INTEGER NOT NULL REFERENCES evaluations(candidate_id),
    objective TEXT NOT NULL,
    value REAL NOT NULL,
    stderr REAL,
    n_items INTEGER,
    full REAL,                     -- full-pool score of audited candidates
    PRIMARY KEY (candidate_id, objective)
);
CREATE TABLE IF NOT EXISTS front (candidate_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS responses (   -- per-item scores of full evaluations (calibration, sources)
    subject TEXT NOT NULL,         -- "candidate:<id>" or "source:<name>"
    objective TEXT NOT NULL,
    split TEXT NOT NULL,           -- "search" (the objective's task) or "heldout"
    scores TEXT NOT NULL,          -- JSON list, one score per item of the task, in task order
    PRIMARY KEY (subject, objective, split)
);
CREATE TABLE IF NOT EXISTS told (        -- steady-state runs: the order results reached the optimizer
    seq INTEGER PRIMARY KEY,       -- 1, 2, ...
    candidate_id INTEGER NOT NULL UNIQUE REFERENCES evaluations(candidate_id)
);
CREATE INDEX IF NOT EXISTS evaluations_generation ON evaluations(generation);
"""


@dataclass
class Record:
    """One archived evaluation: the candidate as asked, its result as told, and when.

    What ``Archive.add`` takes in, ``Archive.records`` gives back; export, report, status and
    resume read these."""

    candidate: Candidate
    result: EvalResult
    submitted_at: float | None = None
    finished_at: float | None = None

    @property
    def candidate_id(self) -> int:
        return self.candidate.candidate_id

    @property
    def generation(self) -> int:
        return self.candidate.generation

    @property
    def genome(self) -> list[float]:
        return self.candidate.genome

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.candidate.plan

    @property
    def status(self) -> str:
        return self.result.status

    @property
    def objectives(self) -> dict[str, ObjectiveScore]:
        return self.result.objectives

    def value(self, objective: str) -> float:
        return float(self.result.objectives[objective].value)


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` Pareto-dominates ``b`` (maximisation)."""
    return bool(np.all(a >= b) and np.any(a > b))


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows (duplicates of a front point all stay)."""
    points = np.asarray(points, dtype=float)
    keep = [i for i in range(len(points))
            if not any(dominates(points[j], points[i]) for j in range(len(points)) if j != i)]
    return np.array(keep, dtype=int)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (numpy only: importing scipy.stats takes seconds)."""
    return float(np.corrcoef(_ranks(np.asarray(x, float)), _ranks(np.asarray(y, float)))[0, 1])


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``points`` above ``reference`` (maximisation), exact.

    Two objectives: a sweep. More: pymoo's exact indicator on the negated problem.
    """
    points = np.asarray(points, dtype=float).reshape(len(points), -1) if len(points) else np.zeros((0, 1))
    reference = np.asarray(reference, dtype=float)
    if len(points) == 0:
        return 0.0
    points = points[np.all(points > reference, axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points[:, 0].max() - reference[0])
    if points.shape[1] == 2:
        # Sort by the first objective, best first; each point adds the strip it owns above
        # the best second objective seen so far.
        order = np.lexsort((-points[:, 1], -points[:, 0]))
        volume, best_y = 0.0, reference[1]
        for x, y in points[order]:
            if y > best_y:
                volume += (x - reference[0]) * (y - best_y)
                best_y = y
        return float(volume)
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=-reference)(-points))


def _named(method):
    """An SQLite error while reading names the archive file, in one line."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise EvomergeError(f"{self.path}: the archive cannot be read ({exc})") from None
        except (ValueError, TypeError, KeyError) as exc:
            if isinstance(exc, EvomergeError):
                raise
            raise EvomergeError(f"{self.path}: the archive holds malformed data ({type(exc).__name__}: {exc})") from None
    return wrapper


class Archive:
    """All evaluations of one run. ``readonly=True`` for watchers (status, report)."""

    def __init__(self, run_dir: str | Path, objectives: list[str] | None = None,
                 reference: list[float] | None = None, readonly: bool = False) -> None:
        self.path = Path(run_dir) / ARCHIVE_FILE
        if readonly:
            if not self.path.is_file():
                raise EvomergeError(f"{self.path}: no archive (is {run_dir} a search run directory?)")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")   # FULL for durable transactions (below)
            self.db.executescript(_SCHEMA)
        self.db.row_factory = sqlite3.Row
        try:
            meta = self.meta()
        except EvomergeError:
            self.db.close()
            raise
        if objectives is not None and "objectives" not in meta:
            ref = [0.0] * len(objectives) if reference is None else [float(v) for v in reference]
            with self.transaction():
                self._set_meta({"objectives": objectives, "reference": ref, "hypervolume": 0.0})
            meta = self.meta()
        if "objectives" not in meta:
            raise EvomergeError(f"{self.path}: archive has no objectives recorded")
        self.objectives: list[str] = meta["objectives"]
        self.reference = np.asarray(meta["reference"], dtype=float)
        if not readonly and self.db.execute(
                "SELECT 1 FROM front JOIN evaluations USING (candidate_id) WHERE generation < 0 LIMIT 1").fetchone():
            self._rebuild_front()

    def _rebuild_front(self) -> None:
        """Recompute the front over search candidates only (archives from before calibration
        merges were kept out of it)."""
        rows = [r for r in self.records("WHERE status = 'ok' AND generation >= 0")
                if all(o in r.objectives for o in self.objectives)]
        points = np.array([[r.value(o) for o in self.objectives] for r in rows]).reshape(len(rows), -1)
        keep = non_dominated(points) if rows else np.array([], dtype=int)
        with self.transaction():
            self.db.execute("DELETE FROM front")
            for i in keep:
                self.db.execute("INSERT INTO front VALUES (?)", (rows[i].candidate_id,))
            self._set_meta({"hypervolume": hypervolume(points[keep], self.reference) if len(keep) else 0.0})

    # -- writing ---------------------------------------------------------------------------
    def transaction(self, durable: bool = False):
        """One write transaction; ``durable``: on disk (fsynced) when it returns."""
        return _Transaction(self.db, self._record_counts, durable)

    def _record_counts(self) -> None:
        """Inside a write transaction: the row count of every table ``verify`` checks."""
        self._set_meta({"rows": self._counts()})

    def _counts(self) -> dict[str, int]:
        return {t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in COUNTED_TABLES}

    @_named
    def verify(self) -> None:
        """Refuse an archive whose tables hold fewer or more rows than its last transaction
        left (a row deleted or added by hand, a partial copy): one line naming the table."""
        recorded = self.meta().get("rows")
        if recorded is None:
            return
        for table, count in self._counts().items():
            if count != recorded.get(table, 0):
                raise EvomergeError(
                    f"{self.path}: table {table} holds {count} rows but the archive recorded {recorded.get(table, 0)} "
                    "(rows were deleted or added outside evomerge); this run cannot be continued exactly")

    def _set_meta(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def set_meta(self, **values: Any) -> None:
        """Record plain-data state (JSON values), durably."""
        with self.transaction(durable=True):
            self._set_meta(values)

    def add(self, candidate: Candidate, result: EvalResult, submitted_at: float | None = None,
            responses: dict[str, list[float]] | None = None, told_seq: int | None = None,
            meta: dict[str, Any] | None = None) -> None:
        """Record one result and update the front + hypervolume, in one transaction.

        ``responses`` ({objective: per-item scores}) of a full evaluation go in with it, so a
        calibration interrupted at any moment has each evaluation either whole or absent.
        ``meta`` (the controller's progress, e.g. ``generation``) is committed with it, durably."""
        ok = result.status == "ok"
        with self.transaction(durable=bool(meta)):
            for name, scores in (responses or {}).items():
                self._add_responses(f"candidate:{candidate.candidate_id}", name, "search", scores)
            self.db.execute(
                "INSERT INTO evaluations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (candidate.candidate_id, candidate.generation, json.dumps([float(v) for v in candidate.genome]),
                 json.dumps(candidate.plan) if candidate.plan is not None else None, int(candidate.audit),
                 result.status, result.error, result.worker, result.seconds, result.items_scored,
                 json.dumps(result.timings), submitted_at, time.time()))
            if told_seq is not None:
                self.db.execute("INSERT INTO told VALUES (?, ?)", (told_seq, candidate.candidate_id))
            for name, score in result.objectives.items():
                self.db.execute("INSERT INTO scores VALUES (?,?,?,?,?,?)",
                                (candidate.candidate_id, name, score.value, score.stderr, score.n_items, score.full))
            if ok and candidate.generation >= 0 and all(name in result.objectives for name in self.objectives):
                point = np.array([result.objectives[name].value for name in self.objectives])
                self._update_front(candidate.candidate_id, point)
            if meta:
                self._set_meta(meta)

    def _add_responses(self, subject: str, objective: str, split: str, scores) -> None:
        self.db.execute("INSERT OR REPLACE INTO responses VALUES (?,?,?,?)",
                        (subject, objective, split, json.dumps([float(v) for v in scores])))

    def add_responses(self, subject: str, responses: dict[str, list[float]], split: str = "search") -> None:
        """Per-item scores of one subject (e.g. ``source:base``), one transaction."""
        with self.transaction():
            for name, scores in responses.items():
                self._add_responses(subject, name, split, scores)

    def _update_front(self, candidate_id: int, point: np.ndarray) -> None:
        front = self._front_points()
        if any(dominates(p, point) for p in front.values()):
            return
        for other, p in list(front.items()):
            if dominates(point, p):
                self.db.execute("DELETE FROM front WHERE candidate_id = ?", (other,))
                del front[other]
        self.db.execute("INSERT INTO front VALUES (?)", (candidate_id,))
        front[candidate_id] = point
        volume = hypervolume(np.array(list(front.values())), self.reference)
        self._set_meta({"hypervolume": volume})

    def _front_points(self) -> dict[int, np.ndarray]:
        rows = self.db.execute(
            "SELECT s.candidate_id, s.objective, s.value FROM scores s JOIN front f USING (candidate_id)").fetchall()
        points: dict[int, dict[str, float]] = {}
        for row in rows:
            points.setdefault(row["candidate_id"], {})[row["objective"]] = row["value"]
        return {cid: np.array([v[name] for name in self.objectives]) for cid, v in points.items()}

    # -- reading ---------------------------------------------------------------------------
    @_named
    def meta(self) -> dict[str, Any]:
        return {row[0]: json.loads(row[1]) for row in self.db.execute("SELECT key, value FROM meta")}

    @_named
    def records(self, where: str = "", params: tuple = ()) -> list[Record]:
        """Evaluations in candidate order (``where``: an SQL clause on ``evaluations``)."""
        rows = self.db.execute(f"SELECT * FROM evaluations {where} ORDER BY candidate_id", params).fetchall()
        scores: dict[int, dict[str, dict[str, Any]]] = {}
        chosen = f"WHERE candidate_id IN (SELECT candidate_id FROM evaluations {where})" if where else ""
        for s in self.db.execute(f"SELECT * FROM scores {chosen}", params if where else ()):
            scores.setdefault(s["candidate_id"], {})[s["objective"]] = dict(s)
        out = []
        for row in rows:
            candidate = Candidate(row["candidate_id"], row["generation"], json.loads(row["genome"]),
                                  json.loads(row["plan"]) if row["plan"] else None, bool(row["audit"]))
            result = EvalResult.from_dict({**dict(row), "timings": json.loads(row["timings"] or "{}"),
                                           "objectives": scores.get(row["candidate_id"], {})})
            out.append(Record(candidate, result, row["submitted_at"], row["finished_at"]))
        return out

    def record(self, candidate_id: int) -> Record | None:
        found = self.records("WHERE candidate_id = ?", (candidate_id,))
        return found[0] if found else None

    @_named
    def told_after(self, seq: int) -> list[tuple[int, int]]:
        """(seq, candidate id) of the results told after the ``seq``-th, in told order."""
        return [tuple(row) for row in self.db.execute(
            "SELECT seq, candidate_id FROM told WHERE seq > ? ORDER BY seq", (seq,))]

    @_named
    def front(self, calibration: bool = False) -> list[Record]:
        """The non-dominated search candidates. Calibration merges (generation -1) are kept
        out: they are random merges scored on every item, not search results.
        ``calibration=True`` gives the front over both (computed on demand, for audits)."""
        if not calibration:
            return self.records("WHERE candidate_id IN (SELECT candidate_id FROM front)")
        ok = [r for r in self.records("WHERE status = 'ok'") if all(o in r.objectives for o in self.objectives)]
        points = np.array([[r.value(o) for o in self.objectives] for r in ok]).reshape(len(ok), -1)
        return [ok[i] for i in non_dominated(points)] if ok else []

    @_named
    def responses(self, objective: str, split: str = "search") -> dict[str, np.ndarray]:
        """{subject: per-item scores} of one objective's full evaluations, in subject order."""
        rows = self.db.execute("SELECT subject, scores FROM responses WHERE objective = ? AND split = ? "
                               "ORDER BY subject", (objective, split)).fetchall()
        return {row[0]: np.asarray(json.loads(row[1]), dtype=float) for row in rows}

    def hypervolume(self) -> float:
        return float(self.meta().get("hypervolume", 0.0))

    @_named
    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM evaluations GROUP BY status").fetchall()
        counts = {row[0]: row[1] for row in rows}
        return {"ok": counts.get("ok", 0), "failed": counts.get("failed", 0), "total": sum(counts.values())}

    @_named
    def best(self, calibration: bool = False) -> dict[str, float]:
        """The best value per objective over successful search evaluations (and calibration
        merges too with ``calibration=True``)."""
        lowest = -1 if calibration else 0
        rows = self.db.execute(
            "SELECT s.objective, MAX(s.value) FROM scores s JOIN evaluations e USING (candidate_id) "
            "WHERE e.status = 'ok' AND e.generation >= ? GROUP BY s.objective", (lowest,)).fetchall()
        found = {row[0]: float(row[1]) for row in rows}
        return {name: found[name] for name in self.objectives if name in found}

    @_named
    def audit_stats(self) -> dict[str, dict[str, float]]:
        """Per objective, over audited candidates: how far the estimate is from the full
        score (mean absolute error, bias) and how well it ranks them (Spearman). Calibration
        evaluations (generation -1) are exact full scores, so they do not count."""
        rows = self.db.execute(
            "SELECT s.objective, s.value, s.full FROM scores s JOIN evaluations e USING (candidate_id) "
            "WHERE e.status = 'ok' AND e.generation >= 0 AND s.full IS NOT NULL ORDER BY s.candidate_id").fetchall()
        stats = {}
        for name in self.objectives:
            pairs = np.array([(r[1], r[2]) for r in rows if r[0] == name], dtype=float).reshape(-1, 2)
            if len(pairs) == 0:
                continue
            error = pairs[:, 0] - pairs[:, 1]
            entry = {"n": len(pairs), "mae": float(np.mean(np.abs(error))), "bias": float(np.mean(error)),
                     "spearman": float("nan")}
            if len(pairs) >= 3 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0:
                entry["spearman"] = spearman(pairs[:, 0], pairs[:, 1])
            stats[name] = entry
        return stats

    def close(self) -> None:
        self.db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error) on an autocommit connection;
    ``before_commit`` runs inside the transaction, last."""

    def __init__(self, db: sqlite3.Connection, before_commit=None, durable: bool = False) -> None:
        self.db = db
        self.before_commit = before_commit
        self.durable = durable

    def __enter__(self) -> None:
        if self.durable:   # a pragma, so outside the transaction: this commit (and the WAL before it) is fsynced
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.before_commit is not None:
            try:
                self.before_commit()
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            if self.durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
