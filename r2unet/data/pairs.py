"""Which mask belongs to which image: the pairing rules that ``prepare``, the cache, ``evaluate`` and ``predict``
share, and the names of the three splits.

- An image ``x.<ext>`` pairs with the mask whose stem is ``x`` plus one of ``MASK_SUFFIXES``, tried in that order:
  the exact stem first, then ISIC 2018's ``_segmentation``, then ``_mask``, ``_gt``, ``_label``, ``_seg``,
  ``_lesion``, ``_anno`` and their kin (the suffix in any case: ``x_Mask.png``, ``x_GT.png``). Image and mask may
  have different extensions, in any case. ``mask_suffix`` names the one suffix to use instead.
- Two masks that both match an image are a problem naming both (``mask_suffix`` chooses), never a silent pick.
- ``recursive``: one folder per case (``case1/images/x.png`` + ``case1/masks/x_mask.png``, or both files in
  ``case1/``): pairs are made within a case; a case of one image and one mask pairs them whatever their names. Image
  and mask folders may then be the same folder: files under a mask-like folder (``masks/``, ``gt/``, ``labels/`` ...)
  or named like a mask of a file beside them are masks.
- A pair is checked at the header level: both files are readable images of the same size (the mask may fit the
  photo as shown or its stored pixels: ``io.mask_frame``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .imageio import DataError, image_size, is_image_file, looks_like_mask, mask_frame

SPLITS = ("train", "valid", "test")


def split_folders(data_path: str | Path, split: str) -> tuple[Path, Path]:
    """(images, masks) folders of a split of a prepared dataset: ``split/`` and ``split_GT/``, the reference's."""
    return Path(data_path) / split, Path(data_path) / f"{split}_GT"
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
MASK_SUFFIXES = ("", "_segmentation", "_mask", "_masks", "_gt", "_groundtruth", "_label", "_labels", "_seg",
                 "_lesion", "_anno", "_annotation", "-mask", "-gt", "-label", "-seg")
CASE_RULE = "one image and one mask in a case folder"
_MASK_FOLDERS = {"mask", "masks", "gt", "ground_truth", "groundtruth", "label", "labels", "annotation", "annotations",
                 "segmentation", "segmentations", "seg"}
_IMAGE_FOLDERS = {"image", "images", "img", "imgs", "input", "inputs"}


@dataclass
class Pair:
    image: Path
    mask: Path
    ambiguous: bool = False  # an EXIF-turned photo whose mask fits either frame (set by check_pair)
    rule: str = ""  # the suffix that matched ("" the exact stem), or CASE_RULE
    case: str = ""  # the case folder, relative to the image folder (recursive pairing), else ""
    out_stem: str = ""  # the stem prepare gives the copies (unique over the dataset); default the image's stem

    @property
    def name(self) -> str:
        return self.image.stem

    def out_names(self) -> tuple[str, str]:
        """(image, mask) file names of the copies ``prepare`` writes: the files' own names where they pair again
        by the default rules, else the mask is named after the image (the exact-stem rule)."""
        stem = self.out_stem or self.image.stem
        if stem == self.image.stem and not self.case and self.rule in MASK_SUFFIXES:
            return self.image.name, self.mask.name
        return stem + self.image.suffix, stem + self.mask.suffix


@dataclass
class PairingReport:
    pairs: list[Pair]
    missing_masks: list[Path] = field(default_factory=list)  # images with no mask
    extra_masks: list[Path] = field(default_factory=list)  # masks with no image
    ignored: list[Path] = field(default_factory=list)  # non-image files (LICENSE.txt, ...)
    passed_over: list[str] = field(default_factory=list)  # links to nothing, loops, unreadable folders: why
    ambiguous: list[tuple[Path, list[Path]]] = field(default_factory=list)  # images with several mask candidates

    def summary(self) -> dict:
        """How many pairs each rule made (stored in prepare's manifest)."""
        return {"pairs": len(self.pairs), "rules": dict(Counter(_rule_name(p.rule) for p in self.pairs))}


def _rule_name(rule: str) -> str:
    return rule if rule == CASE_RULE else f"<stem>{rule}"


def _suffixes(mask_suffix: str | None) -> tuple[str, ...]:
    """The mask suffixes tried, in order: ``MASK_SUFFIXES``, or the one given."""
    return MASK_SUFFIXES if mask_suffix is None else (mask_suffix,)


def mask_stem_for(image_stem: str, mask_suffix: str | None = None) -> list[str]:
    """Mask stems accepted for an image stem, in the order they are tried (compare them lower-cased)."""
    return [image_stem + s for s in _suffixes(mask_suffix)]


def _files(folder: Path, flag: str, recursive: bool) -> tuple[list[Path], list[Path], list[str]]:
    """(image files, other files, entries passed over with the reason) in ``folder`` (and below, ``recursive``,
    following linked folders), hidden ones left out."""
    if not folder.is_dir():
        raise DataError(f"{flag}: folder {folder} does not exist")
    files, passed = _walk(folder) if recursive else _listing(folder)
    return [p for p in files if is_image_file(p)], [p for p in files if not is_image_file(p)], passed


def _listing(folder: Path) -> tuple[list[Path], list[str]]:
    """The files of one folder (links to files included), and the links that lead nowhere."""
    files, passed = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and not p.exists():
            passed.append(f"{p}: a link to {os.readlink(p)}, which does not exist")
    return files, passed


def _walk(root: Path) -> tuple[list[Path], list[str]]:
    """Every file under ``root``, through linked folders too, each real folder read once (a link back up, a loop,
    is passed over, not followed forever); the entries passed over, each with the reason."""
    files, passed, seen = [], [], {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                passed.append(f"{folder}: the same folder as {seen[key]} (a link loop, or a second link to it); "
                              "read once")
                continue
            seen[key] = folder
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            passed.append(f"{folder}: cannot be read ({exc.strerror or exc})")
            continue
        below = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    below.append(path)
                elif entry.is_file():
                    files.append(path)
                elif entry.is_symlink():
                    passed.append(f"{path}: a link to {os.readlink(path)}, which does not exist")
            except OSError as exc:
                passed.append(f"{path}: cannot be read ({exc.strerror or exc})")
        stack.extend(reversed(below))
    return sorted(files), passed


def _case(path: Path, root: Path) -> str:
    """The case folder of a file: its folder relative to the root, less a last images/masks-like folder."""
    parts = list(path.parent.relative_to(root).parts)
    if parts and parts[-1].lower() in _MASK_FOLDERS | _IMAGE_FOLDERS:
        parts.pop()
    return "/".join(parts)


def _split_one_folder(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """Images and masks of a folder that holds both: a mask lies under a mask-like folder, is named like one
    (``mask.png``, ``label.png``), or its stem is another file's stem plus a mask suffix (``x_mask.png`` beside
    ``x.png``)."""
    cases = {p: _case(p, root) for p in files}
    stems = {(cases[p], p.stem.lower()) for p in files}

    def is_mask(p: Path) -> bool:
        low = p.stem.lower()
        if low in _MASK_FOLDERS or any(part.lower() in _MASK_FOLDERS for part in p.parent.relative_to(root).parts):
            return True
        return any(s and low.endswith(s) and (cases[p], low[:-len(s)]) in stems for s in MASK_SUFFIXES)

    mask = {p: is_mask(p) for p in files}
    return [p for p in files if not mask[p]], [p for p in files if mask[p]]


def pair_files(image_dir: str | Path, mask_dir: str | Path, mask_suffix: str | None = None,
               recursive: bool = False) -> PairingReport:
    """Pair every image in ``image_dir`` with its mask in ``mask_dir`` by the rules of the module docstring; report
    what did not pair and what paired more than one way."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images, ignored, passed = _files(image_dir, "images", recursive)
    if image_dir.resolve() == mask_dir.resolve():
        images, masks = _split_one_folder(images, image_dir)
    else:
        masks, other, passed_masks = _files(mask_dir, "masks", recursive)
        ignored, passed = ignored + other, passed + passed_masks
    report = PairingReport(pairs=[], ignored=[p for p in ignored if p.name not in _IGNORED_NAMES],
                           passed_over=passed)
    if not images:
        raise DataError(f"{image_dir}: no images found (looked for .jpg .jpeg .png .bmp .tif .tiff"
                        + (", in every subfolder)" if recursive else "; --recursive looks in subfolders)"))
    by_case: dict[str, dict[str, Path]] = {}
    for m in masks:
        named = by_case.setdefault(_case(m, mask_dir) if recursive else "", {})
        if m.stem.lower() in named:
            raise DataError(f"{m}: two masks share the stem {m.stem!r} ({named[m.stem.lower()].name} and {m.name})")
        named[m.stem.lower()] = m
    cases: dict[str, list[Path]] = {}
    for img in images:
        cases.setdefault(_case(img, image_dir) if recursive else "", []).append(img)
    used: set[Path] = set()
    for case, imgs in cases.items():
        _pair_case(case, imgs, by_case.get(case, {}), mask_suffix, recursive, report, used)
    report.extra_masks = [m for m in masks if m not in used]
    _unique_out_stems(report.pairs)
    return report


def _pair_case(case: str, imgs: list[Path], masks: dict[str, Path], mask_suffix: str | None, recursive: bool,
               report: PairingReport, used: set[Path]) -> None:
    seen: dict[str, Path] = {}
    for img in imgs:
        if img.stem in seen:
            raise DataError(f"{img}: two images share the stem {img.stem!r} ({seen[img.stem].name})")
        seen[img.stem] = img
        hits = [(s, masks[(img.stem + s).lower()]) for s in _suffixes(mask_suffix) if (img.stem + s).lower() in masks]
        if len(hits) > 1 or (hits and hits[0][1] in used):
            report.ambiguous.append((img, [m for _, m in hits]))
        elif hits:
            used.add(hits[0][1])
            report.pairs.append(Pair(img, hits[0][1], rule=hits[0][0], case=case))
        else:
            report.missing_masks.append(img)
    if recursive and len(imgs) == 1 and len(masks) == 1 and report.missing_masks[-1:] == imgs:
        mask = next(iter(masks.values()))  # a case of one image and one mask: theirs, whatever the names
        report.missing_masks.pop()
        used.add(mask)
        report.pairs.append(Pair(imgs[0], mask, rule=CASE_RULE, case=case))


def _unique_out_stems(pairs: list[Pair]) -> None:
    """Stems for the copies: the image's own, or, where cases repeat a stem (``case1/image.png``,
    ``case2/image.png``), the case folder's path joined with ``_`` before it."""
    counts = Counter(p.image.stem for p in pairs)
    for p in pairs:
        p.out_stem = p.image.stem if counts[p.image.stem] == 1 or not p.case else \
            f"{p.case.replace('/', '_')}_{p.image.stem}"


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


def checked_pairs(image_dir: str | Path, mask_dir: str | Path, mask_suffix: str | None = None,
                  recursive: bool = False, report: PairingReport | None = None
                  ) -> tuple[list[Pair], list[str], list[Path]]:
    """Pair the folders and check each pair's headers: (good pairs, problems naming files, ignored non-images).
    Nothing paired at all is a DataError that shows what was looked for and what the mask folder holds."""
    report = report or pair_files(image_dir, mask_dir, mask_suffix, recursive)
    if not report.pairs and not report.ambiguous:
        raise DataError(no_pairs_message(report, image_dir, mask_dir, mask_suffix, recursive))
    images, masks = [p.image for p in report.pairs], [p.mask for p in report.pairs]
    if swapped := swapped_folders(images, masks, image_dir, mask_dir):
        raise DataError(swapped)
    looked = "a mask named <stem>" + (mask_suffix or "") + ".<ext>" if mask_suffix is not None else \
        "<stem>.<ext>, <stem>_segmentation.<ext>, <stem>_mask.<ext> ... (see --mask_suffix)"
    problems = [f"{p}: no mask found in {mask_dir} (looked for {looked})" for p in report.missing_masks]
    problems += [f"{img}: more than one mask matches: {', '.join(m.name for m in found)}; choose one naming with "
                 "--mask_suffix" for img, found in report.ambiguous]
    problems += [f"{p}: mask has no matching image in {image_dir}" for p in report.extra_masks]
    pairs = []
    for pair in report.pairs:
        try:
            check_pair(pair)
            pairs.append(pair)
        except DataError as exc:
            problems.append(str(exc))
    return pairs, problems, report.ignored


SWAP_SAMPLE = 5  # images (and masks) decoded to tell whether the two folders were given the other way round


def _spread(files: list[Path], n: int) -> list[Path]:
    return files[:: max(1, len(files) // n)][:n]


def swapped_folders(images: list[Path], masks: list[Path], image_dir, mask_dir) -> str | None:
    """A message when the folders look given the other way round: every image sampled reads as a binary mask
    (``looks_like_mask``) and no mask sampled does (or there are no masks to look at); else None."""
    sample = _spread(images, SWAP_SAMPLE)
    if not sample or not all(looks_like_mask(p) for p in sample):
        return None
    mask_sample = _spread(masks, SWAP_SAMPLE)
    if mask_sample and any(looks_like_mask(m) for m in mask_sample):
        return None
    return (f"the images in {image_dir} look like masks (gray, two values: {', '.join(p.name for p in sample[:3])})"
            + (f", and the masks in {mask_dir} like photos" if mask_sample else "")
            + ": the two folders look swapped. Give the photos' folder as the images (prepare: --origin_data_path) "
            "and the masks' folder as the masks (--origin_GT_path)")


def no_pairs_message(report: PairingReport, image_dir, mask_dir, mask_suffix: str | None, recursive: bool) -> str:
    """No image paired: the folders look swapped (when they do), else one image's name, the mask names looked
    for, and the first mask names present."""
    if swapped := swapped_folders(report.missing_masks, report.extra_masks, image_dir, mask_dir):
        return swapped
    img = report.missing_masks[0]
    looked = ", ".join(f"{s}.*" for s in mask_stem_for(img.stem, mask_suffix))
    present = [m.name for m in report.extra_masks]
    shown = ", ".join(present[:8]) + (f" ... ({len(present)} in all)" if len(present) > 8 else "")
    return (f"no image in {image_dir} has a mask in {mask_dir}: for {img.name} these were looked for: {looked} "
            f"(any extension, the suffix in any case); the mask folder holds "
            + (shown if present else "no image files")
            + ". Name the masks' suffix with --mask_suffix (e.g. --mask_suffix _contour)"
            + ("" if recursive else ", or pass --recursive for one folder per case"))


def log_pairing(report_or_summary, log) -> None:
    """One line: how many pairs, made by which rule."""
    summary = report_or_summary.summary() if isinstance(report_or_summary, PairingReport) else report_or_summary
    log(f"paired {summary['pairs']} image(s) with masks: "
        + ", ".join(f"{n} as {rule}" for rule, n in sorted(summary["rules"].items(), key=lambda kv: -kv[1])))


def report_problems(problems: list[str], skip_bad: bool, log) -> None:
    """Stop with every problem listed, or (``skip_bad``) log them and go on without those files."""
    if not problems:
        return
    shown = 50  # a folder of 10 000 bad files is named by count past these
    listing = "\n  ".join(problems[:shown]) + (f"\n  ... and {len(problems) - shown} more" if len(problems) > shown
                                                 else "")
    if not skip_bad:
        raise DataError(f"{len(problems)} problem(s) in the dataset (use --skip_bad to skip them):\n  {listing}")
    log(f"skipping {len(problems)} bad item(s):\n  {listing}")
