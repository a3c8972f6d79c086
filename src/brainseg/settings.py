"""Model metadata + user overrides -> the settings eval, predict and export apply.

The one place that reads ``threshold``, ``postprocess`` and ``image_size`` from a model's
metadata (a checkpoint's or an ONNX file's) and lets options win over them. Standard library
only: the CLI, the torch-free ONNX path and checkpoint inspection all import it cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from brainseg.errors import BrainsegError

#: The default decision threshold on the tumor probability (re-exported by postprocess).
DEFAULT_THRESHOLD = 0.5
#: Height and width the UNet accepts are multiples of this (five 2x2 max-pools).
SIZE_MULTIPLE = 32
#: Largest image size (per side) a model may be trained at or its metadata may name: an MRI
#: slice is 256 (some 512); at 16384 two 64x64 images took 6 GiB.
MAX_MODEL_SIZE = 1024
#: Widest decoder stage (the reference decoder's widest is 512).
MAX_DECODER_CHANNELS = 4096
#: Deepest nesting of lists / objects in a model's metadata (brainseg writes 4 levels).
MAX_METADATA_DEPTH = 32
#: The metadata entries that must be JSON objects when present.
_MAPPING_KEYS = ("architecture", "config", "metrics", "postprocess")

#: Model file suffixes (each picks its backend).
MODEL_SUFFIXES = (".safetensors", ".onnx")
MODEL_HINT = (
    "pass a .safetensors checkpoint written by brainseg training or an .onnx file "
    "written by `brainseg export`"
)


@dataclass
class PostSettings:
    """A resolved post-processing choice: what turns probabilities into a mask."""

    threshold: float
    min_size: int
    largest: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class InferenceSettings:
    """How a model runs and how its probabilities become masks: the options predict and eval
    share. ``None``: the model's stored setting (:meth:`resolve`), else the default."""

    threshold: float | None = None
    min_size: int | None = None  # 2D components under this many pixels are removed
    largest: bool | None = None  # keep the largest 3D component per patient / volume
    min_volume: str | None = None  # volumes: drop 3D components under "N" voxels or "Nmm3"
    tta: bool = False
    device: str = "auto"
    batch_size: int = 8
    runtime: str | None = None  # auto, onnxruntime, openvino, torch (inference.runtimes)
    precision: str | None = None  # auto, fp32, bf16
    threads: int = 0  # 0: the runtime's default

    def inference_settings(self) -> dict[str, Any]:
        """These settings alone, by name (of a subclass such as PredictOptions too)."""
        return {f.name: getattr(self, f.name) for f in fields(InferenceSettings)}

    def resolve(self, metadata: Mapping[str, Any]) -> ModelSettings:
        """The options over the model's metadata (:func:`resolve`)."""
        return resolve(
            metadata,
            threshold=self.threshold,
            min_size=self.min_size,
            largest=self.largest,
            tta=self.tta,
        )


@dataclass
class ModelSettings:
    """Everything a model's metadata and the options decide about one run."""

    post: PostSettings
    tta: bool
    image_size: tuple[int, int] | None  # the model's input size; None: pad to multiples of 32
    threshold_source: str  # "option", "model" or "default"


def image_size_of(metadata: Mapping[str, Any]) -> tuple[int, int] | None:
    """``image_size`` from metadata (an int or [h, w]) as (h, w), or None when unknown."""
    value = metadata.get("image_size")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def resolve(
    metadata: Mapping[str, Any],
    *,
    threshold: float | None = None,
    min_size: int | None = None,
    largest: bool | None = None,
    tta: bool = False,
) -> ModelSettings:
    """Options win; otherwise the model's stored threshold / post-processing; else defaults."""
    pp = metadata.get("postprocess") or {}
    stored_thr = metadata.get("threshold")
    thr = threshold if threshold is not None else stored_thr
    ms = min_size if min_size is not None else pp.get("min_size")
    lg = largest if largest is not None else pp.get("largest_component", pp.get("largest"))
    post = PostSettings(float(DEFAULT_THRESHOLD if thr is None else thr), int(ms or 0), bool(lg))
    if not 0.0 <= post.threshold <= 1.0:
        raise BrainsegError(
            f"threshold {post.threshold} is outside [0, 1]",
            hint=f"pass --threshold between 0 and 1, e.g. {DEFAULT_THRESHOLD}",
        )
    if post.min_size < 0:
        raise BrainsegError(
            f"--min-size {post.min_size} is negative", hint="pass 0 (off) or a pixel count"
        )
    source = "option" if threshold is not None else "model" if stored_thr is not None else "default"
    return ModelSettings(post, bool(tta), image_size_of(metadata), source)


def check_metadata(meta: Mapping[str, Any], path: Path | str) -> None:
    """Refuse metadata values predict cannot use (image size, threshold, postprocess): one
    clear error naming a damaged file, not a crash in a worker or a resize to a billion pixels."""

    def bad(what: str) -> BrainsegError:
        return BrainsegError(f"model {path}: {what}", hint=MODEL_HINT)

    size = meta.get("image_size")
    if size is not None:
        parts = size if isinstance(size, (list, tuple)) else [size]
        ok = len(parts) in (1, 2) and all(_is_model_size(v) for v in parts)
        if not ok:
            raise bad(
                f"image_size {size!r} in its metadata is not a size in pixels "
                f"(a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_MODEL_SIZE})"
            )
    thr = meta.get("threshold", DEFAULT_THRESHOLD)
    if not _is_number(thr) or not 0.0 <= thr <= 1.0:
        raise bad(f"threshold {thr!r} in its metadata is not a number in [0, 1]")
    post = meta.get("postprocess")
    if post is not None:
        min_size = post.get("min_size") if isinstance(post, Mapping) else None
        if not isinstance(post, Mapping) or not (
            min_size is None
            or (isinstance(min_size, int) and not isinstance(min_size, bool) and min_size >= 0)
        ):
            raise bad(
                f"postprocess {post!r} in its metadata is not "
                '{"min_size": N >= 0, "largest_component": true/false}'
            )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_model_size(v: Any) -> bool:
    return _is_number(v) and SIZE_MULTIPLE <= v <= MAX_MODEL_SIZE and v % SIZE_MULTIPLE == 0


def decoder_channels_error(value: Any) -> str | None:
    """Why ``value`` is not a decoder width list (5 integers 1..MAX_DECODER_CHANNELS), or None."""
    if not isinstance(value, (str, bytes, Mapping)) and hasattr(value, "__iter__"):
        items = list(value)
        if len(items) == 5 and all(
            isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_DECODER_CHANNELS
            for c in items
        ):
            return None
    return (
        f"decoder_channels {value!r} must be 5 integers from 1 to {MAX_DECODER_CHANNELS} "
        "(one width per decoder stage)"
    )


def json_depth(value: Any, limit: int = MAX_METADATA_DEPTH) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion, stopping past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            d += 1
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def load_metadata_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` for model metadata: too deep is a ValueError naming ``what``."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise ValueError(f"{what} is nested too deeply") from exc
    if json_depth(value) > MAX_METADATA_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_METADATA_DEPTH} levels deep")
    return value


def check_metadata_types(meta: Mapping[str, Any], path: Path | str, hint: str) -> None:
    """The structure every metadata reader relies on: the _MAPPING_KEYS entries are objects (or
    absent / null), the whole at most MAX_METADATA_DEPTH deep; else an error naming the file."""
    for key in _MAPPING_KEYS:
        value = meta.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise BrainsegError(
                f"model {path}: {key} in its metadata is {type(value).__name__} "
                f"{_short(value)}, expected a JSON object",
                hint=hint,
            )
    if json_depth(dict(meta)) > MAX_METADATA_DEPTH:
        raise BrainsegError(
            f"model {path}: its metadata is nested more than {MAX_METADATA_DEPTH} levels deep",
            hint=hint,
        )


def _short(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
