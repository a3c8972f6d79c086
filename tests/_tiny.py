"""Small, fast stand-ins shared by the reliability tests: a tiny ONNX model, tiny images.

The tiny ONNX model is a real brainseg-compatible graph (``image`` float N x 3 x H x W ->
``logits`` N x 1 x H x W, brainseg metadata) made of one 1x1 convolution, so predict runs
through the real CLI and engine at thousands of files per minute on a CPU. Its logit is a
linear function of the FLAIR channel, so masks hold both values on phantoms.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np


def tiny_onnx(path: Path, image_size: int | None = 64, threshold: float = 0.5) -> Path:
    """Write a one-convolution brainseg ONNX model to ``path`` (onnx only, no torch)."""
    import onnx
    from onnx import TensorProto, helper

    w = np.zeros((1, 3, 1, 1), dtype=np.float32)
    w[0, 1, 0, 0] = 0.1  # the FLAIR channel: bright pixels are "tumor"
    b = np.array([-10.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"])],
        "tiny",
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
        "threshold": threshold,
        "postprocess": {"min_size": 0, "largest_component": False},
        "normalization": "imagenet",
        "format_version": 1,
    }
    for k, v in {"brainseg": json.dumps(meta), "threshold": repr(threshold)}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def image(seed: int, size: int = 64) -> np.ndarray:
    """A phantom-like HxWx3 uint8 image: a bright disc on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    r = rng.integers(size // 10, size // 4)
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    return img


def encode(arr: np.ndarray, fmt: str) -> bytes:
    """``arr`` as the bytes of a .tif, .png or .jpg file."""
    if fmt == "tif":
        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, photometric="rgb" if arr.ndim == 3 else "minisblack")
        return buf.getvalue()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt])
    return buf.getvalue()


def write_images(folder: Path, n: int, size: int = 64, fmt: str = "png") -> list[Path]:
    """``n`` small images ``img00000.<fmt>``... in ``folder`` (a few distinct ones, reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [encode(image(s, size), fmt) for s in range(16)]
    paths = []
    for i in range(n):
        p = folder / f"img{i:05d}.{fmt}"
        p.write_bytes(blobs[i % len(blobs)])
        paths.append(p)
    return paths
