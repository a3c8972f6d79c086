"""`brainseg split`: a patient-level train / val (/ test) split or K folds, written as YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from brainseg import console as con
from brainseg.errors import BrainsegError


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command(
        "split",
        help="Split a dataset by patient into train / val (/ test) or K folds, stratified by "
        "tumour burden, and write the split as YAML.",
        no_args_is_help=True,
    )
    def _cmd(
        data: Path = typer.Argument(
            ...,
            help="Dataset folder in the kaggle_3m layout (one sub-folder per patient).",
            show_default=False,
        ),
        output: Path = typer.Option(
            ...,
            "--output",
            "-o",
            help="YAML file to write the split to, e.g. splits.yaml.",
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
        if json_out:
            con.configure(json_mode=True)
        if folds is not None and val_fraction is not None:
            raise BrainsegError(
                "--val-fraction and --folds cannot be used together: with --folds K each "
                "fold validates on 1/K of the (non-test) patients",
                hint="drop --val-fraction, or drop --folds for a single split",
            )
        from brainseg.data.split import check_options

        check_options(0.2 if val_fraction is None else val_fraction, test_fraction, folds)
        if output.exists() and not force:
            raise BrainsegError(f"{output} already exists", hint="pass --force to overwrite it")
        summary = run_split(
            data,
            output,
            val_fraction=0.2 if val_fraction is None else val_fraction,
            test_fraction=test_fraction,
            folds=folds,
            seed=seed,
            force=force,
            skip_bad=skip_bad,
        )
        con.result(summary_table(summary))
        con.info(f"wrote {output}")
        if json_out:
            con.emit_json(summary)


def run_split(
    data: Path,
    output: Path,
    *,
    val_fraction: float,
    test_fraction: float,
    folds: int | None,
    seed: int,
    force: bool,
    skip_bad: bool,
) -> dict[str, Any]:
    """Load the dataset (through the cache), make and save the split, return a summary."""
    import numpy as np

    from brainseg.data.cache import load_dataset
    from brainseg.data.split import make_split, save_split

    arrays = load_dataset(data, skip_bad=skip_bad)
    ids = list(arrays.patient_ids)
    pidx = np.asarray(arrays.patient_index)
    if hasattr(arrays, "tumor_pixels_per_slice"):
        per_slice = np.asarray(arrays.tumor_pixels_per_slice())
    else:  # the contract's fields only
        m = np.asarray(arrays.masks)
        per_slice = m.reshape(len(m), -1).sum(1) if len(m) else np.zeros(0)
    slices = np.bincount(pidx, minlength=len(ids))
    tumor = np.bincount(pidx, weights=(per_slice > 0).astype(np.float64), minlength=len(ids))
    n_slices = {p: int(slices[i]) for i, p in enumerate(ids)}
    n_tumor = {p: int(np.rint(tumor[i])) for i, p in enumerate(ids)}

    split = make_split(
        n_tumor, val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, seed=seed
    )
    save_split(split, output, force=force)

    def row(name: str, patients: list[str]) -> dict[str, Any]:
        s = sum(n_slices[p] for p in patients)
        t = sum(n_tumor[p] for p in patients)
        return {
            "name": name,
            "patients": len(patients),
            "slices": s,
            "tumor_slices": t,
            "tumor_slice_fraction": t / s if s else 0.0,
        }

    rows = []
    if split.folds:
        for k, f in enumerate(split.folds):
            rows.append(row(f"fold {k} val", f["val"]))
    else:
        rows += [row("train", split.subsets["train"]), row("val", split.subsets["val"])]
    if split.subsets["test"]:
        rows.append(row("test", split.subsets["test"]))
    rows.append(row("all", ids))
    return {
        "output": str(output),
        "dataset": str(data),
        "seed": split.seed,
        "dataset_hash": split.dataset_hash,
        "val_fraction": split.val_fraction,
        "test_fraction": split.test_fraction,
        "folds": split.n_folds,
        "counts": {k: len(v) for k, v in split.subsets.items()},
        "rows": rows,
    }


def summary_table(summary: dict[str, Any]) -> Any:
    """The rich table printed after a split."""
    kind = f"{summary['folds']} folds" if summary["folds"] else "split"
    title = (
        f"{kind} of {summary['dataset']} (seed {summary['seed']}, dataset "
        f"{summary['dataset_hash']})"
    )
    rows = [
        [
            r["name"],
            r["patients"],
            r["slices"],
            r["tumor_slices"],
            f"{100 * r['tumor_slice_fraction']:.1f}",
        ]
        for r in summary["rows"]
    ]
    return con.table(title, ["subset", "patients", "slices", "tumor slices", "tumor slice %"], rows)
