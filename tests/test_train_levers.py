"""Recipe levers of the training loop: learning-rate warm-up and an EMA of the weights."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from test_train import read_rows, tiny, tiny_cfg  # noqa: F401 (tiny is a fixture)

from brainseg.config import TrainConfig, load_resume_config
from brainseg.model.checkpoint import load_tensors
from brainseg.train import train
from brainseg.train.epoch import lr_at


def test_warmup_ramps_linearly_then_hands_over_to_the_schedule() -> None:
    cos = TrainConfig(lr=4e-4, scheduler="cosine")
    got = [lr_at(cos, s, 12, 1.0, warmup=4) for s in range(13)]
    assert got[:4] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    # the cosine then runs over the 8 remaining steps: full lr at step 4, half at 8, 0 at 12
    assert got[4] == pytest.approx(4e-4) and got[8] == pytest.approx(2e-4)
    assert got[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(got[3:]))
    flat = TrainConfig(lr=4e-4, scheduler="none")
    assert [lr_at(flat, s, 12, 1.0, warmup=2) for s in (0, 1, 2, 11)] == pytest.approx(
        [2e-4, 4e-4, 4e-4, 4e-4]
    )
    # no warm-up: the plain cosine of the whole run, as before
    assert lr_at(cos, 3, 12, 1.0) == pytest.approx(4e-4 * 0.5 * (1 + math.cos(math.pi * 3 / 12)))


def test_warmup_epochs_reach_the_loop(tiny: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    run = train(tiny_cfg(tiny, tmp_path, epochs=3, steps_per_epoch=2, warmup_epochs=2.0))
    # metrics.csv's lr is the epoch's last step: 2 of 4 warm-up steps, then the full lr
    assert [float(r["lr"]) for r in read_rows(run / "metrics.csv")] == pytest.approx(
        [2e-4, 4e-4, 4e-4]
    )


def _weights(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The float model tensors of a checkpoint (``prefix``: among its extra tensors)."""
    tensors = load_tensors(path)
    if prefix:
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("extra/")}
    return {k: v for k, v in tensors.items() if v.is_floating_point()}


def test_ema_weights_are_the_moving_average_of_the_trained_ones(
    tiny: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Runs of 1, 2, 3 steps give the trained weights w1..w3 (the EMA draws no random
    numbers); a 3-step run with ema_decay 0.5 must save 0.25 w1 + 0.25 w2 + 0.5 w3 as its
    model and w3 as its trained weights."""
    kw = dict(augment=True, seed=5)
    w = [
        _weights(train(tiny_cfg(tiny, tmp_path / f"s{n}", epochs=n, **kw)) / "last.safetensors")
        for n in (1, 2, 3)
    ]
    ema_run = train(tiny_cfg(tiny, tmp_path / "ema", epochs=3, ema_decay=0.5, **kw))
    averaged = _weights(ema_run / "last.safetensors")
    trained = _weights(ema_run / "last.safetensors", prefix="extra/train.")
    assert trained.keys() == averaged.keys() == w[2].keys()
    moved = 0
    for k, v in averaged.items():
        assert torch.equal(trained[k], w[2][k]), k
        expected = 0.25 * w[0][k] + 0.25 * w[1][k] + 0.5 * w[2][k]
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(v, w[2][k])
    assert moved > len(averaged) // 2  # the average differs from the last weights
    # best.safetensors (and validation) is the average at the best epoch too
    best = int(
        max(read_rows(ema_run / "metrics.csv"), key=lambda r: float(r["val_dice_patient"]))["epoch"]
    )
    weights_at = [[1.0], [0.5, 0.5], [0.25, 0.25, 0.5]][best - 1]
    for k, v in _weights(ema_run / "best.safetensors").items():
        expected = sum(c * w[i][k] for i, c in enumerate(weights_at))
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)


def test_ema_run_resumes_exactly(tiny: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    kw = dict(augment=True, steps_per_epoch=2, ema_decay=0.7, seed=2)
    straight = train(tiny_cfg(tiny, tmp_path / "a", epochs=3, **kw))
    part = train(tiny_cfg(tiny, tmp_path / "b", epochs=1, **kw))
    train(load_resume_config(part, {"epochs": 3, "quiet": True}))
    a, b = load_tensors(straight / "last.safetensors"), load_tensors(part / "last.safetensors")
    assert a.keys() == b.keys() and "extra/ema.n_averaged" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["extra/ema.n_averaged"]) == 6
