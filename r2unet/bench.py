"""Benchmarks: the data pipeline (``bench data``) and the training step (``bench train``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .data.augment import AugmentConfig
from .data.dataset import DeviceTransform, make_loader, split_cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(
    data_path: str | Path,
    image_size: int = 224,
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
    min_images: int = 2000,
    augmentation_prob: float = 0.4,
    log=print,
) -> dict:
    """Images/s of augmented training batches delivered on ``device`` from the cache (built first, timed apart)."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    cache = split_cache(data_path, "train", image_size, log=log)
    cache_build_s = time.perf_counter() - t0
    loader = make_loader(cache, batch_size, train=True, num_workers=num_workers, pin_memory=dev.type == "cuda",
                         drop_last=False)
    transform = DeviceTransform(image_size, dev, AugmentConfig(augmentation_prob=augmentation_prob))
    for batch in loader:  # warm-up: first touches of the memory map, worker start, kernels
        transform(batch)
        break
    _sync(dev)
    images, start = 0, time.perf_counter()
    while images < min_images:
        for batch in loader:
            x, y = transform(batch)
            images += x.shape[0]
    _sync(dev)
    elapsed = time.perf_counter() - start
    return {"img_per_s": images / elapsed, "cache_build_s": cache_build_s, "images": images, "seconds": elapsed,
            "device": str(dev), "image_size": image_size, "batch_size": batch_size, "num_workers": num_workers,
            "cached_images": len(cache), "torch": str(torch.__version__)}
