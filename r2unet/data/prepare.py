"""Split a folder of images and masks into train/valid/test folders, as the reference's ``dataset.py`` does, safely.

- Pairing: ``pairs.py`` (the exact stem, ISIC's ``_segmentation``, ``_mask``, ``_gt`` ... or ``--mask_suffix``;
  ``--recursive`` for one folder per case).
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
from pathlib import Path

from tqdm import tqdm

from ..fileio import atomic_write, atomic_write_text
from .cache import split_cache
from .imageio import DataError, is_image_file
from .pairs import SPLITS, PairingReport, checked_pairs, log_pairing, pair_files, report_problems, split_folders
from .targets import BINARY, Targets

MANIFEST_NAME = "r2unet_manifest.json"
MANIFEST_VERSION = 1

__all__ = ["SPLITS", "pair_files", "prepare_split", "split_counts"]
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
    else:  # whole or not at all: a full disk or a kill mid-copy leaves no truncated file under dst's name
        atomic_write(dst, lambda tmp: shutil.copy2(src, tmp))


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
    cache_size: int | None = None,
    cache_workers: int | None = None,
    mask_suffix: str | None = None,
    recursive: bool = False,
    masks: Targets = BINARY,
    resplit: bool = False,
) -> dict:
    """Split and copy (or link) the pairs; return the manifest (also written to disk).

    ``masks``: what the masks are (``targets.py``: binary masks, or label maps of several classes).

    Splits are stable: on a folder prepared before (its manifest), every image keeps its split and only images new
    to the source are assigned (``_assign``); ``resplit`` shuffles everything anew.

    Give either ``data_path`` (writes ``data_path/{train,train_GT,valid,valid_GT,test,test_GT}``) or ``targets``
    mapping each split to its (image folder, mask folder), as the reference's flags do. With ``data_path`` and
    ``cache_size``, also build the decode-once cache of each split for that training size.
    """
    if link not in ("copy", "hardlink", "symlink"):
        raise ValueError(f"--link must be copy, hardlink or symlink, got {link!r}")
    if cache_size is not None and (cache_size < 16 or cache_size % 16):
        raise ValueError(f"--image_size: the training size must be a positive multiple of 16 (the networks pool 4 "
                         f"times), got {cache_size}")
    targets, manifest_path = _targets(data_path, targets, manifest_path)
    _refuse_reading_from_targets(origin_data_path, origin_GT_path, targets)
    ratios = _checked_ratios(train_ratio, valid_ratio, test_ratio, log)
    pairs, bad, report = _sources(origin_data_path, origin_GT_path, mask_suffix, recursive, skip_bad, masks, log)
    previous = _load_manifest(manifest_path)
    ours = _files_we_wrote(previous, targets, overwrite, log)
    assignment, how = _assign(pairs, origin_data_path, ratios, seed, previous, resplit)
    plan = _plan(assignment, targets, ours)
    splits = {s: [_entry(p, origin_data_path, origin_GT_path) for p in items] for s, items in assignment.items()}
    manifest_base = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "ratios": list(ratios),
        "link": link,
        "source": {"images": str(Path(origin_data_path).absolute()), "masks": str(Path(origin_GT_path).absolute()),
                   "fingerprint": fingerprint([p for pair in pairs for p in (pair.image, pair.mask)])},
        "targets": {s: [str(a.absolute()), str(b.absolute())] for s, (a, b) in targets.items()},
        "splits": splits,
        "assignment": how,
        "split_fingerprint": _manifest_fingerprint(splits),
        "pairing": {**report.summary(), "mask_suffix": mask_suffix, "recursive": recursive},
        "skipped": bad,
        "passed_over": report.passed_over,
    }
    manifest = _place_all(plan, ours, targets, link, manifest_path, manifest_base, progress)
    log_pairing(report, log)
    log(f"split {len(pairs)} pairs -> " + ", ".join(f"{s} {len(assignment[s])}" for s in SPLITS)
        + (f" ({how['note']})" if how.get("note") else "") + f"; manifest {manifest_path}")
    if data_path is not None and cache_size is not None:
        manifest = _build_caches(manifest, Path(data_path), manifest_path, cache_size, cache_workers, skip_bad, log,
                                 masks)
    return manifest


def _sources(origin_data_path, origin_GT_path, mask_suffix: str | None, recursive: bool, skip_bad: bool,
             masks: Targets, log) -> tuple[list, list[str], PairingReport]:
    """The pairs to split, checked before any file is written: (usable pairs, problems skipped, the pairing
    report). Non-images and entries passed over (links to nothing, loops) are said; bad pairs stop the split unless
    ``skip_bad``; masks that are not what ``masks`` says (label maps read as binary: their classes would vanish or
    merge) stop it."""
    report = pair_files(origin_data_path, origin_GT_path, mask_suffix, recursive)
    pairs, bad, ignored = checked_pairs(origin_data_path, origin_GT_path, report=report)
    if ignored:
        log(f"ignoring {len(ignored)} non-image file(s): " + ", ".join(p.name for p in ignored[:5])
            + (" ..." if len(ignored) > 5 else ""))
    if report.passed_over:
        log(f"passed over {len(report.passed_over)} entr{'y' if len(report.passed_over) == 1 else 'ies'}:\n  "
            + "\n  ".join(report.passed_over))
    report_problems(bad, skip_bad, log)
    if not pairs:
        raise DataError(f"{origin_data_path}: no usable image/mask pairs")
    masks.check([p.mask for p in pairs])
    return pairs, bad, report


def _build_caches(manifest: dict, data_path: Path, manifest_path: Path, cache_size: int, workers: int | None,
                  skip_bad: bool, log, targets: Targets) -> dict:
    """Decode every split into its cache. With ``skip_bad``, a pair whose headers were fine but whose pixels do not
    decode (a truncated JPEG) leaves the split too: its placed files are removed, the manifest names its source
    among the skipped, and the cache is brought in line. Nothing that later reads the split meets it again."""
    for split in SPLITS:
        if not manifest["splits"][split]:
            continue
        cache = split_cache(data_path, split, cache_size, num_workers=workers, skip_bad=skip_bad, log=log,
                            targets=targets)
        usable = set(cache.names)
        bad = [e for e in manifest["splits"][split] if e["image"] not in usable]
        if not bad:
            continue
        removed = set()
        for e in bad:
            for folder, name in zip(split_folders(data_path, split), (e["image"], e["mask"])):
                (folder / name).unlink(missing_ok=True)
                removed.add(str((folder / name).absolute()))
        sources = [str(Path(manifest["source"]["images"]) / e.get("from", [e["image"]])[0]) for e in bad]
        splits = {**manifest["splits"], split: [e for e in manifest["splits"][split] if e["image"] in usable]}
        manifest = {**manifest, "splits": splits, "split_fingerprint": _manifest_fingerprint(splits),
                    "skipped": manifest["skipped"] + [f"{src}: does not decode (left out of {split})"
                                                      for src in sources],
                    "written": [f for f in manifest["written"] if f not in removed]}
        _write_manifest(manifest_path, manifest)
        log(f"{split}: removed {len(bad)} pair(s) whose image or mask does not decode; their sources: "
            + ", ".join(sources[:5]) + (" ..." if len(sources) > 5 else ""))
        split_cache(data_path, split, cache_size, num_workers=workers, skip_bad=skip_bad, log=log, targets=targets)
    return manifest


def _targets(data_path, targets, manifest_path) -> tuple[dict[str, tuple[Path, Path]], Path]:
    """Each split's (image folder, mask folder), and where the manifest goes (their common folder by default)."""
    if (data_path is None) == (targets is None):
        raise ValueError("give either --data_path or all of the --{train,valid,test}_path/_GT_path flags")
    if data_path is not None:
        data_path = Path(data_path)
        targets = {s: split_folders(data_path, s) for s in SPLITS}
    targets = {s: (Path(a), Path(b)) for s, (a, b) in targets.items()}
    if manifest_path is None:
        common = Path(os.path.commonpath([str(p.resolve()) for pair in targets.values() for p in pair]))
        manifest_path = common / MANIFEST_NAME
    return targets, Path(manifest_path)


def _refuse_reading_from_targets(origin_data_path, origin_GT_path, targets: dict) -> None:
    """prepare replaces and removes files in its target folders: a source folder that is one of them (or lies
    inside one) would lose files prepare is about to read, say when re-splitting D/train into D."""
    folders = {p.resolve() for pair in targets.values() for p in pair}
    for flag, origin in (("--origin_data_path", origin_data_path), ("--origin_GT_path", origin_GT_path)):
        src = Path(origin).resolve()
        clash = next((f for f in sorted(folders) if f == src or f in src.parents), None)
        if clash is not None:
            raise DataError(f"{flag} {origin} overlaps {clash}, a folder prepare writes: splitting it there would "
                            "overwrite or delete the files it reads. Write the split to another --data_path (or "
                            "split folders); nothing was changed")


def _checked_ratios(train_ratio: float, valid_ratio: float, test_ratio: float, log) -> tuple[float, float, float]:
    split_counts(1, train_ratio, valid_ratio, test_ratio)  # validates the ratios before any work
    total = train_ratio + valid_ratio + test_ratio
    if abs(total - 1) > 1e-9:  # the reference divides by the sum too; say so rather than surprise
        log(f"note: the ratios sum to {total:g}; splitting in the proportions "
            f"{train_ratio / total:.3f}/{valid_ratio / total:.3f}/{test_ratio / total:.3f}")
    return train_ratio, valid_ratio, test_ratio


def _files_we_wrote(previous: dict | None, targets: dict, overwrite: bool, log) -> set[Path]:
    """The files a previous prepare wrote (its manifest's list); refuses folders holding files r2unet did not write
    unless ``overwrite`` (which then leaves those files alone)."""
    ours = {Path(f) for f in (previous or {}).get("written", [])}
    for folder in {p for pair in targets.values() for p in pair}:
        existing = [p for p in folder.iterdir()] if folder.is_dir() else []
        if existing and not overwrite:
            raise DataError(f"{folder}: target folder is not empty; refusing to write into it "
                            "(pass --overwrite to replace only files a previous prepare wrote)")
        foreign = [p for p in existing if p.resolve() not in ours and p.absolute() not in ours]
        if foreign and overwrite:
            log(f"{folder}: leaving {len(foreign)} file(s) that r2unet did not write untouched")
    return ours


def _source_key(entry: dict) -> str:
    """Which source file a manifest entry came from (relative to the image folder): the same key as ``_key``."""
    return entry.get("from", [entry["image"]])[0]


def _key(pair, origin_data_path) -> str:
    return str(pair.image.relative_to(origin_data_path))


def _assign(pairs: list, origin_data_path, ratios: tuple, seed: int, previous: dict | None,
            resplit: bool) -> tuple[dict[str, list], dict]:
    """Each pair's split, and how it was made (for the manifest and the log).

    A first split (or ``resplit``) is the reference's: the pairs in name order, shuffled by ``seed``, cut by
    ``split_counts``. When a previous manifest split some of these sources, each keeps its split: adding or removing
    images never moves an image a model may have trained on into another split. The new ones, shuffled by ``seed``,
    go one by one to the split furthest below its share of the new total. Another seed or other ratios than the
    previous split's would move images, so they are refused unless ``resplit``."""
    order = sorted(pairs, key=lambda p: p.out_stem or p.name)
    before = {_source_key(e): s for s in SPLITS for e in (previous or {}).get("splits", {}).get(s, [])}
    kept = {s: [p for p in order if before.get(_key(p, origin_data_path)) == s] for s in SPLITS}
    if resplit or not any(kept.values()):
        random.Random(seed).shuffle(order)
        n_train, n_valid, _ = split_counts(len(order), *ratios)
        cut = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
        return cut, {"method": "shuffled", "note": "shuffled anew (--resplit)" if resplit and before else ""}
    same = previous.get("seed") == seed and all(abs(a - b) < 1e-9 for a, b in zip(previous.get("ratios", ()), ratios))
    if not same:
        raise DataError(f"this folder was split with --seed {previous.get('seed')} and ratios "
                        + "/".join(f"{r:g}" for r in previous.get("ratios", ())) + f", not --seed {seed} and "
                        + "/".join(f"{r:g}" for r in ratios) + ": splitting again would move images a model may have "
                        "trained on into the validation or test split. Give the previous --seed and ratios (each "
                        "image keeps its split; new ones are assigned), or pass --resplit to shuffle everything anew "
                        "(and train new runs: --resume refuses a changed split); nothing was changed")
    new = [p for p in order if _key(p, origin_data_path) not in before]
    random.Random(seed).shuffle(new)
    want = dict(zip(SPLITS, split_counts(len(order), *ratios)))
    added = {s: 0 for s in SPLITS}
    for p in new:
        split = max(SPLITS, key=lambda s: want[s] - len(kept[s]))  # ties: train, valid, test
        kept[split].append(p)
        added[split] += 1
    removed = len(before) - sum(len(v) for v in kept.values()) + len(new)
    note = f"kept the split of {len(order) - len(new)} image(s)" + (
        ", added " + ", ".join(f"{n} to {s}" for s, n in added.items() if n) if new else "") + (
        f", {removed} no longer in the source" if removed else "")
    return kept, {"method": "kept", "kept": len(order) - len(new), "added": added, "removed": removed, "note": note}


def split_membership(targets: dict[str, tuple[Path, Path]]) -> dict[str, list[str]]:
    """The image file names in each split's image folder: what a run trained, chose and was tested on."""
    out = {}
    for split, (image_dir, _) in targets.items():
        folder = Path(image_dir)
        out[split] = sorted(p.name for p in folder.iterdir() if p.is_file() and is_image_file(p)
                            and not p.name.startswith(".")) if folder.is_dir() else []
    return out


def data_split(data_path: str | Path) -> dict:
    """``split_membership`` of a prepared dataset folder with its fingerprint: what a run records."""
    members = split_membership({s: (Path(data_path) / s, None) for s in SPLITS})
    return {"fingerprint": membership_fingerprint(members), "splits": members}


def _manifest_fingerprint(splits: dict[str, list[dict]]) -> str:
    return membership_fingerprint({s: [e["image"] for e in entries] for s, entries in splits.items()})


def membership_fingerprint(members: dict[str, list[str]]) -> str:
    """A hash of which image is in which split (names only: an edited file is the cache's business)."""
    return hashlib.sha256(json.dumps({s: sorted(members.get(s, [])) for s in SPLITS}).encode()).hexdigest()[:16]


def split_changes(before: dict[str, list[str]], now: dict[str, list[str]]) -> list[str]:
    """What moved between two memberships, in lines: images that changed split (by pair of splits), images added
    to and removed from each. Empty when they are the same."""
    where_before = {n: s for s in SPLITS for n in before.get(s, [])}
    where_now = {n: s for s in SPLITS for n in now.get(s, [])}
    lines = []
    for a in SPLITS:
        for b in SPLITS:
            moved = sorted(n for n, s in where_now.items() if s == b and where_before.get(n) == a and a != b)
            if moved:
                lines.append(f"{len(moved)} image(s) moved from {a} to {b}: {_names(moved)}")
    for s in SPLITS:
        added = sorted(n for n, t in where_now.items() if t == s and n not in where_before)
        gone = sorted(n for n, t in where_before.items() if t == s and n not in where_now)
        if added:
            lines.append(f"{len(added)} added to {s}: {_names(added)}")
        if gone:
            lines.append(f"{len(gone)} removed from {s}: {_names(gone)}")
    return lines


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _entry(pair, origin_data_path, origin_GT_path) -> dict:
    """A pair's line in the manifest: the names of its copies, and where they came from when those differ."""
    image, mask = pair.out_names()
    entry = {"image": image, "mask": mask}
    if (image, mask) != (pair.image.name, pair.mask.name) or pair.case:
        entry["from"] = [str(pair.image.relative_to(origin_data_path)), str(pair.mask.relative_to(origin_GT_path))]
    return entry


def _plan(assignment: dict, targets: dict, ours: set[Path]) -> list[tuple[Path, Path]]:
    """Every (source, destination), planned first, so that a collision with a user file stops before anything is
    written."""
    plan = []
    for split, items in assignment.items():
        img_dir, gt_dir = targets[split]
        for pair in items:
            for src, dst_dir, name in zip((pair.image, pair.mask), (img_dir, gt_dir), pair.out_names()):
                dst = dst_dir / name
                if (dst.exists() or dst.is_symlink()) and dst.absolute() not in ours and dst.resolve() not in ours:
                    raise DataError(f"{dst}: exists and was not written by r2unet; refusing to overwrite it")
                plan.append((src, dst))
    return plan


def _place_all(plan, ours: set[Path], targets: dict, link: str, manifest_path: Path, manifest_base: dict,
               progress: bool) -> dict:
    """Remove our own files of the previous run (they may belong to another split now), place every planned file,
    and write the manifest, also when interrupted (so a re-run with --overwrite may replace what was written)."""
    sources = {src.resolve() for src, _ in plan}
    for old in ours:  # never a file this run reads
        if (old.is_symlink() or old.exists()) and old.resolve() not in sources:
            old.unlink()
    for img_dir, gt_dir in targets.values():
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
    written = []
    steps = plan
    if progress:
        steps = tqdm(plan, desc=f"prepare ({link})", unit="file")
    try:
        for src, dst in steps:
            _place(src, dst, link)
            written.append(str(dst.absolute()))
    finally:
        _write_manifest(manifest_path, {**manifest_base, "written": written, "complete": False})
    manifest = {**manifest_base, "written": written, "complete": True}
    _write_manifest(manifest_path, manifest)
    return manifest
