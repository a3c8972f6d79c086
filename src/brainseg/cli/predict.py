"""`brainseg predict`: tumor masks for image files, folders, globs or paths on stdin, and
for NIfTI / DICOM volume cases (:mod:`brainseg.cli.predict_volumes`). Light imports only: the
runtimes load when the command runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from brainseg import console as con
from brainseg.cli import options
from brainseg.cli import predict_volumes as vol
from brainseg.errors import EXIT_RUNTIME, BrainsegError
from brainseg.fsutil import one_line
from brainseg.inference.shards import merge_summaries, parse_shard

if TYPE_CHECKING:
    from brainseg.inference.batch import PredictResult

_HELP = (
    "Predict a tumor mask for every INPUT image with MODEL (.safetensors or .onnx).\n\n"
    "INPUT is image files (.tif/.tiff/.png/.jpg), folders (searched recursively, sorted; "
    "ground-truth *_mask.* files skipped here, in globs and on stdin), quoted glob "
    "patterns ('scans/**/*.tif') or - (one path per line "
    "on stdin). Writes OUT/<same relative path>/<stem>_mask.<format> (uint8 0/255, the input's "
    "size) and OUT/summary.csv. An .onnx MODEL runs with onnxruntime alone (no torch).\n\n"
    "Volumes: INPUT that is .nii/.nii.gz files or folders of NIfTI files / DICOM series (or "
    "any INPUT with --channels) is predicted case by case in 3D: OUT/<case>_mask.nii.gz "
    "(uint8 0/1, the input's affine and header), OUT/<case>.json, OUT/summary.csv "
    "(docs/volumes.md).\n\n"
    "Exit codes: 0 all files done, 1 some files failed (see the summary), 2 bad input "
    "(for volumes also: every case was bad).\n\n"
    "Example: brainseg predict model.onnx scans/ -o masks/   |   "
    "brainseg predict model.onnx cases/ -o masks/"
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("predict", help=_HELP, no_args_is_help=True)
    def _cmd(
        ctx: typer.Context,
        model: Path = typer.Argument(
            ...,  # not required with --merge (see _merge_first)
            metavar="MODEL",
            show_default=False,
            help="Model: a .safetensors checkpoint or an .onnx file "
            "(or hf://OWNER/NAME\\[@REVISION]\\[/FILE] on the Hugging Face Hub).",
        ),
        inputs: list[str] = typer.Argument(
            ...,
            metavar="INPUT",  # the usage line adds "..." for a list
            show_default=False,
            help="Image files, folders, glob patterns or -; or NIfTI files / volume case folders.",
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
        fmt: str = typer.Option(
            "tif",
            "--format",
            help="Mask file format: tif or png; for volumes nifti (their default) or dicom-seg "
            "(also OUT/<case>_seg.dcm, a DICOM SEG on the case's FLAIR series).",
        ),
        probabilities: bool = typer.Option(
            False,
            "--probabilities",
            help="Also write <stem>_prob.tif (float32 0..1); <case>_prob.nii.gz for volumes.",
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
        json_out: bool = options.json_option(
            "One JSON line per file on stdout (nothing else there)."
        ),
        threshold: float | None = options.THRESHOLD,
        min_size: int | None = options.MIN_SIZE,
        largest: bool | None = options.LARGEST,
        min_volume: str | None = options.MIN_VOLUME,
        seg_series: str = options.SEG_SERIES,
        channels: str | None = typer.Option(
            None,
            "--channels",
            show_default=False,
            metavar="pre=GLOB,flair=GLOB,post=GLOB",
            help="Volumes: the contrast patterns matched against a case's file / DICOM folder "
            "names; giving it takes the volume path "
            "\\[default: pre=*_t1.nii*,flair=*_flair.nii*,post=*_t1ce.nii*].",
        ),
        tta: bool = options.TTA,
        pad: bool = typer.Option(
            False,
            "--pad",
            help="Zero-pad each image to a multiple of 32 instead of resizing it to the "
            "model's image size.",
        ),
        batch_size: int = options.BATCH_SIZE,
        device: str = options.DEVICE,
        workers: int = typer.Option(
            2, "--workers", min=1, help="Threads reading and (as many) writing files."
        ),
        runtime: str | None = options.RUNTIME,
        precision: str | None = options.PRECISION,
        threads: int = options.THREADS,
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
            metavar="I/N|auto",
            help="Only files (volume cases) number I, I+N, I+2N... of the sorted input list "
            "(0 <= I < N); auto: the shard of this SLURM job array task, no sharding outside "
            "a job array.",
        ),
        include_masks: bool = typer.Option(
            False,
            "--include-masks",
            help="Also predict *_mask.* (ground-truth) files: in folders, globs, on stdin "
            "and named ones.",
        ),
        engine: str = typer.Option(
            "local",
            "--engine",
            help="local (this process) or ray (a Ray Data pipeline: an actor pool of "
            "predictors, one model load and GPU each; docs/predict.md).",
        ),
        address: str | None = typer.Option(
            None,
            "--address",
            show_default=False,
            metavar="ADDR",
            help="With --engine ray: the Ray cluster to join (host:port or auto) "
            "\\[default: start Ray on this machine with --workers CPUs].",
        ),
        merge: Path | None = typer.Option(
            None,
            "--merge",
            show_default=False,
            metavar="OUT",
            is_eager=True,
            callback=_merge_first,
            help="Instead of predicting: combine the shard summaries OUT/summary-I-of-N.csv "
            "into OUT/summary.csv and report missing shards and failed rows "
            "(brainseg predict --merge OUT, no MODEL or INPUT).",
        ),
    ) -> None:
        if merge is not None:
            raise typer.Exit(run_merge(merge, ctx, json_out=json_out))
        if shard is not None and shard.strip().lower() == "auto":
            found = parse_shard(shard)  # the SLURM array task's shard, or None outside one
            shard = None if found is None else f"{found[0]}/{found[1]}"
        given = options.given_options(ctx)
        ray_engine = None
        if engine != "local" or address is not None:
            from brainseg.inference.ray_engine import RayEngine, check_engine

            if check_engine(engine, address) == "ray":  # --workers: predictor actors
                ray_engine = RayEngine(address, workers if "workers" in given else None)

        from brainseg.inference.batch import read_stdin_lines
        from brainseg.inference.pipeline import PredictOptions

        # stdin as bytes: a file name that is not UTF-8 is still the file it names
        peek = vol.StdinPeek(read_stdin_lines()) if "-" in inputs else None
        volumes = vol.wants_volumes(vol.probe_inputs(inputs, peek), channels)
        vol.refuse_options(ctx, volumes=volumes)
        # the options named as PredictOptions' fields pass as they are; these differ:
        opts = options.options_from(
            PredictOptions,
            ctx.params,
            models=[model, *ensemble],
            inputs=vol.volume_inputs(inputs, peek) if volumes else inputs,
            out_dir=output,
            fmt=given.get("fmt"),  # None: the kind's default (tif, nifti)
            shard=shard,  # "auto" resolved above
            stdin=None if volumes else peek,
        )
        if volumes:
            code = vol.run_volume_predict(opts, json_out=json_out, engine=ray_engine)
        else:
            code = run_predict(opts, json_out=json_out, engine=ray_engine)
        if code:
            raise typer.Exit(code)


def _merge_first(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """--merge is eager: given, MODEL, INPUT and -o are not required (run_merge refuses them)."""
    if value is not None:
        for p in ctx.command.params:  # this invocation's command object (built per call)
            if p.name in ("model", "inputs", "output"):
                p.required = False
    return value


def run_merge(out: Path, ctx: typer.Context, *, json_out: bool = False) -> int:
    """``--merge OUT``: combine the shard summaries and print them; exit 0 when every shard is
    there and no row failed, 1 otherwise."""
    other = sorted(k for k in options.given_options(ctx) if k not in ("merge", "json_out"))
    if other or ctx.params.get("inputs"):
        flags = {p.name: p.opts[0] for p in ctx.command.params}  # --output, not -o
        names = ", ".join("MODEL/INPUT" if k in ("model", "inputs") else flags[k] for k in other)
        raise BrainsegError(
            f"--merge takes only the output folder (and --json); also given: {names or 'INPUT'}",
            hint="brainseg predict --merge OUT, after the shard runs into OUT",
        )
    res = merge_summaries(out)
    if json_out:
        con.emit_json(res.as_json())
    else:
        rows = [
            [
                f"{i}/{res.shards}",
                "missing" if i in res.missing else res.rows[i],
                "" if i in res.missing else res.failed[i],
            ]
            for i in range(res.shards)
            if i in res.missing or res.failed.get(i) or res.shards <= 20
        ]
        total = sum(res.rows.values())
        con.result(
            con.table(
                f"merge: {res.shards - len(res.missing)} of {res.shards} shard(s), {total} row(s)",
                ["shard", "rows", "failed"],
                rows,
            )
        )
        con.info(f"summary: {res.written}")
    if res.ok:
        return 0
    if res.missing:
        shown = ", ".join(f"{i}/{res.shards}" for i in res.missing[:10])
        more = ", ..." if len(res.missing) > 10 else ""
        con.error(
            f"{len(res.missing)} of {res.shards} shard(s) have no summary: {shown}{more}",
            hint=f"run those shards (--shard I/{res.shards}, or the array tasks again), "
            "then --merge again",
        )
    failed = sum(res.failed.values())
    if failed:
        shards = sum(1 for n in res.failed.values() if n)
        con.error(
            f"{failed} row(s) failed in {shards} shard(s)",
            hint=f"see the status/error columns of {res.written}",
        )
    return EXIT_RUNTIME


def run_predict(opts: Any, *, json_out: bool = False, engine: Any = None) -> int:
    """Run ``predict_inputs`` (or the Ray ``engine``'s) and render it; the exit code."""
    from brainseg.cli.base import json_emitter
    from brainseg.inference.batch import FileResult, predict_inputs

    if json_out:
        opts.on_result = json_emitter(FileResult.row, "file")
    run = predict_inputs if engine is None else engine.predict_inputs
    return render_result(run(opts), opts.shard)


def _warn_skipped(files: Sequence[Path], why: str) -> None:
    """One warning naming up to three skipped files and why they were skipped."""
    if files:
        names = ", ".join(one_line(p.name) for p in files[:3])
        more = ", ..." if len(files) > 3 else ""
        con.warn(f"skipped {len(files)} file(s) {why}: {names}{more}")


def render_result(result: PredictResult, shard: str | None = None) -> int:
    """The result table of one run and its notes; the exit code (1: some files failed)."""
    c = result.counts
    done = result.done
    if done == 0:
        con.info(f"shard {shard}: no file of the input falls in this shard")
        return 0
    con.result(
        con.table(
            f"predict: {done} file(s)",
            ["files", "written", "skipped", "failed", "with tumor"],
            [[done, c["ok"], c["skipped"], c["error"], c["tumor"]]],
        )
    )
    if result.masks_skipped:
        con.info(f"left out {result.masks_skipped} ground-truth mask file(s) (*_mask.*)")
    if result.earlier_outputs:
        con.info(
            f"left out {result.earlier_outputs} file(s) in the output folder named like "
            "predict's outputs (*_mask, *_prob, *_overlay)"
        )
    _warn_skipped(
        result.irregular,
        "that are not regular files (a FIFO, device or socket; predict reads only regular files)",
    )
    _warn_skipped(
        result.other_types, "of a type predict does not read (not .tif/.tiff/.png/.jpg/.jpeg)"
    )
    if result.written is not None:
        con.info(f"summary: {result.written}")
    if c["error"]:
        con.error(
            f"{c['error']} of {done} file(s) failed",
            hint=f"see the status/error columns of {result.summary_path}",
        )
        return EXIT_RUNTIME
    return 0
