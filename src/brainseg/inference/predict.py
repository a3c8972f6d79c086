"""Inference: a :class:`Predictor` over brainseg checkpoints or ONNX files.

A ``.safetensors`` file runs with PyTorch (:class:`TorchBackend`, torch imported lazily), an
``.onnx`` file with onnxruntime (:class:`OnnxBackend`) or OpenVINO
(:mod:`brainseg.inference.runtimes`), numpy only: torch is never imported on that path (a
test checks ``sys.modules``), so a CPU-only deployment needs neither torch nor torchvision.

Several models form an ensemble: the mean of their probabilities. Test-time augmentation
(TTA) is the mean of the probabilities of the image and of its horizontal and vertical flips.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainseg.data import imageio
from brainseg.devices import resolve_device
from brainseg.ensemble import expand_model_paths
from brainseg.errors import BrainsegError, first_line
from brainseg.inference import postprocess, runtimes
from brainseg.model.checkpoint import check_model_file, load_checkpoint
from brainseg.model.modelfile import FILE_KINDS, sniff_model_file
from brainseg.model.onnxfile import (
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    ONNX_OUTPUT,
    check_onnx_io,
    metadata_from_props,
    open_session,
    proba_from_logits,
    sigmoid,
)
from brainseg.settings import MODEL_HINT, SIZE_MULTIPLE, InferenceSettings, image_size_of

#: The ONNX contract (brainseg.model.onnxfile) is re-exported for export and the tests.
__all__ = [
    "ONNX_INPUT",
    "ONNX_METADATA_KEY",
    "ONNX_OUTPUT",
    "OnnxBackend",
    "Predictor",
    "TorchBackend",
    "check_onnx_io",
    "metadata_from_props",
    "open_backend",
    "read_onnx_metadata",
    "sigmoid",
]

if TYPE_CHECKING:
    from brainseg.inference.runtimes import RuntimeChoice


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The brainseg metadata of an ONNX file (onnxruntime only; BrainsegError if foreign)."""
    return OnnxBackend(Path(path), "cpu").metadata


class TorchBackend:
    """A brainseg checkpoint run with PyTorch (torch imported here, lazily)."""

    name = "torch"
    choice: RuntimeChoice  # set by open_backend

    def __init__(
        self, path: Path, device: str = "auto", threads: int = 0, bf16: bool = False
    ) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BrainsegError(
                f"{path} is a PyTorch checkpoint but PyTorch is not installed",
                hint="pip install torch, or export it once to ONNX (brainseg export "
                "CHECKPOINT -o model.onnx) and predict with the .onnx file",
            ) from exc

        self.torch = torch
        if threads > 0:
            torch.set_num_threads(int(threads))  # process-wide: torch has no per-model setting
        self.device = resolve_device(device)
        model, meta = load_checkpoint(path, self.device)
        model.eval()
        # oneDNN convolutions run faster on NHWC tensors on CPU (see docs/predict.md).
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.metadata = dict(meta)
        self.bf16 = bool(bf16)  # bf16 autocast (--precision bf16, CPUs with native bf16)

    def proba(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x H x W float32 probabilities (H, W multiples of 32)."""
        torch = self.torch
        amp = torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)
        with torch.inference_mode(), amp:
            t = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            x = t.permute(0, 3, 1, 2).float().contiguous(memory_format=fmt)
            p = torch.sigmoid(self.model(x)[:, 0].float())
            if tta:
                p = p + torch.sigmoid(self.model(x.flip(-1))[:, 0].float()).flip(-1)
                p = p + torch.sigmoid(self.model(x.flip(-2))[:, 0].float()).flip(-2)
                p = p / 3.0
            return p.cpu().numpy().astype(np.float32, copy=False)


class OnnxBackend:
    """A brainseg ONNX model run with onnxruntime (numpy only, never torch)."""

    name = "onnxruntime"
    choice: RuntimeChoice  # set by open_backend

    def __init__(self, path: Path, device: str = "auto", threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = path
        providers = _ort_providers(device, ort.get_available_providers())
        self.session = open_session(path, providers, threads)
        try:
            self.props = dict(self.session.get_modelmeta().custom_metadata_map)
            self.metadata = metadata_from_props(self.props, path)
            ins, outs = self.session.get_inputs(), self.session.get_outputs()
            check_onnx_io(
                path,
                [(i.name, i.type, i.shape) for i in ins],
                [(o.name, o.type, o.shape) for o in outs],
            )
        except (UnicodeDecodeError, RuntimeError) as exc:  # damaged names / metadata strings
            raise BrainsegError(
                f"cannot read the metadata of ONNX model {path} ({type(exc).__name__})",
                hint="is the file complete? re-export it with `brainseg export`",
            ) from exc
        self.input_name = ins[0].name
        self.output_name = outs[0].name

    def _logits(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's own error types (Fail, InvalidArgument, ...)
            raise BrainsegError(
                f"{self.path}: onnxruntime cannot run this model: {first_line(exc, 200)}",
                hint="the ONNX file is damaged or was not written by brainseg export; "
                "export it again",
            ) from exc
        want = (x.shape[0], 1, *x.shape[2:])
        if getattr(out, "shape", None) != want:
            got = "x".join(map(str, getattr(out, "shape", ())))
            raise BrainsegError(
                f"{self.path}: the model's output is {got} for an input of "
                f"{'x'.join(map(str, x.shape))}; expected {'x'.join(map(str, want))} (one logit "
                "per input pixel)",
                hint="the ONNX file was not written by brainseg export; export it again",
            )
        return np.asarray(out)[:, 0]

    def proba(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x H x W float32 probabilities (H, W multiples of 32)."""
        return proba_from_logits(self._logits, images, tta)


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


Backend = TorchBackend | OnnxBackend | Any  # Any: runtimes.OpenVinoBackend (same contract)


def open_backend(
    path: str | os.PathLike[str],
    device: str = "auto",
    *,
    runtime: str | None = None,
    precision: str | None = None,
    threads: int = 0,
    batch_size: int = 8,
) -> Backend:
    """The backend for one model file; its ``choice`` says what runs, at which precision, why."""
    p = check_model_file(path)
    suffix = p.suffix.lower()  # .onnx or .safetensors (MODEL_SUFFIXES)
    if int(threads) < 0:
        raise BrainsegError(f"--threads {threads} must be 0 (the runtime's default) or more")
    flags = runtimes.cpu_flags()

    def choose(variant: str) -> runtimes.RuntimeChoice:
        return runtimes.choose(suffix, variant, runtime, precision, device, flags)

    first = choose("fp32")  # refuses impossible combinations before the file is read
    _check_content(p, suffix)
    backend: Any
    if suffix != ".onnx":
        backend = TorchBackend(p, device, threads, bf16=first.precision == "bf16")
        choice = first
    elif first.runtime == "openvino" or choose("int8").runtime == "openvino":
        model = runtimes.OpenVinoModel(p)
        choice = choose(model.variant)
        if choice.runtime == "openvino":
            backend = runtimes.OpenVinoBackend(model, choice.precision, threads, batch_size)
        else:
            backend = OnnxBackend(p, device, threads)
    else:
        backend = OnnxBackend(p, device, threads)
        choice = choose(runtimes.variant_of(backend.props))
    backend.choice = choice
    return backend


def _check_content(path: Path, suffix: str) -> None:
    """A model file whose content is not what its suffix says: name what it is."""
    try:
        kind = sniff_model_file(path)
    except OSError as exc:
        raise BrainsegError(f"cannot read model {path}: {exc.strerror or exc}") from exc
    expected = "onnx" if suffix == ".onnx" else "safetensors"
    if kind == expected or kind not in ("onnx", "safetensors"):
        return  # the backend's own checks name truncated or foreign files
    right = ".onnx" if kind == "onnx" else ".safetensors"
    raise BrainsegError(
        f"{path} is {FILE_KINDS[kind]}, not {FILE_KINDS[expected]} (its name ends in {suffix})",
        hint=f"rename it to {path.with_suffix(right).name}; brainseg picks the backend by suffix",
    )


class Predictor:
    """One model or an ensemble (mean probability) behind one ``predict_proba``; the
    ``metadata`` is the first model's, and an ensemble's models share one image size."""

    def __init__(
        self,
        model_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        device: str = "auto",
        batch_size: int = 8,
        tta: bool = False,
        *,
        runtime: str | None = None,
        precision: str | None = None,
        threads: int = 0,
    ) -> None:
        """``runtime``, ``precision``, ``threads``: see :mod:`brainseg.inference.runtimes` (None:
        $BRAINSEG_RUNTIME, else auto; 0 threads: the runtime's default)."""
        if isinstance(model_paths, (str, os.PathLike)):
            model_paths = [model_paths]
        # An ensemble.json stands for its fold models and carries their tuned settings.
        self.paths, ensemble_settings = expand_model_paths(list(model_paths))
        if not self.paths:
            raise BrainsegError("no model given", hint=MODEL_HINT)
        if int(batch_size) < 1:
            raise BrainsegError(f"batch size {batch_size} must be at least 1")
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.backends = [
            open_backend(
                p,
                device,
                runtime=runtime,
                precision=precision,
                threads=threads,
                batch_size=self.batch_size,
            )
            for p in self.paths
        ]  # each checked its metadata as it read it
        self.metadata: dict[str, Any] = {**self.backends[0].metadata, **(ensemble_settings or {})}
        sizes = {image_size_of(b.metadata) for b in self.backends}
        if len(sizes) > 1:
            raise BrainsegError(
                "the models of the ensemble were trained at different image sizes: "
                + ", ".join(
                    f"{p} {image_size_of(b.metadata)}"
                    for p, b in zip(self.paths, self.backends, strict=True)
                ),
                hint="ensemble models trained at the same --image-size",
            )

    @property
    def backend(self) -> str:
        """The backend name(s): torch, onnxruntime, openvino or several (for messages)."""
        return "+".join(sorted({b.name for b in self.backends}))

    @property
    def runtime(self) -> str:
        """What runs the model(s), e.g. ``openvino bf16`` (ensembles: each distinct one)."""
        return " + ".join(dict.fromkeys(b.choice.label for b in self.backends))

    @property
    def runtime_info(self) -> dict[str, Any]:
        """The first model's runtime choice and ``label`` (all models'), for --json."""
        return {**self.backends[0].choice.as_dict(), "label": self.runtime}

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) the model was trained at, or None when the metadata lacks it."""
        return image_size_of(self.metadata)

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
            total = sum(b.proba(chunk, self.tta) for b in self.backends)
            out[start : start + len(chunk)] = total / np.float32(len(self.backends))
        return out

    def predict_proba(self, images: np.ndarray, *, pad: bool = False) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x H x W float32 tumor probabilities at the input size:
        resized to the model's size and back (bilinear), or with ``pad`` (or no size in the
        metadata) zero-padded to multiples of 32 and cropped."""
        images = _check_batch(images)
        n, h, w = images.shape[:3]
        if n == 0:
            return np.zeros((0, h, w), dtype=np.float32)
        x, padded = imageio.to_model_input(images, self.image_size, pad=pad)
        return postprocess.proba_at_size(self.predict_model_size(x), (h, w), padded=padded)


def load_predictor(
    models: Sequence[str | os.PathLike[str]], settings: InferenceSettings, factory: Any = None
) -> Any:
    """The :class:`Predictor` of ``settings`` for predict, eval and the Ray workers (``factory``:
    tests); a model file a third-party reader chokes on is one error naming it."""
    # only the runtime settings given, so a predictor factory that predates them still works
    given = {k: getattr(settings, k, None) for k in ("runtime", "precision", "threads")}
    try:
        return (factory or Predictor)(
            [Path(m) for m in models],
            device=settings.device,
            batch_size=settings.batch_size,
            tta=settings.tta,
            **{k: v for k, v in given.items() if v not in (None, 0)},
        )
    except BrainsegError:
        raise
    except Exception as exc:
        raise BrainsegError(
            f"cannot load model {', '.join(map(str, models))}: {type(exc).__name__}: {exc}",
            hint="is the file complete? re-export or re-train it",
        ) from exc


def _check_batch(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise BrainsegError(f"images have shape {a.shape}; expected N x H x W x 3 uint8")
    if a.dtype != np.uint8:
        raise BrainsegError(f"images have dtype {a.dtype}; expected uint8 pixel values 0..255")
    return a
