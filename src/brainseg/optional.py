"""Optional packages: import one, or say in one line what to install (exit 2).

brainseg's full install (``pip install .``) brings everything but the volume readers; a
torch-free deployment (docs/predict.md, "CPU-only deployment") installs brainseg without its
dependencies and adds only what the ONNX predict path uses. A command that needs a package
such a venv lacks says so in one line naming the pip command, never "internal error".

:func:`require` is the check a command makes before it starts; :func:`missing_package_error`
turns a ``ModuleNotFoundError`` raised deeper down into the same line (``brainseg.cli.app.main``
calls it, so no lazy import anywhere needs its own try/except).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from brainseg.errors import BrainsegError

#: Importable top-level module -> (pip package(s), brainseg extra that brings it or None, use).
PACKAGES: dict[str, tuple[str, str | None, str]] = {
    "nibabel": ("nibabel SimpleITK", "volumes", "reading NIfTI / DICOM volumes"),
    "SimpleITK": ("nibabel SimpleITK", "volumes", "reading NIfTI / DICOM volumes"),
    "pydicom": ("pydicom", "volumes", "writing DICOM series"),
    "highdicom": ("highdicom", "volumes", "writing DICOM SEG (--format dicom-seg)"),
    "matplotlib": ("matplotlib", None, "drawing plots (Dice plot, report.html, curves)"),
    "onnx": ("onnx", None, "reading or writing ONNX graphs"),
    "onnxscript": ("onnxscript", None, "ONNX export"),
    "onnxruntime": ("onnxruntime", None, "running .onnx models"),
    "openvino": ("openvino", "openvino", "running .onnx models with OpenVINO"),
    "torch": ("torch torchvision", None, "training, export or a .safetensors checkpoint"),
    "torchvision": ("torch torchvision", None, "training, export or a .safetensors checkpoint"),
    "scipy": ("scipy", None, "post-processing or metrics"),
    "tensorboard": ("tensorboard", "tensorboard", "--logger tensorboard"),
    "mlflow": ("mlflow-skinny", "mlflow", "--logger mlflow"),
    "huggingface_hub": ("huggingface_hub", "hub", "a model on the Hugging Face Hub (hf://)"),
    "ray": ("'ray[data]'", "ray", "--engine ray"),
    "typer": ("typer rich", None, "the brainseg command"),
    "rich": ("typer rich", None, "the brainseg command"),
    "click": ("typer rich", None, "the brainseg command"),
}


def install_line(module: str) -> str:
    """``pip install ...`` for ``module`` (the extra too, where one brings it)."""
    packages, extra, _ = PACKAGES.get(module, (module, None, ""))
    if extra is None:
        return f"pip install {packages}"
    return f"pip install {packages} (the brainseg[{extra}] extra)"


def missing(module: str, what: str | None = None) -> BrainsegError:
    """The one-line error for ``module`` not being installed (exit 2)."""
    use = what or PACKAGES.get(module, ("", None, "this command"))[2]
    return BrainsegError(
        f"{use} needs the {module} package, which is not installed: {install_line(module)}",
    )


def require(module: str, what: str | None = None) -> ModuleType:
    """Import ``module`` or raise :func:`missing`'s BrainsegError naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = (getattr(exc, "name", None) or module).split(".")[0]
        raise missing(top if top in PACKAGES else module, what) from exc


def missing_package_error(exc: BaseException) -> BrainsegError | None:
    """The one-line error for a ``ModuleNotFoundError`` of a known optional package, else None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    return missing(top) if top in PACKAGES else None
