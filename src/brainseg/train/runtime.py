"""Where and how a run computes: processes, device, precision, torch's speed switches."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from brainseg import console as con
from brainseg.config import TrainConfig
from brainseg.devices import resolve_device
from brainseg.errors import BrainsegError
from brainseg.train.distributed import Distributed

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass
class Runtime:
    """The processes (``dist``), the device and the autocast dtype (None: fp32)."""

    dist: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def amp_name(self) -> str:
        """bf16, fp16 or off."""
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names.get(self.amp_dtype, "off") if self.amp_dtype else "off"


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join torchrun's process group (if any), pick the device and precision, set torch flags."""
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
    return Runtime(dist, device, amp_dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """torch.autocast for bf16 / fp16, a no-op context for fp32."""
    if dtype is None:
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
    return _AMP_DTYPES[mode]


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX-BF16): there bf16 autocast is
    1.5-2x faster (docs/results.md); elsewhere oneDNN emulates bf16 and fp32 is safer."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None
