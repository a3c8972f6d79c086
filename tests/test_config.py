"""TrainConfig: YAML presets, CLI overrides, and validation before any work (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_cli

from brainseg.config import (
    TrainConfig,
    load_config,
    load_resume_config,
    preset_path,
    read_yaml,
)
from brainseg.errors import BrainsegError


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset folder and a split file that exist (contents are not read by validation)."""
    data = tmp_path / "kaggle_3m"
    data.mkdir()
    split = tmp_path / "splits.yaml"
    split.write_text("format: 1\n")
    return data, split


def test_defaults_are_the_reference_recipe() -> None:
    cfg = TrainConfig()
    assert (cfg.loss, cfg.lr, cfg.batch_size, cfg.epochs, cfg.image_size) == (
        "bce",
        4e-4,
        16,
        20,
        256,
    )
    assert cfg.encoder_weights == "imagenet"
    assert cfg.scheduler == "none"
    seed = load_config("seed")
    assert seed.to_dict() == TrainConfig().to_dict()


def test_packaged_presets_match_repo_configs() -> None:
    for name in ("seed", "best"):
        assert preset_path(name).read_text() == (REPO / "configs" / f"{name}.yaml").read_text()
        load_config(name).validate(need_data=False)


#: Each lever recipe of docs/results.md: how it differs from configs/recipes/plain.yaml
#: (channels_last is a speed setting, the same maths).
RECIPE_LEVERS: dict[str, dict[str, object]] = {
    "plain": {},
    "cosine": {"scheduler": "cosine", "channels_last": True},
    "cosine-prior": {"scheduler": "cosine", "head_bias_prior": 0.01, "channels_last": True},
}


def test_recipe_files_of_results_md_are_valid_configs() -> None:
    """configs/recipes/*.yaml are the rows of docs/results.md: each loads, is cited there, and
    differs from the plain recipe by exactly the levers its row names."""
    recipes = {p.stem: p for p in (REPO / "configs" / "recipes").glob("*.yaml")}
    assert sorted(recipes) == sorted(RECIPE_LEVERS)
    results = (REPO / "docs" / "results.md").read_text()
    plain = load_config(str(recipes["plain"])).to_dict()
    assert (plain["loss"], plain["scheduler"], plain["augment"], plain["aug_rotate"]) == (
        "bce+dice",
        "none",
        True,
        0,
    )
    for stem, levers in RECIPE_LEVERS.items():
        cfg = load_config(str(recipes[stem]))
        cfg.validate(need_data=False)
        diff = {k: v for k, v in cfg.to_dict().items() if plain[k] != v}
        assert diff == levers, stem
        assert f"configs/recipes/{stem}.yaml" in results, stem
    # the winner of the table is what --config best trains
    assert load_config("best").to_dict() == load_config(str(recipes["cosine"])).to_dict()
    assert "`configs/recipes/cosine.yaml` = **configs/best.yaml**" in results


def test_cli_overrides_only_given_values(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nepochs: 3\naugment: true\ndecoder_channels: [32, 32, 16, 16, 8]\n")
    cfg = load_config(str(f), {"epochs": 5, "lr": None, "augment": None, "batch_size": None})
    assert cfg.lr == 0.001  # from the file (the CLI did not give --lr)
    assert cfg.epochs == 5  # the CLI wins
    assert cfg.augment is True
    assert cfg.batch_size == 16  # default
    assert cfg.decoder_channels == [32, 32, 16, 16, 8]
    # the CLI's comma form and ints for floats are accepted
    cfg = load_config(None, {"decoder_channels": "64,64,32,32,16", "lr": 1})
    assert cfg.decoder_channels == [64, 64, 32, 32, 16] and cfg.lr == 1.0


def test_unknown_keys_are_named_with_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nlearning_rate: 3\nepoch: 2\n")
    with pytest.raises(BrainsegError) as e:
        load_config(str(f))
    assert "epoch, learning_rate" in e.value.message and str(f) in e.value.message


def test_bad_yaml_and_non_mapping_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lr: [1,\n")
    with pytest.raises(BrainsegError, match="not valid YAML"):
        read_yaml(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(BrainsegError, match="must hold a mapping"):
        read_yaml(f)
    with pytest.raises(BrainsegError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"loss": "focal"}, "unknown loss 'focal'"),
        ({"scheduler": "step"}, "unknown scheduler 'step'"),
        ({"amp": "fp8"}, "unknown amp 'fp8'"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"encoder": "resnet34"}, "unknown encoder 'resnet34'"),
        ({"upsample": "pixelshuffle"}, "unknown upsample"),
        ({"normalization": "minmax"}, "unknown normalization"),
        ({"image_size": 100}, "multiple of 32"),
        ({"image_size": 0}, "multiple of 32"),
        ({"fold": -1}, "fold must be >= 0"),
        ({"tumor_oversample": 1.5}, "tumor_oversample must be a probability"),
        ({"grad_clip": 0.0}, "grad_clip must be a positive number"),
        ({"head_bias_prior": 1.0}, "head_bias_prior must be a probability"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be at least 1"),
        ({"decoder_channels": [32, 16]}, "decoder_channels must be 5 integers from 1 to 4096"),
        ({"decoder_channels": [10**12, 8, 8, 8, 8]}, "decoder_channels must be 5 integers"),
        ({"image_size": 16384}, "from 32 to 1024, got 16384"),
        ({"image_size": 2**40}, "from 32 to 1024"),
        ({"seed": 2**64}, "seed must be an integer from 0 to 4294967295"),
        ({"seed": -1}, "seed must be an integer from 0"),
        ({"freeze_encoder_epochs": -2}, "freeze_encoder_epochs must be >= 0"),
        ({"encoder_weights": "/no/such/file.pth"}, "encoder weights file"),
        ({"epochs": "ten"}, "epochs must be an integer"),
        ({"aug_rotate": 400.0}, "aug_rotate must be in"),
        ({"warmup_epochs": -1.0}, "warmup_epochs must be >= 0"),
        ({"warmup_epochs": 20.0, "epochs": 20}, "warmup_epochs must be less than epochs (20)"),
        ({"ema_decay": 1.0}, "ema_decay must be in (0, 1)"),
    ],
)
def test_validation_refuses_bad_values(
    files: tuple[Path, Path], override: dict, message: str
) -> None:
    data, split = files
    cfg = TrainConfig(data=str(data), split=str(split))
    for k, v in override.items():
        setattr(cfg, k, v)
    with pytest.raises(BrainsegError) as e:
        cfg.validate()
    assert message in e.value.message
    assert e.value.exit_code == 2 and e.value.hint


def test_missing_inputs_are_refused(tmp_path: Path, files: tuple[Path, Path]) -> None:
    data, split = files
    with pytest.raises(BrainsegError, match="no split file"):
        TrainConfig(data=str(data)).validate()
    with pytest.raises(BrainsegError, match="does not exist"):
        TrainConfig(data=str(tmp_path / "nope"), split=str(split)).validate()
    with pytest.raises(BrainsegError, match=r"split file .* does not exist"):
        TrainConfig(data=str(data), split=str(tmp_path / "nope.yaml")).validate()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "lr must be a positive number"),
        (["--lr", "0"], "lr must be a positive number"),
        (["--batch-size", "0"], "batch_size must be at least 1"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--loss", "focal"], "unknown loss 'focal'"),
        (["--scheduler", "warm"], "unknown scheduler 'warm'"),
        (["--amp", "int8"], "unknown amp 'int8'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--image-size", "100"], "multiple of 32"),
        (["--decoder-channels", "a,b"], "decoder_channels must be 5 comma-separated"),
        # issue 22: these died as "internal error" (MemoryError, OverflowError, allocator)
        (["--image-size", "16384"], "image_size must be a multiple of 32"),
        (["--image-size", str(2**40)], "from 32 to 1024"),
        (["--seed", str(2**64)], "seed must be an integer from 0 to 4294967295"),
        (["--decoder-channels", "1000000000000,8,8,8,8"], "decoder_channels must be 5 integers"),
    ],
)
def test_cli_bad_values_exit_2_before_work(
    files: tuple[Path, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    data, split = files
    r = run_cli(["train", data, "--split", split, "--project", tmp_path / "runs", *args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "hint" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_cli_project_that_is_a_file_exits_2(files: tuple[Path, Path], tmp_path: Path) -> None:
    """issue 22: `train --project file.txt` died as "internal error: NotADirectoryError"."""
    data, split = files
    f = tmp_path / "file.txt"
    f.write_text("mine\n")
    for project in (f, f / "sub"):
        r = run_cli(["train", data, "--split", split, "--project", project])
        assert r.returncode == 2, r.stderr
        assert f"{f} is a file, not a folder" in r.stderr and "internal error" not in r.stderr
    assert f.read_text() == "mine\n"


def _bomb(levels: int = 9) -> str:
    """A YAML "billion laughs": 9 ** levels list items from a few hundred bytes."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_bomb(), r"holds more than 200000 values \(aliases expanded\)"),
        ("lr: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
        ("lr: " + "[" * 100 + "]" * 100 + "\n", "nested more than 64 levels deep"),
        ("lr: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nest"),
        ("lr: &a [1, *a]\n", "recursive structure"),
    ],
    ids=["alias-bomb", "list-5000-deep", "list-100-deep", "map-3000-deep", "recursive"],
)
def test_config_yaml_limits_are_one_line_errors(
    files: tuple[Path, Path], tmp_path: Path, text: str, message: str
) -> None:
    """issue 22: an alias bomb in --config hung at 2.5 GB and more (dataclasses.asdict walked
    the expanded graph); YAML nested 3,000-5,000 deep raised RecursionError ("internal
    error"). Every YAML file brainseg reads goes through one loader with the same limits."""
    f = tmp_path / "cfg.yaml"
    f.write_text(text)
    with pytest.raises(BrainsegError, match=message) as e:
        read_yaml(f)
    assert str(f) in e.value.message
    data, split = files
    r = run_cli(["train", data, "--split", split, "--config", f], timeout=60)
    assert r.returncode == 2, r.stderr
    assert str(f) in r.stderr and "internal error" not in r.stderr


def test_small_aliases_still_load(tmp_path: Path) -> None:
    f = tmp_path / "cfg.yaml"
    f.write_text("decoder_channels: &d [64, 32, 16, 16, 8]\nlr: 0.001\n")
    assert read_yaml(f) == {"decoder_channels": [64, 32, 16, 16, 8], "lr": 0.001}


def test_cli_config_file_with_unknown_key_exits_2(files: tuple[Path, Path], tmp_path: Path) -> None:
    data, split = files
    f = tmp_path / "cfg.yaml"
    f.write_text("lr: 0.001\nbatchsize: 4\n")
    r = run_cli(["train", data, "--split", split, "--config", f])
    assert r.returncode == 2
    assert "batchsize" in r.stderr and str(f) in r.stderr


def test_resume_config_refuses_recipe_changes(tmp_path: Path) -> None:
    run = tmp_path / "exp"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 2\nlr: 0.001\nrun_info: {torch: x}\n")
    cfg = load_resume_config(run, {"epochs": 6, "lr": None})
    assert (cfg.epochs, cfg.lr, cfg.resume) == (6, 0.001, str(run))
    with pytest.raises(BrainsegError, match="cannot change --lr"):
        load_resume_config(run, {"lr": 0.1})
    with pytest.raises(BrainsegError, match=r"config\.yaml does not exist"):
        load_resume_config(tmp_path, {})


def test_to_dict_round_trips() -> None:
    cfg = TrainConfig(lr=0.01, decoder_channels=[8, 8, 8, 8, 8], fold=2)
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_every_setting_is_declared_once_with_help_type_and_default() -> None:
    """The field carries help and type; coercion and the CLI options derive from it."""
    from dataclasses import fields

    from brainseg.config import field_types, fields_with, setting_help

    OPTIONS = fields_with("flag")  # was commands.train.OPTIONS (issue 23)

    types = field_types()
    for f in fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert f.name in types
    assert set(OPTIONS) <= {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig.from_dict({"aug_rotate": 10, "grad_clip": 1, "lr": 1, "project": Path("x")})
    assert isinstance(cfg.aug_rotate, float) and isinstance(cfg.grad_clip, float)
    assert isinstance(cfg.lr, float) and cfg.project == "x"
    assert setting_help("epochs").endswith(f"(default: {TrainConfig().epochs}).")
    with pytest.raises(BrainsegError, match="aug_rotate must be a number"):
        TrainConfig.from_dict({"aug_rotate": "x"}).validate(need_data=False)


def test_augment_settings_take_the_config_values_by_name() -> None:
    from brainseg.data.augment import AugmentSettings

    cfg = TrainConfig(aug_rotate=7.0, aug_mask_mode="bilinear", aug_hflip=0.25)
    s = AugmentSettings.from_config(cfg)
    assert (s.rotate, s.mask_mode, s.hflip) == (7.0, "bilinear", 0.25)
    assert AugmentSettings() == AugmentSettings.from_config(TrainConfig())


def test_setting_roles_are_field_metadata() -> None:
    """Which settings are train options, recipe, resumable, per fold or runtime is read from
    the TrainConfig fields (issue 23), and the sets are the lists that were kept by hand
    (the recipe also names the augmentation and plateau settings: see test_card.py)."""
    from brainseg.config import fields_with

    cli_false = {"data", "head_bias_prior", "warmup_epochs", "ema_decay", "plateau_patience",
                 "plateau_factor", "aug_hflip", "aug_vflip", "aug_rotate", "aug_scale",
                 "aug_brightness", "aug_contrast", "aug_mask_mode", "val_batch_size", "loggers",
                 "preview_slices"}  # fmt: skip
    assert set(fields_with("flag")) == set(TrainConfig.keys()) - cli_false
    assert set(fields_with("resumable")) == {
        "epochs", "quiet", "device", "workers", "loggers", "resume"
    }  # fmt: skip
    assert set(fields_with("per_fold")) == {
        "data", "split", "fold", "project", "name", "exist_ok", "resume"
    }  # fmt: skip
    assert set(fields_with("runtime")) == {"device", "workers", "quiet"}
    assert set(fields_with("recipe")) == {
        "encoder", "encoder_weights", "decoder_channels", "upsample", "normalization", "loss",
        "lr", "weight_decay", "scheduler", "epochs", "batch_size", "steps_per_epoch", "augment",
        "tumor_oversample", "freeze_encoder_epochs", "grad_clip", "amp", "seed", "image_size",
        "head_bias_prior", "warmup_epochs", "ema_decay",
        "aug_hflip", "aug_vflip", "aug_rotate", "aug_scale", "aug_brightness", "aug_contrast",
        "aug_mask_mode", "plateau_patience", "plateau_factor",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown role"):
        fields_with("flags")
