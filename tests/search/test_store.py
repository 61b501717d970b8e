"""The run store: a run directory is data (opening one runs no code), one process writes it,
and evomerge deletes only directories it made."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.search.archive import Archive
from evomerge.search.store import ARCHIVE_FILE, RunLocked, RunStore

ROOT = Path(__file__).resolve().parents[2]


class RunsACommand:
    """Unpickling this runs a shell command: what a hostile run directory would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def craft(run_dir: Path, sentinel: Path) -> list[str]:
    """Replace every file of ``run_dir`` but the archive by a pickle that would create
    ``sentinel``, and add a checkpoint of the old pickled format with a correct checksum."""
    payload = pickle.dumps(RunsACommand(f"touch {sentinel}"))
    replaced = []
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(ARCHIVE_FILE):
            path.write_bytes(payload)
            replaced.append(str(path.relative_to(run_dir)))
    old = run_dir / "checkpoints" / "gen-000002.state"
    old.parent.mkdir()
    digest = hashlib.sha256(payload).hexdigest().encode()
    old.write_bytes(b"evomerge-search-state 1 " + digest + b"\n" + payload)
    return replaced


def test_a_crafted_run_directory_runs_no_code_on_resume_status_report_or_export(finished, tmp_path, capsys):
    run_dir = tmp_path / "shared-run"
    shutil.copytree(finished, run_dir)
    archive = Archive(run_dir)
    archive.set_meta(finished=False)      # so resume goes all the way into replaying
    archive.close()
    sentinel = tmp_path / "code-ran"
    replaced = craft(run_dir, sentinel)
    assert {"config.yaml", ".evomerge-run", "lock", "calibration/mc.json", "calibration/mc.sources.json",
            "calibration/sources.json"} <= set(replaced)
    # the pickle is live: loading it would indeed run the command
    pickle.loads((run_dir / "config.yaml").read_bytes())
    assert sentinel.exists()
    sentinel.unlink()

    commands = [("status", str(run_dir)), ("report", str(run_dir), "--out", str(tmp_path / "report")),
                ("export", str(run_dir), str(tmp_path / "export"), "--id", "0"),
                ("export", str(run_dir), str(tmp_path / "front"), "--front"),
                ("resume", str(run_dir), "--no-progress")]
    for args in commands:
        code, out, err = cli(capsys, *args)
        assert not sentinel.exists(), f"`evomerge {args[0]}` ran code from the run directory"
        assert code in (0, 2), (args, err)
        if code == 2:   # refusing is fine, as one line naming what is wrong
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), err
    # what needs only the archive still works: status, report and export read data, not code
    assert cli(capsys, "status", str(run_dir))[0] == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert (tmp_path / "export" / "candidate-0" / "config.json").is_file()
    code, _, err = cli(capsys, "resume", str(run_dir), "--no-progress")
    assert code == 2 and "mc.sources.json: unreadable source abilities" in err


def hold_the_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that opens the run for writing and keeps it open."""
    script = ("import sys, time\nfrom evomerge.search.run import SearchRun\n"
              f"run = SearchRun.resume({str(run_dir)!r})\nprint('locked', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_a_second_process_on_a_run_gets_one_line_naming_the_holder_and_readers_still_read(
        write_config, tmp_path):
    config = write_config(optimizer={"population": 3, "generations": 2})
    run_dir = tmp_path / "run"
    from evomerge.search.run import SearchRun

    run = SearchRun.create(config, run_dir)
    run.close()
    holder = hold_the_lock(run_dir)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        second = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(run_dir), "--no-progress"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == (f"error: {run_dir}: the run is in use by another evomerge process "
                                                f"(pid {holder.pid}); wait for it to end or stop it")
        status = subprocess.run([sys.executable, "-m", "evomerge.cli", "status", str(run_dir)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "generation:   0 of 2 done" in status.stdout, status.stderr
        assert f"(running: pid {holder.pid} writes it)" in status.stdout
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything by hand: the lock went with it
    assert RunStore(run_dir).writer() is None
    run = SearchRun.resume(run_dir)
    run.run(progress=False)
    run.close()
    assert RunStore(run_dir).meta()["finished"] is True


def test_a_second_writer_in_the_same_process_is_refused_too(write_config, tmp_path):
    from evomerge.search.run import SearchRun

    config = write_config(optimizer={"population": 3, "generations": 2})
    run = SearchRun.create(config, tmp_path / "run")
    try:
        with pytest.raises(RunLocked, match=f"in use by another evomerge process \\(pid {os.getpid()}\\)"):
            SearchRun.resume(tmp_path / "run")
    finally:
        run.close()


def test_only_a_directory_carrying_the_run_marker_counts_as_a_run_directory(write_config, tmp_path):
    from evomerge.search.run import SearchRun

    run = SearchRun.create(write_config(optimizer={"population": 2, "generations": 1}), tmp_path / "run")
    run.close()
    assert RunStore.is_run_dir(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "archive.sqlite").write_bytes(b"")
    assert not RunStore.is_run_dir(tmp_path / "other")
    assert not RunStore.is_run_dir(tmp_path / "missing")


def transactions(statements: list[str]) -> list[dict]:
    """The write transactions in an SQLite statement trace, each marked durable when
    ``synchronous=FULL`` was set for it."""
    out, current, full = [], None, False
    for sql in statements:
        if sql.startswith("PRAGMA synchronous=FULL"):
            full = True
        elif sql.startswith("BEGIN"):
            current = {"durable": full, "sql": []}
        elif sql in ("COMMIT", "ROLLBACK") and current is not None:
            out.append(current)
            current, full = None, False
        elif current is not None:
            current["sql"].append(sql)
    return out


def test_each_generations_last_result_commits_durably_with_the_progress(write_config, tmp_path):
    from evomerge.search.run import SearchRun

    run = SearchRun.create(write_config(optimizer={"population": 3, "generations": 2}), tmp_path / "run")
    statements: list[str] = []
    run.archive.db.set_trace_callback(statements.append)
    run.run(progress=False)
    run.close()
    writes = transactions(statements)
    results = [t for t in writes if any(q.startswith("INSERT INTO evaluations") for q in t["sql"])]
    assert [t["durable"] for t in results] == [False, False, True, False, False, True]
    assert writes[-1]["durable"] and not any(q.startswith("INSERT INTO evaluations") for q in writes[-1]["sql"])
    # between durable commits the archive runs at NORMAL (WAL: consistent, fsynced at the next durable one)
    archive = Archive(tmp_path / "run")
    try:
        assert archive.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert archive.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        archive.close()


def test_a_run_directory_of_the_pickled_checkpoint_format_is_refused_without_reading_its_checkpoints(
        write_config, tmp_path, capsys):
    """What an earlier evomerge left: meta.json, config.yaml, checkpoints/*.state and an
    archive without format marks. Nothing of it is unpickled; resume and status say why."""
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    archive = Archive(run_dir, objectives=["a", "b"])
    archive.close()
    sentinel = tmp_path / "code-ran"
    (run_dir / "meta.json").write_text('{"format": 1, "evomerge_version": "0.1.0"}')
    (run_dir / "config.yaml").write_bytes(pickle.dumps(RunsACommand(f"touch {sentinel}")))
    (run_dir / "checkpoints").mkdir()
    payload = pickle.dumps(RunsACommand(f"touch {sentinel}"))
    (run_dir / "checkpoints" / "gen-000001.state").write_bytes(
        b"evomerge-search-state 1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    for command in ("resume", "status"):
        code, _, err = cli(capsys, command, str(run_dir))
        assert code == 2 and err.count("\n") == 1 and "no format recorded: an earlier evomerge" in err, err
    assert not sentinel.exists()
