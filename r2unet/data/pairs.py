"""Which mask belongs to which image: the pairing rules that ``prepare``, the cache and ``predict`` share, and the
names of the three splits.

- ``ISIC_x.jpg`` <-> ``ISIC_x_segmentation.<ext>`` (ISIC 2018), else ``x.<ext>`` <-> ``x.<ext>`` (same stem).
- A pair is checked at the header level: both files are readable images of the same size (the mask may fit the
  photo as shown or its stored pixels: ``io.mask_frame``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io import DataError, image_size, is_image_file, mask_frame

SPLITS = ("train", "valid", "test")
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class Pair:
    image: Path
    mask: Path
    ambiguous: bool = False  # an EXIF-turned photo whose mask fits either frame (set by check_pair)

    @property
    def name(self) -> str:
        return self.image.stem


@dataclass
class PairingReport:
    pairs: list[Pair]
    missing_masks: list[Path] = field(default_factory=list)  # images with no mask
    extra_masks: list[Path] = field(default_factory=list)  # masks with no image
    ignored: list[Path] = field(default_factory=list)  # non-image files (LICENSE.txt, ...)


def mask_stem_for(image_stem: str) -> list[str]:
    """Mask stems accepted for an image stem, ISIC convention first."""
    return [f"{image_stem}_segmentation", image_stem]


def _listdir(folder: Path, flag: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{flag}: folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def pair_files(image_dir: str | Path, mask_dir: str | Path) -> PairingReport:
    """Pair every image in ``image_dir`` with its mask in ``mask_dir``; report what did not pair."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images, ignored = [], []
    for p in _listdir(image_dir, "images"):
        (images if is_image_file(p) else ignored).append(p)
    masks: dict[str, Path] = {}
    for p in _listdir(mask_dir, "masks"):
        if not is_image_file(p):
            ignored.append(p)
        elif p.stem in masks:
            raise DataError(f"{p}: two masks share the stem {p.stem!r} ({masks[p.stem].name} and {p.name})")
        else:
            masks[p.stem] = p
    ignored = [p for p in ignored if p.name not in _IGNORED_NAMES]
    if not images:
        raise DataError(f"{image_dir}: no images found (looked for .jpg .jpeg .png .bmp .tif .tiff)")
    report = PairingReport(pairs=[], ignored=ignored)
    used: set[str] = set()
    seen_stems: dict[str, Path] = {}
    for img in images:
        if img.stem in seen_stems:
            raise DataError(f"{img}: two images share the stem {img.stem!r} ({seen_stems[img.stem].name})")
        seen_stems[img.stem] = img
        stem = next((s for s in mask_stem_for(img.stem) if s in masks), None)
        if stem is None:
            report.missing_masks.append(img)
        else:
            used.add(stem)
            report.pairs.append(Pair(img, masks[stem]))
    report.extra_masks = [m for s, m in sorted(masks.items()) if s not in used]
    return report


def check_pair(pair: Pair) -> None:
    """Header-level check: both files are readable images of the same size (the photo as shown or as stored); marks
    the pair ``ambiguous`` when the mask fits both frames of an EXIF-turned photo."""
    img_size, mask_size = image_size(pair.image), image_size(pair.mask)  # a bad image is named before its mask
    oriented, pair.ambiguous = mask_frame(pair.image, mask_size)
    if oriented is None:
        raise DataError(
            f"{pair.mask}: mask size {mask_size[0]}x{mask_size[1]} differs from image {pair.image.name} "
            f"size {img_size[0]}x{img_size[1]}"
        )


def note_ambiguous(pairs: list[Pair], log) -> None:
    """One line naming the EXIF-turned photos whose mask could be on either frame, and the rule applied."""
    ambiguous = [p.image.name for p in pairs if p.ambiguous]
    if ambiguous:
        shown = ", ".join(ambiguous[:5]) + (f" and {len(ambiguous) - 5} more" if len(ambiguous) > 5 else "")
        log(f"warning: {len(ambiguous)} photo(s) carry an EXIF orientation that keeps their size ({shown}): a mask "
            "drawn on their stored pixels cannot be told from one drawn on the photo as viewers show it, and is taken "
            "as the latter. If yours were drawn on the stored pixels (a tool that ignores the tag), remove the "
            "photos' Orientation tag or turn the masks the same way")


def checked_pairs(image_dir: str | Path, mask_dir: str | Path) -> tuple[list[Pair], list[str], list[Path]]:
    """Pair the folders and check each pair's headers: (good pairs, problems naming files, ignored non-images)."""
    report = pair_files(image_dir, mask_dir)
    problems = [f"{p}: no mask found in {mask_dir} (expected {p.stem}_segmentation.<ext> or {p.stem}.<ext>)"
                for p in report.missing_masks]
    problems += [f"{p}: mask has no matching image in {image_dir}" for p in report.extra_masks]
    pairs = []
    for pair in report.pairs:
        try:
            check_pair(pair)
            pairs.append(pair)
        except DataError as exc:
            problems.append(str(exc))
    return pairs, problems, report.ignored


def report_problems(problems: list[str], skip_bad: bool, log) -> None:
    """Stop with every problem listed, or (``skip_bad``) log them and go on without those files."""
    if not problems:
        return
    listing = "\n  ".join(problems)
    if not skip_bad:
        raise DataError(f"{len(problems)} problem(s) in the dataset (use --skip_bad to skip them):\n  {listing}")
    log(f"skipping {len(problems)} bad item(s):\n  {listing}")
