"""DICOM Segmentation (SEG) out: a case's mask as a DICOM object that refers to its series.

``--format dicom-seg`` writes, beside each case's NIfTI mask, ``OUT/<case>_seg.dcm``: a
BINARY highdicom Segmentation with one segment "tumour" (algorithm AUTOMATIC: brainseg, the
model file(s) and card name) that a PACS, 3D Slicer or OHIF shows on the case's FLAIR series
(``--seg-series`` names another). Frames without tumour are omitted; an empty mask keeps
every (empty) frame, since a Segmentation needs at least one. Each source image is placed on
the case's grid by its own ImagePositionPatient, never by file order or name.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import __version__
from brainseg.data.volumes import read_dicom_series
from brainseg.errors import BrainsegError, first_line
from brainseg.fsutil import atomic_write_bytes, one_line
from brainseg.model.card import card_from_metadata

#: ``--format`` value that asks for DICOM SEG; the volume default stays NIfTI.
FORMAT = "dicom-seg"
#: The contrast whose DICOM series the SEG refers to (the tumour is its FLAIR abnormality).
REFERENCE_CHANNEL = "flair"
#: The SEG's file name after the case name: ``OUT/<case>_seg.dcm``.
SUFFIX = "_seg.dcm"
#: (code value, coding scheme, meaning) of the segment's category and type (SNOMED CT).
CATEGORY = ("49755003", "SCT", "Morphologically abnormal structure")
PROPERTY_TYPE = ("108369006", "SCT", "Neoplasm")
SEGMENT_LABEL = "tumour"
SERIES_NUMBER = 1000
#: Type 2 attributes of the source images that highdicom copies (present, possibly empty): an
#: anonymised series often lacks some, and an empty value is what the standard asks for.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
#: Largest distance (in voxels) of a source image's position from a grid slice.
POSITION_TOL = 0.01

_HINT = (
    "a DICOM SEG refers to the DICOM series it was computed from: pass the case as DICOM "
    "series folders (--channels 'pre=...,flair=...,post=...'), or drop --format dicom-seg "
    "for NIfTI masks"
)


def reference_series(case: Any, channel: str = REFERENCE_CHANNEL) -> Path:
    """The DICOM series folder a case's SEG refers to; BrainsegError when it has none."""
    if case.four_d is not None:
        raise BrainsegError(
            f"--format {FORMAT}: case {case.id} ({case.four_d}) is a NIfTI file, not a DICOM "
            "series",
            hint=_HINT,
        )
    src = case.sources.get(channel)
    if src is None:
        raise BrainsegError(f"--format {FORMAT}: case {case.id} has no {channel}")
    if not Path(src).is_dir():
        raise BrainsegError(
            f"--format {FORMAT}: case {case.id}: its {channel} {src} is a NIfTI file, "
            "not a DICOM series",
            hint=_HINT,
        )
    return Path(src)


def check_cases(cases: Iterable[Any], channel: str = REFERENCE_CHANNEL) -> None:
    """Before any work: every readable case has a DICOM series to refer to (else exit 2)."""
    for case in cases:
        if case.error and case.four_d is None and channel not in case.sources:
            continue
        reference_series(case, channel)


def read_series(folder: Path) -> list[Any]:
    """The datasets (headers, no pixels) of the files SimpleITK reads as ``folder``'s series."""
    import pydicom
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        read_dicom_series(folder)  # its one-line error (no series, several series)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for a damaged file
            raise BrainsegError(f"{one_line(f)}: cannot be read ({first_line(exc, 160)})") from exc
        for key in TYPE2_COPIED:
            if key not in ds:
                setattr(ds, key, "")
        out.append(ds)
    return out


def source_frames(mask: np.ndarray, grid: Any, datasets: Sequence[Any]) -> np.ndarray:
    """N x Rows x Columns: the mask (X x Y x Z on ``grid``, as SimpleITK read the series) on
    each source image, placed by its ImagePositionPatient through the grid's inverse affine."""
    # the grid's affine in DICOM's LPS patient coordinates (volumes.Grid holds RAS)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(grid.affine, dtype=np.float64)
    inv = np.linalg.inv(lps)
    cosines = lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)
    shape = mask.shape
    frames = np.zeros((len(datasets), shape[1], shape[0]), dtype=bool)
    used: dict[int, str] = {}
    for n, ds in enumerate(datasets):
        where = f"{ds.filename}" if getattr(ds, "filename", None) else f"image {n}"
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise BrainsegError(
                f"{one_line(where)}: a multi-frame DICOM image; --format {FORMAT} refers to "
                "series of single-frame images",
            )
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if (int(ds.Rows), int(ds.Columns)) != (shape[1], shape[0]) or not (
            np.allclose(iop[:3], cosines[:, 0], atol=1e-4)
            and np.allclose(iop[3:], cosines[:, 1], atol=1e-4)
        ):
            raise BrainsegError(
                f"{one_line(where)}: its size or orientation differs from the series grid "
                f"({ds.Rows}x{ds.Columns}, {list(iop)})",
                hint="a series for DICOM SEG must have one size and one orientation",
            )
        ijk = inv @ np.array([*(float(v) for v in ds.ImagePositionPatient), 1.0])
        k = round(float(ijk[2]))
        off = max(abs(ijk[0]), abs(ijk[1]), abs(ijk[2] - k))
        if off > POSITION_TOL or not 0 <= k < shape[2]:
            raise BrainsegError(
                f"{one_line(where)}: its ImagePositionPatient lies on no slice of the series "
                f"grid (voxel {ijk[0]:.3g}, {ijk[1]:.3g}, {ijk[2]:.3g})",
                hint="the series is unevenly spaced: a SEG needs evenly spaced parallel images "
                "(resample the series, or drop --format dicom-seg for the NIfTI mask)",
            )
        if k in used:
            raise BrainsegError(
                f"{one_line(where)}: the same position as {one_line(used[k])}",
                hint="one image per slice position",
            )
        used[k] = where
        frames[n] = mask[:, :, k].T
    if len(used) != shape[2]:
        raise BrainsegError(f"{len(used)} image(s) for the {shape[2]} slices of the series")
    return frames


def algorithm_info(models: Sequence[Path | str], metadata: dict[str, Any] | None) -> dict[str, str]:
    """What the SEG says made it: brainseg's version, the model file(s), the card's name."""
    meta = dict(metadata or {})
    card = meta.get("model_card")
    if not isinstance(card, dict):
        try:
            card = card_from_metadata(meta)
        except Exception:  # a foreign or minimal metadata: no card name, still a SEG
            card = {}
    return {
        "name": "brainseg",
        "version": __version__,
        "model": "+".join(Path(m).name for m in models),
        "card": str(card.get("name") or ""),
    }


def _lo(text: str) -> str:
    """A DICOM LO value: one line, at most 64 characters, no backslash."""
    return one_line(text).replace("\\", "/")[:64]


def build_seg(mask: np.ndarray, grid: Any, datasets: Sequence[Any], info: dict[str, str]) -> Any:
    """The highdicom Segmentation of ``mask`` (X x Y x Z on ``grid``) over ``datasets``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    frames = source_frames(mask, grid, datasets)
    params = {"model": info["model"]}
    if info.get("card"):
        params["card"] = info["card"]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(info["name"]),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(info["version"]),
        source=_lo(info["model"]),
        parameters={k: one_line(v).replace(",", ";") for k, v in params.items()},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=Code(*CATEGORY),
        segmented_property_type=Code(*PROPERTY_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    return hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="brainseg",
        manufacturer_model_name=_lo(info["model"]),
        software_versions=_lo(f"brainseg {info['version']}"),
        device_serial_number=_lo(info["version"]),
        content_label="TUMOUR",
        content_description=_lo(f"brainseg tumour segmentation ({info['model']})"),
        series_description=_lo(f"brainseg tumour ({info['model']})"),
        # Frames without tumour are left out; an empty mask keeps them all (at least one).
        omit_empty_frames=bool(frames.any()),
    )


def write_seg(
    path: Path,
    mask: np.ndarray,
    grid: Any,
    series: Path,
    info: dict[str, str],
    *,
    force: bool = True,
) -> Path:
    """Write the SEG of ``mask`` over the DICOM folder ``series`` to ``path`` atomically."""
    seg = build_seg(mask, grid, read_series(series), info)
    buf = io.BytesIO()
    try:
        seg.save_as(buf, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        seg.save_as(buf, write_like_original=False)
    return atomic_write_bytes(path, buf.getvalue(), force=force)
