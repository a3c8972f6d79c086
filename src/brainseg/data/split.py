"""Patient-level train / val / test splits and K-fold cross-validation, saved as YAML.

Slices of one patient are strongly correlated, so every split here assigns whole patients:
no patient ever has slices in two subsets (slice-level random splits leak and inflate
scores). Subsets are stratified by tumour burden so that validation is neither all large
tumours nor all tumour-free patients. A split records a short hash of the dataset's patient
ids, so a split made for one dataset is not silently used on another.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from brainseg import __version__, console
from brainseg.data.cache import load_dataset
from brainseg.errors import BrainsegError, first_line
from brainseg.fsutil import atomic_path, check_target
from brainseg.yamlio import parse_yaml

SUBSETS = ("train", "val", "test")
#: What ``--subset`` of eval and score accepts.
EVAL_SUBSETS: tuple[str, ...] = ("val", "test", "train", "all")
FORMAT_VERSION = 1
_MAKE_HINT = "make a split with `brainseg split DATA -o {path}`"


@dataclass
class Split:
    """A patient-level split: ``subsets`` maps train / val / test to patient ids.

    With K folds every non-test patient is in exactly one fold's ``val``, and ``subsets``
    train / val equal fold 0 so that code which ignores folds still gets a sensible split.
    """

    seed: int
    dataset_hash: str
    val_fraction: float
    test_fraction: float
    subsets: dict[str, list[str]]
    folds: list[dict[str, list[str]]] = field(default_factory=list)
    source: Path | None = None  # the file it was loaded from, for messages

    @property
    def n_folds(self) -> int:
        """Number of cross-validation folds (0 for a plain split)."""
        return len(self.folds)

    @property
    def all_patients(self) -> list[str]:
        """Every patient of the split (train + val + test), sorted."""
        return sorted({p for s in SUBSETS for p in self.subsets.get(s, [])})

    @property
    def name(self) -> str:
        """How messages name this split: ``split PATH``, or ``the split`` when made in memory."""
        return f"split {self.source}" if self.source else "the split"

    def patients(self, subset: str, fold: int | None = None) -> list[str]:
        """Patient ids of ``subset``, of ``fold`` if given (test is held out of every fold)."""
        if subset not in SUBSETS:
            raise BrainsegError(
                f"unknown subset {subset!r} in {self.name}; expected one of {', '.join(SUBSETS)}",
                hint="use train, val or test",
            )
        self.check_fold(fold)
        if fold is None or subset == "test":
            return list(self.subsets.get(subset, []))
        return list(self.folds[fold][subset])

    def check_fold(self, fold: int | None) -> None:
        """The one fold check (split, train, eval): refuse a fold this split does not have."""
        if fold is None:
            return
        if not self.folds:
            raise BrainsegError(
                f"--fold {fold} was given, but {self.name} has no folds",
                hint="a split made without --folds has no cross-validation folds: make one "
                "with `brainseg split DATA -o splits.yaml --folds 5`, or leave out the fold",
            )
        n = len(self.folds)
        if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n:
            raise BrainsegError(
                f"--fold {fold!r} is out of range: {self.name} has {n} folds, "
                f"numbered 0 to {n - 1}",
                hint=f"use a fold from 0 to {n - 1}",
            )

    def to_dict(self) -> dict[str, Any]:
        """The YAML / JSON form (see docs/splits.md)."""
        return {
            "format": FORMAT_VERSION,
            "created_by": f"brainseg {__version__}",
            "seed": int(self.seed),
            "dataset_hash": self.dataset_hash,
            "patients": len(self.all_patients),
            "val_fraction": round(float(self.val_fraction), 6),
            "test_fraction": round(float(self.test_fraction), 6),
            "n_folds": self.n_folds,
            "counts": {s: len(self.subsets.get(s, [])) for s in SUBSETS},
            "subsets": {s: list(self.subsets.get(s, [])) for s in SUBSETS},
            "folds": [{"train": list(f["train"]), "val": list(f["val"])} for f in self.folds],
        }


#: The keys a split file may hold: those Split.to_dict writes (others are refused).
KEYS = tuple(Split(0, "", 0.0, 0.0, {}).to_dict())


def _ids(values: Iterable[object]) -> str:
    """Ids for a message, quoted (repr) when unprintable so a message never spans two lines."""
    return ", ".join(v if isinstance(v, str) and v.isprintable() else repr(v) for v in values)


def dataset_hash(patient_ids: Iterable[str]) -> str:
    """Short (16 hex digits) sha256 of the sorted, de-duplicated patient ids."""
    ids = sorted({str(p) for p in patient_ids})
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]


def check_options(val_fraction: float, test_fraction: float, folds: int | None) -> None:
    """Validate the fractions and fold count before any work (patients are counted later)."""

    def num(x: object) -> bool:
        return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)

    if folds is None and not (num(val_fraction) and 0 < val_fraction < 1):
        raise BrainsegError(
            f"--val-fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}",
            hint="for example --val-fraction 0.2; to train a final model on every patient, "
            "no split is needed: brainseg train DATA --fold all",
        )
    if not (num(test_fraction) and 0 <= test_fraction < 1):
        raise BrainsegError(
            f"--test-fraction must be a number from 0 up to (not including) 1, "
            f"got {test_fraction!r}",
            hint="for example --test-fraction 0.1, or 0 for no test subset",
        )
    if folds is None and val_fraction + test_fraction >= 1:
        raise BrainsegError(
            f"--val-fraction {val_fraction} + --test-fraction {test_fraction} leave no "
            "patients for training (their sum must be below 1)",
            hint="for example --val-fraction 0.2 --test-fraction 0.1",
        )
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, (int, np.integer))):
        raise BrainsegError(f"--folds must be an integer, got {folds!r}", hint="e.g. --folds 5")
    if folds is not None and folds < 2:
        raise BrainsegError(
            f"--folds must be at least 2, got {folds}", hint="for example --folds 5"
        )


def _order(burden: Mapping[str, float], ids: list[str], rng: np.random.Generator) -> list[str]:
    """Patients sorted by burden (largest first); ties broken by a seeded random order."""
    tiebreak = rng.permutation(len(ids))
    keys = np.array([float(burden[p]) for p in ids])
    order = np.lexsort((tiebreak, -keys))
    return [ids[i] for i in order]


def _stratified_pick(ordered: list[str], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` patients, one drawn at random from each of ``k`` equal strata of ``ordered``."""
    strata = np.array_split(np.arange(len(ordered)), k)
    return [ordered[int(rng.choice(s))] for s in strata]


def _count(fraction: float, n: int) -> int:
    return max(1, math.floor(fraction * n + 0.5)) if fraction > 0 else 0  # half up


def make_split(
    burden: Mapping[str, float],
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    folds: int | None = None,
    seed: int = 0,
) -> Split:
    """A patient-level split of the patients in ``burden`` (patient id -> tumour burden).

    The burden only stratifies: one patient per stratum of the sorted burdens is drawn
    (seeded) for test and val, so every subset spans small to large tumours. With ``folds=K``
    the non-test patients are dealt into K folds (``val_fraction`` is then 1/K).
    """
    ids = sorted(str(p) for p in burden)
    n = len(ids)
    check_options(val_fraction, test_fraction, folds)
    if n < 2:
        raise BrainsegError(
            f"a split needs at least 2 patients, the dataset has {n}",
            hint="check the dataset folder (one sub-folder per patient)",
        )
    bad = [p for p in ids if not math.isfinite(float(burden[p]))]
    if bad:
        raise BrainsegError(
            f"tumour burden is not a finite number for {_ids(bad[:5])}",
            hint="burden must be a number per patient, e.g. the number of tumour slices",
        )
    rng = np.random.default_rng(seed)
    ordered = _order(burden, ids, rng)
    n_test = _count(test_fraction, n)
    test = _stratified_pick(ordered, n_test, rng) if n_test else []
    rest = [p for p in ordered if p not in set(test)]
    if folds is not None:
        fold_list = _deal_folds(rest, int(folds), rng)
        val_fraction = 1.0 / len(fold_list)
        subsets = {"train": fold_list[0]["train"], "val": fold_list[0]["val"], "test": sorted(test)}
    else:
        fold_list = []
        n_val = _count(val_fraction, n)
        if n - n_test - n_val < 1:
            raise BrainsegError(
                f"{n} patients are too few for --val-fraction {val_fraction} and "
                f"--test-fraction {test_fraction}: {n_val} val + {n_test} test leave no "
                "training patient",
                hint="lower the fractions (each non-empty subset needs at least one patient)",
            )
        val = _stratified_pick(rest, n_val, rng)
        train = [p for p in rest if p not in set(val)]
        subsets = {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    return Split(
        seed=int(seed),
        dataset_hash=dataset_hash(ids),
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
        subsets=subsets,
        folds=fold_list,
    )


def _deal_folds(rest: list[str], k: int, rng: np.random.Generator) -> list[dict[str, list[str]]]:
    """``k`` folds of ``rest``: each block of ``k`` (by burden) is shuffled across the folds."""
    if not 2 <= k <= len(rest):
        raise BrainsegError(
            f"--folds must be between 2 and the number of non-test patients ({len(rest)}), got {k}",
            hint="for example --folds 5",
        )
    labels = np.empty(len(rest), dtype=np.int64)
    for start in range(0, len(rest), k):
        block = min(k, len(rest) - start)
        labels[start : start + block] = rng.permutation(k)[:block]
    return [
        {
            "train": sorted(p for p, lab in zip(rest, labels, strict=True) if lab != f),
            "val": sorted(p for p, lab in zip(rest, labels, strict=True) if lab == f),
        }
        for f in range(k)
    ]


def to_yaml(split: Split) -> str:
    """The split as YAML text, with a comment header saying what it is."""
    d = split.to_dict()
    head = (
        f"# brainseg patient-level split, created by brainseg {__version__}\n"
        "# No patient is in two subsets. Use: brainseg train DATA --split THIS_FILE\n"
    )
    return head + yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=100)


def save_split(split: Split, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``split`` to ``path`` as YAML, atomically; an existing file needs ``force``."""
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(to_yaml(split), encoding="utf-8")
    return path


def _fix_hint(path: Path) -> str:
    return f"fix the file, or make a new one with `brainseg split DATA -o {path.name} --force`"


def _fail(path: Path, what: str) -> BrainsegError:
    return BrainsegError(f"invalid split file {path}: {what}", hint=_fix_hint(path))


def _id_list(path: Path, value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, (str, int)) for p in value):
        raise _fail(path, f"{where} must be a list of patient ids")
    ids = [str(p) for p in value]
    dup = sorted(p for p, n in Counter(ids).items() if n > 1)
    if dup:
        raise _fail(path, f"{where} lists {_ids(dup[:5])} more than once")
    return ids


def _read_mapping(path: Path) -> dict[Any, Any]:
    """The YAML mapping in ``path``, or one error saying why there is none."""
    if not path.is_file():
        what = "is a folder, not a split file" if path.is_dir() else "not found"
        raise BrainsegError(f"split file {path} {what}", hint=_MAKE_HINT.format(path=path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainsegError(
            f"cannot read split file {path}: {first_line(exc)}", hint=_MAKE_HINT.format(path=path)
        ) from exc
    d = parse_yaml(text, f"split file {path}", _fix_hint(path))
    if not isinstance(d, dict):
        raise _fail(path, "expected a mapping with seed, dataset_hash, subsets")
    return d


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _load_subsets(path: Path, subs: object) -> dict[str, list[str]]:
    """``subsets``: train (non-empty), val and optional test lists; no patient in two."""
    if not isinstance(subs, dict):
        raise _fail(path, "subsets must be a mapping with train, val and test lists")
    unknown = [str(k) for k in subs if k not in SUBSETS]
    if unknown:
        raise _fail(path, f"unknown subset(s) {_ids(unknown)}; expected {', '.join(SUBSETS)}")
    if "train" not in subs or "val" not in subs:
        raise _fail(path, "subsets must have train and val lists")
    subsets = {s: _id_list(path, subs.get(s), f"subsets.{s}") for s in SUBSETS}
    if not subsets["train"]:
        raise _fail(path, "subsets.train is empty")
    seen: dict[str, str] = {}
    for s in SUBSETS:
        for p in subsets[s]:
            if p in seen:
                raise _fail(
                    path,
                    f"patient {_ids([p])} is in both {seen[p]} and {s} (a patient may be in "
                    "one subset only)",
                )
            seen[p] = s
    return subsets


def _load_folds(
    path: Path, raw: object, subsets: dict[str, list[str]]
) -> list[dict[str, list[str]]]:
    """``folds``: train / val lists that each split exactly the non-test patients, every one of
    them in exactly one fold's val."""
    if not isinstance(raw, list):
        raise _fail(path, "folds must be a list of {train: [...], val: [...]}")
    non_test = set(subsets["train"]) | set(subsets["val"])
    folds: list[dict[str, list[str]]] = []
    for k, f in enumerate(raw):
        if not isinstance(f, dict) or "train" not in f or "val" not in f:
            raise _fail(path, f"folds[{k}] must be a mapping with train and val lists")
        tr = _id_list(path, f["train"], f"folds[{k}].train")
        va = _id_list(path, f["val"], f"folds[{k}].val")
        both = sorted(set(tr) & set(va))
        if both:
            raise _fail(path, f"patient {_ids(both[:1])} is in both train and val of fold {k}")
        leak = sorted((set(tr) | set(va)) & set(subsets["test"]))
        if leak:
            raise _fail(path, f"test patient {_ids(leak[:1])} is also in fold {k}")
        if set(tr) | set(va) != non_test:
            raise _fail(path, f"fold {k} does not cover the same patients as subsets train + val")
        folds.append({"train": tr, "val": va})
    in_val: dict[str, int] = {}
    for k, fold in enumerate(folds):
        for p in fold["val"]:
            if p in in_val:
                raise _fail(path, f"patient {_ids([p])} is in the val of folds {in_val[p]} and {k}")
            in_val[p] = k
    left = sorted(non_test - set(in_val))
    if folds and left:
        raise _fail(path, f"patient {_ids(left[:1])} is in no fold's val")
    return folds


def _fraction(path: Path, d: dict[Any, Any], key: str, default: float) -> float:
    v = d.get(key, default)
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
        raise _fail(path, f"{key} must be a number from 0 to 1, got {v!r}")
    return float(v)


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read and validate a split written by :func:`save_split` (or edited by hand)."""
    path = Path(path)
    d = _read_mapping(path)
    missing = [k for k in ("seed", "dataset_hash", "subsets") if k not in d]
    if missing:
        raise _fail(path, f"missing key(s) {_ids(missing)}")
    unknown = [k for k in d if k not in KEYS]
    if unknown:
        raise _fail(path, f"unknown key(s) {_ids(unknown)}; expected {', '.join(KEYS)}")
    version = d.get("format", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        raise _fail(path, f"format must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BrainsegError(
            f"split file {path} has format {version}; this brainseg {__version__} reads format "
            f"{FORMAT_VERSION}",
            hint="upgrade brainseg (pip install -U brainseg), or make the split again with "
            "this version",
        )
    if not _is_int(d["seed"]):
        raise _fail(path, f"seed must be an integer, got {d['seed']!r}")
    if not isinstance(d["dataset_hash"], str) or not d["dataset_hash"]:
        raise _fail(path, f"dataset_hash must be a hex string, got {d['dataset_hash']!r}")
    subsets = _load_subsets(path, d["subsets"])
    folds = _load_folds(path, d.get("folds") or [], subsets)
    n = sum(len(v) for v in subsets.values())
    return Split(
        seed=d["seed"],
        dataset_hash=d["dataset_hash"],
        val_fraction=_fraction(path, d, "val_fraction", len(subsets["val"]) / n),
        test_fraction=_fraction(path, d, "test_fraction", len(subsets["test"]) / n),
        subsets=subsets,
        folds=folds,
        source=path,
    )


def check_split(split: Split, patient_ids: Iterable[str]) -> None:
    """Refuse a split that does not belong to this dataset (other patients, other hash)."""
    have = {str(p) for p in patient_ids}
    redo = (
        "make a split for this dataset with `brainseg split DATA -o FILE` (--force to "
        "replace the old file)"
    )
    missing = [p for p in split.all_patients if p not in have]
    if missing:
        shown = _ids(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise BrainsegError(
            f"{len(missing)} patient(s) of {split.name} are not in the dataset: {shown}",
            hint=redo,
        )
    current = dataset_hash(have)
    if current != split.dataset_hash:
        extra = sorted(have - set(split.all_patients))
        detail = ""
        if extra:
            detail = (
                f"; the dataset has {len(extra)} patient(s) not in the split, e.g. "
                f"{_ids(extra[:3])}"
            )
        raise BrainsegError(
            f"{split.name} was made for another dataset (dataset hash {split.dataset_hash}, this "
            f"dataset {current}){detail}",
            hint=redo,
        )


@dataclass
class SplitOptions:
    """What ``brainseg split`` does (``val_fraction`` None: 0.2; not allowed with ``folds``)."""

    data: Path
    output: Path
    val_fraction: float | None = None
    test_fraction: float = 0.0
    folds: int | None = None
    seed: int = 0
    force: bool = False
    skip_bad: bool = False
    cache_dir: Path | None = None  # the dataset cache's folder (None: the default one)


@dataclass
class SplitResult:
    """The split written, and per subset (or per fold's val) its patients and slices."""

    split: Split
    output: Path
    dataset: Path
    rows: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object (docs/splits.md)."""
        s = self.split
        return {
            "output": str(self.output),
            "dataset": str(self.dataset),
            "seed": s.seed,
            "dataset_hash": s.dataset_hash,
            "val_fraction": s.val_fraction,
            "test_fraction": s.test_fraction,
            "folds": s.n_folds,
            "counts": {k: len(v) for k, v in s.subsets.items()},
            "rows": self.rows,
        }


def check_split_options(opts: SplitOptions) -> float:
    """Every option check before any data is read; returns the validation fraction to use."""
    if opts.folds is not None and opts.val_fraction is not None:
        raise BrainsegError(
            "--val-fraction and --folds cannot be used together: with --folds K each "
            "fold validates on 1/K of the (non-test) patients",
            hint="drop --val-fraction, or drop --folds for a single split",
        )
    val_fraction = 0.2 if opts.val_fraction is None else opts.val_fraction
    check_options(val_fraction, opts.test_fraction, opts.folds)
    if str(opts.output) != "-":  # "-": the YAML goes to stdout
        check_target(opts.output, force=opts.force)  # no device, FIFO or link, even --force
    return val_fraction


def make_split_file(opts: SplitOptions) -> SplitResult:
    """The ``brainseg split`` job: a split stratified by tumour slices, saved and summarised."""
    val_fraction = check_split_options(opts)
    arrays = load_dataset(opts.data, skip_bad=opts.skip_bad, cache_dir=opts.cache_dir)
    n_slices = arrays.slices_per_patient()
    n_tumor = arrays.tumor_slices_per_patient()
    split = make_split(n_tumor, val_fraction, opts.test_fraction, opts.folds, opts.seed)
    if str(opts.output) != "-":
        save_split(split, opts.output, force=opts.force)

    def row(name: str, patients: list[str]) -> dict[str, Any]:
        s = sum(n_slices[p] for p in patients)
        t = sum(n_tumor[p] for p in patients)
        return {"name": name, "patients": len(patients), "slices": s, "tumor_slices": t,
                "tumor_slice_fraction": t / s if s else 0.0}  # fmt: skip

    if split.folds:
        rows = [row(f"fold {k} val", f["val"]) for k, f in enumerate(split.folds)]
    else:
        rows = [row("train", split.subsets["train"]), row("val", split.subsets["val"])]
    if split.subsets["test"]:
        rows.append(row("test", split.subsets["test"]))
    rows.append(row("all", list(arrays.patient_ids)))
    return SplitResult(split, Path(opts.output), Path(opts.data), rows)


def select_patients(
    patient_ids: Sequence[str], split_path: Path | None, subset: str | None, fold: int | None
) -> tuple[list[str], dict[str, Any]]:
    """The patients to evaluate (all, or a split's subset) and how they were chosen."""
    if subset is not None and subset not in EVAL_SUBSETS:
        raise BrainsegError(
            f"unknown subset {subset!r}", hint=f"use one of: {', '.join(EVAL_SUBSETS)}"
        )
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
