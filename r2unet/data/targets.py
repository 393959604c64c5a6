"""What a mask file holds and how the cache keeps it: binary masks (one foreground) or label maps (a class per
pixel). Everything at the data level that differs between the two is here; ``engine.task`` builds the rest of a task
(loss, scores, pictures) on top. ``targets_for`` is the one place that tells them apart by the class count.

Label maps may mark pixels of no class with ``IGNORE`` (255, the common convention for unlabelled or border pixels):
read and cached like a class, then left out of the loss and of every score (``engine.task``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .imageio import label_map_image, label_maps_among, read_label_map, read_mask

IGNORE = 255  # in a label map: a pixel of no class


@dataclass(frozen=True)
class BinaryMasks:
    """One foreground: any mask encoding (``imageio.read_mask``), cached as 0/1, shrunk by majority vote."""

    classes = 1
    nearest = False  # augmentation samples the mask bilinearly and thresholds it

    def read(self, path, notes: list[str] | None = None) -> np.ndarray:
        """The mask (H, W) as bool; a mask that holds class labels is a ``NotBinaryMask``."""
        return read_mask(path)

    def shrink(self, mask: np.ndarray, side: int) -> np.ndarray:
        """The mask at the cache's size (side x side) uint8 0/1: the majority of the pixels each one covers."""
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.BOX)) >= 128
        return small.astype(np.uint8)

    def picture(self, mask: np.ndarray) -> Image.Image:
        """How a mask file is written: 0/255 grayscale."""
        return Image.fromarray(mask.astype(np.uint8) * 255)

    def check(self, masks: list[Path], meta: dict | None = None) -> None:
        """Stop a set of label maps from being read as binary masks (their classes would vanish or merge): a sample
        of ``masks`` is read, unless ``meta`` says a cache build already read them all."""
        if meta is not None and meta.get("masks_checked"):
            return
        if (found := label_maps_among(masks)) is not None:
            raise found

    def cache_name(self, base: str) -> str:
        return base  # binary caches keep the names they always had

    def meta(self) -> dict:
        return {"masks_checked": True}  # each row was read by read_mask, which refuses label maps

    def matches(self, meta: dict) -> bool:
        return meta.get("classes", 1) == 1


@dataclass(frozen=True)
class LabelMaps:
    """``classes`` classes (0 the background): palette indices, grey values or RGB colours looked up in ``colors``
    (``imageio.read_label_map``), cached as class indices, shrunk by nearest neighbour (a class is never blended into
    another). ``IGNORE`` marks pixels of no class."""

    classes: int
    colors: tuple[tuple[int, int, int], ...] | None = None
    nearest = True

    def read(self, path, notes: list[str] | None = None) -> np.ndarray:
        return read_label_map(path, self.classes, list(self.colors) if self.colors else None, notes=notes,
                              ignore=IGNORE)

    def shrink(self, labels: np.ndarray, side: int) -> np.ndarray:
        return np.asarray(Image.fromarray(labels).resize((side, side), Image.NEAREST))

    def picture(self, labels: np.ndarray) -> Image.Image:
        return label_map_image(labels, self.classes, list(self.colors) if self.colors else None)

    def check(self, masks: list[Path], meta: dict | None = None) -> None:
        pass  # every value is checked as it is read

    def cache_name(self, base: str) -> str:
        return f"{base}-{self.classes}classes"

    def meta(self) -> dict:
        return {"classes": self.classes}

    def matches(self, meta: dict) -> bool:
        return meta.get("classes", 1) == self.classes


Targets = BinaryMasks | LabelMaps
BINARY = BinaryMasks()


def check_classes(num_classes: int) -> None:
    """The class counts r2unet can hold: 1 (binary) or 2..255 (label maps are stored as uint8)."""
    if not 1 <= num_classes <= 255:
        raise ConfigError(f"--num_classes: must be 1 (binary) or 2..255 classes, got {num_classes}")


def targets_for(num_classes: int, colors=None) -> Targets:
    """Binary masks for one class (the reference's task), label maps of ``num_classes`` classes else."""
    check_classes(num_classes)
    if num_classes == 1:
        return BINARY
    return LabelMaps(num_classes, tuple(tuple(c) for c in colors) if colors else None)


