"""``r2unet predict``: a folder (or file) of images in, a mask per image (and probability maps, overlays) out, at
each image's own size: a file loop around ``engine.inference`` that reads ahead and writes behind on threads."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..data.imageio import DataError, is_image_file
from ..data.pairs import mask_stem_for
from ..engine.inference import OUTPUT_SUFFIXES, Segmenter, default_workers, read_gt_for, render_outputs
from ..engine.postprocess import shown
from ..fileio import atomic_write_bytes, atomic_write_text, is_whole_image
from ..progress import track


def list_inputs(path: str | Path) -> list[Path]:
    """The images to segment: ``path`` itself, or the images in the folder ``path`` (not its subfolders), leaving out
    files named like predict's own outputs (so a folder used as both input and output is not segmented twice).
    Two images whose outputs would have the same name (``a.jpg`` and ``a.png``) are refused before any work."""
    path = Path(path)
    if path.is_file():
        if not is_image_file(path):
            raise DataError(f"{path}: not an image (expected .jpg .jpeg .png .bmp .tif .tiff)")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith(".")
                       and not p.name.endswith(OUTPUT_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no images found (looked for .jpg .jpeg .png .bmp .tif .tiff)")
        by_stem: dict[str, list[str]] = {}
        for p in files:
            by_stem.setdefault(p.stem, []).append(p.name)
        clashes = [" and ".join(names) for names in by_stem.values() if len(names) > 1]
        if clashes:
            raise DataError(f"{path}: images whose masks would overwrite each other (same name, other extension): "
                            + "; ".join(clashes) + ". Rename or move one of each.")
        return files
    raise DataError(f"--input: {path} does not exist")


def find_gt(masks: dict[str, Path], image: Path) -> Path | None:
    """``image``'s mask among ``masks`` (lower-cased stem -> file, see ``gt_masks``), by the pairing rules."""
    return next((masks[s.lower()] for s in mask_stem_for(image.stem) if s.lower() in masks), None)


def gt_masks(gt_dir: Path) -> dict[str, Path]:
    """The mask files of a --gt_dir by lower-cased stem (the pairing rules compare names so)."""
    return {p.stem.lower(): p for p in sorted(gt_dir.iterdir(), reverse=True) if p.is_file() and is_image_file(p)}


class GroundTruthScores:
    """With ``--gt_dir``: each predicted image that has a mask there (by the pairing rules), scored at its own size
    against that mask as ``evaluate --resolution original`` scores; one line per image and the mean, in the log and
    in ``scores.csv``. ``score`` is called from the writing threads, each image with its own accumulator."""

    def __init__(self, gt_dir: Path, task, threshold: float):
        if not gt_dir.is_dir():
            raise DataError(f"--gt_dir: {gt_dir} does not exist")
        self.gt_dir, self.task, self.threshold = gt_dir, task, threshold
        self.index = gt_masks(gt_dir)
        self.rows: dict[Path, dict[str, float]] = {}

    def truth(self, path: Path, shape: tuple[int, int]) -> np.ndarray | None:
        found = find_gt(self.index, path)
        return None if found is None else read_gt_for(found, path, shape, self.task.targets)

    def score(self, path: Path, prediction: np.ndarray, threshold: float, truth: np.ndarray) -> None:
        accumulator = self.task.accumulator(threshold)
        self.task.score(accumulator, prediction, truth)
        self.rows[path] = accumulator.compute()

    def report(self, paths: list[Path], output: Path, log) -> None:
        scored = [p for p in paths if p in self.rows]
        if not scored:
            log(f"--gt_dir: none of the {len(paths)} image(s) has a mask in {self.gt_dir} (looked for <stem>.*, "
                "<stem>_segmentation.*, <stem>_mask.* ...): nothing scored")
            return
        width = max(len(p.name) for p in scored)
        for p in scored:
            log(f"  {p.name:<{width}}  JS {self.rows[p]['JS']:.4f}  DC {self.rows[p]['DC']:.4f}")
        names = list(self.rows[scored[0]])
        means = {k: float(np.mean([self.rows[p][k] for p in scored])) for k in names}
        missing = len(paths) - len(scored)
        log(f"mean of {len(scored)} image(s) against {self.gt_dir}: JS {means['JS']:.4f}  DC {means['DC']:.4f}"
            + (f" ({missing} without a mask there, not scored)" if missing else "")
            + f"; every score of every image: {output / 'scores.csv'}")
        lines = ["image," + ",".join(names)] + [f"{p.name}," + ",".join(f"{self.rows[p][k]:.6f}" for k in names)
                                                 for p in scored]
        atomic_write_text(output / "scores.csv", "\n".join(lines) + "\n")


def run_predict(segmenter: Segmenter, input_path: str | Path, output: str | Path,
                batch_size: int | None = None, tta: bool = False, save_probs: bool = False,
                save_overlay: bool = False, gt_dir: str | Path | None = None, progress: bool | None = None,
                skip_existing: bool = False, log=print) -> list[Path]:
    """Write ``<stem>_segmentation.png`` for each input (the task's mask file: 0/255 for a binary mask, a palette
    PNG of the classes for label maps), plus probability maps and overlays on request (``render_outputs``): a file
    loop around ``segmenter.predict``, which reads ahead while threads write behind. ``progress``: a bar (default:
    on a terminal), else a ``log`` line once a minute. Every file is written whole or not at all;
    ``skip_existing`` leaves out the images whose requested outputs are all there already (to continue an
    interrupted run). Returns the masks written.

    Images that cannot be read are skipped and the others still written; then a ``PartialPrediction`` (a DataError)
    names every skipped file and carries the written paths."""
    task = segmenter.task
    if save_probs and not task.probability_maps:
        raise DataError(f"--save_probs: for binary masks only; this model segments {task.classes} classes")
    paths = list_inputs(input_path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    suffixes = [s for s, wanted in zip(OUTPUT_SUFFIXES, (True, save_probs, save_overlay)) if wanted]
    if skip_existing:  # done: every output there and whole (a file cut short by a full disk is made again)
        broken = [f for p in paths for s in suffixes if (f := output / f"{p.stem}{s}").is_file()
                  and not is_whole_image(f)]
        if broken:
            log(f"{len(broken)} output file(s) in {output} are incomplete and are made again: "
                + ", ".join(f.name for f in broken[:5]) + (" ..." if len(broken) > 5 else ""))
        todo = [p for p in paths if not all(is_whole_image(output / f"{p.stem}{s}") for s in suffixes)]
        if len(todo) < len(paths):
            log(f"skipping {len(paths) - len(todo)} image(s) whose outputs are already in {output} "
                f"(--skip_existing); {len(todo)} to go")
        paths = todo
        if not paths:
            return []
    truths = GroundTruthScores(Path(gt_dir), task, segmenter.threshold) if gt_dir else None
    failed: list[str] = []
    results = segmenter.predict(paths, batch_size, tta, on_error=lambda path, exc: failed.append(str(exc)))
    results = track(results, len(paths), "predict", log=log, terminal=progress)

    def write(path: Path, image: np.ndarray, probs: np.ndarray) -> Path:
        truth = truths.truth(path, probs.shape) if truths else None
        if truth is not None:  # the mask written is scored
            truths.score(path, *shown(task, probs, segmenter.threshold, segmenter.post), truth)
        outputs = render_outputs(path, image, probs, task, threshold=segmenter.threshold, save_probs=save_probs,
                                 save_overlay=save_overlay, gt=truth if task.outlines_truth else None,
                                 post=segmenter.post)
        for suffix, data in outputs.items():  # the mask last: its file marks the image done
            atomic_write_bytes(output / f"{path.stem}{suffix}", data)
        return output / f"{path.stem}{OUTPUT_SUFFIXES[0]}"

    workers = default_workers()
    written: list[Path] = []
    with ThreadPoolExecutor(workers) as pool:  # encoding and writing overlap the next images' prediction
        in_flight: deque = deque()
        try:
            for path, image, probs in results:
                in_flight.append(pool.submit(write, path, image, probs))
                while len(in_flight) > workers:  # bounded: each holds a full-resolution probability map
                    written.append(in_flight.popleft().result())
            while in_flight:
                written.append(in_flight.popleft().result())
        except KeyboardInterrupt:  # the writes already queued finish (whole files) as the pool shuts down
            log(f"interrupted: the files written to {output} so far are complete; run the same command with "
                "--skip_existing to continue")
            raise
    if truths:
        truths.report(paths, output, log)
    if failed:
        raise PartialPrediction(written, failed)
    return written


class PartialPrediction(DataError):
    """Some inputs could not be read: the others were written (``written``); ``failed`` names each skipped file."""

    def __init__(self, written: list[Path], failed: list[str]):
        self.written, self.failed = written, failed
        listing = "\n  ".join(failed)
        super().__init__(f"{len(failed)} image(s) could not be read and were skipped ({len(written)} mask(s) "
                         f"written):\n  {listing}")


def predict_checkpoint(checkpoints, input_path: str | Path, output: str | Path, *,
                       model_overrides: dict | None = None, device: str = "auto", amp: str | None = None,
                       image_size: int | None = None, threshold: float | None = None, log=print,
                       postprocess: str = "auto", runtime: str = "auto", **options) -> list[Path]:
    """``r2unet predict``: load the model (or the models of an ensemble, ``Segmenter``) and run ``run_predict``
    on ``input_path``; ``options``: ``run_predict``'s."""
    segmenter = Segmenter(checkpoints, model_overrides=model_overrides, device=device, amp=amp,
                          image_size=image_size, threshold=threshold, log=log, postprocess=postprocess,
                          runtime=runtime)
    if segmenter.post.active:
        log(f"postprocessing {segmenter.post.headline()}; --postprocess none leaves it out")
    with torch.inference_mode():
        return run_predict(segmenter, input_path, output, log=log, **options)
