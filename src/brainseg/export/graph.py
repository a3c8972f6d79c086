"""The fp32 ONNX graph: torch -> ONNX with dynamic batch / height / width, and its metadata.

torch's default ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) handles dynamic
height and width for this model; it natively targets opset 18, so lower opsets are produced
with onnx's version converter. The legacy TorchScript exporter is the fallback when the
dynamo path fails (``tests/test_export.py`` forces that failure).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainseg import __version__, console
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.fsutil import json_safe
from brainseg.inference.predict import ONNX_INPUT, ONNX_METADATA_KEY, ONNX_OUTPUT
from brainseg.settings import resolve

#: The dynamic axes of the graph's input and output (index -> name).
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """The exporters print progress on stdout; keep stdout for results (--json)."""
    with (
        contextlib.redirect_stdout(sys.stderr if console.state.debug else io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (the exporters wrap it in their own exception types)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _json(v: Any) -> str:
    """A metadata value as plain JSON (fsutil.json_safe: NaN -> null, numpy -> numbers)."""
    return json.dumps(json_safe(v), sort_keys=True, default=str)


def set_metadata(model: Any, meta: dict[str, Any], variant: str, opset: int, source: str) -> None:
    """Write brainseg's ``metadata_props`` (the JSON blob and the plain keys) into ``model``."""
    post = resolve(meta).post
    onnx: dict[str, Any] = {
        "variant": variant,
        "opset": opset,
        "source": source,
        "input": f"{ONNX_INPUT}: float32 N x 3 x H x W raw pixels 0..255, H and W multiples of 32",
        "output": f"{ONNX_OUTPUT}: float32 N x 1 x H x W (sigmoid -> probability)",
    }
    if meta.get("ensemble_members"):
        onnx["output"] += (
            f"; the mean probability of {meta['ensemble_members']} fold models, as a logit"
        )
    props = {
        ONNX_METADATA_KEY: _json({**meta, "onnx": onnx}),
        "brainseg_version": str(meta.get("brainseg_version", __version__)),
        "exported_by": f"brainseg {__version__}",
        "variant": variant,
        "image_size": _json(meta.get("image_size")),
        "threshold": repr(post.threshold),
        "normalization": str(meta.get("normalization", "")),
        "postprocess": _json(meta.get("postprocess") or {}),
        "architecture": _json(meta.get("architecture") or {}),
        "metrics": _json(meta.get("metrics") or {}),
    }
    if meta.get("ensemble_members"):
        props["ensemble_members"] = str(int(meta["ensemble_members"]))
        props["ensemble_folds"] = _json(meta.get("ensemble", {}).get("folds", []))
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
        for i, name in DYNAMIC_AXES.items():
            if len(dims) > i:
                dims[i].Clear()
                dims[i].dim_param = name
    del model.graph.value_info[:]  # stale symbolic names; onnxruntime infers them again


def _torch_export(model: Any, dummy: Any, path: Path, opset: int, dynamo: bool) -> None:
    import torch

    axes = dict(DYNAMIC_AXES)
    how: dict[str, Any]
    if dynamo:  # natively opset 18; lower opsets come from onnx's version converter
        dyn = torch.export.Dim.DYNAMIC
        how = dict(external_data=False, verbose=False, opset_version=max(18, opset))
        how["dynamic_shapes"] = {"x": {i: dyn for i in DYNAMIC_AXES}}
    else:
        how = dict(opset_version=opset, do_constant_folding=True)
        how["dynamic_axes"] = {ONNX_INPUT: axes, ONNX_OUTPUT: axes}
    with quiet_stdout():
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=dynamo,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            **how,
        )


def _onnx_opset(proto: Any, default: int) -> int:
    return max(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=default
    )


def _convert_opset(proto: Any, opset: int) -> Any:
    """``proto`` at ``opset`` (onnx's version converter when the exporter wrote another)."""
    current = _onnx_opset(proto, opset)
    if current == opset:
        return proto
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(proto, opset)
    except Exception as exc:
        raise BrainsegError(
            f"cannot convert the exported model from opset {current} to {opset}: {exc}",
            hint="use --opset 18 (the exporter's native opset) or higher",
        ) from exc
    _fix_converted_reduce_ops(proto)
    return proto


def torch_to_onnx(model: Any, path: Path, image_size: tuple[int, int], opset: int) -> str:
    """Export ``model`` (eval mode, CPU) to ``path`` with dynamic N, H, W; returns the exporter."""
    import onnx
    import torch

    dummy = torch.rand(2, 3, *image_size) * 255.0
    exporter = "dynamo"
    try:
        _torch_export(model, dummy, path, opset, dynamo=True)
    except Exception as exc:  # keep going with the legacy exporter, but say so
        if os_error(exc) is not None:
            raise  # disk full / unwritable folder: the other exporter would fail the same way
        console.warn(
            f"the dynamo ONNX exporter failed ({type(exc).__name__}: "
            f"{first_line(exc, 200)}); "
            "using the TorchScript exporter"
        )
        exporter = "torchscript"
        _torch_export(model, dummy, path, opset, dynamo=False)
    proto = _convert_opset(onnx.load(str(path)), opset)
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
    if _onnx_opset(proto, 0) >= 18:
        return
    for node in proto.graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes" or a.i != 0]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)
