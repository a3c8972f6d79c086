"""Model cards: built from real checkpoint metadata, read back from .safetensors and .onnx.

`brainseg info MODEL` prints the card (a table, or --json) for both file types; reading an
ONNX file (or a checkpoint) never imports torch (checked in a fresh interpreter).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _tiny import tiny_onnx
from conftest import run_cli

from brainseg.model import card as mc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-epoch run of the real train on 4 phantom patients (best/last.safetensors)."""
    from brainseg.config import TrainConfig
    from brainseg.data.split import load_split, make_split, save_split
    from brainseg.data.synthetic import write_synthetic
    from brainseg.train import train

    d = tmp_path_factory.mktemp("cardrun")
    root = write_synthetic(d / "data", patients=4, seed=3, size=64, slices=(8, 10))
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    save_split(make_split({p: 1.0 for p in ids}, val_fraction=0.25, seed=0), d / "split.yaml")
    cfg = TrainConfig(data=str(root), split=str(d / "split.yaml"), image_size=32,
                      encoder_weights="none", decoder_channels=[8, 8, 8, 8, 8], batch_size=4,
                      steps_per_epoch=1, epochs=2, project=str(d / "runs"), quiet=True,
                      preview_slices=0, device="cpu", lr=3e-4)  # fmt: skip
    run = Path(train(cfg))
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {"run": run, "rows": rows, "split": load_split(d / "split.yaml"), "dir": d, "root": root}


def onnx_with_metadata(path: Path, meta: dict[str, Any]) -> Path:
    """A tiny ONNX graph carrying ``meta`` exactly as `brainseg export` writes it."""
    import onnx

    from brainseg.export.graph import set_metadata

    model = onnx.load(str(tiny_onnx(path)))
    set_metadata(model, meta, "fp32", 17, "best.safetensors")
    onnx.save(model, str(path))
    return path


def info_json(path: Path) -> dict[str, Any]:
    r = run_cli(["info", path, "--json"])
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_card_of_a_real_checkpoint(trained: dict[str, Any]) -> None:
    run, rows = trained["run"], trained["rows"]
    card = info_json(run / "best.safetensors")
    best = max(rows, key=lambda r: float(r["val_dice_patient"]))
    # metrics of the checkpoint, with their protocol
    assert card["eval_metrics"]["val_dice_patient"] == pytest.approx(
        float(best["val_dice_patient"])
    )
    assert card["eval_metrics"]["val_loss"] == pytest.approx(float(best["val_loss"]))
    proto = card["eval_protocol"]
    assert proto["checkpoint"].startswith(f"best: the epoch ({best['epoch']})")
    assert proto["protocol"] == "single patient-level split"
    assert "validation patients" in proto["patients"]
    assert proto["measured_at"] == "the training image size 32" and proto["threshold"] == 0.5
    # intended use and its limits, the three contrasts in order
    assert "Research use only" in card["intended_use"]
    assert "Not a medical device" in card["intended_use"]
    assert "lower-grade glioma" in card["intended_use"]
    assert card["network_data_format"]["inputs"]["image"]["channel_def"] == {
        "0": "pre-contrast", "1": "FLAIR", "2": "post-contrast"
    }  # fmt: skip
    assert "pre-contrast, FLAIR, post-contrast" in card["image_classes"]
    # recipe, data, preprocessing, licence, version
    assert card["training"]["recipe"]["lr"] == pytest.approx(3e-4)
    assert card["training"]["recipe"]["epochs"] == 2
    # the levers of configs/best.yaml and docs/results.md are part of the recipe shown
    assert {"head_bias_prior", "warmup_epochs", "ema_decay"} <= set(card["training"]["recipe"])
    assert card["training"]["data_folder"] == "kaggle_3m"
    assert card["training"]["split"]["dataset_hash"] == trained["split"].dataset_hash
    assert card["preprocessing"]["threshold"] == 0.5 and card["preprocessing"]["postprocess"]
    assert card["license"]["software"].startswith("AGPL-3.0")
    from brainseg import __version__

    assert card["brainseg_version"] == __version__
    assert "MONAI bundle metadata.json" in card["convention"]
    # last.safetensors: the final epoch
    last = info_json(run / "last.safetensors")
    assert last["eval_protocol"]["checkpoint"] == "last: the final checkpoint (epoch 2)"
    assert last["eval_metrics"]["val_dice_patient"] == pytest.approx(
        float(rows[-1]["val_dice_patient"])
    )


def test_stored_card_survives_onnx_and_wins(trained: dict[str, Any], tmp_path: Path) -> None:
    from brainseg.model.checkpoint import copy_with_metadata, read_metadata

    run, split = trained["run"], trained["split"]
    meta = read_metadata(run / "best.safetensors")
    carded = mc.with_card(meta, selection="best", split=mc.split_summary(split))
    ckpt = copy_with_metadata(run / "best.safetensors", tmp_path / "carded.safetensors",
                              {mc.CARD_KEY: carded[mc.CARD_KEY]})  # fmt: skip
    val_ids = sorted(split.patients("val"))
    from_ckpt = info_json(ckpt)
    assert from_ckpt["eval_protocol"]["val_patient_ids"] == val_ids
    assert from_ckpt["training"]["split"]["val_patients"] == len(val_ids)
    # the same card from an ONNX file written the way export writes it
    onnx_path = onnx_with_metadata(tmp_path / "model.onnx", read_metadata(ckpt))
    from_onnx = info_json(onnx_path)
    assert from_onnx["eval_protocol"] == from_ckpt["eval_protocol"]
    assert from_onnx["eval_metrics"] == from_ckpt["eval_metrics"]
    assert from_onnx["onnx"] == {"variant": "fp32", "opset": 17, "source": "best.safetensors"}
    # a tuned threshold in the metadata wins over the one the card was written with
    tuned = copy_with_metadata(ckpt, tmp_path / "tuned.safetensors", {"threshold": 0.35})
    assert info_json(tuned)["preprocessing"]["threshold"] == 0.35


def test_info_table_and_markdown(trained: dict[str, Any], tmp_path: Path) -> None:
    path = trained["run"] / "best.safetensors"
    r = run_cli(["info", path])
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    for text in ("intended use", "Research use only", "recipe", "val_dice_patient",
                 "pre-contrast", "AGPL-3.0", "checkpoint"):  # fmt: skip
        assert text in out, text
    md = mc.card_markdown(mc.read_card(path))
    assert md.startswith("# brainseg UNet-VGG16")
    assert "## Protocol" in md and "## Limits" in md and "## License" in md
    assert "**val_dice_patient**:" in md and "> Research use only" in md
    written = mc.write_card_markdown(mc.read_card(path), tmp_path / "card.md")
    assert written.read_text(encoding="utf-8") == md


@pytest.mark.parametrize("kind", ["onnx", "safetensors"])
def test_info_does_not_import_torch(kind: str, trained: dict[str, Any], tmp_path: Path) -> None:
    if kind == "onnx":
        from brainseg.model.checkpoint import read_metadata

        path = onnx_with_metadata(
            tmp_path / "m.onnx", read_metadata(trained["run"] / "best.safetensors")
        )
    else:
        path = trained["run"] / "best.safetensors"
    code = (
        "import sys\n"
        "from brainseg.cli.app import main\n"
        f"main(['info', {str(path)!r}, '--json'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["task"].startswith("Lower-grade glioma")


def test_info_errors_are_one_line(tmp_path: Path) -> None:
    r = run_cli(["info", tmp_path / "missing.onnx"])
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "w.pt").write_bytes(b"x")
    r = run_cli(["info", tmp_path / "w.pt"])
    assert r.returncode == 2 and "not a model file" in r.stderr
    (tmp_path / "broken.onnx").write_bytes(b"\x00garbage")
    r = run_cli(["info", tmp_path / "broken.onnx"])
    assert r.returncode == 2 and "broken.onnx" in r.stderr and "Traceback" not in r.stderr
    foreign = tiny_onnx(tmp_path / "foreign.onnx")  # brainseg blob without a card: rebuilt
    card = info_json(foreign)
    assert card["preprocessing"]["threshold"] == 0.5 and card["eval_metrics"] == {}


def test_export_card_writes_the_onnx_files_card_as_markdown(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """`export --card card.md`: the Markdown of the exported file's own card, never clobbered."""
    ckpt = trained["run"] / "best.safetensors"
    out, card_md = tmp_path / "m.onnx", tmp_path / "card.md"
    r = run_cli(["-q", "export", ckpt, "-o", out, "--card", card_md])
    assert r.returncode == 0, r.stderr
    assert card_md.read_text(encoding="utf-8") == mc.card_markdown(mc.read_card(out))
    assert "> Research use only" in card_md.read_text(encoding="utf-8")
    card_md.write_text("mine")
    r = run_cli(["-q", "export", ckpt, "-o", tmp_path / "n.onnx", "--card", card_md])
    assert r.returncode == 2 and "already exists" in r.stderr, r.stderr
    assert card_md.read_text() == "mine" and not (tmp_path / "n.onnx").exists()


# ------------------------------------------------------------------ issue 21: honest cards
def test_card_counts_the_patients_it_used(trained: dict[str, Any]) -> None:
    """The card names the patients this model used (3 train + 1 val), not the dataset's 110."""
    split = trained["split"]
    card = info_json(trained["run"] / "best.safetensors")
    assert "110" not in card["data_source"]
    assert (
        "used for this model: 3 training patients + 1 validation patients" in (card["data_source"])
    )
    assert card["training"]["split"]["train_patient_ids"] == sorted(split.patients("train"))
    assert mc.training_patients(mc.read_model_metadata(trained["run"] / "best.safetensors")) == (
        sorted(split.patients("train"))
    )


def test_training_patients_of_an_older_checkpoint_come_from_its_split_file(
    trained: dict[str, Any],
) -> None:
    """A file written before cards listed the patients: its config's split file (same hash)."""
    import yaml

    path = trained["dir"] / "split.yaml"
    doc = yaml.safe_load(path.read_text())  # the oracle: the YAML itself
    meta = {"config": {"split": str(path), "fold": None}, "split_hash": doc["dataset_hash"]}
    assert sorted(mc.training_patients(meta) or []) == sorted(doc["subsets"]["train"])
    assert mc.training_patients({**meta, "split_hash": "another"}) is None
    assert mc.training_patients({"config": {"split": str(path) + ".gone"}}) is None


def test_card_markdown_lists_render_as_lists(trained: dict[str, Any]) -> None:
    """Numbered limits and references are an ordered list (not "- 1."), checked with
    markdown-it-py's CommonMark renderer."""
    from markdown_it import MarkdownIt

    card = mc.read_card(trained["run"] / "best.safetensors")
    md = mc.card_markdown(card)
    assert not any(line.startswith("- 1.") for line in md.splitlines())
    html = MarkdownIt("commonmark").render(md)
    first = card["limitations"][0]
    assert "<ol>" in html and f"<li>{first}</li>" in html
    assert "<li><strong>val_dice_patient</strong>:" in html


def test_tuned_copy_card_says_its_settings_and_where_they_were_chosen(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """`eval --tune-output`: the copy's protocol shows its own threshold / post-processing
    and that they were chosen on the very validation patients its figures come from."""
    from brainseg.model.checkpoint import read_metadata

    run, d = trained["run"], trained["dir"]
    tuned = tmp_path / "tuned.safetensors"
    r = run_cli(["-q", "eval", run / "best.safetensors", trained["root"],
                 "--split", d / "split.yaml", "--tune-output", tuned, "--json",
                 "--project", tmp_path / "ev", "--device", "cpu"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    meta = read_metadata(tuned)
    proto = info_json(tuned)["eval_protocol"]
    assert proto["threshold"] == meta["threshold"] == summary["tune"]["best"]["threshold"]
    assert proto["post_processing"] == mc.post_text(meta["postprocess"])
    val = sorted(trained["split"].patients("val"))
    assert meta["tuned"]["patient_ids"] == val
    assert f"--tune-output on {len(val)} patients (val)" in proto["settings_chosen"]
    assert "the same patients as this card's validation patients" in proto["settings_chosen"]
    assert f"{summary['tune']['best']['dice']:.4f}" in proto["settings_chosen"]
    assert "threshold 0.5, no post-processing" in proto["figures_measured_with"]
    # a model nobody tuned says so
    assert info_json(run / "best.safetensors")["eval_protocol"]["settings_chosen"] == (
        "the default (not tuned)"
    )


def test_card_recipe_is_the_recipe_of_the_preset() -> None:
    """A model trained with --config best shows best.yaml's augmentation on its card, and a
    plateau run its patience and factor: the card's recipe alone tells the recipes of
    configs/recipes apart (issue 23: the hand-kept list left them out)."""
    from brainseg.config import TrainConfig, load_config, preset_path, read_yaml

    best = load_config("best").to_dict()
    recipe = mc.build_card({"config": best})["training"]["recipe"]
    speed = {"channels_last"}  # best.yaml: "channels_last is a speed setting (same maths)"
    for key, value in read_yaml(preset_path("best")).items():
        if key not in speed:
            assert recipe.get(key) == value, key
    plateau = TrainConfig(scheduler="plateau", plateau_patience=5, plateau_factor=0.2)
    recipe = mc.build_card({"config": plateau.to_dict()})["training"]["recipe"]
    assert (recipe["plateau_patience"], recipe["plateau_factor"]) == (5, 0.2)


def _strict_json(text: str) -> Any:
    """RFC 8259 JSON: NaN and Infinity are not JSON (browsers' and most parsers' JSON.parse
    refuse them), so a model file that holds them cannot be read outside Python."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_model_metadata_with_nan_or_numpy_values_is_written_as_plain_json() -> None:
    """issue 23 (JSON-safe conversion in one place): a card measurement or a metric that is
    NaN (a Dice over no tumour) or a numpy number became the literal NaN or the string "0.5"
    in the ONNX file's metadata and the card; both now go through fsutil.json_safe."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from brainseg.export.graph import set_metadata

    evaluation = {"protocol": "cv", "metrics": {"dice": float("nan"), "iou": np.float32(0.5)}}
    card = mc.build_card({"image_size": 64}, evaluation=evaluation)
    assert card["evaluation"]["metrics"] == {"dice": None, "iou": 0.5}

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])],
    )
    model = helper.make_model(graph)
    meta = {"image_size": 64, "metrics": {"val_dice": float("inf"), "best": np.float64(0.7)}}
    set_metadata(model, meta, "fp32", 17, "m.safetensors")
    props = {p.key: p.value for p in model.metadata_props}
    assert _strict_json(props["metrics"]) == {"val_dice": None, "best": 0.7}
    blob = _strict_json(props["brainseg"])
    assert blob["metrics"] == {"val_dice": None, "best": 0.7}
    onnx.checker.check_model(model)
