"""UNetVGG16: shapes, options, input checks, encoder weights, config, FLOPs, export."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from brainseg.errors import BrainsegError
from brainseg.model.unet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNetVGG16,
    count_parameters,
    imagenet_weights_path,
    model_flops,
    nearest_valid_sizes,
)

SMALL = (32, 16, 16, 16, 8)  # a light decoder where the decoder size does not matter


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, more threads spin and run ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 255


@pytest.fixture(scope="module")
def default_model() -> UNetVGG16:
    torch.manual_seed(0)
    return UNetVGG16().eval()


@pytest.mark.parametrize(
    ("n", "h", "w"), [(1, 32, 32), (2, 32, 32), (1, 64, 64), (2, 96, 128), (1, 256, 256)]
)
def test_output_shape(default_model: UNetVGG16, n: int, h: int, w: int) -> None:
    with torch.no_grad():
        y = default_model(_pixels(n, 3, h, w))
    assert y.shape == (n, 1, h, w)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_uint8_input_is_accepted(default_model: UNetVGG16) -> None:
    x = _pixels(1, 3, 32, 32)
    with torch.no_grad():
        a = default_model(x.round().to(torch.uint8))
        b = default_model(x.round())
    torch.testing.assert_close(a, b)


def test_parameter_count_in_expected_range(default_model: UNetVGG16) -> None:
    n = count_parameters(default_model)
    assert n == 29_692_353  # documented in docs/model.md
    assert 26_000_000 <= n <= 30_000_000
    assert count_parameters(default_model.encoder) == 14_714_688  # torchvision vgg16.features


@pytest.mark.parametrize("encoder", ["vgg16", "vgg16_bn"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_encoder_and_upsample_variants(encoder: str, upsample: str) -> None:
    model = UNetVGG16(encoder=encoder, upsample=upsample, decoder_channels=SMALL).eval()
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())
    assert has_bn == (encoder == "vgg16_bn")
    has_transpose = any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder.modules())
    assert has_transpose == (upsample == "transpose")
    with torch.no_grad():
        assert model(_pixels(2, 3, 32, 64)).shape == (2, 1, 32, 64)


def test_encoder_taps_skips_before_each_pool() -> None:
    model = UNetVGG16(decoder_channels=SMALL).eval()
    with torch.no_grad():
        skips, bottom = model.encoder(torch.zeros(1, 3, 64, 64))
    assert [tuple(s.shape[1:]) for s in skips] == [
        (64, 64, 64),
        (128, 32, 32),
        (256, 16, 16),
        (512, 8, 8),
        (512, 4, 4),
    ]
    assert tuple(bottom.shape[1:]) == (512, 2, 2)
    # relu outputs: skips are non-negative (taken after the ReLU, before the pool)
    assert all(float(s.min()) >= 0 for s in skips)


def test_imagenet_normalisation_matches_torchvision_formula() -> None:
    model = UNetVGG16(decoder_channels=SMALL)
    x = _pixels(2, 3, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x / 255 - mean) / std)
    assert "mean" not in model.state_dict()  # constants, not weights


def test_zscore_normalisation_per_image_per_channel() -> None:
    model = UNetVGG16(decoder_channels=SMALL, normalization="zscore")
    x = _pixels(2, 3, 32, 32)
    x[1, 2] = 7.0  # a constant channel stays finite (zeros)
    z = model.normalize(x)
    assert torch.allclose(z.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-4)
    std = z.std(dim=(2, 3), unbiased=False)
    assert torch.allclose(std[0], torch.ones(3), atol=1e-3)
    assert torch.equal(z[1, 2], torch.zeros(32, 32))
    # scale invariant: the same image at half the brightness gives the same input
    torch.testing.assert_close(model.normalize(x[:1] * 0.5), z[:1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("h", "w", "bad"), [(50, 64, "50"), (64, 100, "100"), (16, 64, "16")])
def test_size_not_multiple_of_32_is_an_error(
    default_model: UNetVGG16, h: int, w: int, bad: str
) -> None:
    with pytest.raises(BrainsegError) as info:
        default_model(torch.zeros(1, 3, h, w))
    msg = info.value.message
    assert f"{h}x{w}" in msg and bad in msg and "multiple of 32" in msg
    lo, hi = nearest_valid_sizes(int(bad))
    assert str(lo) in msg and str(hi) in msg


def test_nearest_valid_sizes() -> None:
    assert nearest_valid_sizes(50) == (32, 64)
    assert nearest_valid_sizes(100) == (96, 128)
    assert nearest_valid_sizes(16) == (32, 32)
    assert nearest_valid_sizes(256) == (256, 256)


def test_wrong_channel_count_is_an_error(default_model: UNetVGG16) -> None:
    with pytest.raises(BrainsegError, match=r"N x 3 x H x W"):
        default_model(torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"encoder": "resnet34"}, "encoder"),
        ({"upsample": "nearest"}, "upsample"),
        ({"normalization": "minmax"}, "normalization"),
        ({"decoder_channels": (64, 32)}, "decoder_channels"),
        ({"decoder_channels": (64, 32, 16, 8, 0)}, "decoder_channels"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(BrainsegError, match=text):
        UNetVGG16(**kwargs)  # type: ignore[arg-type]


def test_config_round_trip() -> None:
    model = UNetVGG16(
        encoder="vgg16_bn", decoder_channels=SMALL, upsample="bilinear", normalization="zscore"
    )
    cfg = model.config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg == {
        "encoder": "vgg16_bn",
        "decoder_channels": list(SMALL),
        "upsample": "bilinear",
        "normalization": "zscore",
    }
    clone = UNetVGG16.from_config(cfg)
    assert clone.config() == cfg
    clone.load_state_dict(model.state_dict())  # same architecture: strict load works
    with pytest.raises(BrainsegError, match="unknown model config key"):
        UNetVGG16.from_config({**cfg, "depth": 4})


def test_set_encoder_trainable() -> None:
    model = UNetVGG16(decoder_channels=SMALL)
    model.set_encoder_trainable(False)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model.decoder)
    model.set_encoder_trainable(True)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------- encoder weights


def _random_vgg_state(encoder: str = "vgg16", classifier: bool = False) -> dict[str, torch.Tensor]:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    state = {
        f"features.{k}": v.clone()
        for k, v in make_layers(cfgs["D"], batch_norm=encoder == "vgg16_bn").state_dict().items()
    }
    if classifier:
        state["classifier.6.weight"] = torch.zeros(10, 4)
        state["classifier.6.bias"] = torch.zeros(10)
    return state


def test_standin_weights_load(standin_weights: Path) -> None:
    file_state = torch.load(standin_weights, map_location="cpu", weights_only=True)
    model = UNetVGG16(decoder_channels=SMALL, encoder_weights=standin_weights)
    enc = model.encoder.features.state_dict()
    assert len(file_state) == 26 and set(enc) == {k[len("features.") :] for k in file_state}
    for key, value in file_state.items():
        assert torch.equal(enc[key[len("features.") :]], value), key
    # and as a string path, the way the CLI passes it
    model2 = UNetVGG16(decoder_channels=SMALL, encoder_weights=str(standin_weights))
    assert torch.equal(model2.encoder.features[0].weight, file_state["features.0.weight"])


def test_standin_weights_into_bn_encoder_is_an_error(standin_weights: Path) -> None:
    with pytest.raises(BrainsegError) as info:
        UNetVGG16(encoder="vgg16_bn", encoder_weights=standin_weights)
    err = info.value
    assert str(standin_weights) in err.message
    assert "features.1.weight" in err.message  # the first missing key of vgg16_bn
    assert "vgg16" in (err.hint or "")


def test_safetensors_weights_with_classifier_keys_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _random_vgg_state("vgg16_bn", classifier=True)
    path = tmp_path / "vgg16_bn_full.safetensors"
    save_file(state, str(path))
    model = UNetVGG16(encoder="vgg16_bn", decoder_channels=SMALL, encoder_weights=path)
    enc = model.encoder.features.state_dict()
    for key, value in state.items():
        if key.startswith("features."):
            assert torch.equal(enc[key[len("features.") :]], value), key


def test_vgg16_bn_weights_into_vgg16_encoder_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bn.pth"
    torch.save(_random_vgg_state("vgg16_bn"), path)
    with pytest.raises(BrainsegError) as info:
        UNetVGG16(encoder="vgg16", encoder_weights=path)
    assert str(path) in info.value.message
    assert "features.1.weight" in info.value.message  # an unexpected BN key, named
    assert "vgg16_bn" in (info.value.hint or "")


def test_wrong_shape_weights_is_an_error(tmp_path: Path) -> None:
    state = _random_vgg_state()
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    path = tmp_path / "gray.pth"
    torch.save(state, path)
    with pytest.raises(BrainsegError) as info:
        UNetVGG16(encoder_weights=path)
    msg = info.value.message
    assert str(path) in msg and "features.0.weight" in msg and "(64, 3, 3, 3)" in msg


@pytest.mark.parametrize(
    ("name", "content", "text"),
    [
        ("missing.pth", None, "does not exist"),
        ("notes.pth", b"just some text\n", "cannot read"),
        ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{", "cannot read"),
    ],
)
def test_unreadable_weights_file_is_an_error(
    tmp_path: Path, name: str, content: bytes | None, text: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BrainsegError) as info:
        UNetVGG16(encoder_weights=path)
    assert str(path) in info.value.message and text in info.value.message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_non_tensor_weights_are_refused(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"features.0.weight": object()}))
    with pytest.raises(BrainsegError, match=r"evil\.pth"):
        UNetVGG16(encoder_weights=path)


def test_imagenet_missing_names_the_download_command() -> None:
    path = imagenet_weights_path("vgg16")
    assert not path.exists()  # conftest points TORCH_HOME at an empty temp folder
    with pytest.raises(BrainsegError) as info:
        UNetVGG16(encoder_weights="imagenet")
    assert "brainseg download vgg16" in str(info.value)
    assert str(path) in info.value.message
    with pytest.raises(BrainsegError) as info:
        UNetVGG16(encoder="vgg16_bn", encoder_weights="imagenet")
    assert "brainseg download vgg16 --bn" in str(info.value)


def test_imagenet_present_loads_from_torch_cache() -> None:
    path = imagenet_weights_path("vgg16")
    assert path.name == "vgg16-397923af.pth"
    state = _random_vgg_state(classifier=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    try:
        model = UNetVGG16(decoder_channels=SMALL, encoder_weights="imagenet")
        assert torch.equal(model.encoder.features[28].bias, state["features.28.bias"])
    finally:
        path.unlink()


def test_none_means_random_init() -> None:
    torch.manual_seed(3)
    a = UNetVGG16(decoder_channels=SMALL, encoder_weights="none")
    torch.manual_seed(3)
    b = UNetVGG16(decoder_channels=SMALL, encoder_weights=None)
    assert torch.equal(a.encoder.features[0].weight, b.encoder.features[0].weight)


# ---------------------------------------------------------------------- FLOPs, devices, export


def test_model_flops_scales_with_area(default_model: UNetVGG16) -> None:
    f32 = model_flops(default_model, 32, 32)
    f64 = model_flops(default_model, 64, 64)
    assert f64 == 4 * f32
    assert 60e9 < 64 * f32 < 70e9  # ~64 GFLOP at 256x256, documented in docs/model.md
    assert not default_model.training  # the mode is restored


def test_channels_last_and_bf16_autocast_train_step() -> None:
    model = UNetVGG16(decoder_channels=SMALL).to(memory_format=torch.channels_last).train()
    x = _pixels(2, 3, 32, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (2, 1, 32, 64) and y.dtype == torch.bfloat16
    y.float().mean().backward()
    grad = model.encoder.features[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_torch_compile_traces_without_graph_breaks() -> None:
    torch._dynamo.reset()
    model = UNetVGG16(decoder_channels=SMALL).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    x = _pixels(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_onnx_export_with_dynamic_batch_height_width(tmp_path: Path) -> None:
    import warnings

    import numpy as np
    import onnxruntime as ort

    # bilinear + z-score: the export path with the most ops beyond plain convolutions
    model = UNetVGG16(decoder_channels=SMALL, upsample="bilinear", normalization="zscore").eval()
    path = tmp_path / "m.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (_pixels(1, 3, 32, 32),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=17,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 32), (2, 3, 64, 96)]:
        x = _pixels(*shape, seed=5)
        out = sess.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert out.shape == (shape[0], 1, *shape[2:])
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
