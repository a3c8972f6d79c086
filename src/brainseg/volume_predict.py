"""Predict tumour masks for volume cases (NIfTI / DICOM), case by case.

The library side of ``brainseg predict`` on volumes: :func:`predict_volumes` takes a
:class:`VolumeOptions` and returns a :class:`VolumeResult`. Each case is read and checked
(:mod:`brainseg.volumes`), cut into the model's axial slices (LPS,
:func:`brainseg.volumes.to_slices`), predicted with
:meth:`brainseg.predict.Predictor.predict_proba` (which resizes each slice to the model's size
and back), post-processed in 3D, mapped back to the input grid and written as
NIfTI with the input's affine and header:

- ``OUT/<case>_mask.nii.gz`` (uint8 0/1), ``OUT/<case>_prob.nii.gz`` with ``--probabilities``
- ``OUT/<case>.json`` (written last: its presence means the case is done) and
  ``OUT/summary.csv`` (``summary-I-of-N.csv`` for a shard): tumour voxels, volume in mL, slices.

A bad case (missing contrast, not co-registered, 2D, unreadable, several DICOM series, NaNs)
gets one line and no file; the run goes on with the next case.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import postprocess, volumes
from brainseg.batch import lock_name, one_line, parse_shard
from brainseg.checkpoint import check_model_file
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import atomic_write_text, check_target, folder_lock, json_safe

SUMMARY_COLUMNS = (
    "case",
    "status",
    "inputs",
    "mask",
    "tumor_voxels",
    "tumor_volume_ml",
    "tumor_slices",
    "slices",
    "shape",
    "spacing_mm",
    "orientation",
    "max_probability",
    "error",
)

#: Slices per ``predict_proba`` call (bounds the memory of the resized batch).
CHUNK = 32


@dataclass
class VolumeOptions:
    """Settings of one volume prediction run; ``None`` means "from the model's metadata"."""

    models: list[Path]
    inputs: list[str]
    out_dir: Path
    channels: str | None = None  # None: volumes.DEFAULT_CHANNELS
    threshold: float | None = None
    min_size: int | None = None  # 2D components per slice, in pixels (as for slices)
    largest: bool | None = None  # keep the largest 3D component
    min_volume: str | None = None  # 3D components: "N" voxels or "Nmm3"
    probabilities: bool = False
    tta: bool = False
    device: str = "auto"
    batch_size: int = 8
    skip_existing: bool = False
    force: bool = False
    shard: str | None = None
    predictor_factory: Callable[..., Any] | None = None
    #: The engine: (cases, options) -> one CaseResult per case, in order; None = run_case
    #: here, one case after another; :mod:`brainseg.ray_engine` sets its own (a case per task).
    runner: Callable[..., Iterator[CaseResult]] | None = None


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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One printable UTF-8 line each (a name with a newline or invalid UTF-8).
        self.case, self.inputs, self.mask, self.error = map(
            one_line, (self.case, self.inputs, self.mask, self.error)
        )

    def row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in SUMMARY_COLUMNS}


@dataclass
class VolumeResult:
    """What a run did: one :class:`CaseResult` per case, the settings and the summary path."""

    cases: list[CaseResult]
    settings: dict[str, Any]
    summary_path: Path | None = None

    def count(self, status: str) -> int:
        return sum(1 for c in self.cases if c.status == status)

    @property
    def exit_code(self) -> int:
        """0 all done; 2 every case was bad input; 1 some cases failed."""
        bad = self.count("error")
        if not bad:
            return 0
        return 2 if bad == len(self.cases) else 1


# --------------------------------------------------------------------------- options


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
    keep = np.bincount(labels.ravel()) >= min_voxels
    keep[0] = False
    return keep[labels]


@dataclass
class _Post:
    threshold: float
    min_size: int
    largest: bool
    min_volume: tuple[float, str] | None

    def as_dict(self) -> dict[str, Any]:
        mv = None if self.min_volume is None else f"{self.min_volume[0]:g} {self.min_volume[1]}"
        return {
            "threshold": self.threshold,
            "min_size_pixels_per_slice": self.min_size,
            "largest_3d_component": self.largest,
            "min_volume": mv,
        }


def _settings(meta: dict[str, Any], opts: VolumeOptions) -> _Post:
    post = meta.get("postprocess") or {}
    thr = opts.threshold if opts.threshold is not None else meta.get("threshold")
    ms = opts.min_size if opts.min_size is not None else post.get("min_size")
    lg = opts.largest if opts.largest is not None else post.get("largest_component")
    s = _Post(
        threshold=float(postprocess.DEFAULT_THRESHOLD if thr is None else thr),
        min_size=int(ms or 0),
        largest=bool(lg),
        min_volume=parse_min_volume(opts.min_volume),
    )
    if not 0.0 <= s.threshold <= 1.0:
        raise BrainsegError(f"threshold {s.threshold} is outside [0, 1]", hint="e.g. 0.5")
    if s.min_size < 0:
        raise BrainsegError(f"--min-size {s.min_size} is negative", hint="0 (off) or pixels")
    return s


# --------------------------------------------------------------------------- one case


@dataclass
class _Outs:
    mask: Path
    prob: Path | None
    meta: Path

    def all(self) -> list[Path]:
        return [p for p in (self.mask, self.prob, self.meta) if p is not None]


def _outputs(case_id: str, opts: VolumeOptions) -> _Outs:
    if not case_id or case_id in (".", "..") or "/" in case_id or "\\" in case_id:
        raise BrainsegError(f"case name {case_id!r} cannot name an output file")
    o = opts.out_dir
    return _Outs(
        o / f"{case_id}_mask.nii.gz",
        o / f"{case_id}_prob.nii.gz" if opts.probabilities else None,
        o / f"{case_id}.json",
    )


def predict_case(
    predictor: Any, vol: volumes.CaseVolume, post: _Post
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, probability) of a case on its input grid (X x Y x Z bool / float32)."""
    slices = volumes.to_slices(vol.data, vol.grid.affine)  # S x H x W x 3
    prob = np.empty(slices.shape[:3], dtype=np.float32)
    for start in range(0, len(slices), CHUNK):
        part = slices[start : start + CHUNK]
        p = np.asarray(predictor.predict_proba(part), dtype=np.float32)
        if p.shape != part.shape[:3]:
            raise BrainsegRuntimeError(f"the predictor returned {p.shape} for {part.shape[:3]}")
        prob[start : start + len(part)] = p
    # The patient-volume post-processing of eval: threshold, 2D min size, largest 3D.
    mask = postprocess.apply(prob, post.threshold, post.min_size, post.largest)
    if post.min_volume is not None:
        amount, unit = post.min_volume
        n = volumes.ceil_voxels(amount, vol.grid) if unit == "mm3" else math.ceil(amount)
        mask = remove_small_3d(mask, n)
    return (
        volumes.from_slices(mask, vol.grid.affine),
        volumes.from_slices(prob, vol.grid.affine),
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
    try:
        saved = json.loads(outs.meta.read_text())
        for k in SUMMARY_COLUMNS:
            if k in saved and k not in ("status", "error", "case"):
                setattr(res, k, saved[k])
    except (OSError, ValueError):
        pass
    return res


def run_case(
    predictor_fn: Callable[[], Any],
    case: volumes.Case,
    opts: VolumeOptions,
    post_fn: Callable[[], _Post],
) -> CaseResult:
    """Predict and write one case; a bad case comes back as status ``error``, nothing written."""
    try:
        outs = _outputs(case.id, opts)
        existing = [p for p in outs.all() if p.exists()]
        if existing and opts.skip_existing and outs.meta.exists() and outs.mask.exists():
            return _skipped(case, outs)
        if existing and not (opts.force or opts.skip_existing):
            raise BrainsegError(
                f"{existing[0]} already exists",
                hint="pass --force to overwrite it or --skip-existing to keep it",
            )
        vol = volumes.read_case(case)
        predictor, post = predictor_fn(), post_fn()
        t0 = time.perf_counter()
        mask, prob = predict_case(predictor, vol, post)
        info = _case_info(vol, mask, prob)
        res = CaseResult(
            case.id,
            inputs=";".join(str(p) for p in dict.fromkeys(vol.paths)),
            mask=str(outs.mask),
            **info,
        )
        if outs.prob is not None:
            volumes.write_nifti(outs.prob, prob, vol.grid, kind="prob", force=True)
        volumes.write_nifti(outs.mask, mask, vol.grid, kind="mask", force=True)
        meta = {
            **res.row(),
            "affine": vol.grid.affine.tolist(),
            "voxel_mm3": vol.grid.voxel_mm3,
            "intensity": vol.intensity,
            "postprocess": post.as_dict(),
            "probabilities": str(outs.prob) if outs.prob else None,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        atomic_write_text(outs.meta, json.dumps(json_safe(meta), indent=2) + "\n")
        return res
    except BrainsegRuntimeError:
        raise  # disk full, a broken model: stop the run
    except BrainsegError as exc:
        return CaseResult(case.id, status="error", error=exc.message)


# --------------------------------------------------------------------------- the run


def summary_text(rows: list[CaseResult], earlier: Sequence[dict[str, str]] = ()) -> str:
    """The summary CSV: this run's rows, then ``earlier`` rows (of cases it did not handle)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                for k, v in r.row().items()
            }
        )
    for row in earlier:
        w.writerow({c: row.get(c) or "" for c in SUMMARY_COLUMNS})
    return buf.getvalue()


def _earlier_rows(path: Path, cases: list[volumes.Case]) -> list[dict[str, str]]:
    """The rows of an existing summary for cases this run does not handle (kept: a summary
    is never replaced by one that describes less)."""
    ids = {one_line(c.id) for c in cases}
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            return [r for r in csv.DictReader(f) if r.get("case") and r["case"] not in ids]
    except (OSError, csv.Error):
        return []


def _check_options(opts: VolumeOptions) -> tuple[int, int] | None:
    if opts.force and opts.skip_existing:
        raise BrainsegError(
            "--force and --skip-existing cannot be used together",
            hint="--skip-existing keeps finished cases, --force redoes them",
        )
    if opts.batch_size < 1:
        raise BrainsegError(f"--batch-size {opts.batch_size} must be at least 1")
    if not opts.models:
        raise BrainsegError("no MODEL given", hint="pass a .safetensors or .onnx model")
    for m in opts.models:
        check_model_file(m)
    if opts.out_dir.exists() and not opts.out_dir.is_dir():
        raise BrainsegError(f"output {opts.out_dir} is a file, not a folder")
    parse_min_volume(opts.min_volume)
    return parse_shard(opts.shard)


def check_layout(cases: list[volumes.Case], opts: VolumeOptions) -> None:
    """Refuse (exit 2, whatever --force / --skip-existing say) an -o folder where the masks
    would be ground truth: ``<case>_mask.nii.gz`` is the label naming eval and score read
    beside a case's files and anywhere below the cases folder, so a prediction written there
    would overwrite a label or later pass for one."""
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
    opts: VolumeOptions, on_case: Callable[[CaseResult], None] | None = None
) -> VolumeResult:
    """Predict every case of ``opts.inputs`` (this shard's share); see the module docstring.

    ``on_case`` is called after each case (progress, --json lines, one line per bad case).
    """
    shard = _check_options(opts)
    cases = volumes.find_cases(opts.inputs, opts.channels)
    seen: dict[str, volumes.Case] = {}
    for c in cases:
        if c.id in seen:
            c.error = (
                f"case {c.id} ({', '.join(map(str, c.paths))}) has the same name as "
                f"{', '.join(map(str, seen[c.id].paths))}: both would write {c.id}_mask.nii.gz"
            )
        seen.setdefault(c.id, c)
    check_layout(cases, opts)
    if shard is not None:
        cases = cases[shard[0] :: shard[1]]
    name = "summary" if shard is None else f"summary-{shard[0]}-of-{shard[1]}"
    summary_path = opts.out_dir / f"{name}.csv"
    _check_summary(summary_path, opts)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(opts.out_dir, lock_name(shard), "brainseg predict"):
        _check_summary(summary_path, opts)  # an earlier run may have finished meanwhile
        if shard is not None and not cases and not summary_path.exists():
            # an empty shard still leaves its (empty) summary: --merge then knows it ran
            atomic_write_text(summary_path, summary_text([]))
        return _run_cases(opts, cases, summary_path, on_case)


def _check_summary(summary_path: Path, opts: VolumeOptions) -> None:
    check_target(summary_path, force=True)
    if summary_path.exists() and not (opts.force or opts.skip_existing):
        raise BrainsegError(
            f"{summary_path} already exists (an earlier run wrote to {opts.out_dir})",
            hint="pass --skip-existing to resume that run, --force to redo it",
        )


def _run_cases(
    opts: VolumeOptions,
    cases: list[volumes.Case],
    summary_path: Path,
    on_case: Callable[[CaseResult], None] | None,
) -> VolumeResult:
    earlier = _earlier_rows(summary_path, cases)
    state: dict[str, Any] = {}

    def predictor() -> Any:
        if "p" not in state:
            factory: Callable[..., Any] | None = opts.predictor_factory
            if factory is None:
                from brainseg.predict import Predictor

                factory = Predictor
            state["p"] = factory(
                [Path(m) for m in opts.models],
                device=opts.device,
                batch_size=opts.batch_size,
                tta=opts.tta,
            )
        return state["p"]

    def post() -> _Post:
        if "s" not in state:
            state["s"] = _settings(dict(getattr(predictor(), "metadata", None) or {}), opts)
        return state["s"]

    results: list[CaseResult] = []
    if opts.runner is not None:
        each: Iterator[CaseResult] = opts.runner(cases, opts)
    else:
        each = (run_case(predictor, case, opts, post) for case in cases)
    for res in each:
        results.append(res)
        if any(r.status != "error" for r in results):
            atomic_write_text(summary_path, summary_text(results, earlier))
        if on_case is not None:
            on_case(res)
    settings = {
        "models": [str(m) for m in opts.models],
        "channels": volumes.parse_channels(opts.channels),
        "tta": opts.tta,
        **(state["s"].as_dict() if "s" in state else {}),
    }
    written = summary_path if summary_path.exists() and results else None
    return VolumeResult(results, settings, written)


def json_row(res: CaseResult) -> dict[str, Any]:
    """The --json line of one case."""
    return json_safe({k: v for k, v in asdict(res).items() if k != "extra"})
