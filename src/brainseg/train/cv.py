"""Patient-level cross-validation in one call: train every fold, predict out of fold, summarise.

The library side of ``brainseg cv`` (docs/cv.md): ``write_cv(run_cv(CVOptions(...)))``.

Every fold is a normal ``brainseg train`` run folder ``runs/cv/expN/fold_k/`` (trained by
:func:`brainseg.train.train`); ``runs/cv/expN/cv.yaml`` holds the resolved options and
``split.yaml`` the folds, so a killed cv continues from them alone: finished folds (their
last.safetensors says ``epochs`` epochs are done) are skipped, a partly trained fold resumes
from its last.safetensors, a fold that never saved starts again.

Each patient is then predicted by the one fold model that did not train on it (its fold's
validation patients), at the images' own size; the threshold and post-processing are chosen
once on these pooled out-of-fold predictions (:func:`brainseg.evaluation.dataset.tune`) and reported
before and after. Confidence intervals are percentile bootstraps over patients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import __version__
from brainseg import console as con
from brainseg.config import (
    TrainConfig,
    dump_yaml,
    fields_with,
    load_config,
    load_resume_config,
    read_yaml,
)
from brainseg.data.cache import load_dataset
from brainseg.data.split import check_split, load_split, make_split, save_split
from brainseg.ensemble import MANIFEST_NAME, write_ensemble
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.evaluation import metrics
from brainseg.evaluation.dataset import PostSettings, tune
from brainseg.evaluation.metrics import CV_PATIENT_COLUMNS, describe
from brainseg.evaluation.report import write_cv_report
from brainseg.evaluation.runfolder import rows_to_csv
from brainseg.fsutil import (
    atomic_path,
    atomic_write_text,
    check_run_name,
    folder_lock,
    json_safe,
    next_run_dir,
    remove_temps,
)
from brainseg.inference import postprocess
from brainseg.inference.postprocess import DEFAULT_THRESHOLD
from brainseg.inference.predict import load_predictor
from brainseg.model.checkpoint import read_metadata
from brainseg.settings import InferenceSettings
from brainseg.yamlio import parse_yaml

SELECTS = ("last", "best")
PROTOCOLS = ("brainseg", "buda")
#: What each --select reports (the label goes wherever the numbers are shown).
SELECT_LABELS = {
    "last": "final checkpoint of each fold",
    "best": "best epoch of each fold, selected on the validation patients",
}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
CV_FILE = "cv.yaml"
SPLIT_FILE = "split.yaml"
CV_FORMAT = 1
#: TrainConfig settings cv sets for every fold itself (refused in --set).
FOLD_KEYS = fields_with("per_fold")
#: Settings that do not change what is trained: they may differ when a cv is continued.
RUNTIME_KEYS = fields_with("runtime")


# =============================================================================== options
@dataclass
class CVOptions:
    """What ``brainseg cv`` was asked; ``None`` means "the default" or "from cv.yaml"."""

    data: str | None = None
    folds: int | None = None  # make a K-fold split (seeded by the train seed)
    split: str | None = None  # or use this split file made with `brainseg split --folds K`
    config: str | None = None  # preset (seed, best) or YAML file
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig settings
    select: str | None = None  # last (default) | best
    protocol: str | None = None  # brainseg (default) | buda
    project: str = "runs/cv"
    name: str = "exp"
    resume: str | None = None  # a cv folder to continue
    fold: int | None = None  # --fold K: train only this fold (folds as independent jobs)
    show_fold: Callable[[Any], None] | None = None  # renders a fold's TrainResult (the command)


@dataclass
class CVPlan:
    """A cv folder and everything needed to (re)run it, read from or written to cv.yaml."""

    cv_dir: Path
    data: str
    n_folds: int
    train: dict[str, Any]  # TrainConfig settings of every fold (without FOLD_KEYS)
    select: str
    protocol: str
    fold_jobs: bool = False  # made by --fold K: folds are trained by their own jobs

    @property
    def split_path(self) -> Path:
        return self.cv_dir / SPLIT_FILE

    def fold_dir(self, k: int) -> Path:
        return self.cv_dir / f"fold_{k}"

    def model_path(self, k: int) -> Path:
        return self.fold_dir(k) / f"{self.select}.safetensors"


@dataclass
class FoldRun:
    """One fold: its run folder and what this invocation did with it."""

    fold: int
    run_dir: Path
    status: str  # "finished earlier" | "resumed" | "trained"
    model: Path
    val_patients: list[str]


@dataclass
class OOF:
    """Out-of-fold probabilities of every cross-validated slice (dataset row order)."""

    prob: np.ndarray  # N x H x W float32
    gt: np.ndarray  # N x H x W bool
    patient_index: np.ndarray  # N, into patient_ids
    slice_number: np.ndarray  # N
    fold: np.ndarray  # N, the fold whose model predicted the slice
    patient_ids: list[str]
    rows: np.ndarray | None = None  # N, the dataset rows (for report.html's montages)


@dataclass
class CVResult:
    """Everything ``brainseg cv`` reports and writes."""

    plan: CVPlan
    folds: list[FoldRun]
    summary: dict[str, Any]
    per_patient: list[dict[str, Any]]
    masks: dict[str, np.ndarray]  # "before" / "after" (/ "buda") OOF masks, N x H x W bool
    oof: OOF
    files: list[Path] = field(default_factory=list)  # what write_cv wrote


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as TrainConfig overrides (values read as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise BrainsegError(
                f"--set {item!r} is not KEY=VALUE", hint="e.g. --set lr=3e-4 --set augment=true"
            )
        if key in FOLD_KEYS:
            raise BrainsegError(
                f"--set {key} is chosen by brainseg cv for every fold",
                hint="give the data, the split and the run folder as cv options",
            )
        try:
            value = (
                parse_yaml(raw, f"--set {key}", "give a plain value, e.g. --set lr=3e-4")
                if raw.strip()
                else None
            )
        except BrainsegError as exc:
            if not isinstance(exc.__cause__, yaml.YAMLError):
                raise  # a limit (too deep, too many values): not a plain value either
            value = raw  # not YAML: the text itself
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as text: numbers are numbers here
            with contextlib.suppress(ValueError):
                value = float(value)
        out[key] = value
    return out


def _check_options(opts: CVOptions) -> None:
    """Refuse contradictory options before anything is read or trained."""
    if opts.select is not None and opts.select not in SELECTS:
        raise BrainsegError(f"unknown --select {opts.select!r}", hint="choose last or best")
    if opts.protocol is not None and opts.protocol not in PROTOCOLS:
        raise BrainsegError(
            f"unknown --protocol {opts.protocol!r}", hint=f"choose one of: {', '.join(PROTOCOLS)}"
        )
    if opts.folds is not None and opts.split is not None:
        raise BrainsegError(
            "--folds and --split cannot be combined",
            hint="the split file already fixes the folds; leave out --folds",
        )
    if opts.folds is not None and opts.folds < 2:
        raise BrainsegError(f"--folds must be at least 2, got {opts.folds}", hint="e.g. --folds 5")
    bad = sorted(set(opts.overrides) & set(FOLD_KEYS))
    if bad:
        raise BrainsegError(f"cannot set {', '.join(bad)} for a cv", hint="cv sets them per fold")
    if opts.resume is not None:
        given = [k for k, v in opts.overrides.items() if v is not None and k not in RUNTIME_KEYS]
        if opts.config is not None:
            given.append("config")
        if opts.folds is not None or opts.split is not None:
            given.append("folds" if opts.folds is not None else "split")
        if given:
            raise BrainsegError(
                f"cannot change {', '.join('--' + g.replace('_', '-') for g in given)} when "
                f"resuming {opts.resume}",
                hint="a resumed cv keeps its cv.yaml; only "
                f"{', '.join('--' + k.replace('_', '-') for k in RUNTIME_KEYS)}, --select and "
                "--protocol may be given (start a new cv to change the recipe)",
            )
    elif not opts.data:
        raise BrainsegError("no dataset given", hint="brainseg cv DATA --folds 5")


# =============================================================================== the cv folder
def _read_cv_yaml(cv_dir: Path) -> dict[str, Any]:
    path = cv_dir / CV_FILE
    if not path.is_file():
        raise BrainsegError(
            f"cannot resume: {path} does not exist",
            hint="pass a folder written by brainseg cv, e.g. runs/cv/exp",
        )
    doc = read_yaml(path)
    if doc.get("format") != CV_FORMAT or not isinstance(doc.get("train"), dict):
        raise BrainsegError(f"{path} is not a brainseg cv file", hint="pass runs/cv/expN")
    return doc


def _request(opts: CVOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """The resolved train settings and the identity of the request (what a rerun must match)."""
    assert opts.data is not None
    cfg = load_config(opts.config, {**opts.overrides, "data": str(opts.data)})
    cfg.validate(need_data=False)
    train = {k: v for k, v in cfg.to_dict().items() if k not in FOLD_KEYS}
    if opts.split is not None:
        p = Path(opts.split)
        if not p.is_file():
            raise BrainsegError(
                f"split file {p} does not exist",
                hint="make one with: brainseg split DATA --folds 5 -o folds.yaml",
            )
        folds: dict[str, Any] = {"split_sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    else:
        folds = {"folds": opts.folds or 5, "seed": cfg.seed}
    recipe = {k: v for k, v in train.items() if k not in RUNTIME_KEYS}
    request = {"data": str(Path(opts.data).resolve()), **folds, "train": recipe}
    return train, json.loads(json.dumps(request))


def _find_same(project: Path, name: str, request: dict[str, Any]) -> Path | None:
    """The newest cv folder ``project/name*`` made for exactly this request, if any."""
    import re

    if not project.is_dir():
        return None
    pat = re.compile(rf"^{re.escape(name)}(\d*)$")
    found = []
    for p in project.iterdir():
        m = pat.match(p.name)
        if m and (p / CV_FILE).is_file():
            found.append((int(m.group(1) or 1), p))
    for _, p in sorted(found, reverse=True):
        try:
            if _read_cv_yaml(p).get("request") == request:
                return p
        except BrainsegError:
            continue
    return None


def _write_split(cv_dir: Path, opts: CVOptions, seed: int, skip_bad: bool) -> int:
    """split.yaml of a new cv (a copy of --split, or K folds made here); returns K."""
    assert opts.data is not None
    ds = load_dataset(opts.data, skip_bad=skip_bad)
    if opts.split is not None:
        split = load_split(opts.split)  # its folds were checked before the folder was made
        check_split(split, ds.patient_ids)
        atomic_write_text(cv_dir / SPLIT_FILE, Path(opts.split).read_text(encoding="utf-8"))
        return split.n_folds
    burden = ds.tumor_slices_per_patient()
    split = make_split(burden, folds=opts.folds or 5, seed=seed)
    save_split(split, cv_dir / SPLIT_FILE, force=True)
    return split.n_folds


def prepare(opts: CVOptions) -> CVPlan:
    """Find (same request, or --resume) or create the cv folder; returns its plan."""
    _check_options(opts)
    if opts.resume is not None:
        cv_dir = Path(opts.resume)
        doc = _read_cv_yaml(cv_dir)
        if opts.data and Path(opts.data).resolve() != Path(doc["data"]).resolve():
            raise BrainsegError(
                f"cv {cv_dir} was run on {doc['data']}, not {opts.data}",
                hint=f"leave out DATA: brainseg cv --resume {cv_dir}",
            )
        runtime = {k: v for k, v in opts.overrides.items() if k in RUNTIME_KEYS and v is not None}
        return _plan(cv_dir, doc, opts, runtime)

    check_run_name(opts.name)
    train, request = _request(opts)
    if opts.fold is None:
        return _find_or_create(opts, train, request)
    # fold jobs started at once (a SLURM array) must find or make one folder, not exp, exp2...
    with _waiting_lock(Path(opts.project), f"brainseg-cv-{opts.name}"):
        return _find_or_create(opts, train, request)


@contextlib.contextmanager
def _waiting_lock(folder: Path, name: str, seconds: float = 600.0) -> Any:
    """:func:`brainseg.fsutil.folder_lock`, waiting (polling) while another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(folder_lock(folder, name, "brainseg cv --fold"))
                break
            except BrainsegError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield


def _find_or_create(opts: CVOptions, train: dict[str, Any], request: dict[str, Any]) -> CVPlan:
    """The cv folder of this request (the newest ``project/name*``), or a new one."""
    same = _find_same(Path(opts.project), opts.name, request)
    if same is not None:
        con.info(f"continuing {same} (a cv with the same data, folds and settings)")
        runtime = {k: train[k] for k in RUNTIME_KEYS}
        return _plan(same, _read_cv_yaml(same), opts, runtime)
    # refuse a split without folds before making a folder
    if opts.split is not None and load_split(opts.split).n_folds < 2:
        raise BrainsegError(
            f"split {opts.split} has no cross-validation folds",
            hint="make one with: brainseg split DATA --folds 5 -o folds.yaml",
        )
    cv_dir = next_run_dir(opts.project, opts.name)
    n_folds = _write_split(cv_dir, opts, int(train["seed"]), bool(train["skip_bad"]))
    doc = {
        "format": CV_FORMAT,
        "created_by": f"brainseg {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": request["data"],
        "folds": n_folds,
        "split": SPLIT_FILE,
        "split_source": str(Path(opts.split).resolve()) if opts.split else "made by brainseg cv",
        "select": opts.select or "last",
        "protocol": opts.protocol or "brainseg",
        "train": train,
        "request": request,
        "fold_jobs": opts.fold is not None,
    }
    atomic_write_text(cv_dir / CV_FILE, dump_yaml(doc))  # last: marks the folder as complete
    return _plan(cv_dir, doc, opts, {})


def _plan(cv_dir: Path, doc: dict[str, Any], opts: CVOptions, runtime: dict[str, Any]) -> CVPlan:
    return CVPlan(
        cv_dir=cv_dir,
        data=str(doc["data"]),
        n_folds=int(doc["folds"]),
        train={**doc["train"], **runtime},
        select=opts.select or str(doc.get("select") or "last"),
        protocol=opts.protocol or str(doc.get("protocol") or "brainseg"),
        fold_jobs=bool(doc.get("fold_jobs")),
    )


# =============================================================================== training
def fold_progress(run_dir: Path) -> tuple[int, int] | None:
    """``(epochs done, steps done in the next epoch)`` from the fold's last.safetensors."""
    last = run_dir / "last.safetensors"
    if not last.is_file():
        return None
    meta = read_metadata(last)
    state = meta.get("train_state") or {}
    return int(state.get("epoch", meta.get("epoch", 0))), int(state.get("step_in_epoch", 0))


def train_fold(plan: CVPlan, k: int, show: Callable[[Any], None] | None = None) -> FoldRun:
    """Train fold ``k`` (or resume it, or skip it when finished); ``show`` gets its TrainResult."""
    from brainseg.train.setup import missing_final_files

    run = plan.fold_dir(k)
    epochs = int(plan.train["epochs"])
    val = load_split(plan.split_path).patients("val", k)
    progress = fold_progress(run)
    trained = progress is not None and progress[0] >= epochs and progress[1] == 0
    if trained and not missing_final_files(run):
        con.info(f"fold {k}/{plan.n_folds}: finished earlier ({run}), not retrained")
        status = "finished earlier"
    else:
        from brainseg.train import run_training

        if trained:  # stopped after its last checkpoint: --resume writes what it lacks
            con.info(f"fold {k}/{plan.n_folds}: finishing {run}")
        elif progress is not None:
            con.info(f"fold {k}/{plan.n_folds}: resuming {run} at epoch {progress[0] + 1}/{epochs}")
        if progress is not None:
            runtime = {key: plan.train[key] for key in RUNTIME_KEYS}
            cfg = load_resume_config(run, {**runtime, "epochs": epochs})
            status = "resumed"
        else:
            if run.is_dir():  # killed before its first checkpoint: start the fold again
                remove_temps(run)
            con.info(f"fold {k}/{plan.n_folds}: training -> {run}")
            values = {
                **plan.train,
                "data": plan.data,
                "split": str(plan.split_path),
                "fold": k,
                "project": str(plan.cv_dir),
                "name": run.name,
                "exist_ok": True,
            }
            cfg = TrainConfig.from_dict(values, f"{plan.cv_dir / CV_FILE}")
            status = "trained"
        fold_result = run_training(cfg)  # validates; into ``run`` (project, name, exist_ok)
        if show is not None and fold_result.is_main:
            show(fold_result)
    model = plan.model_path(k)
    if not model.is_file():
        raise BrainsegRuntimeError(
            f"fold {k} has no {model.name} ({run})", hint="resume the cv to finish the fold"
        )
    return FoldRun(k, run, status, model, list(val))


# =============================================================================== out of fold
def check_coverage(val_by_fold: Sequence[Sequence[str]], cv_patients: Iterable[str]) -> None:
    """Every cross-validated patient is in exactly one fold's validation patients."""
    seen: dict[str, list[int]] = {}
    for k, ids in enumerate(val_by_fold):
        for p in ids:
            seen.setdefault(p, []).append(k)
    twice = {p: f for p, f in seen.items() if len(f) > 1}
    missing = sorted(set(cv_patients) - set(seen))
    if twice or missing:
        what = [f"{p} in folds {f}" for p, f in sorted(twice.items())[:5]]
        what += [f"{p} in no fold" for p in missing[:5]]
        raise BrainsegRuntimeError(
            f"out-of-fold coverage is broken: {'; '.join(what)}",
            hint="every patient must be a validation patient of exactly one fold: make the "
            "split again with `brainseg split DATA --folds K`",
        )


def predict_oof(plan: CVPlan, folds: Sequence[FoldRun]) -> tuple[OOF, int]:
    """Each fold's validation patients predicted by that fold's model; returns (oof, #test)."""
    ds = load_dataset(plan.data, skip_bad=bool(plan.train.get("skip_bad", False)))
    split = load_split(plan.split_path)
    check_split(split, ds.patient_ids)
    test = set(split.subsets.get("test", []))
    check_coverage(
        [f.val_patients for f in folds], [p for p in split.all_patients if p not in test]
    )
    fold_of = np.full(len(ds), -1, dtype=np.int64)
    for f in folds:  # the folds' validation patients are disjoint (check_coverage)
        fold_of[ds.indices_of(f.val_patients)] = f.fold
    rows_all = np.flatnonzero(fold_of >= 0)
    h, w = ds.size
    prob = np.empty((rows_all.size, h, w), dtype=np.float32)
    # the inference settings predict and eval take: the folds' device and validation batch
    batch_size = plan.train.get("val_batch_size") or plan.train.get("batch_size") or 16
    device = str(plan.train.get("device", "auto"))
    infer = InferenceSettings(device=device, batch_size=int(batch_size))
    for f in folds:
        rows = np.flatnonzero(fold_of == f.fold)
        con.info(f"out-of-fold: fold {f.fold} model predicts {len(f.val_patients)} patients")
        predictor = load_predictor([f.model], infer)
        prob[np.searchsorted(rows_all, rows)] = predict_rows(predictor, ds.images, rows)
    oof = OOF(
        prob=prob,
        gt=np.asarray(ds.masks[rows_all]) != 0,
        patient_index=np.asarray(ds.patient_index[rows_all]),
        slice_number=np.asarray(ds.slice_number[rows_all]),
        fold=fold_of[rows_all],
        patient_ids=list(ds.patient_ids),
        rows=rows_all,
    )
    return oof, len(test)


def predict_rows(
    predictor: Any, images: np.ndarray, rows: np.ndarray, chunk: int = 32
) -> np.ndarray:
    """Tumour probabilities (len(rows) x H x W) of ``images[rows]`` (memory-mapped), by chunks."""
    h, w = images.shape[2], images.shape[3]
    out = np.empty((len(rows), h, w), dtype=np.float32)
    with con.progress(len(rows), "predict", unit="slice") as bar:
        for start in range(0, len(rows), chunk):
            sel = rows[start : start + chunk]
            batch = np.ascontiguousarray(np.asarray(images[sel]).transpose(0, 2, 3, 1))
            out[start : start + len(sel)] = predictor.predict_proba(batch)
            bar.advance(len(sel))
    return out


# =============================================================================== statistics
def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over patients (NaN left out; none finite: NaNs)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def institution(patient_id: str) -> str:
    """The TCGA site code of a kaggle_3m patient id (``TCGA_<site>_<case>_<date>``)."""
    parts = patient_id.split("_")
    return parts[1] if len(parts) >= 3 and parts[0] == "TCGA" else "unknown"


def dice_stats(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """:func:`brainseg.evaluation.metrics.describe` and the 95% bootstrap CI."""
    lo, hi = bootstrap_ci(values)
    return {**describe(values), "ci95": [lo, hi]}


def _grouped(dice: Mapping[str, float], key: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[float]] = {}
    for p, d in dice.items():
        groups.setdefault(str(key[p]), []).append(d)
    return {g: dice_stats(v) for g, v in sorted(groups.items())}


def block(report: Any, settings: Mapping[str, Any], fold_of: Mapping[str, int]) -> dict[str, Any]:
    """One evaluated setting: per-patient Dice (all / per fold / per institution) + metrics."""
    dice = {r["patient_id"]: float(r["dice"]) for r in report.per_patient}
    return {
        "settings": dict(settings),
        "per_patient_dice": dice_stats(list(dice.values())),
        "per_fold": _grouped(dice, fold_of),
        "per_institution": _grouped(dice, {p: institution(p) for p in dice}),
        "metrics": report.summary(),
    }


# =============================================================================== buda protocol
def largest_face_connected(volume: np.ndarray) -> np.ndarray:
    """The largest 3D component with 6-connectivity, as medpy's largest_connected_component
    does on the author's volumes (brainseg's own post-processing uses 26-connectivity)."""
    from scipy import ndimage

    v = np.asarray(volume) != 0
    labels, n = ndimage.label(v)
    if n <= 1:
        return v
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def buda_masks(oof: OOF) -> tuple[np.ndarray, np.ndarray]:
    """The author's evaluation: first and last slice of each volume dropped, probability
    >= 0.5, largest 6-connected 3D component per patient; returns (kept rows, masks)."""
    pidx, snum = oof.patient_index, oof.slice_number
    keep = np.ones(len(pidx), dtype=bool)
    for p in np.unique(pidx):
        rows = np.flatnonzero(pidx == p)
        keep[rows[np.argmin(snum[rows])]] = False
        keep[rows[np.argmax(snum[rows])]] = False
    rows_kept = np.flatnonzero(keep)
    mask = oof.prob[rows_kept] >= DEFAULT_THRESHOLD
    kp = pidx[rows_kept]
    for p in np.unique(kp):
        rows = np.flatnonzero(kp == p)
        rows = rows[np.argsort(snum[rows_kept][rows], kind="stable")]
        mask[rows] = largest_face_connected(mask[rows])
    return rows_kept, mask


# =============================================================================== summary
def summarise(plan: CVPlan, folds: Sequence[FoldRun]) -> CVResult:
    """Predict out of fold, choose the post-processing once, measure before and after."""
    oof, n_test = predict_oof(plan, folds)
    pidx, snum = oof.patient_index, oof.slice_number
    fold_of = {oof.patient_ids[int(i)]: int(f) for i, f in zip(pidx, oof.fold, strict=True)}
    baseline = PostSettings(postprocess.DEFAULT_THRESHOLD, 0, False)
    tuned = tune(oof.prob, oof.gt, pidx, snum, baseline)
    masks: dict[str, np.ndarray] = {}
    reports: dict[str, Any] = {}
    for key, s in (("before", baseline), ("after", tuned.best)):
        masks[key] = postprocess.apply(
            oof.prob, s.threshold, s.min_size, s.largest, groups=pidx, order=snum
        )
        reports[key] = metrics.evaluate(masks[key], oof.gt, pidx, snum, oof.patient_ids)
    summary: dict[str, Any] = {
        "brainseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cv_dir": str(plan.cv_dir),
        "data": plan.data,
        "folds": plan.n_folds,
        "patients": len(fold_of),
        "slices": len(pidx),
        "test_patients_not_evaluated": n_test,
        "selection": {"select": plan.select, "label": SELECT_LABELS[plan.select]},
        "protocol": plan.protocol,
        "bootstrap": {
            "method": "percentile bootstrap of the mean, patients resampled with replacement",
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "level": BOOTSTRAP_LEVEL,
        },
        "before": block(reports["before"], baseline.as_dict(), fold_of),
        "after": block(reports["after"], tuned.best.as_dict(), fold_of),
        "tuning": {
            **tuned.as_dict(),
            "note": f"chosen once on the pooled out-of-fold predictions of {len(fold_of)} patients",
        },
        "buda": None,
        "fold_runs": [_fold_row(plan, f) for f in folds],
    }
    buda_dice: dict[str, float] = {}
    if plan.protocol == "buda":
        rows, m = buda_masks(oof)
        rep = metrics.evaluate(
            m, oof.gt[rows], pidx[rows], snum[rows], oof.patient_ids, compute_hd95=False
        )
        summary["buda"] = {
            **block(
                rep, {"threshold": postprocess.DEFAULT_THRESHOLD, "largest": "6-connected"}, fold_of
            ),
            "protocol": "first and last slice of each volume dropped; threshold 0.5; largest "
            "6-connected 3D component; Dice over each patient's volume",
            "slices": len(rows),
        }
        buda_dice = {r["patient_id"]: float(r["dice"]) for r in rep.per_patient}
    per_patient = _patient_rows(reports, fold_of, buda_dice)
    return CVResult(plan, list(folds), summary, per_patient, masks, oof)


def _fold_row(plan: CVPlan, f: FoldRun) -> dict[str, Any]:
    return {
        "fold": f.fold,
        "run": f.run_dir.name,
        "status": f.status,
        "model": f.model.relative_to(plan.cv_dir).as_posix(),
        "val_patients": f.val_patients,
    }


def _patient_rows(
    reports: Mapping[str, Any], fold_of: Mapping[str, int], buda: Mapping[str, float]
) -> list[dict[str, Any]]:
    before = {r["patient_id"]: r["dice"] for r in reports["before"].per_patient}
    rows = []
    for r in reports["after"].per_patient:
        p = r["patient_id"]
        row = {
            **{c: r[c] for c in CV_PATIENT_COLUMNS if c in r},
            "fold": fold_of[p],
            "institution": institution(p),
            "dice_before": float(before[p]),
        }
        if buda:
            row["dice_buda"] = float(buda.get(p, math.nan))
        rows.append(row)
    return rows


def run_fold(opts: CVOptions) -> tuple[CVPlan, FoldRun]:
    """``--fold K``: find or make the cv folder (safe for jobs started at once), train fold K."""
    assert opts.fold is not None
    plan = prepare(opts)
    if not 0 <= opts.fold < plan.n_folds:
        raise BrainsegError(
            f"--fold {opts.fold}: {plan.cv_dir} has folds 0 to {plan.n_folds - 1}",
            hint=f"--fold K with 0 <= K < {plan.n_folds}",
        )
    with _fold_lock(plan, opts.fold):
        return plan, train_fold(plan, opts.fold, opts.show_fold)


def run_cv(opts: CVOptions) -> CVResult:
    """Train (or continue) every fold, then predict out of fold and summarise (no files); a cv
    of ``--fold K`` jobs is only collected here, once every fold is finished."""
    plan = prepare(opts)
    con.info(
        f"cv {plan.cv_dir}: {plan.n_folds} folds, {plan.train['epochs']} epochs each, "
        f"reporting the {SELECT_LABELS[plan.select]}"
    )
    if plan.fold_jobs:
        missing = [k for k in range(plan.n_folds) if not fold_finished(plan, k)]
        if missing:
            raise BrainsegRuntimeError(
                f"cv {plan.cv_dir}: fold(s) {', '.join(map(str, missing))} of {plan.n_folds} "
                "not finished yet (their folds run as separate jobs; nothing was trained here)",
                hint=f"run brainseg cv --resume {plan.cv_dir} --fold K for each, or wait for "
                "their jobs, then collect again",
            )
    folds = []
    for k in range(plan.n_folds):
        with _fold_lock(plan, k):
            folds.append(train_fold(plan, k, opts.show_fold))
    return summarise(plan, folds)


def fold_finished(plan: CVPlan, k: int) -> bool:
    """Fold ``k`` has trained all its epochs, written its final files and its model."""
    from brainseg.train.setup import missing_final_files

    run = plan.fold_dir(k)
    progress = fold_progress(run)
    return (
        progress is not None
        and progress[0] >= int(plan.train["epochs"])
        and progress[1] == 0
        and not missing_final_files(run)
        and plan.model_path(k).is_file()
    )


def _fold_lock(plan: CVPlan, k: int) -> Any:
    """One process per fold: a second job on the same fold is refused (exit 2)."""
    return folder_lock(plan.cv_dir, f"brainseg-cv-fold-{k}", f"brainseg cv, fold {k}")


# =============================================================================== outputs
def write_cv(result: CVResult) -> list[Path]:
    """cv_summary.json, per_patient.csv, oof_masks.npz, ensemble.json, report.html."""
    d = result.plan.cv_dir
    cols = CV_PATIENT_COLUMNS + (["dice_buda"] if result.summary.get("buda") else [])
    files = [atomic_write_text(d / "per_patient.csv", rows_to_csv(result.per_patient, cols))]
    files.append(_write_masks(d / "oof_masks.npz", result))
    best = result.summary["after"]["settings"]
    tuning = result.summary["tuning"]
    info = {
        "selection": result.summary["selection"],
        "tuning": {
            "chosen_on": tuning["note"],
            "objective": tuning["objective"],
            "before": tuning["baseline"],
            "after": tuning["best"],
            "grid": tuning["grid"],
        },
        "cv_summary": "cv_summary.json",
        "cv_out_of_fold": json_safe(oof_figure(result.summary)),
    }
    files.append(
        write_ensemble(
            d / MANIFEST_NAME,
            [f.model for f in result.folds],
            best["threshold"],
            best["min_size"],
            best["largest"],
            info,
        )
    )
    files.append(write_cv_report(result))
    result.summary["files"] = [p.name for p in files] + ["cv_summary.json"]
    text = json.dumps(json_safe(result.summary), indent=2, allow_nan=False) + "\n"
    files.append(atomic_write_text(d / "cv_summary.json", text))
    result.files = files
    return files


def oof_figure(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The cv's headline figure as ensemble.json keeps it (and the cards of models made from it)."""
    before = summary["before"]["per_patient_dice"]
    after = summary["after"]["per_patient_dice"]
    return {
        "what": "mean per-patient Dice of the cross-validation, out of fold (each patient "
        "predicted by the fold model that did not train on it)",
        "folds": summary["folds"],
        "patients": summary["patients"],
        "selection": summary["selection"]["label"],
        "dice_patient_before_tuning": before["mean"],
        "ci95_before_tuning": before.get("ci95"),
        "dice_patient_after_tuning": after["mean"],
        "ci95_after_tuning": after.get("ci95"),
        "settings_after_tuning": summary["after"]["settings"],
        "tuning_chosen_on": summary["tuning"]["note"]
        + " (the after-tuning figure is measured on the patients it was chosen on)",
    }


def _write_masks(path: Path, result: CVResult) -> Path:
    """The out-of-fold masks and their slice keys (compressed npz, no pickle)."""
    oof = result.oof
    arrays = {
        "patient_ids": np.array(oof.patient_ids, dtype=str),
        "patient_index": oof.patient_index.astype(np.int32),
        "slice_number": oof.slice_number.astype(np.int32),
        "fold": oof.fold.astype(np.int32),
        **{f"mask_{k}": v for k, v in result.masks.items()},
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    return path
