"""Turning images into probabilities and masks with trained models: the one path that ``predict``, ``serve``,
``evaluate`` and ``export``'s check run.

- ``load_for_inference``: a model and its settings from a checkpoint, a run folder, ``.safetensors``, a reference
  ``.pkl`` or an exported ``.onnx``; ``ready_for_inference`` puts it on a device in training's precision.
- ``Segmenter``: one model, or several averaged (an ensemble: ``--checkpoint`` more than once, or a folder of runs),
  loaded once with its task, size and threshold. Its steps: ``decode`` an image (a file, an upload, an array or a
  PIL image), ``forward`` a batch, ``finish`` one prediction at its image's size, ``render`` its files in memory.
  ``predict`` composes them over many images (decoding and resizing on threads while the network runs), ``serve``'s
  batcher over concurrent requests, ``segment`` for one upload; ``as_module``: the models as one network for
  scoring at the training size.
- ``predict_logits``: one batch, with flip TTA; ``render_outputs``: one image's files (mask, probability map,
  overlay) encoded in memory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from ..errors import ExportError
from ..fileio import encode_image
from ..models import RECURRENT, list_models
from . import int8, runtime
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
from .onnx import OnnxModel, load_onnx
from .postprocess import NONE, Postprocessing, shown
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
        if record is not None:
            record["postprocessing"] = _decision(model.metadata.get("r2unet.postprocessing"), checkpoint)
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
        if record is not None:
            record["postprocessing"] = _decision(obj.get("postprocessing"), checkpoint)
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


def _decision(stored, source) -> Postprocessing:
    """The postprocessing a checkpoint or exported file stores (none if it stores none); a broken one is named."""
    try:
        return Postprocessing.from_dict(stored)
    except ValueError as exc:
        raise CheckpointError(f"{source}: its postprocessing is {exc}; pass --postprocess none to go "
                              "without") from None


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
    if cfg.channels_last == "auto" and device.type == "cpu":  # inference: channels_last pays in float32 too
        channels_last = cfg.base_channels >= 16  # (1.10 against 0.84 img/s at batch 1; benchmarks/README.md)
    return place_model(model, device, channels_last).eval(), precision, channels_last


def model_folders(path: str | Path) -> list[Path]:
    """The models a ``--checkpoint`` names: itself, or, for a folder that holds no run but runs in its subfolders
    (a folder of runs, one per fold or seed), each of those runs, in name order."""
    path = Path(path)
    if path.is_dir() and not RunFiles(path).best.is_file():
        runs = sorted(p for p in path.iterdir() if p.is_dir() and RunFiles(p).best.is_file())
        if runs:
            return runs
    return [path]


@dataclass
class Member:
    """One model of a ``Segmenter``, ready on its device: it sees images at its own ``image_size`` and ``img_ch``,
    in its own precision and memory format."""

    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    precision: Precision
    channels_last: bool

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def runs(self) -> str:
        """What computes this model: the checkpoint in PyTorch (precision, memory format), or an ONNX file."""
        if isinstance(self.model, OnnxModel):
            return f"{self.model.path.name} (onnxruntime, {self.model.metadata.get(int8.PRECISION, 'fp32')})"
        return f"PyTorch ({self.precision.name}{', channels_last' if self.channels_last else ''})"

    def inputs(self, images: list[np.ndarray]) -> torch.Tensor:
        """The network's input (B, C, S, S) of decoded images (H, W, 3) uint8, on the model's device."""
        x = torch.cat([_to_input(img, self.image_size, self.cfg.img_ch) for img in images]).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def logits(self, x: torch.Tensor, task: Task, tta: bool = False) -> torch.Tensor:
        """Logits (B, C, S, S) on the CPU, float32."""
        with self.precision.autocast():
            return predict_logits(self.model, x, task, tta).cpu()


class Averaged(nn.Module):
    """Several models (each with flip TTA, ``tta``) as one network for inputs they all take (one size and channel
    count): the logits of their mean probability; for a single model without TTA, the model itself."""

    def __init__(self, models: list[nn.Module], task: Task, tta: bool = False):
        super().__init__()
        self.members, self.task, self.tta = nn.ModuleList(models), task, tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return predict_logits(self.members[0], x, self.task, self.tta)
        probs = sum(self.task.probabilities(predict_logits(m, x, self.task, self.tta)) for m in self.members)
        return self.task.logits(probs / len(self.members))


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


def _decode(source, image_size: int) -> tuple[tuple[int, int], np.ndarray]:
    """((h, w) as displayed, the decoded image (H, W, 3) uint8) of one file, upload, array or PIL image; a JPEG is
    decoded at a reduced scale no smaller than twice the network's ``image_size``."""
    if isinstance(source, Image.Image):
        source = np.asarray(source.convert("RGB"))
    if isinstance(source, np.ndarray):
        image = source if source.ndim == 3 else np.repeat(source[..., None], 3, axis=2)
        return image.shape[:2], np.ascontiguousarray(image[..., :3].astype(np.uint8, copy=False))
    w, h = image_size_of(source)  # as displayed (EXIF orientation applied), like the pixels read below
    return (h, w), read_image(source, min_size=(2 * image_size, 2 * image_size))


def default_workers() -> int:
    """Threads for decoding, resizing and writing (PIL and torch release the GIL for that work)."""
    return max(1, min(8, os.cpu_count() or 1))


def _at_size(logits: list[torch.Tensor], h: int, w: int, task: Task, max_pixels: int = 2**24) -> np.ndarray:
    """The prediction at the image's size (h, w) from each model's logits (C, S, S): bilinear resize, then the
    task's prediction (``task.at_size``; an ensemble's mean probability, ``task.from_probabilities``). In row
    bands for very large images, with the sampling grid of one big resize."""
    full = [lg.unsqueeze(0).float().cpu() for lg in logits]
    channels = full[0].shape[1]

    def finish(resize) -> torch.Tensor:
        if len(full) == 1:
            return task.at_size(resize(full[0]))
        return task.from_probabilities(sum(task.probabilities(resize(f)) for f in full) / len(full))

    if h * w * channels * len(full) <= max_pixels:  # up to 16 MP in one go: 3x faster than bands for a 12 MP photo
        return finish(lambda f: F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)).numpy()
    out = np.empty((h, w), task.prediction_dtype)
    band = max(1, max_pixels // max(1, w * channels * len(full)))
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        out[y0:y1] = finish(functools.partial(_resize_band, h=h, w=w, y0=y0, y1=y1)).numpy()
    return out


def _resize_band(logits: torch.Tensor, h: int, w: int, y0: int, y1: int) -> torch.Tensor:
    """Rows y0..y1 of the (h, w) bilinear resize of ``logits`` (1, C, S, T), on the sampling grid of one big
    resize (align_corners=False)."""
    s, t = logits.shape[-2:]
    ys = (torch.arange(y0, y1, dtype=torch.float32) + 0.5) * s / h - 0.5
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * t / w - 0.5
    yn, xn = (ys + 0.5) / s * 2 - 1, (xs + 0.5) / t * 2 - 1
    grid = torch.stack(torch.meshgrid(yn, xn, indexing="ij")[::-1], -1).unsqueeze(0)
    return F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
                   gt: np.ndarray | None = None, post: Postprocessing = NONE) -> dict[str, bytes]:
    """The encoded files of one image's prediction, by suffix (``OUTPUT_SUFFIXES``), in memory: the probability map
    (``save_probs``, where the task has one) and the overlay (``save_overlay``, with ``gt``'s outline when given)
    first, the mask last. ``predict`` writes them, ``serve`` answers with them: the same bytes. ``prediction``: the
    task's prediction at the image's size (``predict_images``); ``path``: the file (or ``InMemory`` upload) the
    overlay reads its full-size pixels from when ``image`` was decoded smaller. ``post``: the postprocessing the
    mask and the overlay show (the probability map stays the network's)."""
    mask_suffix, prob_suffix, overlay_suffix = OUTPUT_SUFFIXES
    out: dict[str, bytes] = {}
    if save_probs:
        out[prob_suffix] = encode_image(task.probability_picture(prediction), ".png")
    prediction, threshold = shown(task, prediction, threshold, post)
    if save_overlay:
        # the network's input may come from a reduced JPEG decode; the overlay shows the photo's own pixels
        base = image if image.shape[:2] == prediction.shape else read_image(path)
        out[overlay_suffix] = encode_image(Image.fromarray(task.overlay(base, prediction, threshold, gt)), ".jpg",
                                           quality=92)
    out[mask_suffix] = encode_image(task.mask_picture(prediction, threshold), ".png")
    return out


class Segmenter:
    """Trained models loaded once for segmenting images: one, or several whose probabilities are averaged (an
    ensemble: the same task and classes; any mix of networks and sizes, each seeing an image at its own size). Each
    model runs on its device in the precision, at the size and with the threshold it was trained with, unless given.
    ``predict``, ``serve`` and ``evaluate`` use it; ``model_overrides``: the network's settings (model_type, t,
    base_channels) for a bare state_dict.

    ``postprocess``: "auto" applies the postprocessing chosen on validation that the checkpoint (a run's best.pt,
    an exported ONNX file) or a cross-validation folder (its ``postprocessing.json``, chosen on the folds'
    out-of-fold predictions) stores; "none" leaves it out. A threshold given wins over the one it chose.

    ``runtime``: "auto" runs on a CPU, in place of a checkpoint, the fastest exported model made from it that may
    (``int8.companion``): an int8 one whose masks were checked against float32's (unless ``amp`` asks for float32),
    else, where PyTorch would run float32, a float ONNX export; "torch" runs the checkpoint itself (as does an
    ``amp`` of bf16 or fp16)."""

    def __init__(self, checkpoints, *, model_overrides: dict | None = None, device: str = "auto",
                 amp: str | None = None, image_size: int | None = None, threshold: float | None = None, log=print,
                 record: dict | None = None, postprocess: str = "auto", runtime: str = "auto"):
        if postprocess not in ("auto", "none"):
            raise ConfigError(f"--postprocess must be auto or none, got {postprocess!r}")
        if runtime not in ("auto", "torch"):
            raise ConfigError(f"--runtime must be auto or torch, got {runtime!r}")
        given = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        paths = [p for c in given for p in model_folders(c)]
        members, decisions = [], []
        for path in paths:
            seen: dict = {}
            model, cfg = load_for_inference(path, log=log, device=device, amp=amp, image_size=image_size,
                                            threshold=threshold, record=seen, **(model_overrides or {}))
            if record is not None and not members:
                record.update(seen)
            decisions.append(seen.get("postprocessing", NONE))
            dev = resolve_device(cfg.device, cfg.device_index)
            member = Member(*_ready(model, cfg, dev, log))
            if runtime == "auto" and amp in (None, "auto", "off"):
                member = _companion_member(path, member, int8_ok=amp != "off", log=log)
            members.append(member)
        self._setup(members, [str(p) for p in paths])
        self.post = NONE if postprocess == "none" else self._postprocessing(given, decisions, log)
        if threshold is None:  # a threshold given wins over the one chosen on validation
            self.threshold = self.post.threshold_or(self.threshold)

    def _postprocessing(self, given: list, decisions: list[Postprocessing], log) -> Postprocessing:
        """The decision that belongs to these models as one: a single model's own, or the one a cross-validation
        folder made for its ensemble; the several models of another ensemble have none of their own (said)."""
        if len(given) == 1 and len(decisions) > 1:
            stored = Path(given[0]) / "postprocessing.json"
            if stored.is_file():
                try:
                    return Postprocessing.from_dict(stored.read_text())
                except ValueError as exc:
                    raise ConfigError(f"{stored}: {exc}; pass --postprocess none to go without") from None
        if len(decisions) == 1:
            return decisions[0]
        if any(d.active for d in decisions):
            log("note: the models' own postprocessing is not applied to their ensemble (it was chosen for each "
                "alone); a cross-validation folder (r2unet crossval) chooses one for its ensemble")
        return NONE

    @classmethod
    def of(cls, model: nn.Module, cfg: TrainConfig | None = None, device: torch.device | str = "cpu",
           **settings) -> Segmenter:
        """A segmenter of a model already in memory (``settings``: TrainConfig fields, e.g. ``image_size``)."""
        cfg = (cfg or TrainConfig()).updated(**settings)
        self = cls.__new__(cls)
        self._setup([Member(model.eval().to(device), cfg, torch.device(device), Precision(None, torch.device(device)),
                            False)], ["(in memory)"])
        self.post = NONE
        return self

    def _setup(self, members: list[Member], names: list[str]) -> None:
        tasks = {(m.cfg.num_classes, m.cfg.class_colors) for m in members}
        if len({classes for classes, _ in tasks}) > 1:
            raise ConfigError("--checkpoint: the models segment different classes ("
                              + ", ".join(f"{n}: {m.cfg.num_classes}" for n, m in zip(names, members))
                              + "); an ensemble averages models of one task")
        self.members, self.names = members, names
        self.cfg, self.task = members[0].cfg, task_of(members[0].cfg)
        self.threshold = self.cfg.threshold
        self.image_size = max(m.image_size for m in members)
        self.device = members[0].device
        self.batch_size = defaults.PREDICT_BATCH if self.device.type == "cuda" else defaults.PREDICT_BATCH_CPU

    # ------------------------------------------------ the steps: decode (threads) -> forward (one batch) -> finish
    def decode(self, source) -> tuple[tuple[int, int], np.ndarray]:
        """((h, w) as shown, the image (H, W, 3) uint8) of a file, upload, array or PIL image; a JPEG decoded at a
        reduced scale no smaller than twice the largest network size. A DataError names what cannot be read."""
        return _decode(source, self.image_size)

    def forward(self, images: list[np.ndarray], tta: bool = False) -> list[list[torch.Tensor]]:
        """Each image's logits from each model (per image, a list over the models), on the CPU."""
        logits = [m.logits(m.inputs(images), self.task, tta) for m in self.members]
        return [[lg[i] for lg in logits] for i in range(len(images))]

    def finish(self, logits: list[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
        """The prediction at the image's size from its logits (``_at_size``)."""
        return _at_size(logits, *size, self.task)

    def render(self, source, image: np.ndarray, prediction: np.ndarray, overlay: bool = False,
               probs: bool = False) -> dict[str, bytes]:
        """The files of one image's prediction, as ``predict`` writes them (``render_outputs``)."""
        return render_outputs(source, image, prediction, self.task, threshold=self.threshold, save_overlay=overlay,
                              save_probs=probs and self.task.probability_maps, post=self.post)

    def predict(self, sources: Iterable, batch_size: int | None = None, tta: bool = False,
                on_error: Callable | None = None, workers: int | None = None) -> Iterator[tuple]:
        """Yield (source, image (H, W, 3) uint8, prediction at the image's size) per image, in the order of
        ``sources`` (files, ``InMemory`` uploads, arrays or PIL images): the task's prediction, probabilities
        (H, W) float32 of a binary mask or the class map of label maps; the mean over the models of an ensemble.

        Files are decoded with JPEG draft mode at no less than twice the network size, so a 6000x4000 photo never
        needs its full-resolution pixels in memory; the logits are resized back to the original size before the
        activation (and the caller's threshold). ``workers`` threads decode the next batch and resize the last
        one's predictions while the network runs. A source that cannot be decoded raises its DataError, or with
        ``on_error`` is passed to it and left out. ``batch_size``: images per forward pass (default the device's:
        ``defaults.PREDICT_BATCH``)."""
        sources, batch_size = list(sources), batch_size or self.batch_size
        batches = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            def decode_ahead(k: int) -> list:
                return [(s, pool.submit(self.decode, s)) for s in batches[k]] if k < len(batches) else []

            pending = decode_ahead(0)
            for k in range(len(batches)):
                current, pending = pending, decode_ahead(k + 1)
                chunk, images, sizes = [], [], []
                for source, decoded in current:
                    try:
                        size, img = decoded.result()
                    except DataError as exc:
                        if on_error is None:
                            raise
                        on_error(source, exc)
                        continue
                    chunk.append(source)
                    sizes.append(size)
                    images.append(img)
                if not chunk:
                    continue
                resized = [pool.submit(self.finish, lg, size) for lg, size in zip(self.forward(images, tta), sizes)]
                for source, img, prediction in zip(chunk, images, resized):
                    yield source, img, prediction.result()

    def segment(self, upload: InMemory, tta: bool = False, save_overlay: bool = False,
                save_probs: bool = False) -> dict[str, bytes]:
        """One image's outputs as ``predict`` writes them, in memory: the same bytes, with nothing on disk. A file
        that cannot be read raises its DataError, naming the upload."""
        size, image = self.decode(upload)
        with torch.inference_mode():
            (logits,) = self.forward([image], tta)
            return self.render(upload, image, self.finish(logits, size), save_overlay, save_probs)

    def as_module(self, tta: bool = False) -> nn.Module:
        """The models as one network (``Averaged``) for inputs at the training size, as ``evaluate`` scores a
        split's cache; models of different sizes or channels cannot share those inputs (score them with
        ``--resolution original``)."""
        if len({(m.image_size, m.cfg.img_ch) for m in self.members}) > 1:
            raise ConfigError("--checkpoint: these models take different image sizes or channels, so they cannot be "
                              "scored on one training-size input; use --resolution original (each model sees each "
                              "image at its own size)")
        return Averaged([m.model for m in self.members], self.task, tta)


def _companion_member(checkpoint: Path, member: Member, int8_ok: bool, log) -> Member:
    """``member``, or on a CPU its checkpoint's fastest companion in its place (``int8.companion``): a checked int8
    model (``int8_ok``), or where PyTorch would run float32 a float32 export; where none is there and float32 would
    run, a note on how to make one."""
    if member.device.type != "cpu" or str(checkpoint).lower().endswith(".onnx"):
        return member
    float32 = member.precision.dtype is None
    found = int8.companion(checkpoint, int8=int8_ok, float32=float32, image_size=member.cfg.image_size)
    if found is None:
        if float32 and not runtime.cpu_info().native_bf16 and int8.runnable():
            log(int8.advice(checkpoint, int8_ok))
        return member
    path, meta = found
    try:
        model, _ = load_onnx(path, image_size=member.cfg.image_size, log=log)
    except ExportError as exc:  # a damaged file beside the run: the checkpoint still runs, and the file is named
        log(f"warning: {exc}; running {checkpoint} itself")
        return member
    log(f"running {int8.describe(path, meta)} in place of {checkpoint}, faster than PyTorch's {member.precision.name} "
        "on this CPU (--runtime torch runs the checkpoint itself)")
    return Member(model, member.cfg, member.device, member.precision, False)


def _ready(model: nn.Module, cfg: TrainConfig, device: torch.device, log) -> tuple:
    model, precision, channels_last = ready_for_inference(model, cfg, device, log)
    return model, cfg, device, precision, channels_last


def predict_images(model: nn.Module, paths: Iterable, image_size: int, device: torch.device, task: Task,
                   batch_size: int | None = None, tta: bool = False, img_ch: int = 3, **options):
    """``Segmenter.predict`` of one model in memory, in float32 (``options``: ``predict``'s)."""
    segmenter = Segmenter.of(model, device=device, image_size=image_size, img_ch=img_ch, num_classes=task.classes,
                             output_ch=task.channels)
    yield from segmenter.predict(paths, batch_size=batch_size, tta=tta, **options)
