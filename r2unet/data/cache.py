"""Decode-once cache: every image and mask of a split decoded once, resized, and stored as memory-mapped uint8 arrays.

Layout of ``<cache_root>/<split>-<size>/``:

- ``images.npy``  uint8 (N, S, S, 3): each image resized to S x S (stretched);
- ``masks.npy``   uint8 (N, S, S):   each mask, binarised then resized by majority vote (stays 0/1);
- ``done.npy``    bool  (N,):        rows already decoded (an interrupted build resumes where it stopped);
- ``meta.json``   version, S, and per row the file names, a fingerprint (size, mtime) and the original height/width.

Images are stored as squares so that a batch is one fixed-shape gather from the memory map. Nothing of the original
geometry is lost: the original aspect ratio is recorded and the augmentation maps output pixels through it
(``augment.py``), which is exactly equivalent to resizing with the aspect ratio kept. JPEGs are decoded in draft mode
at the smallest 1/2^k scale that still covers S x S, which is several times faster for 4 MB photos.

The cache is re-validated against the folder on every open: rows whose source changed are decoded again, new files
are added and removed ones dropped, so a dataset folder that changes under a cache is detected and never served stale.
Processes that build the same cache at once (two runs started on one dataset) take turns through a lock file
(``.lock``): the second waits, then finds the cache up to date.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

from .. import defaults
from ..fileio import atomic_write_text, free_space
from ..progress import track
from .imageio import DataError, NotBinaryMask, label_maps_among, mask_frame, read_image
from .pairs import checked_pairs, note_ambiguous, report_problems, split_folders
from .targets import BINARY, Targets

try:
    import fcntl
except ImportError:  # Windows: cache builds are not locked
    fcntl = None

CACHE_VERSION = 1


def cache_side(image_size: int) -> int:
    """Stored side S for a training size: the augmentation crops ~80% of the frame, so S ~ 1.3 x image_size."""
    return int(-(-image_size * 1.3 // 16) * 16)


def _file_fp(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def decode_pair(image: str, mask: str, side: int, targets: Targets = BINARY, notes: list[str] | None = None
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Decode one pair at the cache size: (image (S, S, 3) uint8, mask (S, S) uint8, original (h, w)); ``targets``
    reads the mask file and shrinks it (``targets.py``). ``notes`` hears the mask's name when it is a palette image
    whose indices are not the classes of the colour table (it is read by colour: ``read_label_map``)."""
    m = targets.read(mask, notes)
    h, w = m.shape
    oriented, _ = mask_frame(image, (w, h))  # the photo as shown, or its stored pixels (an EXIF-unaware mask)
    if oriented is None:
        raise DataError(f"{mask}: mask size {w}x{h} does not match image {Path(image).name}")
    img = read_image(image, min_size=(side, side), oriented=oriented)
    small = np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR))
    return small, targets.shrink(m, side), (h, w)


def _exit_with(parent: int) -> None:
    """In each decoding worker: exit when the process that started the pool is gone (``kill -9``, a crash) instead
    of waiting on its queue forever. A forked worker on Linux asks the kernel for the signal; otherwise (forkserver,
    spawn, other systems) a thread checks every second that the process is still there."""
    if sys.platform.startswith("linux") and os.getppid() == parent:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        else:
            if os.getppid() == parent:  # else it died before the request took effect
                return

    def alive() -> bool:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def watch():
        while alive():
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _decode_row(args):
    """(row, image, mask, (h, w), error, notes) of one pair; the error a message, or the ``NotBinaryMask`` that
    stops the build."""
    row, image, mask, side, targets = args
    notes: list[str] = []
    try:
        return row, *decode_pair(image, mask, side, targets, notes), None, notes
    except NotBinaryMask as exc:  # not a bad file: the set is label maps (the builder stops and says so)
        return row, None, None, None, exc, notes
    except DataError as exc:
        return row, None, None, None, str(exc), notes


class SplitCache:
    """One split's cache: ``names[i]``, ``original_hw[i]`` (h, w) and ``aspect[i]`` = h / w of the i-th usable image;
    ``batch(indices)`` reads images (B, S, S, 3) and masks (B, S, S) from the memory-mapped arrays.

    Pickling carries the folder and the row table, not the pixels, and the copy maps the files again: DataLoader
    workers started by spawn or forkserver (macOS, Windows, Python >= 3.14 on Linux) share the page cache instead of
    each receiving a private copy of the whole split through a pipe."""

    def __init__(self, folder: Path, names: list[str], original_hw: np.ndarray, rows: np.ndarray):
        self.folder, self.names = Path(folder), names
        self.original_hw = original_hw  # (N, 2) int
        self.rows = rows  # (N,) rows of the arrays on disk (rows of files that failed to decode are left out)
        self._map()

    def _map(self) -> None:
        self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        self._masks = np.load(self.folder / "masks.npy", mmap_mode="r")
        self._all_rows = len(self.rows) == len(self._images) and bool((self.rows == np.arange(len(self.rows))).all())

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_images", "_masks", "_all_rows")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, S, S, 3) and masks (B, S, S), uint8, of the usable images at ``indices`` (one gather each)."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        return self._images[rows], self._masks[rows]

    @property
    def images(self) -> np.ndarray:
        """All images (N, S, S, 3): the memory map itself, or a copy of the usable rows when some were left out."""
        return self._images if self._all_rows else self._images[self.rows]

    @property
    def masks(self) -> np.ndarray:
        """All masks (N, S, S), like ``images``."""
        return self._masks if self._all_rows else self._masks[self.rows]

    @property
    def aspect(self) -> np.ndarray:
        return self.original_hw[:, 0] / self.original_hw[:, 1]

    def __len__(self) -> int:
        return len(self.names)


def build_cache(
    image_dir: str | Path,
    mask_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = defaults.IMAGE_SIZE,
    num_workers: int | None = None,
    skip_bad: bool = False,
    progress: bool | None = None,
    log=print,
    targets: Targets = BINARY,
    donors: Sequence[str | Path] = (),
) -> SplitCache:
    """Create or update the cache of one split folder pair and open it (see the module docstring). ``progress``: a
    progress bar while decoding (default: on a terminal); without it, a ``log`` line once a minute on long builds.
    An up-to-date cache is opened without writing anything (it may sit on a read-only file system). ``targets``:
    what the masks are (``targets.py``: binary masks or label maps). ``donors``: other cache folders (of other
    splits or datasets of the same files: cross-validation's folds) whose rows of the same files, by name and
    fingerprints, are copied instead of decoded again; they are only read, and must not be rebuilt with another
    file list meanwhile (their meta and arrays are read one after the other)."""
    side = cache_side(image_size)
    cache_dir = Path(cache_dir)
    pairs, problems, _ = checked_pairs(image_dir, mask_dir)
    # Problems are reported together after decoding the good pairs, so one run lists every bad file.

    entries = [{"image": p.image.name, "mask": p.mask.name, "fp": _file_fp(p.image) + "|" + _file_fp(p.mask),
                "hw": None} for p in pairs]

    def current():  # (its meta, the cache opened as it is if every row is up to date, else None)
        old = _read_meta(cache_dir / "meta.json", side, targets)
        if old is None or not _up_to_date(cache_dir, old["entries"], entries):
            return old, None
        targets.check([p.mask for p in pairs], old)  # a cache built before masks were checked: a sample
        report_problems(problems, skip_bad, log)
        return old, open_cache(cache_dir, side, targets)

    old, cache = current()
    if cache is not None:
        return cache
    try:
        with _build_lock(cache_dir, log):
            old, cache = current()  # another process may have built it while this one waited
            if cache is not None:
                return cache
            return _build(pairs, problems, entries, old, cache_dir, side, image_dir, num_workers, skip_bad,
                          progress, log, targets, donors)
    except OSError as exc:  # a read-only or full file system, no permission
        raise DataError(f"cannot write the cache in {cache_dir}: {exc.strerror or exc}; choose a writable folder "
                        "with --cache_dir (train, evaluate)") from exc


@contextmanager
def _build_lock(cache_dir: Path, log=print):
    """One builder at a time per cache folder, across processes: an exclusive ``flock`` on ``cache_dir/.lock``,
    released when the builder ends or dies. Without it two builders replace each other's arrays mid-build. The
    holder removes the file when it is done, so nothing stays behind (a refused build leaves no file); a waiter that
    then holds the removed file's lock tries again on the new one. Without ``fcntl`` (Windows) there is no lock."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = cache_dir / ".lock"
    said = False
    while True:
        f = open(path, "a")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    log(f"waiting for another process building the cache in {cache_dir}")
                    said = True
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)  # before the lock is released: no one can hold this file then
                return
        finally:
            f.close()  # releases the lock


def _up_to_date(cache_dir: Path, old_entries: list[dict], entries: list[dict]) -> bool:
    """Every file pair is cached as it is now (same names, order and fingerprints), and every row is done."""
    if [(e["image"], e["fp"]) for e in old_entries] != [(e["image"], e["fp"]) for e in entries]:
        return False
    if any(e.get("hw") is None for e in old_entries):  # a build stopped between a row and the meta that names it
        return False
    try:
        return bool(np.load(cache_dir / "done.npy", mmap_mode="r").all())
    except (OSError, ValueError):
        return False


def _row_usable(done, prev: dict, entry: dict) -> bool:
    """A cached row can be kept: it was decoded, from the same file, and the meta recorded its size. The memory
    map's rows and flags reach the disk as they are written, the meta only every 64 rows: after a kill in between,
    a row may be flagged done while the meta lacks its size; it is decoded again."""
    return bool(done) and prev["fp"] == entry["fp"] and prev.get("hw") is not None


def _build(pairs, problems, entries, old, cache_dir: Path, side: int, image_dir, num_workers, skip_bad, progress,
           log, targets: Targets, donors: Sequence[str | Path] = ()) -> SplitCache:
    """Decode the rows the cache lacks into its arrays (keeping every row still valid, and copying those the
    ``donors`` hold), then open it."""
    if old:
        targets.check([p.mask for p in pairs], old)  # rows kept from a build before masks were checked: a sample
    arrays = _arrays_keeping_rows(cache_dir, side, entries, old)
    for donor in map(Path, donors):
        if donor.resolve() != cache_dir.resolve():
            _carry_rows(arrays, entries, donor, _read_meta(donor / "meta.json", side, targets))

    def save_meta():
        for arr in arrays.values():
            arr.flush()
        _write_meta(cache_dir / "meta.json", side, entries, targets)

    save_meta()  # first, with the rows not yet decoded marked, so an interrupted build is resumable
    todo = [i for i in range(len(entries)) if not arrays["done.npy"][i]]
    failed, reordered = [], []
    if todo:
        workers = max(1, min(num_workers or os.cpu_count() or 1, len(todo)))
        log(f"caching {len(todo)} of {len(entries)} images from {image_dir} at {side}x{side} ({workers} worker(s))")
        note_ambiguous([pairs[i] for i in todo], log)
        failed, reordered = _decode_rows(arrays, todo, pairs, entries, side, targets, workers, save_meta,
                                         lambda rows: track(rows, len(todo), f"cache {Path(image_dir).name}", log=log,
                                                            terminal=progress))
        save_meta()
    arrays.clear()  # the memory maps closed before the cache is opened read-only
    if reordered:
        log(f"warning: {len(reordered)} palette label map(s) number their classes differently from --class_colors ("
            + ", ".join(reordered[:5]) + (" ..." if len(reordered) > 5 else "") + "); read by their colours, so each "
            "pixel has the class --class_colors gives its colour")
    report_problems(problems + [err for _, err in failed], skip_bad, log)
    return open_cache(cache_dir, side, targets)


def _arrays_keeping_rows(cache_dir: Path, side: int, entries: list[dict], old: dict | None) -> dict:
    """The cache's arrays, open for writing, with every row still valid kept (``_row_usable``; its size copied
    into ``entries``) and the others marked not done: the arrays as they are when the files are the same list,
    else new arrays (blocks claimed up front) into which the valid rows are carried over."""
    n = len(entries)
    shapes = {"images.npy": (n, side, side, 3), "masks.npy": (n, side, side), "done.npy": (n,)}
    dtypes = {"images.npy": np.uint8, "masks.npy": np.uint8, "done.npy": np.bool_}
    same_layout = old is not None and [e["image"] for e in old["entries"]] == [e["image"] for e in entries]
    if same_layout and all((cache_dir / f).exists() for f in shapes):
        _reserve(cache_dir, list(shapes))  # a cache from before blocks were claimed up front may be sparse
        arrays = {f: np.load(cache_dir / f, mmap_mode="r+") for f in shapes}
        done = arrays["done.npy"]
        for i, e in enumerate(entries):
            prev = old["entries"][i]
            if _row_usable(done[i], prev, e):
                e["hw"] = prev["hw"]
            else:
                done[i] = False
        return arrays
    arrays = _new_arrays(cache_dir, shapes, dtypes)
    arrays["done.npy"][:] = False
    _carry_rows(arrays, entries, cache_dir, old)  # rows still valid (files renamed, added or removed elsewhere)
    for arr in arrays.values():
        arr.flush()
    for f in shapes:
        os.replace(cache_dir / f"{f}.new", cache_dir / f)
    return {f: np.load(cache_dir / f, mmap_mode="r+") for f in shapes}


def _carry_rows(arrays: dict, entries: list[dict], folder: Path, meta: dict | None) -> int:
    """Copy into ``arrays`` the rows not yet done whose files the cache in ``folder`` (described by ``meta``: this
    cache's previous build, or a donor of the same size and targets) holds still valid (``_row_usable``: the same
    image name and fingerprints, decoded, its size recorded); their sizes go into ``entries``. Returns how many."""
    if not meta:
        return 0
    rows = {e["image"]: (i, e) for i, e in enumerate(meta["entries"])}
    try:
        source = {f: np.load(folder / f, mmap_mode="r") for f in ("images.npy", "masks.npy", "done.npy")}
    except (OSError, ValueError):
        return 0
    carried = 0
    for i, e in enumerate(entries):
        j, prev = rows.get(e["image"], (None, None))
        if prev is None or arrays["done.npy"][i] or j >= len(source["done.npy"]) \
                or not _row_usable(source["done.npy"][j], prev, e):
            continue
        arrays["images.npy"][i] = source["images.npy"][j]
        arrays["masks.npy"][i] = source["masks.npy"][j]
        arrays["done.npy"][i] = True
        e["hw"] = prev["hw"]
        carried += 1
    return carried


def _decode_rows(arrays: dict, todo: list[int], pairs, entries: list[dict], side: int, targets: Targets,
                 workers: int, save_meta, track_rows) -> tuple[list, list[str]]:
    """Decode the pairs of the rows ``todo`` (in ``workers`` processes) into ``arrays``, saving the meta every 64
    rows: (rows that failed with their message, names of palette maps read by colour). A label map read as a binary
    mask stops the build (``LabelMapsFound``), the rows done so far kept."""
    failed, reordered = [], []
    jobs = [(i, str(pairs[i].image), str(pairs[i].mask), side, targets) for i in todo]
    pool = ProcessPoolExecutor(workers, initializer=_exit_with, initargs=(os.getpid(),)) if workers > 1 else None
    with pool or nullcontext():
        results = track_rows(pool.map(_decode_row, jobs, chunksize=4) if pool else map(_decode_row, jobs))
        for k, (i, img, mask, hw, err, notes) in enumerate(results):
            reordered += notes
            if isinstance(err, NotBinaryMask):  # binarised, its classes would vanish or merge: stop, say so
                if pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                save_meta()
                raise label_maps_among([p.mask for p in pairs], found=[err])
            if err:
                failed.append((i, err))
                continue
            arrays["images.npy"][i] = img
            arrays["masks.npy"][i] = mask
            arrays["done.npy"][i] = True
            entries[i]["hw"] = list(hw)
            if k % 64 == 63:
                save_meta()
    return failed, reordered


def _new_arrays(cache_dir: Path, shapes: dict, dtypes: dict) -> dict:
    """The arrays as ``<name>.new`` memory maps, their disk blocks claimed before any row is written; on a disk
    without room for them, a DataError and no file left behind."""
    try:
        for f in shapes:  # created, then closed: nothing is written into them before the blocks are claimed
            np.lib.format.open_memmap(cache_dir / f"{f}.new", mode="w+", dtype=dtypes[f], shape=shapes[f])
        _reserve(cache_dir, [f"{f}.new" for f in shapes])
    except BaseException:
        for f in shapes:
            (cache_dir / f"{f}.new").unlink(missing_ok=True)
        raise
    return {f: np.load(cache_dir / f"{f}.new", mmap_mode="r+") for f in shapes}


def _reserve(cache_dir: Path, names: list[str]) -> None:
    """Claim the disk blocks of memory-mapped files before rows are written into them: a write into a sparse file on
    a full disk is no exception but a SIGBUS, which kills the process at once and leaves its workers running."""
    stats = {cache_dir / name: (cache_dir / name).stat() for name in names}
    missing = sum(max(0, st.st_size - getattr(st, "st_blocks", 0) * 512) for st in stats.values())
    free = shutil.disk_usage(cache_dir).free
    if missing > free:
        raise DataError(f"cannot write the cache in {cache_dir}: it needs {missing / 2**20:.1f} MiB more and "
                        f"{free_space(cache_dir)}; free some space or choose another folder with --cache_dir "
                        "(train, evaluate)")
    for p, st in stats.items() if hasattr(os, "posix_fallocate") else ():  # the check above can race other writers
        fd = os.open(p, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, st.st_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DataError(f"cannot write the cache in {cache_dir}: no space left for {p.name} "
                                f"({st.st_size / 2**20:.1f} MiB; {free_space(cache_dir)}); free some space "
                                "or choose another folder with --cache_dir (train, evaluate)") from None
            # EINVAL / EOPNOTSUPP: a file system without fallocate; the free-space check stands
        finally:
            os.close(fd)


def open_cache(cache_dir: str | Path, side: int, targets: Targets = BINARY) -> SplitCache:
    """Open a complete cache read-only; rows that failed to decode (skipped bad files) are left out."""
    cache_dir = Path(cache_dir)
    meta = _read_meta(cache_dir / "meta.json", side, targets)
    if meta is None:
        raise DataError(f"{cache_dir}: no cache at size {side}; build it with build_cache")
    done = np.load(cache_dir / "done.npy")
    keep = np.flatnonzero(done)
    if len(keep) == 0:
        raise DataError(f"{cache_dir}: no usable images in this split")
    entries = meta["entries"]
    hw = np.array([entries[i]["hw"] for i in keep], dtype=np.int64)
    return SplitCache(cache_dir, [entries[i]["image"] for i in keep], hw, keep)


def _read_meta(path: Path, side: int, targets: Targets) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("version") != CACHE_VERSION or meta.get("side") != side or not targets.matches(meta):
        return None
    return meta


def _write_meta(path: Path, side: int, entries: list[dict], targets: Targets) -> None:
    meta = {"version": CACHE_VERSION, "side": side, "entries": entries, **targets.meta()}
    atomic_write_text(path, json.dumps(meta))


# ---------------------------------------------------------------------------------- the caches of a dataset's splits
CACHE_DIRNAME = ".r2unet_cache"

def cache_folder(data_path: str | Path, split: str, image_size: int, cache_dir: str | Path | None = None,
                 targets: Targets = BINARY) -> Path:
    """Where the cache of ``data_path``'s ``split`` at ``image_size`` lives (``cache_dir``, else in the dataset)."""
    root = Path(cache_dir) if cache_dir else Path(data_path) / CACHE_DIRNAME
    return root / targets.cache_name(f"{split}-{cache_side(image_size)}")

def require_split(data_path: str | Path, split: str) -> None:
    """A DataError naming what is missing and what to run, unless ``data_path`` holds ``split`` and ``split_GT``."""
    data_path = Path(data_path)
    for folder in split_folders(data_path, split):
        if not folder.is_dir():
            raise DataError(f"--data_path: {folder} is missing; a prepared dataset holds train/ train_GT/ valid/ "
                            f"valid_GT/ test/ test_GT/ (run 'r2unet prepare --data_path {data_path} ...' first)")

def split_cache(data_path: str | Path, split: str, image_size: int, cache_dir: str | Path | None = None,
                targets: Targets = BINARY, **build_kwargs) -> SplitCache:
    """Build (or validate and reuse) the cache of ``data_path/<split>`` + ``data_path/<split>_GT`` and open it.
    ``targets``: what the masks are (``targets.py``)."""
    data_path = Path(data_path)
    require_split(data_path, split)
    folder = cache_folder(data_path, split, image_size, cache_dir, targets)
    return build_cache(*split_folders(data_path, split), folder, image_size=image_size, targets=targets,
                       **build_kwargs)

def open_split_cache(data_path: str | Path, split: str, image_size: int, cache_dir=None,
                     targets: Targets = BINARY) -> SplitCache:
    """Open an existing cache (built by another process) without revalidating it."""
    return open_cache(cache_folder(Path(data_path), split, image_size, cache_dir, targets), cache_side(image_size),
                      targets)
