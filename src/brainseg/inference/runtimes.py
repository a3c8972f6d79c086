"""Which runtime runs a model file, at which precision; and the OpenVINO backend.

``--runtime auto`` picks onnxruntime or OpenVINO for an ``.onnx`` file from
:data:`AUTO_TABLE`: the CPU's kind (``/proc/cpuinfo``) and the file's variant -> runtime and
precision, each row measured with ``benchmarks/inference.py`` (docs/export.md). A CPU kind
nobody measured keeps onnxruntime, so ``auto`` is never slower than brainseg was before
OpenVINO. Nothing here imports torch, onnxruntime or openvino at import time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainseg.choices import PRECISIONS, RUNTIMES
from brainseg.errors import BrainsegError, first_line
from brainseg.model.onnxfile import check_onnx_io, metadata_from_props, proba_from_logits
from brainseg.optional import require
from brainseg.settings import image_size_of

CPUINFO = Path("/proc/cpuinfo")
#: Environment variable: the runtime used when none is given (``--runtime`` / ``runtime=None``).
RUNTIME_ENV = "BRAINSEG_RUNTIME"
#: CPU flags of native bf16 arithmetic (Linux /proc/cpuinfo names).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: Input sizes OpenVINO compiles a static-shape model for (more share a dynamic one).
MAX_STATIC_SHAPES = 4


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The first processor's ``flags`` (x86) or ``Features`` (Arm); empty when unknown."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def native_bf16(flags: set[str]) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return any(f in flags for f in BF16_FLAGS)


def cpu_kind(flags: set[str]) -> str:
    """The row of :data:`AUTO_TABLE` for these CPU flags."""
    if not flags:
        return "unknown"
    if "amx_bf16" in flags or "amx_int8" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "vnni"
    if "avx2" in flags:
        return "avx2"
    return "other"


@dataclass(frozen=True)
class AutoRow:
    """What ``auto`` runs on one CPU kind, per file variant, and where that was measured."""

    fp32: tuple[str, str]  # (runtime, precision) for an fp32 file
    int8: tuple[str, str]  # for an int8 (QDQ) file
    source: str


_ORT = AutoRow(
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    "OpenVINO not measured on this CPU kind: onnxruntime, as before",
)
#: CPU kind -> choice. fp16 files always run with onnxruntime (made for GPUs; not measured).
AUTO_TABLE: dict[str, AutoRow] = {
    "amx": AutoRow(
        ("openvino", "bf16"),
        ("openvino", "int8"),
        "measured on a 2-core AMX Xeon (issue 24): OpenVINO bf16 9.3x and int8 14.9x torch "
        "fp32 at batch 1, onnxruntime int8 3.0x",
    ),
    "avx512_bf16": AutoRow(
        ("openvino", "bf16"),
        ("openvino", "int8"),
        "measured on a 2-core AVX512-BF16 AMD EPYC (docs/benchmarks.md, 2026-12-05)",
    ),
    "vnni": _ORT,
    "avx2": _ORT,
    "other": _ORT,
    "unknown": _ORT,
}

CPU_KINDS = {
    "amx": "AMX (amx_bf16 / amx_int8)",
    "avx512_bf16": "AVX512-BF16 (no AMX)",
    "vnni": "AVX512-VNNI / AVX-VNNI (no bf16)",
    "avx2": "AVX2 only",
    "other": "no AVX2 (or not x86)",
    "unknown": "unknown (no /proc/cpuinfo flags)",
}


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime and precision a model file runs with, and why."""

    runtime: str  # torch, onnxruntime, openvino
    precision: str  # fp32, bf16, fp16, int8
    requested: str  # auto, or the runtime asked for
    reason: str
    cpu: str  # the CPU kind (a key of CPU_KINDS)

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a sys.modules entry of None (a blocked import)
        return False


def check_choice(option: str, value: str, allowed: Sequence[str]) -> str:
    """``value`` normalised when it is one of ``allowed``; else BrainsegError naming ``option``."""
    v = str(value).strip().lower().lstrip(".")
    if v not in allowed:
        raise BrainsegError(
            f"{option} {value!r} is not one of {', '.join(allowed)}",
            hint=f"use {option} {allowed[0]}",
        )
    return v


def choose(
    suffix: str,
    variant: str,
    runtime: str | None = "auto",
    precision: str | None = "auto",
    device: str = "auto",
    flags: set[str] | None = None,
    installed: Callable[[str], bool] = _installed,
) -> RuntimeChoice:
    """The runtime and precision of one model file (pure: the tests give ``flags``); ``runtime``
    None: $BRAINSEG_RUNTIME if it names one for this kind of file, else ``auto``."""
    value = runtime if runtime is not None else os.environ.get(RUNTIME_ENV) or "auto"
    asked = check_choice("--runtime", value, RUNTIMES)
    if runtime is None and (asked == "torch") == (suffix == ".onnx"):
        asked = "auto"  # $BRAINSEG_RUNTIME names a runtime of the other kind of file
    prec = check_choice("--precision", precision or "auto", PRECISIONS)
    flags = cpu_flags() if flags is None else flags
    kind = cpu_kind(flags)
    dev = str(device or "auto").lower()
    if suffix != ".onnx":
        if asked not in ("auto", "torch"):
            raise BrainsegError(
                f"--runtime {asked} runs .onnx files; this model is a PyTorch checkpoint "
                f"({suffix})",
                hint="export it once (brainseg export CHECKPOINT -o model.onnx) and predict "
                "with the .onnx file, or use --runtime torch",
            )
        if prec == "bf16":  # opt-in: bf16 autocast on the CPU (2.2x fp32 measured)
            if dev not in ("cpu", "auto"):
                raise BrainsegError(
                    f"--precision bf16 with a checkpoint is for the CPU (PyTorch's bf16 "
                    f"autocast on a CPU with native bf16), not --device {device}",
                    hint="use --device cpu, or drop --precision",
                )
            _check_bf16(flags, "openvino")  # the CPU check (torch runs it, not openvino)
            return RuntimeChoice("torch", "bf16", asked, "a PyTorch checkpoint, bf16 asked", kind)
        return RuntimeChoice("torch", "fp32", asked, "a PyTorch checkpoint", kind)
    if asked == "torch":
        raise BrainsegError(
            "--runtime torch runs .safetensors checkpoints; this model is an .onnx file",
            hint="use --runtime auto, onnxruntime or openvino",
        )
    if asked == "auto":
        run, reason = _auto_runtime(kind, variant, prec, dev, installed)
    else:
        run, reason = asked, "asked for"
    if run == "openvino" and dev.startswith("cuda"):
        raise BrainsegError(
            f"--runtime openvino runs on the CPU here; --device {device} asks for a GPU",
            hint="use --device cpu (or auto), or --runtime onnxruntime for CUDA",
        )
    if prec == "bf16":
        _check_bf16(flags, run)
    if variant == "int8" or run != "openvino":
        out = variant  # an int8 file is int8; onnxruntime runs a file in its own precision
    elif prec == "auto":
        table_bf16 = asked != "auto" or AUTO_TABLE[kind].fp32[1] == "bf16"
        out = "bf16" if variant == "fp32" and native_bf16(flags) and table_bf16 else variant
    else:
        out = prec if variant == "fp32" else variant
    return RuntimeChoice(run, out, asked, reason, kind)


def _auto_runtime(
    kind: str, variant: str, prec: str, dev: str, installed: Callable[[str], bool]
) -> tuple[str, str]:
    """``auto``'s runtime for this CPU kind and file variant, and why."""
    if dev.startswith("cuda") or (dev == "auto" and _ort_has_cuda()):
        return "onnxruntime", "a CUDA GPU: onnxruntime's CUDA provider"
    if prec == "bf16":
        return "openvino", "--precision bf16 (OpenVINO's bf16 inference precision)"
    if variant == "fp16":
        return "onnxruntime", "an fp16 file (made for GPUs): onnxruntime"
    row = AUTO_TABLE[kind]
    run = (row.int8 if variant == "int8" else row.fp32)[0]
    reason = f"{CPU_KINDS[kind]}: {row.source}"
    if run == "openvino" and not installed("openvino"):
        return "onnxruntime", (
            f"{CPU_KINDS[kind]}: OpenVINO would be faster but is not installed: "
            "pip install openvino (the brainseg[openvino] extra)"
        )
    if run == "onnxruntime" and not installed("onnxruntime") and installed("openvino"):
        return "openvino", "onnxruntime is not installed"
    return run, reason


def _check_bf16(flags: set[str], runtime: str) -> None:
    if runtime != "openvino":
        raise BrainsegError(
            f"--precision bf16 needs --runtime openvino ({runtime} runs this file in its own "
            "precision)",
            hint="add --runtime openvino, or drop --precision",
        )
    if not native_bf16(flags):
        raise BrainsegError(
            "--precision bf16: this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16 "
            "in /proc/cpuinfo); bf16 would be emulated, slower than fp32",
            hint="use --precision fp32 (or auto)",
        )


def _ort_has_cuda() -> bool:
    if not _installed("onnxruntime"):
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def variant_of(props: Mapping[str, str]) -> str:
    """fp32 / fp16 / int8 from an ONNX file's metadata_props (fp32 when not said)."""
    v = str(props.get("variant", "fp32")).strip().lower()
    return v if v in ("fp32", "fp16", "int8") else "fp32"


class OpenVinoModel:
    """An .onnx file read by OpenVINO (not compiled yet): its metadata props and variant."""

    def __init__(self, path: Path) -> None:
        self.ov = require("openvino", "--runtime openvino")
        self.path = path
        self.core = self.ov.Core()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise BrainsegError(
                f"cannot load ONNX model {path}: not a valid ONNX file ({first_line(exc, 200)})",
                hint="is the file complete? re-export it with `brainseg export`",
            ) from exc
        self.props = _rt_props(self.model)
        self.variant = variant_of(self.props)


def _rt_props(model: Any) -> dict[str, str]:
    """The ONNX metadata_props as OpenVINO keeps them (rt_info['framework'])."""
    if not model.has_rt_info(["framework"]):
        return {}
    out = {}
    for key in model.get_rt_info(["framework"]).astype(dict):
        try:
            out[str(key)] = str(model.get_rt_info(["framework", key]).astype(str))
        except (RuntimeError, UnicodeDecodeError):  # damaged strings: the check names it
            continue
    return out


class OpenVinoBackend:
    """A brainseg ONNX model run with OpenVINO on the CPU (numpy only); a batch runs as
    one-image requests on parallel streams (THROUGHPUT hint) unless its size is 1 (LATENCY)."""

    name = "openvino"
    choice: RuntimeChoice  # set by brainseg.inference.predict.open_backend

    def __init__(
        self, read: OpenVinoModel, precision: str = "fp32", threads: int = 0, batch_size: int = 8
    ) -> None:
        self.path = read.path
        self.metadata = metadata_from_props(read.props, read.path)
        check_onnx_io(
            read.path,
            [(_name(i), _type_name(i), _dims(i)) for i in read.model.inputs],
            [(_name(o), "tensor(float)", _dims(o)) for o in read.model.outputs],
        )
        self.throughput = batch_size > 1
        self.config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "THROUGHPUT" if self.throughput else "LATENCY",
        }
        if precision == "int8":  # the float parts: OpenVINO's own default
            self.config.pop("INFERENCE_PRECISION_HINT")
        if threads > 0:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._read = read
        self._shapes: dict[tuple[int, int] | None, tuple[Any, Any, Any]] = {}
        self._out: np.ndarray | None = None
        # the model's own size now: a file OpenVINO cannot compile fails here
        self._compiled(image_size_of(self.metadata))

    def _compiled(self, hw: tuple[int, int] | None) -> tuple[Any, Any, Any]:
        """(compiled model, request, async queue) for inputs of size ``hw``: static shapes, 1.5-2x
        faster, up to :data:`MAX_STATIC_SHAPES` sizes; further sizes share one dynamic model."""
        if hw not in self._shapes and hw is not None and len(self._shapes) >= MAX_STATIC_SHAPES:
            hw = None
        if hw not in self._shapes:
            model = self._read.model.clone()
            if hw is not None:
                model.reshape([1, 3, hw[0], hw[1]])
            try:
                compiled = self._read.core.compile_model(model, "CPU", self.config)
            except Exception as exc:
                raise BrainsegError(
                    f"{self.path}: OpenVINO cannot compile this model: {first_line(exc, 200)}",
                    hint="the ONNX file is damaged or was not written by brainseg export; "
                    "export it again, or use --runtime onnxruntime",
                ) from exc
            nreq = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            queue = self._read.ov.AsyncInferQueue(compiled, max(1, nreq))
            queue.set_callback(self._done)
            self._shapes[hw] = (compiled, compiled.create_infer_request(), queue)
        return self._shapes[hw]

    def _done(self, request: Any, index: int) -> None:
        if self._out is not None:
            self._out[index] = request.get_output_tensor(0).data[0, 0]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """N x 1 x H x W -> N x H x W logits."""
        try:
            _, request, queue = self._compiled((int(x.shape[2]), int(x.shape[3])))
            self._out = np.empty((x.shape[0], *x.shape[2:]), dtype=np.float32)
            if not self.throughput:
                for i in range(len(x)):
                    request.infer({0: x[i : i + 1]})
                    self._out[i] = request.get_output_tensor(0).data[0, 0]
            else:  # one-image requests on OpenVINO's parallel streams
                for i in range(len(x)):
                    queue.start_async({0: x[i : i + 1]}, i)
                queue.wait_all()
            return self._out
        except MemoryError:
            raise
        except Exception as exc:
            raise BrainsegError(
                f"{self.path}: OpenVINO cannot run this model: {first_line(exc, 200)}",
                hint="the ONNX file is damaged or was not written by brainseg export; "
                "export it again",
            ) from exc
        finally:
            self._out = None

    def proba(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x H x W float32 probabilities (H, W multiples of 32)."""
        return proba_from_logits(self._logits, images, tta)


def _name(port: Any) -> str:
    return next(iter(port.get_names()), "?")


def _type_name(port: Any) -> str:
    t = port.get_element_type().get_type_name()
    return {"f32": "tensor(float)"}.get(t, f"tensor({t})")


def _dims(port: Any) -> list[Any]:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        return []
    return [d.get_length() if d.is_static else "?" for d in shape]


def describe(predictor: Any) -> str:
    """What runs the model and why, e.g. ``openvino bf16, auto: AVX512-BF16 (no AMX): ...``."""
    info = predictor.runtime_info
    if info["requested"] == "auto":
        return f"{info['label']}, auto: {info['reason']}"
    return f"{info['label']}, --runtime {info['requested']}"
