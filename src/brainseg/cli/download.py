"""`brainseg download lgg | vgg16 | synthetic`: get the data and weights a run needs."""

from __future__ import annotations

from pathlib import Path

import typer

from brainseg import console as con
from brainseg.cli.base import Group
from brainseg.cli.options import json_option, options_from

_RETRIES = (
    "How many times a stalled download is retried (timeouts, dropped connections, "
    "HTTP 5xx / 429, refused after the server answered once)."
)
_DELAY = "Seconds before the first retry; each further retry waits twice as long (max 60)."
_TIMEOUT = "Seconds without data from the server before the try counts as failed."


def _run(what: str, ctx: typer.Context) -> None:
    """Call the download job on the command's options and render what it installed."""
    from brainseg.data.download import DownloadOptions

    opts = options_from(DownloadOptions, ctx.params, what=what)
    if opts.what == "vgg16":
        from brainseg.model.weights import install_vgg16 as run
    else:
        from brainseg.data.download import run_download as run
    res = run(opts)
    s = res.summary
    if s is None:
        con.result(f"{'VGG16-BN' if opts.bn else 'VGG16'} ImageNet weights: {res.path}")
    else:
        pct = f" ({100.0 * s.tumor_slices / s.slices:.0f}%)" if s.slices else ""
        con.result(
            con.table(
                None,
                ["dataset", "patients", "slices", "slices with tumor"],
                [[str(s.path), s.patients, s.slices, f"{s.tumor_slices}{pct}"]],
            )
        )
    if ctx.params["json_out"]:
        con.emit_json(res.as_dict())


def register(app: typer.Typer) -> None:
    """Add ``download`` and its three subcommands to the app (each parameter is named like
    the :class:`~brainseg.data.download.DownloadOptions` field it sets)."""
    dl = typer.Typer(
        cls=Group,
        name="download",
        help="Get the LGG dataset, torchvision's ImageNet VGG16 weights, or phantom data.",
        no_args_is_help=True,
        rich_markup_mode="rich",
    )

    @dl.command("lgg")
    def lgg(
        ctx: typer.Context,
        dest: Path = typer.Option(
            Path("data"),
            "--dest",
            "-d",
            help="Folder that receives kaggle_3m/ (created if needed).",
        ),
        url: str | None = typer.Option(
            None, "--url", help="Download from this mirror (zip or tar.gz) instead of Kaggle."
        ),
        from_file: Path | None = typer.Option(
            None,
            "--from-file",
            help="Install from an archive you already have (no network needed).",
        ),
        sha256: str | None = typer.Option(
            None,
            "--sha256",
            help="Expected SHA-256 of the archive (hex); checked before unpacking.",
        ),
        force: bool = typer.Option(
            False, "--force", "-f", help="Replace an existing DEST/kaggle_3m."
        ),
        keep_archive: bool = typer.Option(
            False, "--keep-archive", help="Keep the downloaded archive in DEST after unpacking."
        ),
        kaggle_auth: bool | None = typer.Option(
            None,
            "--kaggle-auth/--no-kaggle-auth",
            help="Send Kaggle credentials (default: only to kaggle.com, never to a --url mirror).",
        ),
        retries: int = typer.Option(5, "--retries", min=0, help=_RETRIES),
        backoff: float = typer.Option(1.0, "--retry-delay", min=0.0, help=_DELAY),
        timeout: float = typer.Option(60.0, "--timeout", min=0.1, help=_TIMEOUT),
        json_out: bool = json_option("Print the summary as JSON on stdout."),
    ) -> None:
        """Download the LGG MRI dataset (Kaggle mateuszbuda/lgg-mri-segmentation) into DEST/kaggle_3m: resumable, checksummed, safely unpacked, validated."""  # noqa: E501
        _run("lgg", ctx)

    @dl.command("vgg16")
    def vgg16(
        ctx: typer.Context,
        bn: bool = typer.Option(False, "--bn", help="VGG16 with batch norm (vgg16_bn)."),
        from_file: Path | None = typer.Option(
            None, "--from-file", help="Install a weights file you already have (offline)."
        ),
        url: str | None = typer.Option(
            None, "--url", help="Download from this mirror instead of download.pytorch.org."
        ),
        force: bool = typer.Option(
            False, "--force", "-f", help="Replace an installed file whose hash is wrong."
        ),
        retries: int = typer.Option(5, "--retries", min=0, help=_RETRIES),
        backoff: float = typer.Option(1.0, "--retry-delay", min=0.0, help=_DELAY),
        timeout: float = typer.Option(60.0, "--timeout", min=0.1, help=_TIMEOUT),
        json_out: bool = json_option("Print the result as JSON."),
    ) -> None:
        """Install torchvision's ImageNet VGG16 weights into the torch hub cache ($TORCH_HOME/hub/checkpoints), hash-checked, so training can start offline."""  # noqa: E501
        _run("vgg16", ctx)

    @dl.command("synthetic")
    def synthetic(
        ctx: typer.Context,
        dest: Path = typer.Option(
            Path("data/synthetic"), "--dest", "-d", help="Folder that receives kaggle_3m/."
        ),
        patients: int = typer.Option(
            10, "--patients", "-n", min=1, help="Number of phantom patients."
        ),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
        size: int = typer.Option(256, "--size", min=32, help="Image side in pixels."),
        force: bool = typer.Option(
            False, "--force", "-f", help="Replace an existing DEST/kaggle_3m."
        ),
        json_out: bool = json_option("Print the summary as JSON on stdout."),
    ) -> None:
        """Write phantom MRI slices with tumors in the kaggle_3m layout (offline demos, tests)."""
        _run("synthetic", ctx)

    app.add_typer(dl, name="download")
