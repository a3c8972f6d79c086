"""Evaluate one model or an ensemble on a dataset (or a split's subset) and write a run folder.

The library side of ``brainseg eval``: pick the patients (split / subset / fold), predict
probabilities with :class:`brainseg.inference.predict.Predictor` (several models -> mean
probability),
post-process, compute :mod:`brainseg.evaluation.metrics`, optionally tune the threshold and the
post-processing for mean per-patient Dice, and write summary.json, per_patient.csv,
per_slice.csv and a Dice plot. Nothing here prints except through :mod:`brainseg.console`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from brainseg import __version__, console
from brainseg.data.cache import load_dataset
from brainseg.data.split import check_split, load_split
from brainseg.ensemble import ENSEMBLE_SUFFIX
from brainseg.errors import BrainsegError
from brainseg.evaluation import metrics
from brainseg.evaluation.metrics import PATIENT_COLUMNS
from brainseg.evaluation.report import (
    REPORT_NAME,
    dice_plot_png,
    overlap_warning,
    pick_cases,
    write_eval_report,
)
from brainseg.fsutil import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_run_name,
    json_safe,
    next_run_dir,
)
from brainseg.inference import postprocess
from brainseg.inference.predict import load_predictor
from brainseg.inference.runtimes import describe
from brainseg.model.card import member_training_patients
from brainseg.model.checkpoint import check_model_file, copy_with_metadata, read_metadata
from brainseg.settings import InferenceSettings, PostSettings

__all__ = ["PostSettings"]  # re-exported: tuning and tuned copies speak it

#: The subsets ``--subset`` accepts.
SUBSETS: tuple[str, ...] = ("val", "test", "train", "all")
#: Threshold grid of ``--tune``: 0.30, 0.35, ..., 0.70.
TUNE_THRESHOLDS: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))
#: ``--tune`` minimum component sizes at 256 x 256, scaled by image area.
TUNE_MIN_SIZES_256: tuple[int, ...] = (0, 16, 64, 256, 1024)

SLICE_COLUMNS = [
    "patient_id",
    "slice_number",
    "gt_pixels",
    "pred_pixels",
    "tp",
    "fp",
    "fn",
    *metrics.METRICS,
]
#: A patient's slice and pixel counts, in every per-patient table (eval's and cv's).


class ProbaPredictor(Protocol):
    """What evaluation needs from a predictor (brainseg.inference.predict.Predictor satisfies
    it)."""

    metadata: dict[str, Any]

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...


PredictorFactory = Callable[..., ProbaPredictor]


@dataclass(kw_only=True)
class EvalOptions(InferenceSettings):
    """One evaluation on the dataset: the shared :class:`~brainseg.settings.InferenceSettings`
    (``None``: the model's) plus what is eval's own."""

    skip_bad: bool = False
    tune: bool = False
    cache_dir: Path | None = None  # the dataset cache's folder (None: the default one)


@dataclass
class TuneResult:
    """The best post-processing on the evaluated data, and what it gains over the baseline."""

    baseline: PostSettings
    baseline_dice: float
    best: PostSettings
    best_dice: float
    thresholds: list[float]
    min_sizes: list[int]
    tried: int

    @property
    def gain(self) -> float:
        return self.best_dice - self.baseline_dice

    def as_dict(self) -> dict[str, Any]:
        return {
            "objective": "mean per-patient Dice",
            "baseline": {**self.baseline.as_dict(), "dice": self.baseline_dice},
            "best": {**self.best.as_dict(), "dice": self.best_dice},
            "gain": self.gain,
            "grid": {
                "thresholds": self.thresholds,
                "min_sizes": self.min_sizes,
                "largest": [False, True],
                "tried": self.tried,
            },
            "note": "chosen on the evaluated patients: confirm on held-out patients",
        }


@dataclass
class EvalResult:
    """Everything ``brainseg eval`` reports and writes."""

    report: metrics.Report
    summary: dict[str, Any]
    settings: PostSettings
    tune: TuneResult | None = None
    run_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    #: The worst and median patients' slices for report.html (see brainseg.evaluation.report).
    cases: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


def check_model_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Fail fast (before loading data) on a missing model or an unknown file type."""
    out: list[Path] = []
    if not paths:
        raise BrainsegError("no MODEL given", hint="usage: brainseg eval MODEL [MODEL...] DATA")
    for p in paths:
        hint = "usage: brainseg eval MODEL [MODEL...] DATA (the last path is the data)"
        out.append(check_model_file(p, also=(ENSEMBLE_SUFFIX,), hint=hint))
    return out


def select_patients(
    patient_ids: Sequence[str], split_path: Path | None, subset: str | None, fold: int | None
) -> tuple[list[str], dict[str, Any]]:
    """The patients to evaluate and a description of the choice (for summary.json).

    Without a split every patient is evaluated; with one, ``subset`` (default val) of
    ``fold`` (if the split has folds).
    """
    if subset is not None and subset not in SUBSETS:
        raise BrainsegError(f"unknown subset {subset!r}", hint=f"use one of: {', '.join(SUBSETS)}")
    if split_path is None:
        if subset not in (None, "all"):
            raise BrainsegError(
                f"--subset {subset} needs --split",
                hint="pass --split splits.yaml (made by `brainseg split`)",
            )
        if fold is not None:
            raise BrainsegError(
                "--fold needs --split",
                hint="pass --split splits.yaml made with `brainseg split --folds K`",
            )
        return list(patient_ids), {"split": None, "subset": "all", "fold": None}

    split = load_split(split_path)
    check_split(split, list(patient_ids))
    subset = subset or "val"
    split.check_fold(fold)
    if split.n_folds and fold is None and subset in ("val", "train"):
        console.info(
            f"{split_path} has {split.n_folds} folds and no --fold was given: evaluating its "
            f"top-level {subset} list; pass --fold K for fold K's {subset} patients"
        )
    ids = split.all_patients if subset == "all" else split.patients(subset, fold)
    if not ids:
        raise BrainsegError(
            f"subset {subset!r} of split {split_path} is empty",
            hint="pick another --subset (e.g. val), or make a split with "
            "`brainseg split DATA --test-fraction 0.2` for a test subset",
        )
    return list(ids), {"split": str(split_path), "subset": subset, "fold": fold}


# --------------------------------------------------------------------------- prediction


def predict_probabilities(
    predictor: ProbaPredictor, images: np.ndarray, rows: np.ndarray, chunk: int = 32
) -> np.ndarray:
    """Tumor probabilities (len(rows) x H x W float32) of ``images[rows]`` (N x 3 x H x W)."""
    n = len(rows)
    h, w = images.shape[2], images.shape[3]
    out = np.empty((n, h, w), dtype=np.float32)
    with console.progress(n, "predict", unit="slice") as bar:
        for start in range(0, n, chunk):
            sel = rows[start : start + chunk]
            batch = np.ascontiguousarray(np.asarray(images[sel]).transpose(0, 2, 3, 1))
            prob = np.asarray(predictor.predict_proba(batch), dtype=np.float32)
            if prob.shape != (len(sel), h, w):
                raise BrainsegError(
                    f"the predictor returned shape {prob.shape} for {len(sel)} slices of {h}x{w}"
                )
            out[start : start + len(sel)] = prob
            bar.advance(len(sel))
    return out


# --------------------------------------------------------------------------- tuning


def tune_min_sizes(hw: tuple[int, int]) -> list[int]:
    """The ``--tune`` component sizes for this image size (scaled from 256 x 256)."""
    scale = hw[0] * hw[1] / (256 * 256)
    sizes = sorted({0, *(round(s * scale) for s in TUNE_MIN_SIZES_256)})
    return [s for s in sizes if s == 0 or s > 1]


def tune(
    prob: np.ndarray,
    gt: np.ndarray,
    patient_index: np.ndarray,
    slice_number: np.ndarray,
    baseline: PostSettings,
    thresholds: Sequence[float] = TUNE_THRESHOLDS,
    min_sizes: Sequence[int] | None = None,
) -> TuneResult:
    """Grid-search threshold x min_size x largest for the mean per-patient Dice.

    Ties keep the baseline, then the earlier grid point (lower threshold, smaller size,
    largest off): a change is taken only when it strictly improves the objective.
    """
    pidx = np.asarray(patient_index)
    if min_sizes is None:
        min_sizes = tune_min_sizes((prob.shape[1], prob.shape[2]))

    def score(mask: np.ndarray) -> float:
        return float(np.mean(metrics.per_patient_dice(mask, gt, pidx)))

    base_mask = postprocess.apply(
        prob,
        baseline.threshold,
        baseline.min_size,
        baseline.largest,
        groups=pidx,
        order=slice_number,
    )
    base_dice = score(base_mask)
    best, best_dice = baseline, base_dice
    tried = 0
    thr_list = [float(t) for t in thresholds]
    size_list = [int(s) for s in min_sizes]
    total = len(thr_list) * len(size_list) * 2
    with console.progress(total, "tune", unit="setting") as bar:
        for t in thr_list:
            mask = postprocess.binarize(prob, t)
            labels, sizes = postprocess.label_slices(mask)
            for ms in size_list:
                m = postprocess.filter_labels(labels, sizes, ms) if ms > 1 else mask
                for largest in (False, True):
                    mm = postprocess.largest_per_group(m, pidx, slice_number) if largest else m
                    d = score(mm)
                    tried += 1
                    if d > best_dice + 1e-12:
                        best, best_dice = PostSettings(t, ms, largest), d
                    bar.advance(1, best=best_dice)
    return TuneResult(
        baseline=baseline,
        baseline_dice=base_dice,
        best=best,
        best_dice=best_dice,
        thresholds=thr_list,
        min_sizes=size_list,
        tried=tried,
    )


# --------------------------------------------------------------------------- run


def _check_eval_options(
    opts: EvalOptions, split_path: str | os.PathLike[str] | None, subset: str | None
) -> Path | None:
    """The split file's path once the options are checked (before any model or data work;
    the batch size: Typer's ``min=1``, then ``Predictor``, built next)."""
    split_p = Path(split_path) if split_path is not None else None
    if split_p is not None and not split_p.is_file():
        raise BrainsegError(
            f"split file {split_p} does not exist",
            hint="make one with `brainseg split DATA -o splits.yaml`",
        )
    if subset is not None and subset not in SUBSETS:
        raise BrainsegError(f"unknown subset {subset!r}", hint=f"use one of: {', '.join(SUBSETS)}")
    return split_p


def run_eval(
    models: Sequence[str | os.PathLike[str]],
    data_path: str | os.PathLike[str],
    split_path: str | os.PathLike[str] | None = None,
    subset: str | None = None,
    fold: int | None = None,
    opts: EvalOptions | None = None,
    predictor_factory: PredictorFactory | None = None,
) -> EvalResult:
    """Predict, post-process and measure; no files are written (see :func:`write_run`)."""
    opts = opts or EvalOptions()
    model_paths = check_model_paths(models)
    split_p = _check_eval_options(opts, split_path, subset)

    # the models first: a corrupt file is one line before any dataset cache is built
    predictor = load_predictor(model_paths, opts, predictor_factory)
    if hasattr(predictor, "runtime_info"):  # a test's factory may not say
        console.info(f"runtime {describe(predictor)}")
    data = load_dataset(data_path, skip_bad=opts.skip_bad, cache_dir=opts.cache_dir)
    ids, sel = select_patients(data.patient_ids, split_p, subset, fold)
    rows = data.indices_of(ids)
    if rows.size == 0:
        raise BrainsegError(
            f"no slices to evaluate in {data_path} for the chosen patients",
            hint="check --split / --subset",
        )
    if split_p is None:
        console.info(
            f"no --split given: evaluating all {len(ids)} patients of {data_path} "
            "(optimistic if the model was trained on some of them)"
        )
    meta = dict(predictor.metadata)
    resolved = opts.resolve(meta)
    settings = resolved.post
    overlap = training_overlap(predictor, model_paths, ids)
    fold_txt = "" if sel["fold"] is None else f" of fold {sel['fold']}"
    console.info(
        f"evaluating {_models_text(overlap['members'], model_paths)} on {len(ids)} patients "
        f"({rows.size} slices, {sel['subset']}{fold_txt})"
        f"{', TTA' if opts.tta else ''}"
    )
    if overlap["trained_on_scored_patients"]:
        console.warn(overlap_warning(overlap, len(ids)))

    t0 = time.perf_counter()
    prob = predict_probabilities(predictor, data.images, rows, chunk=max(32, 4 * opts.batch_size))
    t_pred = time.perf_counter() - t0
    gt = np.asarray(data.masks[rows]) != 0
    pidx = np.asarray(data.patient_index[rows])
    snum = np.asarray(data.slice_number[rows])

    mask = postprocess.apply(
        prob, settings.threshold, settings.min_size, settings.largest, groups=pidx, order=snum
    )
    t1 = time.perf_counter()
    report = metrics.evaluate(mask, gt, pidx, snum, list(data.patient_ids))
    t_metrics = time.perf_counter() - t1

    tuned = tune(prob, gt, pidx, snum, settings) if opts.tune else None

    cases = pick_cases(
        report.per_patient, data.images, rows, gt, mask, pidx, snum, list(data.patient_ids)
    )

    summary: dict[str, Any] = {
        "brainseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": [str(m) for m in model_paths],
        "members": len(overlap["members"]),
        "ensemble": len(overlap["members"]) > 1,
        "trained_on_scored_patients": overlap["trained_on_scored_patients"],
        "training_overlap": {k: v for k, v in overlap.items() if k != "trained_on_scored_patients"},
        "data": str(data_path),
        **sel,
        "settings": {
            **settings.as_dict(),
            "threshold_source": resolved.threshold_source,
            "tta": opts.tta,
            "device": opts.device,
            "runtime": getattr(predictor, "runtime_info", None),  # None: a test's factory
            "threads": opts.threads,
            "batch_size": opts.batch_size,
            "skip_bad": opts.skip_bad,
            "image_size": list(data.size),
        },
        "measured_at": _measured_at(data.size, resolved.image_size),
        **report.summary(),
        "tune": tuned.as_dict() if tuned else None,
        "timing_s": {"predict": round(t_pred, 3), "metrics": round(t_metrics, 3)},
    }
    return EvalResult(report=report, summary=summary, settings=settings, tune=tuned, cases=cases)


def _member_name(path: Path) -> str:
    """A model file as messages name it: with its folder (fold_0/last.safetensors)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def training_overlap(
    predictor: ProbaPredictor, model_paths: Sequence[Path], scored: Sequence[str]
) -> dict[str, Any]:
    """Which scored patients each model (each member of an ensemble) was trained on.

    ``members``: every model behind the predictor (an ensemble.json counts its folds, an
    ensemble exported to ONNX its fold graphs); ``by_model``: the scored patients each of
    them trained on (only those with any); ``unknown``: members whose file does not record
    its training patients; ``trained_on_scored_patients``: the union (sorted).
    """

    paths = [Path(p) for p in (getattr(predictor, "paths", None) or model_paths)]
    backends = getattr(predictor, "backends", None)
    metas = (
        [dict(b.metadata) for b in backends]
        if backends and len(backends) == len(paths)
        else [dict(predictor.metadata) if len(paths) == 1 else {} for _ in paths]
    )
    members: list[tuple[str, list[str] | None]] = []
    for p, m in zip(paths, metas, strict=True):
        members += member_training_patients(_member_name(p), m)
    wanted = set(scored)
    by_model = {
        name: sorted(wanted & set(train))
        for name, train in members
        if train is not None and wanted & set(train)
    }
    union = sorted({p for ids in by_model.values() for p in ids})
    return {
        "members": [name for name, _ in members],
        "by_model": by_model,
        "unknown": [name for name, train in members if train is None],
        "trained_on_scored_patients": union,
    }


def _models_text(members: Sequence[str], model_paths: Sequence[Path]) -> str:
    if len(members) == 1:
        return "1 model"
    files = ", ".join(p.name for p in model_paths)
    return f"an ensemble of {len(members)} models ({files})"


def _measured_at(size: Sequence[int], model_size: tuple[int, int] | None) -> dict[str, Any]:
    """Where the numbers are measured: the images' own size (the model may run at another)."""
    h, w = int(size[0]), int(size[1])
    return {
        "size": [h, w],
        "what": "the images' own size (probabilities resized back, then thresholded)",
        "model_input": list(model_size) if model_size is not None else None,
    }


@dataclass
class EvalJob:
    """One ``brainseg eval``: MODEL... DATA, the patients, the settings and where to write."""

    paths: Sequence[Path]  # the model file(s), then the dataset folder
    split: Path | None = None
    subset: str | None = None
    fold: int | None = None
    opts: EvalOptions = field(default_factory=EvalOptions)
    project: Path = Path("runs/eval")
    name: str = "exp"
    exist_ok: bool = False
    tune_output: Path | None = None  # a tuned copy of the model (implies tuning)
    force: bool = False  # overwrite tune_output


def run_eval_job(job: EvalJob) -> EvalResult:
    """Check the paths, evaluate, write the tuned copy (if asked) and the run folder."""

    check_run_name(job.name)  # before any work: the run folder stays inside --project
    if len(job.paths) < 2:
        raise BrainsegError(
            "brainseg eval needs at least one MODEL and a DATA folder",
            hint="usage: brainseg eval MODEL [MODEL...] DATA [--split splits.yaml]",
        )
    *model_args, data = (Path(p) for p in job.paths)
    models = check_model_paths(model_args)
    if not data.exists():
        raise BrainsegError(
            f"dataset folder {data} does not exist",
            hint="the last path must be the data (a kaggle_3m folder)",
        )
    opts = job.opts
    if job.tune_output is not None:
        opts = dataclasses.replace(opts, tune=True)
        check_tune_output(models, job.tune_output, job.force)
    result = run_eval(models, data, job.split, job.subset, job.fold, opts)
    if result.tune is not None and job.tune_output is not None:
        write_tuned_model(
            models[0], job.tune_output, result.tune.best, job.force, tuned_record(result)
        )
        result.summary["tune"]["output"] = str(job.tune_output)
    write_run(result, next_run_dir(job.project, job.name, exist_ok=job.exist_ok))
    return result


# --------------------------------------------------------------------------- outputs


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text; floats with full precision, NaN as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        cells = []
        for c in columns:
            v = r[c]
            if isinstance(v, float):
                cells.append("" if not math.isfinite(v) else repr(v))
            else:
                cells.append(str(v))
        w.writerow(cells)
    return buf.getvalue()


def plot_dice(dice: Sequence[float] | np.ndarray, path: Path, title: str = "") -> Path:
    """A strip + box plot and a histogram of the per-patient Dice, as a PNG file."""

    return atomic_write_bytes(path, dice_plot_png(dice, title))


def write_run(result: EvalResult, run_dir: Path) -> list[Path]:
    """Write summary.json, per_patient.csv, per_slice.csv, dice_per_patient.png, report.html."""

    run_dir.mkdir(parents=True, exist_ok=True)
    result.run_dir = run_dir
    result.summary["run_dir"] = str(run_dir)
    files = [
        atomic_write_text(
            run_dir / "per_patient.csv", rows_to_csv(result.report.per_patient, PATIENT_COLUMNS)
        ),
        atomic_write_text(
            run_dir / "per_slice.csv", rows_to_csv(result.report.per_slice, SLICE_COLUMNS)
        ),
        plot_dice(result.report.column("per_patient", "dice"), run_dir / "dice_per_patient.png"),
    ]
    with_report = result.settings is not None  # a model's eval (brainseg score has no model)
    report = [run_dir / REPORT_NAME] if with_report else []
    result.summary["files"] = [p.name for p in [*files, *report, run_dir / "summary.json"]]
    if with_report:
        files.append(write_eval_report(result, run_dir))
    files.append(atomic_write_text(run_dir / "summary.json", summary_json(result.summary)))
    result.files = files
    return files


def summary_json(summary: dict[str, Any]) -> str:
    """summary.json text: strict JSON (NaN written as null)."""
    return json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- tuned copy


def check_tune_output(models: Sequence[Path], dst: Path, force: bool) -> None:
    """Refuse a tuned copy that cannot be written, before any prediction is done."""
    if len(models) != 1:
        raise BrainsegError(
            f"--tune-output needs exactly one MODEL, got {len(models)}",
            hint="tuned values belong to the ensemble: pass them at predict time "
            "(--threshold, --min-size, --largest) instead",
        )
    src = models[0]
    if dst.suffix.lower() != src.suffix.lower():
        raise BrainsegError(
            f"--tune-output {dst} must have the model's suffix {src.suffix}",
            hint=f"e.g. --tune-output {src.with_name(src.stem + '_tuned')}{src.suffix}",
        )
    if dst.resolve() == src.resolve():
        raise BrainsegError(
            f"--tune-output {dst} is the model itself", hint="write the tuned copy to another path"
        )
    if dst.exists() and not force:
        raise BrainsegError(f"{dst} already exists", hint="pass --force to overwrite it")


def tuned_record(result: EvalResult) -> dict[str, Any]:
    """What a tuned copy says about its tuning (its card shows it): the patients the
    settings were chosen on and the Dice there before and after."""
    assert result.tune is not None
    s = result.summary
    return {
        "by": "brainseg eval --tune-output",
        "split": s.get("split"),
        "subset": s.get("subset"),
        "fold": s.get("fold"),
        "patients": len(result.report.per_patient),
        "patient_ids": sorted(str(r["patient_id"]) for r in result.report.per_patient),
        "dice_before": result.tune.baseline_dice,
        "dice_after": result.tune.best_dice,
    }


def write_tuned_model(
    src: Path,
    dst: Path,
    settings: PostSettings,
    force: bool,
    record: dict[str, Any] | None = None,
) -> Path:
    """A copy of ``src`` (.safetensors or .onnx) whose metadata holds the tuned settings
    (and ``record``, under ``tuned``: where they were chosen, for the model card)."""
    post = {"min_size": settings.min_size, "largest_component": settings.largest}
    extra = {"tuned": json_safe(record)} if record else {}
    if src.suffix.lower() == ".safetensors":
        stored = read_metadata(src).get("postprocess") or {}
        updates = {
            "threshold": settings.threshold,
            "postprocess": {**(stored if isinstance(stored, dict) else {}), **post},
            **extra,
        }
        copy_with_metadata(src, dst, updates, force=force)
        return dst
    return _write_tuned_onnx(
        src, dst, {"threshold": settings.threshold, "postprocess": post, **extra}, force
    )


def _write_tuned_onnx(src: Path, dst: Path, updates: dict[str, Any], force: bool) -> Path:
    """Set the tuned values in a copy's ONNX ``metadata_props``.

    Keys already holding JSON (``brainseg`` / ``metadata``) are updated inside; plain
    ``threshold`` / ``postprocess`` keys are written as strings / JSON.
    """
    import onnx

    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as exc:
        raise BrainsegError(
            f"cannot read ONNX model {src}: {exc}", hint="is the file complete? re-export it"
        ) from exc
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("brainseg", "metadata"):
        if key in props:
            try:
                blob = json.loads(props[key])
            except json.JSONDecodeError:
                continue
            if isinstance(blob, dict):
                blob.update(updates)
                props[key] = json.dumps(blob)
    props["threshold"] = repr(float(updates["threshold"]))
    props["postprocess"] = json.dumps(updates["postprocess"])
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(dst, force=force) as tmp:
        onnx.save(model, str(tmp))
    return dst
