"""The fp16 and static int8 variants of an fp32 brainseg ONNX model.

Both keep the input normalisation (everything before the first convolution) in float32: a
per-image z-score squares pixel values up to 255^2, beyond fp16's range, and quantising it
would waste int8's range on raw pixels. :func:`split_at_first_conv` finds that boundary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainseg.export.graph import quiet_stdout
from brainseg.inference.predict import ONNX_INPUT

_CONV_OPS = ("Conv", "ConvTranspose")
#: Inputs that stay float32 in the fp16 part (Resize's roi / scales, Upsample's scales).
_KEEP_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
#: Ops whose outputs have a type of their own (not the type of their float inputs).
_TYPED_OUTPUTS = frozenset(
    {
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
)


def split_at_first_conv(graph: Any) -> tuple[set[int], list[str]]:
    """(indices of the nodes from the first convolution on: the reduced-precision part,
    names of the nodes before it: the input normalisation, kept float32)."""
    region: set[int] = set()
    tainted: set[str] = set()
    normalisation_nodes: list[str] = []
    for i, node in enumerate(graph.node):
        if node.op_type in _CONV_OPS or any(x in tainted for x in node.input):
            region.add(i)
            tainted.update(node.output)
        else:
            normalisation_nodes.append(node.name)
    return region, normalisation_nodes


# --------------------------------------------------------------------------- fp16
@dataclass
class _Fp16Graph:
    """The state of one fp16 conversion: element types, initializers, what is half now."""

    types: dict[str, int]
    inits: dict[str, Any]
    users: dict[str, set[int]]
    region: set[int]
    half: set[str] = field(default_factory=set)  # tensors that now hold float16
    casts: dict[str, str] = field(default_factory=dict)  # fp32 name -> its fp16 copy
    new_nodes: list[Any] = field(default_factory=list)
    new_inits: list[Any] = field(default_factory=list)

    def fp16_input(self, x: str) -> str:
        """The name of the float16 version of float32 tensor ``x`` (made once)."""
        from onnx import TensorProto, helper, numpy_helper

        if x in self.inits:
            arr = numpy_helper.to_array(self.inits[x]).astype(np.float16)
            if self.users.get(x, set()) <= self.region:  # only fp16 nodes read it: convert
                self.inits[x].CopyFrom(numpy_helper.from_array(arr, x))
                self.half.add(x)
                return x
            if x not in self.casts:
                self.casts[x] = f"{x}__fp16"
                self.new_inits.append(numpy_helper.from_array(arr, self.casts[x]))
            return self.casts[x]
        if x not in self.casts:
            self.casts[x] = f"{x}__fp16"
            self.new_nodes.append(
                helper.make_node(
                    "Cast", [x], [self.casts[x]], to=TensorProto.FLOAT16, name=f"{x}__cast_fp16"
                )
            )
        return self.casts[x]

    def convert_node(self, node: Any) -> None:
        """Feed float16 to a node of the fp16 part; its float outputs become float16."""
        from onnx import TensorProto

        keep = _KEEP_FP32_INPUTS.get(node.op_type, set())
        for k, x in enumerate(node.input):
            if not x or k in keep or x in self.half or self.types.get(x) != TensorProto.FLOAT:
                continue
            node.input[k] = self.fp16_input(x)
        if node.op_type not in _TYPED_OUTPUTS:
            self.half.update(o for o in node.output if self.types.get(o) == TensorProto.FLOAT)


def _element_types(model: Any) -> dict[str, int]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _cast_outputs_back(g: Any, state: _Fp16Graph) -> None:
    """Graph outputs that became float16 get a Cast back to float32 under their own name."""
    from onnx import TensorProto, helper

    for out in {o.name for o in g.output} & state.half:
        renamed = f"{out}__fp16"
        for node in state.new_nodes:
            for lst in (node.output, node.input):
                for k, x in enumerate(lst):
                    if x == out:
                        lst[k] = renamed
        state.new_nodes.append(
            helper.make_node(
                "Cast", [renamed], [out], to=TensorProto.FLOAT, name=f"{out}__cast_fp32"
            )
        )


def convert_fp16(model: Any) -> Any:
    """An fp16 copy of a float32 ONNX model whose input and output stay float32, with the
    onnx API (onnxconverter-common is not a dependency)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    users: dict[str, set[int]] = {}
    for i, node in enumerate(g.node):
        for x in node.input:
            users.setdefault(x, set()).add(i)
    state = _Fp16Graph(
        types=_element_types(model),
        inits={t.name: t for t in g.initializer},
        users=users,
        region=split_at_first_conv(g)[0],
    )
    for i, node in enumerate(g.node):
        if i in state.region:
            state.convert_node(node)
        state.new_nodes.append(node)
    g.initializer.extend(state.new_inits)
    _cast_outputs_back(g, state)
    del g.node[:]
    g.node.extend(state.new_nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- int8
def quantize_int8(fp32_path: Path, out_path: Path, calib_images: np.ndarray, tmp: Path) -> None:
    """Static QDQ int8 (per-channel weights, MinMax calibration); normalisation kept fp32;
    ``calib_images``: N x H x W x 3 uint8 slices at the model's image size."""
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
    with contextlib.suppress(Exception), quiet_stdout():
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        src = pre
    proto = onnx.load(str(src))
    for i, node in enumerate(proto.graph.node):  # ensure every node has a name to exclude
        if not node.name:
            node.name = f"n{i}_{node.op_type}"
    _, normalisation_nodes = split_at_first_conv(proto.graph)
    named = tmp / "named.onnx"
    onnx.save(proto, str(named))

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """Batches of the calibration slices, as the model's input."""

        def __init__(self, images: np.ndarray, batch: int = 8) -> None:
            self.images, self.batch, self.pos = images, batch, 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.pos >= len(self.images):
                return None
            x = self.images[self.pos : self.pos + self.batch]
            self.pos += self.batch
            return {ONNX_INPUT: np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)}

        def rewind(self) -> None:
            self.pos = 0

    with quiet_stdout():
        quantize_static(
            str(named),
            str(out_path),
            Reader(calib_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=normalisation_nodes,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
