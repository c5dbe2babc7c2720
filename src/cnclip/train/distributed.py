"""The process group and device a run uses: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK),
or a single process. NCCL on GPUs, gloo on CPUs (open_clip_train passes device_ids on CPU, so its
DDP cannot run there)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


class Runtime:
    """Process group and device: torchrun's environment, or a single process."""

    def __init__(self, device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.distributed = self.world_size > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def means(self, values: list[torch.Tensor]) -> list[float]:
        """Each scalar's mean over the processes: one all_reduce and one device sync for the list
        (the loop calls it only when it writes a log line)."""
        if not values:
            return []
        stacked = torch.stack([v.detach().float().reshape(()) for v in values])
        if self.distributed:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return stacked.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
