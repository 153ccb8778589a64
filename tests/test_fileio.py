"""The atomic writer every checkpoint, dataset, report and plot goes through."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rankers.fileio import atomic_write, atomic_write_with


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    atomic_write(target, b"old")

    def broken(f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_files_get_the_mode_a_plain_write_would(tmp_path: Path) -> None:
    """mkstemp creates 0600 files: without the chmod every report, plot and checkpoint was owner-only, and an
    existing 0644 file became 0600 when rewritten."""
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    target = tmp_path / "atomic.txt"
    atomic_write(target, b"x")
    assert _mode(target) == _mode(plain)
    os.chmod(target, 0o644)
    atomic_write(target, b"y")
    assert _mode(target) == _mode(plain)
