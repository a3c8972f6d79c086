"""`brainseg cv --fold K` (issue 25): folds as independent jobs in one cv folder, collected by
`brainseg cv --resume DIR` once every fold is done; the result equals a sequential cv.

Two fold jobs are started at once (as a SLURM array starts them): they must make one cv
folder between them, not exp and exp2, and train their folds side by side.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_cli, start_cli

RECIPE = [
    "--epochs", "1", "--steps-per-epoch", "1", "--image-size", "32", "--batch-size", "4",
    "--encoder-weights", "none", "--set", "decoder_channels=8,8,8,8,8", "--device", "cpu",
    "--seed", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 phantom patients (64x64, 8-10 slices) and a 2-fold split of them."""
    from brainseg.data.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("cvfolds")
    root = write_synthetic(d, patients=4, seed=3, size=64, slices=(8, 10))
    r = run_cli(["split", root, "--folds", "2", "-o", d / "folds.yaml"])
    assert r.returncode == 0, r.stderr
    return root, d / "folds.yaml"


def _per_patient(cv_dir: Path) -> list[dict[str, str]]:
    with (cv_dir / "per_patient.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_fold_jobs_at_once_then_collect_equal_the_sequential_cv(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    root, folds = data
    seq = run_cli(["cv", root, "--split", folds, *RECIPE, "--project", tmp_path / "seq"])
    assert seq.returncode == 0, seq.stderr

    project = tmp_path / "jobs"
    base = ["cv", root, "--split", folds, *RECIPE, "--project", project, "--json"]
    one_thread = {"OMP_NUM_THREADS": "1"}
    jobs = [start_cli([*base, "--fold", str(k)], env=one_thread) for k in (0, 1)]  # both at once
    done = [p.communicate(timeout=600) for p in jobs]
    for p, (_out, err) in zip(jobs, done, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert [p.name for p in project.iterdir() if p.is_dir()] == ["exp"]  # one cv folder
    got = sorted((json.loads(out)["fold"], json.loads(out)["status"]) for out, _ in done)
    assert got == [(0, "trained"), (1, "trained")]
    cv_dir = project / "exp"
    assert not (cv_dir / "cv_summary.json").exists()  # a fold job does not summarise

    r = run_cli(["cv", "--resume", cv_dir])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("finished earlier") == 2  # collected, nothing retrained
    # the same folds, seeds and settings: the sequential cv's per-patient result exactly
    assert _per_patient(cv_dir) == _per_patient(tmp_path / "seq" / "exp")
    a = json.loads((cv_dir / "cv_summary.json").read_text())
    b = json.loads((tmp_path / "seq" / "exp" / "cv_summary.json").read_text())
    assert a["after"]["per_patient_dice"] == b["after"]["per_patient_dice"]


@pytest.mark.slow
def test_collect_names_the_missing_folds_and_trains_nothing(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    root, folds = data
    project = tmp_path / "jobs"
    r = run_cli(["cv", root, "--split", folds, *RECIPE, "--project", project, "--fold", "1"])
    assert r.returncode == 0, r.stderr
    assert "once every fold is done: brainseg cv --resume" in r.stderr
    cv_dir = project / "exp"
    assert not (cv_dir / "fold_0").exists()
    r = run_cli(["cv", "--resume", cv_dir])
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "fold(s) 0 of 2 not finished yet" in errors[0], r.stderr
    assert not (cv_dir / "fold_0").exists() and not (cv_dir / "cv_summary.json").exists()
    # the same command as the job (not --resume) collects too: it never trains fold 0 here
    r = run_cli(["cv", root, "--split", folds, *RECIPE, "--project", project])
    assert r.returncode == 1 and "fold(s) 0 of 2 not finished yet" in r.stderr
    r = run_cli(["cv", "--resume", cv_dir, "--fold", "2"])
    assert r.returncode == 2 and "has folds 0 to 1" in r.stderr
