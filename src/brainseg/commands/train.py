"""`brainseg train`: parse options, build the TrainConfig, call :func:`brainseg.train.train`.

Every option defaults to None here so that only the options the user actually gave override
the config file (``--config``); the defaults themselves live in :class:`TrainConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from brainseg import console as con
from brainseg.errors import BrainsegError

HELP = (
    "Train a UNet-VGG16 on a kaggle_3m-layout dataset with a patient-level split.\n\n"
    "Writes runs/train/exp (exp2, ...): config.yaml, split.yaml, metrics.csv, "
    "best.safetensors, last.safetensors, curves.png, preview.png. Defaults are the reference "
    "recipe (--config seed): BCE loss, Adam lr 4e-4, batch 16, 20 epochs, 256x256, ImageNet "
    "encoder.\n\n"
    "Several GPUs: torchrun --nproc-per-node N -m brainseg train ... (DistributedDataParallel)."
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("train", help=HELP, no_args_is_help=True)
    def _cmd(
        data: Path | None = typer.Argument(
            None,
            help="Dataset folder (kaggle_3m layout); not needed with --resume.",
            show_default=False,
        ),
        split: Path | None = typer.Option(
            None, "--split", help="Split YAML from `brainseg split`.", show_default=False
        ),
        fold: int | None = typer.Option(
            None, "--fold", help="Cross-validation fold K (0..folds-1) of a --folds split."
        ),
        config: str | None = typer.Option(
            None,
            "--config",
            "-c",
            help="YAML settings: seed (reference recipe), best (ours) or a file path; "
            "options given on the command line override it.",
        ),
        epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: 20)."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", "-b", help="Global batch size (default: 16)."
        ),
        lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (default: 4e-4)."),
        weight_decay: float | None = typer.Option(
            None, "--weight-decay", help="Adam weight decay (L2) (default: 0)."
        ),
        loss: str | None = typer.Option(
            None, "--loss", help="bce | dice | bce+dice (default: bce)."
        ),
        scheduler: str | None = typer.Option(
            None,
            "--scheduler",
            help="none | cosine (per step, to 0) | plateau (x0.5 when val per-patient Dice "
            "stalls) (default: none).",
        ),
        image_size: int | None = typer.Option(
            None, "--image-size", help="Train at this size (multiple of 32) (default: 256)."
        ),
        augment: bool | None = typer.Option(
            None,
            "--augment/--no-augment",
            help="Flips, rotation, scale, brightness/contrast on the device (default: off).",
        ),
        tumor_oversample: float | None = typer.Option(
            None,
            "--tumor-oversample",
            help="Probability that a drawn slice has tumor (default: natural frequency).",
        ),
        encoder: str | None = typer.Option(
            None, "--encoder", help="vgg16 | vgg16_bn (default: vgg16)."
        ),
        encoder_weights: str | None = typer.Option(
            None,
            "--encoder-weights",
            help="imagenet | none | PATH (torchvision-format VGG16 state dict) "
            "(default: imagenet).",
        ),
        freeze_encoder_epochs: int | None = typer.Option(
            None,
            "--freeze-encoder-epochs",
            help="Train only the decoder for N epochs (default: 0).",
        ),
        decoder_channels: str | None = typer.Option(
            None,
            "--decoder-channels",
            help="5 comma-separated widths (default: 512,256,128,64,32).",
        ),
        upsample: str | None = typer.Option(
            None, "--upsample", help="transpose | bilinear (default: transpose)."
        ),
        normalization: str | None = typer.Option(
            None,
            "--normalization",
            help="imagenet | zscore (per image), done inside the model (default: imagenet).",
        ),
        steps_per_epoch: int | None = typer.Option(
            None, "--steps-per-epoch", help="Optimiser steps per epoch (default: one pass)."
        ),
        grad_clip: float | None = typer.Option(
            None, "--grad-clip", help="Clip the gradient norm to this value (default: off)."
        ),
        amp: str | None = typer.Option(
            None,
            "--amp",
            help="auto | bf16 | fp16 | off (auto: bf16 on GPUs and on CPUs with native bf16, "
            "else fp32) (default: auto).",
        ),
        channels_last: bool | None = typer.Option(
            None, "--channels-last/--no-channels-last", help="NHWC memory format (default: off)."
        ),
        compile_: bool | None = typer.Option(
            None, "--compile/--no-compile", help="torch.compile the model (default: off)."
        ),
        device: str | None = typer.Option(
            None, "--device", help="auto | cpu | cuda | cuda:N | mps (default: auto)."
        ),
        workers: int | None = typer.Option(
            None, "--workers", help="CPU threads for torch (0: torch's default) (default: 0)."
        ),
        seed: int | None = typer.Option(None, "--seed", help="Random seed (default: 0)."),
        deterministic: bool | None = typer.Option(
            None,
            "--deterministic/--no-deterministic",
            help="torch.use_deterministic_algorithms (same seed + device = same numbers).",
        ),
        skip_bad: bool | None = typer.Option(
            None, "--skip-bad/--no-skip-bad", help="Skip unreadable slices (default: off)."
        ),
        project: Path | None = typer.Option(
            None, "--project", help="Parent folder of runs (default: runs/train)."
        ),
        name: str | None = typer.Option(
            None, "--name", help="Run folder name; exp2, exp3... if taken (default: exp)."
        ),
        exist_ok: bool | None = typer.Option(
            None, "--exist-ok", help="Reuse project/name instead of numbering a new folder."
        ),
        resume: Path | None = typer.Option(
            None,
            "--resume",
            help="Continue the run in this folder from last.safetensors (--epochs may be raised).",
            show_default=False,
        ),
        quiet: bool | None = typer.Option(
            None, "--quiet", "-q", help="No progress bar or per-epoch lines."
        ),
    ) -> None:
        from brainseg.config import load_config, load_resume_config

        given: dict[str, Any] = {
            "data": data,
            "split": split,
            "fold": fold,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "loss": loss,
            "scheduler": scheduler,
            "image_size": image_size,
            "augment": augment,
            "tumor_oversample": tumor_oversample,
            "encoder": encoder,
            "encoder_weights": encoder_weights,
            "freeze_encoder_epochs": freeze_encoder_epochs,
            "decoder_channels": decoder_channels,
            "upsample": upsample,
            "normalization": normalization,
            "steps_per_epoch": steps_per_epoch,
            "grad_clip": grad_clip,
            "amp": amp,
            "channels_last": channels_last,
            "compile": compile_,
            "device": device,
            "workers": workers,
            "seed": seed,
            "deterministic": deterministic,
            "skip_bad": skip_bad,
            "project": project,
            "name": name,
            "exist_ok": exist_ok,
            "quiet": quiet,
        }
        given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}
        if quiet:
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
        cfg.validate()  # every bad value is refused here, before any data is read

        from brainseg.train import train

        train(cfg)
