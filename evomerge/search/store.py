"""The run store: the one module that knows what a run directory holds.

    archive.sqlite       the truth: every evaluation, the front, and as plain data (JSON in
                         the ``meta`` table) the run's format, evomerge version, resolved
                         config and the controller's progress (generation, finished)
    .evomerge-run        the run marker: only a directory carrying it is ever deleted by
                         evomerge (``demo --fresh``); its content is never read
    lock                 held (``fcntl.flock``) by the one process that writes the run; holds
                         that process's pid as text, for the message another process gets
    config.yaml          a copy of the resolved config for people to read; evomerge reads the
                         config from the archive
    calibration/         IRT calibration artifacts (checksummed JSON) and source abilities
                         per objective, written by the pre-search phase (calibrate.py)
    report/, export/     what ``evomerge report`` / the demo write by default

Nothing in a run directory is unpickled or imported: the archive is SQLite rows and JSON,
the other files are JSON or text. The controller keeps no optimizer state on disk: resume
rebuilds the optimizer by replaying the archived asks and tells in order (see run.py), so a
run directory can be copied, shared and opened like a CSV file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import evomerge
from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.search.archive import Archive
    from evomerge.search.config import SearchConfig

RUN_FORMAT = 2                # 2: config + controller progress in the archive, no pickled checkpoints
ARCHIVE_FILE = "archive.sqlite"
MARKER_FILE = ".evomerge-run"
LOCK_FILE = "lock"
CONFIG_COPY = "config.yaml"
CALIBRATION_DIR = "calibration"
PRESEARCH_DONE = "sources.json"   # in CALIBRATION_DIR, written last: the pre-search phase is complete
REPORT_DIR = "report"
MARKER_TEXT = "evomerge run directory (the archive is archive.sqlite)\n"


class RunLocked(EvomergeError):
    """Another process holds a run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/lock`` for as long as this object is open.

    The lock belongs to the open file, so it is released when the process dies however it
    dies (``kill -9`` included): a stale lock file never blocks a resume."""

    def __init__(self, path: Path, label: Path) -> None:
        self.path = path
        self.fd: int | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise EvomergeError(f"{path}: cannot open the run's lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = lock_holder(path) or _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise RunLocked(f"{label}: the run is in use by another evomerge process ({who}); "
                                "wait for it to end or stop it") from None
            raise EvomergeError(f"{path}: cannot lock the run ({exc.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the file releases the flock
            self.fd = None

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            self.release()


def lock_holder(path: Path) -> int | None:
    """The pid holding the ``flock`` on ``path`` (Linux, from /proc/locks, without taking the
    lock); None when nobody holds it or this cannot be known."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        # "N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF"; a waiter's line has "->" after "N:"
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, inode = parts[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
                return int(parts[4])
        except ValueError:
            continue
    return None


def _read_pid(fd: int) -> int | None:
    """The pid a lock holder wrote (text; anything else counts as unknown)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunStore:
    """Paths and plain-data state of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)

    # -- layout -------------------------------------------------------------------------------
    @property
    def archive_path(self) -> Path:
        return self.root / ARCHIVE_FILE

    @property
    def marker_path(self) -> Path:
        return self.root / MARKER_FILE

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def config_copy_path(self) -> Path:
        return self.root / CONFIG_COPY

    @property
    def calibration_dir(self) -> Path:
        return self.root / CALIBRATION_DIR

    def calibration_path(self, objective: str) -> Path:
        """The IRT calibration fitted for one objective before the search."""
        return self.calibration_dir / f"{objective}.json"

    def thetas_path(self, objective: str) -> Path:
        """The source models' abilities under one objective's calibration."""
        return self.calibration_dir / f"{objective}.sources.json"

    @property
    def presearch_done_path(self) -> Path:
        return self.calibration_dir / PRESEARCH_DONE

    @property
    def report_dir(self) -> Path:
        return self.root / REPORT_DIR

    @staticmethod
    def is_run_dir(path: str | Path) -> bool:
        """True for a directory evomerge made as a run directory (it carries the marker)."""
        marker = Path(path) / MARKER_FILE
        return Path(path).is_dir() and marker.is_file() and not marker.is_symlink()

    # -- creating ----------------------------------------------------------------------------
    @staticmethod
    def write_new(tmp: Path, cfg: "SearchConfig") -> None:
        """Fill the empty directory ``tmp`` (renamed onto the run directory by the caller)."""
        from evomerge.io.atomic import atomic_write_text
        from evomerge.search.archive import Archive
        from evomerge.search.config import dump_config

        atomic_write_text(tmp / MARKER_FILE, MARKER_TEXT)
        atomic_write_text(tmp / CONFIG_COPY, "# A copy for reading: evomerge reads this run's config from "
                                             "archive.sqlite.\n" + dump_config(cfg))
        archive = Archive(tmp, objectives=cfg.objective_names, reference=cfg.optimizer.reference_point)
        try:
            archive.set_meta(format=RUN_FORMAT, evomerge_version=evomerge.__version__, created=time.time(),
                             seed=cfg.seed, config=cfg.model_dump(mode="json"), generation=0, finished=False)
        finally:
            archive.close()

    # -- reading -----------------------------------------------------------------------------
    def open_archive(self, readonly: bool = True) -> "Archive":
        """The archive, with an unreadable or foreign file reported as one line."""
        from evomerge.search.archive import Archive

        if not self.root.is_dir():
            raise EvomergeError(f"{self.root}: no such run directory")
        if not self.archive_path.is_file():
            raise EvomergeError(f"{self.root}: not a search run directory (no {ARCHIVE_FILE})")
        try:
            return Archive(self.root, readonly=readonly)
        except sqlite3.DatabaseError as exc:
            raise EvomergeError(f"{self.archive_path}: the archive cannot be read ({exc})") from None

    def meta(self) -> dict[str, Any]:
        """The archive's meta table, after checking that this evomerge can continue the run."""
        archive = self.open_archive()
        try:
            meta = _guard_sqlite(self.archive_path, archive.meta)
        finally:
            archive.close()
        check_format(self.archive_path, meta)
        return meta

    def config(self, meta: dict[str, Any] | None = None) -> "SearchConfig":
        """The resolved config the run was started with (from the archive)."""
        from evomerge.search.config import parse_config

        meta = self.meta() if meta is None else meta
        if "config" not in meta:
            raise EvomergeError(f"{self.archive_path}: the archive holds no config (not a search run)")
        cfg = parse_config(meta["config"], f"{self.archive_path}: config", self.root)
        # A run directory may have been moved or copied: its files are where it is now.
        cfg.run_dir = str(self.root.resolve())
        return cfg

    def writer(self) -> int | None:
        """The pid of the process writing this run now, if any."""
        return lock_holder(self.lock_path) if self.lock_path.is_file() else None

    def lock(self) -> RunLock:
        """Take the run's lock (one writing process per run directory)."""
        if not self.root.is_dir():
            raise EvomergeError(f"{self.root}: no such run directory")
        return RunLock(self.lock_path, self.root)


def check_format(where: Path, meta: dict[str, Any]) -> None:
    """Refuse archives of another run format or evomerge version, naming both."""
    if "format" not in meta and "config" not in meta:
        raise EvomergeError(f"{where}: not the archive of a run of this evomerge (no format recorded: an earlier "
                            f"evomerge, whose run directories kept pickled checkpoints, or not a search run); "
                            f"this is evomerge {evomerge.__version__} (format {RUN_FORMAT})")
    if meta.get("format") != RUN_FORMAT or meta.get("evomerge_version") != evomerge.__version__:
        found, fmt = meta.get("evomerge_version"), meta.get("format")
        raise EvomergeError(f"{where}: run directory written by evomerge {found} (format {fmt}); "
                            f"this is evomerge {evomerge.__version__} (format {RUN_FORMAT})")


def _guard_sqlite(path: Path, read, *args):
    """Run one read on an archive; a damaged file is one line naming it."""
    try:
        return read(*args)
    except sqlite3.DatabaseError as exc:
        raise EvomergeError(f"{path}: the archive cannot be read ({exc})") from None
    except ValueError as exc:   # a meta value that is not JSON
        raise EvomergeError(f"{path}: the archive holds malformed data ({exc})") from None
