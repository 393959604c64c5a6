"""Binary segmentation metrics computed from confusion counts.

Definitions, per image (``tp fp fn tn`` are pixel counts of the thresholded prediction against the target):

- ``ACC`` = (tp + tn) / all pixels
- ``SE`` (sensitivity, recall) = tp / (tp + fn)
- ``SP`` (specificity) = tn / (tn + fp)
- ``PC`` (precision) = tp / (tp + fp)
- ``F1`` = 2 * PC * SE / (PC + SE)  (0 when PC + SE = 0)
- ``JS`` (Jaccard, IoU) = tp / (tp + fp + fn)
- ``DC`` (Dice) = 2 tp / (2 tp + fp + fn)
- ``JS_thresholded``: the ISIC 2018 Task 1 score: a per-image JS below 0.65 counts as 0, then the mean.

Conventions:

- ``target`` is binary: any value > 0.5 is foreground. The prediction is foreground where ``probs > threshold``.
- A ratio whose denominator is 0 scores **1 if the image has no errors (fp + fn = 0), else 0**. So an image whose
  target and prediction are both empty scores 1 on JS, DC, F1, PC and SE (and SP, ACC as usual); an empty target with
  a non-empty prediction scores 0 on SE, JS, DC, F1 and PC; a target that is all foreground predicted perfectly
  scores SP = 1.
- ``reduction="image"`` (the ISIC protocol) computes every score per image and averages over images;
  ``reduction="pooled"`` sums the counts over all pixels of all images first. ``JS_thresholded`` is always per image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import defaults

METRIC_NAMES = ("ACC", "SE", "SP", "PC", "F1", "JS", "DC")
ALL_METRICS = METRIC_NAMES + ("JS_thresholded",)
ISIC_JS_THRESHOLD = 0.65


def confusion_counts(probs: torch.Tensor, target: torch.Tensor, threshold: float = defaults.THRESHOLD) -> torch.Tensor:
    """Per-image counts, shape (N, 4) int64, columns ``tp fp fn tn``. Inputs are (N, ...) of any trailing shape."""
    if probs.shape != target.shape:
        raise ValueError(f"probs and target shapes differ: {tuple(probs.shape)} vs {tuple(target.shape)}")
    pred = (probs > threshold).flatten(1)
    gt = (target > 0.5).flatten(1)
    tp = (pred & gt).sum(1)
    fp = (pred & ~gt).sum(1)
    fn = (~pred & gt).sum(1)
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack((tp, fp, fn, tn), dim=1).long()


def _ratio(num: torch.Tensor, den: torch.Tensor, perfect: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), perfect.to(num.dtype))


def scores_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores for each row of ``counts`` (shape (..., 4), ``tp fp fn tn``), following the module's conventions."""
    tp, fp, fn, tn = counts.double().unbind(-1)
    perfect = (fp + fn) == 0
    se = _ratio(tp, tp + fn, perfect)
    pc = _ratio(tp, tp + fp, perfect)
    f1 = torch.where(pc + se > 0, 2 * pc * se / (pc + se).clamp(min=1e-300), torch.zeros_like(se))
    return {
        "ACC": (tp + tn) / (tp + fp + fn + tn).clamp(min=1),
        "SE": se,
        "SP": _ratio(tn, tn + fp, perfect),
        "PC": pc,
        "F1": f1,
        "JS": _ratio(tp, tp + fp + fn, perfect),
        "DC": _ratio(2 * tp, 2 * tp + fp + fn, perfect),
    }


def segmentation_metrics(
    probs: torch.Tensor, target: torch.Tensor, threshold: float = defaults.THRESHOLD, reduction: str = "image"
) -> dict[str, float]:
    """Scores ``ACC SE SP PC F1 JS DC JS_thresholded`` (floats) of ``probs`` against ``target``, both (N, 1, H, W).

    See the module docstring for definitions and the conventions for empty masks.
    """
    acc = MetricAccumulator(threshold=threshold, device=probs.device)
    acc.update(probs, target)
    return acc.compute(reduction)


class Accumulator:
    """Scores accumulated on the device over batches, the one interface of binary masks (``MetricAccumulator``) and
    label maps (``ClassAccumulator``): ``update(probs, target)`` per batch (device work only, no host
    synchronisation), ``all_reduce()`` across processes, then ``compute()`` (the means over images; ``"pooled"``
    where ``reductions`` has it), ``per_image()`` (every image's scores, with ``keep_per_image``) and
    ``num_images``. ``names``: the scores ``per_image`` holds, ``JS`` and ``DC`` among them."""

    names: tuple[str, ...] = ()
    reductions: tuple[str, ...] = ("image",)

    def __init__(self, device: torch.device | str = "cpu", keep_per_image: bool = False):
        self.device, self.keep_per_image = torch.device(device), keep_per_image
        self.reset()

    def reset(self) -> None:
        self._per_image: list[torch.Tensor] = []
        self._count = torch.zeros(1, dtype=torch.float64, device=self.device)  # images seen

    def _sums(self) -> list[torch.Tensor]:
        """The tensors of state that add up across processes."""
        return [self._count]

    def _add_rows(self, rows: torch.Tensor) -> None:
        """Every image's scores of a batch (B, len(names)) float64, on the device."""
        if self.keep_per_image:
            self._per_image.append(rows)
        # the image count is made on the device (torch.full), not copied from the host: a host-to-GPU copy of a
        # new tensor waits for the GPU queue to drain, once per step
        self._count += torch.full((1,), float(len(rows)), dtype=torch.float64, device=self.device)

    def all_reduce(self) -> None:
        """Sum the state over all processes of the default process group (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in self._sums():
                dist.all_reduce(t)

    def per_image(self) -> dict[str, list[float]]:
        """Every image's scores in update order (``keep_per_image=True``; this process's images only)."""
        if not self.keep_per_image:
            raise ValueError(f"per_image() needs {type(self).__name__}(keep_per_image=True)")
        rows = torch.cat(self._per_image).cpu() if self._per_image else torch.zeros(0, len(self.names))
        return {k: rows[:, i].tolist() for i, k in enumerate(self.names)}

    @property
    def num_images(self) -> int:
        return int(self._count.item())

    def compute(self, reduction: str = "image") -> dict[str, float]:
        if reduction not in self.reductions:
            raise ValueError(f"reduction must be one of {', '.join(map(repr, self.reductions))}, got {reduction!r}")
        if self.num_images == 0:
            raise ValueError("no images were accumulated; cannot compute metrics")
        return self._compute(reduction)

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def _compute(self, reduction: str) -> dict[str, float]:
        raise NotImplementedError


class MetricAccumulator(Accumulator):
    """Binary scores (``ACC SE SP PC F1 JS DC`` per image, ``JS_thresholded``; pooled counts too) of probabilities
    thresholded at ``threshold`` against binary targets, following the module docstring."""

    names = METRIC_NAMES
    reductions = ("image", "pooled")

    def __init__(self, threshold: float = defaults.THRESHOLD, device: torch.device | str = "cpu",
                 keep_per_image: bool = False):
        self.threshold = threshold
        super().__init__(device, keep_per_image)

    def reset(self) -> None:
        super().reset()
        # Float64 sums: per-image score sums (7) and of the thresholded JS; pooled counts (4).
        self.image_sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64, device=self.device)
        self.pooled_counts = torch.zeros(4, dtype=torch.int64, device=self.device)

    def _sums(self) -> list[torch.Tensor]:
        return [*super()._sums(), self.image_sums, self.pooled_counts]

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        counts = confusion_counts(probs.detach(), target.detach(), self.threshold).to(self.device)
        scores = scores_from_counts(counts)
        js = scores["JS"]
        rows = torch.stack([scores[k] for k in METRIC_NAMES], dim=1)  # (B, 7)
        self._add_rows(rows)
        thresholded = torch.where(js >= ISIC_JS_THRESHOLD, js, torch.zeros_like(js)).sum()
        self.image_sums += torch.cat((rows.sum(0), thresholded[None]))
        self.pooled_counts += counts.sum(0)

    def _compute(self, reduction: str) -> dict[str, float]:
        sums, n = self.image_sums.cpu(), self.num_images
        if reduction == "image":
            out = {k: (sums[i] / n).item() for i, k in enumerate(METRIC_NAMES)}
        else:
            pooled = scores_from_counts(self.pooled_counts.cpu())
            out = {k: pooled[k].item() for k in METRIC_NAMES}
        out["JS_thresholded"] = (sums[len(METRIC_NAMES)] / n).item()
        return out


class ClassAccumulator(Accumulator):
    """Scores of label maps with ``num_classes`` classes (0 the background): per image and class, ``DC_k`` and
    ``JS_k`` from the pixels predicted (argmax) and labelled k (an image where class k is neither labelled nor
    predicted scores 1 for k, as an empty binary mask does); ``DC`` and ``JS`` are the means over the foreground
    classes 1..K-1, ``ACC`` the share of pixels of the right class. Every score is averaged over images. Pixels
    labelled ``ignore`` (no class) count in no score."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", keep_per_image: bool = False,
                 ignore: int | None = None):
        self.num_classes, self.ignore = num_classes, ignore
        self.names = ("ACC", "JS", "DC") + tuple(f"{m}_{k}" for k in range(1, num_classes) for m in ("JS", "DC"))
        super().__init__(device, keep_per_image)

    def reset(self) -> None:
        super().reset()
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)

    def _sums(self) -> list[torch.Tensor]:
        return [*super()._sums(), self.sums]

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """``probs`` (B, K, H, W) (softmax), ``target`` (B, 1, H, W) class indices (floats or ints)."""
        pred = probs.detach().argmax(1)
        true = target.detach()[:, 0].long()
        valid = true != self.ignore if self.ignore is not None else torch.ones_like(true, dtype=torch.bool)
        k = torch.arange(1, self.num_classes, device=pred.device).view(1, -1, 1, 1)
        p, t = (pred.unsqueeze(1) == k) & valid.unsqueeze(1), true.unsqueeze(1) == k  # (B, K-1, H, W)
        tp = (p & t).flatten(2).sum(2).double()
        wrong = (p ^ t).flatten(2).sum(2).double()  # fp + fn
        empty = (tp + wrong) == 0
        dc = torch.where(empty, 1.0, 2 * tp / (2 * tp + wrong).clamp_min(1))
        js = torch.where(empty, 1.0, tp / (tp + wrong).clamp_min(1))
        pixels = valid.flatten(1).sum(1)
        right = ((pred == true) & valid).flatten(1).sum(1).double()
        acc = torch.where(pixels > 0, right / pixels.clamp_min(1).double(), 1.0)
        per_class = torch.stack((js, dc), dim=2).flatten(1)  # JS_1, DC_1, JS_2, DC_2, ...
        rows = torch.cat((acc[:, None], js.mean(1, keepdim=True), dc.mean(1, keepdim=True), per_class), dim=1)
        rows = rows.to(self.device)
        self._add_rows(rows)
        self.sums += rows.sum(0)

    def _compute(self, reduction: str) -> dict[str, float]:
        sums, n = self.sums.cpu(), self.num_images
        return {k: (sums[i] / n).item() for i, k in enumerate(self.names)}


class Accumulators:
    """Several accumulators fed the same probabilities: ``update`` and ``all_reduce`` go to each (e.g. a split's
    scores at its threshold and at every threshold of a sweep, from one forward pass)."""

    def __init__(self, *accumulators: Accumulator):
        self.accumulators = accumulators

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        for acc in self.accumulators:
            acc.update(probs, target)

    def all_reduce(self) -> None:
        for acc in self.accumulators:
            acc.all_reduce()


def parse_thresholds(spec: str) -> list[float]:
    """``"0.3,0.5,0.7"`` or ``"start:stop:step"`` (stop included), each strictly between 0 and 1."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if not (step > 0 and stop >= start):
                raise ValueError
            values = [round(start + i * step, 6) for i in range(int((stop - start) / step + 1e-9) + 1)]
        else:
            values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--thresholds: expected a list like 0.3,0.5,0.7 or a range like 0.3:0.7:0.05, got {spec!r}") \
            from None
    bad = [v for v in values if not 0 < v < 1]
    if not values or bad:
        raise ValueError(f"--thresholds: every threshold must be between 0 and 1 (exclusive), got {spec!r}")
    return sorted(set(values))


def mean_spread(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, float | list[float]]:
    """How much a per-image mean can be trusted: the standard deviation of the values (``sd``, n - 1) and a
    percentile bootstrap confidence interval of their mean (``ci``, ``level`` two-sided; ``resamples`` resamplings
    with a fixed seed, so the same scores always give the same interval). One value has sd 0 and a point interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"sd": sd, "ci": [float(lo), float(hi)], "level": level}


def per_image_spread(per_image: dict[str, list[float]], level: float = 0.95) -> dict[str, dict]:
    """``mean_spread`` of every metric's per-image scores (``MetricAccumulator.per_image()``), ``JS_thresholded``
    included."""
    out = {k: mean_spread(v, level) for k, v in per_image.items()}
    js = np.asarray(per_image["JS"])
    out["JS_thresholded"] = mean_spread(np.where(js >= ISIC_JS_THRESHOLD, js, 0.0), level)
    return out
