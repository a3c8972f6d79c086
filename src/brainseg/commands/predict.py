"""`brainseg predict`: tumor masks for image files, folders, globs or paths on stdin.

Only typer, the standard library and light brainseg modules at import time: numpy,
onnxruntime and (for .safetensors models) torch are imported when the command runs.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import typer

from brainseg import console as con
from brainseg.errors import EXIT_RUNTIME, BrainsegError

_HELP = (
    "Predict a tumor mask for every INPUT image with MODEL (.safetensors or .onnx).\n\n"
    "INPUT is image files (.tif/.tiff/.png/.jpg), folders (searched recursively, sorted; "
    "*_mask.* files skipped), quoted glob patterns ('scans/**/*.tif') or - (one path per line "
    "on stdin). Writes OUT/<same relative path>/<stem>_mask.<format> (uint8 0/255, the input's "
    "size) and OUT/summary.csv. An .onnx MODEL runs with onnxruntime alone (no torch).\n\n"
    "Exit codes: 0 all files done, 1 some files failed (see the summary), 2 bad input.\n\n"
    "Example: brainseg predict model.onnx scans/ -o masks/"
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("predict", help=_HELP, no_args_is_help=True)
    def _cmd(
        model: Path = typer.Argument(
            ..., show_default=False, help="Model: a .safetensors checkpoint or an .onnx file."
        ),
        inputs: list[str] = typer.Argument(
            ...,
            metavar="INPUT...",
            show_default=False,
            help="Image files, folders, glob patterns or -.",
        ),
        output: Path = typer.Option(
            ..., "--output", "-o", show_default=False, help="Output folder (created if missing)."
        ),
        ensemble: list[Path] = typer.Option(
            [],
            "--ensemble",
            show_default=False,
            help="Another model to average with MODEL (mean probability); repeatable.",
        ),
        fmt: str = typer.Option("tif", "--format", help="Mask file format: tif or png."),
        probabilities: bool = typer.Option(
            False, "--probabilities", help="Also write <stem>_prob.tif (float32 0..1)."
        ),
        overlay: bool = typer.Option(
            False,
            "--overlay",
            help="Also write <stem>_overlay.png: the image with the mask outline in red.",
        ),
        overlay_rgb: bool = typer.Option(
            False,
            "--overlay-rgb",
            help="Draw the overlay on the RGB image instead of the FLAIR channel (grey).",
        ),
        summary: str = typer.Option(
            "csv", "--summary", help="Summary file format: csv or jsonl (OUT/summary.<ext>)."
        ),
        json_out: bool = typer.Option(
            False, "--json", help="One JSON line per file on stdout (nothing else there)."
        ),
        threshold: float | None = typer.Option(
            None,
            "--threshold",
            min=0.0,
            max=1.0,
            show_default=False,
            help="Probability threshold \\[default: the model's stored threshold].",
        ),
        min_size: int | None = typer.Option(
            None,
            "--min-size",
            min=0,
            show_default=False,
            help="Remove tumor components smaller than this many pixels (at the model's "
            "image size) \\[default: the model's stored value].",
        ),
        tta: bool = typer.Option(
            False, "--tta", help="Test-time augmentation: mean over horizontal/vertical flips."
        ),
        pad: bool = typer.Option(
            False,
            "--pad",
            help="Zero-pad each image to a multiple of 32 instead of resizing it to the "
            "model's image size.",
        ),
        batch_size: int = typer.Option(
            8, "--batch-size", "-b", min=1, help="Images per inference batch."
        ),
        device: str = typer.Option(
            "auto", "--device", help="auto, cpu, cuda, cuda:N (mps for checkpoints)."
        ),
        workers: int = typer.Option(
            2, "--workers", min=1, help="Threads reading and (as many) writing files."
        ),
        skip_existing: bool = typer.Option(
            False,
            "--skip-existing",
            help="Keep files whose outputs already exist (resume an interrupted run).",
        ),
        force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
        shard: str | None = typer.Option(
            None,
            "--shard",
            show_default=False,
            metavar="I/N",
            help="Only files number I, I+N, I+2N... of the sorted input list (0 <= I < N).",
        ),
        include_masks: bool = typer.Option(
            False, "--include-masks", help="Also predict *_mask.* files found in folders and globs."
        ),
    ) -> None:
        if json_out:
            con.configure(json_mode=True)
        code = run_predict(
            model=model,
            inputs=inputs,
            output=output,
            ensemble=ensemble,
            fmt=fmt,
            probabilities=probabilities,
            overlay=overlay,
            overlay_rgb=overlay_rgb,
            summary=summary,
            json_out=json_out,
            threshold=threshold,
            min_size=min_size,
            tta=tta,
            pad=pad,
            batch_size=batch_size,
            device=device,
            workers=workers,
            skip_existing=skip_existing,
            force=force,
            shard=shard,
            include_masks=include_masks,
        )
        if code:
            raise typer.Exit(code)


#: Exit code when stdout is closed under --json (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush does not fail again."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    v = value.lower().lstrip(".")
    if v not in choices:
        raise BrainsegError(
            f"{option} {value!r} is not one of {', '.join(choices)}",
            hint=f"use {option} {choices[0]}",
        )
    return v


def run_predict(
    *,
    model: Path,
    inputs: list[str],
    output: Path,
    ensemble: list[Path],
    fmt: str,
    probabilities: bool,
    overlay: bool,
    overlay_rgb: bool,
    summary: str,
    json_out: bool,
    threshold: float | None,
    min_size: int | None,
    tta: bool,
    pad: bool,
    batch_size: int,
    device: str,
    workers: int,
    skip_existing: bool,
    force: bool,
    shard: str | None,
    include_masks: bool,
) -> int:
    """The command body; returns the exit code (0 all done, 1 some files failed)."""
    from brainseg import predict as P

    fmt = _choice("--format", fmt, ("tif", "png"))
    summary_fmt = _choice("--summary", summary, ("csv", "jsonl"))
    if force and skip_existing:
        raise BrainsegError(
            "--force and --skip-existing cannot be used together",
            hint="--skip-existing keeps finished files, --force redoes them",
        )
    shard_in = P.parse_shard(shard)
    if output.exists() and not output.is_dir():
        raise BrainsegError(
            f"output {output} is a file, not a folder",
            hint="pass a folder to -o (it is created if missing)",
        )
    P.check_inputs(inputs)
    spec = P.InputSpec(items=list(inputs), include_masks=include_masks, exclude_dirs=[output])

    files = P.iter_inputs(spec)
    first = next(files, None)
    if first is None:
        raise BrainsegError(
            f"no images found in {', '.join(inputs)} (looked for .tif/.tiff/.png/.jpg/.jpeg"
            f"{'' if include_masks else ', skipping *_mask.* files'})",
            hint="check the paths, quote glob patterns, or pass --include-masks",
        )
    name = "summary" if shard_in is None else f"summary-{shard_in[0]}-of-{shard_in[1]}"
    summary_path = output / f"{name}.{summary_fmt}"
    if summary_path.exists() and not (force or skip_existing):
        raise BrainsegError(
            f"{summary_path} already exists (an earlier run wrote to {output})",
            hint="pass --skip-existing to resume that run, --force to redo it, "
            "or choose another -o folder",
        )

    predictor = P.Predictor([model, *ensemble], device=device, batch_size=batch_size, tta=tta)
    meta = predictor.metadata
    post = meta.get("postprocess") or {}
    thr = float(threshold if threshold is not None else meta.get("threshold", 0.5))
    ms = int(min_size if min_size is not None else (post.get("min_size") or 0))
    size = predictor.image_size
    how = "padded to multiples of 32" if pad or size is None else f"resized to {size[0]}x{size[1]}"
    con.info(
        f"model {model} ({predictor.backend}"
        f"{f', ensemble of {len(predictor.paths)}' if ensemble else ''}"
        f"{', TTA' if tta else ''}): images {how}, threshold {thr:g}, min size {ms}"
    )
    if post.get("largest_component"):
        con.info(
            "the model's largest-component rule is per patient volume and is not "
            "applied to independent files"
        )

    opts = P.BatchOptions(
        out_dir=output,
        fmt=fmt,
        threshold=thr,
        min_size=ms,
        pad=pad,
        probabilities=probabilities,
        overlay=overlay,
        overlay_channel=None if overlay_rgb else 1,
        skip_existing=skip_existing,
        force=force,
        workers=workers,
    )

    def chosen(stream: Any) -> Any:
        if shard_in is None:
            return stream
        i, n = shard_in
        return islice(stream, i, None, n)

    def everything() -> Any:
        yield first
        yield from files

    total = None
    if "-" not in inputs:  # a second, cheap walk (no image is read) for the progress total
        total = sum(1 for _ in chosen(P.iter_inputs(spec)))
    output.mkdir(parents=True, exist_ok=True)

    writer = P.SummaryWriter(summary_path, summary_fmt)
    counts = {"ok": 0, "skipped": 0, "error": 0, "tumor": 0}
    warned: set[str] = set()
    try:
        with con.progress(total, "predict", unit="file") as bar:
            for res in P.predict_files(predictor, chosen(everything()), opts):
                writer.write(res)
                counts[res.status] = counts.get(res.status, 0) + 1
                counts["tumor"] += bool(res.has_tumor)
                if json_out:
                    try:
                        con.emit_json(P.json_row(res))
                    except BrokenPipeError:
                        # `... --json | head`: the reader has gone; stop like other Unix tools.
                        _silence_stdout()
                        con.info(f"stdout closed: stopped after {sum(counts.values())} file(s)")
                        raise typer.Exit(EXIT_BROKEN_PIPE) from None
                if res.status == "error":
                    con.warn(res.error)
                for note in res.notes:
                    if note not in warned:
                        warned.add(note)
                        con.warn(f"{res.path}: {note} (said once; other files may be too)")
                bar.advance(1, failed=counts["error"])
    except KeyboardInterrupt:
        done = counts["ok"] + counts["skipped"] + counts["error"]
        con.warn(
            f"interrupted after {done} file(s); their rows are in {summary_path}; run the "
            "same command with --skip-existing to continue"
        )
        raise
    finally:
        written = writer.close()

    done = counts["ok"] + counts["skipped"] + counts["error"]
    if done == 0:
        con.info(f"shard {shard}: no file of the input falls in this shard")
        return 0
    con.result(
        con.table(
            f"predict: {done} file(s)",
            ["files", "written", "skipped", "failed", "with tumor"],
            [[done, counts["ok"], counts["skipped"], counts["error"], counts["tumor"]]],
        )
    )
    if written is not None:
        con.info(f"summary: {written}")
    if counts["error"]:
        con.error(
            f"{counts['error']} of {done} file(s) failed",
            hint=f"see the status/error columns of {summary_path}",
        )
        return EXIT_RUNTIME
    return 0
