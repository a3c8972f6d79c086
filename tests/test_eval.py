"""Evaluation: patient selection, tuning, run-folder outputs, and `brainseg eval` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brainseg import evaluation as ev
from brainseg.errors import BrainsegError

# ----------------------------------------------------------------- a stand-in predictor


class FlairPredictor:
    """Probability = FLAIR channel / 255: phantom tumors are bright, so this scores well."""

    def __init__(
        self, model_paths: list[Path], device: str = "auto", batch_size: int = 8, tta: bool = False
    ) -> None:
        self.model_paths = model_paths
        self.tta = tta
        self.metadata: dict[str, Any] = {
            "threshold": 0.5,
            "postprocess": {"min_size": 0, "largest_component": False},
        }
        self.calls = 0

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8
        self.calls += 1
        return images[..., 1].astype(np.float32) / 255.0


def _fake_models(tmp_path: Path, n: int = 1) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"m{i}.safetensors"
        p.write_bytes(b"not read by the stand-in predictor")
        out.append(p)
    return out


# ----------------------------------------------------------------- unit


def test_check_model_paths_errors(tmp_path: Path) -> None:
    with pytest.raises(BrainsegError, match="does not exist"):
        ev.check_model_paths([tmp_path / "nope.safetensors"])
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(BrainsegError, match=r"expected a \.safetensors checkpoint"):
        ev.check_model_paths([tmp_path / "weights.pt"])


def test_select_patients_without_split_takes_everyone() -> None:
    ids, sel = ev.select_patients(["a", "b"], None, None, None)
    assert ids == ["a", "b"] and sel == {"split": None, "subset": "all", "fold": None}
    with pytest.raises(BrainsegError, match="unknown subset 'dev'"):
        ev.select_patients(["a"], None, "dev", None)
    with pytest.raises(BrainsegError, match="needs --split"):
        ev.select_patients(["a"], None, "val", None)
    with pytest.raises(BrainsegError, match="--fold needs --split"):
        ev.select_patients(["a"], None, None, 1)


IDS = [f"TCGA_XX_{i:04d}_20000101" for i in range(6)]


def _split_file(tmp_path: Path, ids: list[str] = IDS, **kw: Any) -> Path:
    from brainseg.data.split import make_split, save_split

    split = make_split({p: i for i, p in enumerate(ids)}, **kw)
    return save_split(split, tmp_path / f"split{len(list(tmp_path.iterdir()))}.yaml")


def test_select_patients_from_a_split(tmp_path: Path) -> None:
    from brainseg.data.split import load_split

    path = _split_file(tmp_path, val_fraction=0.34)
    split = load_split(path)
    ids, sel = ev.select_patients(IDS, path, None, None)
    assert ids == split.patients("val") and len(ids) == 2
    assert sel == {"split": str(path), "subset": "val", "fold": None}
    assert ev.select_patients(IDS, path, "train", None)[0] == split.patients("train")
    assert sorted(ev.select_patients(IDS, path, "all", None)[0]) == sorted(IDS)
    with pytest.raises(BrainsegError, match=r"subset 'test' of split .* is empty"):
        ev.select_patients(IDS, path, "test", None)
    with pytest.raises(BrainsegError, match="has no folds"):
        ev.select_patients(IDS, path, "val", 0)


def test_select_patients_fold_and_foreign_split(tmp_path: Path) -> None:
    from brainseg.data.split import load_split

    path = _split_file(tmp_path, folds=3)
    split = load_split(path)
    for k in range(3):
        assert ev.select_patients(IDS, path, "val", k)[0] == split.patients("val", k)
    with pytest.raises(BrainsegError, match=r"--fold 3 is out of range.*3 folds"):
        ev.select_patients(IDS, path, "val", 3)
    other = _split_file(tmp_path, ids=[p.replace("XX", "YY") for p in IDS])
    with pytest.raises(BrainsegError, match="not in the dataset"):
        ev.select_patients(IDS, other, "val", None)


def test_resolve_settings_prefers_options_then_metadata() -> None:
    meta = {"threshold": 0.35, "postprocess": {"min_size": 12, "largest_component": True}}
    s = ev.resolve_settings(meta, ev.EvalOptions())
    assert (s.threshold, s.min_size, s.largest) == (0.35, 12, True)
    s = ev.resolve_settings(meta, ev.EvalOptions(threshold=0.6, min_size=0, largest=False))
    assert (s.threshold, s.min_size, s.largest) == (0.6, 0, False)
    s = ev.resolve_settings({}, ev.EvalOptions())
    assert (s.threshold, s.min_size, s.largest) == (0.5, 0, False)


def test_tune_min_sizes_scale_with_image_area() -> None:
    assert ev.tune_min_sizes((256, 256)) == [0, 16, 64, 256, 1024]
    assert ev.tune_min_sizes((64, 64)) == [0, 4, 16, 64]


def test_tune_finds_the_threshold_and_size_that_help() -> None:
    # Truth: one 6x6 square per tumor slice. Probabilities: 0.62 inside, a 0.45 halo ring
    # around it (hurts at thresholds <= 0.45), and speckle at 0.9 elsewhere (2 px blobs,
    # removed by a min_size of 4+).
    n, h = 8, 32
    gt = np.zeros((n, h, h), bool)
    gt[:, 10:16, 10:16] = True
    prob = np.zeros((n, h, h), np.float32)
    prob[:, 9:17, 9:17] = 0.45
    prob[:, 10:16, 10:16] = 0.62
    prob[:, 25, 25:27] = 0.9
    pidx = np.repeat([0, 1], 4)
    snum = np.tile(np.arange(4), 2)
    base = ev.PostSettings(0.4, 0, False)
    r = ev.tune(prob, gt, pidx, snum, base, min_sizes=[0, 4, 16])
    assert r.baseline_dice < 0.9
    assert r.best_dice == pytest.approx(1.0)
    assert 0.45 < r.best.threshold <= 0.6
    # min_size 4 and the largest 3D component both remove the speckle; the first grid
    # point reaching the best value wins (thresholds, then sizes, then largest off/on)
    assert (r.best.threshold, r.best.min_size, r.best.largest) == (0.5, 0, True)
    assert r.gain == pytest.approx(r.best_dice - r.baseline_dice)
    assert r.tried == 9 * 3 * 2
    d = r.as_dict()
    assert d["best"]["threshold"] == 0.5 and d["objective"] == "mean per-patient Dice"


def test_tune_keeps_the_baseline_on_a_tie() -> None:
    gt = np.zeros((2, 8, 8), bool)
    gt[:, 2:4, 2:4] = True
    prob = gt.astype(np.float32)  # perfect at every threshold
    base = ev.PostSettings(0.5, 0, False)
    r = ev.tune(prob, gt, np.zeros(2, int), np.arange(2), base, min_sizes=[0])
    assert r.best == base and r.gain == 0.0


def test_json_safe_and_csv_write_nan_as_null_and_empty() -> None:
    obj = {"a": math.nan, "b": [np.float32(1.5), np.int64(3)], "c": Path("x/y")}
    assert json.loads(json.dumps(ev.json_safe(obj))) == {"a": None, "b": [1.5, 3], "c": "x/y"}
    text = ev.rows_to_csv([{"k": "p", "v": math.nan}, {"k": "q", "v": 0.25}], ["k", "v"])
    assert text == "k,v\np,\nq,0.25\n"


# ----------------------------------------------------------------- run_eval (stand-in)


def test_run_eval_and_write_run_with_a_standin_predictor(
    phantom_root: Path, tmp_path: Path
) -> None:
    models = _fake_models(tmp_path)
    opts = ev.EvalOptions(tune=True, batch_size=4)
    res = ev.run_eval(models, phantom_root, opts=opts, predictor_factory=FlairPredictor)
    s = res.summary
    assert s["subset"] == "all" and s["split"] is None and s["fold"] is None
    assert s["counts"]["patients"] == 6
    assert s["settings"]["threshold"] == 0.5 and s["settings"]["threshold_source"] == "model"
    assert s["per_patient"]["dice"]["mean"] > 0.5  # FLAIR brightness finds phantom tumors
    assert s["tune"]["best"]["dice"] >= s["tune"]["baseline"]["dice"]

    files = ev.write_run(res, tmp_path / "run")
    names = sorted(p.name for p in files)
    assert names == ["dice_per_patient.png", "per_patient.csv", "per_slice.csv", "summary.json"]
    assert (tmp_path / "run" / "dice_per_patient.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["counts"]["slices"] == len(res.report.per_slice)
    with open(tmp_path / "run" / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ev.PATIENT_COLUMNS and len(rows) == 6
    for row, rep in zip(rows, res.report.per_patient, strict=True):
        assert float(row["dice"]) == pytest.approx(rep["dice"])
    with open(tmp_path / "run" / "per_slice.csv") as f:
        srows = list(csv.DictReader(f))
    assert list(srows[0]) == ev.SLICE_COLUMNS
    assert len(srows) == s["counts"]["slices"]


def test_run_eval_wraps_a_failing_model_load(phantom_root: Path, tmp_path: Path) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("invalid header")

    with pytest.raises(BrainsegError, match=r"cannot load model .*m0\.safetensors.*invalid"):
        ev.run_eval(_fake_models(tmp_path), phantom_root, predictor_factory=broken)
