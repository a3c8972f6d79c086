"""Helpers for the volume tests: a tiny ONNX model, NIfTI / DICOM writers, the CLI in-process."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: The real-data patients the volume tests use (the two with the fewest slices).
PATIENTS = ("TCGA_HT_7602_19951103", "TCGA_HT_8107_19980708")
#: A plausible MRI grid: 0.5 x 0.5 mm in-plane, 3 mm slices, RAS, not at the origin.
RAS = np.array(
    [[0.5, 0, 0, -64.0], [0, 0.5, 0, -58.5], [0, 0, 3.0, -21.0], [0, 0, 0, 1.0]], dtype=np.float64
)


def conv_onnx(path: Path, image_size: int | None = 256, largest: bool = False) -> Path:
    """A brainseg ONNX model of one asymmetric 3x3 convolution over all three channels.

    Every channel and both in-plane directions change its output, so a swapped contrast, a
    transposed or a flipped slice gives other masks (what the equality tests must catch).
    """
    import onnx
    from onnx import TensorProto, helper

    w = np.zeros((1, 3, 3, 3), dtype=np.float32)
    w[0, 0, 1, 1] = -0.01  # pre-contrast
    w[0, 1, 1, 1] = 0.05  # FLAIR
    w[0, 2, 1, 1] = 0.02  # post-contrast
    w[0, 1, 0, 2] = 0.015  # up-right neighbour of FLAIR: breaks flip / transpose symmetry
    w[0, 2, 2, 1] = -0.01
    b = np.array([-9.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1, 1, 1, 1])],
        "conv3",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, "h", "w"])],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, b.shape, b.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "image_size": image_size,
        "threshold": 0.5,
        "postprocess": {"min_size": 0, "largest_component": largest},
        "normalization": "imagenet",
        "format_version": 1,
    }
    entry = model.metadata_props.add()
    entry.key, entry.value = "brainseg", json.dumps(meta)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = RAS) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def save_case(folder: Path, case: str, data: np.ndarray, affine: np.ndarray = RAS) -> Path:
    """Three 3D files ``<case>_t1 / _flair / _t1ce.nii.gz`` (the default --channels)."""
    for i, name in enumerate(("t1", "flair", "t1ce")):
        save_nifti(folder / f"{case}_{name}.nii.gz", data[..., i], affine)
    return folder


def save_dicom_series(
    folder: Path,
    volume: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.5, 0.5, 3.0),
    origin_lps: tuple[float, float, float] = (64.0, 58.5, -21.0),
    series_uid: str | None = None,
    start: int = 0,
) -> Path:
    """A uint8 X x Y x Z volume on an RAS-diagonal grid as a pydicom MR series.

    The DICOM rows run along +A and the columns along +R (LPS cosines (-1,0,0), (0,-1,0)),
    so SimpleITK reads it back with a positive diagonal RAS affine.
    """
    return save_dicom_slices(
        folder,
        np.ascontiguousarray(volume.transpose(2, 1, 0)),  # slice k: rows = y, columns = x
        iop=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        spacing=spacing,
        origin_lps=origin_lps,
        series_uid=series_uid,
        start=start,
    )


def save_dicom_slices(
    folder: Path,
    slices: np.ndarray,
    *,
    iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    spacing: tuple[float, float, float] = (0.5, 0.5, 3.0),
    origin_lps: tuple[float, float, float] = (-64.0, -58.5, -21.0),
    series_uid: str | None = None,
    start: int = 0,
) -> Path:
    """S x H x W uint8 images as a pydicom MR series, one file per image, as a scanner writes.

    ``iop`` is ImageOrientationPatient (the LPS directions of a row and of a column); the
    default is the plain axial one, in which each image is shown as the scanner acquired it:
    top = anterior, left of the image = the patient's right. Slice k sits ``k * spacing[2]``
    mm along the normal (row x column). ``spacing`` = (column, row, slice) in mm.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), series_uid or generate_uid()
    frame = generate_uid()
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    for k in range(slices.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "TEST", "Test^Volume"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = start + k + 1
        ds.ImageOrientationPatient = [float(v) for v in iop]
        position = np.asarray(origin_lps) + normal * spacing[2] * k
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (between rows), column spacing
        ds.SliceThickness = spacing[2]
        pixels = np.ascontiguousarray(slices[k].astype(np.uint8))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels.tobytes()
        try:
            ds.save_as(folder / f"slice{start + k:04d}.dcm", enforce_file_format=True)
        except TypeError:  # pydicom 2.x
            ds.save_as(folder / f"slice{start + k:04d}.dcm", write_like_original=False)
    return folder


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def make_runner(capsys: pytest.CaptureFixture[str]) -> Any:
    def _run(args: list[Any]) -> Result:
        from brainseg import console
        from brainseg.cli.app import main

        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
        finally:
            console.configure(quiet=False, json_mode=False, debug=False)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return _run


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img: Any = nib.load(str(path))
    return np.asanyarray(img.dataobj), np.asarray(img.affine)


def blob_volume(seed: int = 0, shape: tuple[int, int, int] = (64, 64, 6)) -> np.ndarray:
    """X x Y x Z x 3 uint8 with a bright FLAIR blob (the tiny model's tumour)."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 60, size=(*shape, 3), dtype=np.uint8)
    v[20:36, 24:40, 1:4, 1] = 220
    return v


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
