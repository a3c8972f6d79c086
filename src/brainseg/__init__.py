"""brainseg: brain tumor segmentation in MRI (UNet with a VGG16 encoder).

Heavy names (torch-based) are resolved lazily so that ``import brainseg`` and
``brainseg --help`` stay fast and torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["BrainsegError", "Predictor", "UNetVGG16", "__version__", "load_checkpoint"]

from brainseg.errors import BrainsegError

if TYPE_CHECKING:  # pragma: no cover
    from brainseg.inference.predict import Predictor
    from brainseg.model.checkpoint import load_checkpoint
    from brainseg.model.unet import UNetVGG16

_LAZY = {
    "UNetVGG16": "brainseg.model.unet",
    "load_checkpoint": "brainseg.model.checkpoint",
    "Predictor": "brainseg.inference.predict",
}


def __getattr__(name: str) -> Any:
    """Import torch-heavy modules only when their names are first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'brainseg' has no attribute {name!r}")
