"""`brainseg demo`: the whole pipeline, as a new user runs it right after installing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
from conftest import run_cli


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_learns(tmp_path: Path) -> None:
    proc = run_cli(["demo", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # --json: stdout holds the summary and nothing else
    run = tmp_path / "runs" / "demo" / "exp"
    assert summary["run_dir"] == "runs/demo/exp"
    assert json.loads((run / "demo.json").read_text()) == summary

    # every stage left its product where the paths table says
    for key in ("checkpoint", "onnx", "split", "summary"):
        assert (tmp_path / summary["paths"][key]).is_file(), key
    train = run / "train"
    for name in ("best.safetensors", "last.safetensors", "metrics.csv", "curves.png"):
        assert (train / name).is_file(), name
    for name in ("summary.json", "per_patient.csv", "per_slice.csv"):
        assert (run / "eval" / name).is_file(), name
    scans = sorted((run / "scans").rglob("*.tif"))
    assert scans and not any(s.name.endswith("_mask.tif") for s in scans)
    for backend in ("predict", "predict-onnx"):
        masks = sorted((run / backend).rglob("*_mask.tif"))
        assert len(masks) == len(scans), backend
        m = tifffile.imread(masks[0])
        assert m.dtype.name == "uint8" and m.shape == (64, 64) and set(m.ravel()) <= {0, 255}
        assert (run / backend / "summary.csv").is_file()
    assert (run / "cache").is_dir()  # the demo keeps its dataset cache to itself

    # it learned, and the ONNX model gives the checkpoint's masks
    dice = summary["per_patient_dice"]
    assert dice["eval"] > 0.8
    assert dice["predict_torch"] == pytest.approx(dice["eval"], abs=0.02)
    assert dice["predict_onnx"] == pytest.approx(dice["predict_torch"], abs=0.01)
    assert summary["torch_onnx_agreement"] > 0.99
    assert len(summary["val_patients"]) == 2

    # the human tables went to stderr under --json
    assert "agreement of the PyTorch and ONNX masks" in proc.stderr
    assert "brainseg predict runs/demo/exp/model.onnx" in proc.stderr


def test_demo_refuses_a_size_the_model_cannot_take(tmp_path: Path) -> None:
    proc = run_cli(["demo", "--size", "50"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "--size 50 is not a multiple of 32" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_demo_refuses_an_unknown_device_before_any_work(tmp_path: Path) -> None:
    proc = run_cli(["demo", "--device", "gpu0"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown device 'gpu0'" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_demo_passes_its_cache_folder_and_shows_each_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 23: the demo's own dataset cache reaches each stage as an argument; the process
    environment is never changed (it was, for the whole run), the user's cache stays empty,
    and each stage's result goes to the caller's ``show`` (only commands render)."""
    import os

    from brainseg.cli.demo_run import DemoOptions, run_demo

    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("BRAINSEG_CACHE_DIR", str(user_cache))
    seen: list[tuple[str, str | None]] = []

    def show(stage: str, result: object) -> None:
        seen.append((stage, os.environ.get("BRAINSEG_CACHE_DIR")))

    run = tmp_path / "run"
    res = run_demo(run, DemoOptions(patients=5, epochs=1, device="cpu"), show)
    assert [stage for stage, _ in seen] == ["split", "train", "eval", "export"]
    assert all(env == str(user_cache) for _, env in seen)
    assert not user_cache.exists()
    assert (run / "cache" / "datasets").is_dir() and res.paths["onnx"].is_file()
