"""The training loop on tiny phantoms (64x64, a few steps): run folder, resume, SIGINT, NaN."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from brainseg.config import TrainConfig, load_resume_config
from brainseg.data.augment import AugmentSettings, augment_batch, draw
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.train import train
from brainseg.train.data import ValData
from brainseg.train.runfiles import METRICS_COLUMNS
from brainseg.train.validation import validate

TINY = [
    "--image-size",
    "64",
    "--encoder-weights",
    "none",
    "--decoder-channels",
    "32,32,16,16,8",
    "--batch-size",
    "4",
    "--steps-per-epoch",
    "1",
    "--epochs",
    "1",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 phantom patients of 8-10 slices (64x64) and a 3/1 patient split."""
    from brainseg.data.split import make_split, save_split
    from brainseg.data.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("tiny")
    root = write_synthetic(d, patients=4, seed=3, size=64, slices=(8, 10))
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    split = make_split({p: 1.0 for p in ids}, val_fraction=0.25, seed=0)
    path = d / "splits.yaml"
    save_split(split, path)
    return root, path


def tiny_cfg(tiny: tuple[Path, Path], project: Path, **kw: object) -> TrainConfig:
    root, split = tiny
    values = dict(
        data=str(root),
        split=str(split),
        image_size=64,
        encoder_weights="none",
        decoder_channels=[32, 32, 16, 16, 8],
        batch_size=4,
        steps_per_epoch=1,
        epochs=1,
        project=str(project),
        quiet=True,
        preview_slices=2,
    )
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_every_file(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    import yaml

    from brainseg.model.checkpoint import load_checkpoint, read_metadata

    run = train(
        tiny_cfg(
            tiny,
            tmp_path / "runs",
            epochs=2,
            augment=True,
            scheduler="cosine",
            loss="bce+dice",
            tumor_oversample=0.5,
        )
    )
    assert run == tmp_path / "runs" / "exp"
    for name in (
        "config.yaml",
        "split.yaml",
        "metrics.csv",
        "best.safetensors",
        "last.safetensors",
        "curves.png",
        "preview.png",
    ):
        assert (run / name).is_file(), name
    for png in ("curves.png", "preview.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "split.yaml").read_bytes() == tiny[1].read_bytes()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left

    with (run / "metrics.csv").open() as f:
        assert f.readline().strip() == ",".join(METRICS_COLUMNS)
    rows = read_rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert all(np.isfinite(float(r[c])) for c in METRICS_COLUMNS)
        assert 0 <= float(r["val_dice_patient"]) <= 1 and float(r["images_per_s"]) > 0
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) <= 4e-4  # cosine decays per step

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    info = cfg["run_info"]
    for key in ("brainseg", "torch", "torchvision", "python", "device", "split_hash", "split_path"):
        assert info[key], key
    assert cfg["seed"] == 0 and cfg["loss"] == "bce+dice" and info["device"] == "cpu"
    assert Path(cfg["data"]).is_absolute()
    # the run's config.yaml is itself a valid --config file
    from brainseg.config import load_config

    assert load_config(str(run / "config.yaml")).loss == "bce+dice"

    best = max(rows, key=lambda r: float(r["val_dice_patient"]))
    _model, meta = load_checkpoint(run / "best.safetensors")
    assert meta["epoch"] == int(best["epoch"])
    assert meta["threshold"] == 0.5 and meta["image_size"] == 64
    assert meta["architecture"]["decoder_channels"] == [32, 32, 16, 16, 8]
    assert meta["split_hash"] == info["split_hash"]
    assert meta["metrics"]["val_dice_patient"] == pytest.approx(float(best["val_dice_patient"]))
    assert meta["config"]["image_size"] == 64
    last = read_metadata(run / "last.safetensors")
    assert last["epoch"] == 2 and last["train_state"]["step_in_epoch"] == 0


def test_run_folders_are_numbered(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    assert train(tiny_cfg(tiny, tmp_path)) == tmp_path / "exp"
    r = run_cli(
        ["train", tiny[0], "--split", tiny[1], *TINY, "--project", tmp_path, "--name", "exp"]
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "exp2" / "best.safetensors").is_file()
    assert "exp2" in r.stdout and "best epoch" in r.stdout  # the final table
    assert "epoch 1/1" in r.stderr  # one plain line per epoch when not a terminal
    assert train(tiny_cfg(tiny, tmp_path, exist_ok=True)) == tmp_path / "exp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp2"]


def test_resume_gives_the_same_weights_and_metrics(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from brainseg.model.checkpoint import load_tensors

    # (cosine depends on the total epochs, so a 2-epoch run cannot match the 4-epoch one)
    kw = dict(augment=True, tumor_oversample=0.5, scheduler="plateau", plateau_patience=0, seed=7)
    straight = train(tiny_cfg(tiny, tmp_path / "a", epochs=4, **kw))
    part = train(tiny_cfg(tiny, tmp_path / "b", epochs=2, **kw))
    with pytest.raises(BrainsegError, match="already trained 2 of 2"):
        train(load_resume_config(part, {}))
    resumed = train(load_resume_config(part, {"epochs": 4, "quiet": True}))
    assert resumed == part
    a = load_tensors(straight / "last.safetensors")
    b = load_tensors(part / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = read_rows(straight / "metrics.csv"), read_rows(part / "metrics.csv")
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb, strict=True):
        for c in ("epoch", "train_loss", "val_loss", "val_dice_slice", "val_dice_patient", "lr"):
            assert x[c] == y[c], (c, x, y)


def test_non_finite_loss_stops_with_step_and_hint(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    r = run_cli(
        [
            "train",
            tiny[0],
            "--split",
            tiny[1],
            *TINY,
            "--steps-per-epoch",
            "3",
            "--lr",
            "1e30",
            "--project",
            tmp_path,
        ]
    )
    assert r.returncode == 1, r.stderr
    assert "loss became" in r.stderr and "at step" in r.stderr
    assert "--amp off" in r.stderr or "lower --lr" in r.stderr
    assert not (tmp_path / "exp" / "last.safetensors").exists()  # nothing saved from NaN


def test_nan_keeps_the_last_good_checkpoint(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import brainseg.train.epoch as tr
    from brainseg.model.checkpoint import load_tensors, read_metadata

    calls = {"n": 0}
    real = tr.loss_fn

    def nan_in_epoch_2(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = real(name, logits, target)
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] == 2:  # the first training step of epoch 2
                return loss * float("nan")
        return loss

    monkeypatch.setattr(tr, "loss_fn", nan_in_epoch_2)
    with pytest.raises(BrainsegRuntimeError) as e:
        train(tiny_cfg(tiny, tmp_path, epochs=3))
    assert "at step 2 (epoch 2, step 1)" in e.value.message
    assert "last good checkpoint" in e.value.message
    last = tmp_path / "exp" / "last.safetensors"
    assert read_metadata(last)["epoch"] == 1
    assert all(
        torch.isfinite(t).all() for t in load_tensors(last).values() if t.is_floating_point()
    )


def test_sigint_saves_last_and_prints_resume(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from brainseg.model.checkpoint import load_checkpoint, read_metadata

    cmd = [
        sys.executable,
        "-m",
        "brainseg",
        "train",
        str(tiny[0]),
        "--split",
        str(tiny[1]),
        *TINY,
        "--epochs",
        "1000",
        "--project",
        str(tmp_path),
    ]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # wait for real progress, not for a fixed time
        seen.append(line)
        if line.startswith("epoch 1/1000"):
            proc.send_signal(signal.SIGINT)
            break
    _out, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    run = tmp_path / "exp"
    assert f"brainseg train --resume {run}" in err.replace("\n", "")
    _model, meta = load_checkpoint(run / "last.safetensors")
    assert meta["train_state"]["epoch"] >= 1
    # the interrupted run continues to the end
    r = run_cli(
        [
            "train",
            "--resume",
            run,
            "--epochs",
            str(read_metadata(run / "last.safetensors")["train_state"]["epoch"] + 1),
            "-q",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert len(read_rows(run / "metrics.csv")) == meta["train_state"]["epoch"] + 1


def test_split_problems_exit_2_before_training(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from brainseg.data.split import make_split, save_split

    r = run_cli(["train", tiny[0], "--split", tiny[1], *TINY, "--fold", "3", "--project", tmp_path])
    assert r.returncode == 2 and "has no cross-validation folds" in r.stderr, r.stderr
    other = tmp_path / "other.yaml"
    save_split(make_split({f"TCGA_XX_{i:04d}_20000101": 1.0 for i in range(5)}, seed=0), other)
    r = run_cli(["train", tiny[0], "--split", other, *TINY, "--project", tmp_path])
    assert r.returncode == 2 and "not in the dataset" in r.stderr, r.stderr
    folds = tmp_path / "folds.yaml"
    ids = sorted(p.name for p in tiny[0].iterdir() if p.is_dir())
    save_split(make_split({p: 1.0 for p in ids}, folds=2, seed=0), folds)
    r = run_cli(["train", tiny[0], "--split", folds, *TINY, "--fold", "2", "--project", tmp_path])
    assert r.returncode == 2 and "fold 2 is out of range" in r.stderr, r.stderr
    assert not any((tmp_path / "exp").glob("*.safetensors"))


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    run = tmp_path / "exp"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 2\n")
    r = run_cli(["train", "--resume", run, "--lr", "0.1"])
    assert r.returncode == 2 and "cannot change --lr" in r.stderr
    r = run_cli(["train", "--resume", run, "--epochs", "3"])  # --epochs may change
    assert "cannot change" not in r.stderr
    # no complete last.safetensors (a kill in its first write): the run starts over (issue 22)
    assert "no complete last.safetensors yet: training from the start" in r.stderr


# ------------------------------------------------------------------ pieces, no training
def test_validate_per_patient_dice_is_exact() -> None:
    """A fixed 'model' (FLAIR > 128) against hand-made masks: per-slice and 3D Dice."""

    class Threshold(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x[:, 1:2] > 128).float() * 20 - 10

    rng = np.random.default_rng(0)
    n, h = 7, 32
    images = np.zeros((n, 3, h, h), np.uint8)
    masks = (rng.random((n, h, h)) > 0.7).astype(np.uint8)
    images[:, 1] = (masks * 200).astype(np.uint8)
    flip = rng.random((n, h, h)) > 0.9  # prediction errors
    images[:, 1][flip] = 255 - images[:, 1][flip]
    masks[3] = 0
    images[3] = 0  # an empty slice predicted empty: Dice 1
    patient = np.array([0, 0, 2, 2, 2, 5, 5], np.int32)
    val = ValData.build(
        images, masks, patient, np.arange(n), ["a", "b", "c", "d", "e", "f"], torch.device("cpu")
    )
    cfg = TrainConfig(batch_size=3)
    got = validate(Threshold(), val, cfg, torch.device("cpu"), return_per_patient=True)
    pred = images[:, 1] > 128
    gt = masks > 0

    def dice(p: np.ndarray, g: np.ndarray) -> float:
        s = p.sum() + g.sum()
        return 1.0 if s == 0 else 2 * (p & g).sum() / s

    assert got["val_dice_slice"] == pytest.approx(np.mean([dice(pred[i], gt[i]) for i in range(n)]))
    per = {
        pid: dice(pred[patient == k], gt[patient == k]) for k, pid in ((0, "a"), (2, "c"), (5, "f"))
    }
    assert got["per_patient"] == pytest.approx(per)
    assert got["val_dice_patient"] == pytest.approx(np.mean(list(per.values())))


def test_augment_flip_is_exact_and_masks_stay_binary() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 255
    m = (torch.rand(4, 1, 32, 32, generator=g) > 0.5).float()
    u = draw(4, g)
    flip = AugmentSettings(hflip=1.0, vflip=0.0, rotate=0, scale=0, brightness=0, contrast=0)
    xa, ma = augment_batch(x, m, u, flip)
    assert torch.allclose(xa, x.flip(-1), atol=1e-3)
    assert torch.equal(ma, m.flip(-1))
    none = AugmentSettings(hflip=0, vflip=0, rotate=0, scale=0, brightness=0, contrast=0)
    xn, mn = augment_batch(x, m, u, none)
    assert torch.allclose(xn, x, atol=1e-3) and torch.equal(mn, m)
    for mode in ("nearest", "bilinear"):
        full = AugmentSettings(vflip=0.5, mask_mode=mode)
        xf, mf = augment_batch(x, m, u, full)
        assert xf.shape == x.shape and mf.shape == m.shape
        assert set(mf.unique().tolist()) <= {0.0, 1.0}
        assert float(xf.min()) >= 0 and float(xf.max()) <= 255


@pytest.mark.slow
def test_phantoms_reach_dice_above_0_8(tmp_path: Path) -> None:
    """The demo recipe (10 phantom patients, 64x64, random encoder) learns the task."""
    from brainseg.data.split import make_split, save_split
    from brainseg.data.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "data", patients=10, seed=0, size=64)
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    save_split(make_split({p: 1.0 for p in ids}, val_fraction=0.2, seed=0), tmp_path / "s.yaml")
    cfg = TrainConfig(
        data=str(root),
        split=str(tmp_path / "s.yaml"),
        image_size=64,
        encoder_weights="none",
        decoder_channels=[64, 64, 32, 32, 16],
        lr=1e-3,
        batch_size=8,
        steps_per_epoch=12,
        epochs=5,
        tumor_oversample=0.5,
        project=str(tmp_path / "runs"),
        quiet=True,
    )
    run = train(cfg)
    best = max(float(r["val_dice_patient"]) for r in read_rows(run / "metrics.csv"))
    assert best > 0.8


def test_amp_modes_resolve() -> None:
    from brainseg.devices import resolve_device
    from brainseg.train.runtime import cpu_has_native_bf16, resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(BrainsegError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ------------------------------------------------------------------ CLI reports and resume
def test_cli_run_reports_dice_at_the_training_size_and_resumes_from_the_file(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """1 step per epoch is '1 step'; Dice is labelled with the training size (epoch line and
    final table); --resume RUN/last.safetensors works and says where it resumes from."""
    r = run_cli(["train", tiny[0], "--split", tiny[1], *TINY, "--project", tmp_path])
    assert r.returncode == 0, r.stderr
    assert "1 step of 4 per epoch" in r.stderr and "1 steps" not in r.stderr, r.stderr
    epoch_lines = [x for x in r.stderr.splitlines() if x.startswith("epoch 1/1")]
    assert epoch_lines and "(at 64x64)" in epoch_lines[0], r.stderr
    assert "at the training size 64x64" in " ".join(r.stdout.split()), r.stdout
    run = tmp_path / "exp"
    resumed = run_cli(["train", "--resume", run / "last.safetensors", "--epochs", "2"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from the start of epoch 2" in resumed.stderr, resumed.stderr
    assert "1 epoch and 1 step done" in resumed.stderr, resumed.stderr
    assert [r["epoch"] for r in read_rows(run / "metrics.csv")] == ["1", "2"]
    best = run_cli(["train", "--resume", run / "best.safetensors", "--epochs", "3"])
    assert best.returncode == 2, best.stderr
    assert "takes a run folder" in best.stderr and f"--resume {run}" in best.stderr


def test_curves_label_epochs_as_whole_numbers() -> None:
    from brainseg.train.runfiles import curves_figure

    rows = [
        {"epoch": e, "train_loss": 0.5, "val_loss": 0.4, "val_dice_slice": 0.6,
         "val_dice_patient": 0.7}
        for e in (1, 2)
    ]  # fmt: skip
    fig = curves_figure(rows, 64)
    fig.canvas.draw()
    for ax in fig.axes:
        labels = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels()]
        assert labels and all(t.lstrip("-").isdigit() for t in labels if t), labels
    assert "64x64" in fig.axes[1].get_ylabel()


def test_train_help_takes_defaults_and_flags_from_the_config(tmp_path: Path) -> None:
    """Every option's '(default: ...)' is TrainConfig's default; flags show no <bool> value."""
    from dataclasses import fields

    r = run_cli(["train", "--help"], env={"COLUMNS": "300"})
    assert r.returncode == 0
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.strip("│ ").startswith("--")}
    cfg = TrainConfig()
    for name in ("epochs", "batch_size", "image_size", "seed", "name", "workers"):
        assert f"(default: {getattr(cfg, name)})" in lines["--" + name.replace("_", "-")], name
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" and flag in lines:
            assert "<bool>" not in lines[flag], lines[flag]


@pytest.mark.parametrize(
    "extra",
    [["--channels-last", "--amp", "bf16"], ["--amp", "fp16", "--no-channels-last"]],
    ids=["channels-last-bf16", "fp16"],
)
def test_speed_options_through_the_cli(
    tiny: tuple[Path, Path], tmp_path: Path, extra: list[str]
) -> None:
    import yaml

    r = run_cli(["-q", "train", tiny[0], "--split", tiny[1], *TINY, *extra, "--project", tmp_path])
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())
    amp = extra[extra.index("--amp") + 1]
    assert cfg["run_info"]["amp"] == amp and cfg["amp"] == amp
    assert cfg["channels_last"] is ("--channels-last" in extra)
    rows = read_rows(tmp_path / "exp" / "metrics.csv")
    assert len(rows) == 1 and all(np.isfinite(float(rows[0][c])) for c in METRICS_COLUMNS)


def _inductor_missing() -> str:
    """Why torch.compile cannot run here ('' when it can): it needs a C++ compiler."""
    import shutil

    return "" if shutil.which("g++") or shutil.which("c++") else "no C++ compiler for inductor"


@pytest.mark.slow
@pytest.mark.skipif(bool(_inductor_missing()), reason=_inductor_missing() or "-")
def test_compile_through_the_cli_matches_eager(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """--compile trains the same model: its first epoch's losses are close to eager's."""
    args = ["-q", "train", tiny[0], "--split", tiny[1], *TINY, "--amp", "off"]
    eager = run_cli([*args, "--project", tmp_path / "eager"])
    compiled = run_cli([*args, "--compile", "--project", tmp_path / "compiled"])
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    a = read_rows(tmp_path / "eager" / "exp" / "metrics.csv")[0]
    b = read_rows(tmp_path / "compiled" / "exp" / "metrics.csv")[0]
    for c in ("train_loss", "val_loss"):
        assert float(b[c]) == pytest.approx(float(a[c]), rel=1e-3, abs=1e-4), c


def test_help_names_every_file_a_run_writes_and_the_report_no_fold_none(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """`train --help` lists each file of a finished run folder (report.html too); the report
    of a single split (no folds) does not say "fold None"."""
    run = train(tiny_cfg(tiny, tmp_path / "runs"))
    written = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert "report.html" in written
    r = run_cli(["train", "--help"], env={"COLUMNS": "300"})
    assert r.returncode == 0
    described = " ".join(r.stdout.split())
    assert [n for n in written if n not in described] == []
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "fold None" not in html and f"slices of {tiny[1].resolve()}" in html
