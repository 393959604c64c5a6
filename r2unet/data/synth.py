"""Synthetic dermoscopy-like images with lesion masks, in the raw ISIC 2018 Task 1 layout.

Each image is skin-coloured, textured background with an irregular lesion (varied size, colour, contrast and border
sharpness), sometimes hairs and vignetting, at varied sizes and aspect ratios. Deterministic for a given seed.
Used by the demo and the tests; lesions of low contrast make the task non-trivial. With ``num_classes`` 3, a second
structure, the lesion's dark core, is class 2 (the lesion's rim class 1), written as palette PNG label maps.

``hard``: what real dermoscopy photos also carry, drawn over the same images (from random numbers of their own):
dense hair, ruler marks along an edge, the dark corners outside the dermoscope's round field, small dark satellite
blobs on the skin that are not the lesion, and pale regression areas inside the lesion that are. They are where a
network makes small false regions and holes, which postprocessing (``engine.postprocess``) can remove.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ..fileio import atomic_save_image
from .imageio import DataError
from .targets import targets_for

IMAGE_DIR = "ISIC2018_Task1-2_Training_Input"
MASK_DIR = "ISIC2018_Task1_Training_GroundTruth"
_ASPECTS = (4 / 3, 3 / 2, 1.0, 3 / 4, 16 / 9)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of shape (h, w): random values on a coarse grid, bicubically upsampled."""
    coarse = rng.uniform(-1, 1, size=(cells, max(2, round(cells * w / h)))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC)).clip(-1, 1)


def synth_pair(rng: np.random.Generator, width: int, height: int, with_core: bool = False,
               hard: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (H, W, 3), mask bool (H, W)) pair; ``with_core``: the mask is a label map (H, W) uint8:
    1 the lesion, 2 its dark core (drawn without drawing more random numbers: the image and lesion of a seed are
    those of the binary set, but for the core). ``hard``: a generator for the artifacts of the harder set
    (``_artifacts``), drawn over the image at the end; the mask stays the same."""
    h, w = height, width
    skin = rng.uniform(175, 240) * np.array([1.0, 0.78, 0.66]) * rng.uniform(0.94, 1.06, 3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = skin
    img += 18 * _smooth_noise(rng, h, w, 6)[..., None]
    img += 6 * _smooth_noise(rng, h, w, 40)[..., None] * rng.uniform(0.5, 1.5, 3)

    # Irregular lesion: a radius that varies with angle (a few random harmonics), then slightly blurred edges.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    base_r = rng.uniform(0.12, 0.38) * min(h, w)
    angle = np.arctan2(yy - cy, (xx - cx) * rng.uniform(0.7, 1.3))
    radius = np.full_like(angle, base_r)
    for k in range(2, 7):
        radius += base_r * rng.uniform(0, 0.22 / k * 2) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    radius *= 1 + 0.06 * _smooth_noise(rng, h, w, 12)
    dist = np.hypot(yy - cy, xx - cx)
    mask = dist < radius

    contrast = rng.choice([0.25, 0.45, 0.7, 0.9])  # some lesions are faint
    lesion = rng.uniform(55, 150) * np.array([1.0, rng.uniform(0.55, 0.72), rng.uniform(0.45, 0.62)])
    texture = 0.7 + 0.3 * _smooth_noise(rng, h, w, 25)[..., None]
    edge = rng.uniform(0.01, 0.08) * base_r  # soft or sharp border
    weight = np.clip((radius - dist) / edge + 0.5, 0, 1)[..., None] * contrast
    img = img * (1 - weight) + lesion * texture * weight
    core = dist < radius * 0.5 if with_core else None
    if core is not None:
        img[core] *= 0.55
    if rng.random() < 0.5:  # darker blotches inside the lesion
        blot = (_smooth_noise(rng, h, w, 10) > 0.4) & mask
        img[blot] *= rng.uniform(0.6, 0.85)

    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.35:  # hairs
        draw = ImageDraw.Draw(pil)
        for _ in range(rng.integers(3, 15)):
            pts = [(rng.uniform(0, w), rng.uniform(0, h))]
            for _ in range(4):
                pts.append((pts[-1][0] + rng.uniform(-0.15, 0.15) * w, pts[-1][1] + rng.uniform(-0.15, 0.15) * h))
            draw.line(pts, fill=tuple(int(v) for v in rng.uniform(20, 70, 3)), width=max(1, round(min(h, w) / 250)))
    pil = pil.filter(ImageFilter.GaussianBlur(radius=min(h, w) / 400))
    img = np.asarray(pil).astype(np.float32)
    if rng.random() < 0.4:  # vignetting of the dermoscope
        r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
        img *= np.clip(1.25 - 0.55 * r**2, 0.15, 1)[..., None]
    img += rng.normal(0, 3, img.shape)
    if hard is not None:
        img = _artifacts(hard, img, mask, lesion, yy, xx)
    if core is not None:
        mask = mask.astype(np.uint8) + (core & mask).astype(np.uint8)
    return img.clip(0, 255).astype(np.uint8), mask


def _artifacts(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, lesion: np.ndarray, yy: np.ndarray,
               xx: np.ndarray) -> np.ndarray:
    """The harder set's artifacts over ``img`` (H, W, 3) float: satellite blobs of the lesion's colour on the skin
    (outside ``mask``), pale regression areas inside the lesion, dense dark hair, ruler marks along an edge, and
    dark corners outside the dermoscope's field."""
    h, w = mask.shape
    side = min(h, w)
    for _ in range(rng.integers(2, 7)):  # satellites: small, dark, round-ish, on the skin only
        for _attempt in range(20):
            cy, cx = rng.uniform(0.05, 0.95) * h, rng.uniform(0.05, 0.95) * w
            r = rng.uniform(0.012, 0.035) * side
            blob = np.hypot(yy - cy, xx - cx) < r * (1 + 0.25 * np.cos(3 * np.arctan2(yy - cy, xx - cx)
                                                                        + rng.uniform(0, 6.3)))
            if not (blob & mask).any() and not (np.hypot(yy - cy, xx - cx) < r * 3)[mask].any():
                img[blob] = img[blob] * 0.35 + lesion * rng.uniform(0.55, 0.8) * 0.65
                break
    inside = np.flatnonzero(mask.ravel())
    for _ in range(rng.integers(0, 3) if inside.size else 0):  # regression: pale patches that are lesion
        y, x = divmod(int(inside[rng.integers(inside.size)]), w)
        r = rng.uniform(0.02, 0.06) * side
        patch = (np.hypot(yy - y, xx - x) < r) & mask
        img[patch] = img[patch] * 0.3 + np.array([225.0, 200, 190]) * 0.7
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(8, 25)):  # hair: dense, dark, curved
        pts = [(rng.uniform(0, w), rng.uniform(0, h))]
        for _ in range(6):
            pts.append((pts[-1][0] + rng.uniform(-0.12, 0.12) * w, pts[-1][1] + rng.uniform(-0.12, 0.12) * h))
        draw.line(pts, fill=tuple(int(v) for v in rng.uniform(10, 50, 3)), width=max(1, round(side / 180)))
    if rng.random() < 0.6:  # a ruler along the bottom or the top edge: a bar with ticks
        y0 = rng.uniform(0.03, 0.08) * h if rng.random() < 0.5 else h - rng.uniform(0.05, 0.1) * h
        step, length = rng.uniform(0.02, 0.04) * w, rng.uniform(0.3, 0.8) * w
        x0 = rng.uniform(0, w - length)
        ink = tuple(int(v) for v in rng.uniform(15, 60, 3))
        draw.line([(x0, y0), (x0 + length, y0)], fill=ink, width=max(1, round(side / 250)))
        for k in range(int(length / step) + 1):
            tick = side * (0.035 if k % 5 == 0 else 0.018)
            draw.line([(x0 + k * step, y0), (x0 + k * step, y0 + tick)], fill=ink, width=max(1, round(side / 300)))
    img = np.asarray(pil).astype(np.float32)
    if rng.random() < 0.7:  # the dermoscope's round field: dark corners
        r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
        edge = rng.uniform(0.95, 1.2)
        img *= np.clip((edge - r) / 0.06, 0.04, 1)[..., None]
    return img


MIN_SIDE = 32  # the smallest longer side synth draws


def _name(seed: int, i: int) -> str:
    return f"ISIC_{seed % 100 * 100000 + i:07d}"


def generate_dataset(
    output: str | Path, num_images: int = 100, seed: int = 0, max_side: int = 2400, progress: bool = False,
    overwrite: bool = False, num_classes: int = 1, hard: bool = False,
) -> Path:
    """Write ``num_images`` pairs under ``output`` in the raw ISIC layout; return ``output``.

    Sizes vary from 256 px up to ``max_side`` on the longer side (about one image in eight is large). The files
    have the real dataset's names, so existing files of those names are refused (named) unless ``overwrite``.
    ``hard``: the same images with the artifacts of real photos drawn over them (``synth_pair``).
    """
    output = Path(output)
    if num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {num_images}")
    if num_classes not in (1, 3):
        raise ValueError(f"--num_classes: synth makes binary masks (1) or three classes (3), got {num_classes}")
    if max_side < MIN_SIDE:
        raise ValueError(f"--max_side must be >= {MIN_SIDE} pixels, got {max_side}")
    img_dir, mask_dir = output / IMAGE_DIR, output / MASK_DIR
    names = [_name(seed, i) for i in range(num_images)]
    existing = [p for n in names for p in (img_dir / f"{n}.jpg", mask_dir / f"{n}_segmentation.png") if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{output}: {len(existing)} file(s) synth would write already exist ("
                        + ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
                        + "); nothing was written. Choose another --output, or pass --overwrite to replace them")
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    targets, with_core = targets_for(num_classes), num_classes == 3  # synth's sets: the third class is the core
    items = range(num_images)
    if progress:
        items = tqdm(items, desc="synth", unit="img")
    for i in items:
        rng = np.random.default_rng([seed, i])
        if rng.random() < 0.125 and max_side > 640:  # now and then a big photo, as in ISIC
            long_side = int(rng.integers(max(641, max_side // 2), max_side + 1))
        else:
            long_side = int(rng.integers(min(256, max_side // 2), min(640, max_side) + 1))
        aspect = _ASPECTS[rng.integers(len(_ASPECTS))]
        w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        image, mask = synth_pair(rng, w, h, with_core, np.random.default_rng([seed, i, 1]) if hard else None)
        name = names[i]
        atomic_save_image(Image.fromarray(image), img_dir / f"{name}.jpg", quality=90)
        atomic_save_image(targets.picture(mask), mask_dir / f"{name}_segmentation.png")
    return output
