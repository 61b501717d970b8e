"""Write user-visible output so that it is either complete or absent.

Files go to ``<path>.tmp-<pid>``, are fsynced, then ``os.replace``d onto the
final name. Directories are built in a temporary sibling ``.<name>.tmp-<pid>-<random>``
(same filesystem, so the final rename is atomic), every file in them is fsynced, and they
are renamed onto the final path only when the ``with`` block finishes without an exception
(a power loss after the rename cannot leave a short file under the final name); on failure
the temp dir is removed. ``StreamedFile`` writes a large file front to back and hands its
pages to the disk as it goes, so the closing fsync waits for the last few MiB, not all. A process killed outright (``kill -9``, power loss) cannot clean up, so the next
write to the same target removes the temporaries of writers that are no longer alive
(their pid is in the name): a killed merge leaves its shards behind only until then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge.errors import EvomergeError


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a dir.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


WRITEBACK_BYTES = 32 << 20  # dirty bytes handed to the disk at a time
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    # os has no sync_file_range (Linux only); without it the closing fsync does all the work.
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_START_WRITEBACK = _sync_file_range()


class StreamedFile:
    """A binary file written front to back that is on disk once ``close`` returns.

    Every WRITEBACK_BYTES the dirty pages so far are handed to the disk without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the kernel would otherwise hold them
    until the closing fsync (its background writeback starts at 10% of memory), which
    then waits for the whole file after the last byte is written instead of beside it.
    """

    def __init__(self, path: str | Path):
        self._f = open(path, "wb", buffering=0)
        self._pending = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._pending += view.nbytes
        while view.nbytes:
            view = view[self._f.write(view):]
        if self._pending >= WRITEBACK_BYTES and _START_WRITEBACK is not None:
            _START_WRITEBACK(self._f.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)
            self._pending = 0

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abandon(self) -> None:
        """Close without waiting for the disk (the file is about to be removed)."""
        self._f.close()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Remove the temporaries that dead writers left beside ``final``: ``.<name>.tmp-<pid>-*``
    and ``.<name>.old-<pid>`` directories and ``<name>.tmp-<pid>`` files. A live writer's
    temporaries are kept. Returns what was removed."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    name = re.escape(final.name)
    pattern = re.compile(rf"^(?:\.{name}\.(?:tmp|old)-(\d+)(?:-.*)?|{name}\.tmp-(\d+))$")
    removed = []
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return []
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        if _alive(pid):
            continue
        try:
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
        except OSError:
            continue          # not ours to remove after all (permissions): leave it
        removed.append(sibling)
    return removed


def _make_parent(path: Path) -> None:
    """Create ``path``'s parent folders; one line naming the path when that is impossible."""
    for ancestor in [path.parent, *path.parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise EvomergeError(f"cannot write {path}: {ancestor} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvomergeError(f"cannot create the directory {path.parent} ({exc.strerror})") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file + fsync + rename."""
    path = Path(path)
    _make_parent(path)
    remove_stale_temps(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_write_bytes``)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside ``final``; rename it onto ``final`` on success.

    An existing ``final`` directory is refused unless ``overwrite=True`` (then it
    is replaced only after the new content is complete). An existing file at
    ``final`` is always refused.
    """
    final = Path(final)
    _make_parent(final)
    if final.exists() and not final.is_dir():
        raise EvomergeError(f"output path {final} exists and is not a directory")
    if final.is_dir() and not overwrite:
        raise EvomergeError(f"output directory {final} already exists (pass --overwrite to replace it)")
    remove_stale_temps(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    except OSError as exc:
        raise EvomergeError(f"cannot write beside {final} ({exc.strerror})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.is_dir():
            if not overwrite:
                raise EvomergeError(f"output directory {final} appeared while writing; not replacing it")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
