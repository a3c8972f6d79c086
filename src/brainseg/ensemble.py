"""Fold ensembles as one file: ``ensemble.json`` lists the fold checkpoints and their settings.

``brainseg cv`` writes the manifest next to its fold folders::

    {"format": "brainseg-ensemble", "version": 1,
     "models": ["fold_0/last.safetensors", "fold_1/last.safetensors", ...],
     "threshold": 0.45, "postprocess": {"min_size": 4, "largest_component": true},
     "selection": {...}, "tuning": {...}}

Model paths are relative to the manifest's folder (the run folder can be moved or copied
as a whole); absolute paths are accepted too. ``threshold`` and ``postprocess`` have the
shape of a checkpoint's metadata, so code that reads a model's stored post-processing
(:func:`brainseg.settings.resolve`) reads an ensemble's the same way.

Only the standard library here: the manifest is read on the torch-free ONNX path too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brainseg.errors import BrainsegError
from brainseg.fsutil import atomic_write_text

FORMAT = "brainseg-ensemble"
VERSION = 1
#: The file name ``brainseg cv`` gives its manifest.
MANIFEST_NAME = "ensemble.json"
#: The suffix that marks a MODEL argument as an ensemble manifest.
ENSEMBLE_SUFFIX = ".json"
_HINT = "pass an ensemble.json written by `brainseg cv` (runs/cv/expN/ensemble.json)"


def is_manifest(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an ensemble manifest (by its ``.json`` suffix)."""
    return Path(path).suffix.lower() == ENSEMBLE_SUFFIX


def write_ensemble(
    path: str | os.PathLike[str],
    model_paths: Sequence[str | os.PathLike[str]],
    threshold: float,
    min_size: int,
    largest: bool,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write the manifest atomically, ``model_paths`` relative to its folder; ``info`` adds
    documentation keys (how the models and the settings were chosen)."""
    path = Path(path)
    folder = path.parent.resolve()
    resolved = [Path(m).resolve() for m in model_paths]
    rel = [
        p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p) for p in resolved
    ]
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "models": rel,
        "threshold": float(threshold),
        "postprocess": {"min_size": int(min_size), "largest_component": bool(largest)},
        **dict(info or {}),
    }
    _check_doc(doc, path)
    return atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def load_ensemble(path: str | os.PathLike[str]) -> tuple[list[Path], dict[str, Any]]:
    """``(model_paths, settings)`` of a manifest: the model files (checked to exist) usable from
    the current folder, and the other keys in the shape of a checkpoint's metadata."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BrainsegError(f"ensemble file {path} does not exist", hint=_HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainsegError(f"cannot read ensemble file {path}: {exc}", hint=_HINT) from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BrainsegError(
            f"ensemble file {path} is not valid JSON: {exc.msg} (line {exc.lineno})", hint=_HINT
        ) from exc
    _check_doc(doc, path)
    models = []
    for m in doc["models"]:
        p = path.parent / m  # an absolute m stays as it is
        if not p.is_file():
            raise BrainsegError(
                f"model {m} of ensemble {path} does not exist (looked for {p})",
                hint="keep the ensemble's folder together (its fold_k/ folders), or re-run "
                "`brainseg cv --resume` on it",
            )
        models.append(p)
    settings = {k: v for k, v in doc.items() if k not in ("format", "version", "models")}
    return models, settings


def expand_model_paths(
    paths: Sequence[str | os.PathLike[str]],
) -> tuple[list[Path], dict[str, Any] | None]:
    """The model paths with a manifest replaced by its checkpoints, and its settings (None
    without one). A manifest must be the only path: with others, whose post-processing applies
    would be unclear."""
    manifests = [p for p in paths if is_manifest(p)]
    if not manifests:
        return [Path(p) for p in paths], None
    if len(paths) > 1:
        raise BrainsegError(
            f"an ensemble file ({manifests[0]}) must be the only MODEL, got {len(paths)} models",
            hint="pass either one ensemble.json or model files",
        )
    return load_ensemble(manifests[0])


def _check_doc(doc: Any, path: Path) -> None:
    """Refuse a manifest that is not one, naming the file and the bad key."""

    def bad(what: str) -> BrainsegError:
        return BrainsegError(f"ensemble file {path}: {what}", hint=_HINT)

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f'not a brainseg ensemble (no "format": "{FORMAT}")')
    if doc.get("version") != VERSION:
        raise bad(f"unsupported version {doc.get('version')!r} (this brainseg reads {VERSION})")
    models = doc.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise bad('"models" must be a non-empty list of checkpoint paths')
    thr = doc.get("threshold")
    # NaN and inf fail the range check too
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0.0 <= thr <= 1.0:
        raise bad(f"threshold {thr!r} must be a number in [0, 1]")
    pp = doc.get("postprocess")
    if (
        not isinstance(pp, dict)
        or not isinstance(pp.get("min_size"), int)
        or isinstance(pp.get("min_size"), bool)
        or pp["min_size"] < 0
        or not isinstance(pp.get("largest_component"), bool)
    ):
        raise bad('"postprocess" must be {"min_size": integer >= 0, "largest_component": bool}')
