"""Atomic file writes and run folders: nothing half-written ever carries a final name."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from brainseg.errors import BrainsegError, BrainsegRuntimeError


def _fail_write(path: Path, exc: OSError) -> BrainsegRuntimeError:
    import errno

    if exc.errno == errno.ENOSPC:
        return BrainsegRuntimeError(
            f"disk full while writing {path}; the previous file (if any) is intact",
            hint="free some space and run the command again",
        )
    return BrainsegRuntimeError(
        f"cannot write {path}: {exc.strerror or exc}",
        hint="check the folder exists and is writable",
    )


def write_error(path: str | os.PathLike[str], exc: OSError) -> BrainsegRuntimeError:
    """The one-line error for a failed write of ``path`` (says "disk full" for ENOSPC)."""
    return _fail_write(Path(path), exc)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``path`` on success.

    On any failure the temporary file is removed and ``path`` is left as it was. With
    ``force=False`` an existing ``path`` is refused before any work is done.
    """
    path = Path(path)
    if not force and path.exists():
        raise BrainsegError(f"{path} already exists", hint="pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent
        )
        os.close(fd)
    except OSError as exc:
        raise _fail_write(path, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        if tmp.exists():
            # mkstemp creates 0600; give the result the mode a plain open() would have.
            tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _fail_write(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: Names of atomic_path's temporary files: ``.NAME.XXXXXXXX.tmp``.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")

#: The writer's tag at the end of a temporary name (before mkstemp's 8 random characters).
_OWNER_TAG = re.compile(r"~(?P<host>[^~@/]+)@(?P<pid>[0-9]+)\.[A-Za-z0-9_]{8}(?:\.tmp)?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_prefix(name: str) -> str:
    """Prefix of a hidden temporary name for ``name`` that records who writes it.

    ``.NAME.~HOST@PID.`` + mkstemp's random part: a later run can tell the litter of a
    killed writer (its process is gone) from a file another live process is still writing.
    """
    return f".{name}.~{_host()}@{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def is_stale_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file or folder of a writer on this host that is gone."""
    m = _OWNER_TAG.search(name)
    return (
        name.startswith(".")
        and m is not None
        and m["host"] == _host()
        and not pid_alive(int(m["pid"]))
    )


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed writers on this host left in ``folder`` (not recursive).

    Safe in a folder that other processes write to at the same time (predict shards): a
    temporary name of a live process, or of another host, is left alone.
    """
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        for entry in it:
            if not is_stale_temp(entry.name):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def remove_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (not recursive).

    Only for folders one process owns (a run folder being resumed): a temporary file of
    another process still writing there would be removed too.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, force: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, force: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def next_run_dir(
    project: str | os.PathLike[str], name: str = "exp", *, exist_ok: bool = False
) -> Path:
    """``project/name``, or ``name2``, ``name3``... so a new run never overwrites an old one.

    With ``exist_ok`` the folder ``project/name`` is reused as is.
    """
    project = Path(project)
    base = project / name
    if exist_ok or not base.exists():
        base.mkdir(parents=True, exist_ok=True)
        return base
    pat = re.compile(rf"^{re.escape(name)}(\d+)$")
    nums = [int(m.group(1)) for p in project.iterdir() if (m := pat.match(p.name))]
    n = max([1, *nums]) + 1
    while True:
        cand = project / f"{name}{n}"
        try:
            cand.mkdir(parents=True)
            return cand
        except FileExistsError:
            n += 1


def fmt_bytes(n: int | float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes in messages (binary units, one decimal)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse up front (exit 1) when ``folder``'s file system has less than ``needed`` bytes."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise BrainsegRuntimeError(
            f"not enough disk space in {folder} for {what}: needs {fmt_bytes(needed)}, "
            f"{fmt_bytes(free)} free",
            hint="free some space or choose another --dest",
        )


def dir_mode() -> int:
    """The mode a plain ``mkdir`` gives a new folder under the current umask (0o755 for 022);
    for folders made by ``tempfile.mkdtemp`` (always 0700) that become outputs."""
    return 0o777 & ~_umask()
