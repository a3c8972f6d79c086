"""`brainseg train --fold all`: a final model on every patient, no validation (issue 13);
the model card in its checkpoints and the run's report.html (issue 15)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from brainseg.model.checkpoint import load_checkpoint, read_metadata

TINY = [
    "--image-size", "32", "--encoder-weights", "none", "--decoder-channels", "16,16,8,8,8",
    "--batch-size", "4", "--steps-per-epoch", "1", "--epochs", "2", "--device", "cpu",
]  # fmt: skip


def patient_ids(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def final_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One --fold all run on every phantom patient (no --split)."""
    project = tmp_path_factory.mktemp("final")
    r = run_cli(["train", phantom_root, "--fold", "all", *TINY, "--project", project])
    assert r.returncode == 0, r.stderr
    assert "no validation" in r.stdout + r.stderr
    (project / "stdout.txt").write_text(r.stdout)
    return project / "exp"


def test_fold_all_report_and_file_table_say_there_is_no_validation(final_run: Path) -> None:
    html = (final_run / "report.html").read_text()
    assert "none (--fold all: every patient trains)" in html
    assert ">nan<" not in html and "nan at epoch" not in html
    table = (final_run.parent / "stdout.txt").read_text()
    assert not (final_run / "preview.png").exists()
    assert "preview.png" not in table and "metrics.csv" in table and "report.html" in table


def test_fold_all_metrics_have_empty_validation_columns(final_run: Path) -> None:
    rows = rows_of(final_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert r["val_loss"] == r["val_dice_slice"] == r["val_dice_patient"] == ""
        assert float(r["train_loss"]) > 0
        assert float(r["lr"]) > 0


def test_fold_all_best_is_the_final_weights(final_run: Path) -> None:
    best, best_meta = load_checkpoint(final_run / "best.safetensors")
    last, last_meta = load_checkpoint(final_run / "last.safetensors")
    assert best_meta["epoch"] == last_meta["epoch"] == 2
    for k, v in best.state_dict().items():
        assert (v == last.state_dict()[k]).all(), k


def test_fold_all_trains_on_every_patient(final_run: Path, phantom_root: Path) -> None:
    everyone = patient_ids(phantom_root)
    split = yaml.safe_load((final_run / "split.yaml").read_text())
    assert sorted(split["subsets"]["train"]) == everyone
    assert split["subsets"]["val"] == [] and split["subsets"]["test"] == []
    info = yaml.safe_load((final_run / "config.yaml").read_text())["run_info"]
    assert info["train_patient_ids"] == everyone
    assert info["val_patients"] == 0


def test_fold_all_with_a_split_trains_on_all_its_subsets(
    phantom_root: Path, tmp_path: Path
) -> None:
    from brainseg.data.split import make_split, save_split

    ids = patient_ids(phantom_root)
    split = make_split({p: 1.0 for p in ids}, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert split.subsets["test"] and split.subsets["val"]
    save_split(split, tmp_path / "s.yaml")
    r = run_cli(
        ["train", phantom_root, "--split", tmp_path / "s.yaml", "--fold", "all", *TINY,
         "--epochs", "1", "--project", tmp_path / "runs"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = yaml.safe_load((tmp_path / "runs/exp/config.yaml").read_text())["run_info"]
    assert info["train_patient_ids"] == ids
    assert info["train_slices"] > 0 and info["val_slices"] == 0


def test_eval_and_predict_accept_the_final_model(
    final_run: Path, phantom_root: Path, tmp_path: Path
) -> None:
    r = run_cli(["eval", final_run / "best.safetensors", phantom_root, "--project", tmp_path])
    assert r.returncode == 0, r.stderr
    first = sorted(phantom_root.glob("*/*[0-9].tif"))[0]
    r = run_cli(["predict", final_run / "best.safetensors", first, "-o", tmp_path / "pred"])
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "pred").rglob("*_mask.*"))


def test_postprocess_from_a_cv_run_goes_into_the_checkpoint(
    final_run: Path, phantom_root: Path, tmp_path: Path
) -> None:
    from brainseg.ensemble import write_ensemble

    cv = tmp_path / "cv" / "exp"
    cv.mkdir(parents=True)
    write_ensemble(cv / "ensemble.json", [final_run / "best.safetensors"], 0.35, 7, True)
    r = run_cli(
        ["train", phantom_root, "--fold", "all", *TINY, "--epochs", "1",
         "--postprocess-from", cv, "--project", tmp_path / "runs"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in ("best.safetensors", "last.safetensors"):
        meta = read_metadata(tmp_path / "runs/exp" / name)
        assert meta["threshold"] == pytest.approx(0.35)
        assert meta["postprocess"] == {"min_size": 7, "largest_component": True}
    info = run_cli(["info", tmp_path / "runs/exp/best.safetensors", "--json"])
    card = json.loads(info.stdout)
    assert card["preprocessing"]["threshold"] == pytest.approx(0.35)


def test_postprocess_from_without_an_ensemble_is_refused(
    phantom_root: Path, tmp_path: Path
) -> None:
    r = run_cli(["train", phantom_root, "--fold", "all", *TINY, "--postprocess-from", tmp_path])
    assert r.returncode == 2
    assert "no ensemble.json" in r.stderr


def test_fold_all_refuses_the_plateau_scheduler(phantom_root: Path, tmp_path: Path) -> None:
    r = run_cli(["train", phantom_root, "--fold", "all", "--scheduler", "plateau", *TINY])
    assert r.returncode == 2
    assert "needs validation patients" in r.stderr


def test_no_split_refusal_points_at_fold_all(phantom_root: Path) -> None:
    r = run_cli(["train", phantom_root, *TINY])
    assert r.returncode == 2
    assert "no split file given" in r.stderr and "--fold all" in r.stderr


def test_fold_must_be_a_number_or_all(phantom_root: Path) -> None:
    r = run_cli(["train", phantom_root, "--fold", "every", *TINY])
    assert r.returncode == 2
    assert "fold must be an integer or all" in r.stderr


# ------------------------------------------------------------------ card and report (issue 15)
def test_info_shows_the_card_of_a_final_model(final_run: Path, phantom_root: Path) -> None:
    r = run_cli(["info", final_run / "best.safetensors", "--json"])
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
    training = card["training"]
    assert training["checkpoint"] == "final"
    assert training["split"]["train_patients"] == len(patient_ids(phantom_root))
    assert training["split"]["val_patients"] == 0
    assert training["epochs_done"] == 2
    assert "every patient" in card["eval_protocol"]["protocol"]


def test_info_shows_best_and_last_of_a_split_run(phantom_root: Path, tmp_path: Path) -> None:
    from brainseg.data.split import make_split, save_split

    ids = patient_ids(phantom_root)
    split = make_split({p: 1.0 for p in ids}, val_fraction=0.34, seed=0)
    save_split(split, tmp_path / "s.yaml")
    r = run_cli(
        ["train", phantom_root, "--split", tmp_path / "s.yaml", *TINY, "--project", tmp_path]
    )
    assert r.returncode == 0, r.stderr
    cards = {}
    for sel in ("best", "last"):
        out = run_cli(["info", tmp_path / "exp" / f"{sel}.safetensors", "--json"])
        assert out.returncode == 0, out.stderr
        cards[sel] = json.loads(out.stdout)
    assert cards["best"]["training"]["checkpoint"] == "best"
    assert cards["last"]["training"]["checkpoint"] == "last"
    for card in cards.values():
        s = card["training"]["split"]
        assert s["val_patient_ids"] == sorted(split.subsets["val"])
        assert s["train_patients"] == len(split.subsets["train"])
        assert s["kind"] == "single patient-level split"


def test_train_writes_a_report_naming_its_config(final_run: Path) -> None:
    html = (final_run / "report.html").read_text(encoding="utf-8")
    assert "<img" in html and "data:image/png;base64," in html  # the curves, embedded
    config = (final_run / "config.yaml").read_text(encoding="utf-8")
    assert "decoder_channels" in html and "image_size: 32" in config
    assert "image_size: 32" in html
    assert str(final_run.name) in html


def test_split_without_validation_points_at_fold_all(phantom_root: Path, tmp_path: Path) -> None:
    r = run_cli(["split", phantom_root, "-o", tmp_path / "s.yaml", "--val-fraction", "0"])
    assert r.returncode == 2
    assert "--val-fraction must be a number between 0 and 1" in r.stderr
    assert "brainseg train DATA --fold all" in r.stderr


def test_postprocess_from_card_says_its_settings_and_keeps_the_cv_figure(
    final_run: Path, phantom_root: Path, tmp_path: Path
) -> None:
    """--fold all --postprocess-from: the card's protocol holds the cv's threshold and
    post-processing (not "0.5, none") and the cv's out-of-fold figure, as the manifest says."""
    from brainseg.ensemble import write_ensemble

    cv = tmp_path / "cv" / "exp"
    cv.mkdir(parents=True)
    figure = {"folds": 3, "patients": 6, "dice_patient_before_tuning": 0.41,
              "dice_patient_after_tuning": 0.44,
              "tuning_chosen_on": "chosen once on the pooled out-of-fold predictions of 6 "
              "patients"}  # fmt: skip
    write_ensemble(cv / "ensemble.json", [final_run / "best.safetensors"], 0.45, 0, True,
                   {"cv_out_of_fold": figure})  # fmt: skip
    r = run_cli(
        ["train", phantom_root, "--fold", "all", *TINY, "--epochs", "1",
         "--postprocess-from", cv, "--project", tmp_path / "runs"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    card = json.loads(run_cli(["info", tmp_path / "runs/exp/best.safetensors", "--json"]).stdout)
    proto = card["eval_protocol"]
    assert proto["threshold"] == pytest.approx(0.45)
    assert proto["post_processing"] == "largest 3D component per patient kept"
    assert str((cv / "ensemble.json").resolve()) in proto["settings_chosen"]
    assert "pooled out-of-fold predictions of 6 patients" in proto["settings_chosen"]
    assert card["eval_metrics"]["cv_out_of_fold_dice_patient_after_tuning"] == 0.44
    assert card["eval_metrics"]["cv_out_of_fold_dice_patient_before_tuning"] == 0.41
    assert card["evaluation"]["patients"] == 6
    assert "this final model itself was not measured" in card["evaluation"]["about"]
    n = len(patient_ids(phantom_root))
    assert f"used for this model: {n} training patients" in card["data_source"]
    assert card["training"]["split"]["train_patient_ids"] == patient_ids(phantom_root)
