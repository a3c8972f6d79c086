"""Atomic file writes and run folders: nothing half-written ever carries a final name."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from brainseg.errors import BrainsegError, BrainsegRuntimeError

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def one_line(text: str) -> str:
    """``text`` as one printable line of valid UTF-8 (``\\xe9``, ``\\n`` as repr writes them),
    so a non-UTF-8 file name or a newline never breaks a summary row or a message."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROL)


def write_error(
    path: str | os.PathLike[str],
    exc: OSError,
    *,
    doing: str | None = None,
    kept: str | None = "the previous file (if any) is intact",
    hint: str | None = "check the folder exists and is writable",
    full_hint: str = "free some space and run the command again",
) -> BrainsegRuntimeError:
    """The one-line error for a failed write of ``path`` (ENOSPC: "disk full while ...")."""
    if exc.errno == errno.ENOSPC:
        what = doing or f"writing {path}"
        return BrainsegRuntimeError(
            f"disk full while {what}" + (f"; {kept}" if kept else ""), hint=full_hint
        )
    return BrainsegRuntimeError(f"cannot write {path}: {exc.strerror or exc}", hint=hint)


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values: NaN / inf as None, numpy / torch scalars as Python
    numbers, arrays as lists, paths as strings, sets as sorted lists (dict keys as strings)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return [json_safe(v) for v in sorted(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if not isinstance(obj, str | int | float | bool) and obj is not None:
        item, tolist = getattr(obj, "item", None), getattr(obj, "tolist", None)
        if callable(item):  # numpy / torch scalars (and one-element arrays)
            with contextlib.suppress(TypeError, ValueError):
                obj = item()
        if callable(tolist) and not isinstance(obj, str | int | float | bool):
            return json_safe(tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def check_target(path: str | os.PathLike[str], *, force: bool = True) -> None:
    """Refuse (exit 2) an existing ``path`` without ``force``, and always anything that is not
    a regular file: renaming a temporary file onto a device or a link would replace it."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise write_error(path, exc) from exc
    if stat.S_ISREG(st.st_mode):
        if not force:
            raise BrainsegError(
                f"{one_line(str(path))} already exists", hint="pass --force to overwrite it"
            )
        return
    kind = file_kind(st.st_mode)
    raise BrainsegError(
        f"{one_line(str(path))} is a {kind}, not a regular file: brainseg writes only regular files"
        + (" (not even with --force)" if force else ""),
        hint="choose a new file name"
        + (" (or - for stdout where the command offers it)" if kind != "folder" else ""),
    )


_KINDS = {
    stat.S_IFREG: "regular file",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "folder",
}


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: "regular file", "FIFO (named pipe)", "folder"..."""
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def make_temp_file(path: str | os.PathLike[str]) -> Path:
    """Create an empty hidden temporary file beside ``path`` (umask applied, unlike mkstemp)."""
    path = Path(path)

    def create(tmp: Path) -> None:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o666))

    return _unique_temp(path.parent, path.name, ".tmp", create)


def make_temp_dir(folder: str | os.PathLike[str], name: str) -> Path:
    """A hidden temporary folder remove_stale_temps cleans up (umask applied, unlike mkdtemp)."""
    return _unique_temp(Path(folder), name, "", lambda tmp: tmp.mkdir(0o777))


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _unique_temp(folder: Path, name: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """``create`` the first free ``temp_prefix(name)`` + 8 random characters + ``suffix``."""
    for _ in range(100):
        random8 = "".join(secrets.choice(_ALPHABET) for _ in range(8))
        tmp = folder / f"{temp_prefix(name)}{random8}{suffix}"
        with contextlib.suppress(FileExistsError):
            create(tmp)
            return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``path`` on success.
    On any failure it is removed and ``path`` is left as it was (:func:`check_target` first)."""
    path = Path(path)
    check_target(path, force=force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_file(path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield tmp
        with contextlib.suppress(OSError), open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_target(path, force=True)  # a node made there while we wrote: still not replaced
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
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
    """``.NAME.~HOST@PID.``: a later run can tell the litter of a killed writer (its process is
    gone) from a file another live process is still writing."""
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
    if not name.startswith(".") or m is None or m["host"] != _host():
        return False
    return not pid_alive(int(m["pid"]))


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], name: str, what: str) -> Iterator[Path]:
    """Hold ``folder/.NAME.lock`` while a run writes into ``folder``; a second run is refused
    (exit 2) with the owner's host and pid. The lock (JSON) is made in one step (a hard link)
    so it is never seen half-written; a dead process's lock on this host is taken over."""
    lock = Path(folder) / f".{name}.lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "what": what}
    for _ in range(5):
        if _try_lock(lock, json.dumps(me)):
            break
        owner = _lock_owner(lock)
        if owner is None:
            continue  # released between our try and the read: try again
        host, pid = owner.get("host"), owner.get("pid")
        if host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # a killed run's lock
            continue
        since = owner.get("started")
        when = ""
        if isinstance(since, int | float):
            when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
        raise BrainsegError(
            f"{one_line(str(folder))} is in use by another run "
            f"({owner.get('what') or 'brainseg'}, pid {pid} on host {host}{when}): two runs "
            "writing into one folder would overwrite each other's files and summary",
            hint=f"wait for that run to end, or use another output folder; if no such run is "
            f"alive any more, delete {one_line(str(lock))}",
        )
    else:  # pragma: no cover - five lost races in a row
        raise BrainsegError(f"cannot take the lock {lock}", hint="run the command again")
    try:
        yield lock
    finally:
        owner = _lock_owner(lock)
        if owner is not None and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            with contextlib.suppress(OSError):
                os.unlink(lock)


def _try_lock(lock: Path, text: str) -> bool:
    """Create ``lock`` holding ``text`` unless it exists (atomic); False when it exists."""
    try:
        tmp = make_temp_file(lock)
    except OSError as exc:
        raise write_error(lock, exc) from exc
    try:
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then write
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
            return True
    except OSError as exc:
        raise write_error(lock, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> dict[str, object] | None:
    """The owner recorded in ``lock``; None when it is gone; {} when it cannot be read."""
    try:
        data = json.loads(lock.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed writers on this host left in ``folder``; safe while others write there."""
    return _remove_entries(folder, lambda entry: is_stale_temp(entry.name))


def remove_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (not recursive): only
    for folders one process owns (a run being resumed), as any writer's files go."""
    return _remove_entries(
        folder,
        lambda entry: bool(_TEMP_NAME.match(entry.name)) and entry.is_file(follow_symlinks=False),
    )


def _remove_entries(
    folder: str | os.PathLike[str], wanted: Callable[[os.DirEntry[str]], bool]
) -> list[Path]:
    """Remove the entries of ``folder`` that ``wanted`` picks (a folder with its contents)."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        for entry in filter(wanted, it):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, force: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, force: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def check_run_name(name: str, option: str = "--name") -> str:
    """Refuse (exit 2) a run-folder name that is not one plain folder name (so a run folder is
    always inside ``--project``): the one rule of every run folder, checked before any work."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise BrainsegError(
            f"run name must be a plain folder name, got {name!r}",
            hint=f"e.g. {option} exp (the run folder is made inside --project)",
        )
    return name


def next_run_dir(
    project: str | os.PathLike[str], name: str = "exp", *, exist_ok: bool = False
) -> Path:
    """``project/name`` (reused with ``exist_ok``), else ``name2``, ``name3``...: never old."""
    check_run_name(name)
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


@contextlib.contextmanager
def fresh_run_dir(
    project: str | os.PathLike[str], name: str = "exp", *, exist_ok: bool = False
) -> Iterator[Path]:
    """:func:`next_run_dir` whose new folder is removed when the run fails (not a reused one)."""
    existed = exist_ok and (Path(project) / name).exists()
    run_dir = next_run_dir(project, name, exist_ok=exist_ok)
    try:
        yield run_dir
    except BaseException:
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def clear_folder(path: Path) -> Path:
    """``path``, emptied: a run folder reused with ``--exist-ok`` must not score old masks."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    return path


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
