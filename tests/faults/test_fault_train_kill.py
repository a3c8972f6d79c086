"""Training killed with SIGKILL at exact points (in a step, in the middle of writing
last.safetensors, right after it): last.safetensors always loads, ``brainseg train --resume``
continues, and the finished run equals an uninterrupted one (same seed, CPU): the same
metrics.csv (but the timings) and bit-identical last/best weights.

The kill points are deterministic (faultkit hooks, no timing); one more test kills from the
outside while faultkit holds the process with a complete temporary checkpoint not yet renamed,
as a user or the OOM killer would. SIGTERM and a double Ctrl-C are sent at an exact step.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faultkit
import pytest
from conftest import run_cli
from test_fault_diskfull import litter, run_faulty

pytestmark = pytest.mark.faults

EPOCHS = 2
STEPS = 2
RECIPE = [
    "--image-size", "64", "--encoder-weights", "none", "--decoder-channels", "8,8,8,8,8",
    "--batch-size", "4", "--steps-per-epoch", str(STEPS), "--epochs", str(EPOCHS),
    "--seed", "3",
]  # fmt: skip
COMPARED = ("epoch", "train_loss", "val_loss", "val_dice_slice", "val_dice_patient", "lr")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 phantom patients (64x64) and a 3/1 split."""
    from brainseg.data.split import make_split, save_split
    from brainseg.data.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("tiny")
    root = write_synthetic(d, patients=4, seed=3, size=64, slices=(8, 10))
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    path = save_split(make_split(dict.fromkeys(ids, 1.0), val_fraction=0.25, seed=0), d / "s.yaml")
    return root, path


def train_args(tiny: tuple[Path, Path], project: Path) -> list[Any]:
    return ["-q", "train", tiny[0], "--split", tiny[1], *RECIPE, "--project", project]


@pytest.fixture(scope="module")
def reference(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every killed-and-resumed run must equal."""
    project = tmp_path_factory.mktemp("reference")
    r = run_faulty(train_args(tiny, project), {})
    assert r.returncode == 0, r.stderr
    return project / "exp"


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


def assert_same_run(run: Path, reference: Path) -> None:
    from brainseg.model.checkpoint import load_tensors

    assert rows(run) == rows(reference)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_tensors(run / name), load_tensors(reference / name)
        assert a.keys() == b.keys(), name
        assert all(a[k].equal(b[k]) for k in a), name


def resume_and_check(run: Path, reference: Path) -> subprocess.CompletedProcess[str]:
    """Whatever the kill left (no checkpoint yet, a half-written one, a finished run without
    its report), ``brainseg train --resume`` completes the run: exit 0, equal to an
    uninterrupted run, report.html written, no temporary file left."""
    from brainseg.model.checkpoint import load_checkpoint

    if (run / "last.safetensors").exists():  # it always loads
        _model, meta = load_checkpoint(run / "last.safetensors")
        assert meta["train_state"]["epoch"] >= 1
    r = run_cli(["train", "--resume", run])
    assert r.returncode == 0, r.stderr
    assert_same_run(run, reference)
    assert (run / "report.html").is_file()
    assert litter(run) == []
    return r


#: Where the loop looks each hooked function up (a step calls epoch.lr_at once; an epoch
#: ends with one validation.validate).
TARGETS = {"lr_at": "brainseg.train.epoch.lr_at", "validate": "brainseg.train.validation.validate"}


def call(target: str, nth: int) -> dict[str, Any]:
    return {"when": "call", "target": TARGETS[target], "nth": nth}


def before(name: str, nth: int) -> dict[str, Any]:
    return {"when": "before_rename", "name": name, "nth": nth}


def after(name: str, nth: int) -> dict[str, Any]:
    return {"when": "after_rename", "name": name, "nth": nth}


#: (label, faultkit kill point). lr_at runs once per step (2 per epoch); metrics.csv is
#: written once at the start and once per epoch. Each is a short tiny run plus its resume.
KILLS = [
    ("in step 1 of epoch 2", call("lr_at", 3)),
    ("mid-write of last (epoch 2)", before("last.safetensors", 2)),
    ("after last, before metrics (epoch 1)", after("last.safetensors", 1)),
    ("in step 1 of epoch 1", call("lr_at", 1)),
    ("in step 2 of epoch 2", call("lr_at", 4)),
    ("in validation (epoch 2)", call("validate", 2)),
    ("mid-write of last (epoch 1)", before("last.safetensors", 1)),
    ("mid-write of best (epoch 1)", before("best.safetensors", 1)),
    ("after best (epoch 1)", after("best.safetensors", 1)),
    ("after last (epoch 2)", after("last.safetensors", 2)),
    ("mid-write of metrics (epoch 1)", before("metrics.csv", 2)),
    ("after metrics (epoch 1)", after("metrics.csv", 2)),
    ("mid-write of curves (epoch 1)", before("curves.png", 1)),
]


def _kill_and_resume(
    tiny: tuple[Path, Path], reference: Path, tmp_path: Path, point: dict[str, Any]
) -> None:
    r = run_faulty(train_args(tiny, tmp_path), {"kill": [point]})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    resume_and_check(tmp_path / "exp", reference)


@pytest.mark.slow
@pytest.mark.parametrize("label,point", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_then_resume_equals_an_uninterrupted_run(
    tiny: tuple[Path, Path], reference: Path, tmp_path: Path, label: str, point: dict[str, Any]
) -> None:
    _kill_and_resume(tiny, reference, tmp_path, point)


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the paused process has written ``path`` (it then sleeps until killed)."""
    while not path.exists():
        assert proc.poll() is None, "the run ended before it reached the kill point"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("nth", [1, 2])
def test_sigkill_from_outside_while_the_checkpoint_is_written(
    tiny: tuple[Path, Path], reference: Path, tmp_path: Path, nth: int
) -> None:
    """A real asynchronous SIGKILL while the n-th last.safetensors is complete under its
    temporary name but not yet renamed (faultkit holds the process there)."""
    marker = tmp_path / "paused"
    env = {
        **os.environ,
        "BRAINSEG_FAULTS": json.dumps(
            {"pause": {"name": "last.safetensors", "nth": nth, "marker": str(marker)}}
        ),
    }
    cmd = [sys.executable, str(faultkit.SCRIPT), *map(str, train_args(tiny, tmp_path))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(marker, proc)
        temp = Path(marker.read_text())
        assert temp.is_file() and temp.name.startswith(".last.safetensors.")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    run = tmp_path / "exp"
    if nth == 1:
        assert not (run / "last.safetensors").exists()
    else:  # the previous epoch's file is what is on disk
        from brainseg.model.checkpoint import read_metadata

        assert read_metadata(run / "last.safetensors")["train_state"]["epoch"] == nth - 1
    resume_and_check(run, reference)


@pytest.mark.slow
def test_disk_full_while_saving_last_keeps_the_previous_one(
    tiny: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    full = {"enospc": {"name": ".last.safetensors.*.tmp", "budget": 0, "skip": 1}}
    r = run_faulty(train_args(tiny, tmp_path), full)
    assert r.returncode == 1 and "disk full while writing" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    resume_and_check(tmp_path / "exp", reference)


# --------------------------------------------------------------------------- signals


def test_sigterm_mid_epoch_saves_exits_130_and_resumes_to_the_same_run(
    tiny: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    """SIGTERM (a scheduler's time limit) in step 1 of epoch 2: that step finishes, the
    position in the epoch is saved, exit 130; the resumed run equals an uninterrupted one."""
    from brainseg.model.checkpoint import read_metadata

    point = {"target": TARGETS["lr_at"], "nth": 3, "signals": ["SIGTERM"]}
    r = run_faulty(train_args(tiny, tmp_path), {"signal": [point]})
    assert r.returncode == 130, r.stderr
    run = tmp_path / "exp"
    assert f"interrupted at epoch 2 step 1/{STEPS}" in r.stderr, r.stderr
    assert f"brainseg train --resume {run}" in r.stderr.replace("\n", "")
    state = read_metadata(run / "last.safetensors")["train_state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 3)
    resumed = run_cli(["train", "--resume", run])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from epoch 2, step 2 of {STEPS}" in resumed.stderr, resumed.stderr
    assert_same_run(run, reference)
    assert litter(run) == []


@pytest.mark.slow
def test_kill_mid_write_of_the_first_checkpoint_then_resume_starts_over(
    tiny: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    """Epoch 1 is in metrics.csv, last.safetensors is a half-written temporary: --resume
    trains from the start in the same folder (nothing complete to continue from)."""
    r = run_faulty(train_args(tiny, tmp_path), {"kill": [before("last.safetensors", 1)]})
    assert r.returncode == -signal.SIGKILL, r.stderr
    run = tmp_path / "exp"
    assert [row["epoch"] for row in rows(run)] == ["1"]
    assert not (run / "last.safetensors").exists() and litter(run) != []
    resumed = resume_and_check(run, reference)
    assert "no complete last.safetensors" in resumed.stderr, resumed.stderr


@pytest.mark.slow
def test_kill_after_the_final_checkpoint_then_resume_finishes_the_run(
    tiny: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    """Killed after the last epoch's last.safetensors, before report.html: --resume writes
    what the folder lacks and exits 0; once complete, --resume says it is done."""
    r = run_faulty(train_args(tiny, tmp_path), {"kill": [after("last.safetensors", EPOCHS)]})
    assert r.returncode == -signal.SIGKILL, r.stderr
    run = tmp_path / "exp"
    assert not (run / "report.html").exists()
    resumed = resume_and_check(run, reference)
    assert f"all {EPOCHS} epochs were trained" in resumed.stderr, resumed.stderr
    again = run_cli(["train", "--resume", run])
    assert again.returncode == 2 and f"already trained {EPOCHS} of {EPOCHS}" in again.stderr


def test_a_second_ctrl_c_aborts_at_once(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Two SIGINTs in step 1 of epoch 2: no step finishes, nothing is saved, exit 130."""
    from brainseg.model.checkpoint import read_metadata

    point = {"target": TARGETS["lr_at"], "nth": 3, "signals": ["SIGINT", "SIGINT"]}
    r = run_faulty(train_args(tiny, tmp_path), {"signal": [point]})
    assert r.returncode == 130, r.stderr
    assert "stopping after the current step" in r.stderr  # the first Ctrl-C was seen
    assert "error: interrupted" in r.stderr  # the second one, in the house style
    assert "interrupted at epoch" not in r.stderr and "saved" not in r.stderr, r.stderr
    state = read_metadata(tmp_path / "exp" / "last.safetensors")["train_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # epoch 1's file, untouched


def test_faultkit_kills_where_it_is_told(tmp_path: Path) -> None:
    """The injector itself: a kill before a rename leaves a half temp file and no final file."""
    code = (
        "import sys; sys.path.insert(0, {d!r}); import faultkit;"
        "faultkit.install({{'kill': [{{'when': 'before_rename', 'name': 'x.bin', 'nth': 2}}]}});"
        "from brainseg.fsutil import atomic_write_bytes as w;"
        "w({p!r}, b'1' * 100); w({p!r}, b'2' * 100)"
    ).format(d=str(faultkit.SCRIPT.parent), p=str(tmp_path / "x.bin"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert (tmp_path / "x.bin").read_bytes() == b"1" * 100
    temps = list(tmp_path.glob(".x.bin.*.tmp"))
    assert len(temps) == 1 and temps[0].read_bytes() == b"2" * 50
