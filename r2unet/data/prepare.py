"""Split a folder of images and masks into train/valid/test folders, as the reference's ``dataset.py`` does, safely.

- Pairing: ``ISIC_x.jpg`` <-> ``ISIC_x_segmentation.png`` (ISIC) or ``x.<ext>`` <-> ``x.<ext>`` (same stem).
- Arithmetic as the reference: train = int(r_train / sum(r) * N), valid = int(r_valid / sum(r) * N), test = the rest.
- Deterministic for a seed; a manifest records which file went where and a fingerprint of the sources.
- Never deletes or overwrites user files: a non-empty target folder is refused unless ``overwrite``, and even then only
  files that the previous manifest says r2unet wrote are replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import atomic_write_text
from .io import DataError, image_size, is_image_file

MANIFEST_NAME = "r2unet_manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "valid", "test")
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class Pair:
    image: Path
    mask: Path

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
    """Header-level check: both files are readable images of the same size (the photo as shown or as stored)."""
    img_size, mask_size = image_size(pair.image), image_size(pair.mask)
    if img_size != mask_size and image_size(pair.image, oriented=False) != mask_size:  # either frame of a photo
        raise DataError(
            f"{pair.mask}: mask size {mask_size[0]}x{mask_size[1]} differs from image {pair.image.name} "
            f"size {img_size[0]}x{img_size[1]}"
        )


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


def split_counts(n: int, train_ratio: float, valid_ratio: float, test_ratio: float) -> tuple[int, int, int]:
    """The reference's arithmetic: 2594 images at 0.7/0.1/0.2 -> (1815, 259, 520)."""
    ratios = (train_ratio, valid_ratio, test_ratio)
    for flag, r in zip(("--train_ratio", "--valid_ratio", "--test_ratio"), ratios):
        if not r >= 0:
            raise ValueError(f"{flag} must be >= 0, got {r}")
    total = sum(ratios)
    if not total > 0:
        raise ValueError("--train_ratio + --valid_ratio + --test_ratio must be positive")
    num_train = int(train_ratio / total * n)
    num_valid = int(valid_ratio / total * n)
    return num_train, num_valid, n - num_train - num_valid


def fingerprint(paths: list[Path]) -> str:
    """Hash of names, sizes and modification times: changes when any source file is added, removed or edited."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _place(src: Path, dst: Path, link: str) -> None:
    if link == "symlink":
        os.symlink(src.resolve(), dst)
    elif link == "hardlink":
        try:
            os.link(src, dst)
        except OSError as exc:
            raise DataError(f"{dst}: cannot hard-link from {src} ({exc}); use --link copy or symlink") from None
    else:
        shutil.copy2(src, dst)


def _load_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); move it away to start afresh") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {manifest.get('version')} is not {MANIFEST_VERSION}")
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=1))


def prepare_split(
    origin_data_path: str | Path,
    origin_GT_path: str | Path,
    *,
    data_path: str | Path | None = None,
    targets: dict[str, tuple[str | Path, str | Path]] | None = None,
    train_ratio: float = 0.7,
    valid_ratio: float = 0.1,
    test_ratio: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    skip_bad: bool = False,
    link: str = "copy",
    manifest_path: str | Path | None = None,
    log=print,
    progress: bool = False,
) -> dict:
    """Split and copy (or link) the pairs; return the manifest (also written to disk).

    Give either ``data_path`` (writes ``data_path/{train,train_GT,valid,valid_GT,test,test_GT}``) or ``targets``
    mapping each split to its (image folder, mask folder), as the reference's flags do.
    """
    if link not in ("copy", "hardlink", "symlink"):
        raise ValueError(f"--link must be copy, hardlink or symlink, got {link!r}")
    if (data_path is None) == (targets is None):
        raise ValueError("give either --data_path or all of the --{train,valid,test}_path/_GT_path flags")
    if data_path is not None:
        data_path = Path(data_path)
        targets = {s: (data_path / s, data_path / f"{s}_GT") for s in SPLITS}
    targets = {s: (Path(a), Path(b)) for s, (a, b) in targets.items()}
    if manifest_path is None:
        common = Path(os.path.commonpath([str(p.resolve()) for pair in targets.values() for p in pair]))
        manifest_path = common / MANIFEST_NAME
    manifest_path = Path(manifest_path)
    split_counts(1, train_ratio, valid_ratio, test_ratio)  # validates the ratios before any work
    total = train_ratio + valid_ratio + test_ratio
    if abs(total - 1) > 1e-9:  # the reference divides by the sum too; say so rather than surprise
        log(f"note: the ratios sum to {total:g}; splitting in the proportions "
            f"{train_ratio / total:.3f}/{valid_ratio / total:.3f}/{test_ratio / total:.3f}")

    pairs, bad, ignored = checked_pairs(origin_data_path, origin_GT_path)
    if ignored:
        log(f"ignoring {len(ignored)} non-image file(s): " + ", ".join(p.name for p in ignored[:5])
            + (" ..." if len(ignored) > 5 else ""))
    report_problems(bad, skip_bad, log)
    if not pairs:
        raise DataError(f"{origin_data_path}: no usable image/mask pairs")

    # Refuse to touch folders holding files r2unet did not write.
    previous = _load_manifest(manifest_path)
    ours = {Path(f) for f in (previous or {}).get("written", [])}
    for folder in {p for pair in targets.values() for p in pair}:
        existing = [p for p in folder.iterdir()] if folder.is_dir() else []
        if existing and not overwrite:
            raise DataError(f"{folder}: target folder is not empty; refusing to write into it "
                            "(pass --overwrite to replace only files a previous prepare wrote)")
        foreign = [p for p in existing if p.resolve() not in ours and p.absolute() not in ours]
        if foreign and overwrite:
            log(f"{folder}: leaving {len(foreign)} file(s) that r2unet did not write untouched")

    rng = random.Random(seed)
    order = sorted(pairs, key=lambda p: p.name)
    rng.shuffle(order)
    n_train, n_valid, _ = split_counts(len(order), train_ratio, valid_ratio, test_ratio)
    assignment = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
                  "test": order[n_train + n_valid:]}

    # Plan every destination first, so that a collision with a user file stops before anything is written.
    plan = []
    for split, items in assignment.items():
        img_dir, gt_dir = targets[split]
        for pair in items:
            for src, dst_dir in ((pair.image, img_dir), (pair.mask, gt_dir)):
                dst = dst_dir / src.name
                if (dst.exists() or dst.is_symlink()) and dst.absolute() not in ours and dst.resolve() not in ours:
                    raise DataError(f"{dst}: exists and was not written by r2unet; refusing to overwrite it")
                plan.append((src, dst))
    manifest_base = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "ratios": [train_ratio, valid_ratio, test_ratio],
        "link": link,
        "source": {"images": str(Path(origin_data_path).absolute()), "masks": str(Path(origin_GT_path).absolute()),
                   "fingerprint": fingerprint([p for pair in pairs for p in (pair.image, pair.mask)])},
        "targets": {s: [str(a.absolute()), str(b.absolute())] for s, (a, b) in targets.items()},
        "splits": {s: [{"image": p.image.name, "mask": p.mask.name} for p in items]
                   for s, items in assignment.items()},
        "skipped": bad,
    }
    # Remove only our own files from the previous run (they may belong to another split now).
    for old in ours:
        if old.is_symlink() or old.exists():
            old.unlink()
    for img_dir, gt_dir in targets.values():
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
    written = []
    steps = plan
    if progress:
        from tqdm import tqdm

        steps = tqdm(plan, desc=f"prepare ({link})", unit="file")
    try:
        for src, dst in steps:
            _place(src, dst, link)
            written.append(str(dst.absolute()))
    finally:
        # Even when interrupted, record what was written so that a re-run with --overwrite may replace it.
        _write_manifest(manifest_path, {**manifest_base, "written": written, "complete": False})

    manifest = {**manifest_base, "written": written, "complete": True}
    _write_manifest(manifest_path, manifest)
    log(f"split {len(pairs)} pairs -> train {n_train}, valid {n_valid}, test {len(assignment['test'])}; "
        f"manifest {manifest_path}")
    return manifest
