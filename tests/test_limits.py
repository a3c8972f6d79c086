"""Input limits (issue 22): predict's read-ahead is bounded by bytes, NIfTI volumes by voxels,
damaged or out-of-range volumes are errors. Each test failed before its fix."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tiny import tiny_onnx
from PIL import Image

from brainseg import batch, imageio


def _live_images(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the decoded images alive at once (load_image's arrays, until garbage)."""
    count = {"live": 0, "max": 0}
    lock = threading.Lock()
    real = imageio.load_image

    def dead() -> None:
        with lock:
            count["live"] -= 1

    def load(path: Any) -> imageio.LoadedImage:
        loaded = real(path)
        with lock:
            count["live"] += 1
            count["max"] = max(count["max"], count["live"])
        weakref.finalize(loaded.array, dead)
        return loaded

    monkeypatch.setattr(imageio, "load_image", load)
    return count


def test_predict_read_ahead_is_bounded_by_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 22: read-ahead held 2 x batch + workers images whatever their size (six 16000 x
    16000 TIFFs: 11.6 GB). With a budget of one image, at most a few are alive at once
    (before: all 24, the whole folder)."""
    from brainseg import predict as P

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(24):
        Image.fromarray(np.full((1000, 1000, 3), i, np.uint8)).save(scans / f"s{i:02d}.png")
    one = imageio.declared_size(scans / "s00.png")
    assert one is not None
    monkeypatch.setattr(batch, "READ_AHEAD_BYTES", one.nbytes + 3 * one.pixels, raising=False)
    count = _live_images(monkeypatch)
    predictor = P.Predictor([tiny_onnx(tmp_path / "m.onnx")], device="cpu", batch_size=8)
    opts = P.BatchOptions(out_dir=tmp_path / "out", threshold=0.5, workers=2)
    files = P.iter_inputs(P.InputSpec(items=[str(scans)]))
    results = list(P.predict_files(predictor, files, opts))
    assert [r.status for r in results] == ["ok"] * 24
    assert count["max"] <= 8, f"{count['max']} decoded images alive at once"
