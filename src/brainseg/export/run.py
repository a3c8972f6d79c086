"""The export job: :class:`ExportOptions` in, :class:`ExportReport` out (:func:`export_onnx`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import console
from brainseg.ensemble import is_manifest, load_ensemble
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.export import cpu, verify
from brainseg.export import ensemble as ens
from brainseg.export.graph import os_error, set_metadata, torch_to_onnx
from brainseg.export.hubfolder import ONNX_FILE, check_folder, write_hub_files
from brainseg.export.report import ExportCheckFailed, ExportReport
from brainseg.export.variants import convert_fp16, quantize_int8
from brainseg.fsutil import atomic_path, remove_stale_temps, temp_prefix, write_error
from brainseg.model.card import read_card, with_ensemble_card, write_card_markdown
from brainseg.model.checkpoint import load_checkpoint
from brainseg.model.hub import local_model
from brainseg.model.modelfile import sniff_model_file
from brainseg.settings import image_size_of

#: Opsets accepted by ``--opset``.
MIN_OPSET = 13
DEFAULT_OPSET = 17
DEFAULT_CALIB_SLICES = 64
#: The options given as strings or paths to ``export_onnx(checkpoint, out, **options)``.
_PATH_OPTIONS = ("calib", "split", "verify_data", "hub_folder")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how to check it (the ``brainseg export`` options)."""

    checkpoint: Path
    output: Path
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    int8: bool = False
    calib: Path | None = None  # kaggle_3m folder for the int8 calibration
    split: Path | None = None  # calibrate on its train patients, compare on its val patients
    verify_data: Path | None = None  # default: calib, else generated phantoms
    calib_slices: int = DEFAULT_CALIB_SLICES
    force: bool = False
    strict: bool = False  # fail (write nothing) when the verification finds a problem
    card: Path | None = None  # also write the model card as Markdown here
    hub_folder: Path | None = None  # a folder for huggingface-cli upload (output: its model.onnx)
    cache_dir: Path | None = None  # the dataset cache's folder (None: the default one)

    @property
    def variant(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    @property
    def ensemble(self) -> bool:
        """The source is an ensemble manifest (``brainseg cv``'s ensemble.json)."""
        return is_manifest(self.checkpoint)


# --------------------------------------------------------------------------- input checks
def check_checkpoint_kind(path: Path) -> None:
    """An ONNX file given as the checkpoint gets its own message (not "invalid header"); the
    file's first bytes say what it is, never its name."""
    try:
        kind = sniff_model_file(path)
    except OSError:
        return  # load_checkpoint names a missing or unreadable file
    if kind == "onnx":
        raise BrainsegError(
            f"{path} is an ONNX model; export takes a .safetensors checkpoint",
            hint="give the .safetensors checkpoint from `brainseg train` (e.g. "
            "runs/train/exp/best.safetensors) or an ensemble.json from `brainseg cv`; "
            "an ONNX file is already exported",
        )


def check_export_args(opts: ExportOptions) -> None:
    """Refuse bad arguments (exit 2) before any work is done."""
    import onnx

    if opts.fp16 and opts.int8:
        raise BrainsegError(
            "--fp16 and --int8 cannot be combined", hint="export one variant per file"
        )
    if opts.int8 and opts.calib is None:
        raise BrainsegError(
            "--int8 needs calibration data: --calib DATA (a kaggle_3m folder)",
            hint="e.g. --int8 --calib data/kaggle_3m (with --split splits.yaml "
            "to calibrate on the training patients)",
        )
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opts.opset <= top:
        raise BrainsegError(
            f"--opset {opts.opset} is outside {MIN_OPSET}..{top}",
            hint=f"use --opset {DEFAULT_OPSET}",
        )
    out = opts.output
    if opts.hub_folder is not None:
        if out != opts.hub_folder / ONNX_FILE:
            raise BrainsegError(
                f"-o {out} and --hub-folder {opts.hub_folder}: give one of them",
                hint=f"--hub-folder writes {ONNX_FILE} (and the other Hub files) into the folder",
            )
        check_folder(opts.hub_folder, opts.force)
    if out.suffix.lower() != ".onnx":
        raise BrainsegError(f"output {out} must end in .onnx", hint="e.g. -o model.onnx")
    if out.is_dir():
        raise BrainsegError(f"output {out} is a folder", hint="give a file name, e.g. model.onnx")
    if out.exists() and not opts.force:
        raise BrainsegError(f"{out} already exists", hint="pass --force to overwrite it")
    if opts.ensemble:  # an ensemble.json: a readable manifest whose models exist; no int8
        if opts.int8:
            raise BrainsegError(
                f"--int8 is not supported for an ensemble ({opts.checkpoint}): its fold models "
                "would be calibrated and quantised as one graph with no per-fold check",
                hint="export the ensemble as fp32 (the default) or with --fp16; or --int8 one "
                "fold checkpoint (runs/cv/expN/fold_k/last.safetensors)",
            )
        load_ensemble(opts.checkpoint)  # names a missing fold file or a damaged manifest (exit 2)
    else:
        check_checkpoint_kind(opts.checkpoint)
    paths = {"--calib": opts.calib, "--verify-data": opts.verify_data, "--split": opts.split}
    for name, p in paths.items():
        if p is not None and not p.exists():
            raise BrainsegError(f"{name} {p} does not exist", hint="check the path")


# --------------------------------------------------------------------------- steps
def _save(proto: Any, path: Path, meta: dict[str, Any], variant: str, opts: ExportOptions) -> Path:
    import onnx

    set_metadata(proto, meta, variant, opts.opset, opts.checkpoint.name)
    onnx.save(proto, str(path))
    return path


def _int8_file(
    fp32_path: Path, slices: verify.Slices, cal_ids: list[str], opts: ExportOptions, tmp: Path
) -> tuple[Path, dict[str, Any]]:
    """The int8 file calibrated on ``cal_ids``' slices, and what it was calibrated on."""
    rows = verify.pick_rows(slices.rows_of(cal_ids), slices.masks, max(1, int(opts.calib_slices)))
    console.info(
        f"calibrating int8 on {len(rows)} slices of {len(cal_ids)} patient(s) of {slices.source}"
    )
    q_path = tmp / "int8.onnx"
    try:
        quantize_int8(fp32_path, q_path, slices.images[rows], tmp)
    except Exception as exc:
        if isinstance(exc, BrainsegError) or os_error(exc) is not None:
            raise
        raise BrainsegRuntimeError(
            f"int8 quantisation failed: {type(exc).__name__}: {exc}",
            hint="run with --debug and report it",
        ) from exc
    return q_path, {
        "calibration_slices": len(rows),
        "calibration_patients": len(cal_ids),
        "calibration_patient_ids": sorted(cal_ids),
    }


def _check_file(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:
        raise BrainsegRuntimeError(
            f"the exported model fails onnx.checker: {exc}",
            hint="run with --debug and report it",
        ) from exc


def _notes(slices: verify.Slices, int8: dict[str, Any] | None) -> list[str]:
    notes = []
    if slices.phantoms:
        notes.append(
            f"verified on {slices.source}, not on your data: for a model trained on real "
            "data pass --verify-data DATA (a kaggle_3m folder)"
        )
    if int8 is not None:
        notes.append(
            f"this CPU's int8 path: {int8['cpu_int8_path']} ({int8['cpu_int8_expect']}; "
            "see docs/export.md)"
        )
    return notes


def _compare_int8(
    fp32_path: Path,
    int8_path: Path,
    slices: verify.Slices,
    val_ids: list[str],
    meta: dict[str, Any],
    info: dict[str, Any],
) -> list[str]:
    """Fill ``info`` with the int8 Dice comparison; returns the quiet warnings."""
    console.info(
        f"comparing fp32 and int8 on {len(slices.rows_of(val_ids))} slices of "
        f"{len(val_ids)} validation patient(s)"
    )
    info.update(verify.int8_dice(fp32_path, int8_path, slices, val_ids, meta))
    info["own_size"] = verify.precision_dice(fp32_path, int8_path, slices, val_ids, meta)
    path = cpu.int8_path()
    info.update({"cpu_int8_path": path["name"], "cpu_int8_expect": path["expect"]})
    has_tumor = bool(slices.masks[slices.rows_of(val_ids)].any())
    if info["within_tolerance"] and has_tumor and len(val_ids) < 3:
        return ["int8 Dice compared on fewer than 3 patients"]
    return []


def int8_card_meta(meta: dict[str, Any], info: dict[str, Any], source: str) -> dict[str, Any]:
    """``meta`` with the int8 file's measured Dice cost under ``int8`` (shown on its card)."""
    return {
        **meta,
        "int8": {
            "what": "mean per-patient Dice of the fp32 and the int8 model on the same "
            "validation patients at the training size, measured by brainseg export; "
            "own_size: each precision's Dice (and cost vs fp32) at the images' own size",
            "measured_on": source,
            # all but this CPU's int8 path: the card travels to other machines
            **{k: v for k, v in info.items() if not k.startswith("cpu_int8_")},
        },
    }


# --------------------------------------------------------------------------- the job
@dataclass
class _Graphs:
    """The fp32 graph(s) exported from the source: one checkpoint, or every fold's."""

    folds: list[Any]  # fp32 ModelProtos (one for a checkpoint)
    meta: dict[str, Any]  # what the written file's metadata says
    size: tuple[int, int]
    exporter: str


def _export_graphs(opts: ExportOptions, tmp: Path) -> _Graphs:
    """torch -> fp32 ONNX for the checkpoint, or for each model of the ensemble."""
    import onnx

    paths, settings = load_ensemble(opts.checkpoint) if opts.ensemble else ([opts.checkpoint], {})
    loaded = [load_checkpoint(p, "cpu") for p in paths]
    metas = [m for _, m in loaded]
    meta = metas[0]
    if opts.ensemble:
        ens.check_same_size([image_size_of(m) for m in metas], paths)

        names = ens.fold_names(paths)
        meta = ens.ensemble_metadata(metas, settings, names, opts.checkpoint)
        meta = with_ensemble_card(meta, metas, names, settings)  # its own card, not fold 0's
    size = image_size_of(meta) or (256, 256)
    folds, exporters = [], []
    for k, (model, _) in enumerate(loaded):
        what = f"fold {k + 1}/{len(paths)} {paths[k]}" if opts.ensemble else str(paths[k])
        console.info(f"exporting {what} ({size[0]}x{size[1]}, opset {opts.opset})")
        exporters.append(torch_to_onnx(model.eval(), tmp / f"fold{k}.onnx", size, opts.opset))
        folds.append(onnx.load(str(tmp / f"fold{k}.onnx")))
    return _Graphs(folds, meta, size, "+".join(sorted(set(exporters))))


def _assemble(folds: list[Any], opts: ExportOptions) -> Any:
    """The one graph to write: the checkpoint's, or the folds merged into their mean."""
    return ens.merge_folds(folds) if opts.ensemble else folds[0]


@contextlib.contextmanager
def _work_dir(out: Path) -> Iterator[Path]:
    """The export's working folder, next to ``out`` (``.NAME.~HOST@PID.XXXXXXXX.tmp``) so
    that the next export into that folder removes what a killed export (SIGKILL) left."""
    parent = out.parent if out.parent.is_dir() else None
    if parent is not None:
        remove_stale_temps(parent)  # what a killed export left
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out.name), suffix=".tmp", dir=parent) as td:
        yield Path(td)


def _export(opts: ExportOptions) -> ExportReport:
    import onnx

    t0 = time.perf_counter()
    check_export_args(opts)
    out = opts.output
    if opts.hub_folder is not None:
        opts.hub_folder.mkdir(parents=True, exist_ok=True)
    with _work_dir(out) as tmp:
        g = _export_graphs(opts, tmp)
        meta, size = g.meta, g.size
        if opts.ensemble:
            console.info(f"merging {len(g.folds)} fold graphs into one (mean probability)")
        fp32_path = _save(_assemble(g.folds, opts), tmp / "fp32.onnx", meta, "fp32", opts)

        slices = verify.load_slices(opts.verify_data or opts.calib, size, tmp, opts.cache_dir)
        val_ids, cal_ids = verify.val_calib_patients(slices.patient_ids, opts.split)
        final, int8_info = fp32_path, None
        if opts.fp16:
            console.info("converting the weights to fp16 (input and output stay float32)")
            half = _assemble([convert_fp16(f) for f in g.folds], opts)
            final = _save(half, tmp / "fp16.onnx", meta, "fp16", opts)
        if opts.int8:
            q_path, int8_info = _int8_file(fp32_path, slices, cal_ids, opts, tmp)
            final = _save(onnx.load(str(q_path)), q_path, meta, "int8", opts)
        _check_file(final)

        rows = verify.pick_rows(np.arange(len(slices.images)), slices.masks, verify.VERIFY_SLICES)
        what = f"the mean of {len(g.folds)} fold models" if opts.ensemble else "PyTorch"
        console.info(f"verifying against {what} on {len(rows)} slices of {slices.source}")
        variants = [("fp32", fp32_path)] + ([(opts.variant, final)] if final != fp32_path else [])
        checks = verify.compare_with_torch(opts.checkpoint, variants, slices.images[rows])
        quiet_warnings = []
        if int8_info is not None:
            quiet_warnings = _compare_int8(fp32_path, final, slices, val_ids, meta, int8_info)
            # the card of the int8 file records what int8 cost (measured just above)
            card_meta = int8_card_meta(meta, int8_info, slices.source)
            final = _save(onnx.load(str(final)), final, card_meta, "int8", opts)
        found = verify.problems(checks, int8_info)
        for msg in found:
            console.warn(msg)
        report = ExportReport(
            path=out,
            variant=opts.variant,
            opset=opts.opset,
            exporter=g.exporter,
            size_mb=final.stat().st_size / 1e6,
            image_size=size,
            data_source=slices.source,
            checks=checks,
            int8=int8_info,
            warnings=found + quiet_warnings,
            notes=_notes(slices, int8_info),
            members=len(g.folds) if opts.ensemble else 0,
        )
        if opts.strict and found:
            report.written = False
            report.seconds = time.perf_counter() - t0
            raise ExportCheckFailed(report)
        with atomic_path(out, force=opts.force) as dst:
            dst.write_bytes(final.read_bytes())
    report.seconds = time.perf_counter() - t0
    return report


def export_onnx(
    options: ExportOptions | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> ExportReport:
    """Export a checkpoint to ONNX (fp32, fp16 or static int8), check it, verify it against
    PyTorch (:mod:`brainseg.export.verify`; ``strict``: a problem raises
    :class:`ExportCheckFailed` and nothing is written). ``export_onnx(ExportOptions(...))``, or
    ``export_onnx(checkpoint, out, **fields)`` with the :class:`ExportOptions` fields."""
    if isinstance(options, ExportOptions):
        opts = replace(options, **kwargs) if kwargs else options
    else:
        if out is None and kwargs.get("hub_folder") is not None:
            out = Path(kwargs["hub_folder"]) / ONNX_FILE
        if out is None:
            raise TypeError("export_onnx(checkpoint, out, ...) needs the output path")
        paths = {k: Path(v) for k, v in kwargs.items() if k in _PATH_OPTIONS and v is not None}
        opts = ExportOptions(checkpoint=Path(options), output=Path(out), **{**kwargs, **paths})

    # hf://OWNER/NAME[@REVISION][/FILE] or a Hub folder -> its local checkpoint
    opts = replace(opts, checkpoint=local_model(opts.checkpoint, (".safetensors",)))
    if opts.card is not None and Path(opts.card).exists() and not opts.force:
        raise BrainsegError(
            f"model card {opts.card} already exists", hint="pass --force to overwrite it"
        )
    try:
        report = _export(opts)
    except Exception as exc:
        # a full disk (or an unwritable folder) is one clear error; the working folder is
        # gone and an existing output is untouched (tests/faults)
        cause = None if isinstance(exc, BrainsegError) else os_error(exc)
        if cause is None:
            raise
        raise write_error(opts.output, cause) from exc
    if opts.hub_folder is not None:
        source = None if opts.ensemble else opts.checkpoint
        write_hub_files(opts.hub_folder, source, report.path, opts.variant)
    if opts.card is not None:
        write_card_markdown(read_card(report.path), opts.card)
    return report
