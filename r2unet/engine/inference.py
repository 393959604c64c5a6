"""Turning images into probabilities and masks with a trained model: the one path that ``predict``, ``serve``,
``evaluate --resolution original`` and ``export``'s check run.

- ``load_for_inference``: a model and its settings from a checkpoint, a run folder, ``.safetensors``, a reference
  ``.pkl`` or an exported ``.onnx``; ``ready_for_inference`` puts it on a device in training's precision.
- ``predict_images``: decoded images in, probabilities (or class maps) at each image's own size out, batched, with
  decoding and resizing on threads while the network runs; ``predict_logits``: one batch, with flip TTA.
- ``render_outputs``: one image's files (mask, probability map, overlay) encoded in memory.
- ``Predictor``: a model loaded once, with its size, threshold and classes: ``segment`` one upload in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .. import defaults
from ..data.augment import eval_images
from ..data.imageio import (
    DataError,
    InMemory,
    orient_as_shown,
    read_image,
)
from ..data.imageio import image_size as image_size_of
from ..data.targets import BINARY, Targets
from ..fileio import encode_image
from ..models import RECURRENT, list_models
from .checkpoint import (
    CheckpointError,
    RunFiles,
    infer_architecture,
    is_r2unet_checkpoint,
    load_file,
    load_weights,
    model_state,
)
from .config import ConfigError, TrainConfig
from .loop import build_model
from .onnx import load_onnx
from .runtime import Precision, place_model, placement, resolve_device
from .task import Task, task_of

OUTPUT_SUFFIXES = ("_segmentation.png", "_prob.png", "_overlay.jpg")  # the files of one image, by suffix


def load_for_inference(checkpoint: str | Path, log=print, record: dict | None = None,
                       **given) -> tuple[nn.Module, TrainConfig]:
    """A model in eval mode and its settings, from an r2unet checkpoint, a run folder (its ``checkpoints/best.pt``),
    a ``.safetensors`` export, a bare (reference) state_dict or an exported ``.onnx`` (run by onnxruntime).

    ``given``: settings that override the checkpoint's, None meaning not given (``TrainConfig.updated``): the
    network's (model_type, t, base_channels, img_ch, output_ch) and how it runs (image_size, threshold, device,
    amp). A bare state_dict's network is read from its weights (``infer_architecture``) except ``t``, which weights
    do not record: the reference's default unless given (``log`` says which was used). ``record``: a dict that gets
    what the checkpoint recorded of its training data (``data_split``), where it did."""
    if str(checkpoint).lower().endswith(".onnx"):  # onnxruntime on the CPU, in float32; its metadata's settings
        model, cfg = load_onnx(checkpoint, image_size=given.get("image_size"), log=log)
        return model, cfg.updated(threshold=given.get("threshold"))
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        run = RunFiles(checkpoint)
        if not run.best.is_file():
            raise CheckpointError(f"{checkpoint} is a folder, not a checkpoint, and holds no run's "
                                  f"checkpoints/best.pt; pass the checkpoint file")
        checkpoint = run.best
    obj = load_file(checkpoint)
    if given.get("model_type") is not None and given["model_type"] not in list_models():
        raise ConfigError(f"--model_type: unknown model {given['model_type']!r}; choose one of "
                          f"{', '.join(list_models())}")
    if is_r2unet_checkpoint(obj):
        cfg = TrainConfig.from_dict(obj["config"])
        if record is not None and obj.get("data_split"):
            record["data_split"] = obj["data_split"]
    else:  # a bare state_dict (the reference's .pkl): its weights tell the network (and classes), all but t
        cfg = TrainConfig()
        found = infer_architecture(model_state(obj))
        if found:
            cfg = cfg.updated(**found, num_classes=found["output_ch"])
            note = f"{checkpoint.name}: a bare state_dict; its weights are a {found['model_type']} with " \
                   f"base_channels {found['base_channels']}, img_ch {found['img_ch']}, output_ch {found['output_ch']}"
            if found["model_type"] in RECURRENT and given.get("t") is None:
                note += f"; its weights do not record t: using t={cfg.t}, the reference's default (--t N if not)"
            log(note)
    cfg = cfg.updated(**given)
    model = build_model(cfg)
    load_weights(model, model_state(obj), str(checkpoint))
    return model.eval(), cfg


def ready_for_inference(model: nn.Module, cfg: TrainConfig, device: torch.device,
                        log=print) -> tuple[nn.Module, Precision, bool]:
    """The model on ``device`` in eval mode with the precision (``cfg.amp``) and memory format that training uses
    there: (model, precision, channels_last); ``log`` hears a note when the precision asked for is changed or slow
    here. On a CPU with AMX, bf16 + channels_last ran a full-size R2U-Net forward at 4.7 img/s against 0.74 in fp32
    (224 px, batch 4)."""
    place = placement(cfg, device)
    if place.note:
        log(place.note)
    precision, channels_last = place.precision, place.channels_last
    return place_model(model, device, channels_last).eval(), precision, channels_last


class FlipAveraged(nn.Module):
    """A model whose logits are those of the mean probability over the input and its horizontal and vertical flips
    (each flipped back): test-time augmentation, as ``predict --tta`` does it."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, x, self.task, tta=True)


def _to_input(image: np.ndarray, image_size: int, img_ch: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, C, S, S) normalised, resized as in training (square, antialiased)."""
    x = eval_images(torch.from_numpy(np.array(image)).unsqueeze(0), image_size)
    return x.mean(1, keepdim=True) if img_ch == 1 else x


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, task: Task, tta: bool = False) -> torch.Tensor:
    """Logits (B, C, S, S). With ``tta``, the probabilities (the task's activation) of the identity, horizontal and
    vertical flips are averaged (each flipped back) and returned as the logits of that mean."""
    logits = model(x).float()
    if not tta:
        return logits
    probs = task.probabilities(logits)
    for dims in ((3,), (2,)):
        probs += task.probabilities(model(x.flip(dims))).flip(dims)
    probs /= 3
    return task.logits(probs)


def _decode(path: Path, image_size: int, img_ch: int) -> tuple[tuple[int, int], np.ndarray, torch.Tensor]:
    """((h, w) as displayed, the decoded image, the network input (1, C, S, S)) of one file."""
    w, h = image_size_of(path)  # as displayed (EXIF orientation applied), like the pixels read below
    img = read_image(path, min_size=(2 * image_size, 2 * image_size))
    return (h, w), img, _to_input(img, image_size, img_ch)


def default_workers() -> int:
    """Threads for decoding, resizing and writing (PIL and torch release the GIL for that work)."""
    return max(1, min(8, os.cpu_count() or 1))


def predict_images(model: torch.nn.Module, paths: Iterable[Path], image_size: int, device: torch.device, task: Task,
                   batch_size: int = defaults.PREDICT_BATCH, tta: bool = False, img_ch: int = 3,
                   on_error: Callable[[Path, DataError], None] | None = None, workers: int | None = None,
                   autocast: Callable | None = None,
                   channels_last: bool = False) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """Yield (path, image (H, W, 3) uint8, prediction at the original resolution) per image, in the order of
    ``paths``: ``task``'s prediction, the probabilities (H, W) float32 of a binary mask, the class map of label maps.

    Images are decoded with JPEG draft mode at no less than twice the network size, so a 6000x4000 photo never
    needs its full-resolution pixels in memory; the logits are resized back to the original size before the
    activation (and the caller's threshold). ``workers`` threads decode the next batch and resize the last one's
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
                logits = predict_logits(model, x, task, tta).cpu()
            resized = [pool.submit(_upsample_probs, lg, h, w, task) for lg, (h, w) in zip(logits, sizes)]
            for p, img, probs in zip(chunk, images, resized):
                yield p, img, probs.result()


def _upsample_probs(logits: torch.Tensor, h: int, w: int, task: Task, max_pixels: int = 2**24) -> np.ndarray:
    """Bilinear resize of (C, S, S) logits to (h, w), then ``task.at_size`` (the sigmoid of a binary mask, the
    argmax of label maps); done in row bands for very large images."""
    full = logits.unsqueeze(0).float().cpu()
    finish = task.at_size
    if h * w * full.shape[1] <= max_pixels:  # up to 16 MP in one go (64 MB): 3x faster than bands for a 12 MP photo
        return finish(F.interpolate(full, size=(h, w), mode="bilinear", align_corners=False)).numpy()
    out = np.empty((h, w), task.prediction_dtype)
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


def read_gt_for(mask_path: Path, image_path: Path, shape: tuple[int, int], targets: Targets = BINARY) -> np.ndarray:
    """The ground truth of ``image_path`` (H, W) as ``targets`` reads it (bool for a binary mask, class indices of a
    label map), in the frame the image is shown in: a mask drawn on the stored pixels of an EXIF-turned photo is
    turned too. A size that fits neither frame is a DataError."""
    gt = targets.read(mask_path)
    if gt.shape != shape:  # perhaps drawn on the stored pixels of an EXIF-turned photo
        gt = orient_as_shown(gt, image_path)
    if gt.shape != shape:
        raise DataError(f"{mask_path}: size {gt.shape[1]}x{gt.shape[0]} differs from {image_path.name} "
                        f"({shape[1]}x{shape[0]})")
    return gt


def render_outputs(path, image: np.ndarray, prediction: np.ndarray, task: Task, *,
                   threshold: float = defaults.THRESHOLD,
                   save_probs: bool = False, save_overlay: bool = False,
                   gt: np.ndarray | None = None) -> dict[str, bytes]:
    """The encoded files of one image's prediction, by suffix (``OUTPUT_SUFFIXES``), in memory: the probability map
    (``save_probs``, where the task has one) and the overlay (``save_overlay``, with ``gt``'s outline when given)
    first, the mask last. ``predict`` writes them, ``serve`` answers with them: the same bytes. ``prediction``: the
    task's prediction at the image's size (``predict_images``); ``path``: the file (or ``InMemory`` upload) the
    overlay reads its full-size pixels from when ``image`` was decoded smaller."""
    mask_suffix, prob_suffix, overlay_suffix = OUTPUT_SUFFIXES
    out: dict[str, bytes] = {}
    if save_probs:
        out[prob_suffix] = encode_image(task.probability_picture(prediction), ".png")
    if save_overlay:
        # the network's input may come from a reduced JPEG decode; the overlay shows the photo's own pixels
        base = image if image.shape[:2] == prediction.shape else read_image(path)
        out[overlay_suffix] = encode_image(Image.fromarray(task.overlay(base, prediction, threshold, gt)), ".jpg",
                                           quality=92)
    out[mask_suffix] = encode_image(task.mask_picture(prediction, threshold), ".png")
    return out


class Predictor:
    """A model loaded once for prediction (``load_for_inference``): on its device, in the precision, at the size and
    with the threshold and classes the checkpoint was trained with unless given. ``predict`` and ``serve`` share
    it; ``model_overrides``: the network's settings (model_type, t, base_channels) for a bare state_dict."""

    def __init__(self, checkpoint: str | Path, *, model_overrides: dict | None = None, device: str = "auto",
                 amp: str | None = None, image_size: int | None = None, threshold: float | None = None, log=print):
        model, cfg = load_for_inference(checkpoint, log=log, device=device, amp=amp, image_size=image_size,
                                        threshold=threshold, **(model_overrides or {}))
        self.cfg, self.task = cfg, task_of(cfg)
        self.device = resolve_device(cfg.device, cfg.device_index)
        self.model, self.precision, self.channels_last = ready_for_inference(model, cfg, self.device, log)
        self.image_size, self.threshold = cfg.image_size, cfg.threshold

    def segment(self, upload: InMemory, tta: bool = False, save_overlay: bool = False,
                save_probs: bool = False) -> dict[str, bytes]:
        """One image's outputs as ``run_predict`` writes them, in memory (``render_outputs``): the same bytes, with
        nothing on disk. A file that cannot be read raises its DataError, naming the upload."""
        with torch.inference_mode():
            (path, image, prediction), = predict_images(self.model, [upload], self.image_size, self.device,
                                                        self.task, batch_size=1, tta=tta, img_ch=self.cfg.img_ch,
                                                        workers=1, autocast=self.precision.autocast,
                                                        channels_last=self.channels_last)
        return render_outputs(path, image, prediction, self.task, threshold=self.threshold,
                              save_probs=save_probs and self.task.probability_maps, save_overlay=save_overlay)
