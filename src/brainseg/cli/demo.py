"""`brainseg demo`: the whole pipeline on generated phantoms, offline, in one run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from brainseg import console as con
from brainseg.cli import options
from brainseg.cli.train import render
from brainseg.errors import BrainsegError

_HELP = (
    "Run the whole pipeline offline on generated phantom MRI: synthetic data -> split -> "
    "train -> eval -> predict a folder -> export ONNX -> predict again with onnxruntime.\n\n"
    "Everything goes to runs/demo/exp (exp2, ...); the last table gives the per-patient Dice "
    "of both backends and the path of every output. About a minute on 2 CPU cores with the "
    "defaults. Each step is the library code behind the subcommand of the same name."
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("demo", help=_HELP)
    def _cmd(
        patients: int = typer.Option(10, "--patients", min=5, help="Phantom patients."),
        size: int = typer.Option(
            64, "--size", help="Image size (multiple of 32; 256 is the real data's)."
        ),
        epochs: int = typer.Option(6, "--epochs", min=1, help="Training epochs."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data, split and training."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
        project: Path = typer.Option(
            Path("runs/demo"), "--project", help="Parent folder of the run folders."
        ),
        name: str = typer.Option("exp", "--name", help="Run folder name (exp, exp2, ...)."),
        json_out: bool = options.json_option("Print demo.json (Dice, paths, seconds) on stdout."),
    ) -> None:
        from brainseg.settings import SIZE_MULTIPLE

        if size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
            raise BrainsegError(
                f"--size {size} is not a multiple of {SIZE_MULTIPLE}", hint="use 64, 128 or 256"
            )
        from brainseg.cli.demo_run import DemoOptions, run_demo
        from brainseg.config import check_device_name
        from brainseg.fsutil import next_run_dir

        check_device_name(device)
        run_dir = next_run_dir(project, name)
        con.info(f"brainseg demo: everything goes to {run_dir}")
        res = run_demo(
            run_dir,
            DemoOptions(patients=patients, size=size, epochs=epochs, seed=seed, device=device),
            _show,
        )
        _render(res)
        if json_out:
            con.emit_json(res.as_dict())


def _show(stage: str, result: Any) -> None:
    """A stage's result, as its own subcommand shows it."""
    if stage == "split":
        from brainseg.cli.split import split_table

        con.result(split_table(result.summary()))
    elif stage == "train" and result.is_main:
        render(result)
    elif stage == "eval":
        from brainseg.cli.eval_report import render_report

        render_report(result.summary)
    elif stage == "export":
        from brainseg.export.report import report_rows, report_title

        con.result(con.table(report_title(result), *report_rows(result)))


def _render(res: Any) -> None:
    labels = {
        "eval": "brainseg eval, checkpoint",
        "predict_torch": "brainseg predict, checkpoint (PyTorch)",
        "predict_onnx": "brainseg predict, model.onnx (onnxruntime)",
    }
    rows = [[labels.get(k, k), con.fmt(v)] for k, v in res.dice.items()]
    rows.append(["agreement of the PyTorch and ONNX masks", con.fmt(res.agreement)])
    n = len(res.val_patients)
    con.result(
        con.table(
            f"per-patient Dice on the {n} validation patients (never seen in training)",
            ["model", "Dice"],
            rows,
        )
    )
    what = {
        "data": "phantom dataset",
        "split": "patient split",
        "train": "training run",
        "checkpoint": "best checkpoint",
        "eval": "eval results",
        "scans": "new scans (val)",
        "predict": "masks (PyTorch)",
        "onnx": "ONNX model",
        "predict_onnx": "masks (ONNX)",
        "summary": "this summary",
    }
    table = con.table(
        f"outputs ({sum(res.seconds.values()):.0f} s)",
        ["output", "path"],
        [[what.get(k, k), str(p)] for k, p in res.paths.items()],
    )
    for column in table.columns:
        column.justify = "left"
    con.result(table)
    con.info(
        "next: brainseg predict "
        f"{res.paths['onnx']} YOUR_SCANS/ -o masks/   (see README for the real dataset)"
    )
