"""Experiment loggers for ``brainseg train/cv --logger tensorboard|mlflow`` (csv is always on).

Every logger logs the same things (docs/training.md); both are optional extras, imported only
when a logger is opened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The MLflow experiment runs go to unless MLFLOW_EXPERIMENT_NAME says otherwise.
MLFLOW_EXPERIMENT = "brainseg"


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as flat ``key -> text`` hyper-parameters (nested keys joined with ``.``)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = "null" if v is None else str(v)
    return out


class TensorBoardLogger:
    """Event files in ``RUN/tensorboard/`` (read them with ``tensorboard --logdir RUN``)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))
        params = flat_params(config)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        self.writer.add_hparams(params, {}, run_name=".")

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"epoch/{k}", v, epoch)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        import matplotlib.image

        rgb = matplotlib.image.imread(path)[..., :3]
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def final(self, checkpoint: Path) -> None:
        self.writer.add_text("checkpoint", str(checkpoint.resolve()))

    def close(self) -> None:
        self.writer.close()


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the local file store ``./mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # MLflow 3 keeps the file store behind this switch; it is the documented local default
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path("mlruns").resolve().as_uri()


class MLflowLogger:
    """One MLflow run per training run (run name: the run folder's name)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        run = self.client.create_run(
            exp_id, run_name=run_dir.name, tags={"brainseg.run_dir": str(run_dir.resolve())}
        )
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def step(self, step: int, loss: float, lr: float) -> None:
        self.client.log_metric(self.run_id, "train/loss", loss, step=step)
        self.client.log_metric(self.run_id, "train/lr", lr, step=step)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, f"epoch/{k}", v, step=epoch)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"{tag}/epoch_{step}")

    def final(self, checkpoint: Path) -> None:
        self.client.set_tag(self.run_id, "brainseg.checkpoint", str(checkpoint.resolve()))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Loggers:
    """The loggers of one run, called together; an empty one does nothing (other ranks)."""

    def __init__(self, loggers: Sequence[Any] = ()) -> None:
        self.loggers = list(loggers)

    @classmethod
    def open(cls, names: Sequence[str], run_dir: Path, config: Mapping[str, Any]) -> Loggers:
        kinds = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
        return cls([kinds[n](run_dir, config) for n in dict.fromkeys(names)])

    def step(self, step: int, loss: float, lr: float) -> None:
        for lg in self.loggers:
            lg.step(step, loss, lr)

    def epoch(self, row: Mapping[str, Any]) -> None:
        metrics = {k: float(v) for k, v in row.items() if k != "epoch" and v is not None}
        for lg in self.loggers:
            lg.epoch(int(row["epoch"]), metrics)

    def image(self, tag: str, path: Path, step: int) -> None:
        if path.is_file():
            for lg in self.loggers:
                lg.image(tag, path, step)

    def final(self, checkpoint: Path) -> None:
        for lg in self.loggers:
            lg.final(checkpoint)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
