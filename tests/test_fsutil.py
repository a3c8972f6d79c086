"""Atomic writes and run folders: what a user finds on disk after success and failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from brainseg.errors import BrainsegError
from brainseg.fsutil import atomic_path, atomic_write_text, next_run_dir


def test_written_file_has_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = atomic_write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert out.read_text() == "hello"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_failure_keeps_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    target.write_text("keep")
    with pytest.raises(BrainsegError, match="already exists"):
        atomic_write_text(target, "new", force=False)
    assert target.read_text() == "keep"


def test_run_folders_are_numbered_and_never_reused(tmp_path: Path) -> None:
    assert next_run_dir(tmp_path, "exp").name == "exp"
    assert next_run_dir(tmp_path, "exp").name == "exp2"
    (tmp_path / "exp7").mkdir()
    assert next_run_dir(tmp_path, "exp").name == "exp8"
    assert next_run_dir(tmp_path, "exp", exist_ok=True).name == "exp"
