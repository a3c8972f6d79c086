"""Training settings: one flat dataclass, YAML presets, CLI overrides, validation up front.

Every knob of ``brainseg train`` is a plain field of :class:`TrainConfig` (nanoGPT style): the
YAML file, the CLI and the Python API all set the same names. Validation happens here, before
any data is read or a model is built, so a typo costs a second and not an epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from brainseg.choices import (
    AMP_MODES,
    DEFAULT_DECODER_CHANNELS,
    ENCODERS,
    LOGGERS,
    LOSSES,
    MASK_MODES,
    NORMALIZATIONS,
    PRESETS,
    SCHEDULERS,
    UPSAMPLE_MODES,
)
from brainseg.devices import DEVICE_HELP, check_device_name
from brainseg.ensemble import load_ensemble
from brainseg.errors import BrainsegError, first_line
from brainseg.fsutil import check_run_name, one_line
from brainseg.optional import require
from brainseg.settings import (
    MAX_DECODER_CHANNELS,
    MAX_MODEL_SIZE,
    SIZE_MULTIPLE,
    decoder_channels_error,
)
from brainseg.yamlio import parse_yaml

#: ``--fold all``: train on every patient, no validation (a final model).
ALL_FOLDS = "all"
#: Largest --seed (numpy's and torch's seeding both take 0 .. 2**32 - 1 everywhere).
MAX_SEED = 2**32 - 1


# ---------------------------------------------------------------------- how a setting is declared
#: The roles a setting may have (its ``roles`` metadata; read with :func:`fields_with`):
ROLES = {
    "flag": "an option of `brainseg train` and `brainseg cv` (every setting not marked cli=False)",
    "recipe": "decides what is trained: shown as the recipe on the model card",
    "resumable": "may be given again with `train --resume` (does not change the recipe)",
    "runtime": "does not change what is trained: may differ when a cv is continued",
    "per_fold": "set by `brainseg cv` for every fold (not a cv training option)",
}


@dataclass(frozen=True)
class Rule:
    """A value check: ``ok(value)`` or the error ``"<name> <must>, got <value>"`` + ``hint``."""

    ok: Callable[[Any], bool]
    must: str
    hint: str


def _setting(
    default: Any, help: str, *, roles: tuple[str, ...] = (), cli: bool = True, **meta: Any
) -> Any:
    """A TrainConfig field with its help text, its :data:`ROLES` and CLI / validation metadata.

    ``cli=False``: YAML only (no ``flag`` role). meta: ``show`` (the default as the help shows
    it), ``choices``, ``rule``, ``flags`` (extra option names), ``switch`` (False: no
    ``--no-``), ``path``, ``words`` (strings a numeric setting also takes, e.g. ``--fold all``),
    ``items`` (a list setting's item type; int when not given).
    """
    metadata = {"help": help, "roles": frozenset(roles) | ({"flag"} if cli else set()), **meta}
    if isinstance(default, tuple):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _recipe(default: Any, help: str, **meta: Any) -> Any:
    """A setting that decides what is trained (the ``recipe`` role)."""
    return _setting(default, help, roles=("recipe",), **meta)


def _per_fold(default: Any, help: str, **meta: Any) -> Any:
    """A setting ``brainseg cv`` sets for every fold itself."""
    return _setting(default, help, roles=("per_fold",), **meta)


def _runtime(default: Any, help: str, **meta: Any) -> Any:
    """A setting that does not change what is trained (may change on a resume or cv resume)."""
    return _setting(default, help, roles=("resumable", "runtime"), **meta)


def _at_least(low: int, hint: str) -> Rule:
    return Rule(lambda v: v >= low, "must be at least 1" if low == 1 else f"must be >= {low}", hint)


def _finite(ok: Callable[[float], bool], must: str, hint: str) -> Rule:
    """``ok`` for a finite number (NaN and inf are refused)."""
    return Rule(lambda v: math.isfinite(v) and ok(v), must, hint)


def _in_range(low: float, high: float, must: str, hint: str) -> Rule:
    return Rule(lambda v: low <= v <= high, must, hint)


def _aug(default: float, help: str, high: float) -> Any:
    """A YAML-only augmentation strength from 0 to ``high``."""
    rule = _in_range(0, high, f"must be in [0, {high}]", "see docs/training.md (augmentation)")
    return _recipe(default, help, cli=False, rule=rule)


_PROB01 = "must be a probability in [0, 1]"


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the reference recipe (configs/seed.yaml)."""

    # data
    data: str | None = _per_fold(
        None, "Dataset folder (kaggle_3m layout); not needed with --resume.", cli=False
    )
    split: str | None = _per_fold(None, "Split YAML from `brainseg split`.", path=True)
    fold: int | str | None = _per_fold(
        None,
        "Cross-validation fold K (0..folds-1) of a --folds split, or all: train on every "
        "patient (of DATA, or of --split's subsets together) with no validation.",
        words=(ALL_FOLDS,),
        rule=Rule(
            lambda v: v == ALL_FOLDS or v >= 0,
            "must be >= 0 or all",
            "folds are numbered 0..K-1; --fold all trains on every patient",
        ),
    )
    postprocess_from: str | None = _setting(
        None,
        "A `brainseg cv` folder (or its ensemble.json): store its tuned threshold and "
        "post-processing in the checkpoints (for --fold all).",
        path=True,
    )
    skip_bad: bool = _setting(False, "Skip unreadable slices instead of refusing the dataset.")
    image_size: int = _recipe(
        256,
        f"Train at this size (multiple of {SIZE_MULTIPLE}); validation Dice is measured at "
        "this size.",
        rule=Rule(
            lambda v: SIZE_MULTIPLE <= v <= MAX_MODEL_SIZE and v % SIZE_MULTIPLE == 0,
            f"must be a multiple of {SIZE_MULTIPLE} (the encoder halves it 5 times) "
            f"from {SIZE_MULTIPLE} to {MAX_MODEL_SIZE}",
            "e.g. --image-size 256, 128 or 64",
        ),
    )
    tumor_oversample: float | None = _recipe(
        None,
        "Probability that a drawn slice has tumor.",
        show="natural frequency",
        rule=_in_range(
            0, 1, _PROB01, "e.g. --tumor-oversample 0.5 (half of the drawn slices have tumor)"
        ),
    )
    # model
    encoder: str = _recipe("vgg16", "Encoder.", choices=ENCODERS)
    encoder_weights: str = _recipe(
        "imagenet", "imagenet | none | PATH (torchvision-format VGG16 state dict)."
    )
    decoder_channels: list[int] = _recipe(  # noqa: RUF009 (returns a field with a factory)
        DEFAULT_DECODER_CHANNELS,  # a tuple: each config gets its own list
        "5 comma-separated widths.",
        show=",".join(map(str, DEFAULT_DECODER_CHANNELS)),
        rule=Rule(
            lambda v: decoder_channels_error(v) is None,
            f"must be 5 integers from 1 to {MAX_DECODER_CHANNELS}",
            "e.g. --decoder-channels 512,256,128,64,32",
        ),
    )
    upsample: str = _recipe("transpose", "Decoder upsampling.", choices=UPSAMPLE_MODES)
    normalization: str = _recipe(
        "imagenet", "imagenet | zscore (per image), done inside the model.", choices=NORMALIZATIONS
    )
    freeze_encoder_epochs: int = _recipe(
        0,
        "Train only the decoder for the first N epochs.",
        rule=_at_least(0, "e.g. --freeze-encoder-epochs 2"),
    )
    # start the logit head's bias at log(p / (1 - p)): first predictions match a tumour-pixel
    # prior p (e.g. 0.01) instead of 0.5, so BCE does not spend its first hundreds of steps
    # pulling every pixel down (None: PyTorch's default init)
    head_bias_prior: float | None = _recipe(
        None,
        "Tumour-pixel prior of the untrained head.",
        cli=False,
        rule=Rule(
            lambda v: 0 < v < 1,
            "must be a probability in (0, 1)",
            "e.g. head_bias_prior: 0.01 (about the tumour pixel fraction)",
        ),
    )
    # optimisation (Adam)
    loss: str = _recipe("bce", "Loss.", choices=LOSSES)
    lr: float = _recipe(
        4e-4,
        "Adam learning rate.",
        show="4e-4",
        rule=_finite(lambda v: v > 0, "must be a positive number", "the reference uses --lr 4e-4"),
    )
    weight_decay: float = _recipe(
        0.0,
        "Adam weight decay (L2).",
        show="0",
        rule=_finite(lambda v: v >= 0, "must be >= 0", "e.g. --weight-decay 1e-4"),
    )
    scheduler: str = _recipe(
        "none",
        "none | cosine (per step, to 0) | plateau (x0.5 when val per-patient Dice stalls).",
        choices=SCHEDULERS,
    )
    warmup_epochs: float = _recipe(
        0.0,
        "Epochs of linear learning-rate warm-up before the scheduler.",
        cli=False,
        rule=_finite(lambda v: v >= 0, "must be >= 0", "e.g. warmup_epochs: 1"),
    )
    ema_decay: float | None = _recipe(
        None,
        "Decay of an EMA of the weights (None: off).",
        cli=False,
        rule=Rule(
            lambda v: 0 < v < 1,
            "must be in (0, 1)",
            "e.g. ema_decay: 0.99 (averages about the last 100 steps)",
        ),
    )
    plateau_patience: int = _recipe(
        3, "Epochs without a better val per-patient Dice before lowering lr.", cli=False
    )
    plateau_factor: float = _recipe(
        0.5, "lr multiplier when the plateau scheduler fires.", cli=False
    )
    epochs: int = _setting(
        20, "Epochs.", rule=_at_least(1, "e.g. --epochs 20"), roles=("recipe", "resumable")
    )
    batch_size: int = _recipe(
        16, "Global batch size.", flags=("-b",), rule=_at_least(1, "e.g. --batch-size 16")
    )
    steps_per_epoch: int | None = _recipe(
        None,
        "Optimiser steps per epoch.",
        show="one pass",
        rule=_at_least(1, "e.g. --steps-per-epoch 50"),
    )
    grad_clip: float | None = _recipe(
        None,
        "Clip the gradient norm to this value.",
        show="off",
        rule=_finite(
            lambda v: v > 0,
            "must be a positive number",
            "e.g. --grad-clip 1.0 (leave it out for no clipping)",
        ),
    )
    # augmentation (batched, on the training device); aug_* are YAML only
    augment: bool = _recipe(False, "Flips, rotation, scale, brightness/contrast on the device.")
    aug_hflip: float = _recipe(
        0.5,
        "Probability of a left-right flip.",
        cli=False,
        rule=_in_range(0, 1, _PROB01, "e.g. aug_hflip: 0.5"),
    )
    aug_vflip: float = _recipe(
        0.0,
        "Probability of an up-down flip (off: axial slices are upright).",
        cli=False,
        rule=_in_range(0, 1, _PROB01, "e.g. aug_vflip: 0.5"),
    )
    aug_rotate: float = _aug(15.0, "Max rotation, degrees.", 180.0)
    aug_scale: float = _aug(0.1, "Max relative zoom in/out.", 0.9)
    aug_brightness: float = _aug(0.1, "Max brightness shift, fraction of 255.", 1.0)
    aug_contrast: float = _aug(0.1, "Max relative contrast change.", 0.9)
    aug_mask_mode: str = _recipe(
        "nearest",
        "Mask resampling: nearest, or bilinear then > 0.5.",
        cli=False,
        choices=MASK_MODES,
    )
    # device and speed
    device: str = _runtime("auto", f"{DEVICE_HELP}.")
    amp: str = _recipe(
        "auto",
        "auto | bf16 | fp16 | off (auto: bf16 on GPUs and on CPUs with native bf16, else fp32).",
        choices=AMP_MODES,
    )
    channels_last: bool = _setting(False, "NHWC memory format.")
    compile: bool = _setting(False, "torch.compile the model.")
    workers: int = _runtime(
        0,
        "CPU threads for torch (0: torch's default).",
        rule=_at_least(0, "0 uses torch's default"),
    )
    val_batch_size: int | None = _setting(
        None,
        "Validation batch size (None: the training batch size).",
        cli=False,
        rule=_at_least(1, "e.g. val_batch_size: 32"),
    )
    # reproducibility
    seed: int = _recipe(
        0,
        "Random seed.",
        rule=_in_range(0, MAX_SEED, f"must be an integer from 0 to {MAX_SEED}", "e.g. --seed 0"),
    )
    deterministic: bool = _setting(
        False, "torch.use_deterministic_algorithms (same seed + device = same numbers)."
    )
    # output
    project: str = _per_fold("runs/train", "Parent folder of runs.", path=True)
    name: str = _per_fold("exp", "Run folder name; exp2, exp3... if taken.")
    exist_ok: bool = _per_fold(
        False, "Reuse project/name instead of numbering a new folder.", switch=False
    )
    resume: str | None = _setting(
        None,
        "Continue the run in this folder (or its last.safetensors); --epochs may be raised.",
        path=True,
        roles=("per_fold", "resumable"),
    )
    loggers: list[str] = _setting(  # noqa: RUF009 (returns a field with a factory)
        (),
        "Also log to tensorboard and / or mlflow (csv is always written); the CLI's "
        "repeatable --logger.",
        cli=False,
        items=str,
        show="csv only",
        roles=("resumable",),
    )
    quiet: bool = _runtime(
        False, "No progress bar or per-epoch lines.", flags=("-q",), switch=False
    )
    preview_slices: int = _setting(
        6, "Validation slices shown in preview.png.", cli=False, rule=_at_least(0, "e.g. 6")
    )

    @property
    def all_patients(self) -> bool:
        """``--fold all``: every patient trains, nothing is validated."""
        return self.fold == ALL_FOLDS

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
                f"unknown setting(s) in {source}: {', '.join(one_line(k) for k in unknown)}",
                hint="see docs/training.md for the setting names (they match the CLI options, "
                "with _ for -)",
            )
        cfg = cls(**values)
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
        elif isinstance(self.decoder_channels, tuple):
            self.decoder_channels = list(self.decoder_channels)
        if isinstance(self.loggers, str):  # loggers: tensorboard (YAML) or "tensorboard,mlflow"
            self.loggers = [x.strip() for x in self.loggers.split(",") if x.strip()]
        elif isinstance(self.loggers, tuple):
            self.loggers = list(self.loggers)
        if self.encoder_weights is None:
            self.encoder_weights = "none"
        words = {f.name: f.metadata.get("words", ()) for f in fields(self)}
        for name, (kind, _optional) in field_types().items():
            v = getattr(self, name)
            if words[name] and isinstance(v, str) and v not in words[name]:
                with contextlib.suppress(ValueError):
                    setattr(self, name, int(v))  # --fold 2 arrives as text
            elif kind is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, float(v))
            elif kind is str and isinstance(v, Path):
                setattr(self, name, str(v))

    # ------------------------------------------------------------------ validation
    def validate(self, *, need_data: bool = True) -> None:
        """Refuse bad values with one clear line each (exit 2), before any work is done."""
        _check_types(self)
        if need_data:
            _check_inputs(self)
        for f in fields(self):
            v = getattr(self, f.name)
            if "choices" in f.metadata and v not in f.metadata["choices"]:
                _bad(
                    f"unknown {f.name} {v!r}", f"choose one of: {', '.join(f.metadata['choices'])}"
                )
            rule = f.metadata.get("rule")
            if rule is not None and v is not None and not rule.ok(v):
                _bad(f"{f.name} {rule.must}, got {v}", rule.hint)
        _check_cross(self)


def _check_inputs(cfg: TrainConfig) -> None:
    """The dataset and split are given and exist (a resumed run has its own split)."""
    if not cfg.resume:
        if not cfg.data:
            _bad("no dataset given", "brainseg train DATA --split splits.yaml")
        if not cfg.split and not cfg.all_patients:
            _bad(
                "no split file given (--split)",
                "make one with: brainseg split DATA -o splits.yaml, or train a final model on "
                "every patient with: brainseg train DATA --fold all",
            )
    if cfg.data and not Path(cfg.data).exists():
        _bad(
            f"dataset folder {cfg.data} does not exist", "pass the kaggle_3m folder (or its parent)"
        )
    if cfg.split and not cfg.resume and not Path(cfg.split).is_file():
        _bad(
            f"split file {cfg.split} does not exist",
            "make one with: brainseg split DATA -o splits.yaml",
        )


def _check_cross(cfg: TrainConfig) -> None:
    """The checks that are not one value against one rule."""
    check_device_name(cfg.device)
    if cfg.plateau_patience < 0 or not 0 < cfg.plateau_factor < 1:
        _bad(
            f"plateau_patience must be >= 0 and plateau_factor in (0, 1), got "
            f"{cfg.plateau_patience} and {cfg.plateau_factor}",
            "e.g. plateau_patience: 3, plateau_factor: 0.5",
        )
    if cfg.warmup_epochs >= cfg.epochs:
        _bad(
            f"warmup_epochs must be less than epochs ({cfg.epochs}), got {cfg.warmup_epochs:g}",
            "e.g. warmup_epochs: 1 for a 20-epoch run",
        )
    for name in cfg.loggers:  # unknown, or its package is not installed
        if name not in LOGGERS:
            _bad(
                f"unknown --logger {name!r}",
                f"choose {' or '.join(LOGGERS)} (csv is always written)",
            )
        require(LOGGERS[name], f"--logger {name}")
    if cfg.all_patients and cfg.scheduler == "plateau":
        _bad(
            "--scheduler plateau needs validation patients, and --fold all has none",
            "use --scheduler none or cosine with --fold all",
        )
    if cfg.postprocess_from and not _ensemble_manifest(cfg.postprocess_from).is_file():
        _bad(
            f"--postprocess-from {cfg.postprocess_from}: no ensemble.json there",
            "pass a folder written by brainseg cv (runs/cv/expN) or its ensemble.json",
        )
    _check_project(cfg.project)
    check_run_name(cfg.name)  # the one rule of every run folder
    enc = cfg.encoder_weights
    if enc not in ("imagenet", "none") and not Path(enc).is_file():
        _bad(
            f"encoder weights file {enc} does not exist",
            "pass imagenet, none, or the path of a torchvision-format VGG16 state dict",
        )


def _check_project(project: str) -> None:
    """``--project`` is a folder or can become one: no part of it is an existing file."""
    p = Path(project)
    for part in (p, *p.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                _bad(
                    f"--project {project}: {part} is a file, not a folder",
                    "pass a folder for the runs (it is created if missing), e.g. "
                    "--project runs/train",
                )
            return


def _ensemble_manifest(path: str) -> Path:
    p = Path(path)
    return p if p.suffix.lower() == ".json" else p / "ensemble.json"


def postprocess_settings(cfg: TrainConfig) -> dict[str, Any]:
    """``threshold`` and ``postprocess`` of ``--postprocess-from`` (empty without it)."""
    if not cfg.postprocess_from:
        return {}
    manifest = _ensemble_manifest(cfg.postprocess_from)
    settings = load_ensemble(manifest)[1]
    out: dict[str, Any] = {k: settings[k] for k in ("threshold", "postprocess") if k in settings}
    out["postprocess_from"] = str(manifest.resolve())
    return out


@functools.cache
def fields_with(role: str) -> tuple[str, ...]:
    """The names of the settings with ``role`` (one of :data:`ROLES`), in declaration order."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return tuple(f.name for f in fields(TrainConfig) if role in f.metadata["roles"])


@functools.cache
def field_types() -> dict[str, tuple[type, bool]]:
    """Each setting's base type and whether None is allowed, from TrainConfig's annotations."""
    out: dict[str, tuple[type, bool]] = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        base = args[0] if optional else hint
        out[name] = (typing.get_origin(base) or base, optional)
    return out


def _check_types(cfg: TrainConfig) -> None:
    for f in fields(cfg):
        kind, optional = field_types()[f.name]
        words, v = f.metadata.get("words", ()), getattr(cfg, f.name)
        if (v is None and optional) or (isinstance(v, str) and v in words):
            continue
        ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
        item = f.metadata.get("items", int)
        if kind is list and ok:
            ok = all(isinstance(c, item) and not isinstance(c, bool) for c in v)
        if not ok:
            key = ("decoder_channels" if item is int else "names") if kind is list else None
            want = _TYPE_WORDS[key or kind.__name__]
            want += "".join(f" or {w}" for w in words)
            _bad(f"{f.name} must be {want}, got {v!r}", "see docs/training.md for each setting")


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "decoder_channels": "a list of 5 integers",
    "names": "a list of names",
}


def setting_help(name: str) -> str:
    """The CLI help of setting ``name``: its help text, choices and default, from the field."""
    f = {f.name: f for f in fields(TrainConfig)}[name]
    text = f.metadata["help"]
    if "choices" in f.metadata and " | " not in text:
        text = f"{text.rstrip('.')}: {' | '.join(f.metadata['choices'])}."
    default = f.metadata.get("show")
    if default is None:
        d = f.default
        default = "off" if d is False else "on" if d is True else d
    return f"{text.rstrip('.')} (default: {default})." if default is not None else text


def _bad(message: str, hint: str) -> None:
    raise BrainsegError(message, hint=hint)


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
    """Read a YAML mapping; a parse error, a limit or a non-mapping names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainsegError(
            f"cannot read config file {path}: {first_line(exc)}",
            hint="check the path and that it is a text file",
        ) from exc
    data = parse_yaml(text, f"config file {path}", "fix the YAML syntax")
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
    """Defaults <- YAML file (a preset name or a path) <- CLI overrides; not validated yet."""
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


def resume_folder(path: Path) -> Path:
    """The run folder of ``--resume PATH``: the folder itself, or that of its last.safetensors."""
    if not path.is_file():
        return path
    if path.name == "last.safetensors":
        return path.parent
    raise BrainsegError(
        f"cannot resume from {path}: --resume takes a run folder (or its last.safetensors)",
        hint=f"give the run folder: brainseg train --resume {path.parent}",
    )


def load_resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of run folder ``run_dir``; only ``resumable`` options may be given again."""
    run = resume_folder(Path(run_dir))
    path = run / "config.yaml"
    if not path.is_file():
        raise BrainsegError(
            f"cannot resume: {path} does not exist",
            hint="pass a run folder written by brainseg train, e.g. runs/train/exp",
        )
    given = {k: v for k, v in (overrides or {}).items() if v is not None and k != "resume"}
    refused = sorted(k for k in given if k not in fields_with("resumable"))
    if refused:
        raise BrainsegError(
            f"cannot change {', '.join('--' + k.replace('_', '-') for k in refused)} when "
            f"resuming {run}",
            hint="only --epochs, --device, --workers, --logger and --quiet may be given "
            "with --resume; start a new run to change the recipe",
        )
    cfg = TrainConfig.from_dict(read_yaml(path), f"config file {path}").merged(given)
    cfg.resume = str(run)
    return cfg
