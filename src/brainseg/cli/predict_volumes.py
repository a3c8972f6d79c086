"""The volume half of ``brainseg predict``: NIfTI / DICOM cases (see docs/volumes.md).
Light imports only: nibabel / SimpleITK / numpy load when a volume run starts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from brainseg import console as con
from brainseg.cli.options import given_options, refuse_unused
from brainseg.errors import BrainsegError

#: Options of ``brainseg predict`` that only image slices use.
SLICE_ONLY = ("fmt", "overlay", "overlay_rgb", "include_masks")
#: ``--format`` values of the volume path (NIfTI masks, DICOM SEG); tif / png are the slices'.
VOLUME_FORMATS = ("nifti", "dicom-seg")
#: Options of ``brainseg predict`` that only volume cases use.
VOLUME_ONLY = ("largest", "min_volume", "seg_series")


class StdinPeek:
    """Paths on stdin with the first one read ahead: it decides between the slice and the
    volume path, and the slice path still streams the rest (a list of millions of files)."""

    def __init__(self, stream: Iterable[str]) -> None:
        self._rest = iter(stream)
        self._head: list[str] = []
        self.first: str | None = None
        for line in self._rest:
            self._head.append(line)
            if line.strip():
                self.first = line.rstrip("\r\n")
                break

    def __iter__(self) -> Iterator[str]:
        yield from self._head
        self._head = []
        yield from self._rest


def probe_inputs(inputs: list[str], peek: StdinPeek | None) -> list[str]:
    """The inputs with ``-`` replaced by stdin's first path (dropped when stdin is empty)."""
    out: list[str] = []
    for item in inputs:
        if item != "-":
            out.append(item)
        elif peek is not None and peek.first is not None:
            out.append(peek.first)
    return out


def volume_inputs(inputs: list[str], peek: StdinPeek | None) -> list[str]:
    """The volume path's inputs: ``-`` expanded to every path on stdin, label volumes
    (``*_seg.nii.gz``...) on stdin left out as a folder walk leaves them out."""
    from brainseg.data.volumes import is_truth_name

    out: list[str] = []
    for item in inputs:
        if item != "-" or peek is None:
            out.append(item)
            continue
        listed = [line.rstrip("\r\n") for line in peek if line.strip()]  # cases are few
        labels = [p for p in listed if is_truth_name(p)]
        if labels:
            con.info(f"stdin: {len(labels)} label volume(s) skipped (first: {labels[0]})")
        out.extend(p for p in listed if not is_truth_name(p))
    if "-" in inputs and not out:
        raise BrainsegError("no path on stdin", hint="pipe one case file or folder per line")
    return out


def wants_volumes(inputs: list[str], channels: str | None) -> bool:
    """True when ``brainseg predict`` should take the volume path for these inputs."""
    if channels is not None:
        return True
    from brainseg.data.volumes import looks_like_volume_input

    return any(item != "-" and looks_like_volume_input(item) for item in inputs)


def refuse_options(ctx: Any, *, volumes: bool) -> None:
    """BrainsegError (exit 2) for a given option that the chosen path (volume cases or image
    slices) does not use, instead of ignoring it."""
    fmt = given_options(ctx).get("fmt")
    if volumes:
        slice_only = tuple(n for n in SLICE_ONLY if n != "fmt" or fmt not in VOLUME_FORMATS)
        why = "for image slices only; these inputs are volume cases (NIfTI / DICOM)"
        hint = "drop the option (volumes write OUT/<case>_mask.nii.gz; see docs/volumes.md)"
        refuse_unused(ctx, slice_only, why, hint)
        return
    if fmt in VOLUME_FORMATS:
        raise BrainsegError(
            f"--format {fmt}: for volume cases only (dicom-seg: DICOM series); these inputs are "
            "image slices",
            hint="slices take --format tif or png",
        )
    why = "for volume cases only (NIfTI / DICOM); these inputs are image slices"
    hint = "pass .nii/.nii.gz files, case folders or --channels for the volume path"
    refuse_unused(ctx, VOLUME_ONLY, why, hint)


def run_volume_predict(opts: Any, *, json_out: bool = False, engine: Any = None) -> int:
    """Run ``predict_volumes`` (or the Ray ``engine``'s: a case per task) and render it; the
    exit code."""
    from brainseg.cli.base import json_emitter
    from brainseg.inference.volume_predict import CaseResult, predict_volumes

    emit = json_emitter(CaseResult.row, "case") if json_out else None

    def on_case(res: CaseResult) -> None:
        if emit is not None:
            emit(res)
        if res.status != "error":  # a failure is said by the run (its error line)
            con.info(
                f"{res.case}: {res.status}, {res.tumor_voxels} tumour voxels "
                f"({con.fmt(res.tumor_volume_ml)} mL) on {res.tumor_slices}/{res.slices} slices"
            )

    run = predict_volumes if engine is None else engine.predict_volumes
    result = run(opts, on_case)
    n = len(result.cases)
    if n == 0:
        con.info(f"shard {opts.shard}: no case of the input falls in this shard")
        return 0
    rows = [
        [r.case, r.status, r.tumor_voxels, r.tumor_volume_ml, r.tumor_slices, r.slices]
        for r in result.cases
    ]
    con.result(
        con.table(
            f"predict: {n} case(s)",
            ["case", "status", "tumour voxels", "volume mL", "tumour slices", "slices"],
            rows,
        )
    )
    if result.written is not None:
        con.info(f"summary: {result.written}")
    bad = result.counts["error"]
    if bad:
        con.error(f"{bad} of {n} case(s) failed; nothing was written for them")
    return result.exit_code
