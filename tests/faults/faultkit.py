"""Fault injection for the tests in this folder: SIGKILL at exact points, disk full (ENOSPC).

Used two ways:

* in-process: ``install({...})`` patches this process (tests undo it with monkeypatch);
* as a wrapper around the real CLI: ``python faultkit.py ARGS...`` with the faults as JSON in
  ``$BRAINSEG_FAULTS`` installs them, then runs ``brainseg ARGS...`` (``brainseg.cli.app.main``).

Faults (all keys optional)::

    {"kill": [{"when": "before_rename" | "after_rename", "name": "last.safetensors", "nth": 2},
              {"when": "call", "target": "brainseg.train.epoch.lr_at", "nth": 3}],
     "enospc": {"name": "*.safetensors*", "budget": 0, "skip": 0},
     "pause": {"name": "last.safetensors", "nth": 2, "marker": "/tmp/x.paused"},
     "signal": [{"target": "brainseg.train.epoch.lr_at", "nth": 3, "signals": ["SIGTERM"]}]}

* ``before_rename``: the n-th atomic rename of a temporary file onto a final name matching
  ``name`` (fnmatch) is replaced by: cut the temporary file to half its size, SIGKILL.
  That is the state a kill in the middle of writing leaves on disk (a partial temporary file,
  the final name untouched), made deterministic.
* ``after_rename``: SIGKILL right after that rename (the file is complete, the next step of
  the program never runs).
* ``call``: SIGKILL at the start of the n-th call of a function (``module.attr``), e.g.
  ``brainseg.train.epoch.lr_at`` runs once per training step: a kill in the middle of training.
* ``enospc``: files opened for writing whose name matches ``name`` fail with
  ``OSError(ENOSPC)`` once ``budget`` bytes have been written to them in total (after the
  first ``skip`` such files were let through). That is how a full disk looks to Python code.
* ``pause``: at the n-th atomic rename onto ``name`` (the temporary file complete, the final
  name untouched), write ``marker`` and sleep until killed: a test kills the process from the
  outside at that exact point (no polling luck), as a user or the OOM killer would.
* ``signal``: at the start of the n-th call of ``target``, send ``signals`` to this process
  (e.g. SIGTERM, or SIGINT twice): Ctrl-C / a scheduler's SIGTERM at an exact training step.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fnmatch
import importlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_real_open = builtins.open
_real_replace = os.replace
_real_rename = os.rename


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- kills


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def hit(self, nth: int) -> bool:
        self.n += 1
        return self.n == nth


def _final_name(src: str, dst: str) -> str:
    return os.path.basename(os.fspath(dst))


def _rename_hook(points: list[dict[str, Any]], real: Any) -> Any:
    counters = [_Counter() for _ in points]

    def hooked(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        name = _final_name(os.fspath(src), os.fspath(dst))
        for point, counter in zip(points, counters, strict=True):
            if not fnmatch.fnmatchcase(name, point["name"]):
                continue
            if point["when"] == "before_rename" and counter.hit(point.get("nth", 1)):
                if os.path.isfile(src):
                    size = os.path.getsize(src)
                    with _real_open(src, "r+b") as f:
                        f.truncate(size // 2)
                _die()
            if point["when"] == "after_rename" and counter.hit(point.get("nth", 1)):
                real(src, dst, *args, **kwargs)
                _die()
        return real(src, dst, *args, **kwargs)

    return hooked


def _call_hook(point: dict[str, Any]) -> None:
    module_name, attr = point["target"].rsplit(".", 1)
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    counter = _Counter()

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if counter.hit(point.get("nth", 1)):
            _die()
        return fn(*args, **kwargs)

    _set(module, attr, hooked)


def _signal_hook(point: dict[str, Any]) -> None:
    module_name, attr = point["target"].rsplit(".", 1)
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    counter = _Counter()

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if counter.hit(point.get("nth", 1)):
            for name in point["signals"]:
                signal.raise_signal(getattr(signal, name))  # its Python handler runs here
        return fn(*args, **kwargs)

    _set(module, attr, hooked)


def _pause_hook(point: dict[str, Any], real: Any) -> Any:
    counter = _Counter()

    def hooked(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        name = _final_name(os.fspath(src), os.fspath(dst))
        if fnmatch.fnmatchcase(name, point["name"]) and counter.hit(point.get("nth", 1)):
            Path(point["marker"]).write_text(os.fspath(src))
            while True:  # until the test's SIGKILL
                time.sleep(1)
        return real(src, dst, *args, **kwargs)

    return hooked


# --------------------------------------------------------------------------- disk full


class _FullDisk:
    """Shared byte budget of the files that match; then every write raises ENOSPC."""

    def __init__(self, name: str, budget: int, skip: int) -> None:
        self.name, self.left, self.skip = name, budget, skip

    def matches(self, file: Any) -> bool:
        if isinstance(file, int):
            try:
                file = os.readlink(f"/proc/self/fd/{file}")
            except OSError:
                return False
        if not isinstance(file, (str, bytes, os.PathLike)):
            return False
        return fnmatch.fnmatchcase(os.path.basename(os.fsdecode(file)), self.name)

    def write(self, f: Any, data: Any) -> int:
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if n <= self.left:
            self.left -= n
            return f.write(data)
        if self.left > 0 and not isinstance(data, str):
            f.write(memoryview(data).cast("B")[: self.left])
        self.left = 0
        raise OSError(errno.ENOSPC, "No space left on device")


class _FullFile:
    """A file object whose writes draw on a :class:`_FullDisk` budget."""

    def __init__(self, f: Any, disk: _FullDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data: Any) -> int:
        return self._disk.write(self._f, data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __iter__(self) -> Any:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _open_hook(disk: _FullDisk) -> Any:
    def hooked(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = _real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and disk.matches(file):
            if disk.skip > 0:
                disk.skip -= 1
                return f
            return _FullFile(f, disk)
        return f

    return hooked


# --------------------------------------------------------------------------- install / run


_UNDO: list[tuple[Any, str, Any]] = []


def _set(obj: Any, attr: str, value: Any) -> None:
    _UNDO.append((obj, attr, getattr(obj, attr)))
    setattr(obj, attr, value)


def install(spec: dict[str, Any]) -> None:
    """Install the faults of ``spec`` in this process (see the module docstring)."""
    renames = [p for p in spec.get("kill", []) if p["when"] in ("before_rename", "after_rename")]
    if renames:
        _set(os, "replace", _rename_hook(renames, _real_replace))
        _set(os, "rename", _rename_hook(renames, _real_rename))
    for point in spec.get("kill", []):
        if point["when"] == "call":
            _call_hook(point)
    for point in spec.get("signal", []):
        _signal_hook(point)
    if "pause" in spec:
        _set(os, "replace", _pause_hook(spec["pause"], os.replace))
        _set(os, "rename", _pause_hook(spec["pause"], os.rename))
    full = spec.get("enospc")
    if full:
        hook = _open_hook(_FullDisk(full["name"], int(full.get("budget", 0)), full.get("skip", 0)))
        _set(builtins, "open", hook)
        _set(io, "open", hook)


def uninstall() -> None:
    """Undo :func:`install` (in-process tests)."""
    while _UNDO:
        obj, attr, old = _UNDO.pop()
        setattr(obj, attr, old)


@contextlib.contextmanager
def installed(spec: dict[str, Any]) -> Iterator[None]:
    """``install(spec)`` for the body of a with-statement."""
    install(spec)
    try:
        yield
    finally:
        uninstall()


def main() -> None:
    """``python faultkit.py ARGS``: install $BRAINSEG_FAULTS, then run ``brainseg ARGS``."""
    install(json.loads(os.environ.get("BRAINSEG_FAULTS", "{}")))
    from brainseg.cli.app import main as cli_main

    cli_main(sys.argv[1:])


SCRIPT = Path(__file__).resolve()

if __name__ == "__main__":
    main()
