"""ONNX export of a brainseg checkpoint, checked against PyTorch; fp16 and static int8 variants.

The exported graph takes ``image``: float32 N x 3 x H x W raw pixel values in [0, 255] (the
normalisation is inside the model) and returns ``logits``: float32 N x 1 x H x W, with the
batch, height and width axes dynamic (H and W multiples of 32). Everything a deployer needs
(image size, threshold, post-processing, normalisation, architecture, brainseg version and
training metrics) is stored in the file's ``metadata_props`` (:func:`set_metadata`).
"""

from __future__ import annotations

from brainseg.export.report import ExportCheckFailed, ExportReport
from brainseg.export.run import ExportOptions, export_onnx

__all__ = ["ExportCheckFailed", "ExportOptions", "ExportReport", "export_onnx"]
