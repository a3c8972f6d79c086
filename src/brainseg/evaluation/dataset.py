"""Evaluate one model or an ensemble on a kaggle_3m dataset (or a split's subset).

The library side of ``brainseg eval`` on slices: predict the chosen patients' masks with the
one case pipeline into the run folder's ``masks/``, then score those files with
:func:`brainseg.evaluation.score.score_folders`, so the numbers describe files a user can
open. ``--tune`` searches the threshold and the post-processing on the probabilities written
beside the masks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import __version__, console
from brainseg.data import imageio, lgg
from brainseg.data.split import select_patients
from brainseg.ensemble import ENSEMBLE_SUFFIX
from brainseg.errors import BrainsegError
from brainseg.evaluation import metrics
from brainseg.evaluation.report import overlap_warning, pick_cases, worst_and_median
from brainseg.evaluation.runfolder import EvalResult, TuneResult, write_run
from brainseg.evaluation.score import ScoredPatient, ScoreOptions, case_key, score_folders
from brainseg.fsutil import atomic_path, check_run_name, clear_folder, fresh_run_dir, json_safe
from brainseg.inference import postprocess
from brainseg.inference.patients import PatientKind, PatientResult, probability_file
from brainseg.inference.pipeline import PredictOptions, run_cases
from brainseg.inference.predict import load_predictor
from brainseg.inference.runtimes import describe
from brainseg.model.card import member_training_patients
from brainseg.model.checkpoint import check_model_file, copy_with_metadata, read_metadata
from brainseg.settings import InferenceSettings, PostSettings

#: Threshold grid of ``--tune``: 0.30, 0.35, ..., 0.70.
TUNE_THRESHOLDS: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))
#: ``--tune`` minimum component sizes at 256 x 256, scaled by image area.
TUNE_MIN_SIZES_256: tuple[int, ...] = (0, 16, 64, 256, 1024)


#: Builds the predictor (tests stand in for :class:`brainseg.inference.predict.Predictor`).
PredictorFactory = Callable[..., Any]


@dataclass(kw_only=True)
class EvalOptions(InferenceSettings):
    """One evaluation on the dataset: the shared :class:`~brainseg.settings.InferenceSettings`
    (``None``: the model's) plus what is eval's own."""

    skip_bad: bool = False
    tune: bool = False


# --------------------------------------------------------------------------- inputs
def check_model_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Fail fast (before loading data) on a missing model or an unknown file type."""
    if not paths:
        raise BrainsegError("no MODEL given", hint="usage: brainseg eval MODEL [MODEL...] DATA")
    hint = "usage: brainseg eval MODEL [MODEL...] DATA (the last path is the data)"
    return [check_model_file(p, also=(ENSEMBLE_SUFFIX,), hint=hint) for p in paths]


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

    base = baseline
    base_dice = score(
        postprocess.apply(
            prob, base.threshold, base.min_size, base.largest, groups=pidx, order=slice_number
        )
    )
    best, best_dice = baseline, base_dice
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
        tried=total,
    )


# --------------------------------------------------------------------------- run
def run_eval(
    models: Sequence[str | os.PathLike[str]],
    data_path: str | os.PathLike[str],
    split_path: str | os.PathLike[str] | None = None,
    subset: str | None = None,
    fold: int | None = None,
    opts: EvalOptions | None = None,
    predictor_factory: PredictorFactory | None = None,
    masks_dir: Path | None = None,
) -> EvalResult:
    """Predict the chosen patients' masks into ``masks_dir``, then score those files against
    the dataset's true masks (``masks_dir`` None: a temporary folder, removed once scored).
    Nothing else is written (see :func:`write_run`)."""
    opts = opts or EvalOptions()
    model_paths = check_model_paths(models)
    split_p = Path(split_path) if split_path is not None else None
    if split_p is not None and not split_p.is_file():  # before any model or data work
        raise BrainsegError(
            f"split file {split_p} does not exist",
            hint="make one with `brainseg split DATA -o splits.yaml`",
        )

    # the models first: a corrupt file is one line before any slice is read
    predictor = load_predictor(model_paths, opts, predictor_factory)
    if hasattr(predictor, "runtime_info"):  # a test's factory may not say
        console.info(f"runtime {describe(predictor)}")
    dataset = lgg.discover(data_path, skip_bad=opts.skip_bad)
    ids, sel = select_patients(dataset.patient_ids, split_p, subset, fold)
    if split_p is None:
        console.info(
            f"no --split given: evaluating all {len(ids)} patients of {data_path} "
            "(optimistic if the model was trained on some of them)"
        )
    wanted = set(ids)
    patients = [p for p in dataset.patients if p.id in wanted]
    if masks_dir is not None:
        refuse_inside_data(masks_dir, dataset.root)
        return _evaluate(predictor, model_paths, dataset, patients, sel, opts, masks_dir)
    with tempfile.TemporaryDirectory(prefix="brainseg-eval-") as tmp:
        return _evaluate(predictor, model_paths, dataset, patients, sel, opts, Path(tmp))


def refuse_inside_data(folder: Path, root: Path) -> None:
    """Eval's masks below the dataset would be read as ground truth (and its folders as
    patients): refused before anything is written."""
    if folder.resolve().is_relative_to(root.resolve()):
        raise BrainsegError(
            f"eval would write its masks inside the dataset {root} ({folder}), where every "
            "_mask.tif is ground truth",
            hint="pass a --project folder outside the data (the default is runs/eval)",
        )


def _evaluate(
    predictor: Any,
    model_paths: list[Path],
    dataset: lgg.LGGDataset,
    patients: list[lgg.Patient],
    sel: dict[str, Any],
    opts: EvalOptions,
    masks: Path,
) -> EvalResult:
    """Predict into ``masks``, score them, tune on the probabilities written beside them."""
    resolved = opts.resolve(dict(predictor.metadata))
    settings = resolved.post
    overlap = training_overlap(predictor, model_paths, [p.id for p in patients])
    fold_txt = "" if sel["fold"] is None else f" of fold {sel['fold']}"
    n = len(overlap["members"])
    files = ", ".join(p.name for p in model_paths)
    what = "1 model" if n == 1 else f"an ensemble of {n} models ({files})"
    console.info(
        f"evaluating {what} on {len(patients)} patients ({sum(len(p.slices) for p in patients)} "
        f"slices, {sel['subset']}{fold_txt}){', TTA' if opts.tta else ''}"
    )
    if overlap["trained_on_scored_patients"]:
        console.warn(overlap_warning(overlap, len(patients)))

    t0 = time.perf_counter()
    root = dataset.root
    predicted = _predict_patients(predictor, model_paths, root, patients, opts, masks)
    t1 = time.perf_counter()
    # --skip-bad: the slices left out, and the files the structural check named (an orphan
    # mask has no image to predict): their true masks are not scored either
    left_out = sorted(
        {stem for r in predicted for stem in r.left_out}
        | {case_key(Path(p.file).name) for p in dataset.problems}
    )
    score = score_folders(
        ScoreOptions(pred=masks, gt=root, only_predicted=True, leave_out=frozenset(left_out))
    )
    t_metrics = time.perf_counter() - t1
    report = score.report
    tuned = tune_on_files(score.patients, patients, masks, settings) if opts.tune else None
    size = score.patients[0].gt.shape[1:]
    summary: dict[str, Any] = {
        "brainseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": [str(m) for m in model_paths],
        "members": n,
        "ensemble": n > 1,
        "trained_on_scored_patients": overlap["trained_on_scored_patients"],
        "training_overlap": {k: v for k, v in overlap.items() if k != "trained_on_scored_patients"},
        "data": str(root),
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
            "image_size": list(size),
        },
        "measured_at": {  # the images' own size (the model may run at another)
            "size": [int(size[0]), int(size[1])],
            "what": "the images' own size (probabilities resized back, then thresholded)",
            "model_input": None if resolved.image_size is None else list(resolved.image_size),
        },
        "left_out_slices": left_out,
        **report.summary(),
        "surface": score.summary["surface"],
        "tune": tuned.as_dict() if tuned else None,
        "timing_s": {"predict": round(t1 - t0, 3), "metrics": round(t_metrics, 3)},
    }
    cases = montage_cases(report.per_patient, score.patients, patients)
    return EvalResult(report=report, summary=summary, settings=settings, tune=tuned, cases=cases)


def _predict_patients(
    predictor: Any,
    model_paths: list[Path],
    root: Path,
    patients: list[lgg.Patient],
    opts: EvalOptions,
    masks: Path,
) -> list[PatientResult]:
    """Every patient's masks (and with ``tune`` probabilities) in ``masks``, through the
    one case pipeline; a patient that cannot be predicted stops the evaluation (a mean over
    fewer patients would mislead)."""
    results: list[PatientResult] = []
    run_cases(
        PredictOptions(
            models=model_paths,
            inputs=[str(root)],
            out_dir=clear_folder(masks),
            probabilities=opts.tune,
            force=True,
            on_result=results.append,
            predictor_factory=lambda *_, **__: predictor,  # loaded once, by run_eval
            **opts.inference_settings(),
        ),
        PatientKind(patients, opts.skip_bad),
    )
    bad = [r for r in results if r.status == "error"]
    if bad:
        raise BrainsegError(
            f"{len(bad)} of {len(results)} patient(s) could not be predicted, so no score is "
            f"reported (first: {bad[0].error})",
            hint="fix or remove those files, or pass --skip-bad to leave those slices out",
        )
    problems = [p for r in results for p in r.problems]
    if problems:
        console.warn(
            f"--skip-bad: left out {sum(len(r.left_out) for r in results)} slice(s) that could "
            f"not be read (and their true masks): {'; '.join(problems[:5])}"
            f"{' ...' if len(problems) > 5 else ''}"
        )
    return results


def _slice_files(
    scored: Sequence[ScoredPatient], patients: Sequence[lgg.Patient]
) -> list[lgg.SliceFile]:
    """The files of every scored slice, patient by patient in slice order."""
    files = {(s.patient, s.number): s for p in patients for s in p.slices}
    return [files[sp.patient_id, int(n)] for sp in scored for n in sp.slice_number]


def _stacked(scored: Sequence[ScoredPatient]) -> tuple[np.ndarray, ...]:
    """(truth, prediction, patient index, slice number) of the scored slices, stacked."""
    return (
        np.concatenate([sp.gt for sp in scored]),
        np.concatenate([sp.pred for sp in scored]),
        np.concatenate([np.full(len(sp.gt), i) for i, sp in enumerate(scored)]),
        np.concatenate([sp.slice_number for sp in scored]),
    )


def tune_on_files(
    scored: Sequence[ScoredPatient],
    patients: Sequence[lgg.Patient],
    masks: Path,
    baseline: PostSettings,
) -> TuneResult:
    """:func:`tune` on the probabilities predict wrote (``_prob.tif``) and the true masks
    scored, patient by patient in slice order."""
    files = _slice_files(scored, patients)
    prob = np.stack([imageio.read_probability(probability_file(masks, s)) for s in files])
    gt, _, pidx, snum = _stacked(scored)
    return tune(prob, gt, pidx, snum, baseline)


def montage_cases(
    per_patient: Sequence[dict[str, Any]],
    scored: Sequence[ScoredPatient],
    patients: Sequence[lgg.Patient],
) -> list[Any]:
    """The worst and median patients' slices for report.html, their FLAIR read again."""
    shown = {pid for _, pid, _ in worst_and_median(per_patient)}
    chosen = [sp for sp in scored if sp.patient_id in shown]
    if not chosen:
        return []
    files = _slice_files(chosen, patients)
    images = np.stack([lgg.read_slice(s)[0].transpose(2, 0, 1) for s in files])
    gt, pred, pidx, snum = _stacked(chosen)
    ids = [sp.patient_id for sp in chosen]
    return pick_cases(per_patient, images, np.arange(len(images)), gt, pred, pidx, snum, ids)


def _member_name(path: Path) -> str:
    """A model file as messages name it: with its folder (fold_0/last.safetensors)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def training_overlap(
    predictor: Any, model_paths: Sequence[Path], scored: Sequence[str]
) -> dict[str, Any]:
    """Which scored patients each model (each member of an ensemble) was trained on.

    ``members``: every model behind the predictor (an ensemble's folds); ``by_model``: the
    scored patients each trained on (only those with any); ``unknown``: members whose file
    does not record its training patients; ``trained_on_scored_patients``: the union.
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
    """Check the paths, evaluate into a new run folder (its ``masks/`` are the files scored),
    write the tuned copy (if asked) and the run folder's reports."""
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
    refuse_inside_data(job.project, lgg.find_root(data))
    opts = job.opts
    if job.tune_output is not None:
        opts = dataclasses.replace(opts, tune=True)
        check_tune_output(models, job.tune_output, job.force)
    with fresh_run_dir(job.project, job.name, exist_ok=job.exist_ok) as run_dir:
        masks = run_dir / "masks"
        result = run_eval(models, data, job.split, job.subset, job.fold, opts, masks_dir=masks)
        if result.tune is not None:
            # the _prob.tif files --tune searched on are float32, far larger than the masks
            for prob in masks.glob("*/*_prob.tif"):
                prob.unlink()
            if job.tune_output is not None:
                record = tuned_record(result)
                write_tuned_model(models[0], job.tune_output, result.tune.best, job.force, record)
                result.summary["tune"]["output"] = str(job.tune_output)
        result.summary["masks"] = str(masks)
        write_run(result, run_dir)
    return result


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
    """Set the tuned values in a copy's ONNX ``metadata_props``: inside the JSON blobs
    (``brainseg`` / ``metadata``) and as the plain ``threshold`` / ``postprocess`` keys."""
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
    onnx.helper.set_model_props(model, props)
    with atomic_path(dst, force=force) as tmp:
        onnx.save(model, str(tmp))
    return dst
