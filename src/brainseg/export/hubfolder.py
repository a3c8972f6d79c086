"""``brainseg export --hub-folder DIR``: a folder ready for ``huggingface-cli upload``.

The folder holds what a Hugging Face model repository needs and nothing brainseg uploads
itself (the official client does that):

* ``model.safetensors``: the checkpoint, byte for byte (not for an ensemble.json: its fold
  models live in several files; the ensemble is in ``model.onnx``);
* ``model.onnx``: the export (fp32, ``--fp16`` or ``--int8``), verified as any export;
* ``README.md``: the Hub's YAML front matter (:func:`front_matter`) over the model card of
  the ONNX file (:func:`brainseg.model.card.card_markdown`, the same card ``--card`` writes);
* ``config.json``: which file is the model and its inference settings (:func:`hub_config`).

``hf://OWNER/NAME`` and ``brainseg info DIR`` read such a folder (:mod:`brainseg.model.hub`).
Every number in the front matter comes from the card; a figure the card lacks is left out.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from brainseg.errors import BrainsegError
from brainseg.fsutil import atomic_path, atomic_write_text, json_safe
from brainseg.model.card import as_mapping, card_from_metadata, card_markdown, read_model_metadata
from brainseg.model.hub import CONFIG_FILE

ONNX_FILE = "model.onnx"
CHECKPOINT_FILE = "model.safetensors"
README_FILE = "README.md"
#: Every file the folder gets (an ensemble gets no model.safetensors).
FILES = (CHECKPOINT_FILE, ONNX_FILE, README_FILE, CONFIG_FILE)
#: The dataset every brainseg card names (its Kaggle slug, as `brainseg download lgg` uses it).
DATASET = "mateuszbuda/lgg-mri-segmentation"
TAGS = ["medical-imaging", "brain-mri", "glioma", "segmentation", "unet", "onnx", "safetensors"]


def check_folder(folder: Path, force: bool) -> None:
    """Refuse (exit 2) a folder that is a file, or that already holds the files (no --force)."""
    if folder.exists() and not folder.is_dir():
        raise BrainsegError(f"--hub-folder {folder} is a file", hint="give a folder name")
    there = [f for f in FILES if (folder / f).exists()]
    if there and not force:
        raise BrainsegError(
            f"--hub-folder {folder} already holds {', '.join(there)}",
            hint="pass --force to overwrite them, or give another folder",
        )


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def model_results(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The card's figures grouped by protocol: ``held-out`` (``val_*``: the split's validation
    patients) and ``cv`` (``cv_*``: out-of-fold predictions of a cross-validation), each with
    the number of patients when the card records it."""
    training = as_mapping(card.get("training"))
    split = as_mapping(training.get("split"))
    evaluation = as_mapping(card.get("evaluation"))
    selection = training.get("checkpoint")
    groups: dict[str, dict[str, Any]] = {}
    for key, value in as_mapping(card.get("eval_metrics")).items():
        num = _number(value)
        if num is None or "loss" in key:
            continue
        if key.startswith("cv_"):
            protocol, patients = "cv", _count(evaluation.get("patients"))
            split_name, what = "cross-validation (out of fold)", "out-of-fold patients"
        elif key.startswith("val_"):
            protocol, patients = "held-out", _count(split.get("val_patients"))
            split_name, what = "validation", "validation patients"
            if selection == "best":  # the card says so too: optimistic
                what += ", the epoch chosen on them"
        else:
            continue
        group = groups.setdefault(
            protocol,
            {
                "task": {"type": "image-segmentation", "name": "FLAIR abnormality segmentation"},
                "dataset": {
                    "type": DATASET,
                    "name": "LGG segmentation dataset (kaggle_3m)",
                    "split": split_name,
                    "args": {"protocol": protocol}
                    | ({"patients": patients} if patients is not None else {})
                    | ({"checkpoint": selection} if selection in ("best", "last") else {}),
                },
                "metrics": [],
            },
        )
        on = f"{patients} {what}" if patients is not None else what
        group["metrics"].append(
            {
                "type": "dice" if "dice" in key else key.split("_", 1)[1],
                "name": f"{key} ({protocol}, {on})",
                "value": num,
                "verified": False,
            }
        )
    return list(groups.values())


def front_matter(card: Mapping[str, Any]) -> dict[str, Any]:
    """The Hub's model-card metadata (``library_name``, ``pipeline_tag``, ``license``,
    ``datasets``, ``metrics``, ``model-index``) from the card."""
    lic = as_mapping(card.get("license"))
    doc: dict[str, Any] = {
        "library_name": "brainseg",
        "pipeline_tag": "image-segmentation",
        # the card states no licence for the weights (brainseg cannot know it): "other"
        "license": "other",
        "license_name": "see-model-card",
        "tags": list(TAGS),
        "datasets": [DATASET],
    }
    results = model_results(card)
    if results:
        doc["metrics"] = sorted({m["type"] for r in results for m in r["metrics"]})
        doc["model-index"] = [{"name": str(card.get("name") or "brainseg"), "results": results}]
    doc["brainseg"] = {
        "weights_license": str(lic.get("weights") or "not stated"),
        "version": card.get("brainseg_version"),
    }
    return doc


def readme(card: Mapping[str, Any]) -> str:
    """README.md: the front matter between ``---`` lines, then the model card."""
    import yaml

    head = yaml.safe_dump(front_matter(card), sort_keys=False, allow_unicode=True, width=100)
    return f"---\n{head}---\n\n{card_markdown(card)}"


def hub_config(meta: Mapping[str, Any], variant: str, has_checkpoint: bool) -> dict[str, Any]:
    """config.json: which file is the model (``brainseg.model.hub.folder_model`` reads
    ``model_file``) and the settings predict will use."""
    return {
        "library_name": "brainseg",
        "architecture": "UNetVGG16",
        "model_file": CHECKPOINT_FILE if has_checkpoint else ONNX_FILE,
        "onnx_file": ONNX_FILE,
        "onnx_variant": variant,
        "image_size": meta.get("image_size"),
        "threshold": meta.get("threshold"),
        "postprocess": meta.get("postprocess"),
        "normalization": meta.get("normalization"),
        "brainseg_version": meta.get("brainseg_version"),
    }


def write_hub_files(folder: Path, checkpoint: Path | None, onnx_path: Path, variant: str) -> None:
    """Add model.safetensors (a copy of ``checkpoint``), README.md and config.json next to
    the exported ``onnx_path`` (each written atomically)."""
    if checkpoint is not None:
        with atomic_path(folder / CHECKPOINT_FILE) as dst:
            shutil.copyfile(checkpoint, dst)
    meta = read_model_metadata(onnx_path)
    atomic_write_text(folder / README_FILE, readme(card_from_metadata(meta)))
    config = json_safe(hub_config(meta, variant, checkpoint is not None))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
