"""torchrun with 2 CPU processes (gloo): one run folder, exact all-reduced validation metrics,
identical weights on both ranks, files and log lines from rank 0 only."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from brainseg.config import TrainConfig
from brainseg.train.data import ValData
from brainseg.train.validation import validate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 phantom patients of 8-10 slices (64x64) and a 2/2 patient split."""
    from brainseg.data.split import make_split, save_split
    from brainseg.data.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("tinyddp")
    root = write_synthetic(d, patients=4, seed=5, size=64, slices=(8, 10))
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    path = d / "splits.yaml"
    save_split(make_split({p: 1.0 for p in ids}, val_fraction=0.5, seed=0), path)
    return root, path


def test_two_gloo_processes_train_and_log_exact_metrics(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from brainseg.data.cache import load_dataset
    from brainseg.data.split import load_split
    from brainseg.model.checkpoint import load_checkpoint

    root, split = tiny
    project = tmp_path / "runs"
    hashes, logs, work = tmp_path / "hashes", tmp_path / "logs", tmp_path / "work"
    for d in (hashes, work):
        d.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun's launcher itself
        "--standalone",
        "--nproc-per-node",
        "2",
        "--log-dir",
        str(logs),
        "--tee",
        "3",  # each rank's stdout and stderr also into its own file under --log-dir
        str(Path(__file__).with_name("_ddp_entry.py")),  # brainseg's CLI + a weights hash
        "train",
        str(root),
        "--split",
        str(split),
        "--image-size",
        "64",
        "--encoder-weights",
        "none",
        "--decoder-channels",
        "32,32,16,16,8",
        "--batch-size",
        "4",
        "--steps-per-epoch",
        "2",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--amp",
        "off",  # fp32, like the re-evaluation below
        "--project",
        str(project),
    ]
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "BRAINSEG_TEST_WEIGHTS_DIR": str(hashes),
    }
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in project.iterdir()] == ["exp"]  # rank 0 alone writes
    assert list(work.iterdir()) == []  # and nothing lands in the working directory
    # both ranks end with bit-identical weights (parameters and BatchNorm buffers)
    got = {p.name: p.read_text() for p in hashes.iterdir()}
    assert sorted(got) == ["rank0.sha256", "rank1.sha256"]
    assert got["rank0.sha256"] == got["rank1.sha256"]
    # only rank 0 logs: rank 1's own stdout/stderr (torchrun --tee files) hold no line of
    # progress, epochs or results; rank 0's hold them
    streams = {
        (p.parent.name, p.name): p.read_text()
        for p in logs.rglob("*.log")
        if p.parent.name in ("0", "1")
    }
    assert set(streams) == {(r, f) for r in "01" for f in ("stdout.log", "stderr.log")}
    rank0 = streams["0", "stdout.log"] + streams["0", "stderr.log"]
    rank1 = streams["1", "stdout.log"] + streams["1", "stderr.log"]
    assert "epoch 1/2" in rank0 and "best epoch" in rank0, rank0[-2000:]
    assert "epoch" not in rank1 and "best" not in rank1 and "exp" not in rank1, rank1[-2000:]
    run = project / "exp"
    info = yaml.safe_load((run / "config.yaml").read_text())["run_info"]
    assert info["world_size"] == 2 and info["per_rank_batch"] == 2
    assert r.stdout.count("best epoch") == 1  # only rank 0 prints the summary
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2

    # Re-evaluate best.safetensors in this (single) process on the whole validation set.
    model, meta = load_checkpoint(run / "best.safetensors")
    logged = next(r for r in rows if int(r["epoch"]) == meta["epoch"])
    ds = load_dataset(root).resized(64)
    rows_val = ds.indices_of(load_split(split).patients("val"))
    val = ValData.build(
        ds.images[rows_val],
        ds.masks[rows_val],
        ds.patient_index[rows_val],
        ds.slice_number[rows_val],
        ds.patient_ids,
        torch.device("cpu"),
    )
    got = validate(model, val, TrainConfig(batch_size=4), torch.device("cpu"))
    # tallies are integers, summed over ranks: equal up to a pixel flipped by float rounding
    assert got["val_dice_patient"] == pytest.approx(float(logged["val_dice_patient"]), abs=1e-3)
    assert got["val_dice_slice"] == pytest.approx(float(logged["val_dice_slice"]), abs=1e-3)
    assert got["val_loss"] == pytest.approx(float(logged["val_loss"]), rel=1e-3)
