"""brainseg.export and `brainseg export`: dynamic axes, metadata, verification, fp16, int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli

SIZE = 64


def _checkpoint(
    dest: Path, phantom_root: Path, post: dict[str, object] | None = None, **arch: object
) -> Path:
    """A small checkpoint whose head is scaled so a fifth of a phantom's pixels are tumor."""
    import torch

    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

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
        "postprocess": post or {"min_size": 4, "largest_component": True},
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

    from brainseg.model.checkpoint import load_checkpoint

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
    from brainseg.inference.predict import read_onnx_metadata

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
    # verified on phantoms (no data given): the report says so and recommends --verify-data
    assert any("generated phantoms" in n and "--verify-data" in n for n in rep["notes"])
    assert "note: verified on generated phantoms" in r.stderr and "--verify-data" in r.stderr
    sess = _session(out)
    assert sess.get_inputs()[0].type == "tensor(float)"
    assert sess.get_outputs()[0].type == "tensor(float)"
    got = sess.run(None, {"image": np.full((2, 3, 96, 64), 100, np.float32)})[0]
    assert got.shape == (2, 1, 96, 64) and got.dtype == np.float32
    assert _props(out)["variant"] == "fp16"


def _two_sizes(phantom_root: Path) -> list[np.ndarray]:
    """One phantom slice as float N x 3 x H x W at the model's size and at 96x128."""
    from brainseg.data.imageio import resize_image

    img = tifffile.imread(sorted(phantom_root.glob("*/*_6.tif"))[0])
    out = []
    for im in (img, resize_image(img, (96, 128))):
        out.append(np.ascontiguousarray(im.transpose(2, 0, 1)[None], dtype=np.float32))
    out.append(np.repeat(out[1], 2, axis=0))  # batch 2 at the second size
    return out


def test_fp16_keeps_zscore_normalisation_fp32_and_handles_resize(
    tmp_path: Path, phantom_root: Path
) -> None:
    """Per-image z-score squares pixel values (beyond fp16's range): it must stay fp32.

    brainseg's export path (torch_to_onnx, then convert_fp16) on the variant with the most ops
    beyond plain convolutions (z-score, bilinear upsampling), run at two sizes and two batch
    sizes: the dynamic shapes docs/export.md promises for it (replaces the test of torch's
    legacy exporter that tests/test_model.py had)."""
    import onnx
    import torch

    from brainseg.export.graph import torch_to_onnx
    from brainseg.export.variants import convert_fp16
    from brainseg.model.checkpoint import load_checkpoint

    ck = _checkpoint(
        tmp_path / "z.safetensors", phantom_root, normalization="zscore", upsample="bilinear"
    )
    model, _ = load_checkpoint(ck, "cpu")
    assert torch_to_onnx(model, tmp_path / "z.onnx", (SIZE, SIZE), 17) == "dynamo"
    half = convert_fp16(onnx.load(str(tmp_path / "z.onnx")))
    onnx.save(half, str(tmp_path / "z16.onnx"))
    first_conv = next(i for i, n in enumerate(half.graph.node) if n.op_type == "Conv")
    assert not any(
        n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16
        for n in half.graph.node[: max(0, first_conv - 1)]
    )
    fp32_sess, fp16_sess = _session(tmp_path / "z.onnx"), _session(tmp_path / "z16.onnx")
    for x in _two_sizes(phantom_root):
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        got32 = fp32_sess.run(None, {"image": x})[0]
        assert got32.shape == ref.shape and np.abs(got32 - ref).max() < 1e-3
        got = fp16_sess.run(None, {"image": x})[0]
        assert got.shape == ref.shape
        assert np.isfinite(got).all()
        assert np.abs(got - ref).max() < 0.5
        assert ((got > 0) == (ref > 0)).mean() > 0.98


def test_dynamo_failure_falls_back_to_torchscript_and_verifies(
    ckpt: Path, tmp_path: Path, phantom_root: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """When the dynamo exporter fails, the TorchScript exporter's file is used, said so, and
    it passes the same verification (dynamic axes at two sizes, masks as PyTorch's)."""
    import onnx
    import torch

    from brainseg.export.graph import set_metadata, torch_to_onnx
    from brainseg.export.verify import compare_with_torch, load_slices
    from brainseg.model.checkpoint import load_checkpoint

    real_export = torch.onnx.export
    calls = []

    def dynamo_breaks(*args, **kwargs):
        calls.append(kwargs.get("dynamo"))
        if kwargs.get("dynamo"):
            raise RuntimeError("forced dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    model, meta = load_checkpoint(ckpt, "cpu")
    path = tmp_path / "ts.onnx"
    assert torch_to_onnx(model.eval(), path, (SIZE, SIZE), 17) == "torchscript"
    assert calls == [True, False]
    err = capsys.readouterr().err
    assert "dynamo ONNX exporter failed" in err and "forced dynamo failure" in err
    assert "TorchScript exporter" in err
    proto = onnx.load(str(path))
    set_metadata(proto, meta, "fp32", 17, ckpt.name)
    onnx.save(proto, str(path))
    sess = _session(path)
    assert sess.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    slices = load_slices(phantom_root, (SIZE, SIZE), tmp_path)
    (row,) = compare_with_torch(ckpt, [("fp32", path)], slices.images[:8])
    assert row["max_abs_diff"] < 1e-3 and row["max_abs_diff_2nd_size"] < 1e-3
    assert row["second_size"] == [96, 128] and row["mask_dice_vs_torch"] > 0.99


@pytest.fixture(scope="module")
def int8_cli(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, phantom_root: Path):
    """`brainseg export --int8 --json` on phantoms: (output, JSON report, stderr)."""
    out = tmp_path_factory.mktemp("int8") / "m8.onnx"
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
    return out, json.loads(r.stdout), r.stderr


def test_cli_int8_dice_table(int8_cli) -> None:
    import onnx

    out, rep, stderr = int8_cli
    # the tables (on stderr with --json)
    assert "int8 vs fp32" in stderr and "Dice fp32" in stderr and "Dice int8" in stderr
    assert "max |Δlogit|" in stderr
    q = rep["int8"]
    assert q["calibration_slices"] == 16
    assert q["validation_patients"] == 2 and q["calibration_patients"] == 4  # every fifth
    for k in ("patient_dice_fp32", "patient_dice_int8", "mask_dice_int8_vs_fp32"):
        assert 0.0 <= q[k] <= 1.0
    assert q["dice_loss"] == pytest.approx(q["patient_dice_fp32"] - q["patient_dice_int8"])
    assert q["within_tolerance"] == (abs(q["dice_loss"]) <= 0.01)
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


def test_cli_int8_report_labels_sizes_and_cpu_path(int8_cli) -> None:
    """The report says its Dice is at the training size, names both logit sizes and this
    CPU's int8 instruction path (what to expect of int8 speed here)."""
    from brainseg.export.cpu import int8_path

    _, rep, stderr = int8_cli
    assert rep["dice_image_size"] == [SIZE, SIZE]
    assert f"at the training size {SIZE}x{SIZE}" in stderr
    assert f"max |Δlogit| at {SIZE}x{SIZE}" in stderr and "max |Δlogit| at 96x128" in stderr
    assert "2nd size" not in stderr
    here = int8_path()
    assert rep["int8"]["cpu_int8_path"] == here["name"]
    assert f"this CPU's int8 path: {here['name']}" in stderr


def _patient_dice_from_predict(model: Path, patients: list[Path], tmp: Path, largest: bool):
    """Mean per-patient Dice of the masks `brainseg predict` writes for ``patients``' slices
    (the model's 3D largest-component step applied per patient when it has one)."""
    from brainseg.evaluation import metrics
    from brainseg.inference import postprocess

    out = tmp / model.stem
    r = run_cli(["predict", model, *patients, "-o", out])
    assert r.returncode == 0, r.stderr
    scores = []
    for patient in patients:
        slices = sorted(
            (p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]),
        )
        pred = np.stack(
            [tifffile.imread(next(out.rglob(f"{p.stem}_mask.tif"))) != 0 for p in slices]
        )
        if largest:
            pred = postprocess.keep_largest_3d(pred)
        gt = np.stack([tifffile.imread(p.with_name(f"{p.stem}_mask.tif")) != 0 for p in slices])
        scores.append(metrics.dice(pred, gt))
    return float(np.mean(scores))


def test_int8_reported_dice_matches_an_independent_evaluation(
    int8_cli, fp32, phantom_root: Path, tmp_path: Path
) -> None:
    """The per-patient Dice export reports for fp32 and int8 is what brainseg.evaluation.metrics
    gives
    on the masks each model writes with `brainseg predict` (not export's own formula)."""
    out8, rep, _ = int8_cli
    out32, _ = fp32
    q = rep["int8"]
    val = [phantom_root / p for p in q["validation_patient_ids"]]
    assert len(val) == 2 and all(p.is_dir() for p in val)
    d32 = _patient_dice_from_predict(out32, val, tmp_path, largest=True)
    d8 = _patient_dice_from_predict(out8, val, tmp_path, largest=True)
    assert q["patient_dice_fp32"] == pytest.approx(d32, abs=1e-3)
    assert q["patient_dice_int8"] == pytest.approx(d8, abs=1e-3)
    assert q["dice_loss"] == pytest.approx(d32 - d8, abs=2e-3)
    own = q["own_size"]  # phantoms at the model's size: the same figures
    assert own["size"] == [64, 64]
    assert own["patient_dice"]["fp32"] == pytest.approx(d32, abs=1e-3)
    assert own["patient_dice"]["int8"] == pytest.approx(d8, abs=1e-3)


@pytest.mark.slow  # one int8 export (~40 s on 2 shared cores) and three predict runs
def test_precision_costs_are_measured_at_the_images_own_size(ckpt: Path, tmp_path: Path) -> None:
    """Data at 96x96 for a model trained at 64x64: the report's own-size Dice of each
    precision is what `brainseg predict` (which writes masks at the images' size) scores."""
    from brainseg.data.synthetic import write_synthetic
    from brainseg.inference import runtimes

    data = write_synthetic(tmp_path / "p96", patients=5, seed=1, size=96)
    out = tmp_path / "m8.onnx"
    r = run_cli(["export", ckpt, "-o", out, "--int8", "--calib", data, "--calib-slices", "8",
                 "--json"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    q = rep["int8"]
    own = q["own_size"]
    assert own["size"] == [96, 96] and "at the images' own size 96x96" in r.stderr
    val = [data / p for p in q["validation_patient_ids"]]
    fp32 = tmp_path / "m.onnx"
    assert run_cli(["export", ckpt, "-o", fp32]).returncode == 0
    d32 = _patient_dice_from_predict(fp32, val, tmp_path, largest=True)
    d8 = _patient_dice_from_predict(out, val, tmp_path, largest=True)
    assert own["patient_dice"]["fp32"] == pytest.approx(d32, abs=1e-3)
    assert own["patient_dice"]["int8"] == pytest.approx(d8, abs=1e-3)
    assert own["dice_cost"]["int8"] == pytest.approx(d32 - d8, abs=2e-3)
    if runtimes._installed("openvino") and runtimes.native_bf16(runtimes.cpu_flags()):
        assert own["runtimes"]["bf16"] == "openvino bf16"
        assert abs(own["dice_cost"]["bf16"]) < 0.02


def _shifted_int8(fp32_path: Path, out_path: Path, calib_images, tmp: Path) -> None:
    """A stand-in "quantiser" that breaks the model: every logit - 1000 (empty masks)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(fp32_path))
    name = m.graph.output[0].name
    for node in m.graph.node:
        for k, x in enumerate(node.output):
            if x == name:
                node.output[k] = "before_shift"
    m.graph.initializer.append(numpy_helper.from_array(np.array(-1000.0, np.float32), "shift"))
    m.graph.node.append(helper.make_node("Add", ["before_shift", "shift"], [name]))
    onnx.save(m, str(out_path))


@pytest.mark.slow  # two int8 exports (~40 s each on 2 shared cores)
def test_int8_off_tolerance_warns_and_strict_fails_with_split_calibration(
    ckpt: Path,
    phantom_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    """An int8 file that segments nothing: loud warnings (Dice change beyond the tolerance,
    mask agreement below the floor), listed under `warnings` in --json; --strict exits 1 and
    writes nothing. --split decides the calibration and the comparison patients."""
    from brainseg import console
    from brainseg.cli import app as cli
    from brainseg.data.split import Split, load_split, save_split

    ids = sorted(p.name for p in phantom_root.iterdir() if p.is_dir())
    split = save_split(
        Split(
            seed=0,
            dataset_hash="0" * 16,
            val_fraction=0.33,
            test_fraction=0.0,
            subsets={"train": ids[:1] + ids[3:], "val": ids[1:3], "test": []},
        ),
        tmp_path / "split.yaml",
    )
    monkeypatch.setattr("brainseg.export.run.quantize_int8", _shifted_int8)
    monkeypatch.setattr(console.state, "json", False)
    monkeypatch.setattr(console.state, "quiet", False)
    out = tmp_path / "bad8.onnx"
    args = ["export", str(ckpt), "-o", str(out), "--int8", "--calib", str(phantom_root)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--split", str(split), "--strict", "--json"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    rep = json.loads(captured.out)
    assert rep["written"] is False and not out.exists()
    q = rep["int8"]
    sp = load_split(split)
    assert q["validation_patient_ids"] == sorted(sp.patients("val")) == ids[1:3]
    assert q["calibration_patient_ids"] == sorted(sp.patients("train")) == [ids[0], *ids[3:]]
    assert q["within_tolerance"] is False and abs(q["dice_loss"]) > 0.01
    assert any("more than 0.01" in w for w in rep["warnings"])
    assert any("below the floor 0.9" in w and "int8" in w for w in rep["warnings"])
    err = captured.err
    assert "warning: int8 loses" in err and "below the floor" in err
    assert "error: export verification failed under --strict" in err
    assert "bad8.onnx was not written" in err and "Traceback" not in err
    # without --strict the file is written, the warnings stay in the report
    from brainseg.export import export_onnx

    report = export_onnx(ckpt, out, int8=True, calib=phantom_root, split=split)
    assert out.exists() and report.written
    assert any("more than 0.01" in w for w in report.as_dict()["warnings"])


def test_tolerance_is_two_sided() -> None:
    """A Dice that moved up by 0.0169 is not "within 0.01" (it was reported so)."""
    from brainseg.export.verify import problems, within_tolerance

    assert within_tolerance(0.0099) and within_tolerance(-0.01)
    assert not within_tolerance(-0.0169) and not within_tolerance(0.0169)
    q = {
        "patient_dice_fp32": 0.70,
        "patient_dice_int8": 0.7169,
        "dice_loss": -0.0169,
        "within_tolerance": within_tolerance(-0.0169),
        "mask_dice_int8_vs_fp32": 0.95,
    }
    (msg,) = problems([], q)
    assert "int8 gains 0.0169" in msg and "more than 0.01 either way" in msg


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        ("fpu sse avx2 avx512f avx512_vnni amx_int8", "AMX-INT8"),
        ("fpu sse avx2 avx512f avx512bw avx512_vnni", "AVX512-VNNI"),
        ("fpu sse avx2 avx_vnni", "AVX-VNNI"),
        ("fpu sse avx2 avx512f avx512bw", "AVX2 (no VNNI)"),
        ("fpu sse sse4_2", "no AVX2"),
    ],
)
def test_cpu_int8_path_from_cpuinfo_flags(tmp_path: Path, flags: str, name: str) -> None:
    from brainseg.export.cpu import int8_path

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n")
    assert int8_path(info)["name"] == name
    assert int8_path(tmp_path / "missing")["name"] == "unknown"


def test_cli_onnx_file_given_as_checkpoint_exit_2(fp32, tmp_path: Path) -> None:
    path, _ = fp32
    r = run_cli(["export", path, "-o", tmp_path / "again.onnx"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{path} is an ONNX model; export takes a .safetensors checkpoint" in r.stderr
    assert "invalid header length" not in r.stderr
    assert not (tmp_path / "again.onnx").exists()


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


# --------------------------------------------------------------------------- cv ensembles
ENS_THRESHOLD, ENS_MIN_SIZE = 0.45, 3


def _fold_checkpoint(
    dest: Path, phantom_root: Path, seed: int, size: int = SIZE, split: object = None
) -> Path:
    """A small fold checkpoint; each seed gives other weights (and other probabilities).
    With ``split`` its card says it is fold ``seed`` of that split, as train writes it."""
    import torch

    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

    torch.manual_seed(seed)
    model = UNetVGG16(encoder_weights=None, decoder_channels=(16, 16, 8, 8, 8)).eval()
    img = tifffile.imread(sorted(phantom_root.glob("*/*_5.tif"))[0])
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        model.decoder.head.weight.mul_(10.0 * (seed + 1))
        model.decoder.head.bias.sub_(float(np.quantile(model(x).numpy(), 0.7 + 0.05 * seed)))
    meta = {
        "image_size": size,
        "threshold": 0.5,  # the fold's own; the ensemble's comes from the manifest
        "postprocess": {"min_size": 0, "largest_component": False},
        "metrics": {"val_dice_patient": 0.6 + 0.01 * seed},
    }
    if split is not None:
        from brainseg.model import card as mc

        meta = mc.with_card(meta, selection="last", split=mc.split_summary(split, seed))
    dest.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(dest, model, meta)


#: The cv figure of the fixture's ensemble.json, as `brainseg cv` writes it.
CV_FIGURE = {"folds": 3, "patients": 6, "dice_patient_before_tuning": 0.512,
             "dice_patient_after_tuning": 0.547, "tuning_chosen_on": "chosen once on the "
             "pooled out-of-fold predictions of 6 patients"}  # fmt: skip


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory, phantom_root: Path):
    """A cv folder with 3 fold checkpoints and its ensemble.json, exported with the CLI:
    (manifest, fold checkpoints, onnx file, JSON report)."""
    from brainseg.data.split import make_split
    from brainseg.ensemble import write_ensemble

    cv = tmp_path_factory.mktemp("cv") / "exp"
    ids = sorted(p.name for p in phantom_root.iterdir() if p.is_dir())
    split = make_split({p: 1.0 for p in ids}, folds=3, seed=0)
    folds = [
        _fold_checkpoint(cv / f"fold_{k}" / "last.safetensors", phantom_root, k, split=split)
        for k in range(3)
    ]
    manifest = write_ensemble(
        cv / "ensemble.json",
        folds,
        ENS_THRESHOLD,
        ENS_MIN_SIZE,
        False,
        {
            "selection": {"select": "last", "label": "final checkpoint of each fold"},
            "tuning": {"objective": "mean patient Dice"},
            "cv_out_of_fold": CV_FIGURE,
        },
    )
    out = cv.parent / "ensemble.onnx"
    r = run_cli(["export", manifest, "-o", out, "--json"])
    assert r.returncode == 0, r.stderr
    return manifest, folds, out, json.loads(r.stdout)


def test_ensemble_onnx_is_the_mean_of_the_folds_probabilities(ensemble, phantom_root) -> None:
    """One ONNX file whose sigmoid output is the mean of the folds' probabilities (each fold
    run by its own Predictor with torch), at the training size and at a second size."""
    from brainseg.data.imageio import resize_image
    from brainseg.inference.predict import Predictor, sigmoid

    _, folds, out, rep = ensemble
    sess = _session(out)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    imgs = [tifffile.imread(p) for p in sorted(phantom_root.glob("*/*_6.tif"))[:2]]
    fold_models = [Predictor(f, device="cpu") for f in folds]
    for size in [(SIZE, SIZE), (96, 128)]:
        batch = np.stack([resize_image(im, size) for im in imgs])
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
        got = sigmoid(sess.run(None, {"image": x})[0][:, 0])
        each = [m.predict_model_size(batch) for m in fold_models]
        mean = np.mean(each, axis=0)
        assert got.shape == mean.shape == (2, *size)
        np.testing.assert_allclose(got, mean, atol=1e-5, rtol=0)
        for p in each:  # every fold counts: the mean is none of them
            assert np.abs(got - p).max() > 1e-2
    assert rep["ensemble_members"] == 3
    (row,) = rep["checks"]
    assert row["max_abs_diff"] < 1e-3 and row["max_abs_diff_2nd_size"] < 1e-3
    assert row["mask_dice_vs_torch"] > 0.99


def test_ensemble_metadata_carries_the_manifest_settings(ensemble) -> None:
    from brainseg.inference.predict import read_onnx_metadata

    manifest, _, out, _ = ensemble
    props = _props(out)
    assert float(props["threshold"]) == ENS_THRESHOLD
    assert json.loads(props["postprocess"]) == {
        "min_size": ENS_MIN_SIZE,
        "largest_component": False,
    }
    assert props["ensemble_members"] == "3"
    assert json.loads(props["ensemble_folds"]) == ["fold_0", "fold_1", "fold_2"]
    assert json.loads(props["image_size"]) == SIZE and props["normalization"] == "imagenet"
    assert json.loads(props["architecture"])["decoder_channels"] == [16, 16, 8, 8, 8]
    meta = read_onnx_metadata(out)  # what predict and eval see
    assert meta["threshold"] == ENS_THRESHOLD and meta["ensemble_members"] == 3
    ens = meta["ensemble"]
    assert ens["folds"] == ["fold_0", "fold_1", "fold_2"] and ens["selection"]["select"] == "last"
    assert ens["fold_metrics"]["fold_1"] == {"val_dice_patient": 0.61}
    assert meta["onnx"]["source"] == manifest.name and "3 fold models" in meta["onnx"]["output"]


def _masks_of(out: Path) -> dict[str, np.ndarray]:
    return {p.name: tifffile.imread(p) for p in sorted(out.rglob("*_mask.tif"))}


def test_predict_with_the_ensemble_onnx_matches_predict_with_the_manifest(
    ensemble, phantom_root: Path, tmp_path: Path
) -> None:
    """`brainseg predict model.onnx` (onnxruntime, the file's metadata) writes the masks
    `brainseg predict ensemble.json` (torch, every fold, the manifest's settings) writes."""
    manifest, _, out, _ = ensemble
    patient = sorted(p for p in phantom_root.iterdir() if p.is_dir())[0]
    for model, dest in ((out, tmp_path / "onnx"), (manifest, tmp_path / "torch")):
        r = run_cli(["predict", model, patient, "-o", dest, "--device", "cpu"])
        assert r.returncode == 0, r.stderr
    a, b = _masks_of(tmp_path / "onnx"), _masks_of(tmp_path / "torch")
    assert a.keys() == b.keys() and len(a) >= 8
    assert sum(int(m.any()) for m in a.values()) >= 2  # some slices have a tumor mask
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_ensemble_int8_refused_and_bad_manifests_exit_2(
    ensemble, phantom_root: Path, tmp_path: Path
) -> None:
    from brainseg.ensemble import write_ensemble

    manifest, folds, _, _ = ensemble
    r = run_cli(["export", manifest, "-o", tmp_path / "m8.onnx", "--int8", "--calib", "x"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--int8 is not supported for an ensemble" in r.stderr and "--fp16" in r.stderr
    # folds trained at different sizes cannot share one graph
    other = _fold_checkpoint(tmp_path / "fold_9" / "last.safetensors", phantom_root, 0, 96)
    mixed = write_ensemble(tmp_path / "mixed.json", [folds[0], other], 0.5, 0, False)
    r = run_cli(["export", mixed, "-o", tmp_path / "mixed.onnx"])
    assert r.returncode == 2 and "different image sizes" in r.stderr
    # a fold file that is gone: named, nothing written
    gone = write_ensemble(
        tmp_path / "gone.json", [folds[0], tmp_path / "nope.safetensors"], 0.5, 0, False
    )
    r = run_cli(["export", gone, "-o", tmp_path / "gone.onnx"])
    assert r.returncode == 2 and "nope.safetensors" in r.stderr and "does not exist" in r.stderr
    assert not any(tmp_path.glob("*.onnx"))


@pytest.mark.slow  # three more fold exports (~60 s on 2 shared cores)
def test_ensemble_fp16(ensemble, tmp_path: Path) -> None:
    """--fp16 of an ensemble: half the file, the merge head kept float32, masks as torch's."""
    manifest, _, _, _ = ensemble
    out = tmp_path / "ens16.onnx"
    r = run_cli(["export", manifest, "-o", out, "--fp16", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    by = {c["model"]: c for c in rep["checks"]}
    assert by["fp16"]["size_mb"] < 0.6 * by["fp32"]["size_mb"]
    assert by["fp16"]["mask_dice_vs_torch"] > 0.98 and by["fp16"]["max_abs_diff"] < 0.5
    assert _props(out)["variant"] == "fp16" and _props(out)["ensemble_members"] == "3"
    got = _session(out).run(None, {"image": np.full((1, 3, 64, 64), 250, np.float32)})[0]
    assert np.isfinite(got).all()


def test_ensemble_onnx_card_describes_the_ensemble(ensemble, phantom_root: Path) -> None:
    """Its card: 3 members, the cv out-of-fold figure, every patient trained (no fold 0
    validation figure or patients), the manifest's threshold and where it was chosen."""
    from brainseg.model.card import read_card

    out = ensemble[2]
    card = read_card(out)
    proto = card["eval_protocol"]
    assert "fold 0" not in json.dumps(proto)  # was: "fold 0 of a 3-fold split", fold 0's Dice
    assert card["training"]["split"]["kind"].startswith("3 models of a 3-fold")
    assert card["training"]["members"][1]["protocol"] == "fold 1 of a 3-fold patient-level split"
    assert proto["protocol"].startswith("3-fold patient-level cross-validation, out of fold")
    assert "each of them trained 2 of its 3 models" in proto["protocol"]
    assert proto["val_patient_ids"] == [] and proto["threshold"] == ENS_THRESHOLD
    assert proto["post_processing"] == f"2D components under {ENS_MIN_SIZE} pixels removed"
    assert proto["settings_chosen"].startswith("by brainseg cv")
    assert card["eval_metrics"] == {
        "cv_out_of_fold_dice_patient_before_tuning": 0.512,
        "cv_out_of_fold_dice_patient_after_tuning": 0.547,
    }
    assert card["evaluation"]["patients"] == 6
    ids = sorted(p.name for p in phantom_root.iterdir() if p.is_dir())
    assert card["training"]["split"]["train_patient_ids"] == ids
    assert [m["name"] for m in card["training"]["members"]] == ["fold_0", "fold_1", "fold_2"]
    assert all(m["train_patients"] == 4 for m in card["training"]["members"])
    assert "used for this model: 6 training patients" in card["data_source"]
    assert card["name"].startswith("brainseg UNet-VGG16 ensemble of 3 fold models")
    # eval of the ONNX file counts its 3 fold graphs and knows each one's training patients
    r = run_cli(["-q", "eval", out, phantom_root, "--json", "--project", out.parent / "ev"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["members"] == 3 and s["trained_on_scored_patients"] == ids
    assert s["training_overlap"]["unknown"] == []
    assert "6 of the 6 scored patients were training patients of 3 of the 3 model(s)" in r.stderr


def test_int8_card_records_its_dice_cost(int8_cli) -> None:
    """The int8 file's own card holds the fp32 / int8 Dice the export measured."""
    from brainseg.model.card import card_markdown, read_card

    out, rep, _ = int8_cli
    card = read_card(out)
    q = card["int8"]
    for k in ("patient_dice_fp32", "patient_dice_int8", "dice_loss", "validation_patients",
              "calibration_patients", "within_tolerance"):  # fmt: skip
        assert q[k] == rep["int8"][k], k
    assert card["onnx"]["variant"] == "int8"
    assert "## Int8" in card_markdown(card) and "**dice_loss**" in card_markdown(card)
