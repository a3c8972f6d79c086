"""Predict on a cluster (issue 25): ``--shard auto`` in SLURM job arrays, ``--merge OUT``.

The SLURM variables are set as sbatch --array sets them in each task; every task is a real
predict run of a tiny ONNX model, then ``brainseg predict --merge`` combines the shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from _tiny import tiny_onnx
from _volkit import blob_volume, csv_rows, save_nifti

SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")


@pytest.fixture
def run(vol_run: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k in (*SLURM, "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(k, raising=False)  # a test run inside a SLURM job is outside it
    return vol_run


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "tiny.onnx", image_size=64)


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """7 small scans in nested folders (sorted order: the order shards count in)."""
    rng = np.random.default_rng(0)
    for k in range(7):
        img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        img[10 + k : 30 + k, 20:40, 1] = 230
        folder = tmp_path / "scans" / f"p{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"s{k}.tif", img)
    return tmp_path / "scans"


def _array_task(monkeypatch: pytest.MonkeyPatch, task: int, count: int, low: int = 0) -> None:
    """The variables SLURM sets in task ``task`` of ``sbatch --array=low-(low+count-1)``."""
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(count))
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", str(low))
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", str(low + count - 1))


def _sorted_inputs(scans: Path) -> list[str]:
    return sorted(str(p) for p in scans.rglob("*.tif"))


def test_shard_auto_in_a_slurm_array_splits_the_files_and_merge_gives_one_summary(
    run, monkeypatch, tiny, scans, tmp_path
) -> None:
    # the reference: one unsharded run
    r = run(["predict", tiny, scans, "-o", tmp_path / "ref"])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    every = _sorted_inputs(scans)
    seen: dict[int, list[str]] = {}
    for task in (3, 4, 5):  # sbatch --array=3-5: I = task - 3, N = 3
        _array_task(monkeypatch, task, 3, low=3)
        r = run(["predict", tiny, scans, "-o", out, "--shard", "auto", "--json"])
        assert r.returncode == 0, r.stderr
        i = task - 3
        assert f"--shard auto: shard {i}/3" in r.stderr
        seen[i] = [json.loads(ln)["path"] for ln in r.stdout.splitlines()]
        assert seen[i] == every[i::3]  # the rule of --shard I/N, in the sorted order
        assert (out / f"summary-{i}-of-3.csv").is_file()
    union = [p for paths in seen.values() for p in paths]
    assert sorted(union) == every and len(set(union)) == len(union)
    assert not (out / "summary.csv").exists()

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")  # the merge job is no array task
    r = run(["predict", "--merge", out])
    assert r.returncode == 0, r.stderr
    assert "merge: 3 of 3 shard(s), 7 row(s)" in r.stdout
    # one summary, byte for byte the one of the unsharded run (the same rows, same order)
    ref = (tmp_path / "ref" / "summary.csv").read_bytes().replace(b"/ref/", b"/out/")
    assert (out / "summary.csv").read_bytes() == ref


def test_merge_reports_a_missing_shard_and_failed_rows(run, tiny, scans, tmp_path) -> None:
    out = tmp_path / "out"
    (scans / "p0" / "broken.tif").write_bytes(b"not a tiff")
    for i in (0, 2, 3):  # shard 1 of 4 never ran (a task killed before its summary)
        r = run(["predict", tiny, scans, "-o", out, "--shard", f"{i}/4"])
        assert r.returncode in (0, 1), r.stderr
    r = run(["predict", "--merge", out, "--json"])
    assert r.returncode == 1
    got = json.loads(r.stdout)
    assert got["missing_shards"] == [1] and got["shards"] == 4
    failed = [row for row in csv_rows(out / "summary.csv") if row["status"] == "error"]
    assert [Path(row["path"]).name for row in failed] == ["broken.tif"]
    assert got["failed_rows"] == 1 and len(got["failed_shards"]) == 1
    assert got["rows"] == len(csv_rows(out / "summary.csv")) == 8 - 2  # shard 1 had 2 files
    r = run(["predict", "--merge", out])
    assert r.returncode == 1
    assert "1 of 4 shard(s) have no summary: 1/4" in r.stderr
    assert "1 row(s) failed in 1 shard(s)" in r.stderr
    # the missing shard runs: the merge is complete, only the failed row remains
    assert run(["predict", tiny, scans, "-o", out, "--shard", "1/4"]).returncode == 0
    r = run(["predict", "--merge", out])
    assert r.returncode == 1 and "have no summary" not in r.stderr and "1 row(s) failed" in r.stderr


def test_an_empty_shard_leaves_an_empty_summary_so_merge_sees_it_ran(run, tiny, scans, tmp_path):
    out = tmp_path / "out"
    for i in range(9):  # 7 files, 9 shards: shards 7 and 8 get nothing
        r = run(["predict", tiny, scans, "-o", out, "--shard", f"{i}/9"])
        assert r.returncode == 0, r.stderr
    assert csv_rows(out / "summary-8-of-9.csv") == []
    r = run(["predict", "--merge", out])
    assert r.returncode == 0, r.stderr
    assert len(csv_rows(out / "summary.csv")) == 7


def test_shard_auto_outside_slurm_means_no_sharding(run, tiny, scans, tmp_path) -> None:
    r = run(["predict", tiny, scans, "-o", tmp_path / "out", "--shard", "auto"])
    assert r.returncode == 0, r.stderr
    assert "not in a SLURM job array" in r.stderr and "no sharding" in r.stderr
    assert len(csv_rows(tmp_path / "out" / "summary.csv")) == 7


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN not set"),
        (
            {
                "SLURM_ARRAY_TASK_ID": "x",
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
            "SLURM_ARRAY_TASK_ID='x' is not a whole number",
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
            "gives shard 5/2, outside 0 <= I < N",
        ),
        (  # sbatch --array=0-6:2 -> ids 0 2 4 6: not consecutive
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "6",
            },
            "task ids 0..6 are not 4 consecutive numbers",
        ),
    ],
)
def test_inconsistent_slurm_variables_are_one_line_exit_2(
    run, monkeypatch, tiny, scans, tmp_path, env, words
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = run(["predict", tiny, scans, "-o", tmp_path / "out", "--shard", "auto"])
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_volume_cases_shard_auto_and_merge(run, monkeypatch, tiny, tmp_path) -> None:
    pytest.importorskip("nibabel")
    src = tmp_path / "cases"
    for i in range(3):
        save_nifti(src / f"c{i}.nii.gz", blob_volume(i))
    assert run(["predict", tiny, src, "-o", tmp_path / "ref"]).returncode == 0
    out = tmp_path / "out"
    cases: list[str] = []
    for task in (0, 1):  # sbatch --array=0-1
        _array_task(monkeypatch, task, 2)
        r = run(["predict", tiny, src, "-o", out, "--shard", "auto"])
        assert r.returncode == 0, r.stderr
        mine = [row["case"] for row in csv_rows(out / f"summary-{task}-of-2.csv")]
        assert mine == ["c0", "c1", "c2"][task::2]
        cases += mine
    assert sorted(cases) == ["c0", "c1", "c2"]
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == [
        f"c{i}_mask.nii.gz" for i in range(3)
    ]
    r = run(["predict", "--merge", out])
    assert r.returncode == 0, r.stderr
    ref = (tmp_path / "ref" / "summary.csv").read_bytes().replace(b"/ref/", b"/out/")
    assert (out / "summary.csv").read_bytes() == ref


def test_merge_refuses_what_it_does_not_take(run, tiny, tmp_path) -> None:
    (tmp_path / "o").mkdir()
    for args, words in [
        (["--merge", tmp_path / "o"], "no shard summaries"),
        (["--merge", tmp_path / "nope"], "no such folder"),
        (["--merge", tmp_path / "o", tiny], "also given: MODEL/INPUT"),
        (["--merge", tmp_path / "o", "--force"], "also given: --force"),
    ]:
        r = run(["predict", *args])
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
    (tmp_path / "o" / "summary-0-of-2.csv").write_text("path,status\n")
    (tmp_path / "o" / "summary-0-of-3.csv").write_text("path,status\n")
    r = run(["predict", "--merge", tmp_path / "o"])
    assert r.returncode == 2 and "shard summaries of different runs" in r.stderr
