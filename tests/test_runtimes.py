"""The runtimes of an .onnx file (onnxruntime, OpenVINO) and of a checkpoint (torch), and what
``--runtime auto`` picks: masks agree with onnxruntime's (the independent oracle: a second
runtime reading the same file), the choice is said, a missing OpenVINO is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from brainseg.errors import BrainsegError
from brainseg.inference import runtimes

SIZE = 64
#: Documented agreement (docs/export.md, "Runtimes and CPU kinds"): OpenVINO bf16 masks vs
#: onnxruntime fp32 on the same file.
BF16_MIN_DICE = 0.98
NATIVE_BF16 = runtimes.native_bf16(runtimes.cpu_flags())
needs_bf16 = pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16 not in cpuinfo)"
)
needs_openvino = pytest.mark.skipif(
    not runtimes._installed("openvino"), reason="openvino is not installed (brainseg[openvino])"
)


@pytest.fixture(autouse=True)
def _no_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)  # conftest pins onnxruntime


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, phantom_root: Path) -> dict[str, Path]:
    """A small UNetVGG16 checkpoint, its fp32 ONNX export and an int8 QDQ variant."""
    import onnx
    import torch

    from brainseg.export.graph import set_metadata, torch_to_onnx
    from brainseg.export.variants import quantize_int8
    from brainseg.model.checkpoint import read_metadata, save_checkpoint
    from brainseg.model.unet import UNetVGG16

    torch.manual_seed(0)
    model = UNetVGG16(encoder_weights=None, decoder_channels=(16, 16, 8, 8, 8)).eval()
    imgs = _images(phantom_root)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    with torch.no_grad():  # about a fifth of the pixels tumor: masks hold both values
        model.decoder.head.weight.mul_(40.0)
        model.decoder.head.bias.sub_(float(np.quantile(model(x).numpy(), 0.8)))
    d = tmp_path_factory.mktemp("runtimes")
    meta = {
        "image_size": SIZE,
        "threshold": 0.5,
        "postprocess": {"min_size": 0, "largest_component": False},
    }
    ckpt = save_checkpoint(d / "m.safetensors", model, meta)
    fp32, int8 = d / "m.onnx", d / "m-int8.onnx"
    torch_to_onnx(model, fp32, (SIZE, SIZE), 17)
    for path, variant in ((fp32, "fp32"), (int8, "int8")):
        if variant == "int8":
            (d / "q").mkdir()
            quantize_int8(fp32, int8, imgs, d / "q")
        proto = onnx.load(str(path))
        set_metadata(proto, read_metadata(ckpt), variant, 17, ckpt.name)
        onnx.save(proto, str(path))
    return {"ckpt": ckpt, "fp32": fp32, "int8": int8}


def _images(phantom_root: Path, n: int = 6) -> np.ndarray:
    files = sorted(f for f in phantom_root.glob("*/*.tif") if not f.stem.endswith("_mask"))
    return np.stack([tifffile.imread(f) for f in files[:: max(1, len(files) // n)][:n]])


def _proba(model: Path, images: np.ndarray, **kw: object) -> tuple[np.ndarray, object]:
    from brainseg.inference.predict import Predictor

    p = Predictor(model, device="cpu", **kw)  # type: ignore[arg-type]
    return p.predict_proba(images), p


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


# --------------------------------------------------------------------------- agreement


@needs_openvino
@pytest.mark.parametrize("batch", [1, 4])
def test_openvino_fp32_masks_equal_onnxruntime(
    models: dict[str, Path], phantom_root: Path, batch: int
) -> None:
    """fp32: the same masks, except pixels whose probability sits at the threshold."""
    imgs = _images(phantom_root)
    ref, _ = _proba(models["fp32"], imgs, runtime="onnxruntime")
    got, p = _proba(models["fp32"], imgs, runtime="openvino", precision="fp32", batch_size=batch)
    assert p.runtime == "openvino fp32"  # type: ignore[attr-defined]
    backend = p.backends[0]  # type: ignore[attr-defined]
    hint = "THROUGHPUT" if batch > 1 else "LATENCY"  # async streams for batches
    assert str(backend._compiled((SIZE, SIZE))[0].get_property("PERFORMANCE_HINT")) == hint
    differ = (ref >= 0.5) != (got >= 0.5)
    assert 0.05 < (ref >= 0.5).mean() < 0.6
    assert np.all(np.abs(ref[differ] - 0.5) < 1e-3), "masks differ away from the threshold"
    assert np.abs(ref - got).max() < 1e-3
    # any input size (resized in and back out), one image at a time or a batch: same order
    odd = np.ascontiguousarray(imgs[:, :48, :], dtype=np.uint8)
    _, ort = _proba(models["fp32"], imgs[:1], runtime="onnxruntime")
    for pad in (False, True):
        a = ort.predict_proba(odd, pad=pad)  # type: ignore[attr-defined]
        b = p.predict_proba(odd, pad=pad)  # type: ignore[attr-defined]
        assert a.shape == b.shape == (len(imgs), 48, SIZE)
        assert np.abs(a - b).max() < 1e-3


@needs_openvino
@needs_bf16
def test_openvino_bf16_masks_agree_with_onnxruntime_fp32(
    models: dict[str, Path], phantom_root: Path
) -> None:
    imgs = _images(phantom_root)
    ref, _ = _proba(models["fp32"], imgs, runtime="onnxruntime")
    got, p = _proba(models["fp32"], imgs, runtime="openvino", precision="bf16")
    assert p.runtime == "openvino bf16"  # type: ignore[attr-defined]
    assert not np.array_equal(ref, got)  # bf16 did run: the probabilities moved
    assert _dice(ref >= 0.5, got >= 0.5) >= BF16_MIN_DICE


@needs_openvino
def test_openvino_int8_file_agrees_with_onnxruntime_int8(
    models: dict[str, Path], phantom_root: Path
) -> None:
    imgs = _images(phantom_root)
    ref, ort = _proba(models["int8"], imgs, runtime="onnxruntime")
    got, ov = _proba(models["int8"], imgs, runtime="openvino")
    assert ort.runtime == "onnxruntime int8" and ov.runtime == "openvino int8"  # type: ignore[attr-defined]
    assert _dice(ref >= 0.5, got >= 0.5) >= 0.95  # two int8 kernels' rounding


def test_torch_checkpoint_agrees_with_onnxruntime_and_refuses_onnx_runtimes(
    models: dict[str, Path], phantom_root: Path
) -> None:
    imgs = _images(phantom_root)
    ref, _ = _proba(models["fp32"], imgs, runtime="onnxruntime")
    got, p = _proba(models["ckpt"], imgs, runtime="torch", threads=1)
    assert p.runtime == "torch fp32"  # type: ignore[attr-defined]
    assert np.abs(ref - got).max() < 1e-4
    with pytest.raises(BrainsegError, match=r"--runtime openvino runs \.onnx files"):
        _proba(models["ckpt"], imgs, runtime="openvino")
    with pytest.raises(BrainsegError, match=r"--runtime torch runs \.safetensors"):
        _proba(models["fp32"], imgs, runtime="torch")


@needs_bf16
def test_torch_bf16_on_a_checkpoint_agrees_with_onnxruntime_fp32(
    models: dict[str, Path], phantom_root: Path
) -> None:
    imgs = _images(phantom_root)
    ref, _ = _proba(models["fp32"], imgs, runtime="onnxruntime")
    got, p = _proba(models["ckpt"], imgs, precision="bf16")
    assert p.runtime == "torch bf16"  # type: ignore[attr-defined]
    assert not np.array_equal(ref, got)  # bf16 autocast did run
    assert _dice(ref >= 0.5, got >= 0.5) >= BF16_MIN_DICE
    with pytest.raises(BrainsegError, match="no native bf16"):
        runtimes.choose(".safetensors", "fp32", "auto", "bf16", "cpu", VNNI, lambda m: True)


@needs_openvino
def test_threads_reach_the_runtime(models: dict[str, Path]) -> None:
    from brainseg.inference.predict import Predictor

    ort = Predictor(models["fp32"], device="cpu", runtime="onnxruntime", threads=1)
    assert ort.backends[0].session.get_session_options().intra_op_num_threads == 1
    ov = Predictor(models["fp32"], device="cpu", runtime="openvino", threads=1)
    compiled = ov.backends[0]._compiled((SIZE, SIZE))[0]
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1


# --------------------------------------------------------------------------- auto's table

AMX = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
BF16 = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
VNNI = {"avx2", "avx512f", "avx512_vnni"}
AVX2 = {"avx2", "fma"}


@pytest.mark.parametrize(
    ("flags", "variant", "want"),
    [
        (AMX, "fp32", "openvino bf16"),
        (AMX, "int8", "openvino int8"),
        (BF16, "fp32", "openvino bf16"),
        (BF16, "int8", "openvino int8"),
        (VNNI, "fp32", "onnxruntime fp32"),
        (VNNI, "int8", "onnxruntime int8"),
        (AVX2, "fp32", "onnxruntime fp32"),
        (AVX2, "int8", "onnxruntime int8"),
        (set(), "fp32", "onnxruntime fp32"),
        (AMX, "fp16", "onnxruntime fp16"),
    ],
)
def test_auto_follows_the_measured_table(flags: set[str], variant: str, want: str) -> None:
    c = runtimes.choose(".onnx", variant, "auto", "auto", "cpu", flags, lambda m: True)
    assert c.label == want and c.requested == "auto" and c.reason
    # onnxruntime wherever nobody measured OpenVINO: only the AMX / BF16 rows (fp32, int8)
    measured = runtimes.cpu_kind(flags) in ("amx", "avx512_bf16") and variant != "fp16"
    assert (c.runtime == "openvino") == measured


def test_auto_without_openvino_keeps_onnxruntime_and_says_why() -> None:
    c = runtimes.choose(".onnx", "fp32", "auto", "auto", "cpu", AMX, lambda m: m != "openvino")
    assert c.label == "onnxruntime fp32"
    assert "brainseg[openvino]" in c.reason


def test_precision_checks() -> None:
    with pytest.raises(BrainsegError, match="no native bf16"):
        runtimes.choose(".onnx", "fp32", "openvino", "bf16", "cpu", VNNI, lambda m: True)
    with pytest.raises(BrainsegError, match="needs --runtime openvino"):
        runtimes.choose(".onnx", "fp32", "onnxruntime", "bf16", "cpu", BF16, lambda m: True)
    with pytest.raises(BrainsegError, match="--precision 'fp16' is not one of auto, fp32, bf16"):
        runtimes.choose(".onnx", "fp32", "auto", "fp16", "cpu", BF16, lambda m: True)
    with pytest.raises(BrainsegError, match="--runtime 'ort' is not one of"):
        runtimes.choose(".onnx", "fp32", "ort", "auto", "cpu", BF16, lambda m: True)
    exact = runtimes.choose(".onnx", "fp32", "auto", "fp32", "cpu", AMX, lambda m: True)
    assert exact.label == "openvino fp32"  # the fast runtime, exact precision


# --------------------------------------------------------------------------- the CLI


def _cli(args: list[object], cwd: Path, pre: str = "pass") -> subprocess.CompletedProcess[str]:
    code = (
        f"import sys; {pre}; from brainseg.__main__ import main; "
        "sys.argv = ['brainseg', *sys.argv[1:]]; main()"
    )
    env = {k: v for k, v in os.environ.items() if k != runtimes.RUNTIME_ENV}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=300,
    )


def test_runtime_openvino_without_openvino_is_one_line(
    models: dict[str, Path], phantom_root: Path, tmp_path: Path
) -> None:
    img = next(iter(sorted(phantom_root.glob("*/*_5.tif"))))
    block = "sys.modules['openvino'] = None"  # `import openvino` now fails as if not installed
    args = ["predict", models["fp32"], img, "-o", "out"]
    r = _cli([*args, "--runtime", "openvino"], tmp_path, block)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: ") and "brainseg[openvino]" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    # auto without openvino: onnxruntime, and it says why
    r = _cli([*args, "--json"], tmp_path, block)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["runtime"] == "onnxruntime fp32"
    if runtimes.cpu_kind(runtimes.cpu_flags()) in ("amx", "avx512_bf16"):
        assert "OpenVINO would be faster but is not installed" in r.stderr


@needs_openvino
def test_auto_reports_its_choice(
    models: dict[str, Path], phantom_root: Path, tmp_path: Path
) -> None:
    want = runtimes.choose(".onnx", "fp32", "auto", "auto", "cpu").label
    img = next(iter(sorted(phantom_root.glob("*/*_5.tif"))))
    r = _cli(["predict", models["fp32"], img, "-o", "out", "--json", "--device", "cpu"], tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[0])
    assert row["runtime"] == want
    assert f"({want}, auto: " in r.stderr  # the status line, with the reason
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert summary[0].endswith(",runtime") and summary[1].endswith(want)


@needs_openvino
@pytest.mark.slow  # two eval runs in fresh processes: about 10 s on 2 shared cores
def test_eval_reports_the_runtime_in_its_summary(
    models: dict[str, Path], phantom_root: Path, tmp_path: Path
) -> None:
    want = runtimes.choose(".onnx", "fp32", "auto", "auto", "cpu").label
    r = _cli(
        ["eval", models["fp32"], phantom_root, "--json", "--device", "cpu", "--project", "runs"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["settings"]["runtime"]
    assert got["label"] == want and got["requested"] == "auto" and got["cpu"]
    r = _cli(
        ["eval", models["fp32"], phantom_root, "--json", "--project", "runs",
         "--runtime", "onnxruntime", "--threads", "1"],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["runtime"]["label"] == "onnxruntime fp32"
