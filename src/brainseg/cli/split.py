"""`brainseg split`: a patient-level train / val (/ test) split or K folds, written as YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from brainseg import console as con
from brainseg.cli.options import options_from


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command(
        "split",
        help="Split a dataset by patient into train / val (/ test) or K folds, stratified by "
        "tumour burden, and write the split as YAML.",
        no_args_is_help=True,
    )
    def _cmd(
        ctx: typer.Context,
        data: Path = typer.Argument(
            ...,
            help="Dataset folder in the kaggle_3m layout (one sub-folder per patient).",
            show_default=False,
        ),
        output: Path = typer.Option(
            ...,
            "--output",
            "-o",
            help="YAML file to write the split to, e.g. splits.yaml; - writes it to stdout.",
            show_default=False,
        ),
        val_fraction: float | None = typer.Option(
            None,
            "--val-fraction",
            show_default=False,
            help="Fraction of all patients for validation (default 0.2). Not with --folds.",
        ),
        test_fraction: float = typer.Option(
            0.0,
            "--test-fraction",
            help="Fraction of all patients held out as a test set (also out of every fold).",
        ),
        folds: int | None = typer.Option(
            None,
            "--folds",
            show_default=False,
            help="K-fold cross-validation: every non-test patient is in one fold's val.",
        ),
        seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same split."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
        skip_bad: bool = typer.Option(
            False,
            "--skip-bad",
            help="Skip unreadable or malformed slices (with a warning) instead of failing.",
        ),
        json_out: bool = typer.Option(
            False,
            "--json",
            help="Print the split summary as JSON on stdout (messages on stderr).",
        ),
    ) -> None:
        from brainseg.data.split import SplitOptions, make_split_file, to_yaml
        from brainseg.errors import BrainsegError

        to_stdout = str(output) == "-"
        if to_stdout and json_out:
            raise BrainsegError(
                "-o - and --json both write to stdout", hint="use one of them (or -o FILE --json)"
            )
        if json_out or to_stdout:
            con.configure(json_mode=True)  # tables and messages on stderr
        result = make_split_file(options_from(SplitOptions, ctx.params))
        con.result(split_table(result.summary()))
        if to_stdout:
            con.emit_text(to_yaml(result.split))
        else:
            con.info(f"wrote {output}")
        if json_out:
            con.emit_json(result.summary())


def split_table(summary: dict[str, Any]) -> Any:
    """The rich table of a split summary (:meth:`SplitResult.summary`)."""
    kind = f"{summary['folds']} folds" if summary["folds"] else "split"
    title = (
        f"{kind} of {summary['dataset']} (seed {summary['seed']}, dataset "
        f"{summary['dataset_hash']})"
    )
    rows = [
        [r["name"], r["patients"], r["slices"], r["tumor_slices"],
         f"{100 * r['tumor_slice_fraction']:.1f}"]
        for r in summary["rows"]
    ]  # fmt: skip
    columns = ["subset", "patients", "slices", "tumor slices", "tumor slice %"]
    return con.table(title, columns, rows)
