"""UNet with a torchvision VGG16 / VGG16-BN encoder.

The encoder is torchvision's ``vgg16().features`` kept as one ``nn.Sequential`` so that
torchvision state dicts (``features.N.weight``) load into it unchanged. The skips are the
activations just before each max-pool (relu1_2 at H, relu2_2 at H/2, relu3_3 at H/4,
relu4_3 at H/8, relu5_3 at H/16); a double conv at H/32 is the bottleneck. Each of the five
decoder stages upsamples x2 (halving the channels), concatenates the skip and applies a double
conv (conv3x3-BN-ReLU twice); a 1x1 conv gives one logit map at the input resolution.

The model takes raw pixel values in [0, 255] and normalises them itself, so a checkpoint or an
ONNX file is self-contained (see docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainseg.choices import DEFAULT_DECODER_CHANNELS, ENCODERS, NORMALIZATIONS, UPSAMPLE_MODES
from brainseg.errors import BrainsegError, first_line
from brainseg.model.modelfile import sniff_model_file
from brainseg.settings import SIZE_MULTIPLE, decoder_channels_error

#: torchvision's ImageNet normalisation (the input the VGG16 weights expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Added to the per-image variance in z-score normalisation (constant images stay finite).
ZSCORE_EPS = 1e-6
#: Channel counts of the five skips (relu1_2 ... relu5_3) and of the last pool.
SKIP_CHANNELS = (64, 128, 256, 512, 512)
ENCODER_CHANNELS = 512


def _weights_enum(encoder: str) -> Any:
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights

    return VGG16_BN_Weights.IMAGENET1K_V1 if encoder == "vgg16_bn" else VGG16_Weights.IMAGENET1K_V1


def vgg16_weights_url(encoder: str = "vgg16") -> str:
    """torchvision's URL of the ImageNet weights of ``encoder`` (vgg16 or vgg16_bn)."""
    return str(_weights_enum(encoder).url)


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (and so torchvision) looks for weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights_path(encoder: str = "vgg16") -> Path:
    """Where torchvision keeps the ImageNet weights of ``encoder`` in the torch hub cache."""
    return hub_checkpoint_dir() / os.path.basename(vgg16_weights_url(encoder))


def nearest_valid_sizes(size: int) -> tuple[int, int]:
    """The multiples of 32 just below and above ``size`` (the lower one at least 32)."""
    low = max(SIZE_MULTIPLE, (size // SIZE_MULTIPLE) * SIZE_MULTIPLE)
    high = -(-size // SIZE_MULTIPLE) * SIZE_MULTIPLE
    return low, max(high, SIZE_MULTIPLE)


def check_input_size(height: int, width: int) -> None:
    """Raise BrainsegError unless both sides are positive multiples of 32."""
    parts = []
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % SIZE_MULTIPLE:
            lo, hi = nearest_valid_sizes(v)
            near = f"{lo}" if lo == hi else f"{lo} or {hi}"
            parts.append(f"{name} {v} (nearest valid: {near})")
    if parts:
        raise BrainsegError(
            f"input size {height}x{width} is not a multiple of {SIZE_MULTIPLE}: "
            + ", ".join(parts),
            hint=f"resize or pad images so height and width are multiples of {SIZE_MULTIPLE}",
        )


def _tracing() -> bool:
    """True under torch.jit tracing, ONNX export, torch.compile or torch.export."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def _vgg_features(encoder: str, init: bool = True) -> nn.Sequential:
    """torchvision's VGG16(-BN) ``features`` (same layers and init) without its 120 M-parameter
    classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=encoder == "vgg16_bn")
    if init:
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    return features


class DoubleConv(nn.Sequential):
    """(conv3x3 - BN - ReLU) x 2: the UNet building block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class VGGEncoder(nn.Module):
    """torchvision's VGG16(-BN) ``features`` unchanged (its state dict keys load as they are);
    returns the five pre-pool skips and the output."""

    def __init__(self, encoder: str = "vgg16") -> None:
        super().__init__()
        self.features: nn.Sequential = _vgg_features(encoder)
        self.pool_indices: tuple[int, ...] = tuple(
            i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips: list[torch.Tensor] = []
        for i, layer in enumerate(self.features):
            if i in self.pool_indices:
                skips.append(x)
            x = layer(x)
        return skips, x


class UpBlock(nn.Module):
    """Upsample x2 (halving the channels), concatenate the skip, double conv."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, upsample: str
    ) -> None:
        super().__init__()
        up_channels = max(1, in_channels // 2)
        if upsample == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, up_channels, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, up_channels, 1),
            )
        self.conv = DoubleConv(up_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNetDecoder(nn.Module):
    """Bottleneck at H/32, five up-stages back to H, and the 1x1 logit head."""

    def __init__(self, decoder_channels: Sequence[int], upsample: str) -> None:
        super().__init__()
        self.bottleneck = DoubleConv(ENCODER_CHANNELS, ENCODER_CHANNELS)
        ins = (ENCODER_CHANNELS, *decoder_channels[:-1])
        self.stages = nn.ModuleList(
            UpBlock(*channels, upsample)
            for channels in zip(ins, reversed(SKIP_CHANNELS), decoder_channels, strict=True)
        )
        self.head = nn.Conv2d(decoder_channels[-1], 1, 1)

    def forward(self, skips: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck(x)
        for stage, skip in zip(self.stages, reversed(skips), strict=True):
            x = stage(x, skip)
        return self.head(x)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BrainsegError(
            f"unknown {name} {value!r}; expected one of: {', '.join(choices)}",
            hint=f"choose {name} from {', '.join(choices)}",
        )
    return value


class UNetVGG16(nn.Module):
    """UNet with a VGG16 encoder; float N x 3 x H x W in [0, 255] -> logits N x 1 x H x W.

    ``encoder_weights``: ``None`` / ``"none"``, ``"imagenet"`` (from the torch hub cache, never
    downloaded here) or a torchvision-format state dict (``.pth`` / ``.safetensors``).
    """

    mean: torch.Tensor  # ImageNet mean x 255 (buffer, not saved)
    std: torch.Tensor  # ImageNet std x 255 (buffer, not saved)

    def __init__(
        self,
        encoder: str = "vgg16",
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        upsample: str = "transpose",
        normalization: str = "imagenet",
        encoder_weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.encoder_name = _check_choice("encoder", encoder, ENCODERS)
        self.upsample = _check_choice("upsample", upsample, UPSAMPLE_MODES)
        self.normalization = _check_choice("normalization", normalization, NORMALIZATIONS)
        why = decoder_channels_error(decoder_channels)
        if why:
            raise BrainsegError(why, hint=f"for example {list(DEFAULT_DECODER_CHANNELS)}")
        self.decoder_channels = tuple(decoder_channels)
        # Resolve the weights (and fail on a missing file) before building anything heavy.
        state = resolve_encoder_weights(encoder_weights, self.encoder_name)
        for name, rgb in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(rgb).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.encoder = VGGEncoder(self.encoder_name)
        self.decoder = UNetDecoder(self.decoder_channels, self.upsample)
        if state is not None:
            self.encoder.features.load_state_dict(state, strict=True)

    def config(self) -> dict[str, Any]:
        """The architecture arguments as a JSON-able dict (not the weights source)."""
        return {
            "encoder": self.encoder_name,
            "decoder_channels": list(self.decoder_channels),
            "upsample": self.upsample,
            "normalization": self.normalization,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UNetVGG16:
        """Build a randomly initialised model from :meth:`config` output."""
        known = {"encoder", "decoder_channels", "upsample", "normalization"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise BrainsegError(
                f"unknown model config key(s): {', '.join(map(str, unknown))}; "
                f"expected {', '.join(sorted(known))}",
                hint="the file may come from a newer brainseg; upgrade brainseg",
            )
        return cls(**dict(cfg))

    def set_encoder_trainable(self, flag: bool) -> None:
        """Freeze (False) or unfreeze (True) the encoder's parameters."""
        for p in self.encoder.parameters():
            p.requires_grad_(flag)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels in [0, 255] -> the encoder's input (ImageNet or per-image z-score)."""
        if not x.is_floating_point():
            x = x.float()
        if self.normalization == "imagenet":
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
        # Scale-free z-score; eps on the [0, 1] scale so a constant channel gives zeros.
        return (x - mean) / torch.sqrt(var + ZSCORE_EPS * 255.0 * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _tracing():
            if x.dim() != 4 or x.shape[1] != 3:
                raise BrainsegError(
                    f"model input has shape {tuple(x.shape)}; expected N x 3 x H x W"
                )
            check_input_size(int(x.shape[-2]), int(x.shape[-1]))
        skips, x = self.encoder(self.normalize(x))
        return self.decoder(skips, x)


def _expected_features(encoder: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's VGG16(-BN) state dict ``features.*`` (built on meta)."""
    with torch.device("meta"):
        features = _vgg_features(encoder, init=False)
    return {f"features.{k}": tuple(v.shape) for k, v in features.state_dict().items()}


def state_mismatch(
    expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]]
) -> str:
    """Why tensors of shapes ``stored`` would not load strictly where ``expected`` is wanted, in
    one line naming a few of each problem, or ``""`` (torch's own error lists every key)."""
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    wrong = [
        f"{k} {tuple(v)} (expected {tuple(expected[k])})"
        for k, v in stored.items()
        if k in expected and tuple(v) != tuple(expected[k])
    ]
    groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
    return "; ".join(f"{what} {_few(keys)}" for what, keys in groups if keys)


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the format allows it (keeps the
    unused 400 MB classifier of a full VGG16 file out of memory)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth (weights_only) or .safetensors file; BrainsegError otherwise."""
    if not path.exists():
        raise BrainsegError(
            f"encoder weights file {path} does not exist",
            hint="pass a torchvision VGG16 state dict (.pth or .safetensors), 'imagenet' or 'none'",
        )
    if not path.is_file():
        raise BrainsegError(
            f"encoder weights {path} is not a file",
            hint="pass a torchvision VGG16 state dict (.pth or .safetensors)",
        )
    try:
        kind = sniff_model_file(path)
    except OSError as exc:
        raise BrainsegError(f"cannot read encoder weights {path}: {exc.strerror or exc}") from exc
    is_safetensors = path.suffix == ".safetensors" or kind == "safetensors"
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path)
    except Exception as exc:  # pickle, zip, safetensors and I/O errors all land here
        kind = "safetensors" if is_safetensors else "PyTorch (weights_only)"
        raise BrainsegError(
            f"cannot read encoder weights {path}: not a {kind} state dict that loads safely "
            f"({first_line(exc)})",
            hint="pass a torchvision VGG16 state dict saved with torch.save(model.state_dict()) "
            "or safetensors",
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise BrainsegError(
            f"encoder weights {path} is not a state dict of named tensors "
            f"(found {type(obj).__name__})",
            hint="pass a torchvision VGG16 state dict (features.N.weight / features.N.bias)",
        )
    return dict(obj)


def load_vgg_features(path: Path, encoder: str = "vgg16") -> dict[str, torch.Tensor]:
    """The ``features`` tensors of a torchvision ``encoder`` state dict file (.pth loaded with
    ``weights_only``, or .safetensors): every key and shape checked, classifier.* ignored."""
    stored = {
        key.removeprefix("module."): value
        for key, value in _read_state_dict(path).items()
        if not key.removeprefix("module.").startswith("classifier.")
    }
    if not any(k.startswith("features.") for k in stored):
        raise BrainsegError(
            f"encoder weights {path} holds no VGG16 'features.*' tensors",
            hint="pass a torchvision VGG16 state dict (features.N.weight / features.N.bias)",
        )
    expected = _expected_features(encoder)
    shapes = {k: tuple(v.shape) for k, v in stored.items()}
    problems = state_mismatch(expected, shapes)
    if problems:
        keys = list(expected)
        other = "vgg16" if encoder == "vgg16_bn" else "vgg16_bn"
        hint = (
            f"expected a torchvision {encoder} state dict with keys {keys[0]} ... {keys[-1]} "
            f"({len(keys)} tensors, classifier.* ignored)"
        )
        if not state_mismatch(_expected_features(other), shapes):
            hint = f"these look like {other} weights: use encoder={other!r} (--encoder {other})"
        raise BrainsegError(
            f"encoder weights {path} do not match the {encoder} encoder: {problems}", hint=hint
        )
    return {
        k.removeprefix("features."): v.float() if v.is_floating_point() else v
        for k, v in stored.items()
    }


def resolve_encoder_weights(
    weights: str | os.PathLike[str] | None, encoder: str = "vgg16"
) -> dict[str, torch.Tensor] | None:
    """The ``features`` state dict for ``weights`` (None for random init); ``"imagenet"`` never
    touches the network: a missing file raises BrainsegError with the command that fetches it."""
    if weights is None or (isinstance(weights, str) and weights.lower() in ("none", "")):
        return None
    if isinstance(weights, str) and weights.lower() == "imagenet":
        path = imagenet_weights_path(encoder)
        command = "brainseg download vgg16" + (" --bn" if encoder == "vgg16_bn" else "")
        if not path.is_file():
            raise BrainsegError(
                f"ImageNet {encoder} weights not found at {path} (they are never downloaded "
                "during training)",
                hint=f"run `{command}` once (needs internet), or pass "
                "--encoder-weights none / a weights file",
            )
        return load_vgg_features(path, encoder)
    return load_vgg_features(Path(weights).expanduser(), encoder)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_flops(model: nn.Module, height: int = 256, width: int = 256) -> int:
    """Forward FLOPs for one image of ``height`` x ``width`` (FlopCounterMode: 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, 3, height, width, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
