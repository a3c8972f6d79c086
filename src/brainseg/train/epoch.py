"""One epoch of training: draw a batch, forward, loss, backward, step; stop on request.

Under torchrun every rank draws the same global batch (same seed, same generator) and trains
on its strided share ``batch[rank::world]``: the global batch, the learning rate and the
random stream are those of a single-process run.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from brainseg import console as con
from brainseg.config import TrainConfig
from brainseg.data.augment import augment_batch, draw
from brainseg.errors import EXIT_INTERRUPTED, BrainsegError, BrainsegRuntimeError
from brainseg.train.data import fetch
from brainseg.train.runfiles import epoch_bar
from brainseg.train.runtime import autocast

if TYPE_CHECKING:
    from brainseg.train.setup import Run


def lr_at(cfg: TrainConfig, step: int, total: int, plateau_scale: float, warmup: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``: a linear warm-up
    (Adam's early moment estimates are noisy), then the scheduler over the remaining steps."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.scheduler == "cosine":
        span = max(total - warmup, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
    if cfg.scheduler == "plateau":
        return cfg.lr * plateau_scale
    return cfg.lr


def loss_fn(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits, soft Dice over the whole batch (smooth 1, as Buda et al.), or both."""
    loss = logits.new_zeros(())
    if name in ("bce", "bce+dice"):
        loss = loss + F.binary_cross_entropy_with_logits(logits, target)
    if name in ("dice", "bce+dice"):
        p = torch.sigmoid(logits)
        inter = (p * target).sum()
        loss = loss + 1.0 - (2.0 * inter + 1.0) / (p.sum() + target.sum() + 1.0)
    return loss


class Stopper:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        con.warn("stopping after the current step (press Ctrl-C again to abort at once)")

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def non_finite_error(run: Run, value: float, epoch: int, step: int) -> BrainsegRuntimeError:
    """The error for a NaN / inf loss; nothing is saved from the broken step."""
    cfg, state = run.cfg, run.state
    last = run.run_dir / "last.safetensors"
    kept = (
        f"the last good checkpoint {last} (epoch {state.epoch}) is kept"
        if last.exists()
        else "no checkpoint was written yet"
    )
    amp = "" if cfg.amp == "off" else "--amp off or "
    return BrainsegRuntimeError(
        f"loss became {value} at step {state.global_step + 1} (epoch {epoch + 1}, step "
        f"{step + 1}); training stopped and {kept}",
        hint=f"try {amp}a lower --lr (now {cfg.lr:g}), or --grad-clip 1.0",
    )


def prepare_model(run: Run, epoch: int) -> None:
    """(Un)freeze the encoder for ``epoch``; DDP is rebuilt when the trainable set changes."""
    trainable = epoch >= run.cfg.freeze_encoder_epochs
    if trainable != run.encoder_trainable:
        run.raw.set_encoder_trainable(trainable)
        run.encoder_trainable = trainable
        run.model = run.rt.dist.wrap(run.raw, run.rt.device)
        if run.cfg.compile:
            run.model = torch.compile(run.model)  # type: ignore[assignment]
    run.raw.train()


def start_epoch(run: Run) -> None:
    """A fresh epoch: enough shuffled passes for its steps, running sums at zero."""
    state, n = run.state, run.data.n
    passes = -(-run.steps * run.global_batch // n) if run.data.weights is None else 0
    state.perm = torch.cat(
        [torch.randperm(n, generator=run.gen) for _ in range(passes)] or [torch.zeros(0).long()]
    )
    state.loss_sum, state.loss_count, state.train_seconds = 0.0, 0, 0.0


def draw_batch(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's global batch (rows and augmentation draws), this rank's share, on device."""
    cfg, dist, gb, weights = run.cfg, run.rt.dist, run.global_batch, run.data.weights
    if weights is None:
        rows = run.state.perm[step * gb : (step + 1) * gb]
    else:
        rows = torch.multinomial(weights, gb, replacement=True, generator=run.gen)
    u = draw(gb, run.gen)
    rows, u = rows[dist.rank :: dist.world], u[dist.rank :: dist.world]
    x, y = fetch(run.data.images, run.data.masks, rows, run.rt.device)
    if cfg.augment:
        x, y = augment_batch(x, y, u, run.aug)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_step(run: Run, epoch: int, step: int, stopper: Stopper) -> bool:
    """One optimiser step; True when a stop was requested (on any rank)."""
    cfg, state, opt = run.cfg, run.state, run.optimizer
    t_step = time.perf_counter()
    x, y = draw_batch(run, step)
    total, warmup = run.steps * cfg.epochs, round(cfg.warmup_epochs * run.steps)
    lr = lr_at(cfg, state.global_step, total, state.plateau_scale, warmup)
    for g in opt.param_groups:
        g["lr"] = lr
    # forward, loss; a non-finite loss stops every rank before the update
    with autocast(run.rt.device, run.rt.amp_dtype):
        logits = run.model(x)
    loss = loss_fn(cfg.loss, logits.float(), y)
    loss_v = loss.item()
    bad, stop = run.rt.dist.any_flags(not math.isfinite(loss_v), stopper.requested)
    if bad:
        raise non_finite_error(run, loss_v, epoch, step)
    run.scaler.scale(loss).backward()
    if cfg.grad_clip:
        run.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.grad_clip)
    run.scaler.step(opt)
    run.scaler.update()
    opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(run.raw)
    state.global_step += 1
    state.step_in_epoch = step + 1
    state.loss_sum += loss_v * len(x)
    state.loss_count += len(x)
    state.lr = lr
    state.train_seconds += time.perf_counter() - t_step
    run.loggers.step(state.global_step, loss_v, lr)
    return stop


def run_epoch(run: Run, epoch: int, stopper: Stopper) -> None:
    """Train epoch ``epoch`` (0-based) from the saved position; save and stop on request."""
    prepare_model(run, epoch)
    if run.state.step_in_epoch == 0:
        start_epoch(run)
    total = run.steps * run.global_batch
    with epoch_bar(total, f"epoch {epoch + 1}/{run.cfg.epochs}") as bar:
        for step in range(run.state.step_in_epoch, run.steps):
            stop = train_step(run, epoch, step, stopper)
            bar.advance(run.global_batch, loss=run.state.loss_sum / run.state.loss_count)
            if stop:  # save the position in the epoch too
                if run.rt.dist.is_main:
                    run.save_last(run.meta)
                raise interrupted(run, f"at epoch {epoch + 1} step {step + 1}/{run.steps}")


def interrupted(run: Run, when: str) -> BrainsegError:
    """The error of a requested stop, once last.safetensors is saved: how to resume."""
    return BrainsegError(
        f"interrupted {when}; saved {run.run_dir / 'last.safetensors'}",
        hint=f"resume with: brainseg train --resume {run.run_dir}",
        exit_code=EXIT_INTERRUPTED,
    )
