"""Atomic output: a directory or file is either complete or not there at all."""

import pytest

from evomerge.errors import EvomergeError
import os

from evomerge.io import atomic
from evomerge.io.atomic import StreamedFile, atomic_dir, atomic_write_bytes, atomic_write_text


def test_atomic_dir_appears_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("hello")
        assert not final.exists()
        assert tmp.parent == tmp_path
    assert (final / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(EvomergeError, match="already exists"):
        with atomic_dir(final):
            pass
    assert (final / "old.txt").exists()
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_overwrite_keeps_old_content(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]


def test_atomic_write_text_and_bytes(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "f.txt", "one")
    assert p.read_text() == "one"
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_write_removes_what_killed_writers_left_and_keeps_live_ones(tmp_path):
    import os

    dead = dead_pid()
    killed_dir = tmp_path / f".out.tmp-{dead}-abc123"      # a merge killed halfway: shards and all
    killed_dir.mkdir()
    (killed_dir / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    killed_old = tmp_path / f".out.old-{dead}"
    killed_old.mkdir()
    killed_file = tmp_path / f"notes.txt.tmp-{dead}"
    killed_file.write_text("half")
    live = tmp_path / f".out.tmp-{os.getppid()}-xyz"          # a writer that is still running
    live.mkdir()
    unrelated = tmp_path / ".other.tmp-1-abc"
    unrelated.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("done")
    atomic_write_text(tmp_path / "notes.txt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "notes.txt", live.name, unrelated.name])


def test_writing_below_a_file_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EvomergeError, match="cannot write .*afile/sub/out: .*afile is a file, not a directory"):
        with atomic_dir(tmp_path / "afile" / "sub" / "out"):
            pass
    with pytest.raises(EvomergeError, match="afile is a file, not a directory"):
        atomic_write_text(tmp_path / "afile" / "f.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_every_file_of_a_directory_is_on_disk_before_it_gets_its_final_name(tmp_path, monkeypatch):
    synced, final = [], tmp_path / "model"
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.path.basename(os.path.realpath(f"/proc/self/fd/{fd}")), final.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    assert {("a.bin", False), ("b.json", False)} <= set(synced)
    assert (final / "sub" / "b.json").read_text() == "{}"


def test_a_streamed_file_hands_its_pages_to_the_disk_as_it_grows(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(atomic, "_START_WRITEBACK", lambda fd, off, n, flags: calls.append(flags))
    f = StreamedFile(tmp_path / "big")
    for _ in range(10):
        f.write(bytearray(450))
    f.close()
    assert len(calls) == 3  # once 1000 bytes are pending: at 1350, 2700 and 4050 bytes
    assert (tmp_path / "big").stat().st_size == 4500
