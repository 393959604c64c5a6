"""torchrun / DistributedDataParallel support: process group from the environment, samplers, reductions.

``torchrun --nproc_per_node=N [--nnodes=M --rdzv-endpoint=HOST:PORT] -m r2unet train ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT; a plain ``r2unet train`` is a world of one and needs no process group.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for a single process).

    NCCL on GPUs, gloo on CPUs. ``timeout_s`` bounds every collective: if a rank dies the others fail with an error
    after at most that long instead of hanging forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class EpochBatchSampler(Sampler[list[int]]):
    """Training batches of one process: a ``DistributedSampler`` (shuffled with ``seed + epoch``, sharded across
    processes; a world of one is the whole dataset) cut into batches, with ``set_epoch(epoch, skip)`` to resume in the
    middle of an epoch by skipping the batches already done."""

    def __init__(self, n: int, batch_size: int, info: DistInfo, seed: int, drop_last: bool = True):
        self.base = DistributedSampler(range(n), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                       seed=seed, drop_last=info.world_size > 1)
        self.batch_size = batch_size
        self.drop_last = drop_last and len(self.base) >= batch_size
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def _num_batches(self) -> int:
        n = len(self.base)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return max(0, self._num_batches() - self.skip)

    def __iter__(self):
        indices = list(self.base)
        for b in range(self.skip, self._num_batches()):
            yield indices[b * self.batch_size:(b + 1) * self.batch_size]


class ShardSampler(Sampler[int]):
    """Evaluation: process ``rank`` takes ``rank, rank + world, ...`` — disjoint shards with no padding, so summed
    metric counts equal those of a single-process evaluation exactly."""

    def __init__(self, n: int, info: DistInfo):
        self.indices = list(range(info.rank, n, info.world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
