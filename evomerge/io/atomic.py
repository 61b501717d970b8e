"""Write user-visible output so that it is either complete or absent.

Files go to ``<path>.tmp-<pid>``, are fsynced, then ``os.replace``d onto the
final name. Directories are built in a temporary sibling (same filesystem, so
the final rename is atomic) and renamed onto the final path only when the
``with`` block finishes without an exception; on failure the temp dir is
removed, so a crash never leaves a half-written model directory behind.
"""

from __future__ import annotations

import os
import shutil
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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    if final.exists() and not final.is_dir():
        raise EvomergeError(f"output path {final} exists and is not a directory")
    if final.is_dir() and not overwrite:
        raise EvomergeError(f"output directory {final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
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
