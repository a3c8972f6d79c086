"""Training: ``train(cfg) -> run folder`` and ``run_training(cfg) -> TrainResult``.

The package, one concern per module (read in this order):

- ``loop``: the loop itself (setup, then per epoch: train, validate, save, log; the report)
- ``setup``: device, resume state, split, model and optimiser, data, run folder -> ``Run``
- ``epoch``: one epoch (batch, forward, loss, step; Ctrl-C / SIGTERM), the lr schedule, loss
- ``validation``: loss and per-slice / per-patient Dice (``brainseg.evaluation.metrics``)
- ``data``: uint8 tensors on the device, batch fetching, sampling weights, validation set
- ``resume``: LoopState and last.safetensors (exact resume, no pickle)
- ``distributed``: torchrun's process group (a world of one when not under torchrun)
- ``runtime``: device, AMP dtype, torch switches
- ``runfiles`` / ``preview``: metrics.csv, curves.png, the epoch line; preview.png
"""

from __future__ import annotations

from brainseg.train.loop import TrainResult, run_training, train

__all__ = ["TrainResult", "run_training", "train"]
