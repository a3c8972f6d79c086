"""Training: ``train(cfg) -> run folder`` and ``run_training(cfg) -> TrainResult``.

One concern per module (docs/architecture.md); read ``loop`` first, then ``setup`` and ``epoch``.
"""

from __future__ import annotations

from brainseg.train.loop import TrainResult, run_training, train

__all__ = ["TrainResult", "run_training", "train"]
