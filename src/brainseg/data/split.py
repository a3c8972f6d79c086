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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from brainseg import __version__
from brainseg.errors import BrainsegError, first_line
from brainseg.fsutil import atomic_path

SUBSETS = ("train", "val", "test")
FORMAT_VERSION = 1
_MAKE_HINT = "make a split with `brainseg split DATA -o {path}`"


@dataclass
class Split:
    """A patient-level split: ``subsets`` maps train / val / test to patient ids.

    With K folds, ``folds[k]`` is ``{"train": [...], "val": [...]}`` (k from 0), every
    non-test patient is in exactly one fold's ``val``, and ``subsets`` train / val equal
    fold 0 so that code which ignores folds still gets a sensible split.
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

    def patients(self, subset: str, fold: int | None = None) -> list[str]:
        """Patient ids of ``subset`` ("train", "val" or "test"), of fold ``fold`` if given.

        The test subset is held out of every fold, so ``patients("test", k)`` is the test set.
        """
        where = f" in split {self.source}" if self.source else ""
        if subset not in SUBSETS:
            raise BrainsegError(
                f"unknown subset {subset!r}{where}; expected one of {', '.join(SUBSETS)}",
                hint="use train, val or test",
            )
        if fold is None or subset == "test":
            if fold is not None:
                self._check_fold(fold, where)
            return list(self.subsets.get(subset, []))
        self._check_fold(fold, where)
        return list(self.folds[fold][subset])

    def _check_fold(self, fold: int, where: str) -> None:
        if not self.folds:
            raise BrainsegError(
                f"fold {fold} requested but the split{where} has no folds",
                hint="make a cross-validation split with "
                "`brainseg split DATA -o splits.yaml --folds 5`, or leave out the fold",
            )
        if (
            isinstance(fold, bool)
            or not isinstance(fold, (int, np.integer))
            or not (0 <= fold < len(self.folds))
        ):
            raise BrainsegError(
                f"fold {fold!r} is out of range: the split{where} has {len(self.folds)} folds, "
                f"numbered 0 to {len(self.folds) - 1}",
                hint=f"use a fold from 0 to {len(self.folds) - 1}",
            )

    def to_dict(self) -> dict[str, Any]:
        """The YAML / JSON form (see docs/splits.md)."""
        n = len(self.all_patients)
        return {
            "format": FORMAT_VERSION,
            "created_by": f"brainseg {__version__}",
            "seed": int(self.seed),
            "dataset_hash": self.dataset_hash,
            "patients": n,
            "val_fraction": round(float(self.val_fraction), 6),
            "test_fraction": round(float(self.test_fraction), 6),
            "n_folds": self.n_folds,
            "counts": {s: len(self.subsets.get(s, [])) for s in SUBSETS},
            "subsets": {s: list(self.subsets.get(s, [])) for s in SUBSETS},
            "folds": [{"train": list(f["train"]), "val": list(f["val"])} for f in self.folds],
        }


def dataset_hash(patient_ids: Iterable[str]) -> str:
    """Short (16 hex digits) sha256 of the sorted, de-duplicated patient ids."""
    ids = sorted({str(p) for p in patient_ids})
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- make


def check_options(val_fraction: float, test_fraction: float, folds: int | None) -> None:
    """Validate the fractions and fold count before any work (the patient count is
    checked later by :func:`make_split`)."""

    def num(x: object) -> bool:
        return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)

    if folds is None and not (num(val_fraction) and 0 < val_fraction < 1):
        raise BrainsegError(
            f"--val-fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}",
            hint="for example --val-fraction 0.2",
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

    The burden (e.g. the number of tumour slices) is only used to stratify: patients are
    sorted by it, cut into strata, and one patient per stratum is drawn (seeded) for the
    test and validation subsets, so every subset spans small to large tumours. With
    ``folds=K`` the non-test patients are dealt into K folds the same way (each block of K
    consecutive patients is shuffled across the folds); ``val_fraction`` is then 1/K.
    """
    ids = sorted(str(p) for p in burden)
    if len(set(ids)) != len(ids):
        raise BrainsegError("patient ids are not unique", hint="check the dataset folder names")
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
            f"tumour burden is not a finite number for {', '.join(bad[:5])}",
            hint="burden must be a number per patient, e.g. the number of tumour slices",
        )
    rng = np.random.default_rng(seed)
    ordered = _order(burden, ids, rng)

    n_test = _count(test_fraction, n)
    test = _stratified_pick(ordered, n_test, rng) if n_test else []
    rest = [p for p in ordered if p not in set(test)]

    if folds is not None:
        k = int(folds)
        if not 2 <= k <= len(rest):
            raise BrainsegError(
                f"--folds must be between 2 and the number of non-test patients "
                f"({len(rest)}), got {k}",
                hint="for example --folds 5",
            )
        labels = np.empty(len(rest), dtype=np.int64)
        for start in range(0, len(rest), k):
            block = min(k, len(rest) - start)
            labels[start : start + block] = rng.permutation(k)[:block]
        fold_list = []
        for f in range(k):
            val = sorted(p for p, lab in zip(rest, labels, strict=True) if lab == f)
            train = sorted(p for p, lab in zip(rest, labels, strict=True) if lab != f)
            fold_list.append({"train": train, "val": val})
        subsets = {"train": fold_list[0]["train"], "val": fold_list[0]["val"], "test": sorted(test)}
        return Split(
            seed=int(seed),
            dataset_hash=dataset_hash(ids),
            val_fraction=1.0 / k,
            test_fraction=float(test_fraction),
            subsets=subsets,
            folds=fold_list,
        )

    n_val = _count(val_fraction, n)
    if n - n_test - n_val < 1:
        raise BrainsegError(
            f"{n} patients are too few for --val-fraction {val_fraction} and --test-fraction "
            f"{test_fraction}: {n_val} val + {n_test} test leave no training patient",
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
        folds=[],
    )


# --------------------------------------------------------------------------- save / load


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
    if path.is_dir():
        raise BrainsegError(f"{path} is a folder", hint="give a file name, e.g. -o splits.yaml")
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(to_yaml(split), encoding="utf-8")
    return path


def _fix_hint(path: Path) -> str:
    return f"fix the file, or make a new one with `brainseg split DATA -o {path.name} --force`"


def _fail(path: Path, what: str) -> BrainsegError:
    return BrainsegError(
        f"invalid split file {path}: {what}",
        hint=_fix_hint(path),
    )


def _id_list(path: Path, value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, (str, int)) for p in value):
        raise _fail(path, f"{where} must be a list of patient ids")
    ids = [str(p) for p in value]
    dup = sorted({p for p in ids if ids.count(p) > 1})
    if dup:
        raise _fail(path, f"{where} lists {', '.join(dup[:5])} more than once")
    return ids


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read and validate a split written by :func:`save_split` (or edited by hand)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a split file" if path.is_dir() else "not found"
        raise BrainsegError(f"split file {path} {what}", hint=_MAKE_HINT.format(path=path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainsegError(
            f"cannot read split file {path}: {exc}", hint=_MAKE_HINT.format(path=path)
        ) from exc
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise BrainsegError(
            f"split file {path} is not valid YAML{at}: {problem}",
            hint=_fix_hint(path),
        ) from exc
    if not isinstance(d, dict):
        raise _fail(path, "expected a mapping with seed, dataset_hash, subsets")
    missing = [k for k in ("seed", "dataset_hash", "subsets") if k not in d]
    if missing:
        raise _fail(path, f"missing key(s) {', '.join(missing)}")
    seed = d["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(path, f"seed must be an integer, got {seed!r}")
    dhash = d["dataset_hash"]
    if not isinstance(dhash, str) or not dhash:
        raise _fail(path, f"dataset_hash must be a hex string, got {dhash!r}")
    subs = d["subsets"]
    if not isinstance(subs, dict):
        raise _fail(path, "subsets must be a mapping with train, val and test lists")
    unknown = [k for k in subs if k not in SUBSETS]
    if unknown:
        raise _fail(
            path, f"unknown subset(s) {', '.join(map(str, unknown))}; expected {', '.join(SUBSETS)}"
        )
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
                    f"patient {p} is in both {seen[p]} and {s} (a patient may "
                    "be in one subset only)",
                )
            seen[p] = s

    folds_raw = d.get("folds") or []
    if not isinstance(folds_raw, list):
        raise _fail(path, "folds must be a list of {train: [...], val: [...]}")
    folds: list[dict[str, list[str]]] = []
    test = set(subsets["test"])
    non_test = set(subsets["train"]) | set(subsets["val"])
    in_val: dict[str, int] = {}
    for k, f in enumerate(folds_raw):
        if not isinstance(f, dict) or "train" not in f or "val" not in f:
            raise _fail(path, f"folds[{k}] must be a mapping with train and val lists")
        tr = _id_list(path, f["train"], f"folds[{k}].train")
        va = _id_list(path, f["val"], f"folds[{k}].val")
        both = sorted(set(tr) & set(va))
        if both:
            raise _fail(path, f"patient {both[0]} is in both train and val of fold {k}")
        leak = sorted((set(tr) | set(va)) & test)
        if leak:
            raise _fail(path, f"test patient {leak[0]} is also in fold {k}")
        if set(tr) | set(va) != non_test:
            raise _fail(path, f"fold {k} does not cover the same patients as subsets train + val")
        for p in va:
            if p in in_val:
                raise _fail(path, f"patient {p} is in the val of folds {in_val[p]} and {k}")
            in_val[p] = k
        folds.append({"train": tr, "val": va})
    if folds and set(in_val) != non_test:
        left = sorted(non_test - set(in_val))
        raise _fail(path, f"patient {left[0]} is in no fold's val")

    def frac(key: str, default: float) -> float:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise _fail(path, f"{key} must be a number from 0 to 1, got {v!r}")
        return float(v)

    n = len(seen)
    return Split(
        seed=seed,
        dataset_hash=dhash,
        val_fraction=frac("val_fraction", len(subsets["val"]) / n),
        test_fraction=frac("test_fraction", len(subsets["test"]) / n),
        subsets=subsets,
        folds=folds,
        source=path,
    )


def check_split(split: Split, patient_ids: Iterable[str]) -> None:
    """Refuse a split that does not belong to this dataset (other patients, other hash)."""
    ids = sorted({str(p) for p in patient_ids})
    name = f"split {split.source}" if split.source else "the split"
    redo = (
        "make a split for this dataset with `brainseg split DATA -o FILE` (--force to "
        "replace the old file)"
    )
    have = set(ids)
    missing = [p for p in split.all_patients if p not in have]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise BrainsegError(
            f"{len(missing)} patient(s) of {name} are not in the dataset: {shown}",
            hint=redo,
        )
    current = dataset_hash(ids)
    if current != split.dataset_hash:
        extra = sorted(have - set(split.all_patients))
        detail = ""
        if extra:
            detail = (
                f"; the dataset has {len(extra)} patient(s) not in the split, e.g. "
                f"{', '.join(extra[:3])}"
            )
        raise BrainsegError(
            f"{name} was made for another dataset (dataset hash {split.dataset_hash}, this "
            f"dataset {current}){detail}",
            hint=redo,
        )
