"""Smoke test of the benchmark scripts: each one runs on tiny inputs and writes its JSON.

The benchmarks themselves are not part of the test run (they take minutes and their numbers
depend on the machine); this only keeps them from rotting. Numbers are never asserted, only
that each script finishes, prints its table and records what docs/benchmarks.md relies on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run_script(name: str, *args: str | Path, env: dict[str, str] | None = None) -> str:
    """Run ``benchmarks/NAME`` as a user would; fail with its output when it fails."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    p = subprocess.run(
        [sys.executable, str(BENCH / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
    )
    assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    return p.stdout


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    for key in ("machine", "versions", "command", "date"):
        assert key in data, f"{path.name} lacks {key}"
    assert data["machine"]["cores"] and data["machine"]["cpu"]
    assert data["versions"]["torch"] and data["versions"]["brainseg"]
    return data


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint (64x64, narrow decoder) and its fp32 ONNX export, made once."""
    from brainseg import console
    from brainseg.export import export_onnx
    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

    d = tmp_path_factory.mktemp("bench-model")
    model = UNetVGG16(decoder_channels=(16, 16, 8, 8, 8), encoder_weights=None)
    ckpt = save_checkpoint(d / "tiny.safetensors", model, {"image_size": 64})
    console.configure(quiet=True)
    try:
        export_onnx(ckpt, d / "tiny.onnx")
    finally:
        console.configure(quiet=False)
    return {"checkpoint": ckpt, "onnx": d / "tiny.onnx"}


def test_startup_smoke(tmp_path: Path, tiny_model: dict[str, Path]) -> None:
    out = run_script(
        "startup.py", "--smoke", "--onnx", tiny_model["onnx"], "--json", tmp_path / "s.json"
    )
    assert "brainseg --help" in out
    data = load(tmp_path / "s.json")
    assert data["predict_onnx"]["no_torch"] is True
    assert data["predict_onnx"]["masks_written"] == 3
    assert data["seconds"]["brainseg --help"] > 0


def test_inference_smoke(tmp_path: Path, phantom_root: Path) -> None:
    # no --checkpoint: the script's own short training run is exercised too
    out = run_script(
        "inference.py",
        "--smoke",
        "--data",
        phantom_root,
        "--size",
        "64",
        "--json",
        tmp_path / "i.json",
    )
    assert "onnxruntime int8" in out
    data = load(tmp_path / "i.json")
    for name in ("torch fp32", "torch fp32 channels_last", "onnxruntime fp32", "onnxruntime int8"):
        b = data["backends"][name]
        assert b["latency_ms_batch1"] > 0 and b["throughput_slices_s"] > 0
        assert 0.0 <= b["mask_dice_vs_torch_fp32"] <= 1.0
    assert data["backends"]["torch fp32"]["mask_dice_vs_torch_fp32"] == 1.0
    assert set(data["targets"]) >= {"int8_speedup_batch1", "int8_patient_dice_within_0_01"}
    # the runtimes of issue 24: OpenVINO rows, the fraction of the measured peak, auto's pick
    if importlib.util.find_spec("openvino") is not None:
        assert {"openvino fp32", "openvino int8"} <= set(data["backends"])
    assert all(b["fraction_of_peak_batch"] > 0 for b in data["backends"].values())
    assert data["peak_flops"]["fp32_matmul"] > 0 and data["cpu_kind"]
    assert set(data["auto_choice"]) == {"fp32", "int8"}
    assert data["checkpoint"]["source"].startswith("trained by this script")


def test_train_throughput_smoke(tmp_path: Path, phantom_root: Path) -> None:
    out = run_script(
        "train_throughput.py",
        "--smoke",
        "--data",
        phantom_root,
        "--size",
        "64",
        "--batch",
        "4",
        "--variants",
        "fp32-nchw,bf16-cl",
        "--json",
        tmp_path / "t.json",
    )
    assert "reference" in out
    data = load(tmp_path / "t.json")
    assert set(data["variants"]) == {
        "reference (Dataset + DataLoader, fp32, NCHW)",
        "brainseg fp32, NCHW",
        "brainseg bf16, channels_last",
    }
    assert all(v["images_per_s"] > 0 for v in data["variants"].values())
    assert data["targets"]["headline_variant"] == "brainseg bf16, channels_last"


def test_predict_folder_smoke(
    tmp_path: Path, phantom_root: Path, tiny_model: dict[str, Path]
) -> None:
    out = run_script(
        "predict_folder.py",
        "--smoke",
        "--data",
        phantom_root,
        "--model",
        tiny_model["onnx"],
        "--json",
        tmp_path / "p.json",
    )
    assert "end to end" in out
    data = load(tmp_path / "p.json")
    assert data["throughput"]["files"] == 6
    assert data["throughput"]["end_to_end_slices_s"] > 0
    assert set(data["memory"]["runs"]) == {"4", "8"}


def test_gpu_bench_cpu_smoke(tmp_path: Path, phantom_root: Path) -> None:
    out = run_script(
        "gpu_bench.py",
        "--device",
        "cpu",
        "--smoke",
        "--data",
        phantom_root,
        "--size",
        "64",
        env={"OUT": str(tmp_path)},
    )
    assert "floor" in out
    data = load(tmp_path / "gpu.json")  # $OUT is where gpu.sh's results go
    assert data["bf16_matmul_tflops"] > 0
    assert data["runs"]["brainseg"]["mfu"] > 0
    assert data["inference"]["predictor_slices_s"] > 0


def test_gpu_sh_is_valid_bash() -> None:
    p = subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _per_patient(cv_dir: Path, rows: list[tuple[str, int, float]]) -> Path:
    """A finished cv folder as cv_compare reads it: per_patient.csv (patient, fold, Dice)."""
    cv_dir.mkdir()
    lines = ["patient_id,dice,fold,institution,dice_before"]
    lines += [f"{p},{d + 0.1:.4f},{f},CS,{d:.4f}" for p, f, d in rows]
    (cv_dir / "per_patient.csv").write_text("\n".join(lines) + "\n")
    return cv_dir


def test_cv_compare_pairs_runs_patient_by_patient(tmp_path: Path) -> None:
    ref = _per_patient(tmp_path / "plain", [("A", 0, 0.5), ("B", 0, 0.7), ("C", 1, 0.2)])
    new = _per_patient(tmp_path / "cosine", [("A", 0, 0.6), ("B", 0, 0.6), ("C", 1, 0.5)])
    out = run_script("cv_compare.py", ref, new, "--json", tmp_path / "c.json")
    assert "2/3 better" in out
    runs = json.loads((tmp_path / "c.json").read_text())["runs"]
    plain, cosine = runs[str(ref)], runs[str(new)]
    assert plain["mean"] == pytest.approx(1.4 / 3) and plain["per_fold"] == pytest.approx(
        [0.6, 0.2]
    )
    assert cosine["paired_difference"]["mean"] == pytest.approx(0.3 / 3)
    assert cosine["patients_better"] == 2 and cosine["per_patient"]["C"] == pytest.approx(0.5)
    # other folds: a difference would mix recipe and patients, so it is refused
    other = _per_patient(tmp_path / "other", [("A", 1, 0.6), ("B", 0, 0.6), ("C", 0, 0.5)])
    p = subprocess.run(
        [sys.executable, str(BENCH / "cv_compare.py"), ref, other], capture_output=True, text=True
    )
    assert p.returncode != 0 and "do not have the same patients in folds" in p.stderr


@pytest.mark.slow
def test_predict_scale_smoke(tmp_path: Path, phantom_root: Path, tiny_model: dict[str, Path]):
    pytest.importorskip("ray.data")
    out = run_script(
        "predict_scale.py",
        "--smoke",
        "--data",
        phantom_root,
        "--model",
        tiny_model["onnx"],
        "--json",
        tmp_path / "s.json",
    )
    assert "first mask" in out
    data = load(tmp_path / "s.json")
    assert data["masks_identical"] is True
    assert {r["engine"] for rs in data["runs"].values() for r in rs} == {"local", "ray"}
    assert data["runs"]["ray"][0]["actor_peaks_mb"]  # the actors' memory was sampled
    assert data["model_n_machines"]["tasks"] >= 1
