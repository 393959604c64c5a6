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


def in_group() -> bool:
    """This process has joined a process group (torchrun with more than one process)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The processes of the group this process joined (1 outside one)."""
    return dist.get_world_size() if in_group() else 1


def cleanup() -> None:
    if in_group():
        dist.destroy_process_group()


def barrier() -> None:
    if in_group():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if in_group():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if in_group():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Process ``src``'s ``obj`` (picklable) on every process; ``obj`` itself when alone."""
    if in_group() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]
    return obj


def gather_lists(items: list) -> list:
    """The concatenation of every process's ``items`` (small, picklable), in rank order; ``items`` when alone."""
    if in_group() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]
    return items


def broadcast_module(module: torch.nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Every process takes process ``src``'s weights and buffers: e.g. the best checkpoint, which only ``src`` may be
    able to read when the nodes do not share a file system. ``buffers_only``: the batch-norm running statistics
    alone, which without SyncBatchNorm drift apart within an epoch (DDP keeps the weights equal); scoring a sharded
    split with rank 0's everywhere makes the score that of the checkpoint rank 0 saves."""
    if in_group():
        for tensor in module.buffers() if buffers_only else module.state_dict().values():
            dist.broadcast(tensor, src)


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """SyncBatchNorm for CPU process groups (gloo), where ``torch.nn.SyncBatchNorm`` refuses to run.

    Training-mode statistics are computed over the batches of all processes: per-channel sum, sum of squares and
    count are summed with a differentiable all-reduce, so the backward pass also sums the statistics' gradients
    across processes — the same semantics as ``torch.nn.SyncBatchNorm`` on GPUs. Same parameters and buffers as
    ``BatchNorm2d``, so state_dicts are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and in_group() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat((x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count)))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)  # biased, for normalisation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(module: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """BatchNorm -> synchronised BatchNorm: torch's on GPUs, ``GlooSyncBatchNorm`` on CPUs."""
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device_type)
    return module
