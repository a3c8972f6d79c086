"""ONNX export of a brainseg checkpoint, checked against PyTorch; fp16 and static int8 variants.

The exported graph takes ``image``: float32 N x 3 x H x W raw pixel values in [0, 255] (the
normalisation is inside the model) and returns ``logits``: float32 N x 1 x H x W, with the
batch, height and width axes dynamic (H and W multiples of 32). Everything a deployer needs
(image size, threshold, post-processing, normalisation, architecture, brainseg version and
training metrics) is stored in the file's ``metadata_props`` (:func:`set_metadata`).

Modules: :mod:`~brainseg.export.run` (the job: options in, report out),
:mod:`~brainseg.export.graph` (torch -> fp32 ONNX, metadata),
:mod:`~brainseg.export.variants` (fp16, int8), :mod:`~brainseg.export.verify` (checks on
predict's backends), :mod:`~brainseg.export.report` (the report and its tables),
:mod:`~brainseg.export.cpu` (this CPU's int8 instruction path).
"""

from __future__ import annotations

from collections.abc import Sequence

from brainseg.export.graph import set_metadata, torch_to_onnx
from brainseg.export.report import (
    ExportCheckFailed,
    ExportReport,
    int8_rows,
    int8_title,
    report_rows,
    report_title,
)
from brainseg.export.run import (
    DEFAULT_CALIB_SLICES,
    DEFAULT_OPSET,
    MIN_OPSET,
    ExportOptions,
    check_export_args,
    export_onnx,
)
from brainseg.export.variants import convert_fp16, quantize_int8, split_at_first_conv
from brainseg.export.verify import (
    INT8_DICE_TOLERANCE,
    MASK_AGREEMENT_FLOOR,
    VERIFY_SLICES,
    pick_rows,
)

__all__: Sequence[str] = [
    "DEFAULT_CALIB_SLICES",
    "DEFAULT_OPSET",
    "INT8_DICE_TOLERANCE",
    "MASK_AGREEMENT_FLOOR",
    "MIN_OPSET",
    "VERIFY_SLICES",
    "ExportCheckFailed",
    "ExportOptions",
    "ExportReport",
    "check_export_args",
    "convert_fp16",
    "export_onnx",
    "int8_rows",
    "int8_title",
    "pick_rows",
    "quantize_int8",
    "report_rows",
    "report_title",
    "set_metadata",
    "split_at_first_conv",
    "torch_to_onnx",
]
