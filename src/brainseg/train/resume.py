"""Exact resume: the loop's counters (LoopState) and last.safetensors (weights, Adam moments,
RNG states, the epoch's permutation; no pickle) written and read back.

With ``ema_decay`` an exponential moving average of the weights (torch's AveragedModel) is the
run's model (validated, previewed, saved); last.safetensors also keeps the trained weights
(``train.*``) and the number of averaged steps, so a resume continues both exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from brainseg.config import TrainConfig
from brainseg.errors import BrainsegError
from brainseg.model.checkpoint import EXTRA_PREFIX, load_tensors, read_metadata, save_checkpoint

if TYPE_CHECKING:
    from torch import nn

    from brainseg.train.setup import Run

#: Prefix of the trained (not averaged) weights among last.safetensors' extra tensors.
TRAIN_PREFIX = "train."
N_AVERAGED = "ema.n_averaged"


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where it stopped (saved in last)."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in the current (unfinished) epoch
    global_step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    train_seconds: float = 0.0
    carried_seconds: float = 0.0  # wall time of an interrupted epoch before the resume
    lr: float = 0.0
    best_dice: float = -1.0
    best_epoch: int = 0
    plateau_scale: float = 1.0
    plateau_best: float = -1.0
    plateau_bad: int = 0
    perm: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def plateau_step(self, value: float, cfg: TrainConfig) -> None:
        """ReduceLROnPlateau on the val per-patient Dice (mode max)."""
        if value > self.plateau_best:
            self.plateau_best, self.plateau_bad = value, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > cfg.plateau_patience:
                self.plateau_scale *= cfg.plateau_factor
                self.plateau_bad = 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "perm"}


def save_last(run: Run, metadata: dict[str, Any]) -> None:
    """The run's last.safetensors: weights (or their EMA), optimiser, scaler, RNG, loop state;
    tensors go in ``extra``, the rest (param groups, scaler, counters) is JSON metadata."""
    state, ema = run.state, run.ema
    extra: dict[str, torch.Tensor] = {}
    if ema is not None:
        extra = {TRAIN_PREFIX + k: v for k, v in run.raw.state_dict().items()}
        extra[N_AVERAGED] = ema.n_averaged
    opt = run.optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            extra[f"optim.{pid}.{k}"] = t.detach().cpu().contiguous()
    extra["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        extra["rng.cuda"] = torch.cuda.get_rng_state()
    extra["rng.sampler"] = run.gen.get_state()
    extra["perm"] = state.perm.to(torch.int64).contiguous()
    meta = {
        **metadata,
        "epoch": state.epoch,
        "train_state": {
            **state.to_json(),
            "optim_param_groups": opt["param_groups"],
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        },
    }
    save_checkpoint(run.run_dir / "last.safetensors", run.eval_model, meta, extra)


def read_resume_state(run_dir: Path) -> dict[str, Any]:
    """Metadata and tensors of ``run_dir/last.safetensors`` (refused when missing/foreign)."""
    last = run_dir / "last.safetensors"
    if not last.is_file():
        raise BrainsegError(
            f"cannot resume: {last} does not exist",
            hint="pass a run folder written by brainseg train (runs/train/exp)",
        )
    meta = read_metadata(last)
    if "train_state" not in meta:
        raise BrainsegError(
            f"cannot resume: {last} holds no training state",
            hint="resume from the run folder's last.safetensors, not a copy of best.safetensors",
        )
    tensors = load_tensors(last)
    weights = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    extra = {k[len(EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    return {"meta": meta, "weights": weights, "extra": extra}


def load_train_state(resume: dict[str, Any], run: Run) -> None:
    """Put the model (and its EMA), optimiser, scaler, generators and loop counters back."""
    tensors: dict[str, torch.Tensor] = resume["extra"]
    ts = dict(resume["meta"]["train_state"])
    state, scaler = run.state, run.scaler
    if run.ema is None:
        run.raw.load_state_dict(resume["weights"], strict=True)
    else:
        load_ema(resume["weights"], tensors, run.raw, run.ema)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    pre = "optim."
    for k, v in tensors.items():
        if k.startswith(pre):
            pid, name = k[len(pre) :].split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = v
    run.optimizer.load_state_dict(
        {"state": opt_state, "param_groups": ts.pop("optim_param_groups")}
    )
    scaler_state = ts.pop("scaler")
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and run.rt.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], run.rt.device)
    run.gen.set_state(tensors["rng.sampler"])
    state.perm = tensors["perm"].to(torch.int64)
    for k, v in ts.items():
        if hasattr(state, k):
            setattr(state, k, v)
    if state.step_in_epoch:  # the interrupted epoch's wall time so far counts in its row
        state.carried_seconds = state.train_seconds


def build_ema(cfg: TrainConfig, raw: nn.Module) -> Any:
    """The AveragedModel of ``raw`` (buffers averaged too: BatchNorm statistics), or None."""
    if cfg.ema_decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def load_ema(
    weights: dict[str, torch.Tensor], extra: dict[str, torch.Tensor], raw: nn.Module, ema: Any
) -> None:
    """Put the trained weights into ``raw`` and the saved average into ``ema``."""
    trained = {k[len(TRAIN_PREFIX) :]: v for k, v in extra.items() if k.startswith(TRAIN_PREFIX)}
    if not trained or N_AVERAGED not in extra:
        raise BrainsegError(
            "cannot resume: last.safetensors holds no EMA state, but the run has ema_decay set",
            hint="resume with the config the run was started with (its config.yaml)",
        )
    raw.load_state_dict(trained, strict=True)
    ema.module.load_state_dict(weights, strict=True)
    ema.n_averaged.copy_(extra[N_AVERAGED])
