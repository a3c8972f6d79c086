"""ONNX export of a brainseg checkpoint, checked against PyTorch; fp16 and static int8 variants.

The exported graph takes ``image``: float32 N x 3 x H x W raw pixel values in [0, 255] (the
normalisation is inside the model) and returns ``logits``: float32 N x 1 x H x W, with the
batch, height and width axes dynamic (H and W multiples of 32). Everything a deployer needs
(image size, threshold, post-processing, normalisation, architecture, brainseg version and
training metrics) is stored in the file's ``metadata_props``:

- ``brainseg``: the checkpoint's full metadata as JSON, plus an ``onnx`` entry (variant,
  opset, source checkpoint);
- ``image_size``, ``threshold``, ``normalization``, ``postprocess``, ``architecture``,
  ``metrics``, ``brainseg_version``, ``variant``: the same values as plain keys for tools that
  list metadata (Netron, onnxruntime's ``custom_metadata_map``). Readers take the plain keys
  over the JSON blob (see :func:`brainseg.predict.metadata_from_props`).

Exporter: torch 2.14's default ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript)
handles dynamic height and width for this model (checked on two sizes after every export);
it natively targets opset 18, so lower opsets are produced with onnx's version converter. The
legacy TorchScript exporter is kept only as a fallback when the dynamo path fails.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import console
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.fsutil import atomic_path
from brainseg.predict import ONNX_INPUT, ONNX_METADATA_KEY, ONNX_OUTPUT, sigmoid

#: Opsets accepted by ``--opset``.
MIN_OPSET = 13
DEFAULT_OPSET = 17
#: The per-patient Dice loss int8 may cost compared with fp32 before we warn.
INT8_DICE_TOLERANCE = 0.01
#: Slices compared between PyTorch and onnxruntime (a batch), and calibration slices.
VERIFY_SLICES = 8
DEFAULT_CALIB_SLICES = 64

_CONV_OPS = ("Conv", "ConvTranspose")


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how the ONNX model compares with PyTorch."""

    path: Path
    variant: str  # fp32, fp16 or int8
    opset: int
    exporter: str  # dynamo or torchscript
    size_mb: float
    image_size: tuple[int, int]
    data_source: str  # what the verification inputs were
    checks: list[dict[str, Any]] = field(default_factory=list)
    int8: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (``--json``)."""
        return {
            "output": str(self.path),
            "variant": self.variant,
            "opset": self.opset,
            "exporter": self.exporter,
            "size_mb": round(self.size_mb, 3),
            "image_size": list(self.image_size),
            "verified_on": self.data_source,
            "checks": self.checks,
            "int8": self.int8,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 2),
        }


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """The exporters print progress on stdout; keep stdout for results (--json)."""
    with (
        contextlib.redirect_stdout(sys.stderr if console.state.debug else io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def _size_of(meta: dict[str, Any]) -> tuple[int, int]:
    from brainseg.predict import _as_size

    return _as_size(meta.get("image_size")) or (256, 256)


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def set_metadata(model: Any, meta: dict[str, Any], variant: str, opset: int, source: str) -> None:
    """Write brainseg's ``metadata_props`` (the JSON blob and the plain keys) into ``model``."""
    from brainseg import __version__

    full = dict(meta)
    full["onnx"] = {
        "variant": variant,
        "opset": opset,
        "source": source,
        "input": f"{ONNX_INPUT}: float32 N x 3 x H x W raw pixels 0..255, H and W multiples of 32",
        "output": f"{ONNX_OUTPUT}: float32 N x 1 x H x W (sigmoid -> probability)",
    }
    props = {
        ONNX_METADATA_KEY: _json(full),
        "brainseg_version": str(meta.get("brainseg_version", __version__)),
        "exported_by": f"brainseg {__version__}",
        "variant": variant,
        "image_size": _json(meta.get("image_size")),
        "threshold": repr(float(meta.get("threshold", 0.5))),
        "normalization": str(meta.get("normalization", "")),
        "postprocess": _json(meta.get("postprocess") or {}),
        "architecture": _json(meta.get("architecture") or {}),
        "metrics": _json(meta.get("metrics") or {}),
    }
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "brainseg"
    model.producer_version = __version__
    model.doc_string = (
        "brainseg UNet-VGG16 brain tumor segmentation: image float32 "
        "N x 3 x H x W (0..255) -> logits N x 1 x H x W"
    )


def _name_dynamic_axes(model: Any) -> None:
    """Call the dynamic axes batch / height / width on the graph's input and output."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        for i, name in ((0, "batch"), (2, "height"), (3, "width")):
            if len(dims) > i:
                dims[i].Clear()
                dims[i].dim_param = name
    del model.graph.value_info[:]  # stale symbolic names; onnxruntime infers them again


# --------------------------------------------------------------------------- fp32 export


def torch_to_onnx(model: Any, path: Path, image_size: tuple[int, int], opset: int) -> str:
    """Export ``model`` (eval mode, CPU) to ``path`` with dynamic N, H, W; returns the exporter."""
    import onnx
    import torch

    dummy = torch.rand(2, 3, *image_size) * 255.0
    dyn = torch.export.Dim.DYNAMIC
    exporter = "dynamo"
    try:
        with _quiet_stdout():
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                opset_version=max(18, opset),
                dynamic_shapes={"x": {0: dyn, 2: dyn, 3: dyn}},
            )
    except Exception as exc:  # keep going with the legacy exporter, but say so
        if _os_error(exc) is not None:
            raise  # disk full / unwritable folder: the other exporter would fail the same way
        console.warn(
            f"the dynamo ONNX exporter failed ({type(exc).__name__}: "
            f"{first_line(exc, 200)}); "
            "using the TorchScript exporter"
        )
        exporter = "torchscript"
        axes = {0: "batch", 2: "height", 3: "width"}
        with _quiet_stdout():
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                opset_version=opset,
                do_constant_folding=True,
                dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: axes},
            )
    proto = onnx.load(str(path))
    current = max(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset
    )
    if current != opset:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as exc:
            raise BrainsegError(
                f"cannot convert the exported model from opset {current} to {opset}: {exc}",
                hint="use --opset 18 (the exporter's native opset) or higher",
            ) from exc
        _fix_converted_reduce_ops(proto)
    _name_dynamic_axes(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise BrainsegRuntimeError(
            f"the ONNX export at opset {opset} is invalid: {first_line(exc)}",
            hint="try --opset 18 (the exporter's native opset); run with --debug and report it",
        ) from exc
    onnx.save(proto, str(path))
    return exporter


def _fix_converted_reduce_ops(proto: Any) -> None:
    """onnx's 18 -> 17 converter moves ``axes`` to an attribute but leaves the opset-18-only
    ``noop_with_empty_axes`` on ReduceMean & co (ReduceSum has it since opset 13)."""
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= 18:
        return
    for node in proto.graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes" or a.i != 0]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)


# --------------------------------------------------------------------------- fp16


def _fp16_region(graph: Any) -> tuple[set[int], list[str]]:
    """Indices of the nodes computed in fp16: the first convolution and everything after it.

    The normalisation before the first convolution stays fp32: a per-image z-score squares
    pixel values up to 255^2, beyond fp16's range.
    """
    region: set[int] = set()
    tainted: set[str] = set()
    fp32_nodes: list[str] = []
    for i, node in enumerate(graph.node):
        if node.op_type in _CONV_OPS or any(x in tainted for x in node.input):
            region.add(i)
            tainted.update(node.output)
        else:
            fp32_nodes.append(node.name)
    return region, fp32_nodes


def convert_fp16(model: Any) -> Any:
    """An fp16 copy of a float32 ONNX model whose input and output stay float32.

    Float initializers used by the fp16 part become float16; Cast nodes are inserted where an
    fp32 tensor enters it and before the output. Implemented with the onnx API
    (onnxconverter-common is not a dependency).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inferred = shape_inference.infer_shapes(model)
    g = model.graph
    types: dict[str, int] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for name, t in inits.items():
        types[name] = t.data_type
    region, _ = _fp16_region(g)
    users: dict[str, set[int]] = {}
    for i, node in enumerate(g.node):
        for x in node.input:
            users.setdefault(x, set()).add(i)
    keep_fp32 = {"Resize": {1, 2}, "Upsample": {1}}  # roi / scales stay float32
    typed_outputs = {
        "Cast",
        "Shape",
        "Size",
        "ConstantOfShape",
        "ArgMax",
        "ArgMin",
        "NonZero",
        "EyeLike",
        "RandomNormalLike",
        "RandomUniformLike",
    }
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    half: set[str] = set()  # tensors that now hold float16
    casts: dict[str, str] = {}
    new_nodes = []
    new_inits = []
    for i, node in enumerate(g.node):
        if i in region:
            for k, x in enumerate(node.input):
                if not x or k in keep_fp32.get(node.op_type, set()) or x in half:
                    continue
                if types.get(x) != FLOAT:
                    continue
                if x in inits:
                    arr = numpy_helper.to_array(inits[x]).astype(np.float16)
                    if users.get(x, set()) <= region:
                        inits[x].CopyFrom(numpy_helper.from_array(arr, x))
                        half.add(x)
                        continue
                    if x not in casts:
                        casts[x] = f"{x}__fp16"
                        new_inits.append(numpy_helper.from_array(arr, casts[x]))
                    node.input[k] = casts[x]
                    continue
                if x not in casts:
                    casts[x] = f"{x}__fp16"
                    new_nodes.append(
                        helper.make_node("Cast", [x], [casts[x]], to=HALF, name=f"{x}__cast_fp16")
                    )
                node.input[k] = casts[x]
            if node.op_type not in typed_outputs:
                half.update(o for o in node.output if types.get(o) == FLOAT)
        new_nodes.append(node)
    g.initializer.extend(new_inits)
    outputs = {o.name for o in g.output}
    for out in outputs & half:
        renamed = f"{out}__fp16"
        for node in new_nodes:
            for lst in (node.output, node.input):
                for k, x in enumerate(lst):
                    if x == out:
                        lst[k] = renamed
        new_nodes.append(
            helper.make_node("Cast", [renamed], [out], to=FLOAT, name=f"{out}__cast_fp32")
        )
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- data


@dataclass
class _Slices:
    """Verification / calibration arrays at the model's image size."""

    images: np.ndarray  # N x H x W x 3 uint8
    masks: np.ndarray  # N x H x W bool
    patient_index: np.ndarray
    slice_number: np.ndarray
    patient_ids: list[str]
    source: str


def _load_slices(data: Path | None, size: tuple[int, int], tmp: Path) -> _Slices:
    """Slices of a kaggle_3m dataset at ``size``, or generated phantoms when ``data`` is None."""
    from brainseg.data.cache import load_dataset

    if data is None:
        from brainseg.data.synthetic import write_synthetic

        side = max(32, max(size) // 32 * 32)
        root = write_synthetic(tmp / "phantoms", patients=3, seed=0, size=side, slices=(8, 12))
        arrays = load_dataset(root, cache_dir=tmp / "cache")
        source = f"generated phantoms ({side}x{side})"
    else:
        arrays = load_dataset(data)
        source = str(data)
    arrays = arrays.resized(size)
    return _Slices(
        images=np.asarray(arrays.images).transpose(0, 2, 3, 1),
        masks=np.asarray(arrays.masks) != 0,
        patient_index=np.asarray(arrays.patient_index),
        slice_number=np.asarray(arrays.slice_number),
        patient_ids=list(arrays.patient_ids),
        source=source,
    )


def _pick(rows: np.ndarray, masks: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` rows, evenly spread, half of them with tumor when there are enough."""
    if len(rows) <= n:
        return rows
    tumor = rows[masks[rows].reshape(len(rows), -1).any(1)]
    k_t = min(len(tumor), n // 2)
    pick_t = (
        tumor[np.linspace(0, len(tumor) - 1, k_t).round().astype(int)]
        if k_t
        else np.zeros(0, dtype=rows.dtype)
    )
    rest = np.setdiff1d(rows, pick_t)
    k_r = n - k_t
    pick_r = rest[np.linspace(0, len(rest) - 1, k_r).round().astype(int)]
    return np.sort(np.concatenate([pick_t, pick_r]))


def _val_calib_patients(ids: list[str], split: Path | None) -> tuple[list[str], list[str]]:
    """(validation, calibration) patient ids: the split's val / train, else every fifth
    patient (sorted order) for validation and the rest for calibration."""
    if split is not None:
        from brainseg.data.split import load_split

        sp = load_split(split)
        val = [p for p in sp.patients("val") if p in ids]
        cal = [p for p in sp.patients("train") if p in ids]
        if not val or not cal:
            raise BrainsegError(
                f"split {split} has no val or no train patients in the calibration data",
                hint="make the split from the same dataset: brainseg split DATA -o splits.yaml",
            )
        return val, cal
    ordered = sorted(ids)
    if len(ordered) < 2:
        return ordered, ordered
    val = ordered[::5] if len(ordered) >= 5 else ordered[:1]
    return val, [p for p in ordered if p not in val]


# --------------------------------------------------------------------------- ORT helpers


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_logits(sess: Any, images: np.ndarray, batch: int = 8) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        x = np.ascontiguousarray(images[s : s + batch].transpose(0, 3, 1, 2), dtype=np.float32)
        out.append(sess.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0][:, 0])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _torch_logits(model: Any, images: np.ndarray, batch: int = 8) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch])).permute(0, 3, 1, 2)
            out.append(model(x.float().contiguous())[:, 0].numpy())
    return np.concatenate(out)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * inter / total


class _CalibReader:
    """onnxruntime's CalibrationDataReader over slices at the model's image size."""

    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self.images = images
        self.batch = batch
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.images):
            return None
        x = self.images[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {ONNX_INPUT: np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)}

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(fp32_path: Path, out_path: Path, calib_images: np.ndarray, tmp: Path) -> None:
    """Static QDQ int8 (per-channel weights, MinMax calibration); normalisation kept fp32."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src = fp32_path
    pre = tmp / "pre.onnx"
    with contextlib.suppress(Exception), _quiet_stdout():
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        src = pre
    proto = onnx.load(str(src))
    for i, node in enumerate(proto.graph.node):  # ensure every node has a name to exclude
        if not node.name:
            node.name = f"n{i}_{node.op_type}"
    _, fp32_nodes = _fp16_region(proto.graph)
    named = tmp / "named.onnx"
    onnx.save(proto, str(named))

    class Reader(_CalibReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    with _quiet_stdout():
        quantize_static(
            str(named),
            str(out_path),
            Reader(calib_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=fp32_nodes,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )


# --------------------------------------------------------------------------- main


def check_export_args(
    out: Path, *, fp16: bool, int8: bool, calib: Path | None, opset: int, force: bool
) -> None:
    """Refuse bad arguments (exit 2) before any work is done."""
    import onnx

    if fp16 and int8:
        raise BrainsegError(
            "--fp16 and --int8 cannot be combined", hint="export one variant per file"
        )
    if int8 and calib is None:
        raise BrainsegError(
            "--int8 needs calibration data: --calib DATA (a kaggle_3m folder)",
            hint="e.g. --int8 --calib data/kaggle_3m (with --split splits.yaml "
            "to calibrate on the training patients)",
        )
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise BrainsegError(
            f"--opset {opset} is outside {MIN_OPSET}..{top}", hint=f"use --opset {DEFAULT_OPSET}"
        )
    if out.suffix.lower() != ".onnx":
        raise BrainsegError(f"output {out} must end in .onnx", hint="e.g. -o model.onnx")
    if out.is_dir():
        raise BrainsegError(f"output {out} is a folder", hint="give a file name, e.g. model.onnx")
    if out.exists() and not force:
        raise BrainsegError(f"{out} already exists", hint="pass --force to overwrite it")


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (the exporters wrap it in their own exception types)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _clear_write_errors(fn: Callable[..., ExportReport]) -> Callable[..., ExportReport]:
    """A full disk (or an unwritable folder) while exporting is one clear error; the
    temporary folder is gone and an existing output is untouched (tests/faults)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> ExportReport:
        try:
            return fn(*args, **kwargs)
        except BrainsegError:
            raise
        except Exception as exc:
            cause = _os_error(exc)
            if cause is None:
                raise
            out = kwargs.get("out", args[1] if len(args) > 1 else "the output")
            if cause.errno == errno.ENOSPC:
                raise BrainsegRuntimeError(
                    f"disk full while exporting to {out}; an existing {Path(out).name} is intact",
                    hint="free some space (the export needs a few times the model's size) "
                    "and run the command again",
                ) from exc
            raise BrainsegRuntimeError(
                f"cannot write the export to {out}: {cause.strerror or cause}",
                hint="check the output folder exists and is writable",
            ) from exc

    return wrapper


@_clear_write_errors
def export_onnx(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    int8: bool = False,
    calib: str | os.PathLike[str] | None = None,
    *,
    split: str | os.PathLike[str] | None = None,
    verify_data: str | os.PathLike[str] | None = None,
    calib_slices: int = DEFAULT_CALIB_SLICES,
    force: bool = False,
) -> ExportReport:
    """Export a checkpoint to ONNX (fp32, fp16 or static int8), check it, verify it.

    Verification compares onnxruntime with PyTorch on slices of ``verify_data`` / ``calib``
    (or on generated phantoms) at the model's image size and at a second size: max absolute
    logit difference and Dice agreement of the thresholded masks. With ``int8`` the per-patient
    Dice of fp32 and int8 on the validation patients (``split``'s val, else every fifth) is
    compared; a loss above 0.01 is reported as a warning.
    """
    import onnx

    from brainseg import postprocess
    from brainseg.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    out = Path(out)
    calib_p = Path(calib) if calib is not None else None
    check_export_args(out, fp16=fp16, int8=int8, calib=calib_p, opset=opset, force=force)
    for name, p in (("--calib", calib_p), ("--verify-data", verify_data), ("--split", split)):
        if p is not None and not Path(p).exists():
            raise BrainsegError(f"{name} {p} does not exist", hint="check the path")
    model, meta = load_checkpoint(checkpoint, "cpu")
    model.eval()
    size = _size_of(meta)
    variant = "int8" if int8 else "fp16" if fp16 else "fp32"
    thr = float(meta.get("threshold", 0.5))
    post = meta.get("postprocess") or {}
    report_warnings: list[str] = []

    with tempfile.TemporaryDirectory(
        prefix=".brainseg-export-", dir=out.parent if out.parent.exists() else None
    ) as td:
        tmp = Path(td)
        fp32_path = tmp / "fp32.onnx"
        console.info(f"exporting {checkpoint} ({size[0]}x{size[1]}, opset {opset})")
        exporter = torch_to_onnx(model, fp32_path, size, opset)
        proto = onnx.load(str(fp32_path))
        set_metadata(proto, meta, "fp32", opset, Path(checkpoint).name)
        onnx.save(proto, str(fp32_path))

        data_dir = Path(verify_data) if verify_data is not None else calib_p
        slices = _load_slices(data_dir, size, tmp)
        val_ids, cal_ids = _val_calib_patients(slices.patient_ids, Path(split) if split else None)
        lookup = {p: i for i, p in enumerate(slices.patient_ids)}
        all_rows = np.arange(len(slices.images))
        verify_rows = _pick(all_rows, slices.masks, VERIFY_SLICES)
        vimg = slices.images[verify_rows]

        final_path = fp32_path
        if fp16:
            console.info("converting the weights to fp16 (input and output stay float32)")
            half = convert_fp16(proto)
            set_metadata(half, meta, "fp16", opset, Path(checkpoint).name)
            final_path = tmp / "fp16.onnx"
            onnx.save(half, str(final_path))
        int8_info: dict[str, Any] | None = None
        if int8:
            cal_rows = np.flatnonzero(np.isin(slices.patient_index, [lookup[p] for p in cal_ids]))
            cal_rows = _pick(cal_rows, slices.masks, max(1, int(calib_slices)))
            console.info(
                f"calibrating int8 on {len(cal_rows)} slices of {len(cal_ids)} "
                f"patient(s) of {slices.source}"
            )
            q_path = tmp / "int8.onnx"
            try:
                quantize_int8(fp32_path, q_path, slices.images[cal_rows], tmp)
            except BrainsegError:
                raise
            except Exception as exc:
                raise BrainsegRuntimeError(
                    f"int8 quantisation failed: {type(exc).__name__}: {exc}",
                    hint="run with --debug and report it",
                ) from exc
            qproto = onnx.load(str(q_path))
            set_metadata(qproto, meta, "int8", opset, Path(checkpoint).name)
            onnx.save(qproto, str(q_path))
            final_path = q_path
            int8_info = {"calibration_slices": len(cal_rows), "calibration_patients": len(cal_ids)}

        checked = onnx.load(str(final_path))
        try:
            onnx.checker.check_model(checked, full_check=True)
        except Exception as exc:
            raise BrainsegRuntimeError(
                f"the exported model fails onnx.checker: {exc}",
                hint="run with --debug and report it",
            ) from exc

        # ---- verification against PyTorch
        console.info(f"verifying against PyTorch on {len(vimg)} slices of {slices.source}")
        ref = _torch_logits(model, vimg)
        ref_mask = sigmoid(ref) >= thr
        h2, w2 = size[0] + 32, size[1] + 64  # a second size: the axes really are dynamic
        from brainseg.imageio import resize_image

        vimg2 = np.stack([resize_image(im, (h2, w2)) for im in vimg[:3]])
        ref2 = _torch_logits(model, vimg2)
        variants = [("fp32", fp32_path)] + ([(variant, final_path)] if variant != "fp32" else [])
        checks: list[dict[str, Any]] = []
        sessions = {}
        for name, path in variants:
            sess = _session(path)
            sessions[name] = sess
            t = time.perf_counter()
            got = _ort_logits(sess, vimg)
            ms = (time.perf_counter() - t) * 1000 / max(1, len(vimg))
            got1 = _ort_logits(sess, vimg[:1], batch=1)
            got2 = _ort_logits(sess, vimg2, batch=3)
            if got.shape != ref.shape or got2.shape != ref2.shape or got1.shape[0] != 1:
                raise BrainsegRuntimeError(
                    f"the {name} ONNX model returned shapes {got.shape} "
                    f"/ {got2.shape}, expected {ref.shape} / {ref2.shape}"
                )
            checks.append(
                {
                    "model": name,
                    "size_mb": round(path.stat().st_size / 1e6, 2),
                    "max_abs_diff": float(np.abs(got - ref).max()),
                    "max_abs_diff_2nd_size": float(np.abs(got2 - ref2).max()),
                    "second_size": [h2, w2],
                    "mask_dice_vs_torch": _dice(sigmoid(got) >= thr, ref_mask),
                    "ms_per_slice": round(ms, 1),
                }
            )
        if int8_info is not None:
            val_rows = np.flatnonzero(np.isin(slices.patient_index, [lookup[p] for p in val_ids]))
            console.info(
                f"comparing fp32 and int8 on {len(val_rows)} slices of "
                f"{len(val_ids)} validation patient(s)"
            )
            from brainseg.metrics import per_patient_dice

            gt = slices.masks[val_rows]
            pidx = slices.patient_index[val_rows]
            snum = slices.slice_number[val_rows]
            masks = {}
            for name in ("fp32", "int8"):
                prob = sigmoid(_ort_logits(sessions[name], slices.images[val_rows]))
                masks[name] = postprocess.apply_grouped(
                    prob,
                    pidx,
                    snum,
                    thr,
                    int(post.get("min_size") or 0),
                    bool(post.get("largest_component", False)),
                )
            d32 = float(np.mean(per_patient_dice(masks["fp32"], gt, pidx)))
            d8 = float(np.mean(per_patient_dice(masks["int8"], gt, pidx)))
            int8_info.update(
                {
                    "validation_patients": len(val_ids),
                    "validation_slices": len(val_rows),
                    "patient_dice_fp32": d32,
                    "patient_dice_int8": d8,
                    "dice_loss": d32 - d8,
                    "mask_dice_int8_vs_fp32": _dice(masks["int8"], masks["fp32"]),
                    "within_tolerance": (d32 - d8) <= INT8_DICE_TOLERANCE,
                    "tolerance": INT8_DICE_TOLERANCE,
                }
            )
            if d32 - d8 > INT8_DICE_TOLERANCE:
                msg = (
                    f"int8 loses {d32 - d8:.4f} mean per-patient Dice on the validation "
                    f"patients ({d8:.4f} vs fp32 {d32:.4f}), more than "
                    f"{INT8_DICE_TOLERANCE}: prefer the fp32 or fp16 export"
                )
                report_warnings.append(msg)
                console.warn(msg)
            elif gt.any() and len(val_ids) < 3:
                report_warnings.append("int8 Dice compared on fewer than 3 patients")

        with atomic_path(out, force=force) as dst:
            dst.write_bytes(final_path.read_bytes())

    return ExportReport(
        path=out,
        variant=variant,
        opset=opset,
        exporter=exporter,
        size_mb=out.stat().st_size / 1e6,
        image_size=size,
        data_source=slices.source,
        checks=checks,
        int8=int8_info,
        warnings=report_warnings,
        seconds=time.perf_counter() - t0,
    )


def report_rows(report: ExportReport) -> tuple[list[str], list[list[Any]]]:
    """The verification table: one row per ONNX variant compared with PyTorch."""
    cols = [
        "model",
        "MB",
        "max |Δlogit|",
        "max |Δlogit| 2nd size",
        "mask Dice vs torch",
        "ms/slice",
    ]
    rows = [
        [
            c["model"],
            f"{c['size_mb']:.1f}",
            f"{c['max_abs_diff']:.2e}",
            f"{c['max_abs_diff_2nd_size']:.2e}",
            c["mask_dice_vs_torch"],
            f"{c['ms_per_slice']:.1f}",
        ]
        for c in report.checks
    ]
    return cols, rows


def int8_rows(report: ExportReport) -> tuple[list[str], list[list[Any]]] | None:
    """The int8 Dice table (per-patient Dice on the validation patients), if int8."""
    q = report.int8
    if not q:
        return None
    cols = [
        "patients",
        "slices",
        "Dice fp32",
        "Dice int8",
        "loss",
        "int8 vs fp32 masks",
        "within 0.01",
    ]
    return cols, [
        [
            q["validation_patients"],
            q["validation_slices"],
            q["patient_dice_fp32"],
            q["patient_dice_int8"],
            q["dice_loss"],
            q["mask_dice_int8_vs_fp32"],
            "yes" if q["within_tolerance"] else "NO",
        ]
    ]


__all__: Sequence[str] = [
    "ExportReport",
    "convert_fp16",
    "export_onnx",
    "quantize_int8",
    "set_metadata",
    "torch_to_onnx",
]
