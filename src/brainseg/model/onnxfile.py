"""The contract of a brainseg ONNX file, shared by every runtime that runs one (onnxruntime,
OpenVINO): the graph's inputs and outputs, the metadata in ``metadata_props``, and logits ->
probabilities (TTA too)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainseg.errors import BrainsegError
from brainseg.settings import (
    DEFAULT_THRESHOLD,
    check_metadata,
    check_metadata_types,
    load_metadata_json,
)

#: The ONNX ``metadata_props`` key holding the full brainseg metadata as JSON.
ONNX_METADATA_KEY = "brainseg"
#: Graph input / output names of brainseg ONNX models.
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"

ONNX_HINT = "export one from a brainseg checkpoint with `brainseg export CHECKPOINT -o model.onnx`"


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32, copy=False)


def metadata_from_props(props: Mapping[str, str], path: Path | str) -> dict[str, Any]:
    """brainseg metadata from ONNX ``metadata_props``: the JSON blob, then the plain keys, which
    win so that a tool editing one of them (``brainseg eval --tune-output``) is honoured."""
    if ONNX_METADATA_KEY not in props:
        raise BrainsegError(
            f"{path} is an ONNX model without brainseg metadata (made by another tool?); "
            "brainseg needs its image size, threshold and normalisation",
            hint=ONNX_HINT,
        )
    try:
        meta = load_metadata_json(props[ONNX_METADATA_KEY], "metadata")
    except ValueError as exc:
        why = f" ({exc})" if "nested" in str(exc) else ""
        raise BrainsegError(
            f"{path}: the brainseg metadata in the ONNX file is not JSON{why}", hint=ONNX_HINT
        ) from exc
    if not isinstance(meta, dict):
        raise BrainsegError(
            f"{path}: the brainseg metadata in the ONNX file is not a JSON object", hint=ONNX_HINT
        )
    for key, value in props.items():
        if key == "threshold":
            with contextlib.suppress(ValueError):
                meta["threshold"] = float(value)
        elif key in ("postprocess", "image_size", "architecture", "metrics"):
            with contextlib.suppress(ValueError):
                meta[key] = load_metadata_json(value, key)
        elif key == "normalization":
            meta[key] = value
    meta.setdefault("threshold", DEFAULT_THRESHOLD)
    meta.setdefault("postprocess", {"min_size": 0, "largest_component": False})
    check_metadata_types(meta, path, ONNX_HINT)
    check_metadata(meta, path)  # image size, threshold, postprocess: bounded where read
    return meta


def check_onnx_io(
    path: Path, ins: Sequence[tuple[str, str, Any]], outs: Sequence[tuple[str, str, Any]]
) -> None:
    """BrainsegError unless the graph is one float N x 3 x H x W input -> N x 1 x H x W output
    (``(name, type, shape)`` of each input and output, as the runtime reports them)."""
    ok_in = (
        len(ins) == 1
        and ins[0][1] == "tensor(float)"
        and len(ins[0][2]) == 4
        and ins[0][2][1] in (3, "3")
    )
    ok_out = bool(outs) and len(outs[0][2]) == 4 and outs[0][2][1] in (1, "1")
    if not (ok_in and ok_out):
        got_in = ", ".join(f"{n} {t} {list(sh)}" for n, t, sh in ins)
        got_out = ", ".join(f"{n} {t} {list(sh)}" for n, t, sh in outs)
        raise BrainsegError(
            f"{path}: ONNX inputs/outputs ({got_in} -> {got_out}) are not those of a "
            "brainseg model (one float input N x 3 x H x W -> logits N x 1 x H x W)",
            hint=ONNX_HINT,
        )


def proba_from_logits(
    logits: Callable[[np.ndarray], np.ndarray], images: np.ndarray, tta: bool
) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x H x W float32 probabilities of an ONNX runtime's
    ``logits(N x 3 x H x W float32) -> N x H x W``; TTA: the mean over the two flips too."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    p = sigmoid(logits(x))
    if tta:
        p = p + sigmoid(logits(np.ascontiguousarray(x[..., ::-1])))[..., ::-1]
        p = p + sigmoid(logits(np.ascontiguousarray(x[..., ::-1, :])))[..., ::-1, :]
        p = p / np.float32(3.0)
    return np.ascontiguousarray(p, dtype=np.float32)


def open_session(
    path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0
) -> Any:
    """An onnxruntime session on ``path``, quiet, or one clear error for a damaged file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = int(threads)
    # Reader/writer threads share the CPU: do not let idle inference threads spin on it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        # onnxruntime prints "EP Error" banners on stdout when a file fails to load: keep
        # stdout clean for --json (we raise one clear error instead).
        with contextlib.redirect_stdout(io.StringIO()):
            return ort.InferenceSession(str(path), opts, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own types for corrupt files
        text = str(exc).strip().splitlines()
        why = text[0][:200] if text else type(exc).__name__
        raise BrainsegError(
            f"cannot load ONNX model {path}: not a valid ONNX file ({why})",
            hint="is the file complete? re-export it with `brainseg export`",
        ) from exc
