"""A cross-validation ensemble (``ensemble.json``) as ONE ONNX graph: the mean of its folds.

Each fold checkpoint is exported on its own (:func:`brainseg.export.graph.torch_to_onnx`);
the fold graphs are then merged into one model (:func:`merge_folds`): every fold's nodes and
initializers get a prefix (``fold0/``...), all folds read the one ``image`` input, and a head
turns their logits into the mean probability, written back as a logit so the file keeps the
single-model contract (``image`` -> ``logits``; predict's ONNX backend applies the sigmoid)::

    p = mean_k sigmoid(l_k)        q = mean_k sigmoid(-l_k)   (= 1 - p, without cancellation)
    logits = log(max(p, eps)) - log(max(q, eps))              so sigmoid(logits) = p / (p + q)

``q`` is computed from the folds' negated logits instead of ``1 - p`` so the logit stays exact
where the probability is close to 1 (float32 cannot hold ``1 - p`` there); ``eps`` bounds the
logit at about +-69. :func:`ensemble_logits` is the same head in numpy (the torch reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainseg.errors import BrainsegError
from brainseg.inference.predict import ONNX_INPUT, ONNX_OUTPUT, sigmoid

#: The smallest probability the head takes the log of (keeps the logit finite: |logit| <= 69).
ENSEMBLE_EPS = 1e-30
#: protobuf's limit on one serialised ONNX model (weights inside the file).
MAX_PROTO_BYTES = 2**31 - 2**20
#: Manifest keys that become the model's own metadata (not copied under ``ensemble``).
_SKIP_MANIFEST_KEYS = ("threshold", "postprocess")


def fold_prefix(k: int) -> str:
    return f"fold{k}/"


def fold_names(model_paths: Sequence[Path]) -> list[str]:
    """A name per fold model: its folder (``fold_0``...) when the folders differ, else its stem."""
    parents = [p.parent.name for p in model_paths]
    if len(set(parents)) == len(parents) and all(parents):
        return parents
    return [p.stem for p in model_paths]


def ensemble_logits(fold_logits: Sequence[np.ndarray]) -> np.ndarray:
    """The merged graph's output from the folds' logits (numpy, float32; see the module doc)."""
    ls = [np.asarray(x, dtype=np.float32) for x in fold_logits]
    p = np.mean([sigmoid(x) for x in ls], axis=0, dtype=np.float32)
    q = np.mean([sigmoid(-x) for x in ls], axis=0, dtype=np.float32)
    eps = np.float32(ENSEMBLE_EPS)
    return (np.log(np.maximum(p, eps)) - np.log(np.maximum(q, eps))).astype(np.float32)


def merge_folds(folds: Sequence[Any]) -> Any:
    """One ModelProto running every fold graph (fp32 or fp16, float32 in and out, one opset)
    on the one input and averaging them (module doc); metadata is set afterwards."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    first = folds[0]
    total = sum(f.ByteSize() for f in folds)
    if total >= MAX_PROTO_BYTES:
        raise BrainsegError(
            f"the {len(folds)} fold models together are {total / 1e9:.1f} GB, over the 2 GB "
            "one ONNX file can hold",
            hint="export with --fp16 (half the size), or fewer folds in the ensemble.json",
        )
    nodes: list[Any] = []
    inits: list[Any] = []
    functions: list[Any] = []
    head: list[Any] = []  # per fold: its probability p_k and q_k (see the module docstring)
    for k, proto in enumerate(folds):
        pre = fold_prefix(k)
        renamed = compose.add_prefix(proto, pre)
        for node in renamed.graph.node:
            for i, x in enumerate(node.input):
                if x == pre + ONNX_INPUT:
                    node.input[i] = ONNX_INPUT
        nodes.extend(renamed.graph.node)
        inits.extend(renamed.graph.initializer)
        functions.extend(renamed.functions)
        out = pre + ONNX_OUTPUT
        head += [
            helper.make_node("Sigmoid", [out], [pre + "prob"], name=pre + "prob"),
            helper.make_node("Neg", [out], [pre + "neg_logits"], name=pre + "neg"),
            helper.make_node("Sigmoid", [pre + "neg_logits"], [pre + "q"], name=pre + "q"),
        ]
    inits.append(numpy_helper.from_array(np.array(ENSEMBLE_EPS, np.float32), "ensemble/eps"))
    head += [
        helper.make_node("Mean", [fold_prefix(k) + "prob" for k in range(len(folds))], ["p"]),
        helper.make_node("Mean", [fold_prefix(k) + "q" for k in range(len(folds))], ["q"]),
        helper.make_node("Max", ["p", "ensemble/eps"], ["p_clipped"]),
        helper.make_node("Max", ["q", "ensemble/eps"], ["q_clipped"]),
        helper.make_node("Log", ["p_clipped"], ["log_p"]),
        helper.make_node("Log", ["q_clipped"], ["log_q"]),
        helper.make_node("Sub", ["log_p", "log_q"], [ONNX_OUTPUT]),
    ]
    for i, node in enumerate(head):
        node.name = node.name or f"ensemble/{node.op_type.lower()}_{i}"
    graph = helper.make_graph(
        nodes + head,
        "brainseg_ensemble",
        [onnx.ValueInfoProto.FromString(first.graph.input[0].SerializeToString())],
        [
            helper.make_tensor_value_info(
                ONNX_OUTPUT, TensorProto.FLOAT, ["batch", 1, "height", "width"]
            )
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=list(first.opset_import), functions=functions)
    model.ir_version = first.ir_version
    onnx.checker.check_model(model)
    return model


def ensemble_metadata(
    fold_metas: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    names: Sequence[str],
    manifest: Path,
) -> dict[str, Any]:
    """The merged file's metadata: the first fold's, with the manifest's threshold and
    post-processing, the cv's out-of-fold score as ``metrics`` and what the ensemble is made
    of under ``ensemble``."""
    meta = dict(fold_metas[0])
    meta["threshold"] = settings["threshold"]
    meta["postprocess"] = dict(settings["postprocess"])
    info = {k: v for k, v in settings.items() if k not in _SKIP_MANIFEST_KEYS}
    tuning = info.get("tuning")
    meta["metrics"] = {}  # one fold's validation metrics would misdescribe the ensemble
    if isinstance(tuning, Mapping):  # the full search grid stays in the manifest
        info["tuning"] = {k: v for k, v in tuning.items() if k != "grid"}
        if isinstance(tuning.get("after"), Mapping):
            meta["metrics"] = {
                "cv_out_of_fold": {"objective": tuning.get("objective"), **tuning["after"]}
            }
    meta["ensemble_members"] = len(names)
    meta["ensemble"] = {
        "members": len(names),
        "folds": list(names),
        "combine": "mean of the folds' sigmoid probabilities, output as a logit",
        "manifest": manifest.name,
        "fold_metrics": {n: m.get("metrics") or {} for n, m in zip(names, fold_metas, strict=True)},
        **info,
    }
    return meta


def check_same_size(sizes: Sequence[tuple[int, int] | None], paths: Sequence[Path]) -> None:
    """The folds of one graph must share the training image size (and know it)."""
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{p} {s}" for p, s in zip(paths, sizes, strict=True))
        raise BrainsegError(
            f"the models of the ensemble were trained at different image sizes: {listed}",
            hint="ensemble models trained at the same --image-size",
        )
