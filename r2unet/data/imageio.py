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

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..fileio import atomic_save_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


class InMemory:
    """An image file's bytes under its name (an upload): read by every function here as a file would be, from
    memory; messages name it by ``name``."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data

    def __str__(self) -> str:
        return self.name

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    def stream(self):
        return io.BytesIO(self.data)


def _source(path) -> Path | InMemory:
    return path if isinstance(path, InMemory) else Path(path)


def _pil_open(path: Path | InMemory) -> Image.Image:
    return Image.open(path.stream() if isinstance(path, InMemory) else path)


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # orientations whose display swaps width and height


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation from the file's header. A PNG's eXIf chunk is read only where it precedes the pixels
    (where the PNG specification puts it): Pillow's ``getexif`` would decode the whole image to look after them,
    0.9 s for a 12-megapixel PNG in a size check meant to read a header."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make the image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


MAX_PIXELS_ENV = "R2UNET_MAX_PIXELS"
# r2unet refuses images over ``max_pixels`` itself, from the header; Pillow's warning at open would only repeat it
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def max_pixels() -> int:
    """The largest image (width x height) r2unet decodes: ``R2UNET_MAX_PIXELS`` (``--max_pixels`` sets it), else
    Pillow's ``Image.MAX_IMAGE_PIXELS`` (89.5 MP). One limit for every command: Pillow itself only warns between
    one and two times its limit, and a small PNG can declare 144 MP (3 GB and 14 s to decode)."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else int(Image.MAX_IMAGE_PIXELS or 2**62)


def set_max_pixels(limit: int | None) -> None:
    """``--max_pixels``: the limit for this process and the decoding processes it starts (an environment
    variable, which they inherit however they are started)."""
    if limit is None:
        return
    if limit < 1:
        raise ValueError(f"--max_pixels: must be >= 1, got {limit}")
    os.environ[MAX_PIXELS_ENV] = str(limit)
    _raise_pillow_limit()


def _raise_pillow_limit() -> None:
    """A limit raised above Pillow's raises Pillow's too, which would otherwise refuse the image at open."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels() > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels()


_raise_pillow_limit()  # in a decoding process started with the variable set


def _check_pixels(img: Image.Image, path) -> None:
    """Refuse an image over ``max_pixels`` from its header, before any pixel is decoded."""
    limit = max_pixels()
    w, h = img.size
    if w * h > limit:
        raise DataError(f"{path}: too large to decode safely: {w}x{h} = {w * h:,} pixels, over the limit of "
                        f"{limit:,} ({MAX_PIXELS_ENV} or --max_pixels raises it; only for files you trust)")


# how to turn stored pixels into the shown photo, per EXIF orientation (the table PIL's exif_transpose uses)
_TO_SHOWN = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def orient_as_shown(array: np.ndarray, image_path: str | os.PathLike) -> np.ndarray:
    """``array`` (H, W[, C]), laid on the *stored* pixels of the photo at ``image_path``, turned the way the photo's
    EXIF orientation shows it (e.g. a mask drawn by a tool that ignored the tag). Unchanged for unturned photos."""
    try:
        with _pil_open(_source(image_path)) as img:
            _check_pixels(img, image_path)
            orientation = _orientation(img)
    except Image.DecompressionBombError as exc:
        raise DataError(_too_large(image_path, exc)) from None
    if orientation == 1:
        return array
    turned = np.asarray(Image.fromarray(array.astype(np.uint8)).transpose(_TO_SHOWN[orientation]))
    return turned.astype(array.dtype)


def _open(path: Path, draft_size: tuple[int, int] | None = None, oriented: bool = True) -> Image.Image:
    try:
        img = _pil_open(path)
        _check_pixels(img, path)
        orientation = _orientation(img) if oriented else 1  # from the header, as ``image_size`` reads it
        if draft_size is not None and img.format == "JPEG":
            # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale directly: several times faster for big photos.
            img.draft("RGB", draft_size)
        img.load()  # force the full decode here so that truncated files fail now, with the file's name
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises OSError for truncated / corrupt data
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise DataError(_too_large(path, exc)) from None
    if orientation != 1:
        img = img.transpose(_TO_SHOWN[orientation])
    return img


def image_size(path: str | os.PathLike, oriented: bool = True) -> tuple[int, int]:
    """(width, height) from the header only, without decoding the pixels; as displayed unless ``oriented=False``."""
    w, h, orientation = _header(_source(path))
    return (h, w) if oriented and orientation in _TRANSPOSED else (w, h)


def mask_frame(image_path: str | os.PathLike, mask_size: tuple[int, int]) -> tuple[bool | None, bool]:
    """Which frame of the photo a mask of ``mask_size`` (w, h) was drawn on: (oriented, ambiguous).

    One rule for every shape, from the header sizes only: the photo as shown when the mask has its size (what
    viewers and annotation tools show), else the stored pixels when the mask has theirs; ``oriented`` None when it
    has neither. ``ambiguous``: the photo carries an EXIF orientation that leaves its size unchanged (flipped or
    turned 180 degrees, or a square photo turned 90), so a mask drawn on the stored pixels cannot be told apart; it
    is taken as drawn on the photo as shown. (Comparing aspect ratios instead took a near-square photo turned 90
    degrees, 400x398, for its unturned self.)"""
    w, h, orientation = _header(_source(image_path))
    stored, shown = (w, h), ((h, w) if orientation in _TRANSPOSED else (w, h))
    if tuple(mask_size) == shown:
        return True, orientation != 1 and shown == stored
    return (False if tuple(mask_size) == stored else None), False


def _header(path: Path) -> tuple[int, int, int]:
    """(stored width, stored height, EXIF orientation) from the header only."""
    try:
        with _pil_open(path) as img:
            _check_pixels(img, path)
            return (*img.size, _orientation(img))
    except DataError:
        raise
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
    img = _open(_source(path), draft_size=min_size, oriented=oriented)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale: scale to 8 bits, not clip
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        gray = np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img)  # a copy: an array over Pillow's buffer is read-only (torch.from_numpy warns on it)


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


def looks_like_mask(path: str | os.PathLike) -> bool:
    """Whether an image reads as a binary mask rather than a photo: gray (its channels agree) and nearly every
    pixel at one of the two ends of its range (a JPEG-compressed mask scatters a little near its edges). Decoded
    at a reduced scale where the format allows; an unreadable file is not a mask."""
    try:
        values = np.asarray(_open(_source(path), draft_size=(256, 256), oriented=False).convert("RGB"), dtype=np.int16)
    except DataError:
        return False
    if values.size == 0 or np.abs(values[..., 0] - values[..., 1]).mean() + np.abs(values[..., 1] - values[..., 2]
                                                                                  ).mean() > 4:
        return False
    gray = values[..., 0]
    top = 1 if gray.max() <= 1 else 255
    middle = (gray > 0.1 * top) & (gray < 0.9 * top)
    return float(middle.mean()) < 0.03


class NotBinaryMask(DataError):
    """A mask that holds class labels, not one foreground: ``classes`` how many it looks like, ``found`` what was
    seen (values or colours), ``colors`` the colours of an RGB label map (a ``--class_colors`` value), else None."""

    def __init__(self, path, classes: int, found: str, colors: list | None = None):
        self.path, self.classes, self.found, self.colors = str(path), classes, found, colors
        super().__init__(f"{path}: not a binary mask: {found}; it looks like a label map of {classes} classes. "
                         + label_map_advice(classes, colors))

    def __reduce__(self):  # crosses from a decoding worker to the cache builder intact
        return NotBinaryMask, (self.path, self.classes, self.found, self.colors)


class LabelMapsFound(DataError):
    """Masks of a set read as binary that hold class labels: ``classes`` the most any of them looks like, ``colors``
    the colours of RGB label maps (or None), ``examples`` the ``NotBinaryMask`` of each found."""

    def __init__(self, examples: list[NotBinaryMask], checked: int):
        self.examples, self.checked = examples, checked
        widest = max(examples, key=lambda e: e.classes)
        self.classes, self.colors = widest.classes, widest.colors
        names = ", ".join(Path(e.path).name for e in examples[:5]) + (" ..." if len(examples) > 5 else "")
        super().__init__(f"{len(examples)} of {checked} mask(s) checked are label maps, not binary masks ({names}); "
                         f"e.g. {widest.path}: {widest.found}. They look like {self.classes} classes. "
                         + label_map_advice(self.classes, self.colors))


def label_maps_among(masks: list[Path], found: list[NotBinaryMask] | None = None,
                     limit: int = 24) -> LabelMapsFound | None:
    """Read up to ``limit`` of ``masks`` (spread over the list) as binary masks: a ``LabelMapsFound`` naming those
    that hold class labels (with ``found``, those already met), else None. Unreadable files are left to the checks
    that name them."""
    found = list(found or [])
    seen = {e.path for e in found}
    picks = range(len(masks)) if len(masks) <= limit else \
        sorted({round(i * (len(masks) - 1) / (limit - 1)) for i in range(limit)})
    checked = 0
    for i in picks:
        if str(masks[i]) in seen:
            continue
        checked += 1
        try:
            read_mask(masks[i])
        except NotBinaryMask as exc:
            found.append(exc)
        except DataError:
            pass
    return LabelMapsFound(found, checked + len(seen)) if found else None


def label_map_advice(classes: int, colors: list | None) -> str:
    """What to type for a label-map dataset: the flags that read it, for prepare and train."""
    flags = f"--num_classes {classes}"
    if colors is not None:
        flags += f" --class_colors '{json.dumps(colors, separators=(',', ':'))}'"
    return (f"Pass {flags} to prepare and train" + (" (check the colours' order: the background's first)"
                                                      if colors is not None else "")
            + ". If these are binary masks, save them with one value for the background and one for the foreground "
              "(0/255 or 0/1)")


LABEL_VALUE_MAX = 32  # masks whose values are all small integers, one of them above 1, hold class indices
_PLATEAU_SHARE, _PLATEAU_MIN, _NOISE_DISTANCE = 0.005, 32, 48


def _interior(values: np.ndarray, max_pixels: int = 2**20) -> tuple[np.ndarray, int]:
    """(keys, weight): the values of ``values`` (H, W) or colours of (H, W, 3) as integer keys, at the pixels whose
    four neighbours hold the same, on every k-th row (at most ``max_pixels`` looked at; each stands for ``weight``
    pixels): the inside of regions. A class is a region; JPEG noise and the soft edge of a resized mask are lines a
    pixel or two wide, with no inside."""
    h, w = values.shape[:2]
    if h < 3 or w < 3:
        return _keys(values).ravel(), 1
    step = max(1, (h - 2) * (w - 2) // max_pixels)
    rows = np.arange(1, h - 1, step)
    above, mid, below = _keys(values[rows - 1]), _keys(values[rows]), _keys(values[rows + 1])
    centre = mid[:, 1:-1]
    same = (centre == above[:, 1:-1]) & (centre == below[:, 1:-1]) & (centre == mid[:, :-2]) & (centre == mid[:, 2:])
    return centre[same], step


def _keys(values: np.ndarray) -> np.ndarray:
    if values.ndim == 2:
        return values.astype(np.int64, copy=False)
    v = values.astype(np.int64)
    return (v[..., 0] << 16) | (v[..., 1] << 8) | v[..., 2]


def _plateaus(keys: np.ndarray, weight: int, to_levels, n: int) -> list[int]:
    """The keys (values, or colours as r << 16 | g << 8 | b) that fill a real part of a mask: the inside of regions
    covering >= 0.5 % of its n pixels and >= 32 pixels, each farther than 48 levels (``to_levels``: key -> levels
    on the 8-bit scale) from a larger one, so JPEG noise around a value is that value. Largest first."""
    values, counts = np.unique(keys, return_counts=True)
    found: list[tuple[int, np.ndarray]] = []
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] * weight < max(_PLATEAU_SHARE * n, _PLATEAU_MIN):
            break
        levels = np.asarray(to_levels(int(values[i])), np.float64)
        if all(np.abs(levels - f).max() > _NOISE_DISTANCE for _, f in found):
            found.append((int(values[i]), levels))
    return [k for k, _ in found]


def _rgb(key: int) -> tuple[int, int, int]:
    return key >> 16, (key >> 8) & 255, key & 255


def label_map_found(img: Image.Image) -> tuple[int, str, list | None] | None:
    """None for a binary mask as datasets store them: 0/255, 0/1, 1-bit, 16-bit, float, one colour on black, a
    palette of two colours, JPEG noise or soft edges around two values. Else (the classes it looks like, what was
    found, an RGB label map's colours or None): small integers above 1 (class indices), a palette with more than two
    colours in use, or more than two grey levels or colours that each fill part of the mask."""
    if img.mode in ("1", "F"):
        return None
    if img.mode == "P":
        return _palette_labels(img)
    if img.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
        return _gray_labels(np.asarray(img), img.histogram() if img.mode == "L" else None)
    rgb = np.asarray(img.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return _gray_labels(rgb[..., 0])
    found = _plateaus(*_interior(rgb), _rgb, rgb.shape[0] * rgb.shape[1])
    if len(found) <= 2:
        return None
    colors = sorted((_rgb(k) for k in found), key=lambda c: sum(c) > 0)  # black, the usual background, first
    return (len(found), "RGB colours " + ", ".join(str(c) for c in colors[:8]) + " each fill part of it",
            [list(c) for c in colors])


def _palette_labels(img: Image.Image) -> tuple[int, str, None] | None:
    counts = np.asarray(img.histogram()[:256])  # indices in use, counted in C
    used = np.flatnonzero(counts)
    palette = np.zeros(768, np.int64)
    raw = img.getpalette() or []
    palette[:len(raw)] = raw[:768]
    palette = palette.reshape(256, 3)
    if len({tuple(palette[i]) for i in used}) <= 2:
        return None
    shown = ", ".join(f"{i} {tuple(int(v) for v in palette[i])}" for i in used[:8])
    return (int(used.max()) + 1, f"a palette image with {len(used)} indices in use ({shown}"
            + (" ..." if len(used) > 8 else "") + ")", None)


def _gray_labels(values: np.ndarray, histogram: list[int] | None = None) -> tuple[int, str, None] | None:
    if values.size == 0:
        return None
    if values.dtype == np.uint8:  # the common case: counted in one pass, and two values end it (0/255, 0/1)
        counts = np.asarray(histogram) if histogram is not None else np.bincount(values.ravel(), minlength=256)
    elif values.min() < 0 or values.max() >= 2**17:
        return None
    else:
        counts = np.bincount(values.ravel().astype(np.int64))
    present = np.flatnonzero(counts).tolist()
    top = present[-1]
    if top <= 1 or (len(present) <= 2 and top > LABEL_VALUE_MAX):
        return None
    classes = [v for v in present if v != 255]  # 255: a label map's pixels of no class
    if classes and classes[-1] <= LABEL_VALUE_MAX and (classes[-1] > 1 or len(classes) < len(present)):
        return (max(2, classes[-1] + 1), "grey values " + ", ".join(str(v) for v in present)
                + " (class indices" + (", 255 for no class" if len(classes) < len(present) else "") + ", not 0/255)",
                None)
    scale = 255 / 65535 if top > 255 else 1.0  # 16-bit masks are compared on the 8-bit scale
    found = _plateaus(*_interior(values), lambda v: (v * scale,), values.size)
    if len(found) <= 2:
        return None
    return (len(found), "grey levels " + ", ".join(str(v) for v in sorted(found)) + " each fill part of it (r2unet "
            "reads grey label maps as class indices 0..K-1: save them so, or as RGB colours read with --class_colors)",
            None)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Boolean mask (H, W); see the module docstring for the accepted encodings. A mask that holds class labels
    (``label_map_found``) is a ``NotBinaryMask``: read as one foreground, its classes would merge or vanish."""
    path = Path(path)
    img = _open(path)
    if img.mode == "1":
        return np.array(img, dtype=bool)  # a copy: an array over Pillow's buffer is read-only
    if (labels := label_map_found(img)) is not None:
        raise NotBinaryMask(path, *labels)
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


def read_label_map(path: str | os.PathLike, num_classes: int, colors: list[tuple[int, int, int]] | None = None,
                   notes: list[str] | None = None, ignore: int | None = None) -> np.ndarray:
    """Class labels (H, W) uint8 in 0..num_classes-1 from a label map: a palette PNG's indices, a grayscale image's
    values (8 or 16 bit), or, for an RGB(A) image, each pixel's colour looked up in ``colors`` (class k has colour
    ``colors[k]``). With ``colors``, a palette image is read by its colours too: a paint program orders a palette by
    its own rules, so its indices need not be the classes; ``notes`` then gets the file's name when they are not.
    ``ignore``: a value an index map may hold besides the classes (pixels of no class), kept as it is. A value or
    colour outside the classes is a DataError naming the file and the value."""
    path = Path(path)
    img = _open(path)
    if img.mode == "P" and colors is not None:
        return _palette_by_colour(path, img, num_classes, colors, notes)
    if img.mode in ("P", "1", "L", "I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(img).astype(np.int64)
        present = np.unique(values).tolist()
        if present == [0, 255]:
            raise DataError(f"{path}: values 0 and 255 only: a binary mask, which needs no --num_classes"
                            + (f" (in a label map, {ignore} marks pixels of no class)" if ignore is not None else ""))
        outside = [v for v in present if v >= num_classes and v != ignore]
        if outside:
            raise DataError(f"{path}: label {outside[-1]} outside the {num_classes} classes 0..{num_classes - 1} "
                            "(--num_classes counts the background too"
                            + (f"; {ignore} marks pixels of no class)" if ignore is not None else ")"))
        return values.astype(np.uint8)
    if colors is None:
        raise DataError(f"{path}: an RGB label map needs the colour of each class (--class_colors FILE)")
    rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: k for k, (r, g, b) in enumerate(colors[:num_classes])}
    found = np.unique(keys)
    unknown = [int(c) for c in found if int(c) not in table]
    if unknown:
        raise DataError(f"{path}: colour {_rgb(unknown[0])} is none of the {num_classes} classes' colours "
                        f"{[tuple(x) for x in colors[:num_classes]]}")
    labels = np.zeros(keys.shape, np.uint8)
    for c in found:  # one pass per colour present (a handful)
        labels[keys == c] = table[int(c)]
    return labels


def _palette_by_colour(path: Path, img: Image.Image, num_classes: int, colors, notes: list[str] | None) -> np.ndarray:
    """A palette image's classes from the colours of its indices (``read_label_map``)."""
    index = np.asarray(img)
    used = np.flatnonzero(np.asarray(img.histogram()[:256]))
    palette = np.zeros(768, np.int64)
    raw = img.getpalette() or []
    palette[:len(raw)] = raw[:768]
    table = {tuple(int(v) for v in c): k for k, c in enumerate(colors[:num_classes])}
    lut = np.zeros(256, np.uint8)
    for i in used:
        colour = tuple(int(v) for v in palette[3 * i:3 * i + 3])
        if colour not in table:
            raise DataError(f"{path}: palette index {i} has colour {colour}, none of the {num_classes} classes' "
                            f"colours {[tuple(x) for x in colors[:num_classes]]} (--class_colors)")
        lut[i] = table[colour]
    if notes is not None and any(lut[i] != i for i in used):
        notes.append(path.name)
    return lut[index]


def label_map_image(labels: np.ndarray, num_classes: int, colors: list[tuple[int, int, int]] | None = None):
    """A palette image whose indices are the classes and whose palette is ``colors`` (default ``class_colors``):
    viewers show the colours, ``read_label_map`` reads the classes back."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette([v for c in (colors or class_colors(num_classes)) for v in c])
    return img


def save_label_map(labels: np.ndarray, path: str | os.PathLike, num_classes: int,
                   colors: list[tuple[int, int, int]] | None = None) -> None:
    """``label_map_image`` as a PNG file, written whole or not at all."""
    atomic_save_image(label_map_image(labels, num_classes, colors), Path(path))
