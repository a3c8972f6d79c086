"""The training loop: read it top to bottom (nanoGPT style), every knob is a TrainConfig field.

    brainseg train DATA --split splits.yaml            # one process, CPU / CUDA / MPS
    torchrun --nproc-per-node 4 -m brainseg train ...  # DistributedDataParallel

Data pipeline: the uint8 cache is read once and resized once; the training slices live in one
uint8 tensor (on the GPU when it fits, else in pinned memory); each step draws a batch of row
indices from a seeded generator, converts to float and augments on the device. No DataLoader,
no per-sample Python work.

Under torchrun every rank draws the same global batch (same seed, same generator) and trains on
its strided share ``batch[rank::world]``: the per-rank batch is ``batch_size / world_size`` and
the global batch, the learning rate and the random stream are those of a single-process run.
Validation tallies (intersections and sums per slice and per patient) are all-reduced, so the
logged Dice is exactly that of one process evaluating the whole validation set.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainseg import __version__
from brainseg import console as con
from brainseg.augment import AugmentSettings, augment_batch, draw
from brainseg.config import TrainConfig, dump_yaml
from brainseg.devices import resolve_device
from brainseg.errors import EXIT_INTERRUPTED, BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import atomic_path, atomic_write_text, next_run_dir, remove_temps

METRICS_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_dice_slice",
    "val_dice_patient",
    "lr",
    "seconds",
    "images_per_s",
)
THRESHOLD = 0.5


# =============================================================================== the loop
def train(cfg: TrainConfig) -> Path:
    """Train a UNet-VGG16 as ``cfg`` says; returns the run folder.

    ``cfg.resume`` (a run folder) continues that run from its last.safetensors; build such a
    config with :func:`brainseg.config.load_resume_config`.
    """
    cfg.validate()
    if cfg.quiet:
        con.configure(quiet=True)

    # ---- processes and device ------------------------------------------------------------
    dist = Distributed.from_env()
    if not dist.is_main:
        con.configure(quiet=True)
    device = resolve_device(cfg.device, dist.local_rank)
    dist.init(device)
    amp_dtype = resolve_amp(cfg.amp, device)
    if cfg.workers:
        torch.set_num_threads(cfg.workers)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.batch_size % dist.world:
        raise BrainsegError(
            f"batch_size {cfg.batch_size} is not divisible by the {dist.world} processes",
            hint=f"use a multiple of {dist.world}",
        )

    # ---- resume state (read before anything is built) ------------------------------------
    run_dir: Path | None = Path(cfg.resume) if cfg.resume else None
    resume: dict[str, Any] | None = None
    split_path = Path(cfg.split) if cfg.split else None
    if run_dir is not None:
        resume = read_resume_state(run_dir)
        done = resume["meta"]["train_state"]
        if done["step_in_epoch"] == 0 and done["epoch"] >= cfg.epochs:
            raise BrainsegError(
                f"run {run_dir} has already trained {done['epoch']} of {cfg.epochs} epochs",
                hint=f"raise --epochs to continue, e.g. --epochs {done['epoch'] + 10}",
            )
        if (run_dir / "split.yaml").is_file():
            split_path = run_dir / "split.yaml"

    # ---- split, then the model (checks the encoder weights) before any data is read -----
    from brainseg.data.split import check_split, load_split

    assert split_path is not None and cfg.data is not None
    split = load_split(split_path)
    check_fold(split, cfg.fold, split_path)

    from brainseg.model import UNetVGG16

    torch.manual_seed(cfg.seed)
    raw = UNetVGG16(
        encoder=cfg.encoder,
        decoder_channels=tuple(cfg.decoder_channels),
        upsample=cfg.upsample,
        normalization=cfg.normalization,
        encoder_weights=None if resume else cfg.encoder_weights,
    )
    if cfg.head_bias_prior is not None and resume is None:
        head_bias = raw.decoder.head.bias
        assert head_bias is not None
        with torch.no_grad():
            head_bias.fill_(math.log(cfg.head_bias_prior / (1 - cfg.head_bias_prior)))
    raw.to(device)
    if cfg.channels_last:
        raw.to(memory_format=torch.channels_last)
    # fused Adam: one kernel for all parameters (CPU: 11 vs 58 ms per step for this model,
    # about 4% of a 128x128 batch-16 bf16 step; docs/benchmarks.md). Same update rule.
    optimizer = torch.optim.Adam(
        raw.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- data ------------------------------------------------------------------------------
    from brainseg.data.cache import load_dataset

    ds = load_dataset(cfg.data, skip_bad=cfg.skip_bad)
    check_split(split, ds.patient_ids)
    train_ids = list(split.patients("train", cfg.fold))
    val_ids = list(split.patients("val", cfg.fold))
    if not train_ids or not val_ids:
        raise BrainsegError(
            f"split {split_path} has no {'train' if not train_ids else 'val'} "
            f"patients{'' if cfg.fold is None else f' in fold {cfg.fold}'}",
            hint="make a split with a validation fraction > 0",
        )
    con.info(
        f"data: {len(ds)} slices of {len(ds.patient_ids)} patients; resizing to "
        f"{cfg.image_size}x{cfg.image_size}"
        if ds.size != (cfg.image_size,) * 2
        else f"data: {len(ds)} slices of {len(ds.patient_ids)} patients"
    )
    ds = ds.resized(cfg.image_size)
    train_rows, val_rows = ds.indices_of(train_ids), ds.indices_of(val_ids)
    train_x, train_y = place_arrays(ds.images[train_rows], ds.masks[train_rows], device)
    val = ValData.build(
        ds.images[val_rows],
        ds.masks[val_rows],
        ds.patient_index[val_rows],
        ds.slice_number[val_rows],
        ds.patient_ids,
        device,
    )
    n_train = len(train_rows)
    weights = sample_weights(ds.tumor_pixels_per_slice()[train_rows] > 0, cfg.tumor_oversample)
    preview_rows = choose_preview(val, cfg.preview_slices)
    split_hash = str(getattr(split, "dataset_hash", ""))
    dataset_key = str(ds.key)
    del ds

    # ---- steps, schedule, run folder -------------------------------------------------------
    per_epoch = min(cfg.batch_size, n_train)
    steps = cfg.steps_per_epoch or max(1, n_train // per_epoch)
    global_batch = per_epoch - per_epoch % dist.world if per_epoch >= dist.world else per_epoch
    if global_batch < dist.world:
        raise BrainsegError(
            f"only {n_train} training slices for {dist.world} processes",
            hint="use fewer processes or more training patients",
        )
    total_steps = steps * cfg.epochs
    aug = AugmentSettings(
        cfg.aug_hflip,
        cfg.aug_vflip,
        cfg.aug_rotate,
        cfg.aug_scale,
        cfg.aug_brightness,
        cfg.aug_contrast,
        cfg.aug_mask_mode,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    state = LoopState()
    if dist.is_main:
        run_dir = run_dir or next_run_dir(cfg.project, cfg.name, exist_ok=cfg.exist_ok)
    run_dir = dist.broadcast_path(run_dir)
    assert run_dir is not None
    run_info = {
        "brainseg": __version__,
        "torch": str(torch.__version__),
        "torchvision": _version_of("torchvision"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "amp": _amp_name(amp_dtype),
        "world_size": dist.world,
        "per_rank_batch": global_batch // dist.world,
        "steps_per_epoch": steps,
        "split_path": str(Path(split_path).resolve()),
        "split_hash": split_hash,
        "dataset_key": dataset_key,
        "train_patients": len(train_ids),
        "val_patients": len(val_ids),
        "train_slices": n_train,
        "val_slices": val.n,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    resolved = cfg.to_dict()
    for k in ("data", "split"):
        if resolved[k]:
            resolved[k] = str(Path(resolved[k]).resolve())
    resolved["resume"] = None
    rows: list[dict[str, Any]] = []
    if resume is not None:
        load_train_state(resume, raw, optimizer, scaler, gen, state, device)
        rows = [r for r in read_metrics(run_dir / "metrics.csv") if r["epoch"] <= state.epoch]
    if dist.is_main:
        if resume is not None:  # half-written files of a killed run (SIGKILL, power loss)
            remove_temps(run_dir)
        atomic_write_text(run_dir / "config.yaml", dump_yaml({**resolved, "run_info": run_info}))
        if resume is None:
            shutil.copyfile(split_path, _tmp := run_dir / ".split.yaml.tmp")
            os.replace(_tmp, run_dir / "split.yaml")
        write_metrics(run_dir / "metrics.csv", rows)
    ckpt_meta = {
        "normalization": cfg.normalization,
        "image_size": cfg.image_size,
        "threshold": THRESHOLD,
        "split_hash": split_hash,
        "config": resolved,
        "brainseg_version": __version__,
    }

    con.info(
        f"training on {device} ({_amp_name(amp_dtype).replace('off', 'fp32')} precision"
        f"{f', {dist.world} processes' if dist.world > 1 else ''}): {len(train_ids)} "
        f"train / {len(val_ids)} val patients, {steps} steps of {global_batch} per epoch, "
        f"-> {run_dir}"
    )

    # ---- stop on Ctrl-C / SIGTERM after the current step ------------------------------
    stopper = Stopper()
    stopper.install()
    model: nn.Module = raw
    encoder_trainable: bool | None = None
    try:
        for epoch in range(state.epoch, cfg.epochs):
            # (un)freeze the encoder; DDP must be (re)built when the trainable set changes
            want = epoch >= cfg.freeze_encoder_epochs
            if want != encoder_trainable:
                raw.set_encoder_trainable(want)
                encoder_trainable = want
                model = dist.wrap(raw, device)
                if cfg.compile:
                    model = torch.compile(model)  # type: ignore[assignment]
            raw.train()
            if state.step_in_epoch == 0:  # enough shuffled passes for this epoch's steps
                passes = -(-steps * global_batch // n_train) if weights is None else 0
                state.perm = torch.cat(
                    [torch.randperm(n_train, generator=gen) for _ in range(passes)]
                    or [torch.zeros(0).long()]
                )
                state.loss_sum, state.loss_count, state.train_seconds = 0.0, 0, 0.0
            t_epoch = time.perf_counter()
            with epoch_bar(steps * global_batch, f"epoch {epoch + 1}/{cfg.epochs}") as bar:
                for step in range(state.step_in_epoch, steps):
                    t_step = time.perf_counter()
                    # draw this step's global batch and take this rank's share
                    if weights is None:
                        idx = state.perm[step * global_batch : (step + 1) * global_batch]
                    else:
                        idx = torch.multinomial(
                            weights, global_batch, replacement=True, generator=gen
                        )
                    u = draw(global_batch, gen)
                    idx, u = idx[dist.rank :: dist.world], u[dist.rank :: dist.world]
                    x, y = fetch(train_x, train_y, idx, device)
                    if cfg.augment:
                        x, y = augment_batch(x, y, u, aug)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    lr = lr_at(cfg, state.global_step, total_steps, state.plateau_scale)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    # forward, loss; a non-finite loss stops every rank before the update
                    with autocast(device, amp_dtype):
                        logits = model(x)
                    loss = loss_fn(cfg.loss, logits.float(), y)
                    loss_v = loss.item()
                    bad, stop = dist.any_flags(not math.isfinite(loss_v), stopper.requested)
                    if bad:
                        raise non_finite_error(loss_v, state, epoch, step, cfg, run_dir)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    state.global_step += 1
                    state.step_in_epoch = step + 1
                    state.loss_sum += loss_v * len(idx)
                    state.loss_count += len(idx)
                    state.lr = lr
                    state.train_seconds += time.perf_counter() - t_step
                    bar.advance(global_batch, loss=state.loss_sum / state.loss_count)
                    if stop:  # finish this step, save, tell how to resume
                        if dist.is_main:
                            save_last(run_dir, raw, optimizer, scaler, gen, state, ckpt_meta)
                        raise BrainsegError(
                            f"interrupted at epoch {epoch + 1} step {step + 1}/{steps}; saved "
                            f"{run_dir / 'last.safetensors'}",
                            hint=f"resume with: brainseg train --resume {run_dir}",
                            exit_code=EXIT_INTERRUPTED,
                        )

            # ---- end of epoch: validate, log, checkpoint --------------------------------
            loss_sum, loss_count = dist.sum_floats(state.loss_sum, float(state.loss_count))
            train_seconds = state.train_seconds
            dist.sync_buffers(raw)
            metrics = validate(raw, val, cfg, device, amp_dtype, dist)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            improved = metrics["val_dice_patient"] > state.best_dice
            if improved:
                state.best_dice, state.best_epoch = metrics["val_dice_patient"], epoch + 1
            if cfg.scheduler == "plateau":
                state.plateau_step(metrics["val_dice_patient"], cfg)
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(loss_count, 1.0),
                **metrics,
                "lr": state.lr,
                "seconds": time.perf_counter() - t_epoch + state.carried_seconds,
                "images_per_s": loss_count / train_seconds if train_seconds else 0.0,
            }
            state.carried_seconds = 0.0
            rows.append(row)
            if dist.is_main:
                meta = {
                    **ckpt_meta,
                    "epoch": epoch + 1,
                    "metrics": {k: row[k] for k in METRICS_COLUMNS if k != "epoch"},
                }
                if improved:
                    save_weights(run_dir / "best.safetensors", raw, meta)
                    write_preview(
                        run_dir / "preview.png", raw, val, preview_rows, device, amp_dtype
                    )
                # metrics before last: a kill between the two redoes this epoch on resume
                # (rows after last's epoch are dropped); the other order lost its row for good
                write_metrics(run_dir / "metrics.csv", rows)
                write_curves(run_dir / "curves.png", rows)
                save_last(run_dir, raw, optimizer, scaler, gen, state, meta)
            con.info(epoch_line(row, cfg.epochs, improved))
    finally:
        stopper.uninstall()
        dist.close()

    if dist.is_main:
        best = next((r for r in rows if r["epoch"] == state.best_epoch), rows[-1])
        con.result(
            con.table(
                f"best epoch {best['epoch']} of {cfg.epochs} (by mean per-patient Dice)",
                ["epoch", "train_loss", "val_loss", "dice_slice", "dice_patient"],
                [
                    [
                        best["epoch"],
                        best["train_loss"],
                        best["val_loss"],
                        best["val_dice_slice"],
                        best["val_dice_patient"],
                    ]
                ],
            )
        )
        con.result(
            con.table(
                None,
                ["file", "path"],
                [
                    ["run folder", str(run_dir)],
                    ["best weights", str(run_dir / "best.safetensors")],
                    ["last state", str(run_dir / "last.safetensors")],
                    ["metrics", str(run_dir / "metrics.csv")],
                    ["curves", str(run_dir / "curves.png")],
                    ["preview", str(run_dir / "preview.png")],
                ],
            )
        )
    return run_dir


# =============================================================================== pieces
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


def lr_at(cfg: TrainConfig, step: int, total: int, plateau_scale: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``."""
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
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


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """torch.autocast for bf16 / fp16, a no-op context for fp32."""
    if dtype is None:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA GPUs that support it (else fp16); on CPUs bf16 where the CPU has
    native bf16 instructions, else fp32; fp32 on MPS."""
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu":
            mode = "bf16" if cpu_has_native_bf16() else "off"
        else:
            mode = "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo).

    There bf16 autocast made a training step 1.5-2x faster and learned as well as fp32
    (docs/results.md); elsewhere oneDNN emulates bf16 and fp32 is the safer default.
    """
    import re

    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def _amp_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off") if dtype else "off"


def _version_of(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # pragma: no cover - torchvision is a dependency
        return "unknown"


def check_fold(split: Any, fold: int | None, path: Path) -> None:
    """Refuse a fold the split does not have (or any fold for a split without folds)."""
    folds = getattr(split, "folds", None)
    n = folds if isinstance(folds, int) else len(folds) if folds else 0
    if fold is None:
        return
    if n == 0:
        raise BrainsegError(
            f"split {path} has no cross-validation folds, but --fold {fold} was given",
            hint="leave out --fold, or make a split with --folds K",
        )
    if not 0 <= fold < n:
        raise BrainsegError(
            f"fold {fold} is out of range: split {path} has {n} folds",
            hint=f"use --fold 0..{n - 1}",
        )


def place_arrays(
    images: np.ndarray, masks: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set as uint8 tensors: on the GPU when it fits in half the free memory,
    else pinned host memory (CUDA) or plain memory (CPU)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(np.ascontiguousarray(masks))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if x.nbytes + y.nbytes < free // 2:
            return x.to(device), y.to(device)
        return x.pin_memory(), y.pin_memory()
    if device.type == "mps":
        return x.to(device), y.to(device)
    return x, y


def fetch(
    images: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` as float images N x 3 x H x W in [0, 255] and masks N x 1 x H x W on device."""
    idx = idx.to(images.device)
    x = images.index_select(0, idx)
    y = masks.index_select(0, idx)
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.float(), y.unsqueeze(1).float()


def sample_weights(has_tumor: np.ndarray, p: float | None) -> torch.Tensor | None:
    """Per-slice sampling weights giving tumor slices total probability ``p`` (None: uniform)."""
    if p is None:
        return None
    n_t = int(has_tumor.sum())
    n_e = len(has_tumor) - n_t
    if (n_t == 0 and p > 0) or (n_e == 0 and p < 1):
        kind = "tumor" if n_t == 0 else "tumor-free"
        raise BrainsegError(
            f"--tumor-oversample {p} needs {kind} training slices, but there are none",
            hint="leave out --tumor-oversample",
        )
    w = np.where(has_tumor, p / max(n_t, 1), (1 - p) / max(n_e, 1))
    return torch.from_numpy(w.astype(np.float64))


# ------------------------------------------------------------------------------ validation
@dataclass
class ValData:
    """Validation slices on the device with their patient grouping."""

    images: torch.Tensor  # N x 3 x H x W uint8
    masks: torch.Tensor  # N x H x W uint8
    patient: torch.Tensor  # N int64, 0..P-1 (local to the validation set)
    slice_number: np.ndarray
    patient_ids: list[str]  # the P validation patients

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def build(
        cls,
        images: np.ndarray,
        masks: np.ndarray,
        patient_index: np.ndarray,
        slice_number: np.ndarray,
        all_ids: list[str],
        device: torch.device,
    ) -> ValData:
        uniq, local = np.unique(np.asarray(patient_index), return_inverse=True)
        x, y = place_arrays(images, masks, device)
        return cls(
            x,
            y,
            torch.from_numpy(local.astype(np.int64)),
            np.asarray(slice_number),
            [all_ids[i] for i in uniq],
        )


@torch.no_grad()
def validate(
    model: nn.Module,
    val: ValData,
    cfg: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    dist: Distributed | None = None,
    return_per_patient: bool = False,
) -> dict[str, Any]:
    """Loss, mean per-slice Dice and mean per-patient Dice on the validation set.

    Prediction = logit > 0 (probability > 0.5). A slice's or patient's Dice is 2|P∩G|/(|P|+|G|),
    1 when both are empty. Per-patient Dice stacks all of a patient's slices (one 3D Dice per
    patient) via scatter-add of the intersection and sums by patient index. Under torchrun
    each rank evaluates a strided share and the tallies are all-reduced (exact).
    """
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    bs = cfg.val_batch_size or cfg.batch_size
    rows = torch.arange(dist.rank, val.n, dist.world)
    n_p = len(val.patient_ids)
    inter = torch.zeros(n_p, dtype=torch.float64)
    psum = torch.zeros(n_p, dtype=torch.float64)
    gsum = torch.zeros(n_p, dtype=torch.float64)
    loss_sum, slice_dice_sum = 0.0, 0.0
    for i in range(0, len(rows), bs):
        idx = rows[i : i + bs]
        x, y = fetch(val.images, val.masks, idx, device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += loss_fn(cfg.loss, logits, y).item() * len(idx)
        pred = logits > 0
        gt = y > 0.5
        it = (pred & gt).flatten(1).sum(1).double().cpu()
        ps = pred.flatten(1).sum(1).double().cpu()
        gs = gt.flatten(1).sum(1).double().cpu()
        denom = ps + gs
        d = torch.where(denom > 0, 2 * it / denom.clamp(min=1), torch.ones_like(denom))
        slice_dice_sum += float(d.sum())
        pid = val.patient[idx]
        inter.index_add_(0, pid, it)
        psum.index_add_(0, pid, ps)
        gsum.index_add_(0, pid, gs)
    packed = torch.cat(
        [torch.tensor([loss_sum, slice_dice_sum], dtype=torch.float64), inter, psum, gsum]
    )
    packed = dist.all_reduce_sum(packed)
    loss_sum, slice_dice_sum = float(packed[0]), float(packed[1])
    inter, psum, gsum = packed[2 : 2 + n_p], packed[2 + n_p : 2 + 2 * n_p], packed[2 + 2 * n_p :]
    denom = psum + gsum
    per_patient = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
    if was_training:
        model.train()
    out: dict[str, Any] = {
        "val_loss": loss_sum / max(val.n, 1),
        "val_dice_slice": slice_dice_sum / max(val.n, 1),
        "val_dice_patient": float(per_patient.mean()) if n_p else 0.0,
    }
    if return_per_patient:
        out["per_patient"] = dict(zip(val.patient_ids, per_patient.tolist(), strict=True))
    return out


# ------------------------------------------------------------------------------ distributed
class Distributed:
    """torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK) or a single process."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device("cpu")
        self.active = False

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Join the process group: nccl on CUDA, gloo otherwise."""
        self.device = device
        if self.world <= 1:
            return
        import torch.distributed as td

        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not td.is_initialized():
            if device.type == "cuda":
                td.init_process_group(backend="nccl", device_id=device)
            else:
                td.init_process_group(backend="gloo")
        self.active = True

    def close(self) -> None:
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
            self.active = False

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around ``model`` (itself when single-process)."""
        if self.world <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world <= 1:
            return t
        import torch.distributed as td

        dev = self._comm_device()
        buf = t.to(dev)
        td.all_reduce(buf, op=td.ReduceOp.SUM)
        return buf.cpu()

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        t = self.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
        return tuple(float(v) for v in t)

    def any_flags(self, *flags: bool) -> tuple[bool, ...]:
        """Logical OR of each flag over all ranks (so every rank stops at the same step)."""
        if self.world <= 1:
            return tuple(flags)
        t = self.all_reduce_sum(torch.tensor([float(f) for f in flags], dtype=torch.float64))
        return tuple(bool(v > 0) for v in t)

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm statistics before validating (what is saved)."""
        if self.world <= 1:
            return
        import torch.distributed as td

        for b in model.buffers():
            td.broadcast(b.data, src=0)

    def broadcast_path(self, path: Path | None) -> Path | None:
        if self.world <= 1:
            return path
        import torch.distributed as td

        box = [str(path) if path is not None else None]
        td.broadcast_object_list(box, src=0)
        return Path(box[0]) if box[0] is not None else None


# ------------------------------------------------------------------------------ signals
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


def non_finite_error(
    value: float, state: LoopState, epoch: int, step: int, cfg: TrainConfig, run_dir: Path
) -> BrainsegRuntimeError:
    """The error for a NaN / inf loss; nothing is saved from the broken step."""
    last = run_dir / "last.safetensors"
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


# ------------------------------------------------------------------------------ checkpoints
def save_weights(
    path: Path,
    model: nn.Module,
    metadata: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights + metadata (+ extra tensors) as safetensors, atomically."""
    from brainseg.checkpoint import save_checkpoint

    save_checkpoint(path, model, metadata, extra=extra, force=True)


def save_last(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    gen: torch.Generator,
    state: LoopState,
    metadata: dict[str, Any],
) -> None:
    """last.safetensors: weights + optimiser, scaler, RNG and loop state (no pickle).

    Tensors (Adam moments, RNG states, the epoch's permutation) go in ``extra``; the rest
    (param groups, scaler scalars, counters) is JSON in the metadata.
    """
    extra: dict[str, torch.Tensor] = {}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            extra[f"optim.{pid}.{k}"] = t.detach().cpu().contiguous()
    extra["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        extra["rng.cuda"] = torch.cuda.get_rng_state()
    extra["rng.sampler"] = gen.get_state()
    extra["perm"] = state.perm.to(torch.int64).contiguous()
    meta = {
        **metadata,
        "epoch": state.epoch,
        "train_state": {
            **state.to_json(),
            "optim_param_groups": opt["param_groups"],
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        },
    }
    save_weights(run_dir / "last.safetensors", model, meta, extra)


def read_resume_state(run_dir: Path) -> dict[str, Any]:
    """Metadata and tensors of ``run_dir/last.safetensors`` (refused when missing/foreign)."""
    from brainseg.checkpoint import EXTRA_PREFIX, load_tensors, read_metadata

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


def load_train_state(
    resume: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    gen: torch.Generator,
    state: LoopState,
    device: torch.device,
) -> None:
    """Put the model, optimiser, scaler, generators and loop counters back."""
    tensors: dict[str, torch.Tensor] = resume["extra"]
    ts = dict(resume["meta"]["train_state"])
    model.load_state_dict(resume["weights"], strict=True)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    pre = "optim."
    for k, v in tensors.items():
        if k.startswith(pre):
            pid, name = k[len(pre) :].split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": ts.pop("optim_param_groups")})
    scaler_state = ts.pop("scaler")
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    gen.set_state(tensors["rng.sampler"])
    state.perm = tensors["perm"].to(torch.int64)
    for k, v in ts.items():
        if hasattr(state, k):
            setattr(state, k, v)
    if state.step_in_epoch:  # the interrupted epoch's wall time so far counts in its row
        state.carried_seconds = state.train_seconds


# ------------------------------------------------------------------------------ run files
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv as a list of dicts (epoch int, the rest float); [] when missing."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: int(v) if k == "epoch" else float(v) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS_COLUMNS)
    for r in rows:
        w.writerow(
            [
                r["epoch"],
                *(
                    f"{float(r[k]):.6g}" if k in ("lr",) else repr(float(r[k]))
                    for k in METRICS_COLUMNS[1:]
                ),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  dice_slice {row['val_dice_slice']:.4f}  "
        f"dice_patient {row['val_dice_patient']:.4f}  lr {row['lr']:.3g}  "
        f"{row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s" + ("  *best" if improved else "")
    )


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n: int = 1, **fields: Any) -> None:
        return None


def epoch_bar(total: int, description: str) -> Any:
    """A rich bar (loss, img/s, ETA) on a terminal; nothing otherwise (one line per epoch)."""
    if con.interactive():
        return con.progress(total, description, unit="img")
    return _NoBar()


def write_curves(path: Path, rows: list[dict[str, Any]]) -> None:
    """Loss and Dice per epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [r["val_dice_slice"] for r in rows], "o-", label="val per-slice")
    b.plot(ep, [r["val_dice_patient"] for r in rows], "o-", label="val per-patient")
    b.set_xlabel("epoch")
    b.set_ylabel("Dice")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def choose_preview(val: ValData, k: int) -> list[int]:
    """Up to ``k`` validation rows: the slice with the most tumour of each patient in turn."""
    if k == 0 or val.n == 0:
        return []
    area = val.masks.flatten(1).sum(1).cpu().numpy()
    patient = val.patient.numpy()
    chosen: list[int] = []
    for p in range(len(val.patient_ids)):
        rows = np.flatnonzero(patient == p)
        chosen.append(int(rows[np.argmax(area[rows])]))
    chosen.sort(key=lambda r: -area[r])
    return sorted(chosen[:k])


def _outline(m: np.ndarray) -> np.ndarray:
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


@torch.no_grad()
def write_preview(
    path: Path,
    model: nn.Module,
    val: ValData,
    rows: list[int],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> None:
    """FLAIR with ground truth (green) and prediction (red) outlines, as in Buda et al."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    idx = torch.tensor(rows)
    x, y = fetch(val.images, val.masks, idx, device)
    with autocast(device, amp_dtype):
        pred = (model(x).float() > 0)[:, 0].cpu().numpy()
    if was_training:
        model.train()
    flair = val.images.index_select(0, idx.to(val.images.device))[:, 1].cpu().numpy()
    gt = y[:, 0].cpu().numpy() > 0.5
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.9), squeeze=False)
    for j, r in enumerate(rows):
        rgb = np.repeat(flair[j][..., None], 3, axis=2).copy()
        rgb[_outline(gt[j])] = (0, 255, 0)
        rgb[_outline(pred[j])] = (255, 0, 0)
        inter = (gt[j] & pred[j]).sum()
        den = gt[j].sum() + pred[j].sum()
        d = 2 * inter / den if den else 1.0
        ax = axes[0, j]
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(
            f"{val.patient_ids[int(val.patient[r])][:12]}\nslice "
            f"{int(val.slice_number[r])}  Dice {d:.2f}",
            fontsize=7,
        )
        ax.axis("off")
    fig.suptitle("FLAIR; green: ground truth, red: prediction", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
