"""`brainseg train`: parse options, build the TrainConfig, call the library, render the result.

The options are made from TrainConfig's ``flag`` fields (`brainseg cv` takes them too); each
defaults to None so that only the options the user gave override the ``--config`` file.
"""

from __future__ import annotations

import inspect
from dataclasses import Field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from brainseg import console as con
from brainseg.config import TrainConfig, field_types, fields_with, setting_help
from brainseg.errors import BrainsegError

if TYPE_CHECKING:
    from brainseg.train import TrainResult

HELP = (
    "Train a UNet-VGG16 on a kaggle_3m-layout dataset with a patient-level split.\n\n"
    "Writes runs/train/exp (exp2, ...): config.yaml, split.yaml, metrics.csv, "
    "best.safetensors, last.safetensors, curves.png, preview.png, report.html. Defaults are "
    "the reference recipe (--config seed): BCE loss, Adam lr 4e-4, batch 16, 20 epochs, "
    "256x256, ImageNet encoder.\n\n"
    "Several GPUs: torchrun --nproc-per-node N -m brainseg train ... (DistributedDataParallel)."
)

_KW = inspect.Parameter.KEYWORD_ONLY
LOGGER_OPTION = typer.Option(
    None,
    "--logger",
    metavar="NAME",
    help="Also log to tensorboard | mlflow (repeatable; metrics.csv is always written). "
    "MLflow: MLFLOW_TRACKING_URI, else ./mlruns.",
    show_default=False,
)
DATA_ARGUMENT = typer.Argument(
    None, help="Dataset folder (kaggle_3m layout); not needed with --resume.", show_default=False
)


def _option(f: Field[Any]) -> inspect.Parameter:
    """The Typer option of one TrainConfig field (type and help from the field)."""
    kind, _optional = field_types()[f.name]
    flag = "--" + f.name.replace("_", "-")
    meta = f.metadata
    if kind is bool and meta.get("switch", True):
        flag = f"{flag}/--no-{flag[2:]}"
    kind = Path if meta.get("path") else str if kind is list or meta.get("words") else kind
    option = typer.Option(
        None, flag, *meta.get("flags", ()), help=setting_help(f.name), show_default=False
    )
    return inspect.Parameter(f.name, _KW, default=option, annotation=kind | None)


def training_options(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The Typer options of every ``flag`` TrainConfig setting (less ``exclude``) and
    ``--logger``: what `train` and `cv` both take."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    options = [_option(by_name[n]) for n in fields_with("flag") if n not in exclude]
    logger = inspect.Parameter("logger", _KW, default=LOGGER_OPTION, annotation=list[str] | None)
    return [*options, logger]


def _signature() -> inspect.Signature:
    config = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML settings: seed (reference recipe), best (ours) or a file path; "
        "options given on the command line override it.",
    )
    params = [
        inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DATA_ARGUMENT,
                          annotation=Path | None),
        inspect.Parameter("config", _KW, default=config, annotation=str | None),
        *training_options(),
    ]  # fmt: skip
    return inspect.Signature(params, return_annotation=None)


def run(data: Path | None = None, config: str | None = None, **options: Any) -> None:
    """The command body: the options the user gave -> TrainConfig -> train -> tables."""
    from brainseg.config import load_config, load_resume_config

    loggers = options.pop("logger", None)
    given = {"data": data, **options, "loggers": loggers or None}
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}
    resume = given.pop("resume", None)
    if given.get("quiet"):
        con.configure(quiet=True)
    if resume is not None:
        if config is not None:
            raise BrainsegError(
                "--config cannot be combined with --resume",
                hint="a resumed run keeps its own config.yaml",
            )
        cfg = load_resume_config(resume, given)
    else:
        cfg = load_config(config, given)

    from brainseg.train import run_training

    result = run_training(cfg)  # validates every value before any data is read
    if result.is_main:
        render(result)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    def _cmd(*args: Any, **kwargs: Any) -> None:
        run(*args, **kwargs)

    _cmd.__signature__ = _signature()  # type: ignore[attr-defined]
    app.command("train", help=HELP, no_args_is_help=True)(_cmd)


#: The files of a run folder, as the final table lists them.
RUN_FILES = (
    ("best weights", "best.safetensors"),
    ("last state", "last.safetensors"),
    ("metrics", "metrics.csv"),
    ("curves", "curves.png"),
    ("preview", "preview.png"),
    ("report", "report.html"),
)


def render(result: TrainResult) -> None:
    """The final tables: the best epoch (Dice at the training size) and the run's files."""
    best, size = result.best, result.image_size
    if best["val_loss"] is None:  # --fold all
        title = (
            f"final epoch {best['epoch']} of {result.epochs} (--fold all: trained on every "
            "patient, no validation; best.safetensors = the final weights)"
        )
        keys = columns = ["epoch", "train_loss"]
    else:
        title = (
            f"best epoch {best['epoch']} of {result.epochs} (by mean per-patient Dice, "
            f"on validation slices at the training size {size}x{size})"
        )
        keys = ["epoch", "train_loss", "val_loss", "val_dice_slice", "val_dice_patient"]
        columns = ["epoch", "train_loss", "val_loss", "dice_slice", "dice_patient"]
    con.result(con.table(title, columns, [[best[k] for k in keys]]))
    files = [["run folder", str(result.run_dir)]]
    files += [
        [label, str(result.run_dir / name)]
        for label, name in RUN_FILES
        if (result.run_dir / name).exists()  # no preview.png without validation patients
    ]
    con.result(con.table(None, ["file", "path"], files))
