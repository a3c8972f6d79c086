"""`brainseg cv`: parse options, call :func:`brainseg.train.cv.run_cv` / ``write_cv``, render
tables. Its training options are `brainseg train`'s, less the settings cv chooses per fold."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import typer

from brainseg import console as con
from brainseg.cli.options import json_option
from brainseg.cli.train import DATA_ARGUMENT, render, training_options
from brainseg.config import fields_with

HELP = (
    "Patient-level cross-validation: train every fold, predict each patient with the one "
    "fold model that did not see it, report per-patient Dice with a 95% bootstrap CI.\n\n"
    "Writes runs/cv/exp (exp2, ...): cv.yaml, split.yaml, fold_0/ ... fold_K-1/ (normal train "
    "run folders), cv_summary.json, per_patient.csv, oof_masks.npz and ensemble.json (the "
    "fold models with the threshold and post-processing chosen once on the out-of-fold "
    "predictions). Re-running the same command, or --resume runs/cv/expN, continues at the "
    "fold and epoch it stopped at; finished folds are not retrained.\n\n"
    "Example: brainseg cv data/kaggle_3m --folds 5 --config best"
)


_KW = inspect.Parameter.KEYWORD_ONLY


def _signature() -> inspect.Signature:
    """cv's own arguments and options around `brainseg train`'s but the ``per_fold`` ones."""

    def opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, _KW, default=default, annotation=annotation)

    return inspect.Signature(
        [
            inspect.Parameter(
                "data", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DATA_ARGUMENT,
                annotation=Path | None,
            ),
            opt("folds", int | None, typer.Option(
                None, "--folds",
                help="Make K patient-level folds (seeded by --seed) \\[default: 5].",
            )),
            opt("split", Path | None, typer.Option(
                None, "--split", help="Use this split file from `brainseg split --folds K`.",
                show_default=False,
            )),
            opt("config", str | None, typer.Option(
                None, "--config", "-c", help="Train settings: seed, best or a YAML file."
            )),
            *training_options(exclude=fields_with("per_fold")),
            opt("set_", list[str], typer.Option(
                [], "--set", help="Any train setting, KEY=VALUE (repeatable), e.g. lr=3e-4; "
                "YAML-only settings too (aug_rotate=0)."
            )),
            opt("select", str | None, typer.Option(
                None, "--select",
                help="last: each fold's final checkpoint (unbiased) | best: its best epoch, "
                "selected on the validation patients \\[default: last].",
            )),
            opt("protocol", str | None, typer.Option(
                None, "--protocol",
                help="brainseg | buda: also report the dataset author's evaluation (first and "
                "last slice dropped, largest component) \\[default: brainseg].",
            )),
            opt("project", Path, typer.Option(
                Path("runs/cv"), "--project", help="Parent folder of the cv folders."
            )),
            opt("name", str, typer.Option(
                "exp", "--name", help="cv folder name (exp2, exp3... if taken)."
            )),
            opt("resume", Path | None, typer.Option(
                None, "--resume", help="Continue this cv folder (runs/cv/expN).",
                show_default=False,
            )),
            opt("fold", int | None, typer.Option(
                None, "--fold", min=0, show_default=False,
                help="Train only fold K into the cv folder (folds as independent jobs); "
                "brainseg cv --resume DIR then collects once every fold is done.",
            )),
            opt("json_out", bool, json_option("Print the summary as JSON.")),
        ],
        return_annotation=None,
    )  # fmt: skip


def run(set_: list[str], json_out: bool, logger: list[str] | None, **options: Any) -> None:
    """The command body: the options the user gave -> CVOptions -> run_cv -> tables."""
    from brainseg.train.cv import CVOptions, parse_set, run_cv, run_fold, write_cv

    given: dict[str, Any] = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    # cv's own options are CVOptions fields; the others are training settings
    own = [f.name for f in dataclasses.fields(CVOptions) if f.name in given]
    opts = CVOptions(**{k: given.pop(k) for k in own}, show_fold=render)
    if given.get("quiet"):
        con.configure(quiet=True)
    given["loggers"] = list(logger) if logger else None
    opts.overrides = {**parse_set(set_), **{k: v for k, v in given.items() if v is not None}}
    fold = opts.fold
    if fold is not None:
        plan, done = run_fold(opts)
        con.result(f"fold {fold}/{plan.n_folds}: {done.status} -> {done.run_dir}")
        con.info(f"once every fold is done: brainseg cv --resume {plan.cv_dir}")
        if json_out:
            con.emit_json(
                {
                    "cv_dir": str(plan.cv_dir),
                    "fold": fold,
                    "status": done.status,
                    "run_dir": str(done.run_dir),
                    "folds": plan.n_folds,
                }
            )
        return
    result = run_cv(opts)
    write_cv(result)
    for t in tables(result.summary, result.plan.cv_dir):
        con.result(t)
    if json_out:
        con.emit_json(result.summary)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    def _cmd(*args: Any, **kwargs: Any) -> None:
        run(*args, **kwargs)

    _cmd.__signature__ = _signature()  # type: ignore[attr-defined]
    app.command("cv", help=HELP, no_args_is_help=True)(_cmd)


def _ci(s: dict[str, Any]) -> str:
    lo, hi = s["ci95"]
    return "-" if lo is None or lo != lo else f"{lo:.4f}-{hi:.4f}"


def _settings(s: dict[str, Any]) -> str:
    return (
        f"threshold {s['threshold']:g}, min size {s['min_size']}, "
        f"largest {'on' if s['largest'] else 'off'}"
    )


def tables(summary: dict[str, Any], cv_dir: Path) -> list[Any]:
    """The rich tables printed after a cv (headline, per fold, per institution, files)."""
    from rich.text import Text

    sel = summary["selection"]
    # one column per protocol, one row per figure: fits 80 columns (CI logs) with every
    # number whole; what each protocol is goes below the table, where it may wrap
    protocols = [("before", summary["before"]), ("after", summary["after"])]
    notes = [
        f"before: {_settings(summary['before']['settings'])}",
        f"after: {_settings(summary['after']['settings'])} (chosen on these out-of-fold "
        "predictions)",
    ]
    if summary.get("buda"):
        protocols.append(("buda", summary["buda"]))
        notes.append(
            "buda protocol: ends dropped, threshold 0.5, largest 6-connected component "
            "(Buda et al. 2019)"
        )
    figures = [_row(b) for _, b in protocols]
    rows = [[label, *(f[i] for f in figures)] for i, label in enumerate(_ROWS)]
    title = (
        f"per-patient Dice of {summary['patients']} patients, {summary['folds']} folds "
        f"({sel['label']})"
    )
    out: list[Any] = [con.table(title, ["", *(name for name, _ in protocols)], rows)]
    out.append(Text("\n".join(notes)))  # plain text: settings are not rich markup
    after = summary["after"]
    for what, key in (("fold", "per_fold"), ("institution", "per_institution")):
        out.append(
            con.table(
                f"per {what} (after; {sel['select']}: {sel['label']})",
                [what, "patients", "mean", "95% CI", "median"],
                [[g, s["n"], s["mean"], _ci(s), s["median"]] for g, s in after[key].items()],
            )
        )
    files = [["cv folder", str(cv_dir)]] + [[f, str(cv_dir / f)] for f in summary.get("files", [])]
    out.append(con.table(None, ["file", "path"], files))
    return out


#: The headline's rows, in the order :func:`_row` gives them.
_ROWS = ("per-patient mean", "95% CI", "median", "std", "min", "slice Dice (tumour)", "global Dice")


def _row(b: dict[str, Any]) -> list[Any]:
    s = b["per_patient_dice"]
    m = b["metrics"]
    return [
        s["mean"],
        _ci(s),
        s["median"],
        s["std"],
        s["min"],
        m["per_slice_tumor"]["dice"]["mean"],
        m["global"]["dice"],
    ]
