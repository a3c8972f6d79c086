"""Test-suite plumbing for the reliability tests: hypothesis profiles, the ``stress`` opt-in,
and a count of the generated cases each property test tried (printed at the end of the run).

Imported by tests/conftest.py, so the hooks below are active for the whole suite.

- ``HYPOTHESIS_PROFILE=thorough`` runs 10x more examples per property test (default
  profile ``brainseg``: few, derandomized examples so CI is quick and repeatable);
  ``HYPOTHESIS_PROFILE=huge`` runs 15x (over 10,000 generated cases in test_properties.py).
- Tests marked ``stress`` (the 20,000-file load) are skipped unless ``BRAINSEG_STRESS=1``
  or they are selected with ``-m stress``.
- :func:`hang_guard` fails a generated case that hangs, without touching pytest-timeout's
  own timer; :func:`assert_clear_error` is the oracle for "one clear error".
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
# CI: a fixed, small set of examples (derandomized: the same cases on every run, no flakes).
settings.register_profile(
    "brainseg", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_CHECKS
)
# Local bug hunting: random examples, many of them.
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=_CHECKS
)
# One long bug hunt: 15x the default examples, random (docs/reliability.md has its counts).
settings.register_profile("huge", max_examples=600, deadline=None, suppress_health_check=_CHECKS)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "brainseg")
settings.load_profile(PROFILE)
_SCALE = {"thorough": 10, "huge": 15}

#: Generated cases tried per test (name -> count), filled by :func:`count_case`.
CASES: collections.Counter[str] = collections.Counter()
#: Outcomes per test (name -> {"ok": n, "error": n}).
OUTCOMES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def scale(n: int) -> int:
    """``n`` examples in the default profile, 10x under ``thorough``, 15x under ``huge``."""
    return n * _SCALE.get(PROFILE, 1)


def count_case(test: str, outcome: str = "ok") -> None:
    """Record one generated case of ``test`` and how it ended ("ok", "error", "open gap: ...")."""
    CASES[test] += 1
    OUTCOMES[test][outcome] += 1


class Hang(BaseException):
    """Raised by :func:`hang_guard`: a BaseException so no ``except Exception`` swallows it."""


@contextlib.contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in this (main) thread when the body runs longer than ``seconds``.

    A watchdog thread sends SIGUSR1 to the main thread; nothing here touches SIGALRM or the
    real-time interval timer, so pytest-timeout's per-test timer (``timeout_method =
    "signal"``) keeps running underneath as the backstop for hangs in C code.
    """
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        raise RuntimeError("hang_guard works in the main thread only")
    fired = threading.Event()
    done = threading.Event()

    def _raise(signum: int, frame: Any) -> None:
        if fired.is_set() and not done.is_set():
            raise Hang(f"no answer within {seconds} s")

    def _watch() -> None:
        if not done.wait(seconds):
            fired.set()
            signal.pthread_kill(main, signal.SIGUSR1)

    main = threading.main_thread().ident
    assert main is not None
    old = signal.signal(signal.SIGUSR1, _raise)
    watchdog = threading.Thread(target=_watch, name="hang_guard", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        watchdog.join()
        signal.signal(signal.SIGUSR1, old)


#: The one multi-line error form: a dataset's problem list (brainseg.data.lgg.format_problems).
_LIST_HEAD = re.compile(r"^(?P<n>\d+) problems? in dataset (?P<root>.+):$")
_LIST_MORE = re.compile(r"^  \.\.\. and (?P<more>\d+) more$")
_LIST_END = "no usable slices are left"


def assert_clear_error(
    exc: BaseException, names: Sequence[str | os.PathLike[str]], exit_code: int = 2
) -> None:
    """The house format of an error (docs/reliability.md, "What a clear error is").

    ``error: MESSAGE`` whose first line names one of ``names`` (the input's path), an
    optional one-line ``hint: ...``, exit code ``exit_code`` (2: bad input), no traceback.
    A message has one line, except a dataset's problem list: ``N problems in dataset ROOT:``
    then one indented ``FILE: what is wrong`` line per problem (20 at most, then
    ``... and K more``), optionally ending with ``no usable slices are left``.
    """
    from brainseg.errors import BrainsegError

    assert isinstance(exc, BrainsegError), f"{type(exc).__name__}: {exc}"
    lines = exc.message.split("\n")
    assert lines[0].strip(), f"empty first line: {exc.message!r}"
    wanted = [str(n) for n in names]
    assert any(n in lines[0] for n in wanted), f"first line names none of {wanted}: {lines[0]!r}"
    assert exc.exit_code == exit_code, f"exit code {exc.exit_code}, expected {exit_code}: {exc}"
    assert "Traceback" not in str(exc), str(exc)
    if exc.hint is not None:
        assert exc.hint.strip() and "\n" not in exc.hint, f"hint not one line: {exc.hint!r}"
    if len(lines) > 1:
        head = _LIST_HEAD.match(lines[0])
        assert head, f"a multi-line message that is not a problem list: {exc.message!r}"
        body = lines[1:-1] if lines[-1] == _LIST_END else lines[1:]
        n = int(head["n"])
        more = _LIST_MORE.match(body[-1]) if body else None
        listed = body[:-1] if more else body
        assert len(listed) == min(n, 20), f"{n} problems but {len(listed)} listed: {exc.message}"
        assert (int(more["more"]) if more else 0) == n - len(listed), exc.message
        for line in listed:
            assert line.startswith("  ") and ": " in line and line.strip(), repr(line)


def stress_enabled(config: pytest.Config) -> bool:
    """True when stress tests were asked for (BRAINSEG_STRESS=1 or ``-m`` naming stress)."""
    return os.environ.get("BRAINSEG_STRESS") == "1" or "stress" in (config.option.markexpr or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``stress`` tests unless asked for: they take minutes."""
    if stress_enabled(config):
        return
    skip = pytest.mark.skip(reason="stress test: set BRAINSEG_STRESS=1 or pass -m stress")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how many generated cases each property/fault test tried (and save them)."""
    if not CASES:
        return
    tr = terminalreporter
    tr.section("generated cases per test (brainseg reliability)")
    for name in sorted(CASES):
        o = OUTCOMES[name]
        gaps = "".join(f", {k} {v}" for k, v in sorted(o.items()) if k not in ("ok", "error"))
        tr.write_line(f"{CASES[name]:6d}  {name}  (ok {o['ok']}, clear error {o['error']}{gaps})")
    out = os.environ.get("BRAINSEG_CASE_COUNTS")
    if out:
        data = {k: {"cases": CASES[k], **OUTCOMES[k]} for k in sorted(CASES)}
        Path(out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
