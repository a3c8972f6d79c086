"""Atomic writes and run folders: what a user finds on disk after success and failure."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from brainseg.errors import BrainsegError
from brainseg.fsutil import (
    atomic_path,
    atomic_write_text,
    next_run_dir,
    remove_stale_temps,
    temp_prefix,
)


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


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_the_litter_of_dead_writers_on_this_host_is_removed(tmp_path: Path) -> None:
    mine = temp_prefix("a_mask.tif")  # .a_mask.tif.~HOST@PID.
    host = mine.split("~", 1)[1].split("@", 1)[0]
    dead = dead_pid()
    (tmp_path / f".a_mask.tif.~{host}@{dead}.abcd_123.tmp").write_bytes(b"half")
    (tmp_path / f".kaggle_3m-unpack.~{host}@{dead}.x1y2z3w4").mkdir()
    (tmp_path / f".kaggle_3m-unpack.~{host}@{dead}.x1y2z3w4" / "f.tif").write_bytes(b"x")
    kept = [
        f"{mine}abcdefgh.tmp",  # a live writer: this process
        f".b_mask.tif.~otherhost@{dead}.abcdefgh.tmp",  # another machine's writer
        f"~{host}@{dead}.abcdefgh.tmp",  # not hidden: a user's file
        ".c_mask.tif.abcdefgh.tmp",  # no owner tag (can't tell): left alone
        "a_mask.tif",
    ]
    for name in kept:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".a_mask.tif.~{host}@{dead}.abcd_123.tmp", f".kaggle_3m-unpack.~{host}@{dead}.x1y2z3w4"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_temporary_names_carry_the_writer(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "m.tif") as tmp:
        assert tmp.name.startswith(".m.tif.~") and f"@{os.getpid()}." in tmp.name
        tmp.write_bytes(b"x")
        assert remove_stale_temps(tmp_path) == []  # its writer (this process) is alive
    assert (tmp_path / "m.tif").read_bytes() == b"x"


# --------------------------------------------------------------------------- issue 22


def _special_targets(tmp_path: Path) -> dict[str, Path]:
    """Non-regular files a --force write must never replace: a FIFO, links, a device node."""
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    (tmp_path / "real.yaml").write_text("mine")
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "real.yaml")
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "nowhere.yaml")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    targets = {"fifo": fifo, "link": link, "dangling": dangling, "folder": folder}
    try:  # a copy of /dev/null's device numbers, made here (root only): never the real one
        dev = tmp_path / "null.yaml"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets["device"] = dev
    except (PermissionError, OSError):
        pass
    return targets


def _kind(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_ino


@pytest.mark.parametrize("force", [False, True])
def test_force_never_replaces_a_device_fifo_link_or_folder(tmp_path: Path, force: bool) -> None:
    targets = _special_targets(tmp_path)
    before = {k: _kind(p) for k, p in targets.items()}
    for name, target in targets.items():
        with pytest.raises(BrainsegError) as err:
            atomic_write_text(target, "new", force=force)
        text = str(err.value)
        assert str(target) in text and "\n" not in text, (name, text)
        if force:
            assert "not a regular file" in text, (name, text)
    assert {k: _kind(p) for k, p in targets.items()} == before
    assert (tmp_path / "real.yaml").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_temporary_files_and_folders_follow_the_umask(tmp_path: Path) -> None:
    from brainseg.fsutil import make_temp_dir, make_temp_file

    old = os.umask(0o027)
    try:
        f = make_temp_file(tmp_path / "summary.csv")
        d = make_temp_dir(tmp_path, "kaggle_3m")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert f.name.startswith(temp_prefix("summary.csv"))
    assert d.name.startswith(temp_prefix("kaggle_3m"))
    assert sorted(remove_stale_temps(tmp_path)) == []  # this process is alive


@pytest.mark.parametrize("name", ["/", "..", ".", "", "a/b", "../x", "ABS", "a\\b", "x\0y"])
def test_run_folder_names_are_plain_folder_names(tmp_path: Path, name: str) -> None:
    project = tmp_path / "project"  # not made: "/" then cannot reach the real root
    name = str(tmp_path / "abs") if name == "ABS" else name  # an absolute name, kept in tmp
    with pytest.raises(BrainsegError, match="plain folder name"):
        next_run_dir(project, name)
    assert not project.exists() or list(project.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["project"])


def test_the_phantom_dataset_folder_follows_the_umask(tmp_path: Path) -> None:
    from brainseg.data.synthetic import write_synthetic

    old = os.umask(0o022)
    try:
        root = write_synthetic(tmp_path, patients=1, size=32, slices=(4, 4))
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.iterdir()] if p.is_dir()}
    assert modes == {0o755}, modes


def test_json_safe_is_one_conversion_for_every_json_output(tmp_path: Path) -> None:
    """NaN / inf -> null, numpy and torch scalars -> Python numbers, arrays -> lists, paths ->
    strings, sets -> sorted lists: checked with the standard json module (allow_nan=False)."""
    import json
    import math

    import numpy as np
    import torch

    from brainseg.fsutil import json_safe

    obj = {
        "nan": math.nan,
        "inf": np.float32("inf"),
        1: np.int64(3),
        "t": torch.tensor(0.5),
        "a": np.array([[1, 2]], dtype=np.uint8),
        "p": tmp_path / "x",
        "s": {"b", "a"},
        "l": (np.bool_(True), [np.float64("nan")]),
    }
    text = json.dumps(json_safe(obj), allow_nan=False)
    assert json.loads(text) == {
        "nan": None,
        "inf": None,
        "1": 3,
        "t": 0.5,
        "a": [[1, 2]],
        "p": str(tmp_path / "x"),
        "s": ["a", "b"],
        "l": [True, [None]],
    }
