"""Test-suite plumbing for the reliability tests: hypothesis profiles, the ``stress`` opt-in,
and a count of the generated cases each property test tried (printed at the end of the run).

Imported by tests/conftest.py, so the hooks below are active for the whole suite.

- ``HYPOTHESIS_PROFILE=thorough`` runs 10x more examples per property test (default
  profile ``brainseg``: few, derandomized examples so CI is quick and repeatable).
- Tests marked ``stress`` (20,000-file load, many kill points) are skipped unless
  ``BRAINSEG_STRESS=1`` or they are selected with ``-m stress``.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

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
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "brainseg"))

#: Generated cases tried per test (name -> count), filled by :func:`count_case`.
CASES: collections.Counter[str] = collections.Counter()
#: Outcomes per test (name -> {"ok": n, "error": n}).
OUTCOMES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def scale(n: int) -> int:
    """``n`` examples in the default profile, 10x that under the ``thorough`` profile."""
    return n * 10 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else n


def count_case(test: str, outcome: str = "ok") -> None:
    """Record one generated case of ``test`` and how it ended ("ok" or "error")."""
    CASES[test] += 1
    OUTCOMES[test][outcome] += 1


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
        tr.write_line(f"{CASES[name]:6d}  {name}  (ok {o['ok']}, clear error {o['error']})")
    out = os.environ.get("BRAINSEG_CASE_COUNTS")
    if out:
        data = {k: {"cases": CASES[k], **OUTCOMES[k]} for k in sorted(CASES)}
        Path(out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
