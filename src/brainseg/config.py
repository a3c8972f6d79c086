"""Training settings: one flat dataclass, YAML presets, CLI overrides, validation up front.

Every knob of ``brainseg train`` is a plain field of :class:`TrainConfig` (nanoGPT style): the
YAML file, the CLI and the Python API all set the same names. Validation happens here, before
any data is read or a model is built, so a typo costs a second and not an epoch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from brainseg.devices import check_device_name
from brainseg.errors import BrainsegError, first_line

LOSSES = ("bce", "dice", "bce+dice")
SCHEDULERS = ("none", "cosine", "plateau")
AMP_MODES = ("auto", "bf16", "fp16", "off")
ENCODERS = ("vgg16", "vgg16_bn")
UPSAMPLES = ("transpose", "bilinear")
NORMALIZATIONS = ("imagenet", "zscore")
MASK_MODES = ("nearest", "bilinear")
PRESETS = ("seed", "best")

#: Options that may be given together with ``--resume`` (they do not change the recipe).
RESUME_OVERRIDABLE = ("epochs", "quiet", "device", "workers", "resume")


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the reference recipe (configs/seed.yaml)."""

    # data
    data: str | None = None  # dataset folder (kaggle_3m layout)
    split: str | None = None  # split YAML written by `brainseg split`
    fold: int | None = None  # cross-validation fold (None: the split's train/val subsets)
    skip_bad: bool = False  # skip unreadable slices instead of refusing the dataset
    image_size: int = 256  # slices are resized once to image_size x image_size
    # probability that a drawn slice has tumor (None: natural frequency)
    tumor_oversample: float | None = None
    # model
    encoder: str = "vgg16"
    encoder_weights: str = "imagenet"  # imagenet | none | PATH to a torchvision-format state dict
    decoder_channels: list[int] = field(default_factory=lambda: [512, 256, 128, 64, 32])
    upsample: str = "transpose"
    normalization: str = "imagenet"
    freeze_encoder_epochs: int = 0  # train only the decoder for the first N epochs
    # start the logit head's bias at log(p / (1 - p)): first predictions match a tumour-pixel
    # prior p (e.g. 0.01) instead of 0.5, so BCE does not spend its first hundreds of steps
    # pulling every pixel down (None: PyTorch's default init)
    head_bias_prior: float | None = None
    # optimisation (Adam)
    loss: str = "bce"
    lr: float = 4e-4
    weight_decay: float = 0.0
    scheduler: str = "none"
    plateau_patience: int = 3  # epochs without a better val per-patient Dice before lowering lr
    plateau_factor: float = 0.5  # lr multiplier when the plateau scheduler fires
    epochs: int = 20
    batch_size: int = 16  # global batch (split across processes under torchrun)
    steps_per_epoch: int | None = None  # cap on optimiser steps per epoch (None: one pass)
    grad_clip: float | None = None  # max global gradient norm (None: no clipping)
    # augmentation (batched, on the training device)
    augment: bool = False
    aug_hflip: float = 0.5  # probability of a left-right flip
    aug_vflip: float = 0.0  # probability of an up-down flip (off: axial slices are upright)
    aug_rotate: float = 15.0  # max rotation, degrees
    aug_scale: float = 0.1  # max relative zoom in/out
    aug_brightness: float = 0.1  # max brightness shift, fraction of 255
    aug_contrast: float = 0.1  # max relative contrast change
    aug_mask_mode: str = "nearest"  # mask resampling: nearest, or bilinear then > 0.5
    # device and speed
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    workers: int = 0  # CPU threads for torch (0: torch's default)
    val_batch_size: int | None = None  # None: the training batch size
    # reproducibility
    seed: int = 0
    deterministic: bool = False
    # output
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    resume: str | None = None
    quiet: bool = False
    preview_slices: int = 6

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        """All setting names, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the config") -> TrainConfig:
        """Build from a mapping; unknown keys are refused, naming them and ``source``."""
        values = {k: v for k, v in values.items() if k != "run_info"}  # run folders' config.yaml
        # YAML keys may be numbers, null or booleans: compare and show them as text.
        unknown = sorted(map(str, set(values) - set(cls.keys())))
        if unknown:
            raise BrainsegError(
                f"unknown setting(s) in {source}: {', '.join(unknown)}",
                hint="see docs/training.md for the setting names (they match the CLI options, "
                "with _ for -)",
            )
        cfg = cls()
        for k, v in values.items():
            setattr(cfg, k, v)
        cfg._coerce()
        return cfg

    def merged(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``overrides`` applied; ``None`` values mean "not given" and are skipped."""
        values = self.to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig.from_dict(values, "the command-line options")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values (lists, not tuples)."""
        d = dataclasses.asdict(self)
        if isinstance(self.decoder_channels, (list, tuple)):  # else validate() names it
            d["decoder_channels"] = list(self.decoder_channels)
        return d

    def _coerce(self) -> None:
        """Accept the natural spellings YAML and the CLI give (ints for floats, '32,16' lists)."""
        if isinstance(self.decoder_channels, str):
            try:
                self.decoder_channels = [int(x) for x in self.decoder_channels.split(",") if x]
            except ValueError:
                raise BrainsegError(
                    f"decoder_channels must be 5 comma-separated integers, got "
                    f"{self.decoder_channels!r}",
                    hint="e.g. --decoder-channels 512,256,128,64,32",
                ) from None
        elif isinstance(self.decoder_channels, (list, tuple)):
            self.decoder_channels = list(self.decoder_channels)
        for name in (
            "lr",
            "weight_decay",
            "plateau_factor",
            "aug_hflip",
            "aug_vflip",
            "aug_rotate",
            "aug_scale",
            "aug_brightness",
            "aug_contrast",
        ):
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, float(v))
        for name in ("grad_clip", "tumor_oversample", "head_bias_prior"):
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, float(v))
        if self.encoder_weights is None:
            self.encoder_weights = "none"
        for name in ("data", "split", "resume", "project", "encoder_weights"):
            v = getattr(self, name)
            if isinstance(v, Path):
                setattr(self, name, str(v))

    # ------------------------------------------------------------------ validation
    def validate(self, *, need_data: bool = True) -> None:
        """Refuse bad values with one clear line each (exit 2), before any work is done."""
        _check_types(self)
        if need_data and not self.resume:
            if not self.data:
                _bad("no dataset given", "brainseg train DATA --split splits.yaml")
            if not self.split:
                _bad(
                    "no split file given (--split)",
                    "make one with: brainseg split DATA -o splits.yaml",
                )
        if self.data and not Path(self.data).exists():
            _bad(
                f"dataset folder {self.data} does not exist",
                "pass the kaggle_3m folder (or its parent)",
            )
        if self.split and not self.resume and not Path(self.split).is_file():
            _bad(
                f"split file {self.split} does not exist",
                "make one with: brainseg split DATA -o splits.yaml",
            )
        _choice("loss", self.loss, LOSSES)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("amp", self.amp, AMP_MODES)
        _choice("encoder", self.encoder, ENCODERS)
        _choice("upsample", self.upsample, UPSAMPLES)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _choice("aug_mask_mode", self.aug_mask_mode, MASK_MODES)
        check_device_name(self.device)
        if not (math.isfinite(self.lr) and self.lr > 0):
            _bad(f"lr must be a positive number, got {self.lr}", "the reference uses --lr 4e-4")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            _bad(f"weight_decay must be >= 0, got {self.weight_decay}", "e.g. --weight-decay 1e-4")
        _positive("epochs", self.epochs, "e.g. --epochs 20")
        _positive("batch_size", self.batch_size, "e.g. --batch-size 16")
        if self.steps_per_epoch is not None:
            _positive("steps_per_epoch", self.steps_per_epoch, "e.g. --steps-per-epoch 50")
        if self.val_batch_size is not None:
            _positive("val_batch_size", self.val_batch_size, "e.g. val_batch_size: 32")
        if self.image_size < 32 or self.image_size % 32:
            _bad(
                f"image_size must be a positive multiple of 32 (the encoder halves it 5 times),"
                f" got {self.image_size}",
                "e.g. --image-size 256, 128 or 64",
            )
        if self.fold is not None and self.fold < 0:
            _bad(f"fold must be >= 0, got {self.fold}", "folds are numbered 0..K-1")
        if self.tumor_oversample is not None and not 0.0 <= self.tumor_oversample <= 1.0:
            _bad(
                f"tumor_oversample must be a probability in [0, 1], got {self.tumor_oversample}",
                "e.g. --tumor-oversample 0.5 (half of the drawn slices have tumor)",
            )
        if self.head_bias_prior is not None and not 0.0 < self.head_bias_prior < 1.0:
            _bad(
                f"head_bias_prior must be a probability in (0, 1), got {self.head_bias_prior}",
                "e.g. head_bias_prior: 0.01 (about the tumour pixel fraction)",
            )
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            _bad(
                f"grad_clip must be a positive number, got {self.grad_clip}",
                "e.g. --grad-clip 1.0 (leave it out for no clipping)",
            )
        if self.freeze_encoder_epochs < 0:
            _bad(
                f"freeze_encoder_epochs must be >= 0, got {self.freeze_encoder_epochs}",
                "e.g. --freeze-encoder-epochs 2",
            )
        if len(self.decoder_channels) != 5 or any(c < 1 for c in self.decoder_channels):
            _bad(
                f"decoder_channels must be 5 positive integers, got {self.decoder_channels}",
                "e.g. --decoder-channels 512,256,128,64,32",
            )
        if self.workers < 0:
            _bad(f"workers must be >= 0, got {self.workers}", "0 uses torch's default")
        if self.plateau_patience < 0 or not 0 < self.plateau_factor < 1:
            _bad(
                f"plateau_patience must be >= 0 and plateau_factor in (0, 1), got "
                f"{self.plateau_patience} and {self.plateau_factor}",
                "e.g. plateau_patience: 3, plateau_factor: 0.5",
            )
        for name in ("aug_hflip", "aug_vflip"):
            if not 0 <= getattr(self, name) <= 1:
                _bad(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}",
                    f"e.g. {name}: 0.5",
                )
        for name, top in (
            ("aug_rotate", 180.0),
            ("aug_scale", 0.9),
            ("aug_brightness", 1.0),
            ("aug_contrast", 0.9),
        ):
            if not 0 <= getattr(self, name) <= top:
                _bad(
                    f"{name} must be in [0, {top}], got {getattr(self, name)}",
                    "see docs/training.md (augmentation)",
                )
        if self.preview_slices < 0:
            _bad(f"preview_slices must be >= 0, got {self.preview_slices}", "e.g. 6")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            _bad(f"run name must be a plain folder name, got {self.name!r}", "e.g. --name exp")
        enc = self.encoder_weights
        if enc not in ("imagenet", "none") and not Path(enc).is_file():
            _bad(
                f"encoder weights file {enc} does not exist",
                "pass imagenet, none, or the path of a torchvision-format VGG16 state dict",
            )


_TYPES: dict[str, tuple[type, ...]] = {
    "data": (str,),
    "split": (str,),
    "fold": (int,),
    "skip_bad": (bool,),
    "image_size": (int,),
    "tumor_oversample": (float,),
    "encoder": (str,),
    "encoder_weights": (str,),
    "decoder_channels": (list,),
    "upsample": (str,),
    "normalization": (str,),
    "freeze_encoder_epochs": (int,),
    "head_bias_prior": (float,),
    "loss": (str,),
    "lr": (float,),
    "weight_decay": (float,),
    "scheduler": (str,),
    "plateau_patience": (int,),
    "plateau_factor": (float,),
    "epochs": (int,),
    "batch_size": (int,),
    "steps_per_epoch": (int,),
    "grad_clip": (float,),
    "augment": (bool,),
    "aug_hflip": (float,),
    "aug_vflip": (float,),
    "aug_rotate": (float,),
    "aug_scale": (float,),
    "aug_brightness": (float,),
    "aug_contrast": (float,),
    "aug_mask_mode": (str,),
    "device": (str,),
    "amp": (str,),
    "channels_last": (bool,),
    "compile": (bool,),
    "workers": (int,),
    "val_batch_size": (int,),
    "seed": (int,),
    "deterministic": (bool,),
    "project": (str,),
    "name": (str,),
    "exist_ok": (bool,),
    "resume": (str,),
    "quiet": (bool,),
    "preview_slices": (int,),
}
_OPTIONAL = {
    "data",
    "split",
    "fold",
    "tumor_oversample",
    "head_bias_prior",
    "steps_per_epoch",
    "grad_clip",
    "val_batch_size",
    "resume",
}


def _check_types(cfg: TrainConfig) -> None:
    for name, types in _TYPES.items():
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL:
            continue
        ok = isinstance(v, types) and not (bool not in types and isinstance(v, bool))
        if name == "decoder_channels" and ok:
            ok = all(isinstance(c, int) and not isinstance(c, bool) for c in v)
        if not ok:
            want = _TYPE_WORDS[name if name == "decoder_channels" else types[0].__name__]
            _bad(f"{name} must be {want}, got {v!r}", "see docs/training.md for each setting")


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "decoder_channels": "a list of 5 integers",
}


def _bad(message: str, hint: str) -> None:
    raise BrainsegError(message, hint=hint)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _bad(f"unknown {name} {value!r}", f"choose one of: {', '.join(allowed)}")


def _positive(name: str, value: int, hint: str) -> None:
    if value < 1:
        _bad(f"{name} must be at least 1, got {value}", hint)


# ---------------------------------------------------------------------- YAML files
def preset_path(name: str) -> Path:
    """The packaged YAML file of a preset (``seed`` or ``best``)."""
    from importlib import resources

    return Path(str(resources.files("brainseg") / "configs" / f"{name}.yaml"))


def resolve_config_path(value: str) -> Path:
    """``seed`` / ``best`` name a packaged preset; anything else is a file path."""
    p = Path(value)
    if value in PRESETS and not p.is_file():
        return preset_path(value)
    if not p.is_file():
        raise BrainsegError(
            f"config file {value} does not exist",
            hint=f"pass a YAML file or a preset name ({', '.join(PRESETS)})",
        )
    return p


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a parse error or a non-mapping names the file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainsegError(
            f"cannot read config file {path}: {exc}",
            hint="check the path and that it is a text file",
        ) from exc
    except yaml.YAMLError as exc:
        raise BrainsegError(
            f"config file {path} is not valid YAML: {first_line(exc)}",
            hint="fix the YAML syntax",
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BrainsegError(
            f"config file {path} must hold a mapping of settings, got {type(data).__name__}",
            hint="e.g. 'lr: 0.0004' one per line",
        )
    return data


def load_config(
    value: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults <- YAML file (a preset name or a path) <- explicit CLI overrides.

    Returns an unvalidated config; call :meth:`TrainConfig.validate` before doing work.
    """
    if value is None:
        cfg = TrainConfig()
    else:
        path = resolve_config_path(str(value))
        cfg = TrainConfig.from_dict(read_yaml(path), f"config file {path}")
    return cfg.merged(overrides or {})


def dump_yaml(values: dict[str, Any]) -> str:
    """YAML text of a mapping, keys in the given order."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)


def load_resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of run folder ``run_dir`` (its config.yaml), ready to continue training.

    Only options that do not change the recipe may be given again (epochs, device, workers,
    quiet); any other given option is refused, naming it.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise BrainsegError(
            f"cannot resume: {run / 'config.yaml'} does not exist",
            hint="pass a run folder written by brainseg train, e.g. runs/train/exp",
        )
    given = {k: v for k, v in (overrides or {}).items() if v is not None and k != "resume"}
    refused = sorted(k for k in given if k not in RESUME_OVERRIDABLE)
    if refused:
        raise BrainsegError(
            f"cannot change {', '.join('--' + k.replace('_', '-') for k in refused)} when "
            f"resuming {run}",
            hint="only --epochs, --device, --workers and --quiet may be given "
            "with --resume; start a new run to change the recipe",
        )
    path = run / "config.yaml"
    cfg = TrainConfig.from_dict(read_yaml(path), f"config file {path}")
    cfg = cfg.merged(given)
    cfg.resume = str(run)
    return cfg
