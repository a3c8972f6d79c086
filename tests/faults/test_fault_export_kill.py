"""``brainseg export`` killed with SIGKILL part way: its temporary folder (the fp32 graph,
phantoms, up to 155 MB) sits next to the output under a ``.NAME.~HOST@PID.XXXXXXXX.tmp`` name,
and the next export into that folder removes it. Export never prints that internal path.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from test_fault_diskfull import litter, run_faulty

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

    torch.manual_seed(0)
    model = UNetVGG16(encoder_weights=None, decoder_channels=(8, 8, 8, 8, 8)).eval()
    dest = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    return save_checkpoint(dest, model, {"image_size": 64, "threshold": 0.5})


def _hidden_paths(text: str) -> list[str]:
    """Hidden names (``.x...``) at the start of a path or after a ``/`` in ``text``."""
    return re.findall(r"(?:^|[\s/])(\.[A-Za-z0-9_~-][^\s]*)", text)


@pytest.mark.slow
def test_killed_export_leaves_a_temporary_the_next_export_removes(
    ckpt: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"  # the working folder, -o a plain file name in it
    work.mkdir()
    argv = ["export", ckpt, "-o", "model.onnx"]
    kill = {"when": "call", "target": "brainseg.export.verify.load_slices", "nth": 1}
    r = run_faulty(argv, {"kill": [kill]}, cwd=work)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p.name for p in work.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.onnx.~"), left  # the killed run's
    r = run_faulty(argv, {}, cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx"]
    assert litter(work) == []
    assert _hidden_paths(r.stderr + r.stdout) == [], r.stderr
