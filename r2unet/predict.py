"""Segment new images with a trained model: masks at each image's original resolution, probability maps, overlays."""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.augment import eval_images
from .data.io import (
    DataError,
    InMemory,
    is_image_file,
    label_map_image,
    orient_as_shown,
    read_image,
    read_label_map,
    read_mask,
)
from .data.io import image_size as image_size_of
from .data.pairs import mask_stem_for
from .fileio import atomic_write_bytes, encode_image, is_whole_image
from .plots import blend, overlay
from .progress import track

OUTPUT_SUFFIXES = ("_segmentation.png", "_prob.png", "_overlay.jpg")  # what run_predict writes per image


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


def _to_input(image: np.ndarray, image_size: int, img_ch: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, C, S, S) normalised, resized as in training (square, antialiased)."""
    x = eval_images(torch.from_numpy(np.array(image)).unsqueeze(0), image_size)
    return x.mean(1, keepdim=True) if img_ch == 1 else x


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits (B, C, S, S). With ``tta``, the probabilities (sigmoid, or softmax over classes) of the identity,
    horizontal and vertical flips are averaged (each flipped back) and returned as logits of that mean."""
    if not tta:
        return model(x).float()
    logits = model(x).float()
    act = torch.sigmoid if logits.shape[1] == 1 else (lambda z: torch.softmax(z, dim=1))
    probs = act(logits)
    for dims in ((3,), (2,)):
        probs += act(model(x.flip(dims)).float()).flip(dims)
    probs /= 3
    return torch.logit(probs.clamp(1e-7, 1 - 1e-7)) if logits.shape[1] == 1 else probs.clamp_min(1e-7).log()


def _decode(path: Path, image_size: int, img_ch: int) -> tuple[tuple[int, int], np.ndarray, torch.Tensor]:
    """((h, w) as displayed, the decoded image, the network input (1, C, S, S)) of one file."""
    w, h = image_size_of(path)  # as displayed (EXIF orientation applied), like the pixels read below
    img = read_image(path, min_size=(2 * image_size, 2 * image_size))
    return (h, w), img, _to_input(img, image_size, img_ch)


def default_workers() -> int:
    """Threads for decoding, resizing and writing (PIL and torch release the GIL for that work)."""
    return max(1, min(8, os.cpu_count() or 1))


def predict_images(model: torch.nn.Module, paths: Iterable[Path], image_size: int, device: torch.device,
                   batch_size: int = 8, tta: bool = False, img_ch: int = 3,
                   on_error: Callable[[Path, DataError], None] | None = None, workers: int | None = None,
                   autocast: Callable | None = None,
                   channels_last: bool = False) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """Yield (path, image (H, W, 3) uint8, probabilities (H, W) float32 at the original resolution) per image, in
    the order of ``paths``.

    Images are decoded with JPEG draft mode at no less than twice the network size, so a 6000x4000 photo never
    needs its full-resolution pixels in memory; the logits are resized back to the original size before the
    sigmoid (and the caller's threshold). ``workers`` threads decode the next batch and resize the last one's
    probabilities while the network runs. An image that cannot be decoded raises its DataError, or with
    ``on_error`` is passed to it and left out. ``autocast``: a context-manager factory for the forward pass (mixed
    precision), ``channels_last``: the memory format of a channels-last model's input."""
    model.eval().to(device)
    paths = list(paths)
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        def decode_ahead(k: int) -> list:
            return [(p, pool.submit(_decode, p, image_size, img_ch)) for p in batches[k]] if k < len(batches) else []

        pending = decode_ahead(0)
        for k in range(len(batches)):
            current, pending = pending, decode_ahead(k + 1)
            chunk, images, sizes, inputs = [], [], [], []
            for p, decoded in current:
                try:
                    (h, w), img, x = decoded.result()
                except DataError as exc:
                    if on_error is None:
                        raise
                    on_error(p, exc)
                    continue
                chunk.append(p)
                sizes.append((h, w))
                images.append(img)
                inputs.append(x)
            if not chunk:
                continue
            x = torch.cat(inputs).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = predict_logits(model, x, tta).cpu()
            resized = [pool.submit(_upsample_probs, lg, h, w) for lg, (h, w) in zip(logits, sizes)]
            for p, img, probs in zip(chunk, images, resized):
                yield p, img, probs.result()


def _upsample_probs(logits: torch.Tensor, h: int, w: int, max_pixels: int = 2**24) -> np.ndarray:
    """Bilinear resize of (1, S, S) logits to (h, w), then sigmoid; done in row bands for very large images. Logits
    of several classes (K, S, S) give the class map (h, w) uint8 (the argmax of the resized logits)."""
    full = logits.unsqueeze(0).float().cpu()
    finish = (lambda up: up.sigmoid()[0, 0]) if full.shape[1] == 1 else (lambda up: up.argmax(1)[0].byte())
    if h * w * full.shape[1] <= max_pixels:  # up to 16 MP in one go (64 MB): 3x faster than bands for a 12 MP photo
        return finish(F.interpolate(full, size=(h, w), mode="bilinear", align_corners=False)).numpy()
    out = np.empty((h, w), np.float32 if full.shape[1] == 1 else np.uint8)
    band = max(1, max_pixels // max(1, w * full.shape[1]))
    # Bands: compute source rows for each band with the same sampling grid as one big interpolate.
    s = full.shape[-2]
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        ys = (torch.arange(y0, y1, dtype=torch.float32) + 0.5) * s / h - 0.5
        yn = (ys + 0.5) / s * 2 - 1  # normalised, align_corners=False
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * full.shape[-1] / w - 0.5
        xn = (xs + 0.5) / full.shape[-1] * 2 - 1
        grid = torch.stack(torch.meshgrid(yn, xn, indexing="ij")[::-1], -1).unsqueeze(0)
        up = F.grid_sample(full, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[y0:y1] = finish(up).numpy()
    return out


def read_gt_for(mask_path: Path, image_path: Path, shape: tuple[int, int], labels: tuple | None = None
                ) -> np.ndarray:
    """The ground-truth mask of ``image_path`` as bool (H, W) in the frame the image is shown in: a mask drawn on the
    stored pixels of an EXIF-turned photo is turned too. A size that fits neither frame is a DataError. ``labels``
    (num_classes, class colours or None): a label map, as class indices (H, W) uint8."""
    gt = read_mask(mask_path) if labels is None else read_label_map(mask_path, *labels)
    if gt.shape != shape:  # perhaps drawn on the stored pixels of an EXIF-turned photo
        gt = orient_as_shown(gt, image_path)
    if gt.shape != shape:
        raise DataError(f"{mask_path}: size {gt.shape[1]}x{gt.shape[0]} differs from {image_path.name} "
                        f"({shape[1]}x{shape[0]})")
    return gt


@torch.no_grad()
def score_at_original_resolution(model: torch.nn.Module, pairs, image_size: int, device: torch.device, accumulator,
                                 batch_size: int = 8, tta: bool = False, img_ch: int = 3, autocast=None,
                                 channels_last: bool = False, progress: bool | None = None, labels: tuple | None = None,
                                 log=print) -> None:
    """Add each (image, mask) pair's scores to ``accumulator`` (a ``MetricAccumulator``) at the image's original
    resolution, as the ISIC 2018 challenge scored: the prediction is made exactly as ``predict`` makes it (network
    size in, logits resized back to the original size) and compared with the mask file as it is, pixel for pixel.
    ``pairs``: objects with ``.image`` and ``.mask`` paths; ``autocast``, ``channels_last``: see
    ``predict_images``; ``labels``: (num_classes, class colours or None) for label maps (class maps compared)."""
    pairs = list(pairs)
    masks = {p.image: p.mask for p in pairs}
    results = predict_images(model, [p.image for p in pairs], image_size, device, batch_size, tta, img_ch,
                             autocast=autocast, channels_last=channels_last)
    for path, _, probs in track(results, len(pairs), "scoring at the original resolution", log=log,
                                terminal=progress):
        gt = read_gt_for(masks[path], path, probs.shape, labels)
        if labels is not None:  # a class map: scored as the one-hot "probabilities" of its classes
            probs = F.one_hot(torch.from_numpy(probs).long(), labels[0]).permute(2, 0, 1).numpy()
            accumulator.update(torch.from_numpy(probs)[None], torch.from_numpy(gt)[None, None].float())
        else:
            accumulator.update(torch.from_numpy(probs)[None, None], torch.from_numpy(gt)[None, None].float())


def find_gt(masks: dict[str, Path], image: Path) -> Path | None:
    """``image``'s mask among ``masks`` (lower-cased stem -> file, see ``gt_masks``), by the pairing rules."""
    return next((masks[s.lower()] for s in mask_stem_for(image.stem) if s.lower() in masks), None)


def gt_masks(gt_dir: Path) -> dict[str, Path]:
    """The mask files of a --gt_dir by lower-cased stem (the pairing rules compare names so)."""
    return {p.stem.lower(): p for p in sorted(gt_dir.iterdir(), reverse=True) if p.is_file() and is_image_file(p)}


def run_predict(model: torch.nn.Module, input_path: str | Path, output: str | Path, image_size: int,
                device: torch.device, batch_size: int = 8, tta: bool = False, threshold: float = 0.5,
                save_probs: bool = False, save_overlay: bool = False, gt_dir: str | Path | None = None,
                img_ch: int = 3, progress: bool | None = None, autocast: Callable | None = None,
                channels_last: bool = False, skip_existing: bool = False, num_classes: int = 1,
                class_colors: list | None = None, log=print) -> list[Path]:
    """Write ``<stem>_segmentation.png`` (0/255) for each input, plus probability maps and overlays on request.
    ``num_classes`` > 1: a model of label maps: the mask is a palette PNG of the classes (in the class colours) and
    the overlay lays the classes over the photo.
    ``autocast``, ``channels_last``: see ``predict_images``; ``progress``: a bar (default: on a terminal), else a
    ``log`` line once a minute. Every file is written whole or not at all; ``skip_existing`` leaves out the images
    whose requested outputs are all there already (to continue an interrupted run). Returns the masks written.

    Images that cannot be read are skipped and the others still written; then a ``PartialPrediction`` (a DataError)
    names every skipped file and carries the written paths."""
    if num_classes > 1 and (save_probs or gt_dir):
        raise DataError(f"{'--save_probs' if save_probs else '--gt_dir'}: for binary masks only; this model segments "
                        f"{num_classes} classes")
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
    gt_dir = Path(gt_dir) if gt_dir else None
    if gt_dir is not None and not gt_dir.is_dir():
        raise DataError(f"--gt_dir: {gt_dir} does not exist")
    gt_index = gt_masks(gt_dir) if gt_dir is not None else {}
    failed: list[str] = []
    results = predict_images(model, paths, image_size, device, batch_size, tta, img_ch,
                             on_error=lambda path, exc: failed.append(str(exc)), autocast=autocast,
                             channels_last=channels_last)
    results = track(results, len(paths), "predict", log=log, terminal=progress)

    def write(path: Path, image: np.ndarray, probs: np.ndarray) -> Path:
        gt_path = find_gt(gt_index, path) if save_overlay else None
        outputs = render_outputs(path, image, probs, threshold=threshold, num_classes=num_classes,
                                 class_colors=class_colors, save_probs=save_probs, save_overlay=save_overlay,
                                 gt=None if gt_path is None else read_gt_for(gt_path, path, probs.shape))
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
    if failed:
        raise PartialPrediction(written, failed)
    return written


def render_outputs(path, image: np.ndarray, probs: np.ndarray, *, threshold: float = 0.5, num_classes: int = 1,
                   class_colors: list | None = None, save_probs: bool = False, save_overlay: bool = False,
                   gt: np.ndarray | None = None) -> dict[str, bytes]:
    """The encoded files of one image's prediction, by suffix (``OUTPUT_SUFFIXES``), in memory: the probability map
    (binary, ``save_probs``) and the overlay (``save_overlay``, with ``gt``'s outline when given) first, the mask
    last. ``predict`` writes them, ``serve`` answers with them: the same bytes. ``probs``: (H, W) probabilities at the
    image's size, or its class map for ``num_classes`` > 1 (a palette PNG in ``class_colors``); ``path``: the file
    (or ``InMemory`` upload) the overlay reads its full-size pixels from when ``image`` was decoded smaller."""
    mask_suffix, prob_suffix, overlay_suffix = OUTPUT_SUFFIXES
    out: dict[str, bytes] = {}
    h, w = probs.shape
    # the network's input may come from a reduced JPEG decode; the overlay shows the photo's own pixels
    base = (image if image.shape[:2] == (h, w) else read_image(path)) if save_overlay else None
    if num_classes > 1:  # a class map
        if save_overlay:
            out[overlay_suffix] = encode_image(Image.fromarray(blend(base, probs, num_classes, colors=class_colors)),
                                               ".jpg", quality=92)
        out[mask_suffix] = encode_image(label_map_image(probs, num_classes, class_colors), ".png")
        return out
    mask = probs > threshold
    if save_probs:
        out[prob_suffix] = encode_image(Image.fromarray(np.round(probs * 255).astype(np.uint8)), ".png")
    if save_overlay:
        pic = overlay(base, mask, gt, width=max(2, math.ceil(max(h, w) / 400)))
        out[overlay_suffix] = encode_image(Image.fromarray(pic), ".jpg", quality=92)
    out[mask_suffix] = encode_image(Image.fromarray(mask.astype(np.uint8) * 255), ".png")
    return out


class PartialPrediction(DataError):
    """Some inputs could not be read: the others were written (``written``); ``failed`` names each skipped file."""

    def __init__(self, written: list[Path], failed: list[str]):
        self.written, self.failed = written, failed
        listing = "\n  ".join(failed)
        super().__init__(f"{len(failed)} image(s) could not be read and were skipped ({len(written)} mask(s) "
                         f"written):\n  {listing}")


class Predictor:
    """A checkpoint loaded once for prediction: the model on its device, in the precision, at the size and with the
    threshold and classes the checkpoint was trained with unless given. ``predict`` and ``serve`` share it."""

    def __init__(self, checkpoint: str | Path, *, model_overrides: dict | None = None, device: str = "auto",
                 amp: str | None = None, image_size: int | None = None, threshold: float | None = None, log=print):
        from .engine.config import load_class_colors
        from .engine.inference import load_for_inference, ready_for_inference
        from .engine.runtime import resolve_device

        if str(checkpoint).lower().endswith(".onnx"):  # an exported model: onnxruntime on the CPU, in float32
            from .engine.runtime import Precision
            from .export import load_onnx

            self.model, cfg = load_onnx(checkpoint, image_size=image_size, log=log)
            self.cfg, self.device, self.channels_last = cfg, torch.device("cpu"), False
            self.precision = Precision(None, self.device)
        else:
            model, cfg = load_for_inference(checkpoint, log=log,
                                            **{k: v for k, v in (model_overrides or {}).items() if v is not None})
            cfg.device, cfg.amp = device, amp or cfg.amp
            cfg.validate()
            self.cfg, self.device = cfg, resolve_device(cfg.device, cfg.device_index)
            self.model, self.precision, self.channels_last = ready_for_inference(model, cfg, self.device, log)
        self.image_size = image_size or cfg.image_size
        self.threshold = threshold if threshold is not None else cfg.threshold
        self.class_colors = load_class_colors(cfg.class_colors, cfg.num_classes)

    def run(self, input_path: str | Path, output: str | Path, log=print, **options) -> list[Path]:
        """``run_predict`` with this model and its settings; ``options``: ``run_predict``'s."""
        with torch.inference_mode():
            return run_predict(self.model, input_path, output, self.image_size, self.device,
                               threshold=self.threshold, autocast=self.precision.autocast,
                               channels_last=self.channels_last, img_ch=self.cfg.img_ch, log=log,
                               num_classes=self.cfg.num_classes, class_colors=self.class_colors, **options)

    def segment(self, upload: InMemory, tta: bool = False, save_overlay: bool = False,
                save_probs: bool = False) -> dict[str, bytes]:
        """One image's outputs as ``run_predict`` writes them, in memory (``render_outputs``): the same bytes, with
        nothing on disk. A file that cannot be read raises its DataError, naming the upload."""
        with torch.inference_mode():
            (path, image, probs), = predict_images(self.model, [upload], self.image_size, self.device, batch_size=1,
                                                   tta=tta, img_ch=self.cfg.img_ch, workers=1,
                                                   autocast=self.precision.autocast, channels_last=self.channels_last)
        return render_outputs(path, image, probs, threshold=self.threshold, num_classes=self.cfg.num_classes,
                              class_colors=self.class_colors, save_probs=save_probs and self.cfg.num_classes == 1,
                              save_overlay=save_overlay)


def predict_checkpoint(checkpoint: str | Path, input_path: str | Path, output: str | Path, *,
                       model_overrides: dict | None = None, device: str = "auto", amp: str | None = None,
                       image_size: int | None = None, threshold: float | None = None, log=print,
                       **options) -> list[Path]:
    """``r2unet predict``: load ``checkpoint`` (``Predictor``) and run ``run_predict`` on ``input_path``."""
    return Predictor(checkpoint, model_overrides=model_overrides, device=device, amp=amp, image_size=image_size,
                     threshold=threshold, log=log).run(input_path, output, log=log, **options)
