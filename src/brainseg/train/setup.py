"""Everything a run is built from, in order: device, resume state, split, model and optimiser,
data on the device, steps, run folder. :func:`setup` returns one :class:`Run`.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg import __version__
from brainseg import console as con
from brainseg.config import TrainConfig, dump_yaml, postprocess_settings
from brainseg.data.augment import AugmentSettings
from brainseg.data.split import to_yaml
from brainseg.errors import BrainsegError
from brainseg.fsutil import atomic_write_bytes, atomic_write_text, next_run_dir, remove_temps
from brainseg.inference.postprocess import DEFAULT_THRESHOLD
from brainseg.model.checkpoint import save_checkpoint
from brainseg.model.unet import UNetVGG16
from brainseg.train.data import TrainData, load_data, load_split_checked
from brainseg.train.loggers import Loggers
from brainseg.train.resume import (
    N_AVERAGED,
    TRAIN_PREFIX,
    LoopState,
    build_ema,
    load_ema,
    read_resume_state,
)
from brainseg.train.runfiles import read_metrics, write_metrics
from brainseg.train.runtime import Runtime, setup_runtime

#: The files a run writes after its last epoch's checkpoint (a --resume writes them).
FINAL_FILES = ("report.html",)


@dataclass
class Run:
    """One training run: its settings, runtime, model, optimiser, data, state and folder."""

    cfg: TrainConfig
    rt: Runtime
    raw: Any  # the UNetVGG16 (what is saved)
    optimizer: torch.optim.Optimizer
    scaler: Any
    gen: torch.Generator
    data: TrainData
    aug: AugmentSettings
    steps: int
    global_batch: int
    run_dir: Path
    meta: dict[str, Any]  # checkpoint metadata
    state: LoopState = field(default_factory=LoopState)
    rows: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # raw, or wrapped by DDP / torch.compile
    encoder_trainable: bool | None = None
    loggers: Loggers = field(default_factory=Loggers)  # --logger (rank 0 only); csv is apart
    ema: Any = None  # the AveragedModel of raw when ema_decay is set (brainseg.train.resume)

    @property
    def eval_model(self) -> Any:
        """The model that is validated and saved: the EMA of the weights when it is on."""
        return self.raw if self.ema is None else self.ema.module

    def save_last(self, metadata: dict[str, Any]) -> None:
        """The run's last.safetensors: weights (or their EMA), optimiser, scaler, RNG, loop state;
        tensors go in ``extra``, the rest (param groups, scaler, counters) is JSON metadata."""
        state, ema = self.state, self.ema
        extra: dict[str, torch.Tensor] = {}
        if ema is not None:
            extra = {TRAIN_PREFIX + k: v for k, v in self.raw.state_dict().items()}
            extra[N_AVERAGED] = ema.n_averaged
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                t = v if torch.is_tensor(v) else torch.tensor(v)
                extra[f"optim.{pid}.{k}"] = t.detach().cpu().contiguous()
        extra["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            extra["rng.cuda"] = torch.cuda.get_rng_state()
        extra["rng.sampler"] = self.gen.get_state()
        extra["perm"] = state.perm.to(torch.int64).contiguous()
        meta = {
            **metadata,
            "epoch": state.epoch,
            "train_state": {
                **state.to_json(),
                "optim_param_groups": opt["param_groups"],
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            },
        }
        save_checkpoint(self.run_dir / "last.safetensors", self.eval_model, meta, extra)

    def load_train_state(self, resume: dict[str, Any]) -> None:
        """Put the model (and its EMA), optimiser, scaler, generators and loop counters back."""
        tensors: dict[str, torch.Tensor] = resume["extra"]
        ts = dict(resume["meta"]["train_state"])
        state, scaler = self.state, self.scaler
        if self.ema is None:
            self.raw.load_state_dict(resume["weights"], strict=True)
        else:
            load_ema(resume["weights"], tensors, self.raw, self.ema)
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        pre = "optim."
        for k, v in tensors.items():
            if k.startswith(pre):
                pid, name = k[len(pre) :].split(".", 1)
                opt_state.setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict(
            {"state": opt_state, "param_groups": ts.pop("optim_param_groups")}
        )
        scaler_state = ts.pop("scaler")
        if scaler_state and scaler.is_enabled():
            scaler.load_state_dict(scaler_state)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.rt.device)
        self.gen.set_state(tensors["rng.sampler"])
        state.perm = tensors["perm"].to(torch.int64)
        for k, v in ts.items():
            if hasattr(state, k):
                setattr(state, k, v)
        if state.step_in_epoch:  # the interrupted epoch's wall time so far counts in its row
            state.carried_seconds = state.train_seconds


def pick_resume(cfg: TrainConfig) -> tuple[Path | None, dict[str, Any] | None, Path | None]:
    """(run folder, resume state, split path), read before anything is built; the split path
    is None for --fold all without --split."""
    assert cfg.split is not None or cfg.resume is not None or cfg.all_patients
    given = Path(cfg.split) if cfg.split else None
    if not cfg.resume:
        return None, None, given
    run_dir = Path(cfg.resume)
    split = run_dir / "split.yaml"
    split_path = split if split.is_file() else given
    if not (run_dir / "last.safetensors").exists() and (run_dir / "config.yaml").is_file():
        # killed before its first checkpoint was complete: nothing to continue from, so the
        # run starts over in its folder (same seed: the result an uninterrupted run gives)
        con.info(f"{run_dir} has no complete last.safetensors yet: training from the start")
        return run_dir, None, split_path
    resume = read_resume_state(run_dir)
    done = resume["meta"]["train_state"]
    finished = done["step_in_epoch"] == 0 and done["epoch"] >= cfg.epochs
    if finished and not missing_final_files(run_dir):
        raise BrainsegError(
            f"run {run_dir} has already trained {done['epoch']} of {cfg.epochs} epochs",
            hint=f"raise --epochs to continue, e.g. --epochs {done['epoch'] + 10}",
        )
    return run_dir, resume, split_path


def missing_final_files(run_dir: Path) -> list[str]:
    """What a run killed after its last checkpoint lacks (written after the loop)."""
    return [name for name in FINAL_FILES if not (run_dir / name).is_file()]


def build_model(cfg: TrainConfig, device: torch.device, fresh: bool) -> Any:
    """The UNet-VGG16 on ``device`` (encoder weights and head prior only for a fresh run)."""
    torch.manual_seed(cfg.seed)
    raw = UNetVGG16(
        encoder=cfg.encoder,
        decoder_channels=tuple(cfg.decoder_channels),
        upsample=cfg.upsample,
        normalization=cfg.normalization,
        encoder_weights=cfg.encoder_weights if fresh else None,
    )
    if cfg.head_bias_prior is not None and fresh:
        head_bias = raw.decoder.head.bias
        assert head_bias is not None
        with torch.no_grad():
            head_bias.fill_(math.log(cfg.head_bias_prior / (1 - cfg.head_bias_prior)))
    raw.to(device)
    if cfg.channels_last:
        raw.to(memory_format=torch.channels_last)
    return raw


def build_optimizer(cfg: TrainConfig, raw: nn.Module, rt: Runtime) -> tuple[Any, Any]:
    """Adam and the fp16 grad scaler (a no-op unless --amp fp16)."""
    # fused Adam: one kernel for all parameters (CPU: 11 vs 58 ms per step for this model,
    # about 4% of a 128x128 batch-16 bf16 step; docs/benchmarks.md). Same update rule.
    optimizer = torch.optim.Adam(
        raw.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=rt.device.type in ("cpu", "cuda"),
    )
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    return optimizer, scaler


def batch_plan(cfg: TrainConfig, n_train: int, world: int) -> tuple[int, int]:
    """(steps per epoch, global batch): the batch is a multiple of the processes."""
    per_epoch = min(cfg.batch_size, n_train)
    steps = cfg.steps_per_epoch or max(1, n_train // per_epoch)
    global_batch = per_epoch - per_epoch % world if per_epoch >= world else per_epoch
    if global_batch < world:
        raise BrainsegError(
            f"only {n_train} training slices for {world} processes",
            hint="use fewer processes or more training patients",
        )
    return steps, global_batch


def run_info(run: Run, split_path: Path | None) -> dict[str, Any]:
    """config.yaml's run_info: versions, device, batch plan, split and data identity."""
    import torchvision  # a dependency, heavy to import: the model has imported it already

    rt, data = run.rt, run.data
    return {
        "brainseg": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(rt.device),
        "amp": rt.amp_name,
        "world_size": rt.dist.world,
        "per_rank_batch": run.global_batch // rt.dist.world,
        "steps_per_epoch": run.steps,
        "split_path": str(split_path.resolve()) if split_path else None,
        "split_hash": data.split_hash,
        "dataset_key": data.dataset_key,
        "train_patients": data.train_patients,
        "train_patient_ids": sorted(data.split.all_patients)
        if run.cfg.all_patients
        else sorted(data.split.patients("train", run.cfg.fold)),
        "val_patients": len(data.val.patient_ids),
        "train_slices": data.n,
        "val_slices": data.val.n,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as saved: absolute data / split paths, no resume."""
    resolved = cfg.to_dict()
    for k in ("data", "split"):
        if resolved[k]:
            resolved[k] = str(Path(resolved[k]).resolve())
    resolved["resume"] = None
    return resolved


def setup(cfg: TrainConfig, *, cache_dir: str | os.PathLike[str] | None = None) -> Run:
    """Build the run (nothing is trained yet); a resumed run gets its state back."""
    rt = setup_runtime(cfg)
    run_dir, resume, split_path = pick_resume(cfg)
    split = load_split_checked(split_path, cfg.fold)
    raw = build_model(cfg, rt.device, fresh=resume is None)  # checks the encoder weights first
    optimizer, scaler = build_optimizer(cfg, raw, rt)
    data = load_data(cfg, split, split_path, rt.device, cache_dir)
    steps, global_batch = batch_plan(cfg, data.n, rt.dist.world)
    if rt.dist.is_main and run_dir is None:
        run_dir = next_run_dir(cfg.project, cfg.name, exist_ok=cfg.exist_ok)
    run_dir = rt.dist.broadcast_path(run_dir)
    assert run_dir is not None
    resolved = resolved_config(cfg)
    meta = {
        "normalization": cfg.normalization,
        "image_size": cfg.image_size,
        "threshold": DEFAULT_THRESHOLD,
        "split_hash": data.split_hash,
        "config": resolved,
        "brainseg_version": __version__,
        **postprocess_settings(cfg),
    }
    run = Run(
        cfg, rt, raw, optimizer, scaler, torch.Generator().manual_seed(cfg.seed), data,
        AugmentSettings.from_config(cfg), steps, global_batch, run_dir, meta,
    )  # fmt: skip
    run.model, run.ema = raw, build_ema(cfg, raw)
    if resume is not None:
        run.load_train_state(resume)
        run.rows = [
            r for r in read_metrics(run_dir / "metrics.csv") if r["epoch"] <= run.state.epoch
        ]
    if rt.dist.is_main:
        if cfg.resume:  # half-written files of a killed run (SIGKILL, power loss)
            remove_temps(run_dir)
        write_start_files(run, split_path, resolved, fresh=resume is None)
        run.loggers = Loggers.open(cfg.loggers, run_dir, resolved)
    announce(run, resumed=resume is not None)
    return run


def write_start_files(
    run: Run, split_path: Path | None, resolved: dict[str, Any], fresh: bool
) -> None:
    """config.yaml (with run_info), split.yaml (a fresh run's), metrics.csv so far."""
    d = run.run_dir
    atomic_write_text(
        d / "config.yaml", dump_yaml({**resolved, "run_info": run_info(run, split_path)})
    )
    if fresh and split_path is not None:
        if split_path != d / "split.yaml":  # (a run started over in its folder has its own)
            atomic_write_bytes(d / "split.yaml", split_path.read_bytes())
    elif fresh:
        atomic_write_text(d / "split.yaml", to_yaml(run.data.split))
    write_metrics(d / "metrics.csv", run.rows)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def announce(run: Run, resumed: bool) -> None:
    """The start lines: where it resumes from (if it does), then what is trained where."""
    rt, st, size = run.rt, run.state, run.cfg.image_size
    if resumed and st.epoch >= run.cfg.epochs and st.step_in_epoch == 0:
        lacks = ", ".join(missing_final_files(run.run_dir))
        con.info(
            f"finishing {run.run_dir}: all {run.cfg.epochs} epochs were trained; writing "
            f"what it lacks ({lacks})"
        )
        return
    if resumed:
        where = (
            f"epoch {st.epoch + 1}, step {st.step_in_epoch + 1} of {run.steps}"
            if st.step_in_epoch
            else f"the start of epoch {st.epoch + 1}"
        )
        con.info(
            f"resuming {run.run_dir} from {where} ({_plural(st.epoch, 'epoch')} and "
            f"{_plural(st.global_step, 'step')} done; last.safetensors)"
        )
    procs = f", {rt.dist.world} processes" if rt.dist.world > 1 else ""
    con.info(
        f"training on {rt.device} ({rt.amp_name.replace('off', 'fp32')} precision{procs}): "
        f"{run.data.train_patients} train / {len(run.data.val.patient_ids)} val patients"
        f"{' (--fold all: every patient, no validation)' if run.cfg.all_patients else ''}, "
        f"{_plural(run.steps, 'step')} of {run.global_batch} per epoch, "
        f"Dice at the training size {size}x{size} -> {run.run_dir}"
    )
