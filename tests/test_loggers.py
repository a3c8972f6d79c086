"""`brainseg train/cv --logger tensorboard|mlflow` (issue 15): what was logged, read back with
TensorBoard's event reader and MLflow's client, equals metrics.csv; a missing package is one
usage error that names the pip command."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

TINY = [
    "--image-size", "32", "--encoder-weights", "none", "--decoder-channels", "16,16,8,8,8",
    "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "2", "--device", "cpu",
]  # fmt: skip
CSV_METRICS = ("train_loss", "val_loss", "val_dice_slice", "val_dice_patient", "lr")


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def logged_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run with both loggers; MLflow's default store (./mlruns) in the run's cwd."""
    from brainseg.data.split import make_split, save_split

    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    cwd = tmp_path_factory.mktemp("logged")
    ids = sorted(p.name for p in phantom_root.iterdir() if p.is_dir())
    save_split(make_split({p: 1.0 for p in ids}, val_fraction=0.34, seed=0), cwd / "s.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run(
        [sys.executable, "-m", "brainseg", "train", str(phantom_root), "--split", "s.yaml",
         *TINY, "--logger", "tensorboard", "--logger", "mlflow", "--project", "runs"],
        cwd=cwd, env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return cwd


def test_tensorboard_scalars_equal_metrics_csv(logged_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = logged_run / "runs/exp"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    rows = metrics_rows(run)
    for col in CSV_METRICS:
        events = acc.Scalars(f"epoch/{col}")
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx(
            [float(r[col]) for r in rows], rel=1e-5, abs=1e-7
        )
    steps = acc.Scalars("train/loss")
    assert [e.step for e in steps] == [1, 2, 3, 4]  # 2 epochs x 2 steps
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([4e-4] * 4)
    assert "preview" in acc.Tags()["images"]
    text = acc.Tensors("checkpoint/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert str((run / "best.safetensors").resolve()) in text


def test_tensorboard_has_the_config_as_hyperparameters(logged_run: Path) -> None:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = logged_run / "runs/exp/tensorboard"
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run))
    mux.Reload()
    found = {}
    for name in mux.Runs():
        for content in mux.PluginRunToTagToContent("hparams").get(name, {}).values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                found.update(
                    {k: v.string_value for k, v in data.session_start_info.hparams.items()}
                )
    assert found["image_size"] == "32" and found["decoder_channels"] == "[16, 16, 8, 8, 8]"


def test_mlflow_metrics_and_params_equal_the_run(logged_run: Path) -> None:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(logged_run / "mlruns").as_uri())
    exp = client.get_experiment_by_name("brainseg")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    rows = metrics_rows(logged_run / "runs/exp")
    for col in CSV_METRICS:
        hist = sorted(
            client.get_metric_history(run.info.run_id, f"epoch/{col}"), key=lambda m: m.step
        )
        assert [m.step for m in hist] == [1, 2]
        assert [m.value for m in hist] == pytest.approx([float(r[col]) for r in rows], rel=1e-12)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    params = run.data.params
    assert params["image_size"] == "32" and params["batch_size"] == "4"
    assert params["loggers"] == "['tensorboard', 'mlflow']"
    ckpt = run.data.tags["brainseg.checkpoint"]
    assert ckpt == str((logged_run / "runs/exp/best.safetensors").resolve())
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "preview/epoch_1")]
    assert arts == ["preview/epoch_1/preview.png"]


def test_mlflow_tracking_uri_comes_from_the_environment(phantom_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    store = tmp_path / "elsewhere"
    r = run_cli(
        ["train", phantom_root, "--fold", "all", *TINY, "--epochs", "1", "--logger", "mlflow",
         "--project", tmp_path / "runs"],
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
             "MLFLOW_EXPERIMENT_NAME": "final"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "mlruns").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("final").experiment_id])
    assert run.data.params["fold"] == "all"
    # --fold all: the empty validation cells are not logged, train_loss is
    assert "epoch/val_loss" not in run.data.metrics
    loss = float(metrics_rows(tmp_path / "runs/exp")[0]["train_loss"])
    assert run.data.metrics["epoch/train_loss"] == pytest.approx(loss, rel=1e-12)


BLOCK = "import sys, runpy; sys.modules[{mod!r}] = None; sys.argv = {argv!r}; "
BLOCK += "runpy.run_module('brainseg', run_name='__main__')"


@pytest.mark.parametrize(
    ("logger", "module"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")]
)
@pytest.mark.parametrize("command", ["train", "cv"])
def test_a_missing_logger_package_is_one_usage_error(
    phantom_root: Path, tmp_path: Path, logger: str, module: str, command: str
) -> None:
    argv = ["brainseg", command, str(phantom_root), "--logger", logger, "--epochs", "1",
            "--project", str(tmp_path)]  # fmt: skip
    if command == "train":
        argv += ["--fold", "all"]
    else:
        argv += ["--folds", "2"]
    code = BLOCK.format(mod=module, argv=argv)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:")
    assert f"(the brainseg[{logger}] extra)" in lines[0] and "pip install " in lines[0]
    assert not list(tmp_path.rglob("*.safetensors"))


def test_an_unknown_logger_is_refused(phantom_root: Path, tmp_path: Path) -> None:
    r = run_cli(["train", phantom_root, "--fold", "all", "--logger", "wandb", *TINY])
    assert r.returncode == 2
    assert "unknown --logger 'wandb'" in r.stderr


def test_loggers_in_a_config_file(phantom_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    (tmp_path / "c.yaml").write_text("loggers: [tensorboard]\n")
    r = run_cli(
        ["train", phantom_root, "--fold", "all", "-c", tmp_path / "c.yaml", *TINY, "--epochs",
         "1", "--project", tmp_path / "runs"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "runs/exp/tensorboard").glob("events.out.tfevents.*"))
    cfg = yaml.safe_load((tmp_path / "runs/exp/config.yaml").read_text())
    assert cfg["loggers"] == ["tensorboard"]


def test_cv_logs_every_fold_to_tensorboard(phantom_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = run_cli(
        ["cv", phantom_root, "--folds", "2", "--logger", "tensorboard", "--image-size", "32",
         "--encoder-weights", "none", "--set", "decoder_channels=16,16,8,8,8", "--batch-size",
         "4", "--steps-per-epoch", "1", "--epochs", "1", "--device", "cpu", "--project",
         tmp_path, "-q"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for k in (0, 1):
        fold = tmp_path / "exp" / f"fold_{k}"
        acc = EventAccumulator(str(fold / "tensorboard"))
        acc.Reload()
        (row,) = metrics_rows(fold)
        (event,) = acc.Scalars("epoch/val_dice_patient")
        assert event.value == pytest.approx(float(row["val_dice_patient"]), rel=1e-5, abs=1e-7)
