"""Model cards: what a brainseg model is for, what it was trained on and how it was measured.

The card is a JSON-able dict whose field names follow the MONAI bundle ``metadata.json``
convention (``task``, ``description``, ``intended_use``, ``data_source``, ``image_classes``,
``label_classes``, ``pred_classes``, ``eval_metrics``, ``references``,
``network_data_format`` with ``channel_def``...; see docs/model-card.md), plus the fields
MONAI has no slot for: ``limitations``, ``training`` (data, split, recipe), ``eval_protocol``,
``preprocessing``, ``license`` and ``brainseg_version``.

It is stored in a model's metadata under :data:`CARD_KEY` (checkpoints: the safetensors
header; ONNX: the ``brainseg`` JSON blob that export copies, plus a ``model_card`` plain key)
and rebuilt from the rest of the metadata for files written before cards existed
(:func:`card_from_metadata`). Only the standard library at import time (no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brainseg.config import fields_with
from brainseg.errors import BrainsegError
from brainseg.fsutil import atomic_write_text, json_safe
from brainseg.model.checkpoint import check_model_file, read_metadata
from brainseg.model.onnxfile import metadata_from_props, open_session
from brainseg.optional import require

#: Metadata key holding the card (checkpoint metadata, ONNX blob and ONNX plain key).
CARD_KEY = "model_card"
#: Version of the card layout.
CARD_FORMAT = 1
CONVENTION = (
    "MONAI bundle metadata.json field names (meta_schema_20220324), with brainseg extensions"
)
CHANNELS = {"0": "pre-contrast", "1": "FLAIR", "2": "post-contrast"}
INTENDED_USE = (
    "Research use only: segmentation of the FLAIR abnormality of lower-grade gliomas in 2D "
    "axial brain MRI slices whose three channels are, in order, pre-contrast, FLAIR and "
    "post-contrast (the kaggle_3m layout of the LGG segmentation dataset). Not a medical "
    "device: not for diagnosis, treatment planning or any clinical decision."
)
LIMITATIONS = [
    "Not a medical device; not validated clinically; not cleared or approved by any regulator.",
    "Trained and measured on lower-grade gliomas (TCGA-LGG, 5 institutions); other tumour "
    "types, scanners, protocols or populations are out of scope and unmeasured.",
    "Needs the three contrasts co-registered and in the order pre-contrast, FLAIR, "
    "post-contrast, as in the kaggle_3m layout; another order or contrast is unmeasured.",
    "2D slice model: it segments slice by slice; 3D consistency only via post-processing.",
    "The segmented region is the FLAIR abnormality (tumour and oedema), not the tumour core.",
    "Metrics come from few patients: read their protocol and spread before comparing.",
]
DATA_SOURCE = (
    "LGG segmentation dataset (Buda et al. 2019; kaggle_3m layout): FLAIR abnormality masks "
    "on TCIA TCGA-LGG MRI"
)
REFERENCES = [
    "M. Buda, A. Saha, M. A. Mazurowski. Association of genomic subtypes of lower-grade gliomas "
    "with shape features automatically extracted by a deep learning algorithm. Computers in "
    "Biology and Medicine 109 (2019) 218-225. doi:10.1016/j.compbiomed.2019.05.002",
    "N. Pedano et al. Radiology Data from The Cancer Genome Atlas Low Grade Glioma [TCGA-LGG] "
    "collection. TCIA (2016). doi:10.7937/K9/TCIA.2016.L4LTD3TK",
]
LICENSE = {
    "software": "AGPL-3.0-or-later (brainseg)",
    "weights": "not stated by the trainer: ask whoever trained this model",
    "training_data": "see the dataset's Kaggle page and TCIA's data usage policy",
}


# =============================================================================== build
def split_summary(split: Any, fold: int | None = None) -> dict[str, Any]:
    """The card's view of a :class:`brainseg.data.split.Split`: kind, patients, hash."""
    val = list(split.patients("val", fold))
    train = list(split.patients("train", fold))
    test = list(split.subsets.get("test", []))
    kind = "single patient-level split"
    if fold is not None:
        kind = f"fold {fold} of a {split.n_folds}-fold patient-level split"
    return {
        "kind": kind,
        "fold": fold,
        "train_patients": len(train),
        "val_patients": len(val),
        "test_patients": len(test),
        "val_patient_ids": sorted(val),
        "train_patient_ids": sorted(train),
        "dataset_hash": str(getattr(split, "dataset_hash", "") or ""),
    }


def data_used(split: Mapping[str, Any] | None) -> str:
    """The card's ``data_source``: the dataset and the patients this model actually used."""
    if not split or split.get("train_patients") is None:
        return f"{DATA_SOURCE}; patients used: not recorded in this file"
    used = f"{split['train_patients']} training patients"
    if split.get("val_patients"):
        used += f" + {split['val_patients']} validation patients"
    return f"{DATA_SOURCE}; used for this model: {used}"


def _eval_protocol(
    meta: Mapping[str, Any], selection: str, split: Mapping[str, Any] | None
) -> dict[str, Any]:
    cfg = meta.get("config") or {}
    fold = cfg.get("fold")
    epoch = meta.get("epoch")
    chosen = (
        f"best: the epoch ({epoch}) with the highest validation per-patient Dice, chosen on "
        "these same validation patients (optimistic)"
        if selection == "best"
        else f"last: the final checkpoint (epoch {epoch})"
    )
    return {
        "protocol": (split or {}).get("kind")
        or (f"fold {fold} of a cross-validation split" if fold is not None else "single split"),
        "checkpoint": chosen,
        "patients": "the split's validation patients"
        + (f" ({split['val_patients']})" if split else ""),
        "val_patient_ids": list((split or {}).get("val_patient_ids") or []),
        "measured_at": f"the training image size {cfg.get('image_size', meta.get('image_size'))}",
        "figures_measured_with": "threshold 0.5, no post-processing (validation during training)",
        **settings_fields(meta, split),
        "per_patient_dice": "one Dice over each patient's stacked slices, then the mean",
    }


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one (metadata read from files)."""
    return value if isinstance(value, Mapping) else {}


def post_text(post: Mapping[str, Any] | None) -> str:
    """A post-processing dict (``min_size``, ``largest_component``) in words."""
    post = post or {}
    parts = []
    if int(post.get("min_size") or 0) > 0:
        parts.append(f"2D components under {int(post['min_size'])} pixels removed")
    if post.get("largest_component"):
        parts.append("largest 3D component per patient kept")
    return "; ".join(parts) or "none"


def cv_figures(settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The cross-validation figure of an ensemble.json (what ``brainseg cv`` measured out of
    fold), or None. Manifests written before ``cv_out_of_fold`` existed give the tuning's
    before / after Dice."""
    if not isinstance(settings, Mapping):
        return None
    oof = settings.get("cv_out_of_fold")
    if isinstance(oof, Mapping):
        return json_safe(oof)
    tuning = settings.get("tuning")
    if not isinstance(tuning, Mapping) or not isinstance(tuning.get("after"), Mapping):
        return None
    before = as_mapping(tuning.get("before"))
    return {
        "what": "mean per-patient Dice of the cross-validation, out of fold (each patient "
        "predicted by the fold model that did not train on it)",
        "dice_patient_before_tuning": before.get("dice"),
        "dice_patient_after_tuning": tuning["after"].get("dice"),
        "settings_after_tuning": {k: v for k, v in tuning["after"].items() if k != "dice"},
        "tuning_chosen_on": tuning.get("chosen_on"),
    }


def _overlap_text(ids: Sequence[str], others: Sequence[str], what: str) -> str:
    both = set(ids) & set(others)
    if not both:
        return f"none of them among {what}"
    if both == set(ids) == set(others):
        return f"the same patients as {what}"
    return f"{len(both)} of them among {what}"


def settings_fields(meta: Mapping[str, Any], split: Mapping[str, Any] | None) -> dict[str, Any]:
    """The protocol's view of this file's own threshold and post-processing, and where they
    come from (always read from the metadata: tuning or ``--postprocess-from`` change them)."""
    threshold = float(meta.get("threshold", 0.5))
    post = as_mapping(meta.get("postprocess"))
    tuned = meta.get("tuned")
    ens = meta.get("ensemble")
    if isinstance(tuned, Mapping):
        ids = [str(p) for p in tuned.get("patient_ids") or []]
        val = list((split or {}).get("val_patient_ids") or [])
        train = list((split or {}).get("train_patient_ids") or [])
        where = _overlap_text(ids, val, "this card's validation patients (its figures)")
        if set(ids) & set(train):
            where += f"; {len(set(ids) & set(train))} of them were training patients"
        dice = ""
        if tuned.get("dice_before") is not None and tuned.get("dice_after") is not None:
            dice = (
                f"; mean per-patient Dice there {float(tuned['dice_before']):.4f} -> "
                f"{float(tuned['dice_after']):.4f} (optimistic: chosen on the patients measured)"
            )
        chosen = (
            f"by brainseg eval --tune-output on {len(ids)} patients ({tuned.get('subset')}"
            + (f" of fold {tuned['fold']}" if tuned.get("fold") is not None else "")
            + f"): {where}{dice}"
        )
    elif meta.get("postprocess_from"):
        cv = as_mapping(meta.get("postprocess_cv"))
        on = cv.get("tuning_chosen_on") or "the pooled out-of-fold predictions"
        chosen = f"from the cv run {meta['postprocess_from']}: {on}"
    elif isinstance(ens, Mapping) and isinstance(ens.get("tuning"), Mapping):
        chosen = "by brainseg cv: " + str(
            ens["tuning"].get("chosen_on") or "on the pooled out-of-fold predictions"
        )
    elif threshold == 0.5 and post_text(post) == "none":
        chosen = "the default (not tuned)"
    else:
        chosen = "stored in the file; where they were chosen is not recorded"
    return {
        "threshold": threshold,
        "post_processing": post_text(post),
        "settings_chosen": chosen,
    }


def _network_data_format(meta: Mapping[str, Any]) -> dict[str, Any]:
    shape = ["32*n", "32*n"]
    return {
        "inputs": {
            "image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": 3,
                "spatial_shape": shape, "dtype": "float32", "value_range": [0, 255],
                "is_patch_data": False, "channel_def": dict(CHANNELS),
            }
        },
        "outputs": {
            "pred": {
                "type": "image", "format": "segmentation", "num_channels": 1,
                "spatial_shape": shape, "dtype": "float32", "value_range": [],
                "is_patch_data": False,
                "channel_def": {"0": "FLAIR abnormality logit (sigmoid -> probability)"},
            }
        },
    }  # fmt: skip


def build_card(
    meta: Mapping[str, Any],
    *,
    selection: str | None = None,
    split: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of a model from its metadata (what train writes in a checkpoint); ``split``
    is :func:`split_summary` of the training split, ``evaluation`` a later measurement (e.g.
    from ``brainseg cv``) kept verbatim."""
    cfg = dict(meta.get("config") or {})
    inferred = "last" if "train_state" in meta else "best"  # only last.safetensors has it
    sel = selection if selection in ("best", "last") else inferred
    post = dict(meta.get("postprocess") or {})
    version = meta.get("brainseg_version")
    metrics = {
        f"val_{k}" if not k.startswith(("val_", "train_")) else k: v
        for k, v in (meta.get("metrics") or {}).items()
        if k not in ("lr", "seconds", "images_per_s")
    }
    card: dict[str, Any] = {
        "card_format": CARD_FORMAT,
        "convention": CONVENTION,
        "name": "brainseg UNet-VGG16: lower-grade glioma FLAIR abnormality segmentation",
        "version": version,
        "task": "Lower-grade glioma FLAIR abnormality segmentation in brain MRI (2D slices)",
        "description": "UNet with a VGG16 encoder trained with brainseg; input: the three MRI "
        "contrasts of one axial slice, output: a per-pixel FLAIR abnormality logit.",
        "authors": "brainseg user (trained with brainseg)",
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
        "data_source": data_used(split),
        "data_type": "tif",
        "image_classes": "3 channel data, in order: pre-contrast, FLAIR, post-contrast "
        "(uint8 0..255)",
        "label_classes": "single channel data, 1 is FLAIR abnormality, 0 is everything else",
        "pred_classes": "single channel logit; sigmoid(logit) >= threshold is FLAIR abnormality",
        "eval_metrics": metrics,
        "eval_protocol": _eval_protocol(meta, sel, split),
        "training": {
            "data_folder": Path(str(cfg["data"])).name if cfg.get("data") else None,
            "split": dict(split) if split else {"dataset_hash": meta.get("split_hash")},
            "recipe": {k: cfg[k] for k in fields_with("recipe") if k in cfg},
            "epochs_done": meta.get("epoch"),
            "checkpoint": sel,
        },
        "preprocessing": {
            "input": "3 channels uint8 0..255 as stored (pre-contrast, FLAIR, post-contrast)",
            "resize": f"to {meta.get('image_size')} (bilinear), probabilities resized back",
            "normalization": f"{meta.get('normalization')} (inside the model)",
            "threshold": meta.get("threshold", 0.5),
            "postprocess": post,
        },
        "license": dict(LICENSE),
        "references": list(REFERENCES),
        "network_data_format": _network_data_format(meta),
        "pytorch_version": meta.get("torch_version"),
        "brainseg_version": version,
    }
    if evaluation:
        card["evaluation"] = json_safe(evaluation)
    return card


def _stored_card(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The card stored in ``meta`` (a dict, or JSON text in ONNX metadata), else empty."""
    stored = meta.get(CARD_KEY)
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except ValueError:
            return {}
    return stored if isinstance(stored, Mapping) else {}


def card_from_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The card of a model file's metadata: the stored one (if any) over a rebuilt one; the
    threshold and post-processing from the metadata (``eval --tune-output`` changes them)."""
    card = build_card(meta)
    card.update(json_safe(_stored_card(meta)))
    pre = dict(card.get("preprocessing") or {})
    pre["threshold"] = meta.get("threshold", pre.get("threshold", 0.5))
    pre["postprocess"] = dict(meta.get("postprocess") or pre.get("postprocess") or {})
    card["preprocessing"] = pre
    split = (card.get("training") or {}).get("split")
    card["eval_protocol"] = {
        **dict(card.get("eval_protocol") or {}),
        **settings_fields(meta, split if isinstance(split, Mapping) else None),
    }
    onnx = meta.get("onnx")
    if isinstance(onnx, Mapping):
        card["onnx"] = {k: onnx.get(k) for k in ("variant", "opset", "source")}
    int8 = meta.get("int8")
    if isinstance(int8, Mapping):
        card["int8"] = dict(int8)
    return card


def training_patients(meta: Mapping[str, Any]) -> list[str] | None:
    """The patients a single model's weights were trained on, or None when unknown: from the
    card, else from the split file the training config names (if there, same dataset hash)."""
    split = (_stored_card(meta).get("training") or {}).get("split") or {}
    ids = split.get("train_patient_ids") if isinstance(split, Mapping) else None
    if isinstance(ids, list):
        return [str(p) for p in ids]
    cfg = as_mapping(meta.get("config"))
    path = cfg.get("split")
    if not path or not Path(str(path)).is_file():
        return None
    # here, not at the top: splits need PyYAML, which the torch-free deployment (predict and
    # info on ONNX files, docs/predict.md) does not install
    from brainseg.data.split import load_split

    try:
        found = load_split(str(path))
        if meta.get("split_hash") and str(found.dataset_hash) != str(meta["split_hash"]):
            return None
        fold = cfg.get("fold")
        if fold == "all":
            return list(found.all_patients)
        return list(found.patients("train", fold if fold is None else int(fold)))
    except (BrainsegError, ValueError, TypeError):
        return None


def member_training_patients(
    name: str, meta: Mapping[str, Any]
) -> list[tuple[str, list[str] | None]]:
    """``(member name, its training patients or None)`` for every model inside one file:
    one for a checkpoint, one per fold for an ensemble exported to ONNX."""
    ens = meta.get("ensemble")
    if isinstance(ens, Mapping) and ens.get("folds"):
        known = ens.get("train_patient_ids")
        known = known if isinstance(known, Mapping) else {}
        return [
            (f"{name}:{fold}", [str(p) for p in known[fold]] if known.get(fold) else None)
            for fold in ens["folds"]
        ]
    return [(name, training_patients(meta))]


def with_ensemble_card(
    meta: Mapping[str, Any],
    fold_metas: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """An ensemble file's metadata (:func:`brainseg.export.ensemble.ensemble_metadata`) with
    the card of the ensemble itself (not of its first fold) and each member's training
    patients (``ensemble.train_patient_ids``, what eval checks the scored patients against)."""
    out = {k: v for k, v in meta.items() if k != CARD_KEY}
    k = len(names)
    members, by_name = [], {}
    for name, fm in zip(names, fold_metas, strict=True):
        ids = training_patients(fm)
        if ids is not None:
            by_name[name] = sorted(ids)
        sp = (_stored_card(fm).get("training") or {}).get("split") or {}
        members.append(
            {
                "name": name,
                "protocol": sp.get("kind"),
                "train_patients": None if ids is None else len(ids),
                "epochs_done": fm.get("epoch"),
                "val_dice_patient": (fm.get("metrics") or {}).get("val_dice_patient"),
            }
        )
    out["ensemble"] = {**(out.get("ensemble") or {}), "train_patient_ids": by_name}
    union = {p for ids in by_name.values() for p in ids}
    cv = cv_figures(settings)
    sel = as_mapping(settings.get("selection"))
    select = str(sel.get("select") or "last")
    known = len(by_name) == k
    n_cv = (cv or {}).get("patients") or (len(union) if known else "?")
    split = {
        "kind": f"{k} models of a {k}-fold patient-level cross-validation (one per fold)",
        "fold": None,
        "train_patients": len(union) if known else None,
        "val_patients": 0,
        "test_patients": 0,
        "val_patient_ids": [],
        "train_patient_ids": sorted(union) if known else [],
        "dataset_hash": str(out.get("split_hash") or ""),
    }
    card = build_card(out, selection="last", split=split)
    card["name"] = (
        f"brainseg UNet-VGG16 ensemble of {k} fold models: lower-grade glioma FLAIR "
        "abnormality segmentation"
    )
    card["description"] = (
        f"The mean probability of the {k} UNet-VGG16 fold models of one patient-level "
        "cross-validation (brainseg cv), in one file; input: the three MRI contrasts of one "
        "axial slice, output: a per-pixel FLAIR abnormality logit of that mean."
    )
    card["eval_metrics"] = {}
    if cv:
        card["eval_metrics"] = {
            "cv_out_of_fold_dice_patient_before_tuning": cv.get("dice_patient_before_tuning"),
            "cv_out_of_fold_dice_patient_after_tuning": cv.get("dice_patient_after_tuning"),
        }
        card["evaluation"] = cv
    card["eval_protocol"] = {
        "protocol": f"{k}-fold patient-level cross-validation, out of fold: each of the "
        f"{n_cv} patients predicted by the one fold model that "
        f"did not train on it. The ensemble itself has no held-out patients: each of them "
        f"trained {k - 1} of its {k} models",
        "checkpoint": f"{select}: " + str(sel.get("label") or f"{select} of each fold"),
        "patients": f"the {n_cv} cross-validated patients"
        + ("" if cv else " (no cv figure in the ensemble.json)"),
        "val_patient_ids": [],
        "measured_at": "the images' own size (brainseg cv)",
        "figures_measured_with": "before tuning: threshold 0.5, no post-processing; after "
        "tuning: the threshold and post-processing below",
        **settings_fields(out, None),
        "per_patient_dice": "one Dice over each patient's stacked slices, then the mean",
    }
    card["training"]["members"] = members
    card["training"]["checkpoint"] = select
    out[CARD_KEY] = card
    return out


def with_card(meta: Mapping[str, Any], **build_kw: Any) -> dict[str, Any]:
    """``meta`` with its card under :data:`CARD_KEY` (what a writer stores)."""
    out = {k: v for k, v in meta.items() if k != CARD_KEY}
    out[CARD_KEY] = build_card(out, **build_kw)
    return out


# =============================================================================== read
def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The brainseg metadata of a .safetensors or .onnx file, without importing torch."""
    p = check_model_file(path)
    if p.suffix.lower() == ".onnx":
        return _onnx_metadata(p)
    return read_metadata(p)


def _onnx_metadata(path: Path) -> dict[str, Any]:
    """metadata_props of an ONNX file: with the ``onnx`` package (weights not loaded) when it is
    installed, else with onnxruntime's model metadata (the torch-free deployment has only that).
    """
    try:
        import onnx
    except ImportError:
        require("onnxruntime", f"reading ONNX model {path.name}")
        session = open_session(path)
        props = dict(session.get_modelmeta().custom_metadata_map)
    else:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises its own errors for a damaged file
            raise BrainsegError(
                f"cannot read ONNX model {path}: {type(exc).__name__}: {exc}",
                hint="is the file complete? re-export it with brainseg export",
            ) from exc
        props = {p.key: p.value for p in model.metadata_props}
    meta = metadata_from_props(props, path)
    if CARD_KEY in props and CARD_KEY not in meta:
        meta[CARD_KEY] = props[CARD_KEY]
    return meta


def read_card(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model card of a .safetensors or .onnx file (stored or rebuilt; torch-free)."""
    return card_from_metadata(read_model_metadata(path))


# =============================================================================== render
def _text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list | tuple):
        return ", ".join(_text(x) for x in v) if v else "-"
    if isinstance(v, Mapping):
        return "; ".join(f"{k} {_text(x)}" for k, x in v.items()) if v else "-"
    return "-" if v is None else str(v)


def card_rows(card: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(section, field, value)`` rows, in reading order (for a table)."""
    rows: list[tuple[str, str, str]] = []

    def add(section: str, items: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        for k, v in pairs:
            if k.endswith("patient_ids") and isinstance(v, list) and len(v) > 12:
                v = [*v[:12], f"... ({len(v)} in all)"]
            rows.append((section, str(k), _text(v)))

    add("model", [(k, card.get(k)) for k in ("name", "task", "version", "brainseg_version")])
    add("intended use", [("intended_use", card.get("intended_use"))])
    add("limits", [(f"{i + 1}", t) for i, t in enumerate(card.get("limitations") or [])])
    add("data", [(k, card.get(k)) for k in ("data_source", "image_classes", "label_classes",
                                            "pred_classes")])  # fmt: skip
    training = dict(card.get("training") or {})
    split = training.pop("split", {}) or {}
    recipe = training.pop("recipe", {}) or {}
    add("training", training)
    add("split", split)
    add("recipe", recipe)
    for sec, key in (("metrics", "eval_metrics"), ("protocol", "eval_protocol")):
        add(sec, card.get(key) or {})
    for sec in ("evaluation", "preprocessing", "onnx", "int8", "license"):
        add(sec, card.get(sec) or {})  # an empty or missing section adds no row
    add("references", [(f"{i + 1}", r) for i, r in enumerate(card.get("references") or [])])
    return rows


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as a Markdown document (what ``export --card card.md`` writes)."""
    lines = [f"# {card.get('name', 'brainseg model')}", ""]
    lines += [f"> {card.get('intended_use', INTENDED_USE)}", ""]
    section = None
    for sec, key, value in card_rows(card):
        if (sec == "model" and key == "name") or sec == "intended use":
            continue  # the title and the quote above
        if sec != section:
            lines += ["", f"## {sec.capitalize()}", ""]
            section = sec
        value = value.replace("\n", " ")
        # numbered items (limits, references) are an ordered list, the rest a bullet list
        lines.append(f"{key}. {value}" if key.isdigit() else f"- **{key}**: {value}")
    lines += ["", f"_Card format {card.get('card_format', CARD_FORMAT)}; "
                  f"{card.get('convention', CONVENTION)}._", ""]  # fmt: skip
    return "\n".join(lines)


def write_card_markdown(card: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write :func:`card_markdown` atomically."""
    return atomic_write_text(path, card_markdown(card))
