"""The project's one atomic file writer (checkpoints, datasets, reports, plots).

It lives in the lowest package so that every other one (``rankers`` never imports the others) can
use it: a temporary file beside the target, fsynced, then ``os.replace``d into place, and the
directory fsynced so that the rename survives a crash. A reader sees the old file or the new one,
never a partial write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write_with(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Writes ``path`` via ``write(fileobj)`` atomically; creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically."""
    return atomic_write_with(path, lambda f: f.write(data))
