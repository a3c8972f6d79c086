"""`brainseg cv`: folds trained as run folders, resumable after kills, out-of-fold summary.

The slow tests share one cross-validation of 6 phantom patients in 3 folds, run through the
real CLI and killed twice with SIGKILL at deterministic points (faultkit: right after a
last.safetensors is renamed into place): once between folds (fold 0 finished) and once in
the middle of fold 1 (after its first of two epochs). The third invocation finishes it; every
later test checks the files that run wrote against an independent recomputation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, run_cli

FAULTKIT = REPO / "tests" / "faults" / "faultkit.py"
RECIPE = [
    "--folds", "3", "--epochs", "2", "--steps-per-epoch", "1", "--image-size", "32",
    "--batch-size", "4", "--encoder-weights", "none", "--set", "decoder_channels=8,8,8,8,8",
    "--device", "cpu", "--seed", "1",
]  # fmt: skip


def run_killed(args: list[Any], nth: int) -> subprocess.CompletedProcess[str]:
    """``brainseg ARGS``, SIGKILLed right after the ``nth`` rename onto last.safetensors."""
    faults = {"kill": [{"when": "after_rename", "name": "last.safetensors", "nth": nth}]}
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "BRAINSEG_FAULTS": json.dumps(faults)}
    return subprocess.run(
        [sys.executable, str(FAULTKIT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def fingerprint(run: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every checkpoint of a fold folder."""
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(run.glob("*.safetensors"))
    }


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        skip = ("seconds", "images_per_s")  # timings differ between runs
        return [{k: v for k, v in r.items() if k not in skip} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 phantom patients, 64x64, 8-10 slices each (small: training cost is per fold)."""
    from brainseg.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("cvdata"), patients=6, seed=2, size=64,
                           slices=(8, 10))  # fmt: skip


@pytest.fixture(scope="module")
def killed_cv(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The cv killed between folds, then mid-fold, then finished with --resume."""
    from brainseg.train.cv import fold_progress

    project = tmp_path_factory.mktemp("cvruns")
    args = ["cv", phantoms, *RECIPE, "--project", project]
    cv_dir = project / "exp"
    log: dict[str, Any] = {"cv_dir": cv_dir}

    r1 = run_killed(args, nth=2)  # fold 0 saves last twice (2 epochs): killed when it is done
    assert r1.returncode == -9, r1.stderr
    assert fold_progress(cv_dir / "fold_0") == (2, 0)
    assert not (cv_dir / "fold_1").exists()
    log["fold0"] = fingerprint(cv_dir / "fold_0")

    r2 = run_killed(args, nth=1)  # the same command: fold 0 skipped, killed after fold 1 epoch 1
    assert r2.returncode == -9, r2.stderr
    log["r2"] = r2
    assert fold_progress(cv_dir / "fold_1") == (1, 0)
    log["fold0_after_r2"] = fingerprint(cv_dir / "fold_0")
    log["fold1_epoch1"] = metrics_rows(cv_dir / "fold_1")

    r3 = run_cli(["cv", "--resume", cv_dir], timeout=600)
    assert r3.returncode == 0, r3.stderr
    log["r3"] = r3
    return log


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_kill_between_folds_does_not_retrain_finished_fold(killed_cv: dict[str, Any]) -> None:
    cv_dir = killed_cv["cv_dir"]
    # killed after its final checkpoint, before its report.html: completed, not retrained
    assert "fold 0/3: finishing" in killed_cv["r2"].stderr
    assert (cv_dir / "fold_0" / "report.html").is_file()
    assert "fold 0/3: finished earlier" in killed_cv["r3"].stderr
    assert killed_cv["fold0_after_r2"] == killed_cv["fold0"]  # bytes and mtimes unchanged
    assert fingerprint(cv_dir / "fold_0") == killed_cv["fold0"]
    assert (cv_dir / "cv.yaml").is_file() and (cv_dir / "split.yaml").is_file()
    assert sorted(p.name for p in cv_dir.parent.iterdir()) == ["exp"]  # continued, no exp2


@pytest.mark.slow
def test_kill_mid_fold_resumes_at_its_epoch(killed_cv: dict[str, Any]) -> None:
    cv_dir = killed_cv["cv_dir"]
    assert "fold 1/3: resuming" in killed_cv["r3"].stderr
    assert "at epoch 2/2" in killed_cv["r3"].stderr
    rows = metrics_rows(cv_dir / "fold_1")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == killed_cv["fold1_epoch1"][0]  # the epoch done before the kill is kept
    for k in range(3):
        from brainseg.train.cv import fold_progress

        assert fold_progress(cv_dir / f"fold_{k}") == (2, 0)


# ----------------------------------------------------------------------------- out of fold


def _oof(cv_dir: Path) -> dict[str, np.ndarray]:
    with np.load(cv_dir / "oof_masks.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _per_patient(cv_dir: Path) -> dict[str, dict[str, str]]:
    with (cv_dir / "per_patient.csv").open(newline="") as f:
        return {r["patient_id"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_out_of_fold_covers_every_patient_exactly_once(
    killed_cv: dict[str, Any], phantoms: Path
) -> None:
    from brainseg.data.cache import load_dataset
    from brainseg.data.split import load_split

    cv_dir = killed_cv["cv_dir"]
    oof = _oof(cv_dir)
    ds = load_dataset(phantoms)
    split = load_split(cv_dir / "split.yaml")
    keys = list(zip(oof["patient_index"].tolist(), oof["slice_number"].tolist(), strict=True))
    assert len(keys) == len(set(keys)) == len(ds)  # every slice once
    assert set(keys) == set(zip(ds.patient_index.tolist(), ds.slice_number.tolist(), strict=True))
    ids = [str(p) for p in oof["patient_ids"]]
    for i, k in zip(oof["patient_index"], oof["fold"], strict=True):
        assert ids[i] in split.patients("val", int(k))  # predicted by the fold that held it out
        assert ids[i] not in split.patients("train", int(k))
    assert sorted(_per_patient(cv_dir)) == sorted(ds.patient_ids)


@pytest.mark.slow
def test_summary_equals_independent_recomputation(
    killed_cv: dict[str, Any], phantoms: Path
) -> None:
    from brainseg.data.cache import load_dataset
    from brainseg.evaluation import metrics

    cv_dir = killed_cv["cv_dir"]
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    oof = _oof(cv_dir)
    ds = load_dataset(phantoms)
    keys = zip(ds.patient_index.tolist(), ds.slice_number.tolist(), strict=True)
    row = {k: i for i, k in enumerate(keys)}
    oof_keys = zip(oof["patient_index"].tolist(), oof["slice_number"].tolist(), strict=True)
    rows = [row[k] for k in oof_keys]
    gt = np.asarray(ds.masks)[rows] != 0
    table = _per_patient(cv_dir)
    fold_of = {r["patient_id"]: int(r["fold"]) for r in table.values()}
    for key, col in (("before", "dice_before"), ("after", "dice")):
        rep = metrics.evaluate(oof[f"mask_{key}"], gt, oof["patient_index"],
                               oof["slice_number"], list(ds.patient_ids))  # fmt: skip
        dice = {r["patient_id"]: r["dice"] for r in rep.per_patient}
        for p, d in dice.items():
            assert float(table[p][col]) == pytest.approx(d, abs=1e-12)
        block = summary[key]
        assert block["per_patient_dice"]["mean"] == pytest.approx(np.mean(list(dice.values())))
        assert block["per_patient_dice"]["median"] == pytest.approx(np.median(list(dice.values())))
        assert block["per_patient_dice"]["std"] == pytest.approx(np.std(list(dice.values())))
        assert block["metrics"]["global"]["dice"] == pytest.approx(rep.global_metrics["dice"])
        assert block["metrics"]["per_slice_tumor"]["dice"]["mean"] == pytest.approx(
            rep.summary()["per_slice_tumor"]["dice"]["mean"]
        )
        for k, s in block["per_fold"].items():
            in_fold = [d for p, d in dice.items() if fold_of[p] == int(k)]
            assert s["n"] == len(in_fold) and s["mean"] == pytest.approx(np.mean(in_fold))
        sites = {p.split("_")[1] for p in dice}
        assert set(block["per_institution"]) == sites
    # the post-processing written to the ensemble is the one chosen on these predictions
    after = summary["after"]["settings"]
    tuned = summary["tuning"]["best"]
    assert (after["threshold"], after["min_size"], after["largest"]) == (
        tuned["threshold"], tuned["min_size"], tuned["largest"])  # fmt: skip
    assert summary["after"]["per_patient_dice"]["mean"] >= summary["before"][
        "per_patient_dice"]["mean"] - 1e-12  # fmt: skip


@pytest.mark.slow
def test_bootstrap_ci_contains_the_mean(killed_cv: dict[str, Any]) -> None:
    from brainseg.train.cv import bootstrap_ci

    summary = json.loads((killed_cv["cv_dir"] / "cv_summary.json").read_text())
    table = _per_patient(killed_cv["cv_dir"])
    for key in ("before", "after"):
        s = summary[key]["per_patient_dice"]
        lo, hi = s["ci95"]
        assert lo <= s["mean"] <= hi
        col = "dice" if key == "after" else "dice_before"
        assert [lo, hi] == pytest.approx(bootstrap_ci([float(r[col]) for r in table.values()]))
        for g in (*summary[key]["per_fold"].values(), *summary[key]["per_institution"].values()):
            assert g["ci95"][0] <= g["mean"] <= g["ci95"][1]
    assert summary["bootstrap"]["resamples"] == 2000 and summary["bootstrap"]["seed"] == 0
    out = killed_cv["r3"].stdout
    assert "per-patient Dice of 6 patients, 3 folds (final checkpoint of each fold)" in out
    assert "95% CI" in out and "per institution" in out


@pytest.mark.slow
def test_ensemble_manifest_loads(killed_cv: dict[str, Any]) -> None:
    from brainseg.ensemble import expand_model_paths, load_ensemble

    cv_dir = killed_cv["cv_dir"]
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    models, settings = load_ensemble(cv_dir / "ensemble.json")
    assert [p.resolve() for p in models] == [
        (cv_dir / f"fold_{k}" / "last.safetensors").resolve() for k in range(3)
    ]
    after = summary["after"]["settings"]
    assert settings["threshold"] == after["threshold"]
    assert settings["postprocess"] == {
        "min_size": after["min_size"], "largest_component": after["largest"]}  # fmt: skip
    assert settings["selection"]["select"] == "last"
    # the out-of-fold figure travels with the manifest (into the cards of models made from it)
    oof = settings["cv_out_of_fold"]
    assert oof["dice_patient_after_tuning"] == summary["after"]["per_patient_dice"]["mean"]
    assert oof["dice_patient_before_tuning"] == summary["before"]["per_patient_dice"]["mean"]
    assert oof["patients"] == summary["patients"] == 6 and oof["folds"] == 3
    assert expand_model_paths([cv_dir / "ensemble.json"]) == (models, settings)
    # relative paths: the folder can be moved
    json_doc = json.loads((cv_dir / "ensemble.json").read_text())
    assert json_doc["models"] == [f"fold_{k}/last.safetensors" for k in range(3)]


@pytest.mark.slow
def test_select_best_is_labelled_and_not_retrained(
    killed_cv: dict[str, Any], tmp_path: Path
) -> None:
    from brainseg.ensemble import load_ensemble

    copy = Path(shutil.copytree(killed_cv["cv_dir"], tmp_path / "exp", copy_function=os.link))
    before = {k: fingerprint(copy / f"fold_{k}") for k in range(3)}
    r = run_cli(["cv", "--resume", copy, "--select", "best", "--protocol", "buda"])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("finished earlier") == 3
    assert "selected on the validation patients" in r.stdout
    assert "buda protocol" in r.stdout
    summary = json.loads((copy / "cv_summary.json").read_text())
    assert summary["selection"] == {
        "select": "best",
        "label": "best epoch of each fold, selected on the validation patients",
    }
    assert all(f["model"].endswith("best.safetensors") for f in summary["fold_runs"])
    assert summary["buda"]["slices"] == summary["slices"] - 2 * summary["patients"]
    models, settings = load_ensemble(copy / "ensemble.json")
    assert [p.name for p in models] == ["best.safetensors"] * 3
    assert "selected on the validation patients" in settings["selection"]["label"]
    assert {k: fingerprint(copy / f"fold_{k}") for k in range(3)} == before


# ----------------------------------------------------------------------------- refusals


def test_contradictory_options_are_refused_before_any_work(tmp_path: Path) -> None:
    r = run_cli(["cv", tmp_path, "--folds", "3", "--split", tmp_path / "s.yaml",
                 "--project", tmp_path / "runs"])  # fmt: skip
    assert r.returncode == 2
    assert "--folds and --split cannot be combined" in r.stderr
    r = run_cli(["cv", "--resume", tmp_path, "--config", "best"])
    assert r.returncode == 2 and "cannot change --config when resuming" in r.stderr
    r = run_cli(["cv", tmp_path, "--set", "fold=1", "--project", tmp_path / "runs"])
    assert r.returncode == 2 and "--set fold is chosen by brainseg cv" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_split_without_folds_is_refused(phantom_root: Path, tmp_path: Path) -> None:
    from brainseg.data.split import make_split, save_split
    from brainseg.errors import BrainsegError
    from brainseg.train.cv import CVOptions, prepare

    ids = sorted(p.name for p in phantom_root.iterdir() if p.is_dir())
    plain = save_split(make_split(dict.fromkeys(ids, 1.0), val_fraction=0.34), tmp_path / "s.yaml")
    with pytest.raises(BrainsegError, match="has no cross-validation folds"):
        prepare(CVOptions(data=str(phantom_root), split=str(plain),
                          project=str(tmp_path / "runs")))  # fmt: skip
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- pieces


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    from brainseg.train.cv import bootstrap_ci

    v = np.random.default_rng(5).uniform(0.3, 0.95, size=25)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi
    assert (lo, hi) == bootstrap_ci(v)  # fixed seed: the same interval every time
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert all(np.isnan(bootstrap_ci([])))
    wide = bootstrap_ci(v[:5])
    assert wide[1] - wide[0] > hi - lo  # fewer patients, wider interval


def test_institution_is_the_tcga_site_code() -> None:
    from brainseg.train.cv import institution

    assert institution("TCGA_CS_4941_19960909") == "CS"
    assert institution("TCGA_HT_7879_19981009") == "HT"
    assert institution("patient7") == "unknown"


def test_parse_set_reads_yaml_scalars() -> None:
    from brainseg.errors import BrainsegError
    from brainseg.train.cv import parse_set

    got = parse_set(["lr=3e-4", "augment=true", "decoder-channels=8,8,8,8,8", "grad_clip=1"])
    assert got == {"lr": 3e-4, "augment": True, "decoder_channels": "8,8,8,8,8", "grad_clip": 1}
    with pytest.raises(BrainsegError, match="not KEY=VALUE"):
        parse_set(["lr"])


def test_coverage_check_names_a_patient_in_two_folds() -> None:
    from brainseg.errors import BrainsegRuntimeError
    from brainseg.train.cv import check_coverage

    check_coverage([["a", "b"], ["c"]], ["a", "b", "c"])
    with pytest.raises(BrainsegRuntimeError, match=r"b in folds \[0, 1\]"):
        check_coverage([["a", "b"], ["b", "c"]], ["a", "b", "c"])
    with pytest.raises(BrainsegRuntimeError, match="d in no fold"):
        check_coverage([["a", "b"], ["c"]], ["a", "b", "c", "d"])


def test_buda_protocol_drops_end_slices_and_keeps_largest_6_connected() -> None:
    from brainseg.train.cv import OOF, buda_masks

    prob = np.zeros((5, 8, 8), dtype=np.float32)
    prob[1:4, 1:4, 1:4] = 0.9  # a 3x3x3 blob on slices 1-3
    prob[2, 6, 6] = 0.9  # a lone pixel, not face-connected
    prob[3, 4, 4] = 0.9  # touches the blob diagonally only (26- but not 6-connected)
    prob[0, 7, 7] = prob[4, 7, 7] = 0.9  # on the first and last slice: dropped
    order = np.array([4, 0, 2, 1, 3])  # slice numbers, stored out of order
    oof = OOF(prob[order], prob[order] > 0.5, np.zeros(5, np.int64), order,
              np.zeros(5, np.int64), ["TCGA_CS_0001_20000101"])  # fmt: skip
    rows, masks = buda_masks(oof)
    assert sorted(order[rows].tolist()) == [1, 2, 3]
    kept = dict(zip(order[rows].tolist(), masks, strict=True))
    assert int(sum(m.sum() for m in kept.values())) == 27
    assert not kept[3][4, 4] and not kept[2][6, 6]


def test_ensemble_manifest_errors_name_the_file(tmp_path: Path) -> None:
    from brainseg.ensemble import expand_model_paths, load_ensemble, write_ensemble
    from brainseg.errors import BrainsegError

    ck = tmp_path / "fold_0" / "last.safetensors"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    path = write_ensemble(tmp_path / "ensemble.json", [ck], 0.4, 16, True, {"note": "t"})
    models, settings = load_ensemble(path)
    assert models == [tmp_path / "fold_0" / "last.safetensors"]
    assert settings == {"threshold": 0.4, "postprocess": {"min_size": 16,
                        "largest_component": True}, "note": "t"}  # fmt: skip
    assert expand_model_paths([ck]) == ([ck], None)
    with pytest.raises(BrainsegError, match="must be the only MODEL"):
        expand_model_paths([path, ck])
    ck.unlink()
    with pytest.raises(BrainsegError, match=r"model fold_0/last.safetensors of ensemble"):
        load_ensemble(path)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(BrainsegError, match="not a brainseg ensemble"):
        load_ensemble(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BrainsegError, match="not valid JSON"):
        load_ensemble(tmp_path / "broken.json")
    with pytest.raises(BrainsegError, match="does not exist"):
        load_ensemble(tmp_path / "missing.json")


@pytest.mark.slow
def test_eval_and_predict_take_the_ensemble_as_one_model(
    killed_cv: dict[str, Any], phantoms: Path, tmp_path: Path
) -> None:
    """ensemble.json is one MODEL: the mean of the folds, with the manifest's threshold."""
    from brainseg.data.cache import load_dataset
    from brainseg.inference.predict import Predictor

    cv_dir = killed_cv["cv_dir"]
    manifest = cv_dir / "ensemble.json"
    doc = json.loads(manifest.read_text())
    folds = [cv_dir / f"fold_{k}" / "last.safetensors" for k in range(3)]
    data = load_dataset(phantoms)
    images = data.images[:4].transpose(0, 2, 3, 1)
    ens = Predictor(manifest, device="cpu")
    mean = np.mean([Predictor(f, device="cpu").predict_proba(images) for f in folds], axis=0)
    np.testing.assert_allclose(ens.predict_proba(images), mean, atol=1e-6)
    assert ens.metadata["threshold"] == doc["threshold"]
    assert ens.metadata["postprocess"] == doc["postprocess"]

    out = tmp_path / "eval"
    r = run_cli(
        ["--quiet", "eval", manifest, phantoms, "--device", "cpu", "--project", out, "--json"]
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["settings"]["threshold"] == doc["threshold"]
    r = run_cli(["predict", manifest, phantoms, "-o", tmp_path / "pred", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "pred").rglob("*_mask.tif"))) == data.images.shape[0]


@pytest.mark.slow
def test_eval_of_each_fold_model_gives_cv_out_of_fold_dice(
    killed_cv: dict[str, Any], phantoms: Path, tmp_path: Path
) -> None:
    """cv predicts out of fold in memory, eval predicts mask files and scores them: for
    each fold's model on that fold's validation patients, at cv's settings before tuning
    (threshold 0.5, no post-processing), the per-patient Dice agree to 1e-4."""
    cv_dir = killed_cv["cv_dir"]
    with open(cv_dir / "per_patient.csv", newline="") as f:
        cv_rows = {r["patient_id"]: r for r in csv.DictReader(f)}
    seen = 0
    for k in range(3):
        r = run_cli(
            [
                "--quiet", "eval", cv_dir / f"fold_{k}" / "last.safetensors", phantoms,
                "--split", cv_dir / "split.yaml", "--fold", str(k), "--threshold", "0.5",
                "--min-size", "0", "--no-largest", "--device", "cpu", "--json",
                "--project", tmp_path, "--name", f"fold{k}",
            ]
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with open(Path(json.loads(r.stdout)["run_dir"]) / "per_patient.csv", newline="") as f:
            for row in csv.DictReader(f):
                mine = cv_rows[row["patient_id"]]
                assert int(mine["fold"]) == k
                assert float(row["dice"]) == pytest.approx(float(mine["dice_before"]), abs=1e-4)
                seen += 1
    assert seen == len(cv_rows)


def test_cv_takes_every_training_option_of_train(tmp_path: Path) -> None:
    """`brainseg cv` offers every option of `brainseg train` (issue 23: --decoder-channels was
    refused), except those cv chooses per fold; its values reach the fold config."""
    import typer.main

    from brainseg.cli.app import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    per_fold = {"--fold", "--exist-ok"}  # and --split, --project, --name, --resume: cv's own

    def options(cmd: Any) -> set[str]:
        return {o for p in cmd.params if p.param_type_name == "option" for o in p.opts}

    missing = options(commands["train"]) - options(commands["cv"]) - per_fold
    assert not missing
    r = run_cli(["cv", "--help"])
    assert "--decoder-channels" in r.stdout and "--weight-decay" in r.stdout
    r = run_cli(["cv", tmp_path, "--decoder-channels", "8,8,8", "--project", tmp_path / "runs"])
    assert r.returncode == 2, r.stderr
    assert "decoder_channels must be 5 integers" in r.stderr  # parsed, then validated
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cv_trains_every_fold_with_a_train_only_option(tmp_path: Path) -> None:
    """End to end: `brainseg cv --decoder-channels` (refused before issue 23) trains folds of
    that width (the checkpoints' architecture says so)."""
    from brainseg.data.synthetic import write_synthetic
    from brainseg.model.checkpoint import read_metadata

    data = write_synthetic(tmp_path / "d", patients=4, seed=0, size=32, slices=(4, 5))
    r = run_cli(["-q", "cv", data, "--folds", "2", "--epochs", "1", "--steps-per-epoch", "1",
                 "--image-size", "32", "--batch-size", "4", "--encoder-weights", "none",
                 "--decoder-channels", "8,8,8,8,8", "--device", "cpu",
                 "--project", tmp_path / "runs"], timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for k in range(2):
        meta = read_metadata(tmp_path / "runs" / "exp" / f"fold_{k}" / "last.safetensors")
        assert meta["architecture"]["decoder_channels"] == [8, 8, 8, 8, 8]


def test_cv_shows_each_trained_folds_final_table(tmp_path: Path) -> None:
    """issue 23: the fold tables moved from the training loop to the train command's render
    (CVOptions.show_fold); `brainseg cv` still shows the best epoch of each fold it trains."""
    from brainseg.data.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "d", patients=4, seed=0, size=32, slices=(4, 5))
    r = run_cli(["cv", data, "--folds", "2", "--epochs", "1", "--steps-per-epoch", "1",
                 "--image-size", "32", "--batch-size", "4", "--encoder-weights", "none",
                 "--decoder-channels", "8,8,8,8,8", "--device", "cpu",
                 "--project", tmp_path / "runs"], timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("best epoch 1 of 1") == 2, r.stdout
