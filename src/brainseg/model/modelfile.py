"""What a model file holds, from its first bytes (never its name): the one sniffing rule that
checkpoint loading, the backends, export and the Hub download check share."""

from __future__ import annotations

import os
import struct

#: Largest header length :func:`sniff_model_file` takes for safetensors (safetensors' own limit).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: What :func:`sniff_model_file` can say, and how a message names it.
FILE_KINDS = {
    "safetensors": "a safetensors checkpoint",
    "onnx": "an ONNX model",
    "pickle": "a PyTorch pickle (.pth/.pt)",
    "zip": "a zip archive (a PyTorch .pth/.pt is one)",
    "text": "a text file",
    "empty": "an empty file",
    "unknown": "not a model file brainseg knows",
}


def sniff_model_file(path: str | os.PathLike[str]) -> str:
    """Which of ``FILE_KINDS`` ``path`` holds, from its first bytes (never its name); OSError
    when the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if _is_onnx_head(head):
        return "onnx"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unknown"


def _is_onnx_head(head: bytes) -> bool:
    """A ModelProto starts with ``ir_version`` (tag 0x08, a small varint), then another field
    of the message (producer_name 0x12, ..., graph 0x3a, opset_import 0x42)."""
    if len(head) < 3 or head[0] != 0x08 or not 1 <= head[1] <= 20:
        return False
    return head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42, 0x4A, 0x52, 0x5A, 0x62, 0x72)
