"""torchrun's process group as one small object: rank, world size, all-reduce, broadcast.

A single process is a world of one: every method is then a no-op, so the loop has no
``if distributed`` branches.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


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

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world <= 1:
            return t
        import torch.distributed as td

        buf = t.to(self.device if self.device.type == "cuda" else torch.device("cpu"))
        td.all_reduce(buf, op=td.ReduceOp.SUM)
        return buf.cpu()

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        t = self.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
        return tuple(float(v) for v in t)

    def any_flags(self, *flags: bool) -> tuple[bool, ...]:
        """Logical OR of each flag over all ranks (so every rank stops at the same step)."""
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
