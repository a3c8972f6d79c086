"""brainseg.export and `brainseg export`: dynamic axes, metadata, verification, fp16, int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli

SIZE = 64


def _checkpoint(dest: Path, phantom_root: Path, **arch: object) -> Path:
    """A small checkpoint whose head is scaled so a fifth of a phantom's pixels are tumor."""
    import torch

    from brainseg.checkpoint import save_checkpoint
    from brainseg.model import UNetVGG16

    torch.manual_seed(0)
    model = UNetVGG16(encoder_weights=None, decoder_channels=(16, 16, 8, 8, 8), **arch).eval()
    img = tifffile.imread(sorted(phantom_root.glob("*/*_5.tif"))[0])
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        model.decoder.head.weight.mul_(40.0)
        model.decoder.head.bias.sub_(float(np.quantile(model(x).numpy(), 0.8)))
    meta = {
        "image_size": SIZE,
        "threshold": 0.5,
        "postprocess": {"min_size": 4, "largest_component": True},
        "metrics": {"val_dice_patient": 0.71},
    }
    return save_checkpoint(dest, model, meta)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, phantom_root: Path) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", phantom_root)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, phantom_root: Path):
    """The fp32 export verified on phantom slices (library call), shared by several tests."""
    from brainseg.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_onnx(ckpt, out, verify_data=phantom_root)
    return out, report


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_dynamic_batch_height_width(fp32, ckpt: Path) -> None:
    import torch

    from brainseg.checkpoint import load_checkpoint

    path, _ = fp32
    sess = _session(path)
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    assert (inp.name, inp.type, inp.shape) == (
        "image",
        "tensor(float)",
        ["batch", 3, "height", "width"],
    )
    assert (out.name, out.shape) == ("logits", ["batch", 1, "height", "width"])
    model, _ = load_checkpoint(ckpt, "cpu")
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 64, 64), (3, 3, 64, 64), (1, 3, 96, 128), (3, 3, 96, 128)]:
        x = rng.uniform(0, 255, shape).astype(np.float32)
        got = sess.run(None, {"image": x})[0]
        assert got.shape == (shape[0], 1, *shape[2:])
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        assert np.abs(got - ref).max() < 1e-3


def _props(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_metadata_props_and_checker(fp32, ckpt: Path) -> None:
    import onnx

    from brainseg import __version__
    from brainseg.predict import read_onnx_metadata

    path, _ = fp32
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    props = _props(path)
    for key in (
        "brainseg",
        "image_size",
        "threshold",
        "normalization",
        "postprocess",
        "architecture",
        "metrics",
        "brainseg_version",
        "variant",
    ):
        assert key in props, key
    assert json.loads(props["image_size"]) == SIZE
    assert float(props["threshold"]) == 0.5
    assert props["normalization"] == "imagenet"
    assert json.loads(props["postprocess"]) == {"min_size": 4, "largest_component": True}
    assert json.loads(props["architecture"])["decoder_channels"] == [16, 16, 8, 8, 8]
    assert json.loads(props["metrics"]) == {"val_dice_patient": 0.71}
    assert props["brainseg_version"] == __version__ and props["variant"] == "fp32"
    meta = read_onnx_metadata(path)  # what predict and eval see
    assert meta["image_size"] == SIZE and meta["postprocess"]["min_size"] == 4
    assert meta["onnx"]["variant"] == "fp32" and meta["onnx"]["source"] == ckpt.name


def test_verification_report(fp32, phantom_root: Path) -> None:
    _, report = fp32
    assert report.variant == "fp32" and report.opset == 17 and report.exporter == "dynamo"
    assert report.data_source == str(phantom_root)
    (row,) = report.checks
    assert row["model"] == "fp32"
    assert row["max_abs_diff"] < 1e-3 and row["max_abs_diff_2nd_size"] < 1e-3
    assert row["second_size"] == [96, 128]
    assert row["mask_dice_vs_torch"] > 0.99
    assert report.int8 is None


def test_cli_fp16_json_and_refusing_to_overwrite(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m16.onnx"
    out.write_bytes(b"keep me")
    r = run_cli(["export", ckpt, "-o", out, "--fp16"])
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"keep me"
    r = run_cli(["export", ckpt, "-o", out, "--fp16", "--force", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)  # stdout holds the JSON document only
    assert rep["variant"] == "fp16" and rep["verified_on"].startswith("generated phantoms")
    by = {c["model"]: c for c in rep["checks"]}
    assert set(by) == {"fp32", "fp16"}
    assert by["fp16"]["size_mb"] < 0.6 * by["fp32"]["size_mb"]
    assert by["fp16"]["max_abs_diff"] < 0.5 and by["fp16"]["mask_dice_vs_torch"] > 0.9
    assert "ONNX vs PyTorch" in r.stderr  # the table goes to stderr in --json mode
    sess = _session(out)
    assert sess.get_inputs()[0].type == "tensor(float)"
    assert sess.get_outputs()[0].type == "tensor(float)"
    got = sess.run(None, {"image": np.full((2, 3, 96, 64), 100, np.float32)})[0]
    assert got.shape == (2, 1, 96, 64) and got.dtype == np.float32
    assert _props(out)["variant"] == "fp16"


def test_fp16_keeps_zscore_normalisation_fp32_and_handles_resize(
    tmp_path: Path, phantom_root: Path
) -> None:
    """Per-image z-score squares pixel values (beyond fp16's range): it must stay fp32."""
    import onnx
    import torch

    from brainseg.checkpoint import load_checkpoint
    from brainseg.export import convert_fp16, torch_to_onnx

    ck = _checkpoint(
        tmp_path / "z.safetensors", phantom_root, normalization="zscore", upsample="bilinear"
    )
    model, _ = load_checkpoint(ck, "cpu")
    torch_to_onnx(model, tmp_path / "z.onnx", (SIZE, SIZE), 17)
    half = convert_fp16(onnx.load(str(tmp_path / "z.onnx")))
    onnx.save(half, str(tmp_path / "z16.onnx"))
    first_conv = next(i for i, n in enumerate(half.graph.node) if n.op_type == "Conv")
    assert not any(
        n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16
        for n in half.graph.node[: max(0, first_conv - 1)]
    )
    x = tifffile.imread(sorted(phantom_root.glob("*/*_6.tif"))[0])
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
    got = _session(tmp_path / "z16.onnx").run(None, {"image": x})[0]
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() < 0.5
    assert ((got > 0) == (ref > 0)).mean() > 0.98


def test_cli_int8_dice_table(ckpt: Path, tmp_path: Path, phantom_root: Path) -> None:
    import onnx

    out = tmp_path / "m8.onnx"
    r = run_cli(
        [
            "export",
            ckpt,
            "-o",
            out,
            "--int8",
            "--calib",
            phantom_root,
            "--calib-slices",
            "16",
            "--json",
        ]
    )
    assert r.returncode == 0, r.stderr
    # the tables (on stderr with --json)
    assert "int8 vs fp32" in r.stderr and "Dice fp32" in r.stderr and "Dice int8" in r.stderr
    assert "max |Δlogit|" in r.stderr
    rep = json.loads(r.stdout)
    q = rep["int8"]
    assert q["calibration_slices"] == 16
    assert q["validation_patients"] == 2 and q["calibration_patients"] == 4  # every fifth
    for k in ("patient_dice_fp32", "patient_dice_int8", "mask_dice_int8_vs_fp32"):
        assert 0.0 <= q[k] <= 1.0
    assert q["dice_loss"] == pytest.approx(q["patient_dice_fp32"] - q["patient_dice_int8"])
    assert q["within_tolerance"] == (q["dice_loss"] <= 0.01)
    by = {c["model"]: c for c in rep["checks"]}
    assert by["int8"]["size_mb"] < 0.4 * by["fp32"]["size_mb"]
    assert by["int8"]["mask_dice_vs_torch"] > 0.8
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert _props(out)["variant"] == "int8"
    sess = _session(out)
    assert sess.run(None, {"image": np.zeros((3, 3, 96, 128), np.float32)})[0].shape == (
        3,
        1,
        96,
        128,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--int8"], "--int8 needs calibration data"),
        (["--fp16", "--int8", "--calib", "x"], "cannot be combined"),
        (["--opset", "7"], "--opset 7 is outside"),
    ],
)
def test_cli_bad_arguments_exit_2(
    ckpt: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    r = run_cli(["export", ckpt, "-o", tmp_path / "m.onnx", *args])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_cli_corrupt_checkpoint_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    r = run_cli(["export", bad, "-o", tmp_path / "m.onnx"])
    assert r.returncode == 2
    assert "bad.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # one line + hint
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_int8_on_real_slices(ckpt: Path, tmp_path: Path, real_data: Path) -> None:
    r = run_cli(
        [
            "export",
            ckpt,
            "-o",
            tmp_path / "real8.onnx",
            "--int8",
            "--calib",
            real_data,
            "--calib-slices",
            "32",
            "--json",
        ]
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    q = rep["int8"]
    assert q["validation_patients"] == 5 and q["calibration_patients"] == 20
    assert q["calibration_slices"] == 32
    assert rep["verified_on"] == str(real_data)
    assert all(c["mask_dice_vs_torch"] > 0.8 for c in rep["checks"])
