"""Data pipeline: the reference's per-image loader vs r2unet's cache + batched augmentation, in one run.

The reference (LeeJunHyun/Image_Segmentation data_loader.py) decodes the full-size JPEG and PNG on every access and
runs PIL transforms image by image. This script re-creates that loading pattern with torchvision's PIL transforms
(resize to a 300-320 width, quarter and small rotations, centre crop, flips, colour jitter, resize, to-tensor,
normalise) and times it against ``r2unet bench data`` on the same prepared folder and machine.

    python benchmarks/data_pipeline.py --data_path DIR [--device cpu] [--seconds 20]

It needs torchvision, which r2unet does not: install the one built for your torch (on a CPU build:
pip install torchvision --index-url https://download.pytorch.org/whl/cpu).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from r2unet.commands.bench import bench_data
from r2unet.data.pairs import pair_files


def reference_style_item(image_path: Path, mask_path: Path, image_size: int = 224, p: float = 0.4):
    image = Image.open(image_path).convert("RGB")
    mask = Image.open(mask_path)
    aspect = image.size[1] / image.size[0]
    width = random.randint(300, 320)
    ops = [T.Resize((int(width * aspect), width))]
    if random.random() <= p:
        ops += [T.RandomRotation((90 * random.randint(0, 3),) * 2), T.RandomRotation((-10, 10)),
                T.CenterCrop((int(260 * aspect), 260))]
        op = T.Compose(ops)
        image, mask = op(image), op(mask)
        if random.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        if random.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_TOP_BOTTOM), mask.transpose(Image.FLIP_TOP_BOTTOM)
        image = T.ColorJitter(brightness=0.2, contrast=0.2, hue=0.02)(image)
        ops = []
    ops += [T.Resize((image_size, image_size)), T.ToTensor()]
    op = T.Compose(ops)
    x = T.Normalize((0.5,) * 3, (0.5,) * 3)(op(image))
    return x, op(mask)


def bench_reference_style(data_path: Path, seconds: float, batch_size: int = 16) -> float:
    pairs = pair_files(data_path / "train", data_path / "train_GT").pairs
    random.seed(0)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = [reference_style_item(p.image, p.mask) for p in random.sample(pairs, min(batch_size, len(pairs)))]
        torch.stack([b[0] for b in batch])
        images += len(batch)
    return images / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_path", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    sizes = [Image.open(p.image).size for p in pair_files(args.data_path / "train", args.data_path / "train_GT").pairs]
    mb = sum(p.stat().st_size for p in (args.data_path / "train").iterdir()) / len(sizes) / 1e6
    ref = bench_reference_style(args.data_path, args.seconds)
    ours = bench_data(args.data_path, device=args.device, log=lambda *_: None)
    print(json.dumps({"train_images": len(sizes), "mean_jpeg_MB": round(mb, 2),
                      "max_side": max(max(s) for s in sizes), "torch_threads": torch.get_num_threads(),
                      "reference_style_img_per_s": round(ref, 1), "r2unet_img_per_s": round(ours["img_per_s"], 1),
                      "r2unet_cache_build_s": round(ours["cache_build_s"], 2),
                      "speedup": round(ours["img_per_s"] / ref, 1)}, indent=1))


if __name__ == "__main__":
    main()
