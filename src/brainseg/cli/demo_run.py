"""The whole brainseg pipeline on phantoms, offline, in one run folder (``brainseg demo``).

Each stage calls the same functions as its subcommand, so the demo proves the commands a
user will type next.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from brainseg import console as con
from brainseg.cli.predict import render_result
from brainseg.config import load_config
from brainseg.data.imageio import is_image_path, is_mask_name, read_tiff_array
from brainseg.data.split import SplitOptions, load_split, make_split_file
from brainseg.data.synthetic import write_synthetic
from brainseg.errors import BrainsegRuntimeError
from brainseg.evaluation import dataset as ev
from brainseg.evaluation.metrics import dice
from brainseg.export import export_onnx
from brainseg.fsutil import atomic_path, atomic_write_text
from brainseg.inference.batch import PredictOptions, predict_inputs
from brainseg.train import run_training

T = TypeVar("T")

#: Training settings that reach a per-patient validation Dice above 0.8 on 64x64 phantoms
#: in well under a minute on 2 CPU cores (measured in docs/results.md).
DEMO_TRAIN: dict[str, Any] = {
    "encoder_weights": "none",
    "decoder_channels": [64, 64, 32, 32, 16],
    "lr": 1e-3,
    "batch_size": 8,
    "steps_per_epoch": 12,
    "tumor_oversample": 0.5,
}


@dataclass
class DemoOptions:
    """What a user may change; the defaults finish in about a minute on 2 CPU cores."""

    patients: int = 10
    size: int = 64
    epochs: int = 6
    seed: int = 0
    device: str = "auto"


@dataclass
class DemoResult:
    """Where everything went and how well it worked."""

    run_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)
    agreement: float = float("nan")
    val_patients: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (``--json`` and demo.json)."""
        return {
            "run_dir": str(self.run_dir),
            "paths": {k: str(v) for k, v in self.paths.items()},
            "per_patient_dice": {k: round(v, 4) for k, v in self.dice.items()},
            "torch_onnx_agreement": round(self.agreement, 4),
            "val_patients": self.val_patients,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }


STAGES = ("data", "split", "train", "eval", "predict", "export", "predict_onnx")


#: Shows a stage's result as it comes: ``show(stage, result)`` with the split's SplitResult,
#: training's TrainResult, eval's EvalResult or export's ExportReport (the command renders).
Show = Callable[[str, Any], None]


def run_demo(
    run_dir: Path, opts: DemoOptions | None = None, show: Show | None = None
) -> DemoResult:
    """Run every stage into ``run_dir`` (new or empty); the dataset cache goes there too, so
    deleting the run folder removes every trace of the demo."""
    opts = opts or DemoOptions()
    show = show or (lambda stage, result: None)
    res = DemoResult(run_dir=run_dir)
    cache = run_dir / "cache"

    def stage(title: str, fn: Callable[[], T]) -> T:
        i = len(res.seconds)
        con.info(f"[{i + 1}/{len(STAGES)}] {title}")
        t0 = time.perf_counter()
        out = fn()
        res.seconds[STAGES[i]] = time.perf_counter() - t0
        return out

    data = stage(
        f"phantom dataset: {opts.patients} patients, {opts.size}x{opts.size}",
        lambda: write_synthetic(
            run_dir / "data", patients=opts.patients, seed=opts.seed, size=opts.size
        ),
    )
    res.paths["data"] = data
    split_path = run_dir / "splits.yaml"
    split_opts = SplitOptions(data, split_path, seed=opts.seed, cache_dir=cache)
    show("split", stage("patient-level 80/20 split", lambda: make_split_file(split_opts)))
    res.paths["split"] = split_path
    trained = stage(
        f"train {opts.epochs} epochs (small decoder, random encoder)",
        lambda: _train(data, split_path, run_dir, cache, opts),
    )
    show("train", trained)
    best = trained.run_dir / "best.safetensors"
    res.paths["train"] = trained.run_dir
    res.paths["checkpoint"] = best
    eval_dir = run_dir / "eval"
    evaluated = stage(
        "evaluate on the validation patients",
        lambda: _eval(best, data, split_path, eval_dir, opts),
    )
    show("eval", evaluated)
    res.paths["eval"] = eval_dir
    res.dice["eval"] = float(evaluated.summary["per_patient"]["dice"]["mean"])

    val = load_split(split_path).patients("val")
    res.val_patients = list(val)
    scans = run_dir / "scans"
    _copy_scans(data, val, scans)
    res.paths["scans"] = scans
    pred_torch = run_dir / "predict"
    stage(
        "predict the validation scans with the checkpoint (PyTorch)",
        lambda: _predict(best, scans, pred_torch, opts),
    )
    res.paths["predict"] = pred_torch
    onnx_path = run_dir / "model.onnx"
    exported = stage(
        "export to ONNX and verify against PyTorch",
        lambda: export_onnx(best, onnx_path, verify_data=data, cache_dir=cache),
    )
    show("export", exported)
    res.paths["onnx"] = onnx_path
    pred_onnx = run_dir / "predict-onnx"
    stage(
        "predict the same scans with the ONNX model (onnxruntime)",
        lambda: _predict(onnx_path, scans, pred_onnx, opts),
    )
    res.paths["predict_onnx"] = pred_onnx
    return _summarise(res, data, val)


def _summarise(res: DemoResult, data: Path, val: list[str]) -> DemoResult:
    """Both predictions scored against the true masks and compared; demo.json written."""
    pred_torch, pred_onnx = res.paths["predict"], res.paths["predict_onnx"]
    res.dice["predict_torch"] = mask_folder_dice(pred_torch, data, val)
    res.dice["predict_onnx"] = mask_folder_dice(pred_onnx, data, val)
    res.agreement = _agreement(pred_torch, pred_onnx)
    res.paths["summary"] = res.run_dir / "demo.json"
    atomic_write_text(res.paths["summary"], json.dumps(res.as_dict(), indent=2) + "\n")
    return res


def _train(data: Path, split: Path, run_dir: Path, cache: Path, opts: DemoOptions) -> Any:
    cfg = load_config(
        None,
        {
            **DEMO_TRAIN,
            "data": str(data),
            "split": str(split),
            "image_size": opts.size,
            "epochs": opts.epochs,
            "seed": opts.seed,
            "device": opts.device,
            "project": str(run_dir),
            "name": "train",
            "exist_ok": True,
        },
    )
    return run_training(cfg, cache_dir=cache)  # validates the config before any work


def _eval(model: Path, data: Path, split: Path, out: Path, opts: DemoOptions) -> Any:
    out.mkdir(parents=True, exist_ok=True)
    opts_ = ev.EvalOptions(device=opts.device)
    result = ev.run_eval([model], data, split, "val", None, opts_, masks_dir=out / "masks")
    ev.write_run(result, out)
    return result


def _copy_scans(data: Path, patients: list[str], dest: Path) -> None:
    """The validation patients' images without their masks: a folder of 'new' scans."""
    for pid in patients:
        for f in sorted((data / pid).iterdir()):
            if is_image_path(f) and not is_mask_name(f):
                with atomic_path(dest / pid / f.name) as tmp:
                    shutil.copyfile(f, tmp)


def _predict(model: Path, scans: Path, out: Path, opts: DemoOptions) -> None:
    run = PredictOptions(
        models=[model], inputs=[str(scans)], out_dir=out, overlay=True, device=opts.device
    )
    code = render_result(predict_inputs(run))
    if code:
        raise BrainsegRuntimeError(f"prediction into {out} failed for some files (exit {code})")


def _read_mask(path: Path) -> np.ndarray:
    return read_tiff_array(path) > 0


def mask_folder_dice(pred_dir: Path, data: Path, patients: list[str]) -> float:
    """Mean per-patient Dice (slices stacked into one volume, as Buda et al.) of the masks
    ``brainseg predict`` wrote against the ground truth."""
    scores = []
    for pid in patients:
        gts = sorted((data / pid).glob("*_mask.tif"))
        if not gts:
            raise BrainsegRuntimeError(f"no ground-truth masks in {data / pid}")
        missing = [g.name for g in gts if not (pred_dir / pid / g.name).is_file()]
        if missing:
            raise BrainsegRuntimeError(
                f"{len(missing)} predicted mask(s) missing in {pred_dir / pid}, e.g. {missing[0]}"
            )
        gt = np.stack([_read_mask(g) for g in gts])
        pred = np.stack([_read_mask(pred_dir / pid / g.name) for g in gts])
        scores.append(dice(pred, gt))
    return float(np.mean(scores))


def _agreement(a_dir: Path, b_dir: Path) -> float:
    """Dice between the two backends' masks, all pixels pooled (1.0: identical masks)."""
    a_files = sorted(a_dir.rglob("*_mask.tif"))
    a = np.stack([_read_mask(f) for f in a_files])
    b = np.stack([_read_mask(b_dir / f.relative_to(a_dir)) for f in a_files])
    return dice(a, b)
