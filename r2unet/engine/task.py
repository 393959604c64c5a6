"""What a model is trained to do: segment binary masks (one foreground, the reference's task) or label maps (a class per
pixel). A task owns everything that differs between the two, so that the trainer, evaluation, ``predict``, ``serve``,
``export`` and the cache ask it instead of testing the class count:

- its targets (``data.targets``: how a mask file is read, cached and written) and its output channels;
- the loss, the activation (logits to probabilities) and back (the logits of averaged probabilities, for TTA);
- the metric accumulator (one interface, ``metrics.Accumulator``);
- what a prediction at an image's own size is (probabilities, or a class map), the mask file and the overlay made of
  it, the area a user sees, and the pictures of the sample grids;
- what an exported model records of it.

``task_for(num_classes, colors)`` is the one place that chooses; ``task_of(cfg)`` reads a run's settings.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import defaults
from ..data.imageio import class_colors
from ..data.targets import BINARY, IGNORE, LabelMaps, Targets, targets_for
from . import plots
from .config import TrainConfig, load_class_colors
from .metrics import Accumulator, ClassAccumulator, MetricAccumulator


def _soft_dice(probs: torch.Tensor, onehot: torch.Tensor, dims: int) -> torch.Tensor:
    """1 - soft Dice of flattened probabilities and targets, summed over their last ``dims`` axis, averaged."""
    return (1 - (2 * (probs * onehot).sum(dims) + 1) / (probs.sum(dims) + onehot.sum(dims) + 1)).mean()


def _soft_tversky(probs: torch.Tensor, onehot: torch.Tensor, dims: int, alpha: float, beta: float) -> torch.Tensor:
    """1 - the soft Tversky index TP / (TP + alpha FP + beta FN) (smoothed by 1), summed over the last ``dims`` axis,
    averaged: beta > alpha weighs a missed lesion pixel more than a false one (alpha = beta = 0.5 is Dice)."""
    tp = (probs * onehot).sum(dims)
    fp, fn = (probs * (1 - onehot)).sum(dims), ((1 - probs) * onehot).sum(dims)
    return (1 - (tp + 1) / (tp + alpha * fp + beta * fn + 1)).mean()


def _focal(ce: torch.Tensor, gamma: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The focal loss of per-pixel cross-entropies ``ce``: each weighted by (1 - p)^gamma, p the probability given to
    the pixel's true class, so that the many easy pixels (clear skin) weigh little beside the hard ones (a lesion's
    border, a small lesion); averaged over the ``valid`` pixels."""
    loss = (1 - torch.exp(-ce)).pow(gamma) * ce
    return loss.mean() if valid is None else loss.sum() / valid.sum().clamp_min(1)


class Task:
    """What the two tasks share: ``targets`` (``data.targets``), ``channels`` (the network's outputs),
    ``class_names``, whether a threshold applies (``thresholded``) and a probability map exists
    (``probability_maps``)."""

    targets: Targets
    channels: int
    class_names: tuple[str, ...]
    description: str
    thresholded: bool
    probability_maps: bool
    outlines_truth: bool

    @property
    def classes(self) -> int:
        return self.targets.classes

    def mask_picture(self, prediction: np.ndarray, threshold: float) -> Image.Image:
        """The mask file of a prediction at an image's size, as ``predict`` writes it."""
        return self.targets.picture(self.mask(prediction, threshold))

    def mask(self, prediction: np.ndarray, threshold: float) -> np.ndarray:
        raise NotImplementedError


class BinaryTask(Task):
    """One foreground: one output channel, sigmoid, BCE (+ soft Dice), scores at a threshold."""

    targets = BINARY
    channels = 1
    class_names = ("background", "lesion")
    description = "binary mask"
    thresholded = True  # the probability is cut at a threshold (a sweep of thresholds makes sense)
    probability_maps = True  # an 8-bit probability map can be written
    outlines_truth = True  # an overlay can outline the ground truth beside the prediction

    def loss(self, logits: torch.Tensor, target: torch.Tensor, kind: str = "bce", gamma: float = 2.0,
             alpha: float = 0.3, beta: float = 0.7) -> torch.Tensor:
        """``target`` (B, 1, H, W) 0/1. ``kind`` (``LOSSES``): bce (BCE with logits), dice_bce (+ soft Dice), focal
        (BCE weighted by (1 - p)^``gamma``), tversky (1 - the soft Tversky index, ``alpha`` on false positives,
        ``beta`` on false negatives, per image)."""
        logits = logits.float()
        if kind == "focal":
            return _focal(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), gamma)
        if kind == "tversky":
            return _soft_tversky(torch.sigmoid(logits).flatten(1), target.flatten(1), 1, alpha, beta)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        if kind == "dice_bce":
            loss = loss + _soft_dice(torch.sigmoid(logits).flatten(1), target.flatten(1), 1)
        return loss

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def logits(self, probs: torch.Tensor) -> torch.Tensor:
        """The logits whose probabilities are ``probs`` (test-time augmentation averages probabilities)."""
        return torch.logit(probs.clamp(1e-7, 1 - 1e-7))

    def accumulator(self, threshold: float = defaults.THRESHOLD, device="cpu",
                    keep_per_image: bool = False) -> Accumulator:
        return MetricAccumulator(threshold=threshold, device=device, keep_per_image=keep_per_image)

    def at_size(self, logits: torch.Tensor) -> torch.Tensor:
        """A prediction from logits (1, 1, h, w) already resized to the image's size: the probabilities (h, w)."""
        return logits.sigmoid()[0, 0]

    def from_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        """The prediction from probabilities (1, C, h, w) at the image's size (an ensemble's mean)."""
        return probs[0, 0]

    def as_prediction(self, mask: np.ndarray) -> np.ndarray:
        """A (postprocessed) mask as a prediction ``score`` and ``mask`` take: 0/1 probabilities."""
        return mask.astype(np.float32)

    ignore = None  # no label means "no class" in a binary mask

    def truth(self, target: torch.Tensor) -> np.ndarray:
        """One image's target (1, H, W) as the host mask postprocessing is chosen against: bool."""
        return (target[0] > 0.5).cpu().numpy()

    prediction_dtype = np.float32

    def mask(self, prediction: np.ndarray, threshold: float) -> np.ndarray:
        """The mask (bool) a prediction at an image's size gives."""
        return prediction > threshold

    def probability_picture(self, prediction: np.ndarray) -> Image.Image:
        return Image.fromarray(np.round(prediction * 255).astype(np.uint8))

    def overlay(self, image: np.ndarray, prediction: np.ndarray, threshold: float,
                truth: np.ndarray | None = None) -> np.ndarray:
        """The photo with the predicted outline (green) and the ground truth's (blue), lines sized to the photo."""
        h, w = prediction.shape
        return plots.overlay(image, self.mask(prediction, threshold), truth,
                             width=max(2, math.ceil(max(h, w) / 400)))

    def score(self, accumulator: Accumulator, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image's prediction at its own size, against its mask file's values, to ``accumulator``."""
        accumulator.update(torch.from_numpy(prediction)[None, None], torch.from_numpy(truth)[None, None].float())

    def area(self, mask_values: np.ndarray) -> dict:
        """What a user reads of a mask file's values (H, W): its size and the foreground's area."""
        h, w = mask_values.shape
        fg = int(np.count_nonzero(mask_values))
        return {"width": w, "height": h, "area_pixels": fg, "area_percent": round(100 * fg / (h * w), 3)}

    def summary(self, probability_map: np.ndarray, threshold: float) -> dict:
        """The probability map (in [0, 1]) in a few numbers."""
        inside = probability_map[probability_map > threshold]
        return {"mean": round(float(probability_map.mean()), 4), "max": round(float(probability_map.max()), 4),
                "mean_inside_mask": round(float(inside.mean()), 4) if inside.size else None,
                "uncertain_percent": round(100 * float(((probability_map > 0.25) & (probability_map < 0.75))
                                                         .mean()), 3)}

    def sample_panels(self, image: np.ndarray, truth: torch.Tensor, probs: torch.Tensor, threshold: float,
                      title: str | None) -> list[tuple[np.ndarray, str]]:
        """One row of a sample grid: image with outlines | ground truth | prediction (``truth`` (1, H, W),
        ``probs`` (C, H, W) on any device)."""
        gt, pred = (truth[0] > 0.5).cpu().numpy(), (probs[0] > threshold).cpu().numpy()
        js = plots.jaccard(pred, gt)
        return [(plots.overlay(image, pred, gt), title or "image (green: pred, blue: truth)"),
                (gt, "ground truth"), (pred, f"prediction  JS={js:.2f}")]

    def onnx_metadata(self) -> dict:
        return {}

    output_note = "mask = sigmoid(logits) > threshold"


class LabelMapTask(Task):
    """``classes`` classes (0 the background): one output channel per class, softmax, cross-entropy (+ soft Dice
    over the foreground classes), scores per class; a prediction is the argmax, with no threshold."""

    thresholded = False
    probability_maps = False
    outlines_truth = False
    prediction_dtype = np.uint8

    def __init__(self, targets: LabelMaps):
        self.targets = targets
        self.channels = targets.classes
        self.class_names = ("background",) + tuple(f"class {k}" for k in range(1, targets.classes))
        self.description = f"label maps of {targets.classes} classes"
        self.colors = list(targets.colors) if targets.colors else class_colors(targets.classes)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, kind: str = "bce", gamma: float = 2.0,
             alpha: float = 0.3, beta: float = 0.7) -> torch.Tensor:
        """Against the class indices in ``target`` (B, 1, H, W); pixels of no class take no part. ``kind``: bce
        (softmax cross-entropy), dice_bce (+ soft Dice averaged over the foreground classes), focal (cross-entropy
        weighted by (1 - p)^``gamma``), tversky (1 - the soft Tversky index per image and foreground class)."""
        labels, logits = target[:, 0].long(), logits.float()
        if kind == "focal":
            ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
            return _focal(ce, gamma, labels != IGNORE)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE) if kind != "tversky" else 0
        if kind in ("dice_bce", "tversky"):
            valid = (labels != IGNORE).unsqueeze(1).flatten(2)  # (B, 1, HW)
            probs = torch.softmax(logits, dim=1)[:, 1:].flatten(2) * valid  # (B, K-1, HW)
            onehot = F.one_hot(labels.masked_fill(labels == IGNORE, 0), logits.shape[1]).permute(0, 3, 1, 2)
            onehot = onehot[:, 1:].flatten(2).float() * valid
            loss = loss + (_soft_dice(probs, onehot, 2) if kind == "dice_bce" else
                           _soft_tversky(probs, onehot, 2, alpha, beta))
        return loss

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def logits(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.clamp_min(1e-7).log()

    def accumulator(self, threshold: float = defaults.THRESHOLD, device="cpu",
                    keep_per_image: bool = False) -> Accumulator:
        return ClassAccumulator(self.classes, device, keep_per_image, ignore=IGNORE)

    def at_size(self, logits: torch.Tensor) -> torch.Tensor:
        """The class map (h, w) uint8: the argmax of the logits resized to the image's size."""
        return logits.argmax(1)[0].byte()

    def from_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.argmax(1)[0].byte()

    def as_prediction(self, mask: np.ndarray) -> np.ndarray:
        return mask

    ignore = IGNORE  # the label of pixels that belong to no class

    def truth(self, target: torch.Tensor) -> np.ndarray:
        """One image's target (1, H, W) as a class map (uint8, ``IGNORE`` where no class)."""
        return target[0].byte().cpu().numpy()

    def mask(self, prediction: np.ndarray, threshold: float) -> np.ndarray:
        return prediction

    def probability_picture(self, prediction: np.ndarray) -> Image.Image:
        raise ValueError("label maps have no probability map (the class map is the argmax)")

    def overlay(self, image: np.ndarray, prediction: np.ndarray, threshold: float,
                truth: np.ndarray | None = None) -> np.ndarray:
        """The photo with each foreground class laid over it in its colour."""
        return plots.blend(image, prediction, self.classes, colors=self.colors)

    def score(self, accumulator: Accumulator, prediction: np.ndarray, truth: np.ndarray) -> None:
        """A class map scored as the one-hot "probabilities" of its classes."""
        onehot = F.one_hot(torch.from_numpy(prediction).long(), self.classes).permute(2, 0, 1)[None].float()
        accumulator.update(onehot, torch.from_numpy(truth)[None, None].float())

    def area(self, mask_values: np.ndarray) -> dict:
        h, w = mask_values.shape
        counts = np.bincount(mask_values.ravel(), minlength=self.classes)
        return {"width": w, "height": h, "area_pixels": int(counts[1:].sum()),
                "area_percent": round(100 * float(counts[1:].sum()) / (h * w), 3),
                "classes": {f"class {k}": {"area_pixels": int(c), "area_percent": round(100 * int(c) / (h * w), 3)}
                            for k, c in enumerate(counts) if k > 0}}

    def summary(self, probability_map: np.ndarray, threshold: float) -> dict:
        raise ValueError("label maps have no probability map (the class map is the argmax)")

    def sample_panels(self, image: np.ndarray, truth: torch.Tensor, probs: torch.Tensor, threshold: float,
                      title: str | None) -> list[tuple[np.ndarray, str]]:
        """Image with the predicted classes laid over it | ground truth | prediction, in the class colours."""
        gt, pred = truth[0].byte().cpu().numpy(), probs.argmax(0).byte().cpu().numpy()
        valid = gt != IGNORE
        js = float(np.mean([plots.jaccard((pred == k) & valid, gt == k) for k in range(1, self.classes)]))
        table = np.full((256, 3), 128, np.uint8)  # pixels of no class in grey
        table[:self.classes] = plots.color_labels(np.arange(self.classes), self.classes)
        colour = lambda labels: table[labels]  # noqa: E731
        return [(plots.blend(image, pred, self.classes), title or "image + prediction"),
                (colour(gt), "ground truth"), (colour(pred), f"prediction  mean JS={js:.2f}")]

    def onnx_metadata(self) -> dict:
        return {"num_classes": self.classes, "class_colors": json.dumps([list(c) for c in self.colors])}

    @property
    def output_note(self) -> str:
        return f"class map = argmax over the {self.classes} logits (class 0 the background)"


BINARY_TASK = BinaryTask()


def task_for(num_classes: int, colors=None) -> Task:
    """The task of ``num_classes`` classes: binary masks for one (the reference's), label maps else."""
    targets = targets_for(num_classes, colors)
    return LabelMapTask(targets) if isinstance(targets, LabelMaps) else BINARY_TASK


def task_of(cfg: TrainConfig) -> Task:
    """The task a run's settings describe (its class count and colours)."""
    return task_for(cfg.num_classes, load_class_colors(cfg.class_colors, cfg.num_classes))


