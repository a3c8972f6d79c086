"""The one device rule: which torch device a name such as ``auto`` or ``cuda:1`` means.

Used by train, predict and ``load_checkpoint`` so that ``auto`` means the same everywhere.
The name check needs no torch (config validation runs before torch is imported).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from brainseg.errors import BrainsegError

if TYPE_CHECKING:
    import torch

#: The device names every ``--device`` option accepts.
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def check_device_name(device: str) -> None:
    """Refuse device strings other than auto, cpu, cuda, cuda:N and mps (no torch import)."""
    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", str(device)):
        raise BrainsegError(f"unknown device {device!r}", hint=f"choose {DEVICE_HELP}")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda:LOCAL_RANK, else mps, else cpu; an unavailable device is refused."""
    import torch

    name = str(name or "auto").lower()
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BrainsegError(
                f"device {name} requested but CUDA is not available",
                hint="use --device auto or --device cpu",
            )
        index = int(name.split(":")[1]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise BrainsegError(
                f"device {name} does not exist: {torch.cuda.device_count()} CUDA device(s)",
                hint="use --device cuda:0 or --device auto",
            )
        return torch.device("cuda", index)
    if name == "mps" and not _mps_available():
        raise BrainsegError(
            "device mps requested but it is not available", hint="use --device auto or --device cpu"
        )
    return torch.device(name)
