"""Resume: a search killed at any moment continues, by replaying its archive, to the same archive."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.search.optimizers import OPTIMIZERS, is_multi_objective
from evomerge.search.run import SearchRun

ROOT = Path(__file__).resolve().parents[2]


def evomerge_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the ``evomerge`` command in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def outcome(run_dir: Path) -> list[tuple]:
    """What must match between runs: ids, generations, genomes, statuses, objectives."""
    db = sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT candidate_id, generation, genome, status FROM evaluations ORDER BY candidate_id").fetchall()
    scores = db.execute("SELECT candidate_id, objective, value, stderr, full FROM scores ORDER BY 1, 2").fetchall()
    front = db.execute("SELECT candidate_id FROM front ORDER BY 1").fetchall()
    db.close()
    return [rows, scores, front]


def uninterrupted(config: Path, run_dir: Path) -> list[tuple]:
    run = SearchRun.create(config, run_dir)
    run.run(progress=False)
    run.close()
    return outcome(run_dir)


def rows_of_generation_at_least(run_dir: Path, generation: int) -> int:
    try:
        db = sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True, timeout=1)
        n = db.execute("SELECT COUNT(*) FROM evaluations WHERE generation >= ?", (generation,)).fetchone()[0]
        db.close()
        return n
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [{"name": "nsga2"}, {"name": "cmaes"}, {"name": "ng_mo", "steady_state": True}])
def test_kill_9_mid_generation_then_resume_gives_the_uninterrupted_archive(optimizer, write_config, tmp_path, capsys):
    config = write_config(optimizer={**optimizer, "population": 6, "generations": 4},
                          evaluator={"kind": "synthetic", "sleep": 0.05, "fail_every": 7})
    expected = uninterrupted(config, tmp_path / "reference")

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(config), "--run-dir", str(run_dir),
                             "--no-progress"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while rows_of_generation_at_least(run_dir, 1) < 2:
        assert proc.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {row[0]: row[1:] for row in sqlite3.connect(run_dir / "archive.sqlite").execute(
        "SELECT candidate_id, finished_at, worker FROM evaluations")}
    assert 6 < len(before) < 24  # killed inside the search, with generation 1 under way

    code, out, err = evomerge_cli(capsys, "resume", str(run_dir), "--no-progress")
    assert code == 0, err
    assert "generation:   4 of 4 done" in out
    assert outcome(run_dir) == expected
    after = {row[0]: row[1:] for row in sqlite3.connect(run_dir / "archive.sqlite").execute(
        "SELECT candidate_id, finished_at, worker FROM evaluations")}
    assert all(after[cid] == before[cid] for cid in before)  # nothing completed was redone
    assert not (run_dir / "checkpoints").exists()  # the archive is the only state

    code, out, _ = evomerge_cli(capsys, "resume", str(run_dir))
    assert code == 0 and "already finished" in out


class StopAfter:
    """A pool that evaluates in process and 'crashes' the controller after n results."""

    def __init__(self, run: SearchRun, n: int):
        from evomerge.workers.evaluator import make_evaluator

        self.evaluator, self.queue, self.left = make_evaluator(run.setup.spec), [], n

    def submit(self, candidate):
        self.queue.append(candidate)

    def pending(self):
        return len(self.queue)

    def next_result(self, timeout=None):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.evaluator.evaluate(self.queue.pop(0))

    def close(self):
        pass


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_interrupted_runs_of_every_optimizer_resume_identically_by_replay(name, write_config, tmp_path):
    single = not is_multi_objective(name)
    config = write_config(optimizer={"name": name, "population": 5, "generations": 3})
    expected = uninterrupted(config, tmp_path / "reference")
    run = SearchRun.create(config, tmp_path / "run")
    for stop_after in (7, 4):  # two interruptions, the second in a later generation
        with pytest.raises(KeyboardInterrupt):
            run.run(pool=StopAfter(run, stop_after), progress=False)
        run.close()
        run = SearchRun.resume(tmp_path / "run")
    run.run(progress=False)
    assert outcome(tmp_path / "run") == expected
    assert len(expected[0]) == 15 and (single or len(expected[2]) > 1)


def interrupted_run(write_config, tmp_path: Path, stop_after: int = 10) -> Path:
    config = write_config(optimizer={"name": "nsga2", "population": 4, "generations": 3})
    run = SearchRun.create(config, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run.run(pool=StopAfter(run, stop_after), progress=False)  # stops in generation 3 (index 2)
    run.close()
    return tmp_path / "run"


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def one_line_error(capsys, *args: str) -> str:
    code, _, err = evomerge_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_the_archive_records_the_progress_and_no_checkpoint_file_is_written(write_config, tmp_path):
    run_dir = interrupted_run(write_config, tmp_path)
    assert sorted(p.name for p in run_dir.iterdir()) == [".evomerge-run", "archive.sqlite", "config.yaml", "lock"]
    db = sqlite3.connect(run_dir / "archive.sqlite")
    meta = dict(db.execute("SELECT key, value FROM meta"))
    assert meta["generation"] == "2" and meta["finished"] == "false"   # two generations told, then the kill
    assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 10
    db.close()


@pytest.mark.parametrize("where", ["a finished generation", "the generation under way"])
def test_a_deleted_archive_row_is_a_one_line_error_on_resume_and_nothing_changes(where, write_config, tmp_path,
                                                                                 capsys):
    run_dir = interrupted_run(write_config, tmp_path)
    db = sqlite3.connect(run_dir / "archive.sqlite")
    victim = 2 if where == "a finished generation" else 9
    db.execute("DELETE FROM scores WHERE candidate_id = ?", (victim,))
    db.execute("DELETE FROM evaluations WHERE candidate_id = ?", (victim,))
    db.commit()
    db.close()
    before = snapshot(run_dir)
    line = one_line_error(capsys, "resume", str(run_dir))
    assert "archive.sqlite: table evaluations holds 9 rows but the archive recorded 10" in line
    assert "cannot be continued exactly" in line
    assert snapshot(run_dir) == before


def test_a_row_deleted_with_its_count_is_still_caught_by_replay(write_config, tmp_path, capsys):
    run_dir = interrupted_run(write_config, tmp_path)
    db = sqlite3.connect(run_dir / "archive.sqlite")
    db.execute("DELETE FROM scores WHERE candidate_id = 2")
    db.execute("DELETE FROM evaluations WHERE candidate_id = 2")
    db.execute("DELETE FROM meta WHERE key = 'rows'")   # the row counts gone too
    db.commit()
    db.close()
    line = one_line_error(capsys, "resume", str(run_dir))
    assert "candidate 2 of generation 0 is missing, yet the archive records 2 generations done" in line


def test_a_changed_genome_is_refused_on_resume(write_config, tmp_path, capsys):
    run_dir = interrupted_run(write_config, tmp_path)
    db = sqlite3.connect(run_dir / "archive.sqlite")
    db.execute("UPDATE evaluations SET genome = ? WHERE candidate_id = 5", ("[0.5, 0.5, 0.5, 0.5, 1.0]",))
    db.commit()
    db.close()
    line = one_line_error(capsys, "resume", str(run_dir))
    assert "candidate 5 holds another genome than replaying the run asks for" in line


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_archive_is_a_one_line_error_in_resume_and_status(damage, write_config, tmp_path, capsys):
    run_dir = interrupted_run(write_config, tmp_path)
    path = run_dir / "archive.sqlite"
    data = path.read_bytes()
    path.write_bytes(b"\x00not sqlite\xff" * 64 if damage == "garbage" else data[: len(data) // 3])
    before = snapshot(run_dir)
    for command in ("resume", "status"):
        line = one_line_error(capsys, command, str(run_dir))
        assert "archive.sqlite" in line
    assert snapshot(run_dir) == before


class Recording(StopAfter):
    """Evaluates in process and records how many candidates were out at each result."""

    def __init__(self, run: SearchRun):
        super().__init__(run, 10**9)
        self.out_at_result: list[int] = []

    def next_result(self, timeout=None):
        self.out_at_result.append(self.pending())
        return super().next_result(timeout)


@pytest.mark.parametrize("name", ["random", "cmaes", "ng_mo"])
def test_steady_state_keeps_the_pool_full_and_resumes_identically(name, write_config, tmp_path):
    config = write_config(optimizer={"name": name, "population": 5, "generations": 3, "steady_state": True})
    reference = SearchRun.create(config, tmp_path / "reference")
    pool = Recording(reference)
    reference.run(pool=pool, progress=False)
    reference.close()
    # one new candidate per result: the pool holds a full population until the budget runs out
    assert pool.out_at_result == [5] * 11 + [4, 3, 2, 1]
    expected = outcome(tmp_path / "reference")
    assert [row[0] for row in expected[0]] == list(range(15))
    assert [row[1] for row in expected[0]] == [0] * 5 + [1] * 5 + [2] * 5   # generation = id // population

    run = SearchRun.create(config, tmp_path / "run")
    for stop_after in (7, 4):   # interrupted between checkpoints (one every 5 results), twice
        with pytest.raises(KeyboardInterrupt):
            run.run(pool=StopAfter(run, stop_after), progress=False)
        run.close()
        run = SearchRun.resume(tmp_path / "run")
    run.run(progress=False)
    run.close()
    assert outcome(tmp_path / "run") == expected
    db = sqlite3.connect(tmp_path / "run" / "archive.sqlite")
    assert [r[0] for r in db.execute("SELECT candidate_id FROM told ORDER BY seq")] == list(range(15))
    db.close()
