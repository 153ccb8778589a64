"""The project's one atomic file writer (checkpoints, datasets, reports, plots).

It lives in the lowest package so that every other one (``rankers`` never imports the others) can
use it: a temporary file beside the target, fsynced, then ``os.replace``d into place, and the
directory fsynced so that the rename survives a crash. A reader sees the old file or the new one,
never a partial write.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""The mode ``open(path, "w")`` would give a new file (read at import: ``os.umask`` is process-wide)."""


def atomic_write_with(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Writes ``path`` via ``write(fileobj)`` atomically; creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes it 0600; a file written plainly gets 0666 minus the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # make the rename durable
    return path


def fsync_dir(path: str | Path) -> None:
    """fsyncs directory ``path`` so that renames into it survive a crash (best effort: not every filesystem
    lets a directory be opened)."""
    try:
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def stale_path(path: str | Path) -> Path:
    """The first free ``<path>.stale-<n>`` (n = 0, 1, ...): where a checkpoint, dataset or result that is
    replaced or cannot be resumed is moved instead of deleted."""
    path = Path(path)
    n = 0
    while (dest := path.with_name(f"{path.name}.stale-{n}")).exists() or dest.is_symlink():
        n += 1
    return dest


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically."""
    return atomic_write_with(path, lambda f: f.write(data))


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of the file's bytes, read in 1 MB blocks: what checkpoints, datasets and the ranker cache
    record of their files, to refuse a damaged one."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
