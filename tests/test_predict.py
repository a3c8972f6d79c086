"""brainseg.inference.predict and `brainseg predict`: backends, inputs, outputs, failures,
resuming."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli
from PIL import Image

from brainseg.errors import BrainsegError

SIZE = 64


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, phantom_root: Path) -> dict[str, Path]:
    """A small checkpoint (image_size 64) and its ONNX export, shared by this file's tests.

    The random head is scaled and shifted so about a fifth of a phantom's pixels come out as
    tumor: masks then hold both values, which a constant model would never show.
    """
    import torch

    from brainseg.export.graph import set_metadata, torch_to_onnx
    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

    torch.manual_seed(0)
    model = UNetVGG16(encoder_weights=None, decoder_channels=(16, 16, 8, 8, 8)).eval()
    img = tifffile.imread(next(iter(sorted(phantom_root.glob("*/*_5.tif")))))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        model.decoder.head.weight.mul_(40.0)
        logits = model(x).numpy()
        model.decoder.head.bias.sub_(float(np.quantile(logits, 0.8)))
    d = tmp_path_factory.mktemp("models")
    meta = {
        "image_size": SIZE,
        "threshold": 0.5,
        "postprocess": {"min_size": 0, "largest_component": False},
        "metrics": {"val_dice": 0.5},
    }
    ckpt = save_checkpoint(d / "m.safetensors", model, meta)
    onnx_path = d / "m.onnx"
    import onnx

    torch_to_onnx(model, onnx_path, (SIZE, SIZE), 17)
    proto = onnx.load(str(onnx_path))
    from brainseg.model.checkpoint import read_metadata

    set_metadata(proto, read_metadata(ckpt), "fp32", 17, ckpt.name)
    onnx.save(proto, str(onnx_path))
    return {"ckpt": ckpt, "onnx": onnx_path}


def _phantom(phantom_root: Path, k: int = 5, patient: int = 0) -> np.ndarray:
    folder = sorted(p for p in phantom_root.iterdir() if p.is_dir())[patient]
    return tifffile.imread(folder / f"{folder.name}_{k}.tif")


@pytest.fixture
def scans(tmp_path: Path, phantom_root: Path) -> Path:
    """A nested folder of inputs of several formats and sizes, with a mask to skip."""
    root = tmp_path / "scans"
    (root / "a" / "deep" / "er").mkdir(parents=True)
    (root / "b").mkdir()
    img = _phantom(phantom_root)
    tifffile.imwrite(root / "a" / "x1.tif", img, photometric="rgb")
    tifffile.imwrite(root / "a" / "x1_mask.tif", np.zeros((SIZE, SIZE), np.uint8))
    Image.fromarray(np.asarray(Image.fromarray(img).resize((70, 50)))).save(
        root / "a" / "deep" / "er" / "x2.png"
    )
    Image.fromarray(img[..., 1]).resize((40, 40)).save(root / "b" / "g.png")
    Image.fromarray(_phantom(phantom_root, 7)).save(root / "top.jpg", quality=95)
    (root / "notes.txt").write_text("not an image")
    tifffile.imwrite(root / ".hidden.tif", img, photometric="rgb")
    return root


EXPECTED = {  # input (relative to scans/) -> (mask relative to OUT, input height, width)
    "a/x1.tif": ("a/x1_mask.tif", 64, 64),
    "a/deep/er/x2.png": ("a/deep/er/x2_mask.tif", 50, 70),
    "b/g.png": ("b/g_mask.tif", 40, 40),
    "top.jpg": ("top_mask.tif", 64, 64),
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run the CLI in this process (fast: no interpreter start, onnxruntime stays loaded)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")

    def _run(args: list[str]) -> Result:
        from brainseg import console
        from brainseg.cli.app import main

        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
        finally:
            console.configure(quiet=False, json_mode=False, debug=False)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return _run


def _summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- Predictor


def test_predictor_backends_agree_and_keep_the_input_size(
    models: dict[str, Path], phantom_root: Path
) -> None:
    from brainseg.inference.predict import Predictor

    imgs = np.stack([_phantom(phantom_root, k) for k in (3, 5, 8)])
    pt = Predictor(models["ckpt"], device="cpu", batch_size=2)
    ox = Predictor(models["onnx"], device="cpu", batch_size=2)
    assert pt.backend == "torch" and ox.backend == "onnxruntime"
    for p in (pt, ox):
        assert p.image_size == (SIZE, SIZE)
        assert p.metadata["threshold"] == 0.5
        assert p.metadata["postprocess"] == {"min_size": 0, "largest_component": False}
        assert p.metadata["normalization"] == "imagenet"
        assert p.metadata["metrics"] == {"val_dice": 0.5}
    a, b = pt.predict_proba(imgs), ox.predict_proba(imgs)
    assert a.shape == b.shape == (3, SIZE, SIZE) and a.dtype == b.dtype == np.float32
    assert np.abs(a - b).max() < 1e-4
    assert 0.05 < (a >= 0.5).mean() < 0.6  # the fixture's model marks a fraction as tumor
    # any input size: resized in and back out (or padded)
    odd = np.stack([np.asarray(Image.fromarray(im).resize((70, 50))) for im in imgs[:2]])
    for pad in (False, True):
        pa, pb = pt.predict_proba(odd, pad=pad), ox.predict_proba(odd, pad=pad)
        assert pa.shape == pb.shape == (2, 50, 70)
        assert np.abs(pa - pb).max() < 1e-4


def test_tta_and_ensemble(models: dict[str, Path], phantom_root: Path) -> None:
    from brainseg.inference.predict import Predictor

    imgs = np.stack([_phantom(phantom_root, k) for k in (4, 6)])
    plain = Predictor(models["onnx"], device="cpu").predict_proba(imgs)
    tta = Predictor(models["onnx"], device="cpu", tta=True).predict_proba(imgs)
    # TTA = mean of the image and its two flips, computed here by hand
    single = Predictor(models["onnx"], device="cpu")
    h = single.predict_proba(np.ascontiguousarray(imgs[:, :, ::-1]))[:, :, ::-1]
    v = single.predict_proba(np.ascontiguousarray(imgs[:, ::-1]))[:, ::-1]
    np.testing.assert_allclose(tta, (plain + h + v) / 3, atol=1e-5)
    both = Predictor([models["onnx"], models["ckpt"]], device="cpu")
    assert both.backend == "onnxruntime+torch"
    np.testing.assert_allclose(both.predict_proba(imgs), plain, atol=1e-4)


def test_predictor_rejects_bad_batches(models: dict[str, Path]) -> None:
    from brainseg.inference.predict import Predictor

    p = Predictor(models["onnx"], device="cpu")
    with pytest.raises(BrainsegError, match="uint8"):
        p.predict_proba(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(BrainsegError, match=r"N x H x W x 3"):
        p.predict_proba(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(BrainsegError, match="not a multiple of 32"):
        p.predict_model_size(np.zeros((1, 50, 64, 3), np.uint8))
    with pytest.raises(BrainsegError, match="unknown device"):
        Predictor(models["onnx"], device="tpu")


def test_onnx_metadata_plain_keys_win_over_the_blob(
    models: dict[str, Path], tmp_path: Path
) -> None:
    import onnx

    from brainseg.inference.predict import read_onnx_metadata

    proto = onnx.load(str(models["onnx"]))
    for p in proto.metadata_props:
        if p.key == "threshold":
            p.value = "0.25"
    onnx.save(proto, str(tmp_path / "tuned.onnx"))
    meta = read_onnx_metadata(tmp_path / "tuned.onnx")
    assert meta["threshold"] == 0.25 and meta["image_size"] == SIZE


# --------------------------------------------------------------------------- CLI: outputs


def test_folder_nested_layout_masks_and_summary(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    r = run(["predict", models["onnx"], scans, "-o", tmp_path / "out", "--batch-size", "3"])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    produced = sorted(str(p.relative_to(out)) for p in out.rglob("*_mask.tif"))
    assert produced == sorted(v[0] for v in EXPECTED.values())  # no x1_mask_mask, no hidden
    for src, (dst, h, w) in EXPECTED.items():
        m = tifffile.imread(out / dst)
        assert m.dtype == np.uint8 and m.shape == (h, w), src
        assert set(np.unique(m)) <= {0, 255}
    assert len(set(np.unique(tifffile.imread(out / "a/x1_mask.tif")))) == 2  # both values
    rows = _summary(out / "summary.csv")
    assert [Path(r["path"]).relative_to(scans).as_posix() for r in rows] == [
        "top.jpg",
        "a/x1.tif",
        "a/deep/er/x2.png",
        "b/g.png",
    ]  # sorted, files before folders
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        m = tifffile.imread(row["output"])
        assert int(row["tumor_pixels"]) == int((m == 255).sum())
        assert float(row["tumor_fraction"]) == pytest.approx((m == 255).mean(), abs=1e-5)
        assert row["has_tumor"] == str(int((m == 255).any()))
        assert 0.0 <= float(row["max_probability"]) <= 1.0
    assert "replicated to 3 channels" in r.stderr  # the grey png, warned once
    assert r.stdout.count("written") == 1  # the summary table


def test_torch_checkpoint_png_format(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    r = run(
        [
            "predict",
            models["ckpt"],
            scans / "a",
            "-o",
            tmp_path / "o",
            "--format",
            "png",
            "--device",
            "cpu",
        ]
    )
    assert r.returncode == 0, r.stderr
    m = np.asarray(Image.open(tmp_path / "o" / "x1_mask.png"))
    assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
    assert (tmp_path / "o" / "deep" / "er" / "x2_mask.png").is_file()


def test_glob_and_explicit_files(run, models: dict[str, Path], scans: Path, tmp_path: Path) -> None:
    r = run(["predict", models["onnx"], "scans/**/*.png", "-o", "out"])
    assert r.returncode == 0, r.stderr
    assert sorted(
        str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*_mask.tif")
    ) == ["a/deep/er/x2_mask.tif", "b/g_mask.tif"]
    r = run(["predict", models["onnx"], "scans/a/*.tif", "-o", "out2"])
    assert r.returncode == 0
    assert [p.name for p in (tmp_path / "out2").rglob("*_mask.tif")] == ["x1_mask.tif"]
    # an explicit file keeps its path relative to the current folder
    r = run(["predict", models["onnx"], "scans/top.jpg", "-o", "out3"])
    assert r.returncode == 0
    assert (tmp_path / "out3" / "scans" / "top_mask.tif").is_file()


def test_stdin_paths_and_json_lines(models: dict[str, Path], scans: Path, tmp_path: Path) -> None:
    listing = "\n".join(["scans/a/x1.tif", "", "scans/b/g.png", "scans/missing.tif"]) + "\n"
    r = run_cli(
        ["predict", models["onnx"], "-", "-o", "out", "--json"], input=listing, cwd=tmp_path
    )
    assert r.returncode == 1, r.stderr  # the missing file failed, the others did not
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["status"] for x in lines] == ["ok", "ok", "error"]
    assert lines[0]["output"] == "out/scans/a/x1_mask.tif"
    assert (tmp_path / lines[1]["output"]).is_file()
    assert "missing.tif" in lines[2]["error"] and "no such file" in lines[2]["error"]
    assert set(lines[0]) >= {
        "path",
        "output",
        "tumor_pixels",
        "tumor_fraction",
        "max_probability",
        "has_tumor",
        "status",
        "error",
    }
    assert "missing.tif" in r.stderr and "Traceback" not in r.stderr


def test_pad_overlay_probabilities_jsonl(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    r = run(
        [
            "predict",
            models["onnx"],
            scans,
            "-o",
            "out",
            "--pad",
            "--overlay",
            "--probabilities",
            "--summary",
            "jsonl",
            "--threshold",
            "0.5",
            "--min-size",
            "3",
        ]
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    for _src, (dst, h, w) in EXPECTED.items():
        stem = dst[: -len("_mask.tif")]
        m = tifffile.imread(out / dst)
        p = tifffile.imread(out / f"{stem}_prob.tif")
        ov = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert m.shape == p.shape == (h, w) and ov.shape == (h, w, 3)
        assert p.dtype == np.float32 and 0 <= p.min() <= p.max() <= 1
        np.testing.assert_array_equal(m == 255, _post(p >= 0.5, 3))
    rows = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(x["status"] == "ok" for x in rows)


def _post(mask: np.ndarray, min_size: int) -> np.ndarray:
    from brainseg.inference.postprocess import remove_small

    return remove_small(mask, min_size)


def test_min_size_and_threshold_overrides(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    r = run(["predict", models["onnx"], scans / "a" / "x1.tif", "-o", "lo", "--threshold", "0"])
    assert r.returncode == 0
    assert tifffile.imread(next((tmp_path / "lo").rglob("x1_mask.tif"))).min() == 255
    r = run(
        ["predict", models["onnx"], scans / "a" / "x1.tif", "-o", "hi", "--min-size", str(64 * 64)]
    )
    assert r.returncode == 0
    assert tifffile.imread(next((tmp_path / "hi").rglob("x1_mask.tif"))).max() == 0


# --------------------------------------------------------------------------- CLI: failures


def test_unreadable_files_are_reported_and_skipped(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    (scans / "a" / "corrupt.tif").write_bytes(b"II*\x00garbage" * 10)
    (scans / "b" / "text.png").write_text("hello")
    tifffile.imwrite(
        scans / "b" / "five.tif",
        np.zeros((8, 8, 5), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
    )
    r = run(["predict", models["onnx"], scans, "-o", "out"])
    assert r.returncode == 1
    rows = {Path(x["path"]).name: x for x in _summary(tmp_path / "out" / "summary.csv")}
    assert len(rows) == 7
    for bad in ("corrupt.tif", "text.png", "five.tif"):
        assert rows[bad]["status"] == "error" and bad in rows[bad]["error"]
        assert rows[bad]["output"] == ""
        assert r.stderr.count(f"{bad}:") == 1, r.stderr  # one warning line each
    assert "3 channels" in rows["five.tif"]["error"]
    for good in ("x1.tif", "x2.png", "g.png", "top.jpg"):
        assert rows[good]["status"] == "ok" and Path(rows[good]["output"]).is_file()
    assert "3 of 7 file(s) failed" in r.stderr


def test_empty_input_is_exit_2(run, models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a_mask.tif").write_bytes(b"")
    r = run(["predict", models["onnx"], tmp_path / "empty", "-o", tmp_path / "out"])
    assert r.returncode == 2
    assert "no images found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = run(["predict", models["onnx"], "nothing/*.tif", "-o", "out"])
    assert r.returncode == 2 and "no images found" in r.stderr
    r = run(["predict", models["onnx"], "does-not-exist", "-o", "out"])
    assert r.returncode == 2 and "does-not-exist does not exist" in r.stderr


def test_corrupt_and_foreign_models_are_exit_2(
    run, scans: Path, tmp_path: Path, models: dict[str, Path]
) -> None:
    import onnx
    from onnx import TensorProto, helper

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(models["onnx"].read_bytes()[:5000])
    badck = tmp_path / "bad.safetensors"
    badck.write_bytes(b"\x00" * 100)
    # a valid ONNX model of another tool: right shapes, no brainseg metadata
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, "h", "w"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [1.0, 1.0, 1.0])
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(foreign))
    # brainseg metadata but the wrong input/output shape
    y2 = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "h", "w"])
    g2 = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y2])
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(m2, {"brainseg": json.dumps({"image_size": 64})})
    wrong = tmp_path / "wrong.onnx"
    onnx.save(m2, str(wrong))
    cases = {
        bad: "not a valid ONNX file",
        badck: "not a safetensors file",
        foreign: "without brainseg metadata",
        wrong: "not those of a brainseg model",
        tmp_path / "model.pt": "not a model file",
    }
    (tmp_path / "model.pt").write_bytes(b"x")
    for model, msg in cases.items():
        r = run(["predict", model, scans, "-o", tmp_path / "out"])
        assert r.returncode == 2, (model, r.stderr)
        assert msg in r.stderr and model.name in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_bad_options_are_exit_2(run, models: dict[str, Path], scans: Path, tmp_path: Path) -> None:
    for args, msg in [
        (["--shard", "2/2"], "0 <= I < N"),
        (["--shard", "1"], "not of the form I/N"),
        (["--force", "--skip-existing"], "cannot be used together"),
        (["--format", "jpg"], "--format 'jpg'"),
        (["--summary", "xml"], "--summary 'xml'"),
    ]:
        r = run(["predict", models["onnx"], scans, "-o", tmp_path / "o", *args])
        assert r.returncode == 2, args
        assert msg in r.stderr, r.stderr
    (tmp_path / "file").write_text("x")
    r = run(["predict", models["onnx"], scans, "-o", tmp_path / "file"])
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr


# --------------------------------------------------------------------------- resuming


def test_skip_existing_and_force(run, models: dict[str, Path], scans: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(["predict", models["onnx"], scans, "-o", out]).returncode == 0
    mask = out / "a" / "x1_mask.tif"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*_mask.tif")}
    # a second run into the same folder is refused up front
    r = run(["predict", models["onnx"], scans, "-o", out])
    assert r.returncode == 2 and "summary.csv already exists" in r.stderr
    # an interrupted run: one mask missing -> only that one is made again
    (out / "b" / "g_mask.tif").unlink()
    r = run(["predict", models["onnx"], scans, "-o", out, "--skip-existing"])
    assert r.returncode == 0, r.stderr
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*_mask.tif")}
    assert (out / "b" / "g_mask.tif").is_file()
    assert all(after[p] == t for p, t in before.items() if p.name != "g_mask.tif")
    rows = {Path(x["path"]).name: x for x in _summary(out / "summary.csv")}
    assert rows["g.png"]["status"] == "ok"
    assert rows["x1.tif"]["status"] == "skipped" and rows["x1.tif"]["tumor_pixels"] != ""
    # without the summary, existing masks are an error per file (never overwritten)
    (out / "summary.csv").unlink()
    tifffile.imwrite(mask, np.zeros((64, 64), np.uint8))
    r = run(["predict", models["onnx"], scans, "-o", out])
    assert r.returncode == 1
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert tifffile.imread(mask).max() == 0
    r = run(["predict", models["onnx"], scans, "-o", out, "--force"])
    assert r.returncode == 0
    assert tifffile.imread(mask).max() == 255


def test_shards_cover_every_file_once(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    seen: list[str] = []
    for i in (0, 1):
        r = run(
            [
                "predict",
                models["onnx"],
                scans,
                "-o",
                tmp_path / "out",
                "--shard",
                f"{i}/2",
                "--json",
            ]
        )
        assert r.returncode == 0, r.stderr
        seen += [json.loads(x)["path"] for x in r.stdout.splitlines()]
        assert (tmp_path / "out" / f"summary-{i}-of-2.csv").is_file()
    assert sorted(seen) == sorted(str(scans / k) for k in EXPECTED)
    assert len(seen) == len(set(seen)) == 4
    r = run(["predict", models["onnx"], scans / "top.jpg", "-o", tmp_path / "o3", "--shard", "1/3"])
    assert r.returncode == 0 and "no file of the input falls in this shard" in r.stderr


# --------------------------------------------------------------------------- safety


def test_outputs_never_escape_out(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    os.chdir(work)
    # "../scans/..." climbs out of the current folder: mirrored below OUT by absolute path
    r = run(["predict", models["onnx"], "../scans/top.jpg", "-o", "out"])
    assert r.returncode == 0, r.stderr
    made = list((work / "out").rglob("top_mask.tif"))
    assert len(made) == 1 and made[0].is_relative_to(work / "out")
    assert not (tmp_path / "scans" / "top_mask.tif").exists()
    # a link inside OUT that points outside it is refused for that file
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "out2"
    out.mkdir()
    (out / "a").symlink_to(outside, target_is_directory=True)
    r = run(["predict", models["onnx"], scans, "-o", out])
    assert r.returncode == 1
    rows = {Path(x["path"]).name: x for x in _summary(out / "summary.csv")}
    assert rows["x1.tif"]["status"] == "error" and "outside" in rows["x1.tif"]["error"]
    assert rows["top.jpg"]["status"] == "ok"
    assert list(outside.rglob("*")) == []


def test_duplicate_outputs_in_one_run(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    shutil.copy(scans / "b" / "g.png", scans / "b" / "g.jpg")
    r = run(["predict", models["onnx"], scans / "b", "-o", "out"])
    assert r.returncode == 1
    rows = _summary(tmp_path / "out" / "summary.csv")
    assert [x["status"] for x in rows] == ["ok", "error"]
    assert "another input already writes" in rows[1]["error"]


def test_symlink_loops_are_not_followed(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    (scans / "a" / "loop").symlink_to(scans, target_is_directory=True)
    from brainseg.inference.batch import iter_inputs
    from brainseg.inference.pipeline import PredictOptions

    opts = PredictOptions(models=[], inputs=[str(scans)], out_dir=tmp_path / "out")
    found = [f.rel.as_posix() for f in iter_inputs(opts)]
    assert sorted(found) == sorted(EXPECTED)


def test_output_folder_inside_the_input_is_not_read(
    run, models: dict[str, Path], scans: Path
) -> None:
    r = run(["predict", models["onnx"], scans, "-o", scans / "zz_pred", "--overlay"])
    assert r.returncode == 0
    r = run(
        [
            "predict",
            models["onnx"],
            scans,
            "-o",
            scans / "zz_pred",
            "--overlay",
            "--skip-existing",
            "--json",
        ]
    )
    assert r.returncode == 0
    assert len(r.stdout.splitlines()) == 4  # the overlays in zz_pred were not taken as inputs


def test_onnx_predict_path_imports_no_torch(
    models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    code = (
        "import sys\n"
        "from brainseg.cli.app import main\n"
        "try:\n"
        f"    main(['-q', 'predict', {str(models['onnx'])!r}, {str(scans)!r}, '-o', "
        f"{str(tmp_path / 'o')!r}, '--overlay', '--probabilities', '--tta'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('TORCH', sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "TORCH []" in out.stdout
    assert len(list((tmp_path / "o").rglob("*_mask.tif"))) == 4


def test_cpu_only_deployment_without_torch(
    models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    """What `pip install brainseg --no-deps` + onnxruntime gives: torch cannot be imported."""
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision'):\n"
        "    sys.modules[m] = None  # import torch now raises ImportError\n"
        "from brainseg.cli.app import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    sys.exit(e.code)\n"
    )
    ok = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "predict",
            str(models["onnx"]),
            str(scans),
            "-o",
            str(tmp_path / "o"),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 4
    no = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "predict",
            str(models["ckpt"]),
            str(scans),
            "-o",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
    )
    assert no.returncode == 2
    assert "PyTorch is not installed" in no.stderr and "brainseg export" in no.stderr


def test_interrupted_run_keeps_its_summary_and_resumes(
    models: dict[str, Path], phantom_root: Path, tmp_path: Path
) -> None:
    import signal

    src = tmp_path / "scans"
    for folder in sorted(p for p in phantom_root.iterdir() if p.is_dir())[:2]:
        shutil.copytree(folder, src / folder.name)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "brainseg",
        "predict",
        str(models["onnx"]),
        str(src),
        "-o",
        str(out),
        "--json",
        "--batch-size",
        "1",
        "--workers",
        "1",
    ]
    # Ctrl-C as a terminal sends it: a test run started in the background (`cmd &` in a
    # script) inherits SIGINT ignored, and Python then installs no Ctrl-C handler in the child
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = [proc.stdout.readline() for _ in range(3)]  # three files done: interrupt now
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "--skip-existing" in err
    done = [json.loads(x) for x in first + rest.splitlines() if x.strip()]
    rows = _summary(out / "summary.csv")
    assert len(rows) == len(done) >= 3  # every reported file is in the summary
    total = len(list(src.glob("*/*.tif"))) // 2
    assert len(rows) < total
    assert not list(out.rglob(".*.tmp"))  # no half-written file left behind
    masks_before = {p: p.stat().st_mtime_ns for p in out.rglob("*_mask.tif")}
    r = run_cli(["predict", models["onnx"], src, "-o", out, "--skip-existing"])
    assert r.returncode == 0, r.stderr
    rows = _summary(out / "summary.csv")
    assert len(rows) == total
    assert sum(x["status"] == "skipped" for x in rows) == len(masks_before)
    assert all(p.stat().st_mtime_ns == t for p, t in masks_before.items())


def test_closed_stdout_stops_quietly(
    models: dict[str, Path], phantom_root: Path, tmp_path: Path
) -> None:
    """`brainseg predict ... --json | head -1`: stop without a traceback, exit 141."""
    cmd = [
        sys.executable,
        "-m",
        "brainseg",
        "predict",
        str(models["onnx"]),
        str(phantom_root),  # ~200 files: far more than can finish before the close
        "-o",
        str(tmp_path / "out"),
        "--json",
        "--batch-size",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["status"] == "ok"
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "stdout closed" in err
    assert len(_summary(tmp_path / "out" / "summary.csv")) >= 1


# --------------------------------------------------------------------------- predict == eval


def _second_onnx(src: Path, dst: Path, bias: float) -> Path:
    """A copy of a tiny ONNX model with another bias: a different model, same metadata."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    for init in proto.graph.initializer:
        if init.name == "b":
            init.CopyFrom(numpy_helper.from_array(np.array([bias], np.float32), "b"))
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("size", [96, 128])
def test_written_mask_is_prob_thresholded_and_what_eval_scores(
    run, tmp_path: Path, size: int
) -> None:
    """A 64x64 model on larger images: _mask.tif == _prob.tif >= threshold == eval's mask,
    pixel for pixel, and summary.csv's max_probability is exactly the _prob.tif maximum."""
    from _tiny import tiny_onnx

    from brainseg.data.synthetic import write_synthetic
    from brainseg.evaluation import dataset as ev

    model = tiny_onnx(tmp_path / "m.onnx", image_size=64)
    data = write_synthetic(tmp_path / "d", patients=2, seed=3, size=size, slices=(4, 6))
    r = run(["predict", model, data, "-o", "out", "--probabilities", "--min-size", "3"])
    assert r.returncode == 0, r.stderr
    res = ev.run_eval([model], data, opts=ev.EvalOptions(device="cpu", min_size=3, largest=False))
    eval_pixels = {
        (x["patient_id"], int(x["slice_number"])): x["pred_pixels"] for x in res.report.per_slice
    }
    rows = _summary(tmp_path / "out" / "summary.csv")
    assert len(rows) == len(eval_pixels) > 0
    marked = 0
    for row in rows:
        mask = tifffile.imread(row["output"]) == 255
        prob = tifffile.imread(row["output"].replace("_mask.tif", "_prob.tif"))
        assert mask.shape == prob.shape == (size, size)
        np.testing.assert_array_equal(mask, _post(prob >= 0.5, 3))
        assert float(row["max_probability"]) == float(prob.max())
        src = Path(row["path"])
        key = (src.parent.name, int(src.stem.rsplit("_", 1)[1]))
        assert int(mask.sum()) == eval_pixels[key], key
        marked += int(mask.sum())
    assert marked > 0  # the check saw tumor pixels, not only empty masks


def test_ensemble_is_the_mean_of_two_different_models(tmp_path: Path, phantom_root: Path) -> None:
    from _tiny import tiny_onnx

    from brainseg.inference.predict import Predictor

    a = tiny_onnx(tmp_path / "a.onnx")
    b = _second_onnx(a, tmp_path / "b.onnx", bias=-8.0)
    imgs = np.stack([_phantom(phantom_root, k) for k in (4, 6)])
    pa = Predictor(a, device="cpu").predict_proba(imgs)
    pb = Predictor(b, device="cpu").predict_proba(imgs)
    assert np.abs(pa - pb).max() > 0.1  # really two models
    both = Predictor([a, b], device="cpu").predict_proba(imgs)
    np.testing.assert_allclose(both, (pa + pb) / 2, atol=1e-6)


# --------------------------------------------------------------------------- ground truth


def test_ground_truth_masks_are_never_inputs_by_accident(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    listing = "scans/a/x1.tif\nscans/a/x1_mask.tif\n"
    r = run_cli(
        ["predict", models["onnx"], "-", "-o", "out", "--json"], input=listing, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["path"] for x in r.stdout.splitlines()] == ["scans/a/x1.tif"]
    assert not list((tmp_path / "out").rglob("*_mask_mask.tif"))
    assert "1 ground-truth mask file(s)" in r.stderr
    r = run(["predict", models["onnx"], "scans/a/x1_mask.tif", "-o", "out2"])
    assert (
        r.returncode == 2 and "is a ground-truth mask" in r.stderr and "--include-masks" in r.stderr
    )
    assert not (tmp_path / "out2").exists()
    r = run(["predict", models["onnx"], "scans/a/x1_mask.tif", "-o", "out3", "--include-masks"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out3" / "scans" / "a" / "x1_mask_mask.tif").is_file()


@pytest.mark.parametrize("force", [False, True])
def test_output_into_the_data_is_refused(
    run, models: dict[str, Path], scans: Path, force: bool
) -> None:
    before = {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()}
    r = run(["predict", models["onnx"], scans, "-o", scans, *(["--force"] if force else [])])
    assert r.returncode == 2, r.stderr
    assert "ground-truth mask name" in r.stderr and "choose an -o folder outside" in r.stderr
    after = {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()}
    assert after == before  # nothing written, no summary.csv left in the data


def test_files_skipped_for_their_type_are_reported(
    run, models: dict[str, Path], scans: Path
) -> None:
    Image.fromarray(_phantom_like()).save(scans / "b" / "scan.bmp")
    r = run(["predict", models["onnx"], scans, "-o", "out"])
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if "of a type predict does not read" in x)
    assert "skipped 2 file(s)" in line and "notes.txt" in line and "scan.bmp" in line


def _phantom_like() -> np.ndarray:
    return np.full((64, 64, 3), 100, np.uint8)


# --------------------------------------------------------------------------- model files


def test_model_file_content_is_sniffed(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    from brainseg.model.checkpoint import load_checkpoint, read_metadata, sniff_model_file

    assert sniff_model_file(models["ckpt"]) == "safetensors"
    assert sniff_model_file(models["onnx"]) == "onnx"
    fake_onnx = tmp_path / "ck.onnx"
    shutil.copyfile(models["ckpt"], fake_onnx)
    fake_ckpt = tmp_path / "m.safetensors"
    shutil.copyfile(models["onnx"], fake_ckpt)
    r = run(["predict", fake_onnx, scans, "-o", "o1"])
    assert r.returncode == 2 and "is a safetensors checkpoint, not an ONNX model" in r.stderr
    assert "ck.safetensors" in r.stderr  # the hint: rename it
    r = run(["predict", fake_ckpt, scans, "-o", "o2"])
    assert r.returncode == 2 and "is an ONNX model, not a safetensors checkpoint" in r.stderr
    for fn in (read_metadata, load_checkpoint):
        with pytest.raises(BrainsegError, match=r"is an ONNX model.*takes a \.safetensors"):
            fn(models["onnx"])


def test_usage_lines_name_arguments_in_posix_style(run) -> None:
    want = {
        "predict": "brainseg predict [OPTIONS] MODEL INPUT...",
        "eval": "brainseg eval [OPTIONS] MODEL... DATA",
        "export": "brainseg export [OPTIONS] CHECKPOINT",
        "train": "brainseg train [OPTIONS] [DATA]",
    }
    for command, line in want.items():
        r = run([command, "--help"])
        usage = next(x for x in r.stdout.splitlines() if "Usage:" in x)
        assert usage.split("Usage:")[1].strip() == line, usage
        assert "{" not in usage


# --------------------------------------------------------------------------- issue 22


def test_summary_has_the_mode_of_every_other_output(
    run, models: dict[str, Path], scans: Path, tmp_path: Path
) -> None:
    import stat

    old = os.umask(0o022)
    try:
        r = run(["predict", models["onnx"], scans, "-o", "out"])
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes["summary.csv"] == modes["top_mask.tif"] == 0o644, modes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _tiny import tiny_onnx

    return tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def _png(path: Path | bytes, seed: int = 0) -> None:
    from _tiny import encode, image

    with open(path, "wb") as f:
        f.write(encode(image(seed), "png"))


def _cli_bytes(args: list, stdin: bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    # strict UTF-8 stdio, as in a user's en_US.UTF-8 terminal (the C locale is lenient)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8:strict"}
    return subprocess.run(
        [sys.executable, "-m", "brainseg", *map(str, args)],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=120,  # a hang fails the test instead of stalling the suite
    )


def _one_line_errors(stderr: str) -> None:
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    for line in stderr.splitlines():  # every line is a message of its own
        assert line.startswith(
            ("error:", "warning:", "hint:", "model ", "summary:", "predict")
        ) or (line.strip() == "" or "│" in line or "┃" in line or "━" in line or "─" in line), (
            line,
            stderr,
        )


def test_fifos_in_a_folder_and_on_stdin_are_skipped_with_a_reason(tiny: Path, tmp_path: Path):
    scans = tmp_path / "scans"
    scans.mkdir()
    _png(scans / "a.png")
    os.mkfifo(scans / "f.png")  # nobody ever writes to it: reading it would block forever
    r = run_cli(["predict", tiny, scans, "-o", "out", "--json"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["path"] for x in r.stdout.splitlines()] == [str(scans / "a.png")]
    line = next(x for x in r.stderr.splitlines() if "f.png" in x)
    assert "not regular files" in line and "FIFO" in line
    r = run_cli(["predict", tiny, "-", "-o", "out2", "--json"], input="scans/f.png\nscans/a.png\n",
                cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 1, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["path"], x["status"]) for x in rows] == [
        ("scans/f.png", "error"),
        ("scans/a.png", "ok"),
    ]
    assert "FIFO" in rows[0]["error"] and "not a regular file" in rows[0]["error"]


def test_odd_names_and_stdin_garbage_are_rows_of_their_own(tiny: Path, tmp_path: Path) -> None:
    """A non-UTF-8 name, a name with a newline, invalid UTF-8, NUL and an over-long line on
    stdin: each is that file's row (one-line error), the run goes on and the summary is whole."""
    scans = tmp_path / "scans"
    scans.mkdir()
    bad = os.fsencode(scans) + b"/\xe9t\xe9.png"  # latin-1 "été": not UTF-8
    _png(bad)
    for i in range(3):
        _png(scans / f"ok{i}.png", i)
    (scans / "new\nline.png").write_bytes(b"not a png")  # unreadable: an error row
    r = _cli_bytes(["predict", tiny, "scans", "-o", "out", "--json"], b"", tmp_path)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, err
    _one_line_errors(err)
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert len(rows) == 5 and [x["status"] for x in rows].count("ok") == 4, rows
    assert os.path.exists(os.fsencode(tmp_path) + b"/out/\xe9t\xe9_mask.tif")
    assert "scans/new\\nline.png" in err  # escaped, on one line
    assert len(_summary(tmp_path / "out" / "summary.csv")) == 5
    (tmp_path / "out" / "summary.csv").read_text(encoding="utf-8")  # valid UTF-8

    stdin = (
        b"scans/ok0.png\n" + bad + b"\n" + b"scans/\xff\xfe.png\n" + b"scans/nul\x00.png\n"
        + b"scans/" + b"x" * 100_000 + b".png\n" + b"scans/ok1.png\n"
    )  # fmt: skip
    r = _cli_bytes(["predict", tiny, "-", "-o", "out2", "--json"], stdin, tmp_path)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, err
    _one_line_errors(err)
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["status"] for x in rows] == ["ok", "ok", "error", "error", "error", "ok"], rows
    assert "no such file" in rows[2]["error"] and "\\xff\\xfe" in rows[2]["error"]
    assert "NUL" in rows[3]["error"] and "longer than" in rows[4]["error"]
    assert len(_summary(tmp_path / "out2" / "summary.csv")) == 6


def test_output_folder_inside_an_input_still_predicts_the_files_there(tiny: Path, tmp_path):
    data = tmp_path / "data" / "kaggle_3m"
    for pid, n in (("P1", 3), ("P2", 2)):
        (data / pid).mkdir(parents=True)
        for k in range(1, n + 1):
            _png(data / pid / f"{pid}_{k}.png", k)
            _png(data / pid / f"{pid}_{k}_mask.png", 0)
    (data / "README.md").write_text("# dataset\n")
    (data / "data.csv").write_text("Patient,x\nP1,1\n")
    out = data / "P1"
    r = run_cli(["predict", tiny, tmp_path / "data", "-o", out, "--overlay", "--json"],
                cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    done = sorted(Path(json.loads(x)["path"]).name for x in r.stdout.splitlines())
    assert done == ["P1_1.png", "P1_2.png", "P1_3.png", "P2_1.png", "P2_2.png"]
    assert "README.md" not in r.stderr and "data.csv" not in r.stderr  # known side files
    r = run_cli(["predict", tiny, tmp_path / "data", "-o", out, "--overlay", "--skip-existing",
                 "--json"], cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 5 and {x["status"] for x in rows} == {"skipped"}  # outputs not inputs


def test_a_later_run_over_fewer_files_keeps_the_earlier_rows(tiny: Path, tmp_path: Path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        _png(scans / f"x{i}.png", i)
    r = run_cli(["predict", tiny, "scans/*.png", "-o", "out"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli(["predict", tiny, "scans/x1*.png", "-o", "out", "--force"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = _summary(tmp_path / "out" / "summary.csv")
    assert sorted((x["path"], x["status"]) for x in rows) == [
        ("scans/x0.png", "ok"), ("scans/x1.png", "ok"), ("scans/x2.png", "ok")
    ]  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until ``path`` exists (an event of the other process), failing if it exits."""
    import time

    for _ in range(1200):  # 60 s at most: a bound against a hang, not a timing check
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{what} ended first: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"{what}: {path} never appeared")


def test_a_second_run_into_a_folder_in_use_is_refused(tiny: Path, tmp_path: Path) -> None:
    """Run 1 is held inside its run by its stdin (a pipe this test controls); run 2 into the
    same folder is refused with run 1's host and pid and changes nothing; run 1 then ends
    normally and its summary is whole."""
    import socket

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        _png(scans / f"x{i}.png", i)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    run1 = subprocess.Popen(
        [sys.executable, "-m", "brainseg", "predict", str(tiny), "-", "-o", "out"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    try:
        assert run1.stdin is not None
        run1.stdin.write(b"scans/x0.png\n")
        run1.stdin.flush()
        _wait_for(tmp_path / "out" / ".brainseg-predict.lock", run1, "run 1")
        before = sorted(p.name for p in (tmp_path / "out").iterdir())
        for flags in ([], ["--skip-existing"], ["--force"]):
            r = run_cli(["predict", tiny, "scans", "-o", "out", *flags], cwd=tmp_path)
            assert r.returncode == 2, (flags, r.stderr)
            assert "in use by another run" in r.stderr, r.stderr
            assert f"pid {run1.pid} on host {socket.gethostname()}" in r.stderr, r.stderr
            assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
        run1.stdin.write(b"scans/x1.png\nscans/x2.png\n")
        run1.stdin.close()
        assert run1.wait(timeout=120) == 0, run1.communicate()
    finally:
        if run1.poll() is None:
            run1.kill()
            run1.wait()
    rows = _summary(tmp_path / "out" / "summary.csv")
    assert [(x["path"], x["status"]) for x in rows] == [(f"scans/x{i}.png", "ok") for i in range(3)]
    assert not (tmp_path / "out" / ".brainseg-predict.lock").exists()  # released at the end


def test_stale_and_foreign_locks(tiny: Path, tmp_path: Path) -> None:
    import socket

    from test_fsutil import dead_pid

    scans = tmp_path / "scans"
    scans.mkdir()
    _png(scans / "x0.png")
    lock = tmp_path / "out" / ".brainseg-predict.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    r = run_cli(["predict", tiny, "scans", "-o", "out"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # a killed run's lock is taken over
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "elsewhere.example", "pid": 4242}))
    r = run_cli(["predict", tiny, "scans", "-o", "out", "--force"], cwd=tmp_path)
    assert r.returncode == 2 and "pid 4242 on host elsewhere.example" in r.stderr, r.stderr
    assert "delete out/.brainseg-predict.lock" in r.stderr  # what to do if that run is over


def test_a_named_path_with_a_newline_is_named_on_one_line(tiny: Path, tmp_path: Path) -> None:
    r = run_cli(["predict", tiny, "no\nsuch.png", "-o", "out"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[0] == "error: input no\\nsuch.png does not exist", r.stderr
