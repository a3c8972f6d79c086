"""Inference: a :class:`Predictor` over checkpoints or ONNX files, and batch prediction of files.

Two backends, chosen per model file by its suffix:

- ``.safetensors``: PyTorch (imported lazily inside :class:`TorchBackend`), eval mode,
  ``torch.inference_mode``, channels-last memory on CPU.
- ``.onnx``: onnxruntime + numpy only. torch is never imported on that path (a test checks
  ``sys.modules``), so a CPU-only deployment needs neither torch nor torchvision.

Several models form an ensemble: the mean of their probabilities. Test-time augmentation
(TTA) is the mean of the probabilities of the image and of its horizontal and vertical flips.

The second half of the module is the streaming batch engine behind ``brainseg predict``:
inputs are walked lazily, read and resized by a small thread pool ahead of inference, and
written by another pool behind it, so memory stays constant however many files there are.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import numpy as np

from brainseg import imageio
from brainseg.devices import resolve_device
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import remove_stale_temps, temp_prefix, write_error

#: Model file suffixes and their backends.
MODEL_SUFFIXES = (".safetensors", ".onnx")
#: Height and width the UNet accepts are multiples of this (five 2x2 max-pools).
SIZE_MULTIPLE = 32
#: The ONNX ``metadata_props`` key holding the full brainseg metadata as JSON.
ONNX_METADATA_KEY = "brainseg"
#: Graph input / output names of brainseg ONNX models.
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"

_MODEL_HINT = (
    "pass a .safetensors checkpoint written by brainseg training or an .onnx file "
    "written by `brainseg export`"
)
_ONNX_HINT = "export one from a brainseg checkpoint with `brainseg export CHECKPOINT -o model.onnx`"


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- metadata


def _as_size(value: Any) -> tuple[int, int] | None:
    """``image_size`` from metadata (an int or [h, w]) as (h, w), or None when unknown."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


#: Largest image size a model's metadata may name (an MRI slice is 256).
MAX_MODEL_SIZE = 16384


def check_metadata(meta: Mapping[str, Any], path: Path | str) -> None:
    """Refuse metadata values predict cannot use (image size, threshold, postprocess).

    A damaged or hand-edited model file must give one clear error naming it, not a crash
    in a worker thread or a resize to a billion pixels (found by tests/test_properties.py).
    """

    def bad(what: str) -> BrainsegError:
        return BrainsegError(f"model {path}: {what}", hint=_MODEL_HINT)

    size = meta.get("image_size")
    if size is not None:
        parts = size if isinstance(size, (list, tuple)) else [size]
        ok = len(parts) in (1, 2) and all(
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v == int(v)
            and SIZE_MULTIPLE <= v <= MAX_MODEL_SIZE
            and int(v) % SIZE_MULTIPLE == 0
            for v in parts
        )
        if not ok:
            raise bad(
                f"image_size {size!r} in its metadata is not a size in pixels "
                f"(a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_MODEL_SIZE})"
            )
    thr = meta.get("threshold", 0.5)
    if (
        not isinstance(thr, (int, float))
        or isinstance(thr, bool)
        or not math.isfinite(thr)
        or not 0.0 <= thr <= 1.0
    ):
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


def metadata_from_props(props: Mapping[str, str], path: Path | str) -> dict[str, Any]:
    """brainseg metadata from ONNX ``metadata_props`` (the JSON blob, then the plain keys).

    The plain keys (``threshold``, ``postprocess``, ``image_size``...) win over the blob, so a
    tool that edits one of them (``brainseg eval --tune-output``) is honoured.
    """
    if ONNX_METADATA_KEY not in props:
        raise BrainsegError(
            f"{path} is an ONNX model without brainseg metadata (made by another tool?); "
            "brainseg needs its image size, threshold and normalisation",
            hint=_ONNX_HINT,
        )
    try:
        meta = json.loads(props[ONNX_METADATA_KEY])
    except ValueError as exc:
        raise BrainsegError(
            f"{path}: the brainseg metadata in the ONNX file is not JSON", hint=_ONNX_HINT
        ) from exc
    if not isinstance(meta, dict):
        raise BrainsegError(
            f"{path}: the brainseg metadata in the ONNX file is not a JSON object", hint=_ONNX_HINT
        )
    for key, value in props.items():
        if key == ONNX_METADATA_KEY:
            continue
        if key == "threshold":
            with contextlib.suppress(ValueError):
                meta["threshold"] = float(value)
        elif key in ("postprocess", "image_size", "architecture", "metrics"):
            with contextlib.suppress(ValueError):
                meta[key] = json.loads(value)
        elif key == "normalization":
            meta[key] = value
    meta.setdefault("threshold", 0.5)
    meta.setdefault("postprocess", {"min_size": 0, "largest_component": False})
    return meta


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The brainseg metadata of an ONNX file (onnxruntime only; BrainsegError if foreign)."""
    return OnnxBackend(Path(path), "cpu").metadata


# --------------------------------------------------------------------------- backends


class TorchBackend:
    """A brainseg checkpoint run with PyTorch (torch imported here, lazily)."""

    name = "torch"

    def __init__(self, path: Path, device: str = "auto") -> None:
        try:
            import torch
        except ImportError as exc:
            raise BrainsegError(
                f"{path} is a PyTorch checkpoint but PyTorch is not installed",
                hint="pip install torch, or export it once to ONNX (brainseg export "
                "CHECKPOINT -o model.onnx) and predict with the .onnx file",
            ) from exc

        from brainseg.checkpoint import load_checkpoint

        self.torch = torch
        self.device = resolve_device(device)
        model, meta = load_checkpoint(path, self.device)
        model.eval()
        # oneDNN convolutions run faster on NHWC tensors on CPU (see docs/predict.md).
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.metadata = dict(meta)

    def proba(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x H x W float32 probabilities (H, W multiples of 32)."""
        torch = self.torch
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            x = t.permute(0, 3, 1, 2).float()
            x = x.contiguous(
                memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
            )
            p = torch.sigmoid(self.model(x)[:, 0].float())
            if tta:
                p = p + torch.sigmoid(self.model(x.flip(-1))[:, 0].float()).flip(-1)
                p = p + torch.sigmoid(self.model(x.flip(-2))[:, 0].float()).flip(-2)
                p = p / 3.0
            return p.cpu().numpy().astype(np.float32, copy=False)


class OnnxBackend:
    """A brainseg ONNX model run with onnxruntime (numpy only, never torch)."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "auto") -> None:
        import onnxruntime as ort

        providers = _ort_providers(device, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Reader/writer threads share the CPU: do not let idle inference threads spin on it.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            # onnxruntime prints "EP Error" banners on stdout when a file fails to load: keep
            # stdout clean for --json (we raise one clear error instead).
            with contextlib.redirect_stdout(io.StringIO()):
                self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for corrupt files
            text = str(exc).strip().splitlines()
            why = text[0][:200] if text else type(exc).__name__
            raise BrainsegError(
                f"cannot load ONNX model {path}: not a valid ONNX file ({why})",
                hint="is the file complete? re-export it with `brainseg export`",
            ) from exc
        try:
            props = dict(self.session.get_modelmeta().custom_metadata_map)
            self.metadata = metadata_from_props(props, path)
            self._check_io(path)
        except (UnicodeDecodeError, RuntimeError) as exc:  # damaged names / metadata strings
            raise BrainsegError(
                f"cannot read the metadata of ONNX model {path} ({type(exc).__name__})",
                hint="is the file complete? re-export it with `brainseg export`",
            ) from exc

    def _check_io(self, path: Path) -> None:
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        ok_in = (
            len(ins) == 1
            and ins[0].type == "tensor(float)"
            and len(ins[0].shape) == 4
            and ins[0].shape[1] in (3, "3")
        )
        ok_out = bool(outs) and len(outs[0].shape) == 4 and outs[0].shape[1] in (1, "1")
        if not (ok_in and ok_out):
            got_in = ", ".join(f"{i.name} {i.type} {i.shape}" for i in ins)
            got_out = ", ".join(f"{o.name} {o.type} {o.shape}" for o in outs)
            raise BrainsegError(
                f"{path}: ONNX inputs/outputs ({got_in} -> {got_out}) are not those of a "
                "brainseg model (one float input N x 3 x H x W -> logits N x 1 x H x W)",
                hint=_ONNX_HINT,
            )
        self.input_name = ins[0].name
        self.output_name = outs[0].name

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0][:, 0]

    def proba(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x H x W float32 probabilities (H, W multiples of 32)."""
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        p = sigmoid(self._logits(x))
        if tta:
            p = p + sigmoid(self._logits(np.ascontiguousarray(x[..., ::-1])))[..., ::-1]
            p = p + sigmoid(self._logits(np.ascontiguousarray(x[..., ::-1, :])))[..., ::-1, :]
            p = p / np.float32(3.0)
        return np.ascontiguousarray(p, dtype=np.float32)


def _ort_providers(device: str, available: Sequence[str]) -> list[str]:
    dev = str(device or "auto").lower()
    if dev == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if dev == "cpu":
        return ["CPUExecutionProvider"]
    if dev.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise BrainsegError(
                f"device {device!r} requested but this onnxruntime has no CUDA provider "
                f"(available: {', '.join(available)})",
                hint="use --device cpu, or pip install onnxruntime-gpu",
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BrainsegError(
        f"unknown device {device!r} for an ONNX model", hint="use auto, cpu or cuda"
    )


def open_backend(path: str | os.PathLike[str], device: str = "auto") -> TorchBackend | OnnxBackend:
    """The backend for one model file, chosen by its suffix."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise BrainsegError(
            f"{p}: not a model file (suffix {suffix or '(none)'!r}); expected "
            ".safetensors or .onnx",
            hint=_MODEL_HINT,
        )
    if not p.is_file():
        raise BrainsegError(
            f"model {p} does not exist" if not p.exists() else f"model {p} is not a file",
            hint=_MODEL_HINT,
        )
    if suffix == ".onnx":
        return OnnxBackend(p, device)
    return TorchBackend(p, device)


# --------------------------------------------------------------------------- Predictor


class Predictor:
    """One model or an ensemble (mean probability) behind one ``predict_proba``.

    ``metadata`` is the first model's (image_size, threshold, normalization, postprocess,
    architecture, metrics...). Every model of an ensemble must share the image size.
    """

    def __init__(
        self,
        model_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        device: str = "auto",
        batch_size: int = 8,
        tta: bool = False,
    ) -> None:
        if isinstance(model_paths, (str, os.PathLike)):
            model_paths = [model_paths]
        self.paths = [Path(p) for p in model_paths]
        if not self.paths:
            raise BrainsegError("no model given", hint=_MODEL_HINT)
        if int(batch_size) < 1:
            raise BrainsegError(f"batch size {batch_size} must be at least 1")
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.backends = [open_backend(p, device) for p in self.paths]
        for p, b in zip(self.paths, self.backends, strict=True):
            check_metadata(b.metadata, p)
        self.metadata: dict[str, Any] = dict(self.backends[0].metadata)
        sizes = {_as_size(b.metadata.get("image_size")) for b in self.backends}
        if len(sizes) > 1:
            raise BrainsegError(
                "the models of the ensemble were trained at different image sizes: "
                + ", ".join(
                    f"{p} {_as_size(b.metadata.get('image_size'))}"
                    for p, b in zip(self.paths, self.backends, strict=True)
                ),
                hint="ensemble models trained at the same --image-size",
            )

    @property
    def backend(self) -> str:
        """The backend name(s): torch, onnxruntime or both (for messages)."""
        return "+".join(sorted({b.name for b in self.backends}))

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) the model was trained at, or None when the metadata lacks it."""
        return _as_size(self.metadata.get("image_size"))

    def predict_model_size(self, images: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8, H and W multiples of 32 -> N x H x W float32 (no resizing)."""
        images = _check_batch(images)
        h, w = images.shape[1:3]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise BrainsegError(
                f"input size {h}x{w} is not a multiple of {SIZE_MULTIPLE}",
                hint="resize or pad the images (predict_proba does either)",
            )
        out = np.empty(images.shape[:3], dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            acc = self.backends[0].proba(chunk, self.tta)
            for b in self.backends[1:]:
                acc = acc + b.proba(chunk, self.tta)
            out[start : start + len(chunk)] = acc / np.float32(len(self.backends))
        return out

    def predict_proba(self, images: np.ndarray, *, pad: bool = False) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x H x W float32 tumor probabilities at the input size.

        Images are resized (bilinear) to the model's image size and the probabilities back
        (bilinear); with ``pad=True`` (or when the metadata has no image size) they are
        zero-padded to multiples of 32 instead and the result is cropped.
        """
        images = _check_batch(images)
        n, h, w = images.shape[:3]
        if n == 0:
            return np.zeros((0, h, w), dtype=np.float32)
        size = self.image_size
        if not pad and size is not None:
            if (h, w) == size:
                return self.predict_model_size(images)
            x = np.stack([imageio.resize_image(im, size) for im in images])
            p = self.predict_model_size(x)
            return np.stack([imageio.resize_prob(pi, (h, w)) for pi in p])
        x, _ = imageio.pad_to_multiple(images.transpose(1, 2, 0, 3), SIZE_MULTIPLE)
        p = self.predict_model_size(np.ascontiguousarray(x.transpose(2, 0, 1, 3)))
        return np.ascontiguousarray(p[:, :h, :w])


def _check_batch(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise BrainsegError(f"images have shape {a.shape}; expected N x H x W x 3 uint8")
    if a.dtype != np.uint8:
        raise BrainsegError(f"images have dtype {a.dtype}; expected uint8 pixel values 0..255")
    return a


# --------------------------------------------------------------------------- input walking


_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputFile:
    """One input image: where to read it and its path relative to the output folder."""

    path: Path
    rel: PurePosixPath


def is_mask_name(path: Path | PurePosixPath) -> bool:
    """True for ``*_mask.*`` (the ground-truth masks next to kaggle_3m images)."""
    return Path(path).stem.lower().endswith("_mask")


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_images(
    top: Path, *, exclude: Sequence[Path] = (), max_depth: int | None = None
) -> Iterator[Path]:
    """Image files below ``top`` in sorted order, lazily (files of a folder, then sub-folders).

    Symlinked folders are followed, but a folder already visited (a link loop, or one folder
    reached twice) is not entered again. Hidden entries (``.name``, e.g. macOS ``._x.tif``)
    and the folders in ``exclude`` (e.g. the output folder) are skipped.
    """
    skip = {os.path.realpath(d) for d in exclude}
    seen: set[tuple[int, int]] = set()
    key = _dir_key(top)
    if key is not None:
        seen.add(key)
    stack: list[tuple[Path, int]] = [(top, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[Path] = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                continue
            if is_dir:
                if max_depth is not None and depth + 1 > max_depth:
                    continue
                k = _dir_key(Path(e.path))
                if k is None or k in seen or (skip and os.path.realpath(e.path) in skip):
                    continue
                seen.add(k)
                subdirs.append(Path(e.path))
            elif imageio.is_image_path(e.name):
                yield Path(e.path)
        stack.extend((d, depth + 1) for d in reversed(subdirs))


def _glob_base(pattern: str) -> tuple[Path, list[str]]:
    """Split a glob into its literal leading folder and the pattern components after it."""
    parts = PurePosixPath(pattern.replace(os.sep, "/")).parts
    base: list[str] = []
    for i, part in enumerate(parts):
        if _MAGIC.search(part):
            return Path(*base) if base else Path("."), list(parts[i:])
        base.append(part)
    return Path(*parts[:-1]) if len(parts) > 1 else Path("."), list(parts[-1:])


def _match_parts(parts: Sequence[str], pats: Sequence[str]) -> bool:
    """Match path components against glob components (``**``: any number of folders)."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match_parts(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    part, pat = parts[0], pats[0]
    if part.startswith(".") and not pat.startswith("."):
        return False
    return fnmatchcase(part, pat) and _match_parts(parts[1:], pats[1:])


def _explicit_rel(path: Path) -> PurePosixPath:
    """Output location of a file named explicitly: relative to the current folder when it
    is inside it, else its absolute path without the root (so it can never climb out)."""
    absolute = Path(os.path.abspath(path))
    try:
        rel = absolute.relative_to(Path.cwd())
    except ValueError:
        rel = absolute.relative_to(absolute.anchor)
    return PurePosixPath(*rel.parts)


@dataclass
class InputSpec:
    """The parsed INPUT arguments of ``brainseg predict``."""

    items: list[str]
    include_masks: bool = False
    stdin: TextIO | None = None
    exclude_dirs: list[Path] = field(default_factory=list)


def iter_inputs(spec: InputSpec) -> Iterator[InputFile]:
    """Every input image, lazily, in order: arguments in the order given, folders and globs
    in sorted order, ``-`` as one path per line of stdin."""
    exclude = list(spec.exclude_dirs)
    for item in spec.items:
        if item == "-":
            stream = spec.stdin if spec.stdin is not None else sys.stdin
            for line in stream:
                name = line.rstrip("\r\n")
                if name.strip():
                    p = Path(name)
                    yield InputFile(p, _explicit_rel(p))
            continue
        p = Path(item)
        if _MAGIC.search(item) and not p.exists():
            base, pats = _glob_base(item)
            depth = None if "**" in pats else len(pats) - 1
            for f in walk_images(base, exclude=exclude, max_depth=depth):
                rel_parts = f.relative_to(base).parts
                if _match_parts(rel_parts, pats) and (spec.include_masks or not is_mask_name(f)):
                    yield InputFile(f, PurePosixPath(*rel_parts))
        elif p.is_dir():
            for f in walk_images(p, exclude=exclude):
                if spec.include_masks or not is_mask_name(f):
                    yield InputFile(f, PurePosixPath(*f.relative_to(p).parts))
        else:
            yield InputFile(p, _explicit_rel(p))


def check_inputs(items: Sequence[str]) -> None:
    """Refuse inputs that name nothing (exit 2) before any model is loaded."""
    if not items:
        raise BrainsegError(
            "no INPUT given", hint="pass image files, folders, globs or - (paths on stdin)"
        )
    if items.count("-") > 1:
        raise BrainsegError("'-' (paths on stdin) is given more than once")
    for item in items:
        if item == "-" or _MAGIC.search(item):
            continue
        if not Path(item).exists():
            raise BrainsegError(
                f"input {item} does not exist",
                hint="pass existing image files, folders, quoted globs or -",
            )


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N) with 0 <= I < N; None stays None."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m:
        raise BrainsegError(
            f"--shard {value!r} is not of the form I/N",
            hint="e.g. --shard 0/4 on the first of 4 machines ... 3/4 on the last",
        )
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise BrainsegError(
            f"--shard {value}: need 0 <= I < N and N >= 1",
            hint=f"shards of N={max(n, 1)} are 0/{max(n, 1)} ... {max(n, 1) - 1}/{max(n, 1)}",
        )
    return i, n


# --------------------------------------------------------------------------- batch engine


SUMMARY_COLUMNS = (
    "path",
    "output",
    "status",
    "tumor_pixels",
    "tumor_fraction",
    "max_probability",
    "has_tumor",
    "height",
    "width",
    "error",
)


@dataclass
class BatchOptions:
    """Settings of one ``brainseg predict`` run."""

    out_dir: Path
    fmt: str = "tif"  # mask format: tif or png
    threshold: float = 0.5
    min_size: int = 0
    pad: bool = False
    probabilities: bool = False
    overlay: bool = False
    overlay_channel: int | None = 1  # 1 = FLAIR, None = RGB
    skip_existing: bool = False
    force: bool = False
    workers: int = 2


@dataclass
class FileResult:
    """One row of the summary (and one --json line)."""

    path: str
    output: str = ""
    status: str = "ok"  # ok, skipped, error
    tumor_pixels: int | None = None
    tumor_fraction: float | None = None
    max_probability: float | None = None
    has_tumor: bool | None = None
    height: int | None = None
    width: int | None = None
    error: str = ""
    notes: tuple[str, ...] = ()

    def row(self) -> dict[str, Any]:
        """The summary columns as a dict (JSON-able)."""
        return {c: getattr(self, c) for c in SUMMARY_COLUMNS}


@dataclass
class _Outputs:
    mask: Path
    prob: Path | None
    overlay: Path | None

    def all(self) -> list[Path]:
        return [p for p in (self.prob, self.overlay, self.mask) if p is not None]


@dataclass
class _Prepared:
    item: InputFile
    outputs: _Outputs
    image: np.ndarray  # H x W x 3 uint8 as read
    model_input: np.ndarray  # h x w x 3 uint8 fed to the model
    overwrite: bool
    notes: tuple[str, ...]


def output_paths(rel: PurePosixPath, opts: BatchOptions) -> _Outputs:
    """OUT/<rel folder>/<stem>_mask.<fmt> (and _prob.tif, _overlay.png)."""
    if rel.is_absolute() or any(part in ("..", "") for part in rel.parts):
        raise BrainsegError(
            f"output for {rel} would leave the output folder {opts.out_dir}",
            hint="pass the input folder itself instead of a path with '..'",
        )
    folder = opts.out_dir.joinpath(*rel.parent.parts)
    stem = rel.stem
    return _Outputs(
        mask=folder / f"{stem}_mask.{opts.fmt}",
        prob=folder / f"{stem}_prob.tif" if opts.probabilities else None,
        overlay=folder / f"{stem}_overlay.png" if opts.overlay else None,
    )


def _inside(path: Path, root: Path) -> bool:
    """True when ``path`` (resolving any links in its existing part) lies below ``root``."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


class _Engine:
    """Read ahead, infer in batches, write behind; results come out in input order."""

    def __init__(self, predictor: Predictor, opts: BatchOptions) -> None:
        self.predictor = predictor
        self.opts = opts
        self.size = predictor.image_size
        self.root = opts.out_dir.resolve()

    # ---- read side (worker threads)

    def prepare(self, item: InputFile | FileResult) -> _Prepared | FileResult:
        if isinstance(item, FileResult):
            return item
        try:
            outs = output_paths(item.rel, self.opts)
            for p in outs.all():
                if not _inside(p.parent, self.root):
                    raise BrainsegError(
                        f"output {p} would be written outside {self.opts.out_dir} "
                        "(a link inside the output folder points elsewhere)",
                        hint="remove the link or choose another -o folder",
                    )
            existing = [p for p in outs.all() if p.exists()]
            overwrite = self.opts.force
            if existing:
                if self.opts.skip_existing and len(existing) == len(outs.all()):
                    return self._skipped(item, outs)
                if not self.opts.force and not self.opts.skip_existing:
                    raise BrainsegError(
                        f"{existing[0]} already exists",
                        hint="pass --force to overwrite it or --skip-existing to keep it",
                    )
                overwrite = True  # --skip-existing and an interrupted file: redo all of it
            loaded = imageio.load_image(item.path)
            image = loaded.array
            if self.opts.pad or self.size is None:
                model_input, _ = imageio.pad_to_multiple(image, SIZE_MULTIPLE)
            else:
                model_input = imageio.resize_image(image, self.size)
            return _Prepared(item, outs, image, model_input, overwrite, loaded.notes)
        except BrainsegError as exc:
            return FileResult(str(item.path), status="error", error=str(exc))
        except Exception as exc:  # never let one odd file stop the run
            return FileResult(
                str(item.path), status="error", error=f"{item.path}: {type(exc).__name__}: {exc}"
            )

    def _skipped(self, item: InputFile, outs: _Outputs) -> FileResult:
        res = FileResult(str(item.path), output=str(outs.mask), status="skipped")
        with contextlib.suppress(Exception):
            m = imageio.read_image(outs.mask)[..., 0] > 0
            res.tumor_pixels = int(m.sum())
            res.height, res.width = m.shape
            res.tumor_fraction = res.tumor_pixels / max(1, m.size)
            res.has_tumor = res.tumor_pixels > 0
        return res

    # ---- write side (worker threads)

    def finish(self, prep: _Prepared | FileResult, prob: np.ndarray | None) -> FileResult:
        if isinstance(prep, FileResult):
            return prep
        from brainseg import postprocess

        assert prob is not None
        opts = self.opts
        h, w = prep.image.shape[:2]
        try:
            if opts.pad or self.size is None:
                prob = prob[:h, :w]
                mask = postprocess.binarize(prob, opts.threshold)
                if opts.min_size > 1:
                    mask = postprocess.remove_small(mask, opts.min_size)
            else:
                small = postprocess.binarize(prob, opts.threshold)
                if opts.min_size > 1:
                    small = postprocess.remove_small(small, opts.min_size)
                mask = imageio.resize_mask(small, (h, w))
            force = prep.overwrite
            outs = prep.outputs
            if outs.prob is not None:
                full = prob if prob.shape == (h, w) else imageio.resize_prob(prob, (h, w))
                imageio.write_probability(outs.prob, full, force=force)
            if outs.overlay is not None:
                imageio.write_overlay(
                    outs.overlay, prep.image, mask, channel=opts.overlay_channel, force=force
                )
            imageio.write_mask(outs.mask, mask, force=force)  # last: its presence = done
        except BrainsegRuntimeError:
            raise  # disk full, unwritable folder: stop the run
        except BrainsegError as exc:
            return FileResult(str(prep.item.path), status="error", error=str(exc))
        pixels = int(np.count_nonzero(mask))
        return FileResult(
            str(prep.item.path),
            output=str(outs.mask),
            status="ok",
            tumor_pixels=pixels,
            tumor_fraction=pixels / float(h * w),
            max_probability=float(prob.max()),
            has_tumor=pixels > 0,
            height=h,
            width=w,
            notes=prep.notes,
        )

    # ---- the pipeline (caller's thread)

    def run(self, items: Iterable[InputFile | FileResult]) -> Iterator[FileResult]:
        bs = self.predictor.batch_size
        workers = max(1, self.opts.workers)
        ahead = 2 * bs + workers
        readers = ThreadPoolExecutor(workers, thread_name_prefix="brainseg-read")
        writers = ThreadPoolExecutor(workers, thread_name_prefix="brainseg-write")
        try:
            reads = _ordered_map(readers, self.prepare, items, ahead=ahead)
            writes: deque[Future[FileResult]] = deque()
            for group in self._batches(reads, bs):
                probs = self._infer([g for g in group if isinstance(g, _Prepared)])
                for g in group:
                    prob = probs.pop(0) if isinstance(g, _Prepared) else None
                    writes.append(writers.submit(self.finish, g, prob))
                while len(writes) > ahead:
                    yield writes.popleft().result()
            while writes:
                yield writes.popleft().result()
        except BaseException:
            # Ctrl-C, a fatal write error or a consumer that stops: do not start queued work.
            readers.shutdown(wait=True, cancel_futures=True)
            writers.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            readers.shutdown()
            writers.shutdown()

    def _batches(
        self, reads: Iterator[_Prepared | FileResult], bs: int
    ) -> Iterator[list[_Prepared | FileResult]]:
        """Groups of up to ``bs`` images of one shape (plus the finished results between)."""
        group: list[_Prepared | FileResult] = []
        n = 0
        shape: tuple[int, ...] | None = None
        for r in reads:
            if isinstance(r, _Prepared):
                if shape is not None and r.model_input.shape != shape and n:
                    yield group
                    group, n = [], 0
                shape = r.model_input.shape
                n += 1
            group.append(r)
            if n >= bs:
                yield group
                group, n = [], 0
        if group:
            yield group

    def _infer(self, preps: list[_Prepared]) -> list[np.ndarray]:
        if not preps:
            return []
        x = np.stack([p.model_input for p in preps])
        return list(self.predictor.predict_model_size(x))


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int
) -> Iterator[Any]:
    """``map(fn, items)`` on ``pool`` with at most ``ahead`` tasks in flight, in order."""
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def predict_files(
    predictor: Predictor, files: Iterable[InputFile], opts: BatchOptions
) -> Iterator[FileResult]:
    """Predict every file and write its outputs; one :class:`FileResult` per file, in order.

    Files that cannot be read or written come back with ``status="error"`` and the run goes
    on; two inputs that would write the same output are an error for the second.
    """
    seen: set[str] = set()
    swept: set[PurePosixPath] = set()
    root = opts.out_dir.resolve()

    def dedup() -> Iterator[InputFile | FileResult]:
        for f in files:
            if f.rel.parent not in swept:  # once per output folder, before it is written to
                swept.add(f.rel.parent)
                folder = opts.out_dir / f.rel.parent
                if _inside(folder, root):  # never outside -o (a planted link)
                    remove_stale_temps(folder)
            key = str(f.rel.parent / f.rel.stem)
            if key in seen:
                yield FileResult(
                    str(f.path),
                    status="error",
                    error=f"{f.path}: another input already writes "
                    f"{opts.out_dir / f.rel.parent / f.rel.stem}_mask."
                    f"{opts.fmt} in this run",
                )
                continue
            seen.add(key)
            yield f

    yield from _Engine(predictor, opts).run(dedup())


# --------------------------------------------------------------------------- summary


class SummaryWriter:
    """Rows appended as they come (flushed), under a temporary name renamed at ``close``.

    A run that stops early (Ctrl-C, disk full) still leaves the rows written so far under
    the final name. Nothing is created until the first row.
    """

    def __init__(self, path: Path, fmt: str = "csv") -> None:
        self.path = path
        self.fmt = fmt
        self._tmp: Path | None = None
        self._f: io.TextIOWrapper | None = None
        self._csv: Any = None
        self.rows = 0

    def write(self, res: FileResult) -> None:
        try:
            self._write(res)
        except OSError as exc:  # disk full: one clear line, not a traceback (tests/faults)
            raise write_error(self.path, exc) from exc

    def _write(self, res: FileResult) -> None:
        if self._f is None:
            import tempfile

            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path.parent)  # a killed run's summary
            fd, name = tempfile.mkstemp(
                prefix=temp_prefix(self.path.name), suffix=".tmp", dir=self.path.parent
            )
            self._tmp = Path(name)
            self._f = open(fd, "w", encoding="utf-8", newline="")  # noqa: SIM115
            if self.fmt == "csv":
                self._csv = csv.DictWriter(self._f, fieldnames=list(SUMMARY_COLUMNS))
                self._csv.writeheader()
        row = res.row()
        if self.fmt == "csv":
            self._csv.writerow({k: _csv_cell(v) for k, v in row.items()})
        else:
            self._f.write(json.dumps(_json_row(row)) + "\n")
        self._f.flush()
        self.rows += 1

    def close(self) -> Path | None:
        if self._f is None or self._tmp is None:
            return None
        f, self._f = self._f, None
        try:
            f.close()
        except OSError as exc:  # the last buffered rows did not fit: keep those on disk
            with contextlib.suppress(OSError):
                os.replace(self._tmp, self.path)
            raise write_error(self.path, exc) from exc
        os.replace(self._tmp, self.path)
        return self.path


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def json_row(res: FileResult) -> dict[str, Any]:
    """The --json line of one result."""
    return _json_row(res.row())
