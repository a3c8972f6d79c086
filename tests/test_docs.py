"""The documentation a user reads matches the command they run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from brainseg.cli.app import app

REPO = Path(__file__).resolve().parents[1]


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, sub in getattr(cmd, "commands", {}).items():
        if getattr(sub, "commands", None):
            yield from _commands(sub, (*path, name))
        else:
            yield (*path, name), sub


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_subcommand_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for path, _ in COMMANDS:
        assert f"brainseg {' '.join(path)}" in readme, path


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else ""
)
def test_every_option_is_in_the_command_reference(path: tuple[str, ...], command: Any) -> None:
    usage = (REPO / "docs" / "usage.md").read_text()
    section = usage.split(f"### `brainseg {' '.join(path)}`", 1)
    assert len(section) == 2, f"docs/usage.md has no section for brainseg {' '.join(path)}"
    body = section[1].split("\n### ", 1)[0]
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert f"`{param.opts[0]}`" in body, (path, param.opts[0])


def test_links_in_readme_and_docs_point_to_files_that_exist() -> None:
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_quick_start_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    quick = readme.split("## Quick start", 1)[1]
    assert "pip install . && brainseg demo" in quick
    assert "pip install '.[test]' && python -m pytest" in quick
    assert "pip install --quiet '.[test]'" in ci and "python -m pytest" in ci
