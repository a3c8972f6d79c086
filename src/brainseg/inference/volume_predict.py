"""Predict tumour masks for volume cases (NIfTI / DICOM), case by case.

Cases go through the same pipeline as images (:class:`brainseg.inference.pipeline.Engine`);
:class:`VolumeFormat` cuts each into the model's axial slices (LPS), post-processes in 3D and
writes the result back on the input grid, with the input's affine and header:

- ``OUT/<case>_mask.nii.gz`` (uint8 0/1), ``OUT/<case>_prob.nii.gz`` with ``--probabilities``
- ``OUT/<case>.json`` (written last: its presence means the case is done) and
  ``OUT/summary.csv`` (``summary-I-of-N.csv`` for a shard): tumour voxels, volume in mL, slices.

A bad case (missing contrast, not co-registered, 2D, unreadable, several DICOM series, NaNs)
gets one line and no file; the run goes on with the next case.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import console
from brainseg.data import imageio, volumes
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import atomic_write_text, json_safe, one_line
from brainseg.inference import dicomseg, pipeline, postprocess
from brainseg.inference.pipeline import PredictOptions, Prepared, RunOutcome, run_cases
from brainseg.inference.runtimes import check_choice, describe
from brainseg.optional import require
from brainseg.settings import PostSettings


@dataclass
class CaseResult:
    """One row of the summary (and one --json line)."""

    case: str
    status: str = "ok"  # ok, skipped, error
    inputs: str = ""
    mask: str = ""
    tumor_voxels: int | None = None
    tumor_volume_ml: float | None = None
    tumor_slices: int | None = None
    slices: int | None = None
    shape: str = ""
    spacing_mm: str = ""
    orientation: str = ""
    max_probability: float | None = None
    error: str = ""

    def __post_init__(self) -> None:
        # One printable UTF-8 line each (a name with a newline or invalid UTF-8).
        self.case, self.inputs, self.mask, self.error = map(
            one_line, (self.case, self.inputs, self.mask, self.error)
        )

    def row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in SUMMARY_COLUMNS}

    @property
    def has_tumor(self) -> bool:
        return bool(self.tumor_voxels)


#: The summary's columns: every field, in order.
SUMMARY_COLUMNS = tuple(f.name for f in fields(CaseResult))


@dataclass
class VolumeResult(RunOutcome):
    """What a run did: one :class:`CaseResult` per case and the settings applied."""

    cases: list[CaseResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 all done; 2 every case was bad input; 1 some cases failed."""
        bad = self.counts["error"]
        if not bad:
            return 0
        return 2 if bad == len(self.cases) else 1


def parse_min_volume(value: str | None) -> tuple[float, str] | None:
    """``"200"`` (voxels), ``"200vox"`` or ``"150mm3"`` -> (amount, unit)."""
    if value is None or not str(value).strip():
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(vox|voxels?|mm3|mm\^3|mm³)?\s*", str(value).lower())
    if not m:
        raise BrainsegError(
            f"--min-volume {value!r} is not a voxel count or a volume in mm3",
            hint="e.g. --min-volume 200 (voxels) or --min-volume 150mm3",
        )
    unit = "mm3" if (m.group(2) or "").startswith("mm") else "voxels"
    return float(m.group(1)), unit


def remove_small_3d(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 3D components (26-connected, as keep_largest_3d) under ``min_voxels`` voxels."""
    from scipy import ndimage

    m = np.asarray(mask) != 0
    if min_voxels <= 1 or not m.any():
        return m
    labels, _ = ndimage.label(m, structure=ndimage.generate_binary_structure(3, 3))
    return postprocess.filter_labels(labels, np.bincount(labels.ravel()), min_voxels)


@dataclass
class VolumePost:
    """A volume's post-processing: eval's, then ``--min-volume``."""

    post: PostSettings
    min_volume: tuple[float, str] | None

    def as_dict(self) -> dict[str, Any]:
        mv = None if self.min_volume is None else f"{self.min_volume[0]:g} {self.min_volume[1]}"
        return {
            "threshold": self.post.threshold,
            "min_size_pixels_per_slice": self.post.min_size,
            "largest_3d_component": self.post.largest,
            "min_volume": mv,
        }


@dataclass
class _Outs:
    mask: Path
    prob: Path | None
    meta: Path
    seg: Path | None = None  # --format dicom-seg

    def all(self) -> list[Path]:
        return [p for p in (self.mask, self.prob, self.seg, self.meta) if p is not None]


def _outputs(case_id: str, opts: PredictOptions) -> _Outs:
    if not case_id or case_id in (".", "..") or "/" in case_id or "\\" in case_id:
        raise BrainsegError(f"case name {case_id!r} cannot name an output file")
    o = opts.out_dir
    return _Outs(
        o / f"{case_id}_mask.nii.gz",
        o / f"{case_id}_prob.nii.gz" if opts.probabilities else None,
        o / f"{case_id}.json",
        o / f"{case_id}{dicomseg.SUFFIX}" if opts.fmt == dicomseg.FORMAT else None,
    )


def _case_info(vol: volumes.CaseVolume, mask: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    voxels = int(np.count_nonzero(mask))
    axis = volumes.slice_axis(vol.grid.affine)
    per_slice = mask.any(axis=tuple(a for a in range(3) if a != axis))
    return {
        "tumor_voxels": voxels,
        "tumor_volume_ml": volumes.volume_ml(voxels, vol.grid),
        "tumor_slices": int(np.count_nonzero(per_slice)),
        "slices": int(per_slice.size),
        "shape": "x".join(map(str, vol.grid.shape)),
        "spacing_mm": "x".join(f"{v:.4g}" for v in vol.grid.spacing),
        "orientation": vol.grid.axcodes,
        "max_probability": float(prob.max()) if prob.size else 0.0,
    }


def _skipped(case: volumes.Case, outs: _Outs) -> CaseResult:
    res = CaseResult(case.id, status="skipped", mask=str(outs.mask))
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(outs.meta.read_text())
        for k in SUMMARY_COLUMNS:
            if k in saved and k not in ("status", "error", "case"):
                setattr(res, k, saved[k])
    return res


@dataclass
class VolumeFormat:
    """The pipeline's edges for volume cases (see the module docstring)."""

    opts: PredictOptions
    size: tuple[int, int] | None
    post: VolumePost
    metadata: dict[str, Any] | None = None  # the model's (the DICOM SEG names the algorithm)

    def read_cost(self, item: object) -> int:
        """Half the read-ahead budget: at most two cases are read ahead of the model."""
        return pipeline.READ_AHEAD_BYTES // 2

    def prepare(self, case: volumes.Case) -> Prepared | CaseResult:
        try:
            outs = _outputs(case.id, self.opts)
            existing = [p for p in outs.all() if p.exists()]
            done = all(p.exists() for p in (outs.meta, outs.mask, outs.seg) if p is not None)
            if existing and self.opts.skip_existing and done:
                return _skipped(case, outs)
            if existing and not (self.opts.force or self.opts.skip_existing):
                raise BrainsegError(
                    f"{existing[0]} already exists",
                    hint="pass --force to overwrite it or --skip-existing to keep it",
                )
            t0 = time.perf_counter()
            vol = volumes.read_case(case)
            slices = volumes.to_slices(vol.data, vol.grid.affine)  # S x H x W x 3
            x, padded = imageio.to_model_input(slices, self.size, pad=self.opts.pad)
            held = vol.data.nbytes + x.nbytes
            return Prepared(case, outs, x, padded, (vol, slices.shape[1:3], t0), held)
        except BrainsegRuntimeError:
            raise  # disk full, a broken model: stop the run
        except BrainsegError as exc:
            return CaseResult(case.id, status="error", error=exc.message)

    def masks(self, vol: volumes.CaseVolume, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask, probability) on the input grid: eval's post-processing, then min volume."""
        post = self.post.post
        mask = postprocess.apply(prob, post.threshold, post.min_size, post.largest)
        if self.post.min_volume is not None:
            amount, unit = self.post.min_volume
            n = volumes.ceil_voxels(amount, vol.grid) if unit == "mm3" else math.ceil(amount)
            mask = remove_small_3d(mask, n)
        affine = vol.grid.affine
        return volumes.from_slices(mask, affine), volumes.from_slices(prob, affine)

    def finish(self, prep: Prepared, prob: np.ndarray) -> CaseResult:
        vol, size, t0 = prep.data
        case, outs = prep.item, prep.outputs
        try:
            mask, full = self.masks(vol, postprocess.proba_at_size(prob, size, padded=prep.padded))
            res = CaseResult(
                case.id,
                inputs=";".join(str(p) for p in dict.fromkeys(vol.paths)),
                mask=str(outs.mask),
                **_case_info(vol, mask, full),
            )
            if outs.seg is not None:  # first: a series it cannot refer to leaves no file
                info = dicomseg.algorithm_info(self.opts.models, self.metadata)
                series = dicomseg.reference_series(case, self.opts.seg_series)
                dicomseg.write_seg(outs.seg, mask, vol.grid, series, info, force=True)
            if outs.prob is not None:
                volumes.write_nifti(outs.prob, full, vol.grid, kind="prob", force=True)
            volumes.write_nifti(outs.mask, mask, vol.grid, kind="mask", force=True)
            meta = {
                **res.row(),
                "affine": vol.grid.affine.tolist(),
                "voxel_mm3": vol.grid.voxel_mm3,
                "intensity": vol.intensity,
                "postprocess": self.post.as_dict(),
                "probabilities": str(outs.prob) if outs.prob else None,
                **({"dicom_seg": str(outs.seg)} if outs.seg is not None else {}),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            atomic_write_text(outs.meta, json.dumps(json_safe(meta), indent=2) + "\n")
            return res
        except BrainsegRuntimeError:
            raise
        except BrainsegError as exc:
            return CaseResult(case.id, status="error", error=exc.message)


@dataclass
class VolumeKind:
    """Volume cases, found and checked up front (they are few), read whole."""

    noun = "case"
    columns = SUMMARY_COLUMNS
    key = "case"
    hold_failures = True
    settings: dict[str, Any] = field(default_factory=dict)  # the settings applied, for --json

    def check(self, opts: PredictOptions) -> PredictOptions:
        parse_min_volume(opts.min_volume)
        if opts.fmt not in (None, "nifti", dicomseg.FORMAT):
            raise BrainsegError(
                f"--format {opts.fmt!r} is not a volume mask format",
                hint=f"nifti (the default) or {dicomseg.FORMAT} (DICOM series cases)",
            )
        check_choice("--seg-series", opts.seg_series, volumes.CHANNELS)
        if opts.seg_series != dicomseg.REFERENCE_CHANNEL and opts.fmt != dicomseg.FORMAT:
            raise BrainsegError(
                f"--seg-series {opts.seg_series}: only with --format {dicomseg.FORMAT}",
                hint="it names the series a DICOM SEG refers to; NIfTI masks refer to none",
            )
        if opts.fmt == dicomseg.FORMAT:  # one line naming the extra
            require("pydicom", "--format dicom-seg")
            require("highdicom", "--format dicom-seg")
        return opts

    def cases(
        self, opts: PredictOptions, shard: tuple[int, int] | None
    ) -> tuple[list[volumes.Case], int]:
        cases = volumes.find_cases(opts.inputs, opts.channels)
        require("nibabel")  # before the model loads: the masks are NIfTI files
        if any(p.is_dir() for c in cases for p in c.paths):
            require("SimpleITK")  # DICOM series
        if opts.fmt == dicomseg.FORMAT:  # a NIfTI case: one line, exit 2, before any work
            dicomseg.check_cases(cases, opts.seg_series)
        seen: dict[str, volumes.Case] = {}
        for c in cases:
            if c.id in seen:
                c.error = (
                    f"case {c.id} ({', '.join(map(str, c.paths))}) has the same name as "
                    f"{', '.join(map(str, seen[c.id].paths))}: both would write "
                    f"{c.id}_mask.nii.gz"
                )
            seen.setdefault(c.id, c)
        check_layout(cases, opts)
        if shard is not None:
            cases = cases[shard[0] :: shard[1]]
        return cases, len(cases)

    def edges(self, opts: PredictOptions, predictor: Any) -> VolumeFormat:
        if hasattr(predictor, "runtime_info"):  # a test's factory may not say
            console.info(f"runtime {describe(predictor)}")
        meta = dict(getattr(predictor, "metadata", None) or {})
        # options win, then the model's stored settings, then the defaults
        post = VolumePost(opts.resolve(meta).post, parse_min_volume(opts.min_volume))
        self.settings = {
            "models": [str(m) for m in opts.models],
            "channels": volumes.parse_channels(opts.channels),
            "tta": opts.tta,
            **post.as_dict(),
        }
        return VolumeFormat(opts, predictor.image_size, post, meta)

    def failed(self, res: CaseResult) -> None:
        console.error(res.error)


def check_layout(cases: list[volumes.Case], opts: PredictOptions) -> None:
    """Refuse (exit 2, even with --force) an -o folder where ``<case>_mask.nii.gz`` is the
    name of a ground-truth label to eval and score (beside a case or below the cases)."""
    out = opts.out_dir.resolve()
    hint = (
        "choose an -o folder outside the data (e.g. -o masks/); --force and --skip-existing "
        "never write there"
    )
    for item in opts.inputs:
        top = Path(item)
        if top.is_dir() and out.is_relative_to(top.resolve()):
            raise BrainsegError(
                f"output folder {opts.out_dir} is inside the input {top}: masks named "
                "<case>_mask.nii.gz there are ground-truth labels to eval and score "
                "(predictions would overwrite a label or pass for one)",
                hint=hint,
            )
    for case in cases:
        for path in case.paths:
            if path.resolve().parent == out:
                raise BrainsegError(
                    f"output {opts.out_dir / (case.id + '_mask.nii.gz')} is the ground-truth "
                    f"label name of case {case.id} (its input {path} is in {opts.out_dir}): "
                    "predictions would overwrite a label or pass for one",
                    hint=hint,
                )


def predict_volumes(
    opts: PredictOptions, on_case: Callable[[CaseResult], None] | None = None
) -> VolumeResult:
    """Predict this shard's cases; ``on_case`` is called after each (--json lines)."""

    results: list[CaseResult] = []

    def each(res: CaseResult) -> None:
        results.append(res)
        for call in (opts.on_result, on_case):
            if call is not None:
                call(res)

    kind = VolumeKind()
    done = run_cases(replace(opts, on_result=each), kind)
    return VolumeResult(done.counts, done.summary_path, done.written, results, kind.settings)
