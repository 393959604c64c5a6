"""Batches of uint8 arrays straight from the memory-mapped cache, and the device-side transform that finishes them.

A ``CachedBatches`` dataset returns a whole batch per index list (one fancy-index gather from the memory map), so a
``DataLoader`` with a ``BatchSampler`` moves ready batches through pinned memory with no per-image Python work.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from .augment import AugmentConfig, eval_batch, train_batch
from .cache import SplitCache


class CachedBatches(Dataset):
    """``dataset[list_of_indices]`` -> dict(images (B, S, S, 3) uint8, masks (B, S, S) uint8, aspect (B,), index)."""

    def __init__(self, cache: SplitCache):
        self.cache = cache
        self.aspect = torch.from_numpy(cache.aspect.astype(np.float32))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.sort(np.asarray(indices, dtype=np.int64))  # sorted reads are sequential on disk
        images, masks = self.cache.batch(idx)
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images)),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
            "aspect": self.aspect[idx],
            "index": torch.from_numpy(idx),
        }


def make_loader(
    cache: SplitCache,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
    batch_sampler: Sampler | None = None,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader yielding uint8 batches. ``sampler`` (e.g. a shard of the split) replaces the default sampler;
    ``batch_sampler`` (yielding lists of indices) replaces both sampler and batching."""
    dataset = CachedBatches(cache)
    if batch_sampler is None:
        if sampler is None:
            if train:
                sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
            else:
                sampler = SequentialSampler(dataset)
        drop_last = train and len(dataset) >= batch_size if drop_last is None else drop_last
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class DeviceTransform:
    """Moves a uint8 batch to the device (non-blocking from pinned memory) and finishes it there."""

    def __init__(self, image_size: int, device: torch.device, augment: AugmentConfig | None, seed: int = 0,
                 img_ch: int = 3, labels: bool = False):
        self.image_size, self.device, self.augment, self.img_ch = image_size, device, augment, img_ch
        self.labels = labels  # masks are label maps of several classes
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        masks = batch["masks"].to(self.device, non_blocking=True)
        if self.augment is not None:
            x, y = train_batch(images, masks, batch["aspect"], self.image_size, self.augment, self.generator,
                               self.labels)
        else:
            x, y = eval_batch(images, masks, self.image_size, self.labels)
        if self.img_ch == 1:
            x = x.mean(1, keepdim=True)
        elif self.img_ch != 3:
            raise ValueError(f"img_ch must be 1 or 3 for RGB data, got {self.img_ch}")
        return x, y
