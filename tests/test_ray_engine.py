"""``brainseg predict --engine ray`` on a real local Ray instance (2 CPUs) started here.

Every test compares with the local engine (``--engine local``, this process, no Ray): the
same files, the same masks byte for byte, the same summary rows. A Ray run killed with
SIGKILL and resumed with ``--skip-existing`` ends with the local engine's masks.
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

import pytest
from _tiny import tiny_onnx, write_images
from _volkit import blob_volume, conv_onnx, make_runner, save_case
from conftest import start_cli

pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def ray_address() -> Any:
    """A real Ray instance with 2 CPUs for this module; its GCS address (host:port)."""
    import logging

    import ray

    ctx = ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
    )
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    return make_runner(capsys)


def files_below(top: Path) -> dict[str, bytes]:
    """Every non-hidden file below ``top`` (relative path -> bytes), the summary left out."""
    return {
        str(p.relative_to(top)): p.read_bytes()
        for p in sorted(top.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.startswith("summary")
    }


def summary_rows(out: Path, name: str = "summary.csv") -> list[dict[str, str]]:
    """The summary's rows, with the output folder's name as OUT (``output``, ``error``)."""
    with open(out / name, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v.replace(f"{out.name}/", "OUT/") for k, v in r.items()} for r in rows]


def _slices(tmp_path: Path) -> Path:
    scans = tmp_path / "scans"
    write_images(scans / "p1", 9, fmt="png")
    write_images(scans / "p2", 8, fmt="tif")
    (scans / "p2" / "broken.png").write_bytes(b"not an image")  # an error row
    (scans / "p1" / "img00000.tif").write_bytes((scans / "p2" / "img00000.tif").read_bytes())
    return scans  # p1/img00000.png and p1/img00000.tif write one mask: the second is an error


def test_ray_engine_writes_the_local_engines_masks_and_summary(run, ray_address, tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    _slices(tmp_path)
    flags = ["--probabilities", "--overlay", "-b", "3", "--json"]
    local = run(["predict", model, "scans", "-o", "local", *flags])
    assert local.returncode == 1, local.stderr  # the broken file
    ray_run = run(["predict", model, "scans", "-o", "viaray", *flags, "--engine", "ray"])
    assert ray_run.returncode == 1, ray_run.stderr
    assert ray_run.stdout.replace("viaray/", "OUT/") == local.stdout.replace("local/", "OUT/")
    assert "engine ray: 2 predictor actor(s)" in ray_run.stderr
    local_files, ray_files = files_below(tmp_path / "local"), files_below(tmp_path / "viaray")
    assert len(local_files) == 3 * 17  # 17 images predicted: mask, prob, overlay each
    assert ray_files == local_files
    rows = summary_rows(tmp_path / "viaray")
    assert rows == summary_rows(tmp_path / "local")
    assert [r["status"] for r in rows].count("error") == 2
    assert any("another input already writes" in r["error"] for r in rows)


def test_a_ray_shard_and_a_local_shard_merge_into_the_local_summary(run, ray_address, tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    write_images(tmp_path / "scans", 7)
    whole = run(["predict", model, "scans", "-o", "whole"])
    assert whole.returncode == 0, whole.stderr
    assert run(["predict", model, "scans", "-o", "out", "--shard", "0/2"]).returncode == 0
    ray_run = run(["predict", model, "scans", "-o", "out", "--shard", "1/2", "--engine", "ray"])
    assert ray_run.returncode == 0, ray_run.stderr
    assert (tmp_path / "out" / "summary-1-of-2.csv").is_file()
    merged = run(["predict", "--merge", "out"])
    assert merged.returncode == 0, merged.stderr
    assert summary_rows(tmp_path / "out") == summary_rows(tmp_path / "whole")
    assert files_below(tmp_path / "out") == files_below(tmp_path / "whole")


def test_ray_engine_predicts_volume_cases_as_the_local_engine(run, ray_address, tmp_path):
    model = conv_onnx(tmp_path / "m.onnx", image_size=64, largest=True)
    for i in range(3):
        save_case(tmp_path / "cases" / f"c{i}", f"c{i}", blob_volume(i))
    local = run(["predict", model, "cases", "-o", "local", "--probabilities"])
    assert local.returncode == 0, local.stderr
    flags = ["--probabilities", "--engine", "ray", "--workers", "2"]
    ray_run = run(["predict", model, "cases", "-o", "viaray", *flags])
    assert ray_run.returncode == 0, ray_run.stderr
    assert "engine ray: 2 predictor actor(s)" in ray_run.stderr
    for i in range(3):
        for name in (f"c{i}_mask.nii.gz", f"c{i}_prob.nii.gz"):
            assert (tmp_path / "viaray" / name).read_bytes() == (
                tmp_path / "local" / name
            ).read_bytes(), name
        meta = [
            json.loads((tmp_path / out / f"c{i}.json").read_text()) for out in ("local", "viaray")
        ]
        for m in meta:
            m.pop("seconds")
            m["mask"] = m["mask"].split("/", 1)[1]
            m["probabilities"] = m["probabilities"].split("/", 1)[1]
        assert meta[0] == meta[1]
    rows = summary_rows(tmp_path / "viaray")
    assert rows == summary_rows(tmp_path / "local")
    assert int(rows[0]["tumor_voxels"]) > 0


def test_a_device_the_actors_cannot_use_is_the_local_engines_one_line(run, ray_address, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime can run on CUDA")
    model = tiny_onnx(tmp_path / "m.onnx")
    write_images(tmp_path / "scans", 3)
    local = run(["predict", model, "scans", "-o", "local", "--device", "cuda"])
    ray_flags = ["--device", "cuda", "--engine", "ray"]
    ray_run = run(["predict", model, "scans", "-o", "viaray", *ray_flags])
    assert (ray_run.returncode, local.returncode) == (2, 2)
    error = [line for line in local.stderr.splitlines() if line.startswith("error:")]
    assert "has no CUDA provider" in error[0]
    assert error[0] in ray_run.stderr.splitlines()  # the actors' error, as one line
    assert "Traceback" not in ray_run.stderr
    assert not list(tmp_path.glob("viaray/*_mask.tif"))


@pytest.mark.slow
def test_a_killed_ray_run_resumed_with_skip_existing_ends_as_the_local_engine(
    run, ray_address, tmp_path
):
    model = tiny_onnx(tmp_path / "m.onnx")
    n = 400
    write_images(tmp_path / "scans", n, fmt="png")
    out = tmp_path / "viaray"
    args = [
        "predict",
        "m.onnx",
        "scans",
        "-o",
        "viaray",
        "--engine",
        "ray",
        "--address",
        ray_address,
    ]
    proc = start_cli(args, cwd=tmp_path)
    deadline = time.monotonic() + 120
    masks = 0
    while masks < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        masks = len(list(out.glob("*_mask.tif"))) if out.is_dir() else 0
    assert proc.poll() is None, "the Ray run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # no handler runs: the summary is not renamed
    proc.communicate(timeout=60)
    at_kill = len(list(out.glob("*_mask.tif")))
    assert 20 <= at_kill < n, at_kill
    assert not (out / "summary.csv").exists()

    resumed = start_cli([*args, "--skip-existing"], cwd=tmp_path)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr

    local = run(["predict", model, "scans", "-o", "local"])
    assert local.returncode == 0, local.stderr
    assert files_below(out) == files_below(tmp_path / "local")
    rows, expected = summary_rows(out), summary_rows(tmp_path / "local")
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) >= 20  # the masks of the killed run were kept, not redone
    for r, e in zip(rows, expected, strict=True):
        if r["status"] == "skipped":  # no probability or runtime is read back for a kept mask
            r["status"], r["max_probability"] = "ok", e["max_probability"]
            assert r["runtime"] == ""
            r["runtime"] = e["runtime"]
        assert r == e


def test_missing_ray_is_one_line_naming_the_extra(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    write_images(tmp_path / "scans", 2)
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from brainseg.__main__ import main\n"
        "sys.argv = ['brainseg', 'predict', 'm.onnx', 'scans', '-o', 'out', '--engine', 'ray']\n"
        "main()\n"
    )
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "--engine ray needs the ray package" in lines[0]
    assert "brainseg[ray]" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written
    del model


def test_engine_and_address_values_are_checked(run, tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    write_images(tmp_path / "scans", 2)
    bad = run(["predict", model, "scans", "-o", "out", "--engine", "spark"])
    assert bad.returncode == 2
    assert "--engine 'spark' is not one of local, ray" in bad.stderr
    lone = run(["predict", model, "scans", "-o", "out", "--address", "10.0.0.1:6379"])
    assert lone.returncode == 2
    assert "--address is the Ray cluster of --engine ray" in lone.stderr
    ray_flags = ["--engine", "ray", "--address", "127.0.0.1:1"]  # nothing listens on port 1
    nobody = run(["predict", model, "scans", "-o", "out", *ray_flags])
    assert nobody.returncode == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in nobody.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_documented_cv_ray_script_trains_each_fold_as_a_ray_task_then_collects(
    ray_address, tmp_path
):
    from conftest import run_cli

    from brainseg.data.synthetic import write_synthetic

    text = (Path(__file__).resolve().parents[1] / "docs" / "cv.md").read_text()
    script = text.split("```python\n# cv-ray.py", 1)[1].split("```", 1)[0]
    (tmp_path / "cv-ray.py").write_text("# cv-ray.py" + script)
    root = write_synthetic(tmp_path / "data", patients=4, seed=3, size=64, slices=(8, 10))
    assert run_cli(["split", root, "--folds", "2", "-o", tmp_path / "folds.yaml"]).returncode == 0
    recipe = ["--epochs", "1", "--steps-per-epoch", "1", "--image-size", "32", "--batch-size"]
    recipe += ["4", "--encoder-weights", "none", "--set", "decoder_channels=8,8,8,8,8"]
    recipe += ["--device", "cpu", "--seed", "1", "--project", tmp_path / "runs", "--name", "lgg"]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    args = [tmp_path / "cv-ray.py", "2", root, "--split", tmp_path / "folds.yaml", *recipe]
    res = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cv_dir = tmp_path / "runs" / "lgg"
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()] == ["lgg"]
    for k in (0, 1):
        assert (cv_dir / f"fold_{k}").is_dir()
    assert (cv_dir / "cv_summary.json").is_file()  # collected: out-of-fold prediction + summary
    assert res.stderr.count("finished earlier") == 2  # the collect trained nothing again
