"""Reading images and masks, with every failure reported as a ``DataError`` naming the file and the problem.

Masks arrive in many encodings. ``read_mask`` normalises all of them to a boolean array:

- 1-bit PNG: as is.
- palette PNG and RGB(A): converted to RGB, the brightest channel is used (a red or white lesion on black are both
  foreground); alpha is ignored.
- the values are then thresholded at the midpoint of their encoding: masks whose values are all <= 1 (0/1 encoding,
  also float TIFFs in [0, 1]) at 0.5; values up to 255 (0/255, including JPEG-compressed masks whose values scatter
  near 0 and 255) at 127.5; larger values (16-bit 0/65535) at 32767.5.

Orientation: a photo's EXIF Orientation tag is applied (``oriented=True``, the default), so pixels are used as every
image viewer and annotation tool shows them; ``oriented=False`` gives the stored pixels. A mask may be drawn on either
frame; ``mask_frame`` decides which from the sizes alone, by one rule for every shape (see there).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..fileio import atomic_save_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


class DataError(ValueError):
    """A problem with the user's data: the message names the file and what is wrong."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # orientations whose display swaps width and height


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make the image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


# how to turn stored pixels into the shown photo, per EXIF orientation (the table PIL's exif_transpose uses)
_TO_SHOWN = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def orient_as_shown(array: np.ndarray, image_path: str | os.PathLike) -> np.ndarray:
    """``array`` (H, W[, C]), laid on the *stored* pixels of the photo at ``image_path``, turned the way the photo's
    EXIF orientation shows it (e.g. a mask drawn by a tool that ignored the tag). Unchanged for unturned photos."""
    try:
        with Image.open(image_path) as img:
            orientation = _orientation(img)
    except Image.DecompressionBombError as exc:
        raise DataError(_too_large(image_path, exc)) from None
    if orientation == 1:
        return array
    turned = np.asarray(Image.fromarray(array.astype(np.uint8)).transpose(_TO_SHOWN[orientation]))
    return turned.astype(array.dtype)


def _open(path: Path, draft_size: tuple[int, int] | None = None, oriented: bool = True) -> Image.Image:
    try:
        img = Image.open(path)
        if draft_size is not None and img.format == "JPEG":
            # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale directly: several times faster for big photos.
            img.draft("RGB", draft_size)
        img.load()  # force the full decode here so that truncated files fail now, with the file's name
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises OSError for truncated / corrupt data
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise DataError(_too_large(path, exc)) from None
    if oriented and (orientation := _orientation(img)) != 1:
        img = img.transpose(_TO_SHOWN[orientation])
    return img


def image_size(path: str | os.PathLike, oriented: bool = True) -> tuple[int, int]:
    """(width, height) from the header only, without decoding the pixels; as displayed unless ``oriented=False``."""
    w, h, orientation = _header(Path(path))
    return (h, w) if oriented and orientation in _TRANSPOSED else (w, h)


def mask_frame(image_path: str | os.PathLike, mask_size: tuple[int, int]) -> tuple[bool | None, bool]:
    """Which frame of the photo a mask of ``mask_size`` (w, h) was drawn on: (oriented, ambiguous).

    One rule for every shape, from the header sizes only: the photo as shown when the mask has its size (what
    viewers and annotation tools show), else the stored pixels when the mask has theirs; ``oriented`` None when it
    has neither. ``ambiguous``: the photo carries an EXIF orientation that leaves its size unchanged (flipped or
    turned 180 degrees, or a square photo turned 90), so a mask drawn on the stored pixels cannot be told apart; it
    is taken as drawn on the photo as shown. (Comparing aspect ratios instead took a near-square photo turned 90
    degrees, 400x398, for its unturned self.)"""
    w, h, orientation = _header(Path(image_path))
    stored, shown = (w, h), ((h, w) if orientation in _TRANSPOSED else (w, h))
    if tuple(mask_size) == shown:
        return True, orientation != 1 and shown == stored
    return (False if tuple(mask_size) == stored else None), False


def _header(path: Path) -> tuple[int, int, int]:
    """(stored width, stored height, EXIF orientation) from the header only."""
    try:
        with Image.open(path) as img:
            return (*img.size, _orientation(img))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise DataError(_too_large(path, exc)) from None


def _too_large(path, exc: Exception) -> str:
    return (f"{path}: too large to decode safely ({exc}); Pillow's limit is PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS} pixels (raise it in your own script only for files you trust)")


def read_image(path: str | os.PathLike, min_size: tuple[int, int] | None = None, oriented: bool = True) -> np.ndarray:
    """RGB uint8 array (H, W, 3). With ``min_size`` (w, h), a JPEG may be decoded at a reduced scale >= that size."""
    img = _open(Path(path), draft_size=min_size, oriented=oriented)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale: scale to 8 bits, not clip
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        gray = np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def mask_to_bool(values: np.ndarray) -> np.ndarray:
    """Binarise a decoded mask array (H, W) or (H, W, C) following the rules in the module docstring."""
    if values.dtype == bool:
        return values
    if values.ndim == 3:
        values = values[..., :3].max(axis=2)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 1:
        return values > 0.5
    if peak <= 255:
        return values > 127.5
    return values > 32767.5


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Boolean mask (H, W); see the module docstring for the accepted encodings."""
    path = Path(path)
    img = _open(path)
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    if img.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
        img = img.convert("RGB")
    try:
        values = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: mask pixel format {img.mode!r} not supported ({exc})") from None
    if values.ndim not in (2, 3):
        raise DataError(f"{path}: mask has unexpected shape {values.shape}")
    return mask_to_bool(values)


# Colours of classes 0, 1, 2, ... in label maps r2unet writes (palette PNGs) and in its pictures: background black,
# then colours that stay apart for colour-blind eyes too; more classes repeat the list.
CLASS_COLORS = ((0, 0, 0), (230, 25, 75), (0, 130, 200), (255, 225, 25), (60, 180, 75), (145, 30, 180),
                (70, 240, 240), (245, 130, 48), (240, 50, 230), (128, 128, 128))


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    return [CLASS_COLORS[k % len(CLASS_COLORS)] for k in range(num_classes)]


def read_label_map(path: str | os.PathLike, num_classes: int,
                   colors: list[tuple[int, int, int]] | None = None) -> np.ndarray:
    """Class labels (H, W) uint8 in 0..num_classes-1 from a label map: a palette PNG's indices, a grayscale image's
    values (8 or 16 bit), or, for an RGB(A) image, each pixel's colour looked up in ``colors`` (class k has colour
    ``colors[k]``). A value or colour outside the classes is a DataError naming the file and the value."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "1", "L", "I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(img).astype(np.int64)
        top = int(values.max()) if values.size else 0
        if top >= num_classes:
            raise DataError(f"{path}: label {top} outside the {num_classes} classes 0..{num_classes - 1} "
                            "(--num_classes counts the background too)")
        return values.astype(np.uint8)
    if colors is None:
        raise DataError(f"{path}: an RGB label map needs the colour of each class (--class_colors FILE)")
    rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: k for k, (r, g, b) in enumerate(colors[:num_classes])}
    found = np.unique(keys)
    unknown = [int(c) for c in found if int(c) not in table]
    if unknown:
        c = unknown[0]
        raise DataError(f"{path}: colour ({c >> 16}, {(c >> 8) & 255}, {c & 255}) is none of the {num_classes} "
                        f"classes' colours {[tuple(x) for x in colors[:num_classes]]}")
    labels = np.zeros(keys.shape, np.uint8)
    for c in found:  # one pass per colour present (a handful)
        labels[keys == c] = table[int(c)]
    return labels


def save_label_map(labels: np.ndarray, path: str | os.PathLike, num_classes: int,
                   colors: list[tuple[int, int, int]] | None = None) -> None:
    """A palette PNG whose indices are the classes and whose palette is ``colors`` (default ``class_colors``):
    viewers show the colours, ``read_label_map`` reads the classes back."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette([v for c in (colors or class_colors(num_classes)) for v in c])
    atomic_save_image(img, Path(path))
