"""Checkpoints: safetensors round trips, metadata, torch-free reading, bad files, atomicity."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import brainseg.model.checkpoint as ckpt
from brainseg import __version__
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.model.checkpoint import (
    EXTRA_PREFIX,
    FORMAT_VERSION,
    copy_with_metadata,
    load_checkpoint,
    load_tensors,
    read_metadata,
    save_checkpoint,
)
from brainseg.model.unet import UNetVGG16

SMALL = [32, 16, 16, 16, 8]
META = {
    "epoch": 7,
    "metrics": {"dice": np.float32(0.75), "loss": 0.125},
    "config": {"lr": 1e-3, "data": Path("/data/kaggle_3m")},
    "split_hash": "abc123",
    "image_size": 64,
    "encoder_weights": "none",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, more threads spin and run ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255


@pytest.fixture(scope="module")
def model() -> UNetVGG16:
    """A BN model whose running statistics are not the defaults (they must round-trip)."""
    torch.manual_seed(0)
    net = UNetVGG16(encoder="vgg16_bn", decoder_channels=SMALL, upsample="bilinear")
    net.train()
    with torch.no_grad():
        net(_x())
    return net.eval()


@pytest.fixture(scope="module")
def saved(model: UNetVGG16, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    extra = {"optimizer.step": torch.tensor(12), "optimizer.exp_avg.0": torch.arange(6.0)}
    save_checkpoint(path, model, META, extra=extra)
    return path


def _rewrite_header(src: Path, dst: Path, edit: Any) -> Path:
    """Copy a safetensors file with its header dict changed by ``edit`` (test helper)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


def _edit_meta(**changes: Any) -> Any:
    def edit(header: dict[str, Any]) -> None:
        meta = json.loads(header["__metadata__"]["brainseg"])
        meta.update(changes)
        header["__metadata__"]["brainseg"] = json.dumps(meta)

    return edit


# ---------------------------------------------------------------------- round trips


def test_round_trip_same_outputs_and_eval_mode(model: UNetVGG16, saved: Path) -> None:
    loaded, meta = load_checkpoint(saved)
    assert isinstance(loaded, UNetVGG16) and not loaded.training
    assert loaded.config() == model.config()
    x = _x(1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert meta == read_metadata(saved)


def test_device_auto_falls_back_to_cpu(saved: Path) -> None:
    loaded, _ = load_checkpoint(saved, device="auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(loaded.parameters()).device.type == want


def test_metadata_round_trip(model: UNetVGG16, saved: Path) -> None:
    meta = read_metadata(saved)
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert meta["brainseg_version"] == __version__
    assert meta["torch_version"] == torch.__version__
    assert meta["architecture"] == model.config()
    assert meta["normalization"] == "imagenet"
    assert meta["threshold"] == 0.5
    assert meta["postprocess"] == {"min_size": 0, "largest_component": False}
    assert meta["epoch"] == 7 and meta["split_hash"] == "abc123" and meta["image_size"] == 64
    assert meta["metrics"] == {"dice": 0.75, "loss": 0.125}
    assert meta["config"] == {"lr": 1e-3, "data": "/data/kaggle_3m"}
    assert meta["encoder_weights"] == "none"


def test_caller_cannot_override_architecture_or_versions(model: UNetVGG16, tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    bogus = {"architecture": {"encoder": "vgg16"}, "format_version": 99, "threshold": 0.3}
    save_checkpoint(path, model, bogus)
    meta = read_metadata(path)
    assert meta["architecture"] == model.config()
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["threshold"] == 0.3


def test_extra_tensors_round_trip(saved: Path, model: UNetVGG16) -> None:
    extra = load_tensors(saved, prefix=EXTRA_PREFIX)
    assert set(extra) == {"optimizer.step", "optimizer.exp_avg.0"}
    assert extra["optimizer.step"].item() == 12
    assert torch.equal(extra["optimizer.exp_avg.0"], torch.arange(6.0))
    everything = load_tensors(saved)
    assert set(everything) == set(model.state_dict()) | {EXTRA_PREFIX + k for k in extra}


def test_unnamed_wrappers_are_unwrapped(model: UNetVGG16, tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):  # the shape of DDP: the real model is .module
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    path = save_checkpoint(tmp_path / "w.safetensors", Wrapper(model), {})
    assert set(load_tensors(path)) == set(model.state_dict())


def test_read_metadata_and_copy_do_not_import_torch(saved: Path, tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from brainseg.model.checkpoint import read_metadata, copy_with_metadata\n"
        f"m = read_metadata({str(saved)!r})\n"
        f"copy_with_metadata({str(saved)!r}, {str(tmp_path / 'c.safetensors')!r}, "
        "{'threshold': 0.25})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps(m['architecture']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["encoder"] == "vgg16_bn"
    assert read_metadata(tmp_path / "c.safetensors")["threshold"] == 0.25


# ---------------------------------------------------------------------- bad and foreign files


def _bad_files(saved: Path, d: Path) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import save_file

    data = saved.read_bytes()
    text = d / "notes.safetensors"
    text.write_text("this is not a checkpoint, just a long enough text file\n")
    pth = d / "model.pth"
    torch.save({"w": torch.zeros(3)}, pth)
    plain = d / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    half = d / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    tiny = d / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    head_cut = d / "headcut.safetensors"
    head_cut.write_bytes(data[:100])
    newer = _rewrite_header(saved, d / "newer.safetensors", _edit_meta(format_version=99))
    broken_meta = d / "brokenmeta.safetensors"

    def break_meta(header: dict[str, Any]) -> None:
        header["__metadata__"]["brainseg"] = "{not json"

    _rewrite_header(saved, broken_meta, break_meta)
    wrong_arch = _rewrite_header(
        saved,
        d / "wrongarch.safetensors",
        _edit_meta(architecture={**read_metadata(saved)["architecture"], "encoder": "vgg16"}),
    )
    bad_arch = _rewrite_header(
        saved, d / "badarch.safetensors", _edit_meta(architecture={"encoder": "resnet"})
    )
    (d / "folder.safetensors").mkdir()
    # issue 22: each of these was an "internal error" (TypeError, AttributeError,
    # RecursionError) in info / predict / load instead of one line naming the file.
    odd = {
        f"{key} {kind}": _rewrite_header(
            saved, d / f"{key}-{kind}.safetensors", _edit_meta(**{key: value})
        )
        for key in ("config", "metrics", "postprocess")
        for kind, value in (("list", [1, 2]), ("string", "abc"))
    }
    deep = "[" * 5000 + "]" * 5000

    def deep_meta(header: dict[str, Any]) -> None:
        text = header["__metadata__"]["brainseg"]
        header["__metadata__"]["brainseg"] = text[:-1] + ', "x": ' + deep + "}"

    def shape_int(header: dict[str, Any]) -> None:
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = 5

    _rewrite_header(saved, d / "bigsize.safetensors", _edit_meta(image_size=16384))
    _rewrite_header(saved, d / "deepmeta.safetensors", deep_meta)
    _rewrite_header(saved, d / "shapeint.safetensors", shape_int)
    raw = data[8 : 8 + struct.unpack("<Q", data[:8])[0]].rstrip()
    raw = raw[:-1] + b', "zz": ' + deep.encode() + b"}"
    raw += b" " * (-len(raw) % 8)
    n0 = struct.unpack("<Q", data[:8])[0]
    (d / "deepheader.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n0 :])
    return {
        **{case: (path, f"{case.split()[0]} in its metadata is") for case, path in odd.items()},
        "metadata nested 5000 deep": (d / "deepmeta.safetensors", "nested too deeply"),
        # issue 22: accepted up to 16384 (6 GiB for two 64 x 64 images); bounded where read
        "image size 16384": (d / "bigsize.safetensors", "image_size 16384 in its metadata"),
        "header nested 5000 deep": (d / "deepheader.safetensors", "nested too deeply"),
        "tensor shape is an int": (d / "shapeint.safetensors", "malformed safetensors header"),
        "missing": (d / "nope.safetensors", "does not exist"),
        "directory": (d / "folder.safetensors", "directory"),
        "text": (text, "text file"),
        "pickle": (pth, "pickle"),
        "no brainseg metadata": (plain, "without brainseg metadata"),
        "truncated data": (half, "truncated"),
        "truncated to 5 bytes": (tiny, "too short"),
        "truncated header": (head_cut, "truncated"),
        "newer format": (newer, "format version 99"),
        "broken metadata": (broken_meta, "metadata"),
        "tensors do not match architecture": (wrong_arch, "do not match its architecture"),
        "unknown architecture": (bad_arch, "invalid architecture"),
    }


CASES = [
    "missing",
    "directory",
    "text",
    "pickle",
    "no brainseg metadata",
    "truncated data",
    "truncated to 5 bytes",
    "truncated header",
    "newer format",
    "broken metadata",
    "tensors do not match architecture",
    "unknown architecture",
    "config list",
    "config string",
    "metrics list",
    "metrics string",
    "postprocess list",
    "postprocess string",
    "metadata nested 5000 deep",
    "image size 16384",
    "header nested 5000 deep",
    "tensor shape is an int",
]


@pytest.fixture(scope="module")
def bad_files(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _bad_files(saved, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_a_clear_error(bad_files: dict[str, Any], case: str) -> None:
    path, text = bad_files[case]
    with pytest.raises(BrainsegError) as info:
        load_checkpoint(path)
    err = info.value
    assert str(path) in err.message, err.message
    assert text in err.message, err.message
    assert err.hint
    assert err.exit_code == 2
    if case not in ("tensors do not match architecture", "unknown architecture"):
        with pytest.raises(BrainsegError, match=text):
            read_metadata(path)
        with pytest.raises(BrainsegError, match=text):
            load_tensors(path)


def test_mismatch_error_names_keys(bad_files: dict[str, Any]) -> None:
    path, _ = bad_files["tensors do not match architecture"]
    with pytest.raises(BrainsegError) as info:
        load_checkpoint(path)
    assert "encoder.features.1.running_mean" in info.value.message


def test_newer_format_hint_says_upgrade(bad_files: dict[str, Any]) -> None:
    with pytest.raises(BrainsegError) as info:
        read_metadata(bad_files["newer format"][0])
    assert "upgrade" in (info.value.hint or "")


# ---------------------------------------------------------------------- atomic writes


def test_no_temp_files_and_force(model: UNetVGG16, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"epoch": 1})
    save_checkpoint(path, model, {"epoch": 2})  # force=True by default
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert read_metadata(path)["epoch"] == 2
    with pytest.raises(BrainsegError, match="already exists"):
        save_checkpoint(path, model, {"epoch": 3}, force=False)
    assert read_metadata(path)["epoch"] == 2


def test_disk_full_mid_write_keeps_existing_file(
    model: UNetVGG16, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"epoch": 1})
    before = path.read_bytes()

    class FullDisk:
        def __init__(self, name: Any, mode: str) -> None:
            self.f = open(name, mode)  # noqa: SIM115

        def write(self, data: Any) -> int:
            self.f.write(bytes(data[:1000]))  # half-written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    monkeypatch.setattr(ckpt, "open", FullDisk, raising=False)
    with pytest.raises(BrainsegRuntimeError, match="disk full") as info:
        save_checkpoint(path, model, {"epoch": 2})
    assert str(path) in info.value.message
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---------------------------------------------------------------------- copy_with_metadata


def test_copy_with_metadata(saved: Path, tmp_path: Path) -> None:
    src_before = saved.read_bytes()
    dst = tmp_path / "tuned.safetensors"
    out = copy_with_metadata(
        saved, dst, {"threshold": 0.35, "postprocess": {"min_size": 20, "largest_component": True}}
    )
    assert out == dst and saved.read_bytes() == src_before
    meta = read_metadata(dst)
    assert meta["threshold"] == 0.35
    assert meta["postprocess"] == {"min_size": 20, "largest_component": True}
    assert {k: v for k, v in meta.items() if k not in ("threshold", "postprocess")} == {
        k: v for k, v in read_metadata(saved).items() if k not in ("threshold", "postprocess")
    }
    a, b = load_tensors(saved), load_tensors(dst)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    load_checkpoint(dst)  # a valid checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.safetensors"]


def test_copy_with_metadata_refusals(saved: Path, tmp_path: Path) -> None:
    dst = tmp_path / "tuned.safetensors"
    copy_with_metadata(saved, dst, {"threshold": 0.4})
    with pytest.raises(BrainsegError, match="already exists"):
        copy_with_metadata(saved, dst, {"threshold": 0.6})
    assert read_metadata(dst)["threshold"] == 0.4
    copy_with_metadata(dst, dst, {"threshold": 0.6}, force=True)  # in place
    assert read_metadata(dst)["threshold"] == 0.6
    with pytest.raises(BrainsegError, match="architecture"):
        copy_with_metadata(saved, tmp_path / "x.safetensors", {"architecture": {}})
    with pytest.raises(BrainsegError, match="threshold"):
        copy_with_metadata(saved, tmp_path / "y.safetensors", {"threshold": 1.5})
    with pytest.raises(BrainsegError, match="does not exist"):
        copy_with_metadata(tmp_path / "none.safetensors", tmp_path / "z.safetensors", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned.safetensors"]


@pytest.mark.parametrize(
    "case", ["config list", "metrics string", "metadata nested 5000 deep", "tensor shape is an int"]
)
def test_info_and_predict_on_odd_metadata_exit_2(
    bad_files: dict[str, Any], case: str, tmp_path: Path
) -> None:
    """The CLI view of the cases above: one line naming the file, exit 2, no internal error."""
    from conftest import run_cli

    path, text = bad_files[case]
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    for args in (["info", path], ["predict", path, image, "-o", tmp_path / "out"]):
        r = run_cli(args)
        assert r.returncode == 2, r.stderr
        assert text in r.stderr and str(path) in r.stderr, r.stderr
        assert "internal error" not in r.stderr
