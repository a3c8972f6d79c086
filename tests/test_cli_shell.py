"""The command shell: fast start, version, errors as one line with documented exit codes."""

from __future__ import annotations

import subprocess
import sys

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
