"""The command shell: fast start, version, errors as one line with documented exit codes."""

from __future__ import annotations

import json
import shutil
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
        "from brainseg.cli.app import main\n"
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

    from brainseg.cli.app import app

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
    import brainseg.inference.batch
    from brainseg.cli.app import main

    def interrupted(opts: Any) -> Any:
        raise KeyboardInterrupt  # what a second Ctrl-C raises in the middle of the work

    monkeypatch.setattr(brainseg.inference.batch, "predict_inputs", interrupted)
    scan = tmp_path / "scan.png"
    scan.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "m.onnx"), str(scan), "-o", str(tmp_path / "out")])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["error: interrupted"]


# --------------------------------------------------------------------------- 80 columns


def _render(renderables: list[Any], width: int = 80) -> str:
    import io

    from rich.console import Console

    buf = io.StringIO()
    c = Console(file=buf, width=width, highlight=False, color_system=None)
    for r in renderables:
        c.print(r)
    return buf.getvalue()


def _folded_column(text: str, column: int) -> str:
    """The text of one table column, its folded lines joined (box characters dropped)."""
    cells = [ln.split("│")[column + 1].strip() for ln in text.splitlines() if ln.count("│") > 2]
    return "".join(cells)


def _cv_summary(tmp_path: Path) -> dict[str, Any]:
    def block(mean: float, lo: float, hi: float, thr: float, largest: bool) -> dict[str, Any]:
        return {
            "settings": {"threshold": thr, "min_size": 0, "largest": largest},
            "per_patient_dice": {"mean": mean, "ci95": [lo, hi], "median": mean + 0.01,
                                 "std": 0.2213, "min": 0.0},
            "metrics": {"per_slice_tumor": {"dice": {"mean": 0.6921}},
                        "global": {"dice": 0.7312}},
        }  # fmt: skip

    after = block(0.5470, 0.4821, 0.6012, 0.45, True)
    after["per_fold"] = {"0": {"n": 5, "mean": 0.51, "ci95": [0.3011, 0.7012], "median": 0.5}}
    after["per_institution"] = {
        "HT": {"n": 9, "mean": 0.52, "ci95": [0.4011, 0.6412], "median": 0.53}
    }
    return {
        "selection": {"label": "last epoch of each fold", "select": "last"},
        "patients": 25,
        "folds": 5,
        "before": block(0.5123, 0.4512, 0.5734, 0.5, False),
        "after": after,
        "buda": block(0.5301, 0.4701, 0.5911, 0.5, True),
        "files": ["cv_summary.json", "oof_per_patient.csv"],
    }


def test_cv_tables_are_whole_at_80_columns(tmp_path: Path) -> None:
    from brainseg.cli.cv import tables

    cv_dir = tmp_path / "runs" / "cv" / "a-rather-long-experiment-name-for-the-cv-folder" / "exp12"
    text = _render(tables(_cv_summary(tmp_path), cv_dir))
    assert max(len(ln) for ln in text.splitlines()) <= 80, text
    assert "…" not in text, text
    for whole in ("0.4821-0.6012", "0.4512-0.5734", "0.4701-0.5911", "0.5470", "0.7312",
                  "per-patient mean", "95% CI", "before", "after", "buda",
                  "threshold 0.45, min size 0, largest on"):  # fmt: skip
        assert whole in text, whole
    files = text.split("file ")[-1]
    assert str(cv_dir / "oof_per_patient.csv") in _folded_column(files, 1)


def test_cv_help_does_not_say_quiet_hides_tables() -> None:
    r = run_cli(["cv", "--help"])
    assert r.returncode == 0
    assert "tables" not in r.stdout.split("--quiet")[1].split("--")[0].replace(
        "tables, warnings and errors are still shown", ""
    ), r.stdout


def test_top_level_help_names_every_command() -> None:
    import typer.main

    from brainseg.cli.app import app

    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert len(names) == 11
    r = run_cli(["--help"])
    intro = r.stdout.split("Options")[0]  # the description, before the option / command panels
    missing = [n for n in names if n not in intro]
    assert not missing, intro


def test_error_rows_show_a_dash_not_none() -> None:
    from brainseg import console

    text = _render([console.table("t", ["case", "status", "voxels"], [["a", "error", None]])])
    assert "None" not in text and "-" in text.split("error")[1]


def test_cache_list_shows_the_whole_built_from_path_at_80_columns(
    tmp_path: Path, phantom_root: Path
) -> None:
    deep = tmp_path / "a-long-folder-name-for-datasets" / "another-level-of-folders" / "lgg"
    shutil.copytree(phantom_root, deep / "kaggle_3m")
    env = {"BRAINSEG_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "80"}
    r = run_cli(["split", deep / "kaggle_3m", "-o", tmp_path / "s.yaml"], env=env)  # builds it
    assert r.returncode == 0, r.stderr
    r = run_cli(["cache", "list"], env=env)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln[:1] in "┏┃┡│└"]  # the table (not its title)
    assert rows and max(len(ln) for ln in rows) <= 80, r.stdout
    assert "built from" in r.stdout and "…" not in r.stdout
    assert str((deep / "kaggle_3m").resolve()) in _folded_column(r.stdout, 1), r.stdout
    shutil.rmtree(deep)  # moved away: the path is still shown, and said to be gone
    r = run_cli(["cache", "list"], env=env)
    assert "(nolongerthere)" in _folded_column(r.stdout, 1).replace(" ", ""), r.stdout


def test_predict_and_eval_declare_every_inference_setting_once() -> None:
    """issue 23: the settings predict and eval share (``settings.InferenceSettings``, the base
    of their options objects) are options of both commands with the same flags, default and
    help, and the default is the field's: one declaration, no drift between the commands."""
    import dataclasses

    import typer.main

    from brainseg.cli.app import app
    from brainseg.settings import InferenceSettings

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]

    def declared(name: str) -> dict[str, Any]:
        return {
            p.name: (tuple(p.opts), tuple(p.secondary_opts), p.default, p.help)
            for p in commands[name].params
        }

    predict, evaluate = declared("predict"), declared("eval")
    for f in dataclasses.fields(InferenceSettings):
        assert f.name in predict and f.name in evaluate, f.name
        assert predict[f.name] == evaluate[f.name], (f.name, predict[f.name], evaluate[f.name])
        assert predict[f.name][2] == f.default, f.name
