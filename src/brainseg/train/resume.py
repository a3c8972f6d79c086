"""Exact resume: the loop's counters (LoopState) and last.safetensors (weights, Adam moments,
RNG states, the epoch's permutation; no pickle) read back; ``Run.save_last`` writes it.

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
from brainseg.model.checkpoint import EXTRA_PREFIX, load_tensors, read_metadata

if TYPE_CHECKING:
    from torch import nn

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
