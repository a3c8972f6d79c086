"""An exponential moving average of the weights (``ema_decay``), built on torch's own
:class:`torch.optim.swa_utils.AveragedModel`.

When it is on, the average is the run's model: validation, preview.png, best.safetensors and
the weights of last.safetensors (what cv's ``--select last`` and ensembles load) are the
average, and last.safetensors also keeps the trained weights (``train.*``) and the number of
averaged steps so a resume continues both exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from brainseg.config import TrainConfig
from brainseg.errors import BrainsegError

#: Prefix of the trained (not averaged) weights among last.safetensors' extra tensors.
TRAIN_PREFIX = "train."
N_AVERAGED = "ema.n_averaged"


def build_ema(cfg: TrainConfig, raw: nn.Module) -> Any:
    """The AveragedModel of ``raw`` (buffers averaged too: BatchNorm statistics), or None."""
    if cfg.ema_decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def ema_extra(raw: nn.Module, ema: Any) -> dict[str, torch.Tensor]:
    """The tensors last.safetensors needs beside the averaged weights to resume the run."""
    extra = {TRAIN_PREFIX + k: v for k, v in raw.state_dict().items()}
    extra[N_AVERAGED] = ema.n_averaged
    return extra


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
