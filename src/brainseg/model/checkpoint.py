"""Checkpoints: safetensors weights plus JSON metadata in the safetensors header. Never pickle.

Layout of a ``.safetensors`` checkpoint written here:

* tensors: the model's ``state_dict()`` under its own names (``encoder.features.0.weight``
  ...), and any ``extra`` tensors (optimizer state for resume...) under ``extra/<name>``
  (a ``/`` never appears in a module name, so the two never collide);
* header metadata: ``{"format": "pt", "brainseg": "<JSON>"}`` where the JSON holds the format
  version, versions, the architecture (``model.config()``), threshold, postprocessing, epoch,
  metrics, the resolved config and the split hash (see docs/model.md).

:func:`read_metadata` and :func:`copy_with_metadata` never import torch, so torch-free code
can inspect checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brainseg import __version__
from brainseg.devices import resolve_device
from brainseg.errors import BrainsegError, first_line
from brainseg.fsutil import atomic_path, json_safe
from brainseg.model.hub import local_model
from brainseg.model.modelfile import MAX_HEADER_BYTES, sniff_model_file
from brainseg.settings import (
    DEFAULT_THRESHOLD,
    MODEL_HINT,
    MODEL_SUFFIXES,
    check_metadata,
    check_metadata_types,
    load_metadata_json,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from brainseg.model.unet import UNetVGG16

#: Version of the checkpoint layout; readers refuse files with a larger number.
FORMAT_VERSION = 1
#: Safetensors header-metadata key that holds the brainseg JSON.
METADATA_KEY = "brainseg"
#: Tensor-name prefix of the ``extra`` tensors.
EXTRA_PREFIX = "extra/"
#: Metadata defaults filled in when a caller (or an older file) leaves them out.
DEFAULTS: dict[str, Any] = {
    "image_size": None,
    "threshold": DEFAULT_THRESHOLD,
    "postprocess": {"min_size": 0, "largest_component": False},
    "epoch": None,
    "metrics": {},
    "config": {},
    "split_hash": None,
}
#: Keys that save_checkpoint sets itself and copy_with_metadata refuses to change.
_PROTECTED = ("format_version", "architecture")

_HINT_CKPT = "pass a .safetensors checkpoint written by brainseg (runs/train/exp/best.safetensors)"


def _open_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The safetensors metadata and tensor shapes of ``path``: ``safe_open`` checks the whole
    header without reading tensor data; this turns its errors into messages naming the file."""
    if not path.exists():
        raise BrainsegError(f"checkpoint {path} does not exist", hint=_HINT_CKPT)
    if path.is_dir():
        raise BrainsegError(f"checkpoint {path} is a directory, not a file", hint=_HINT_CKPT)
    # lazily: the ONNX path (check_model_file) runs without safetensors (docs/install.md)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            st_meta = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except OSError as exc:
        raise BrainsegError(
            f"cannot read checkpoint {path}: {exc.strerror or exc}",
            hint="check the file exists and is readable",
        ) from exc
    except SafetensorError as exc:
        message, hint = _not_safetensors(path, first_line(exc))
        raise BrainsegError(message, hint=hint) from exc
    return st_meta, shapes


def _raw_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header dict (with the data offsets) and its length, which ``safe_open`` does not
    give and a streamed copy with new metadata needs."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), n


def check_model_file(
    path: str | os.PathLike[str], *, also: tuple[str, ...] = (), hint: str = MODEL_HINT
) -> Path:
    """``path`` (a Hub reference or folder resolved to its local file first) when it is an
    existing file with a model suffix (or one of ``also``); BrainsegError naming it otherwise."""
    p = local_model(path, MODEL_SUFFIXES)
    suffix = p.suffix.lower()
    if suffix not in (*MODEL_SUFFIXES, *also):
        names = ["a .safetensors checkpoint", "an .onnx file", *(f"a {s} file" for s in also)]
        raise BrainsegError(
            f"{p}: not a model file (suffix {suffix or '(none)'!r}); expected "
            + ", ".join(names[:-1])
            + f" or {names[-1]}",
            hint=hint,
        )
    if not p.is_file():
        raise BrainsegError(
            f"model {p} does not exist" if not p.exists() else f"model {p} is not a file",
            hint=hint,
        )
    return p


def _not_safetensors(path: Path, why: str) -> tuple[str, str]:
    """(message, hint) saying why safetensors refused ``path`` (its message ``why``), as
    specific as the first bytes allow."""
    kind = sniff_model_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    cut = (
        "the file was cut short (interrupted copy or download); copy it again or use "
        "another checkpoint (e.g. last.safetensors)"
    )
    if kind == "onnx":
        message = (
            f"{path} is an ONNX model, not a checkpoint; this command takes a .safetensors "
            "checkpoint (the one the ONNX file was exported from)"
        )
    elif kind in ("pickle", "zip"):
        message = (
            f"checkpoint {path} is a PyTorch pickle (.pth/.pt), not a safetensors file; "
            "brainseg never loads pickled checkpoints"
        )
    elif size < 8:
        message = f"checkpoint {path} is not a safetensors file ({size} bytes, too short)"
    elif 8 < n <= MAX_HEADER_BYTES and n > size - 8:
        message = (
            f"checkpoint {path} is truncated: the header alone needs {n + 8} bytes, "
            f"the file has {size}"
        )
        return message, cut
    elif "not fully covered" in why:
        return f"checkpoint {path} is truncated: {size} bytes, less than its header promises", cut
    elif kind == "text":
        message = f"checkpoint {path} is a text file, not a safetensors file"
    elif kind != "safetensors":
        message = f"checkpoint {path} is not a safetensors file (invalid header length {n})"
    elif "recursion limit" in why:
        message = f"checkpoint {path} is not a safetensors file (header is nested too deeply)"
    else:
        why = why.removeprefix("Error while deserializing header: ")
        message = f"checkpoint {path} has a malformed safetensors header ({why})"
    return message, _HINT_CKPT


def _brainseg_meta(path: Path, st_meta: Mapping[str, str]) -> dict[str, Any]:
    """The brainseg JSON of the safetensors metadata ``st_meta``, checked, with defaults."""
    if METADATA_KEY not in st_meta:
        raise BrainsegError(
            f"{path} is a safetensors file without brainseg metadata (not a brainseg checkpoint)",
            hint=_HINT_CKPT,
        )
    try:
        meta = load_metadata_json(st_meta[METADATA_KEY], "metadata")
    except (TypeError, ValueError) as exc:
        why = str(exc) if "nested" in str(exc) else "not JSON"
        raise BrainsegError(
            f"checkpoint {path} has unreadable brainseg metadata ({why})", hint=_HINT_CKPT
        ) from exc
    if not isinstance(meta, dict):
        raise BrainsegError(
            f"checkpoint {path} has malformed brainseg metadata (not a JSON object)",
            hint=_HINT_CKPT,
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BrainsegError(
            f"checkpoint {path} has no valid format_version in its metadata (found {version!r})",
            hint=_HINT_CKPT,
        )
    if version > FORMAT_VERSION:
        raise BrainsegError(
            f"checkpoint {path} has format version {version} (written by brainseg "
            f"{meta.get('brainseg_version', '?')}); this brainseg {__version__} reads format "
            f"{FORMAT_VERSION} and older",
            hint="upgrade brainseg (in its clone: git pull, then pip install .; docs/install.md)",
        )
    if not isinstance(meta.get("architecture"), dict):
        raise BrainsegError(f"checkpoint {path} metadata has no architecture", hint=_HINT_CKPT)
    check_metadata_types(meta, path, _HINT_CKPT)
    check_metadata(meta, path)  # image size, threshold, postprocess: bounded where read
    for key, value in DEFAULTS.items():
        meta.setdefault(key, json.loads(json.dumps(value)))
    return meta


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The brainseg metadata of a checkpoint, without torch; BrainsegError (naming the file)
    for a missing, foreign, truncated or too new file."""
    path = Path(path)
    return _brainseg_meta(path, _open_header(path)[0])


def _dump(meta: Mapping[str, Any]) -> str:
    try:
        return json.dumps(json_safe(meta), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise BrainsegError(
            f"checkpoint metadata is not JSON-serializable: {exc}",
            hint="pass plain values (numbers, strings, lists, dicts)",
        ) from exc


def _unwrap(model: nn.Module) -> UNetVGG16:
    """The UNetVGG16 inside DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    for _ in range(4):
        if hasattr(model, "config") and callable(model.config):
            return model  # type: ignore[return-value]
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            break
        model = inner
    raise TypeError(f"save_checkpoint needs a brainseg UNetVGG16, got {type(model).__name__}")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    metadata: Mapping[str, Any] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    *,
    force: bool = True,
) -> Path:
    """Write ``model``'s weights and metadata to ``path`` (safetensors, atomic); ``extra``
    tensors (optimizer state...) go under ``EXTRA_PREFIX``."""
    import torch
    from safetensors.torch import save

    path = Path(path)
    net = _unwrap(model)
    arch = net.config()
    meta: dict[str, Any] = {
        **json.loads(json.dumps(DEFAULTS)),
        **(metadata or {}),
        # the fields this module owns
        "format_version": FORMAT_VERSION,
        "brainseg_version": __version__,
        "torch_version": str(torch.__version__),
        "architecture": arch,
        "normalization": arch["normalization"],
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in net.state_dict().items()}
    for name, t in (extra or {}).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"extra[{name!r}] is a {type(t).__name__}, not a tensor")
        tensors[EXTRA_PREFIX + str(name)] = t.detach().to("cpu").contiguous()
    # Serialise in memory, then write with plain file I/O so disk-full surfaces as OSError
    # (safetensors' own writer does not report it) and the atomic rename keeps the old file.
    data = save(tensors, metadata={"format": "pt", METADATA_KEY: _dump(meta)})
    with atomic_path(path, force=force) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def load_tensors(
    path: str | os.PathLike[str], prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, or only those under ``prefix`` (with the prefix removed):
    ``prefix=EXTRA_PREFIX`` gives back the ``extra`` of save_checkpoint."""
    read_metadata(path)
    start = prefix or ""
    return _read_tensors(
        Path(path), lambda name: name[len(start) :] if name.startswith(start) else None
    )


def _read_tensors(path: Path, rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """The tensors whose ``rename(name)`` is not None, under that new name."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                new = rename(name)
                if new is not None:
                    out[new] = f.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise BrainsegError(
            f"checkpoint {path} is corrupt: {first_line(exc)}", hint=_HINT_CKPT
        ) from exc
    return out


def load_checkpoint(
    path: str | os.PathLike[str], device: Any = "cpu"
) -> tuple[UNetVGG16, dict[str, Any]]:
    """The model (in eval mode, on ``device``) and metadata; BrainsegError naming the file for
    anything that is not a valid brainseg checkpoint."""
    import torch

    from brainseg.model.unet import UNetVGG16, state_mismatch

    path = Path(path)
    st_meta, header_shapes = _open_header(path)
    meta = _brainseg_meta(path, st_meta)

    def build() -> UNetVGG16:
        try:
            return UNetVGG16.from_config(meta["architecture"])
        except BrainsegError as exc:
            raise BrainsegError(
                f"checkpoint {path} has an invalid architecture: {exc.message}",
                hint=exc.hint or _HINT_CKPT,
            ) from exc
        except (TypeError, ValueError, OverflowError) as exc:
            raise BrainsegError(
                f"checkpoint {path} has an invalid architecture: {exc}", hint=_HINT_CKPT
            ) from exc

    # Check the architecture against the header's tensor shapes on the "meta" device first
    # (no memory): an edited or damaged header must not make us allocate gigabytes for a
    # model that cannot match the stored tensors (found by tests/test_properties.py).
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    stored = {k: v for k, v in sorted(header_shapes.items()) if not k.startswith(EXTRA_PREFIX)}
    problems = state_mismatch(shapes, stored)
    if problems:
        raise BrainsegError(
            f"checkpoint {path}: tensors do not match its architecture "
            f"{json.dumps(meta['architecture'], sort_keys=True)}: {problems}",
            hint="the file was edited or written by incompatible code; use another checkpoint",
        )
    model = build()
    # The extra tensors (optimizer state, up to 2x the weights) are not read at all; the
    # shapes safe_open gave are those of the tensors it reads.
    weights = _read_tensors(path, lambda name: None if name.startswith(EXTRA_PREFIX) else name)
    model.load_state_dict(weights, strict=True)
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model, meta


def copy_with_metadata(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    updates: Mapping[str, Any],
    *,
    force: bool = False,
) -> Path:
    """Copy checkpoint ``src`` to ``dst`` (may be ``src`` with ``force=True``) with top-level
    metadata keys replaced, atomically, streaming the tensor bytes unchanged (no torch)."""
    src, dst = Path(src), Path(dst)
    meta = read_metadata(src)
    bad = [k for k in updates if k in _PROTECTED]
    if bad:
        raise BrainsegError(
            f"cannot change {', '.join(bad)} of checkpoint {src} by a metadata update",
            hint="these describe the stored tensors",
        )
    meta.update(dict(updates))
    check_metadata(meta, src)  # the new threshold and post-processing, by the rule reads use
    header, n = _raw_header(src)
    header["__metadata__"] = {**(header.get("__metadata__") or {}), METADATA_KEY: _dump(meta)}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    with atomic_path(dst, force=force) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        fin.seek(8 + n)
        fout.write(struct.pack("<Q", len(raw)))
        fout.write(raw)
        shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)
    return dst
