"""report.html of eval, cv and train runs: content read back, and opened in real Chromium.

The browser tests drive Debian's headless ``chromium`` over the DevTools protocol
(tests/_browser.py): no console error or exception, no network request (everything is
embedded), every image decodes, and the per-patient table sorts when its header is clicked
with the mouse. Each keeps a full-page screenshot (its path is printed). They skip with a
reason where Chromium is not installed (``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import csv
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _browser import chromium, find_chromium, open_report, screenshot

from brainseg.evaluation import dataset as ev
from brainseg.evaluation import report as rp
from brainseg.train.report import write_train_report

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)"
)


class FlairPredictor:
    """Probability = FLAIR / 255: finds the bright phantom tumours, with false positives."""

    image_size = (64, 64)
    batch_size = 8

    def __init__(self, model_paths: list[Path], **kw: Any) -> None:
        self.metadata: dict[str, Any] = {"threshold": 0.5, "image_size": 64}

    def predict_model_size(self, images: np.ndarray) -> np.ndarray:
        return images[..., 1].astype(np.float32) / 255.0


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def embedded_pngs(text: str) -> list[np.ndarray]:
    """Every data: image of the page, decoded (RGB arrays)."""
    from PIL import Image

    out = []
    for b64 in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def assert_self_contained(text: str) -> None:
    assert "://" not in text  # no http(s)/file URL anywhere (base64 has no ':')
    for attr in re.findall(r'\b(?:src|href)="([^"]*)"', text):
        assert attr.startswith("data:"), attr
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


@pytest.fixture(scope="module")
def eval_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> ev.EvalResult:
    model = tmp_path_factory.mktemp("model") / "m.safetensors"
    model.write_bytes(b"not read by the stand-in predictor")
    res = ev.run_eval([model], phantom_root, opts=ev.EvalOptions(batch_size=8),
                      predictor_factory=FlairPredictor)  # fmt: skip
    ev.write_run(res, tmp_path_factory.mktemp("evalrun") / "exp")
    return res


# ----------------------------------------------------------------------------- content


def test_eval_writes_a_report_with_its_numbers(eval_run: ev.EvalResult) -> None:
    assert eval_run.run_dir is not None
    path = eval_run.run_dir / "report.html"
    assert path in eval_run.files and "report.html" in eval_run.summary["files"]
    text = path.read_text(encoding="utf-8")
    assert_self_contained(text)
    s = eval_run.summary
    mean = s["per_patient"]["dice"]["mean"]
    assert f"mean per-patient Dice {mean:.4f}" in text
    # how it was measured: protocol, subset, size, threshold, post-processing
    assert "no split: every patient of the data" in text
    assert "64x64: the images&#x27; own size" in text
    assert "0.5 (from the model)" in text and "min-size 0 px, all components kept" in text
    # the table holds every patient of per_patient.csv with its full-precision Dice
    for row in read_csv(eval_run.run_dir / "per_patient.csv"):
        assert f'data-v="{row["patient_id"]}"' in text
        assert f'data-v="{float(row["dice"])!r}"' in text
    # the montages: the worst and the median patient of per_patient.csv
    rows = sorted(read_csv(eval_run.run_dir / "per_patient.csv"), key=lambda r: float(r["dice"]))
    worst, median = rows[0], rows[(len(rows) - 1) // 2]
    assert f"worst patient: {worst['patient_id']}" in text
    assert f"median patient: {median['patient_id']}" in text
    assert [c.patient_id for c in eval_run.cases] == [worst["patient_id"], median["patient_id"]]
    pngs = embedded_pngs(text)
    assert len(pngs) == 3  # Dice plot + 2 montages
    for m in pngs[1:]:  # ground truth (green) and prediction (red) outlines are drawn
        assert np.all(m == rp.GT_COLOR, axis=-1).any()
        assert np.all(m == rp.PRED_COLOR, axis=-1).any()


def test_cases_are_the_tumour_slices_of_worst_and_median() -> None:
    ids = ["p0", "p1", "p2"]
    pidx = np.repeat(np.arange(3), 4)
    snum = np.tile(np.arange(1, 5), 3)
    gt = np.zeros((12, 8, 8), dtype=bool)
    gt[[1, 2, 5, 9], 2:5, 2:5] = True
    pred = np.zeros_like(gt)
    pred[3, 0, 0] = True  # p0: a false positive on a slice without tumour
    images = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 8, 8), np.uint8)
    per_patient = [{"patient_id": p, "dice": d} for p, d in zip(ids, [0.2, 0.9, 0.5], strict=True)]
    cases = rp.pick_cases(per_patient, images, np.arange(12), gt, pred, pidx, snum, ids)
    assert [(c.label, c.patient_id) for c in cases] == [("worst", "p0"), ("median", "p2")]
    assert cases[0].slice_number.tolist() == [2, 3, 4]  # tumour (GT) slices + the FP slice
    assert cases[0].flair[:, 0, 0].tolist() == [1, 2, 3]  # the right dataset rows
    assert cases[1].slice_number.tolist() == [2]
    assert cases[0].pred[2, 0, 0] and not cases[0].gt[2].any()
    # NaN Dice is left out; one patient gives one case
    assert rp.worst_and_median([{"patient_id": "a", "dice": math.nan}]) == []
    assert [c[1] for c in rp.worst_and_median(per_patient[:1])] == ["p0"]


def test_text_is_escaped(eval_run: ev.EvalResult) -> None:
    summary = {**eval_run.summary, "models": ['<script>alert("x")</script>.onnx']}
    rows = [{**eval_run.report.per_patient[0], "patient_id": "<img src=x onerror=alert(1)>"}]
    text = rp.eval_html(summary, rows, [])
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text


def test_train_report_from_a_real_run_folder(train_run: Path) -> None:
    path = write_train_report(train_run)
    text = path.read_text(encoding="utf-8")
    assert_self_contained(text)
    rows = read_csv(train_run / "metrics.csv")
    assert len(rows) == 2
    for r in rows:
        assert f'data-v="{float(r["val_dice_patient"])!r}"' in text
    best = max(rows, key=lambda r: float(r["val_dice_patient"]))
    assert f"{float(best['val_dice_patient']):.4f} at epoch {best['epoch']}" in text
    assert 'epochs done</th><td class="t">2 of 2' in text
    assert "image_size: 32" in text  # config.yaml, shown as text
    pngs = embedded_pngs(text)
    assert len(pngs) == 2  # curves + preview.png
    from PIL import Image

    with Image.open(train_run / "preview.png") as im:
        assert pngs[1].shape[:2] == (im.height, im.width)


# ----------------------------------------------------------------------------- fixtures (train)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run folder written by brainseg.train.train on 4 phantom patients."""
    from brainseg.config import TrainConfig
    from brainseg.data.split import make_split, save_split
    from brainseg.data.synthetic import write_synthetic
    from brainseg.train import train

    d = tmp_path_factory.mktemp("trainrun")
    root = write_synthetic(d / "data", patients=4, seed=3, size=64, slices=(8, 10))
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    save_split(make_split({p: 1.0 for p in ids}, val_fraction=0.25, seed=0), d / "split.yaml")
    cfg = TrainConfig(data=str(root), split=str(d / "split.yaml"), image_size=32,
                      encoder_weights="none", decoder_channels=[8, 8, 8, 8, 8], batch_size=4,
                      steps_per_epoch=1, epochs=2, project=str(d / "runs"), quiet=True,
                      preview_slices=2, device="cpu")  # fmt: skip
    return Path(train(cfg))


# ----------------------------------------------------------------------------- cv


@pytest.fixture(scope="module")
def cv_result(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real 2-fold cv (1 tiny epoch per fold) on 4 phantom patients, written."""
    from brainseg.data.synthetic import write_synthetic
    from brainseg.train.cv import CVOptions, run_cv, write_cv

    d = tmp_path_factory.mktemp("cv")
    root = write_synthetic(d / "data", patients=4, seed=2, size=64, slices=(8, 10))
    overrides = {"epochs": 1, "steps_per_epoch": 1, "image_size": 32, "batch_size": 4,
                 "encoder_weights": "none", "decoder_channels": [8] * 5, "device": "cpu",
                 "quiet": True, "preview_slices": 0}  # fmt: skip
    res = run_cv(CVOptions(data=str(root), folds=2, project=str(d / "runs"), overrides=overrides))
    write_cv(res)
    return res


@pytest.mark.slow  # trains two folds
def test_cv_writes_a_report(cv_result: Any) -> None:
    path = cv_result.plan.cv_dir / "report.html"
    assert path in cv_result.files and "report.html" in cv_result.summary["files"]
    text = path.read_text(encoding="utf-8")
    assert_self_contained(text)
    st = cv_result.summary["after"]["per_patient_dice"]
    assert f"out-of-fold mean per-patient Dice {st['mean']:.4f}" in text
    assert "2-fold patient-level cross-validation" in text
    assert "last: final checkpoint of each fold" in text
    rows = read_csv(cv_result.plan.cv_dir / "per_patient.csv")
    worst = min(rows, key=lambda r: (float(r["dice"]), r["patient_id"]))
    assert f"worst patient: {worst['patient_id']}" in text
    for r in rows:
        assert f'data-v="{float(r["dice"])!r}"' in text
    assert len(embedded_pngs(text)) == 3


# ----------------------------------------------------------------------------- browser


def check_in_browser(path: Path, shot: Path, column: str, expected: list[str]) -> dict[str, Any]:
    """Open ``path``; check errors, requests, images and sorting by ``column`` (mouse clicks).

    ``expected`` is the first column read back after one click on ``column`` (ascending).
    """
    assert CHROMIUM is not None
    with chromium(CHROMIUM, shot.parent / f"{shot.stem}-profile") as page:
        open_report(page, path)
        images = page.js(
            "Promise.all(Array.from(document.images).map(i => i.decode().then(() => "
            "[i.naturalWidth, i.naturalHeight], () => [0, 0])))"
        )
        assert images and all(w > 0 and h > 0 for w, h in images), images
        col = page.js(
            "Array.from(document.querySelector('table.sortable').tHead.rows[0].cells)"
            f".findIndex(th => th.textContent === {column!r})"
        )
        assert col >= 0

        def click_header() -> list[str]:
            rect = page.js(
                "(() => { const th = document.querySelector('table.sortable').tHead.rows[0]"
                f".cells[{col}]; th.scrollIntoView({{block: 'center'}}); "
                "const r = th.getBoundingClientRect(); return [r.x + r.width / 2, "
                "r.y + r.height / 2]; })()"
            )
            page.click(*rect)
            return list(
                page.js(
                    "Array.from(document.querySelector('table.sortable').tBodies[0].rows)"
                    ".map(r => r.cells[0].textContent)"
                )
            )

        first = click_header()
        state = page.js(
            f"document.querySelector('table.sortable').tHead.rows[0].cells[{col}]"
            ".getAttribute('aria-sort')"
        )
        second = click_header()
        page.js("window.scrollTo(0, 0)")
        screenshot(page, shot)
        errors, requests = page.errors(), page.requests()
    print(f"\nscreenshot of {path.name}: {shot}")
    assert errors == [], errors
    # the page itself and its embedded data: images, nothing else
    assert [u for u in requests if not u.startswith("data:")] == [path.resolve().as_uri()]
    assert first == expected and state == "ascending"
    assert second == expected[::-1]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return {"images": images}


@needs_chromium
def test_eval_report_in_chromium(eval_run: ev.EvalResult, tmp_path: Path) -> None:
    assert eval_run.run_dir is not None
    rows = read_csv(eval_run.run_dir / "per_patient.csv")
    by_dice = [r["patient_id"] for r in sorted(rows, key=lambda r: float(r["dice"]))]
    assert by_dice != [r["patient_id"] for r in rows]  # sorting must change the order
    out = check_in_browser(eval_run.run_dir / "report.html", tmp_path / "eval-report.png",
                           "dice", by_dice)  # fmt: skip
    assert len(out["images"]) == 3


@needs_chromium
def test_train_report_in_chromium(train_run: Path, tmp_path: Path) -> None:
    path = write_train_report(train_run)
    rows = read_csv(train_run / "metrics.csv")
    by_loss = [r["epoch"] for r in sorted(rows, key=lambda r: float(r["train_loss"]))]
    check_in_browser(path, tmp_path / "train-report.png", "train_loss", by_loss)


@needs_chromium
@pytest.mark.slow  # trains two folds
def test_cv_report_in_chromium(cv_result: Any, tmp_path: Path) -> None:
    rows = read_csv(cv_result.plan.cv_dir / "per_patient.csv")
    by_id = sorted(r["patient_id"] for r in rows)
    path = cv_result.plan.cv_dir / "report.html"
    check_in_browser(path, tmp_path / "cv-report.png", "patient_id", by_id)
