"""Evaluation: patient selection, tuning, run-folder outputs, and `brainseg eval` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brainseg.errors import BrainsegError
from brainseg.evaluation import dataset as ev
from brainseg.evaluation.metrics import PATIENT_COLUMNS
from brainseg.evaluation.runfolder import SLICE_COLUMNS, rows_to_csv

# ----------------------------------------------------------------- a stand-in predictor


class FlairPredictor:
    """Probability = FLAIR channel / 255: phantom tumors are bright, so this scores well."""

    def __init__(
        self, model_paths: list[Path], device: str = "auto", batch_size: int = 8, tta: bool = False
    ) -> None:
        self.model_paths = model_paths
        self.batch_size = batch_size
        self.tta = tta
        self.metadata: dict[str, Any] = {
            "threshold": 0.5,
            "postprocess": {"min_size": 0, "largest_component": False},
        }
        self.calls = 0

    image_size = None  # the images' own size (padded to multiples of 32)

    def predict_model_size(self, images: np.ndarray) -> np.ndarray:
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
    """settings.resolve, the one rule eval uses (evaluation.resolve_settings, a test-only
    wrapper of it, is gone)."""
    from brainseg.settings import resolve

    meta = {"threshold": 0.35, "postprocess": {"min_size": 12, "largest_component": True}}
    s = resolve(meta).post
    assert (s.threshold, s.min_size, s.largest) == (0.35, 12, True)
    s = resolve(meta, threshold=0.6, min_size=0, largest=False).post
    assert (s.threshold, s.min_size, s.largest) == (0.6, 0, False)
    s = resolve({}).post
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
    text = rows_to_csv([{"k": "p", "v": math.nan}, {"k": "q", "v": 0.25}], ["k", "v"])
    assert text == "k,v\np,\nq,0.25\n"


def test_tuned_onnx_copy_carries_the_values(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from brainseg.inference.predict import metadata_from_props

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 32, 32])],
    )
    model = helper.make_model(graph)
    blob = {
        "threshold": 0.5,
        "image_size": 32,
        "postprocess": {"min_size": 0, "largest_component": False},
    }
    helper.set_model_props(model, {"brainseg": json.dumps(blob), "threshold": "0.5"})
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    dst = tmp_path / "tuned.onnx"
    ev.write_tuned_model(src, dst, ev.PostSettings(0.35, 16, True), force=False)
    props = {p.key: p.value for p in onnx.load(str(dst)).metadata_props}
    meta = metadata_from_props(props, dst)
    assert meta["threshold"] == 0.35
    assert meta["postprocess"] == {"min_size": 16, "largest_component": True}
    assert json.loads(props["brainseg"])["threshold"] == 0.35
    assert meta["image_size"] == 32  # the rest is kept
    with pytest.raises(BrainsegError, match="already exists"):
        ev.write_tuned_model(src, dst, ev.PostSettings(0.4, 0, False), force=False)
    ev.check_tune_output([src], tmp_path / "new.onnx", force=False)
    with pytest.raises(BrainsegError, match="is the model itself"):
        ev.check_tune_output([src], src, force=True)


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
    assert names == [
        "dice_per_patient.png",
        "per_patient.csv",
        "per_slice.csv",
        "report.html",
        "summary.json",
    ]
    assert (tmp_path / "run" / "dice_per_patient.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["counts"]["slices"] == len(res.report.per_slice)
    with open(tmp_path / "run" / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == PATIENT_COLUMNS and len(rows) == 6
    for row, rep in zip(rows, res.report.per_patient, strict=True):
        assert float(row["dice"]) == pytest.approx(rep["dice"])
    with open(tmp_path / "run" / "per_slice.csv") as f:
        srows = list(csv.DictReader(f))
    assert list(srows[0]) == SLICE_COLUMNS
    assert len(srows) == s["counts"]["slices"]


@pytest.mark.parametrize("data", ["phantoms", "real"])
def test_eval_scores_the_mask_files_it_writes_with_the_largest_3d_component_per_patient(
    data: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """eval = predict, then score the same files: the run's masks/ hold one mask per slice,
    each patient's stack is one 26-connected component (scipy's labelling), and the reported
    per-patient Dice is numpy's Dice of those files against the truth TIFs (phantoms and the
    real dev patients, whose FLAIR has many bright regions)."""
    import tifffile
    from scipy import ndimage

    phantom_root = request.getfixturevalue("phantom_root" if data == "phantoms" else "real_data")

    masks = tmp_path / "masks"
    opts = ev.EvalOptions(threshold=0.5, min_size=0, largest=True)
    res = ev.run_eval(
        _fake_models(tmp_path), phantom_root, opts=opts, predictor_factory=FlairPredictor,
        masks_dir=masks,
    )  # fmt: skip
    truth = sorted(phantom_root.glob("*/*_mask.tif"))
    written = sorted(masks.glob("*/*_mask.tif"))
    assert [p.relative_to(masks) for p in written] == [p.relative_to(phantom_root) for p in truth]
    assert not list(masks.glob("*/*_prob.tif"))  # probabilities only for --tune
    several = 0
    for row in res.report.per_patient:
        pid = str(row["patient_id"])
        files = sorted((masks / pid).glob("*_mask.tif"), key=lambda f: int(f.stem.split("_")[-2]))
        pred = np.stack([tifffile.imread(f) > 0 for f in files])
        gt = np.stack([tifffile.imread(phantom_root / pid / f.name) > 0 for f in files])
        _, n = ndimage.label(pred, structure=np.ones((3, 3, 3)))
        assert n <= 1, pid
        raw = np.stack([tifffile.imread(phantom_root / pid / f.name.replace("_mask", ""))[..., 1]
                        for f in files]) >= 128  # fmt: skip
        several += ndimage.label(raw, structure=np.ones((3, 3, 3)))[1] > 1
        dice = 2 * np.sum(pred & gt) / (pred.sum() + gt.sum())
        assert row["dice"] == pytest.approx(dice, abs=1e-12), pid
    assert several > 0  # the largest-component rule had something to remove


def test_eval_skip_bad_leaves_out_unreadable_slices_and_their_true_masks(
    phantom_root: Path, tmp_path: Path
) -> None:
    """A slice whose image does not decode fails eval (one line naming the file, no score);
    with --skip-bad it is left out with its true mask, as is an orphan mask, and the other
    slices are scored as before."""
    import shutil

    data = tmp_path / "kaggle_3m"
    shutil.copytree(phantom_root, data)
    pid = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    broken = data / pid / f"{pid}_2.tif"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated
    models = _fake_models(tmp_path)
    with pytest.raises(BrainsegError, match=rf"{pid}_2\.tif: unreadable") as err:
        ev.run_eval(models, data, predictor_factory=FlairPredictor)
    assert "--skip-bad" in err.value.message + str(err.value.hint)
    (data / pid / f"{pid}_3.tif").unlink()  # its mask is now an orphan
    lost = sorted(p.name for p in data.iterdir() if p.is_dir())[1]
    for image in (data / lost).glob(f"{lost}_*[0-9].tif"):  # no slice of this one is left
        image.write_bytes(b"II*\x00")
    clean = ev.run_eval(models, phantom_root, predictor_factory=FlairPredictor)
    res = ev.run_eval(
        models, data, opts=ev.EvalOptions(skip_bad=True), predictor_factory=FlairPredictor
    )
    n_lost = len(list((data / lost).glob("*_mask.tif")))
    assert res.summary["left_out_slices"][:2] == [f"{pid}_2", f"{pid}_3"]
    assert len(res.summary["left_out_slices"]) == 2 + n_lost
    assert res.summary["counts"]["patients"] == clean.summary["counts"]["patients"] - 1
    assert res.summary["counts"]["slices"] == clean.summary["counts"]["slices"] - 2 - n_lost
    gone = {(pid, 2), (pid, 3)}
    expected = [
        r
        for r in clean.report.per_slice
        if (r["patient_id"], r["slice_number"]) not in gone and r["patient_id"] != lost
    ]

    def plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:  # NaN != NaN
        return [{k: None if v != v else v for k, v in r.items()} for r in rows]

    assert plain(res.report.per_slice) == plain(expected)


def test_run_eval_passes_tta_device_batch_size_and_options_to_the_predictor(
    phantom_root: Path, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def factory(paths: list[Path], **kw: Any) -> FlairPredictor:
        seen.update(kw, paths=paths)
        return FlairPredictor(paths, **kw)

    models = _fake_models(tmp_path, 2)
    opts = ev.EvalOptions(
        tta=True, device="cpu", batch_size=3, threshold=0.7, min_size=5, largest=True
    )
    res = ev.run_eval(models, phantom_root, opts=opts, predictor_factory=factory)
    assert seen == {"paths": models, "device": "cpu", "batch_size": 3, "tta": True}
    st = res.summary["settings"]
    assert (st["threshold"], st["min_size"], st["largest"], st["tta"]) == (0.7, 5, True, True)
    assert st["threshold_source"] == "option"
    # the options really reach the masks: same pixels as post-processing by hand
    from brainseg.data.cache import load_dataset
    from brainseg.inference.postprocess import apply

    data = load_dataset(phantom_root)
    prob = np.asarray(data.images[:, 1], dtype=np.float32) / 255.0
    mask = apply(prob, 0.7, 5, True, groups=data.patient_index, order=data.slice_number)
    expected = np.bincount(data.patient_index, weights=mask.reshape(len(mask), -1).sum(1))
    got = [row["pred_pixels"] for row in res.report.per_patient]
    np.testing.assert_array_equal(got, expected)


def test_run_eval_wraps_a_failing_model_load(phantom_root: Path, tmp_path: Path) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("invalid header")

    with pytest.raises(BrainsegError, match=r"cannot load model .*m0\.safetensors.*invalid"):
        ev.run_eval(_fake_models(tmp_path), phantom_root, predictor_factory=broken)


# ----------------------------------------------------------------- CLI end to end


def _checkpoint(path: Path, bias: float | None = None, threshold: float = 0.5) -> Path:
    """A small untrained UNetVGG16 checkpoint; ``bias`` makes its output constant.

    With the head's weights zeroed and its bias at +20 / -20 the model predicts tumor
    everywhere / nowhere (probability 1 - 2e-9 / 2e-9) whatever the image.
    """
    import torch

    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

    torch.manual_seed(0)
    model = UNetVGG16(decoder_channels=(32, 32, 32, 16, 16), encoder_weights=None)
    if bias is not None:
        with torch.no_grad():
            model.decoder.head.weight.zero_()
            model.decoder.head.bias.fill_(bias)
    meta = {
        "threshold": threshold,
        "image_size": 32,  # predictor resizes 64 -> 32: 4x less compute
        "postprocess": {"min_size": 0, "largest_component": False},
    }
    return save_checkpoint(path, model.eval(), meta)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "plain": _checkpoint(d / "plain.safetensors"),
        "on": _checkpoint(d / "on.safetensors", bias=20.0),
        "off": _checkpoint(d / "off.safetensors", bias=-20.0),
    }


@pytest.fixture(scope="module")
def split_yaml(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("split") / "splits.yaml"
    r = run_cli(["split", phantom_root, "-o", out, "--val-fraction", "0.34"])
    assert r.returncode == 0, r.stderr
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_eval_writes_the_run_folder(
    cli: Any, phantom_root: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    project = tmp_path / "runs"
    (project / "exp").mkdir(parents=True)  # an earlier run: this one must go to exp2
    r = cli(
        [
            "eval",
            models["plain"],
            phantom_root,
            "--json",
            "--project",
            project,
            "--batch-size",
            "16",
        ]
    )
    assert r.returncode == 0, r.stderr
    run = project / "exp2"
    assert sorted(p.name for p in run.iterdir()) == [
        "dice_per_patient.png",
        "masks",  # the masks scored: predict's files for these patients
        "per_patient.csv",
        "per_slice.csv",
        "report.html",
        "summary.json",
    ]
    assert not any((project / "exp").iterdir())
    # --json: stdout is exactly summary.json; the table went to stderr
    s = json.loads((run / "summary.json").read_text())
    assert json.loads(r.stdout) == s
    assert "per patient" in r.stderr and "median" in r.stderr and "HD95" in r.stderr
    for key in (
        "models",
        "data",
        "split",
        "subset",
        "fold",
        "settings",
        "counts",
        "per_patient",
        "per_slice_tumor",
        "per_slice_all",
        "global",
        "detection",
        "hd95_skipped",
        "tune",
    ):
        assert key in s, key
    assert s["run_dir"] == str(run) and s["tune"] is None
    # Dice is measured at the images' own size (64), not the model's input size (32)
    assert s["measured_at"]["size"] == [64, 64] and s["measured_at"]["model_input"] == [32, 32]
    assert "measured at the images' own size 64x64 (model input 32x32)" in " ".join(
        r.stderr.split()
    )
    # without --split every patient is evaluated, and eval says so
    assert "no --split given: evaluating all 6 patients" in " ".join(r.stderr.split())
    assert s["subset"] == "all" and s["split"] is None and s["fold"] is None
    assert s["models"] == [str(models["plain"])] and s["ensemble"] is False
    assert s["settings"]["threshold"] == 0.5 and s["settings"]["threshold_source"] == "model"
    assert s["settings"]["tta"] is False and s["settings"]["batch_size"] == 16
    for level in ("per_patient", "per_slice_tumor", "per_slice_all"):
        for metric in ("dice", "iou", "precision", "recall", "specificity", "hd95"):
            assert set(s[level][metric]) == {"mean", "median", "std", "min", "n"}
    assert set(s["hd95_skipped"]) == {"per_patient", "per_slice_tumor", "per_slice_all"}
    patients = _read_csv(run / "per_patient.csv")
    assert list(patients[0]) == PATIENT_COLUMNS
    assert len(patients) == s["counts"]["patients"] == 6
    slices = _read_csv(run / "per_slice.csv")
    assert list(slices[0]) == SLICE_COLUMNS
    assert len(slices) == s["counts"]["slices"] == sum(int(p["slices"]) for p in patients)
    mean = np.mean([float(p["dice"]) for p in patients])
    assert s["per_patient"]["dice"]["mean"] == pytest.approx(mean)
    assert (run / "dice_per_patient.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_reusing_a_run_folder_scores_only_this_runs_patients(
    cli: Any, phantom_root: Path, models: dict[str, Path], split_yaml: Path, tmp_path: Path
) -> None:
    """An --exist-ok run into a folder holding an earlier run's masks of every patient
    scores only the split's val patients, whose masks it wrote."""
    base = ["eval", models["plain"], phantom_root, "--project", tmp_path, "--json"]
    r = cli(base)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"]["patients"] == 6
    r = cli([*base, "--split", split_yaml, "--exist-ok"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["counts"]["patients"] == 2 and s["run_dir"] == str(tmp_path / "exp")
    scored = {row["patient_id"] for row in _read_csv(tmp_path / "exp" / "per_patient.csv")}
    assert {p.name for p in (tmp_path / "exp" / "masks").iterdir() if p.is_dir()} == scored


def test_cli_eval_refuses_a_run_folder_inside_the_dataset(
    cli: Any, phantom_root: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    """Masks written below DATA would be read as ground truth: refused before any work."""
    import shutil

    data = shutil.copytree(phantom_root, tmp_path / "kaggle_3m")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    r = cli(["eval", models["plain"], data, "--project", data / "runs"])
    assert r.returncode == 2 and "inside the dataset" in r.stderr and "--project" in r.stderr
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


@pytest.mark.slow  # two CLI runs with two models each (~15 s idle, more on a busy CPU)
def test_cli_eval_ensembles_by_mean_probability(
    cli: Any, phantom_root: Path, models: dict[str, Path], split_yaml: Path, tmp_path: Path
) -> None:
    # "tumor everywhere" (p ~ 1) + "tumor nowhere" (p ~ 0): the mean is ~0.5, so every
    # pixel is positive at threshold 0.4 and none at 0.6 (a max would say all, a min none,
    # the first model alone all, the last alone none).
    on, off = models["on"], models["off"]
    from brainseg.data.cache import load_dataset
    from brainseg.data.split import make_split, save_split

    ids = load_dataset(phantom_root).patient_ids
    one_val = save_split(
        make_split({p: 1 for p in ids}, val_fraction=0.17), tmp_path / "one_val.yaml"
    )  # one validation patient: quick runs
    r = cli(
        [
            "eval",
            on,
            off,
            phantom_root,
            "--split",
            one_val,
            "--threshold",
            "0.4",
            "--json",
            "--project",
            tmp_path,
            "--name",
            "low",
        ]
    )
    assert r.returncode == 0, r.stderr
    low = json.loads(r.stdout)
    assert low["models"] == [str(on), str(off)] and low["ensemble"] is True
    assert low["settings"]["threshold_source"] == "option"
    assert low["global"]["recall"] == 1.0
    assert low["detection"]["specificity"] == 0.0
    rows = _read_csv(tmp_path / "low" / "per_patient.csv")
    assert all(int(r["pred_pixels"]) == int(r["slices"]) * 64 * 64 for r in rows)

    r = cli(
        [
            "eval",
            on,
            off,
            phantom_root,
            "--split",
            one_val,
            "--threshold",
            "0.6",
            "--json",
            "--project",
            tmp_path,
            "--name",
            "high",
        ]
    )
    assert r.returncode == 0, r.stderr
    high = json.loads(r.stdout)
    assert high["global"]["recall"] == 0.0
    assert high["detection"]["sensitivity"] == 0.0
    rows = _read_csv(tmp_path / "high" / "per_patient.csv")
    assert rows and all(int(r["pred_pixels"]) == 0 for r in rows)
    assert high["hd95_skipped"]["per_patient"] == len(rows)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--subset", "dev"], "unknown subset 'dev'"), (["--fold", "7"], "has no folds")],
)
def test_cli_eval_bad_subset_or_fold_exit_2(
    cli: Any,
    phantom_root: Path,
    models: dict[str, Path],
    split_yaml: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
) -> None:
    r = cli(
        [
            "eval",
            models["plain"],
            phantom_root,
            "--split",
            split_yaml,
            *extra,
            "--project",
            tmp_path,
        ]
    )
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # no run folder for a failed run


def test_cli_eval_fold_out_of_range_and_foreign_split(
    cli: Any, phantom_root: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    from brainseg.data.split import make_split, save_split

    folds = tmp_path / "folds.yaml"
    r = cli(["split", phantom_root, "-o", folds, "--folds", "3"])
    assert r.returncode == 0, r.stderr
    r = cli(
        [
            "eval",
            models["plain"],
            phantom_root,
            "--split",
            folds,
            "--fold",
            "3",
            "--project",
            tmp_path,
        ]
    )
    assert r.returncode == 2 and "--fold 3 is out of range" in r.stderr
    other = save_split(make_split({f"TCGA_ZZ_{i}": i for i in range(5)}), tmp_path / "other.yaml")
    r = cli(["eval", models["plain"], phantom_root, "--split", other, "--project", tmp_path])
    assert r.returncode == 2 and "not in the dataset" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_eval_missing_or_corrupt_model_exit_2(
    cli: Any, phantom_root: Path, tmp_path: Path
) -> None:
    r = cli(["eval", tmp_path / "missing.safetensors", phantom_root])
    assert r.returncode == 2 and "missing.safetensors does not exist" in r.stderr
    for name, data in (("bad.safetensors", b"\x00" * 64), ("bad.onnx", b"garbage")):
        bad = tmp_path / name
        bad.write_bytes(data)
        r = cli(["eval", bad, phantom_root, "--project", tmp_path / "runs"])
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[0].startswith("error:") and name in lines[0]
        assert len(lines) == 2 and lines[1].startswith("hint:")  # one line + hint
    r = cli(["eval", phantom_root])
    assert r.returncode == 2 and "at least one MODEL" in r.stderr
    r = cli(["eval", tmp_path / "bad.onnx", tmp_path / "no-data"])
    assert r.returncode == 2 and "no-data does not exist" in r.stderr


def test_cli_eval_tune_writes_a_tuned_copy(
    cli: Any, phantom_root: Path, models: dict[str, Path], split_yaml: Path, tmp_path: Path
) -> None:
    from brainseg.model.checkpoint import read_metadata

    out = tmp_path / "tuned.safetensors"
    out.write_bytes(b"an older file")
    args = [
        "eval",
        models["plain"],
        phantom_root,
        "--split",
        split_yaml,
        "--json",
        "--tune-output",
        out,
        "--project",
        tmp_path / "runs",
    ]
    r = cli(args)  # refused before any work: the file exists
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"an older file"
    r = cli([*args, "--force"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["subset"] == "val" and s["split"] == str(split_yaml) and s["fold"] is None
    assert s["counts"]["patients"] == 2
    best, base = s["tune"]["best"], s["tune"]["baseline"]
    assert s["tune"]["gain"] == pytest.approx(best["dice"] - base["dice"])
    assert s["tune"]["gain"] >= 0 and s["tune"]["output"] == str(out)
    assert base["threshold"] == 0.5
    assert s["tune"]["grid"]["min_sizes"] == [0, 4, 16, 64]
    assert "tuned on these patients: threshold" in r.stderr
    meta = read_metadata(out)
    assert meta["threshold"] == best["threshold"]
    assert meta["postprocess"]["min_size"] == best["min_size"]
    assert meta["postprocess"]["largest_component"] == best["largest"]
    assert read_metadata(models["plain"])["threshold"] == 0.5  # the original is untouched
    run = Path(s["run_dir"])  # the masks scored stay; the probabilities searched on do not
    assert len(list(run.glob("masks/*/*_mask.tif"))) == s["counts"]["slices"]
    assert not list(run.glob("masks/*/*_prob.tif"))
    # two models cannot get one tuned copy; a wrong suffix is refused
    r = cli(
        [
            "eval",
            models["on"],
            models["off"],
            phantom_root,
            "--tune-output",
            tmp_path / "x.safetensors",
        ]
    )
    assert r.returncode == 2 and "exactly one MODEL" in r.stderr
    r = cli(["eval", models["on"], phantom_root, "--tune-output", tmp_path / "x.onnx"])
    assert r.returncode == 2 and "must have the model's suffix" in r.stderr


@pytest.mark.slow  # exports an ONNX model first (~15 s)
def test_cli_eval_onnx_model_and_tuned_onnx_copy(
    cli: Any, phantom_root: Path, models: dict[str, Path], split_yaml: Path, tmp_path: Path
) -> None:
    from brainseg.export import export_onnx
    from brainseg.inference.predict import read_onnx_metadata

    onnx_path = tmp_path / "on.onnx"
    export_onnx(models["on"], onnx_path)
    out = tmp_path / "on_tuned.onnx"
    r = cli(
        [
            "eval",
            onnx_path,
            phantom_root,
            "--split",
            split_yaml,
            "--json",
            "--tune-output",
            out,
            "--project",
            tmp_path / "runs",
        ]
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["models"] == [str(onnx_path)]
    assert s["global"]["recall"] == 1.0  # the "tumor everywhere" model, through onnxruntime
    meta = read_onnx_metadata(out)
    best = s["tune"]["best"]
    assert meta["threshold"] == best["threshold"]
    assert meta["postprocess"]["min_size"] == best["min_size"]
    assert meta["postprocess"]["largest_component"] == best["largest"]
    assert read_onnx_metadata(onnx_path)["threshold"] == 0.5
    # the ONNX path never imports torch
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from brainseg.cli.app import main\n"
        "try:\n"
        f"    main(['--quiet', 'eval', {str(onnx_path)!r}, {str(phantom_root)!r}, '--split',\n"
        f"          {str(split_yaml)!r}, '--project', {str(tmp_path / 'runs')!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "TORCH False" in p.stdout


def test_cli_eval_names_a_misnamed_model_file(
    cli: Any, phantom_root: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    fake = tmp_path / "plain.onnx"
    fake.write_bytes(models["plain"].read_bytes())
    r = cli(["eval", fake, phantom_root, "--project", tmp_path / "runs"])
    assert r.returncode == 2, r.stderr
    assert "is a safetensors checkpoint, not an ONNX model" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------- issue 21: not held out
def _fold_checkpoint(path: Path, split: Any, fold: int) -> Path:
    """A small checkpoint whose card says it is fold ``fold`` of ``split`` (as train writes)."""
    from brainseg.model import card as mc
    from brainseg.model.checkpoint import copy_with_metadata

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _checkpoint(path.with_suffix(".tmp.safetensors"))
    card = mc.with_card({"image_size": 32}, selection="last", split=mc.split_summary(split, fold))
    copy_with_metadata(tmp, path, {mc.CARD_KEY: card[mc.CARD_KEY]})
    tmp.unlink()
    return path


@pytest.fixture(scope="module")
def cv_folds(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-fold split of the 6 phantom patients, its YAML read back with PyYAML (the oracle),
    a checkpoint per fold and their ensemble.json."""
    import yaml

    from brainseg.data.cache import load_dataset
    from brainseg.data.split import make_split, save_split
    from brainseg.ensemble import write_ensemble

    d = tmp_path_factory.mktemp("cvfolds")
    ids = load_dataset(phantom_root).patient_ids
    split = make_split({p: 1.0 for p in ids}, folds=3, seed=0)
    path = save_split(split, d / "folds.yaml")
    doc = yaml.safe_load(path.read_text())
    folds = [_fold_checkpoint(d / f"fold_{k}" / "last.safetensors", split, k) for k in range(3)]
    manifest = write_ensemble(d / "ensemble.json", folds, 0.5, 0, False)
    return {"split": path, "doc": doc, "folds": folds, "manifest": manifest}


def _eval_json(cli: Any, args: list[Any], project: Path) -> tuple[dict[str, Any], str, Path]:
    r = cli(["eval", *args, "--json", "--device", "cpu", "--project", project])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), " ".join(r.stderr.split()), project / "exp"


def test_eval_warns_and_marks_patients_an_ensemble_member_trained_on(
    cli: Any, phantom_root: Path, cv_folds: dict[str, Any], tmp_path: Path
) -> None:
    """An ensemble of the 3 fold models scored on fold 0's validation patients: folds 1 and
    2 trained on them; eval counts 3 models, warns in one line and marks every output."""
    doc = cv_folds["doc"]
    val0 = sorted(doc["folds"][0]["val"])
    s, err, run = _eval_json(
        cli, [cv_folds["manifest"], phantom_root, "--split", cv_folds["split"], "--fold", "0"],
        tmp_path,
    )  # fmt: skip
    assert "evaluating an ensemble of 3 models (ensemble.json)" in err
    assert s["members"] == 3 and s["ensemble"] is True
    assert s["trained_on_scored_patients"] == val0
    assert s["training_overlap"]["by_model"] == {
        "fold_1/last.safetensors": val0, "fold_2/last.safetensors": val0}  # fmt: skip
    line = (
        f"warning: {len(val0)} of the {len(val0)} scored patients were training patients of 2 "
        "of the 3 model(s) (fold_1/last.safetensors, fold_2/last.safetensors)"
    )
    assert line in err
    assert "NOT HELD OUT" in err  # the summary table (on stderr with --json)
    assert json.loads((run / "summary.json").read_text())["trained_on_scored_patients"] == val0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Not held out:" in html and val0[0] in html


def test_eval_of_one_fold_model_checks_its_own_training_patients(
    cli: Any, phantom_root: Path, cv_folds: dict[str, Any], tmp_path: Path
) -> None:
    """--split without --fold scores the split's val list; the fold-1 model trained on some
    of them (computed from the YAML). Its own fold's patients are clean: no warning."""
    doc, fold1 = cv_folds["doc"], cv_folds["folds"][1]
    s, err, _ = _eval_json(cli, [fold1, phantom_root, "--split", cv_folds["split"]], tmp_path / "a")
    expect = sorted(set(doc["subsets"]["val"]) & set(doc["folds"][1]["train"]))
    assert expect  # the split's val list is fold 0's: fold 1 trained on it
    assert "evaluating 1 model on" in err
    assert "has 3 folds and no --fold was given" in err
    assert s["members"] == 1 and s["trained_on_scored_patients"] == expect
    assert f"{len(expect)} of the {len(doc['subsets']['val'])} scored patients" in err
    s, err, run = _eval_json(
        cli, [fold1, phantom_root, "--split", cv_folds["split"], "--fold", "1"], tmp_path / "b"
    )
    assert s["trained_on_scored_patients"] == [] and s["training_overlap"]["unknown"] == []
    assert "warning" not in err and "NOT HELD OUT" not in err
    assert "Not held out" not in (run / "report.html").read_text(encoding="utf-8")
