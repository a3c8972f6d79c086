"""Score a folder of predicted masks against a folder of true masks, without a model.

The library side of ``brainseg score`` (as nnU-Net's ``evaluate_folder``): predictions from any
tool are matched to the truth by name and measured as ``brainseg eval`` measures, into the
same files.

- **Volumes**: NIfTI files matched by case name (the file name without ``.nii[.gz]`` and a
  trailing ``_mask`` / ``_seg`` / ``_pred`` / ``_gt`` / ``_label``). Rows are the axial slices
  of the model's LPS orientation (the slices brainseg predicts); HD95 and surface Dice are
  also reported in mm from the voxel spacing.
- **Slices**: TIF/PNG masks matched by name (``<stem>_mask.tif`` or ``<stem>.png``...) and
  stacked into patients: the patient is the true mask's folder, the slice order the number at
  the end of its name (``TCGA_..._12``). Distances are in pixels.

Surface metrics go to ``surface.csv`` (one row per patient, each value with its unit) and to
``summary.json["surface"]``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from brainseg import __version__, console
from brainseg.data import imageio, volumes
from brainseg.data.split import select_patients
from brainseg.data.volumes import is_nifti, nifti_stem
from brainseg.errors import BrainsegError
from brainseg.evaluation import metrics
from brainseg.evaluation.runfolder import EvalResult, rows_to_csv, write_run
from brainseg.fsutil import atomic_write_text

#: Name endings dropped to find a file's case / slice key.
_SUFFIXES = re.compile(r"(_mask|_seg|_pred|_gt|_label)$", re.IGNORECASE)
#: Predicted files that are not masks (brainseg predict's extra outputs).
_NOT_MASKS = re.compile(r"_(prob|overlay)$", re.IGNORECASE)
#: Name endings of MRI contrasts (``<case>_t1.nii.gz``, ``_flair``...): inputs, never truth.
_CONTRAST = re.compile(r"_(t1|t1c|t1ce|t1gd|t2|t2w|t1w|flair|pre|post|adc|dwi)$", re.IGNORECASE)
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
SURFACE_COLUMNS = ["patient_id", "hd95", "hd95_unit", "nsd", "nsd_tolerance", "nsd_unit"]


@dataclass
class ScoreOptions:
    """What to score: ``pred`` against ``gt``; ``tolerance`` of the surface Dice (mm or px)."""

    pred: Path
    gt: Path
    tolerance: float = 2.0
    allow_missing: bool = False  # a case without a prediction scores as an empty prediction
    #: Volumes: only label-named NIfTI files of --gt are truth (``<case>_seg.nii.gz``...), so
    #: --gt may be the folder of the cases themselves (``brainseg eval`` on volumes).
    truth_only: bool = False
    #: Only these patients / cases (``--split`` / ``--subset`` / ``--fold``, as eval picks them).
    split: Path | None = None
    subset: str | None = None
    fold: int | None = None
    #: Only the patients / cases with at least one prediction in --pred.
    only_predicted: bool = False
    #: Slices whose true masks are not scored (by key, the file stem without ``_mask``):
    #: those eval left out with ``--skip-bad``.
    leave_out: frozenset[str] = frozenset()


@dataclass
class ScoredPatient:
    """One patient's (case's) masks as scored, in the model's axial slices."""

    patient_id: str
    pred: np.ndarray  # S x H x W bool
    gt: np.ndarray
    slice_number: np.ndarray
    spacing: tuple[float, float, float] | None  # mm along (slice, row, column)


@dataclass
class ScoreResult:
    """The report and summary (eval's format), the surface rows and the written files."""

    report: metrics.Report
    summary: dict[str, Any]
    surface: list[dict[str, Any]]
    #: The masks as read, patient by patient (eval tunes and draws from them).
    patients: list[ScoredPatient] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- matching
def case_key(name: str) -> str:
    """The case / slice a mask file is of: its name without suffix and ``_mask`` (etc.)."""
    stem = nifti_stem(name) if is_nifti(name) else os.path.splitext(name)[0]
    return _SUFFIXES.sub("", stem)


def _walk(top: Path, keep: Any) -> Iterator[Path]:
    """Files below ``top`` that ``keep`` accepts, sorted; symlinked folders are followed (as
    predict and split do), a folder already seen through another link is not entered again."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and keep(f):
                yield Path(folder) / f


def _index(files: Sequence[Path], side: str, top: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        k = case_key(f.name)
        if _NOT_MASKS.search(k):
            continue
        if k in out:
            raise BrainsegError(
                f"{side} folder {top}: {out[k]} and {f} are both masks of {k!r}",
                hint="one mask per case / slice in each folder",
            )
        out[k] = f
    return out


def _select(
    opts: ScoreOptions, pred: dict[str, Path], gt: dict[str, Path], patient: Any
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The true masks to score: of the split's patients (``--split``), of the patients with a
    prediction (``--only-predicted``); ``patient(key)`` is a true mask's patient / case.
    Also returns summary.json's description of the choice (split, subset, fold)."""
    sel: dict[str, Any] = {"split": None, "subset": "all", "fold": None}
    if opts.split is not None or opts.subset is not None or opts.fold is not None:
        names = {k: patient(k) for k in gt}
        ids, sel = select_patients(sorted(set(names.values())), opts.split, opts.subset, opts.fold)
        keep = set(ids)
        gt = {k: v for k, v in gt.items() if names[k] in keep}
    if opts.only_predicted:
        predicted = {patient(k) for k in gt if k in pred}
        if not predicted:
            raise BrainsegError(
                f"no prediction in {opts.pred} matches a true mask in {opts.gt}",
                hint="predict the cases first (brainseg predict MODEL DATA -o PRED)",
            )
        gt = {k: v for k, v in gt.items() if patient(k) in predicted}
    return gt, {**sel, "only_predicted": opts.only_predicted}


def _match(
    opts: ScoreOptions, pred: dict[str, Path], gt: dict[str, Path], every_gt: dict[str, Path]
) -> list[str]:
    """The keys to score; ``every_gt`` (before --split / --only-predicted) decides which
    predictions have no true mask at all (warned about)."""
    missing = [k for k in gt if k not in pred]
    if missing and not opts.allow_missing:
        raise BrainsegError(
            f"{len(missing)} of {len(gt)} true mask(s) have no prediction in {opts.pred} "
            f"(first: {missing[0]!r}, from {gt[missing[0]]})",
            hint="predict them, or pass --allow-missing to score them as empty predictions",
        )
    extra = [k for k in pred if k not in every_gt]
    if extra:
        console.warn(
            f"{len(extra)} prediction(s) in {opts.pred} have no true mask and are ignored "
            f"(first: {pred[extra[0]].name})"
        )
    return sorted(gt)


# --------------------------------------------------------------------------- reading
def _volume_pairs(opts: ScoreOptions) -> tuple[list[ScoredPatient], dict[str, Any]]:
    files = list(_walk(opts.gt, volumes.is_nifti))
    labels = [f for f in files if volumes.is_truth_name(f)]
    # eval's label rule: label-named files are the truth; a folder of plain masks
    # (``<case>.nii.gz``) counts only when it has no label-named file and no contrast
    plain = [f for f in files if not _CONTRAST.search(nifti_stem(f))]
    truth = labels if (labels or opts.truth_only) else plain
    gt = _index(truth, "truth", opts.gt)
    pred = _index(list(_walk(opts.pred, volumes.is_nifti)), "prediction", opts.pred)
    if not gt:
        raise BrainsegError(
            f"no label volume in {opts.gt} (names ending in _seg / _mask / _gt / _label"
            f"{'' if opts.truth_only else ', or NIfTI masks named by case'}; MRI contrasts "
            "such as _t1 / _flair are never truth)",
            hint="pass the folder of true masks with --gt",
        )
    every = gt
    gt, sel = _select(opts, pred, gt, lambda k: k)
    pairs = []
    for k in _match(opts, pred, gt, every):
        g, grid = volumes.read_mask_volume(gt[k])
        if k in pred:
            p, pgrid = volumes.read_mask_volume(pred[k])
            if p.shape != g.shape or not np.allclose(pgrid.affine, grid.affine, atol=1e-3):
                raise BrainsegError(
                    f"case {k}: prediction {pred[k]} ({'x'.join(map(str, p.shape))}) is not on "
                    f"the grid of the truth {gt[k]} ({'x'.join(map(str, g.shape))}; shape or "
                    "affine differ)",
                    hint="resample the prediction onto the truth's grid first",
                )
        else:
            p = np.zeros_like(g)
        ps = volumes.to_slices(p, grid.affine)
        gs = volumes.to_slices(g, grid.affine)
        snum = np.arange(1, len(gs) + 1)
        pairs.append(ScoredPatient(k, ps, gs, snum, volumes.slice_spacing(grid)))
    return pairs, sel


def _read_mask(path: Path) -> np.ndarray:
    return np.asarray(imageio.read_image(path))[..., 0] > 0


def _masks(top: Path) -> list[Path]:
    """The mask images of a folder: its ``*_mask.*`` (etc.) files if it has any, else all."""
    files = list(_walk(top, lambda name: name.lower().endswith(_IMAGE_SUFFIXES)))
    masks = [f for f in files if _SUFFIXES.search(os.path.splitext(f.name)[0])]
    return masks or files


def _slice_pairs(opts: ScoreOptions) -> tuple[list[ScoredPatient], dict[str, Any]]:
    gt = _index(_masks(opts.gt), "truth", opts.gt)
    gt = {k: v for k, v in gt.items() if k not in opts.leave_out}
    pred = _index(_masks(opts.pred), "prediction", opts.pred)
    if not gt:
        raise BrainsegError(
            f"no true masks in {opts.gt} (looked for .nii/.nii.gz volumes and .tif/.png masks)",
            hint="pass the folder of true masks as --gt (e.g. a kaggle_3m folder)",
        )

    def patient(k: str) -> str:
        rel = gt[k].parent.relative_to(opts.gt)
        return rel.as_posix() if rel.parts else opts.gt.name

    every = gt
    gt, sel = _select(opts, pred, gt, patient)
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, k in enumerate(_match(opts, pred, gt, every)):
        number = re.search(r"(\d+)$", k)  # the slice order; else the key's order
        groups.setdefault(patient(k), []).append((int(number.group(1)) if number else i, k))
    pairs = []
    for pid, items in sorted(groups.items()):
        items.sort()
        g = np.stack([_read_mask(gt[k]) for _, k in items])
        p = np.stack(
            [_read_mask(pred[k]) if k in pred else np.zeros(g.shape[1:], bool) for _, k in items]
        )
        if p.shape != g.shape:
            raise BrainsegError(
                f"patient {pid}: predicted masks are {p.shape[1]}x{p.shape[2]}, the true ones "
                f"{g.shape[1]}x{g.shape[2]}",
                hint="predict at the images' size (brainseg predict writes it)",
            )
        pairs.append(ScoredPatient(pid, p, g, np.array([n for n, _ in items]), None))
    return pairs, sel


# --------------------------------------------------------------------------- scoring
def _surface(pair: ScoredPatient, tolerance: float) -> dict[str, Any]:
    unit = "mm" if pair.spacing is not None else "pixels"
    return {
        "patient_id": pair.patient_id,
        "hd95": metrics.hd95(pair.pred, pair.gt, spacing=pair.spacing),
        "hd95_unit": unit,
        "nsd": metrics.surface_dice(pair.pred, pair.gt, tolerance, pair.spacing),
        "nsd_tolerance": float(tolerance),
        "nsd_unit": unit,
    }


def score_folders(opts: ScoreOptions) -> ScoreResult:
    """Match, read and measure; no files are written (see :func:`write_score`)."""
    for side, path in (("--pred", opts.pred), ("--gt", opts.gt)):
        if not path.is_dir():
            raise BrainsegError(f"{side} {path} is not a folder", hint="pass a folder of masks")
    if not (math.isfinite(opts.tolerance) and opts.tolerance >= 0):
        raise BrainsegError(f"--tolerance {opts.tolerance} must be >= 0", hint="e.g. 2 (mm)")

    volume_mode = next(_walk(opts.gt, is_nifti), None) is not None
    pairs, sel = _volume_pairs(opts) if volume_mode else _slice_pairs(opts)
    reports = [
        metrics.evaluate(p.pred, p.gt, np.zeros(len(p.gt), int), p.slice_number, [p.patient_id])
        for p in pairs
    ]
    report = metrics.report_from_rows(
        [r for rep in reports for r in rep.per_slice],
        [r for rep in reports for r in rep.per_patient],
        sum(int(p.gt.size) for p in pairs),
    )
    surface = [_surface(p, opts.tolerance) for p in pairs]
    unit = "mm" if volume_mode else "pixels"
    summary: dict[str, Any] = {
        "brainseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": [],
        "pred": str(opts.pred),
        "gt": str(opts.gt),
        "data": str(opts.gt),
        "mode": "volumes" if volume_mode else "slices",
        **sel,
        "settings": {"allow_missing": opts.allow_missing, "hd95_unit": "pixels"},
        **report.summary(),
        "surface": {
            "unit": unit,
            "nsd_tolerance": float(opts.tolerance),
            "hd95": metrics.describe([r["hd95"] for r in surface]),
            "nsd": metrics.describe([r["nsd"] for r in surface]),
            "note": "per patient; the hd95 of per_patient.csv is in pixels (the slice axis "
            "counts as one), this one in " + unit,
        },
    }
    return ScoreResult(report, summary, surface, pairs)


def write_score(result: ScoreResult, run_dir: Path) -> list[Path]:
    """surface.csv, then eval's files (summary.json, per_patient.csv, per_slice.csv, plot)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    surface = atomic_write_text(
        run_dir / "surface.csv", rows_to_csv(result.surface, SURFACE_COLUMNS)
    )
    ev = EvalResult(report=result.report, summary=result.summary, settings=cast(Any, None))
    result.files = [surface, *write_run(ev, run_dir)]
    return result.files
