"""The command shell: fast start, version, errors as one line with documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from brainseg import __version__


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from brainseg.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'torchvision', 'onnxruntime', 'onnx', 'scipy')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_version_prints_package_version() -> None:
    r = run_cli(["--version"])
    assert r.returncode == 0
    assert r.stdout.strip() == f"brainseg {__version__}"


def test_help_lists_every_subcommand() -> None:
    r = run_cli(["--help"])
    assert r.returncode == 0
    for name in ("download", "split", "train", "eval", "predict", "export", "demo"):
        assert name in r.stdout


def test_unknown_option_is_a_usage_error() -> None:
    r = run_cli(["split", "--no-such-option"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def _house_style(stderr: str) -> None:
    """One ``error:`` line, then one ``hint:`` line; no click usage block, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    assert "Usage:" not in stderr and "Traceback" not in stderr


def test_typer_usage_errors_are_in_the_house_style(tmp_path: Path) -> None:
    r = run_cli(["split", "--no-such-option"])
    assert r.returncode == 2
    _house_style(r.stderr)
    assert "no such option: --no-such-option" in r.stderr
    assert "`brainseg split --help`" in r.stderr

    r = run_cli(["split", tmp_path])  # --output is required
    assert r.returncode == 2
    _house_style(r.stderr)
    assert "missing option '--output'" in r.stderr

    r = run_cli(["split", "-o", tmp_path / "s.yaml"])  # DATA missing
    assert r.returncode == 2
    _house_style(r.stderr)
    assert "missing argument" in r.stderr.lower()


def test_flags_show_no_value_placeholder_in_help() -> None:
    r = run_cli(["download", "lgg", "--help"])
    assert r.returncode == 0
    assert "--force" in r.stdout and "<bool>" not in r.stdout
    r = run_cli(["split", "--help"])
    assert "--skip-bad" in r.stdout and "<bool>" not in r.stdout
    r = run_cli(["download", "lgg", "--force", "true"])  # and a flag takes no value
    assert r.returncode == 2
    _house_style(r.stderr)


def test_every_subcommand_takes_quiet_after_its_name() -> None:
    import typer.main

    from brainseg.cli import app

    def leaves(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
        out = []
        for name, sub in getattr(cmd, "commands", {}).items():
            out += (
                leaves(sub, (*path, name))
                if getattr(sub, "commands", None)
                else [((*path, name), sub)]
            )
        return out

    found = leaves(typer.main.get_command(app))
    assert len(found) >= 10
    for path, cmd in found:
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"-q", "--quiet"} <= opts, path


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_hides_status_never_the_result(tmp_path: Path, where: str) -> None:
    """`brainseg -q CMD` and `brainseg CMD -q`: no status lines, but the table is printed
    (and --json output too)."""
    args: list[Any] = ["download", "synthetic", "--dest", tmp_path / "d", "-n", "2", "--size", "64"]

    def quiet(*more: str) -> list[Any]:
        return ["-q", *args, *more] if where == "before" else [*args, *more, "-q"]

    r = run_cli(quiet())
    assert r.returncode == 0, r.stderr
    assert "patients" in r.stdout and "slices with tumor" in r.stdout  # the result table
    assert r.stderr.strip() == ""  # no "wrote ..." / "indexing ..." status lines
    r = run_cli(quiet("--json", "--force"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["patients"] == 2


def test_ctrl_c_inside_a_command_prints_one_interrupted_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Typer turns a KeyboardInterrupt in a command into a silent exit 130; brainseg says so."""
    import brainseg.batch
    from brainseg.cli import main

    def interrupted(opts: Any) -> Any:
        raise KeyboardInterrupt  # what a second Ctrl-C raises in the middle of the work

    monkeypatch.setattr(brainseg.batch, "predict_inputs", interrupted)
    scan = tmp_path / "scan.png"
    scan.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "m.onnx"), str(scan), "-o", str(tmp_path / "out")])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["error: interrupted"]
