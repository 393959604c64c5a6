"""Postprocessing of predicted masks, decided on the validation split and never on the test split (nnU-Net's rule):
a step is kept only if it raises the mean validation JS.

The steps, per foreground class (binary masks have one): remove the connected regions smaller than an area (a
fraction of the image, so that a decision made at the network's size holds at a photo's own), keep only the largest
region, fill the holes inside regions (with background only: a label map's other classes stay). For binary masks
the decision threshold is chosen the same way. ``choose`` makes the decision from predictions and ground truths;
``Postprocessing.apply`` carries it out on a mask at any size. A run keeps it in ``best.pt`` and
``postprocessing.json``; ``evaluate``, ``predict``, ``serve`` and an exported ONNX file's metadata carry it, and
``--postprocess none`` leaves it out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage
from scipy.stats import binomtest

MARGIN = 5e-4  # a step is kept only if it raises the mean validation JS by at least this much, and (``_pays``)
SIGN_P = 0.1  # the images it makes better outnumber those it makes worse beyond chance (one-sided sign test): a
# gain on one or two images of a small validation split is luck, not a rule for every image
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # the decision thresholds tried for binary masks
MIN_AREAS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)  # region sizes tried, as fractions of the image
EIGHT = np.ones((3, 3), bool)  # regions are 8-connected


@dataclass(frozen=True)
class Steps:
    """What is done to one class's mask: regions below ``min_area`` (a fraction of the image's pixels) removed,
    then all but the ``largest`` region, then the holes filled (``fill_holes``)."""

    min_area: float = 0.0
    largest: bool = False
    fill_holes: bool = False

    def __bool__(self) -> bool:
        return bool(self.min_area or self.largest or self.fill_holes)

    def describe(self) -> str:
        parts = ([f"remove regions under {self.min_area:.4g} of the image"] if self.min_area else []) \
            + (["keep the largest region"] if self.largest else []) + (["fill holes"] if self.fill_holes else [])
        return ", ".join(parts) or "nothing"

    def apply(self, fg: np.ndarray, regions: tuple[np.ndarray, np.ndarray] | None = None,
              others: np.ndarray | None = None) -> np.ndarray:
        """The mask (H, W) bool after these steps. ``regions``: ``fg``'s labelled regions and their sizes
        (``regions_of``) when already known; ``others``: pixels of other classes, which filling holes leaves as
        they are."""
        kept = fg
        if self.min_area or self.largest:
            labels, sizes = regions if regions is not None else regions_of(fg)
            keep = sizes >= self.min_area * fg.size
            keep[0] = False
            if self.largest and keep.any():
                keep[:] = False
                keep[int(np.argmax(sizes))] = True
            kept = keep[labels]
        if self.fill_holes:
            filled = ndimage.binary_fill_holes(kept)
            kept = filled if others is None else kept | (filled & ~others)
        return kept


def regions_of(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(8-connected region labels of ``fg``, each label's size in pixels, 0 for the background's)."""
    labels, n = ndimage.label(fg, EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels, sizes


@dataclass(frozen=True)
class Postprocessing:
    """A decision: the binary threshold (None: the model's own), each foreground class's ``Steps``, and what it was
    chosen on with the validation JS before and after (``chosen_on``, ``valid_JS``)."""

    threshold: float | None = None
    classes: dict[int, Steps] = field(default_factory=dict)
    chosen_on: str = ""
    valid_JS: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.threshold is not None or any(self.classes.values())

    def headline(self) -> str:
        """"chosen on <where>: <the steps>", as every report names a decision."""
        return f"chosen on {self.chosen_on or 'validation'}: {self.describe()}"

    def threshold_or(self, given: float) -> float:
        """The threshold the masks are made with: the one chosen on validation, else ``given`` (the run's)."""
        return self.threshold if self.threshold is not None else given

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """The mask after the steps: a bool mask (binary) or a class map (label maps), at any size. Pixels removed
        from a class become background; holes filled are background pixels only."""
        if not any(self.classes.values()):
            return mask
        if mask.dtype == bool:
            return self.classes.get(1, Steps()).apply(mask)
        out = mask.copy()
        for k, steps in self.classes.items():
            if not steps:
                continue
            fg = mask == k
            new = steps.apply(fg, others=(mask != 0) & ~fg)
            out[fg & ~new] = 0
            out[new & ~fg] = k
        return out

    def mask_prediction(self, task, prediction: np.ndarray, threshold: float) -> np.ndarray:
        """The mask these steps make of a prediction, as a prediction again (``task.as_prediction``: 0/1
        probabilities of a binary mask, cut at 0.5; a class map as it is)."""
        return task.as_prediction(self.apply(task.mask(prediction, threshold)))

    def describe(self) -> str:
        if not self.active:
            return "none (no step raised the validation JS on enough images)" if self.chosen_on else "none"
        parts = [f"threshold {self.threshold:g}"] if self.threshold is not None else []
        if set(self.classes) == {1}:
            parts += [self.classes[1].describe()] if self.classes[1] else []
        else:
            parts += [f"class {k}: {s.describe()}" for k, s in sorted(self.classes.items()) if s]
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "classes": {str(k): asdict(s) for k, s in self.classes.items()},
                "chosen_on": self.chosen_on, "valid_JS": self.valid_JS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict | str | None) -> Postprocessing:
        """A decision as ``to_dict`` (or its JSON) wrote it; None or {}: none."""
        if not d:
            return NONE
        if isinstance(d, str):
            d = json.loads(d)
        try:
            classes = {int(k): Steps(**v) for k, v in (d.get("classes") or {}).items()}
            threshold = d.get("threshold")
            if threshold is not None and not 0 < float(threshold) < 1:
                raise ValueError(f"threshold {threshold} is not in (0, 1)")
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a postprocessing decision ({exc})") from None
        return cls(None if threshold is None else float(threshold), classes, str(d.get("chosen_on", "")),
                   dict(d.get("valid_JS") or {}))


NONE = Postprocessing()


# ------------------------------------------------------------------------------------------------------ deciding
def _js(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    """JS of one image's masks, with the metrics' conventions: both empty is 1."""
    if valid is not None:
        pred, truth = pred & valid, truth & valid
    inter = np.count_nonzero(pred & truth)
    union = np.count_nonzero(pred | truth)
    return inter / union if union else 1.0


class _Regions:
    """One image's mask at one threshold (or of one class), with its 8-connected regions labelled once, so that
    every candidate step is scored without labelling again."""

    def __init__(self, fg: np.ndarray, truth: np.ndarray, valid: np.ndarray | None, others: np.ndarray | None):
        self.fg, self.truth, self.valid, self.others = fg, truth, valid, others
        self.regions = regions_of(fg)

    def score(self, steps: Steps) -> float:
        return _js(steps.apply(self.fg, self.regions, self.others), self.truth, self.valid)


def _per_image(regions: list[_Regions], steps: Steps) -> np.ndarray:
    return np.array([r.score(steps) for r in regions])


def _pays(new: np.ndarray, old: np.ndarray) -> bool:
    """nnU-Net's rule (the mean JS rises, here by ``MARGIN`` at least), and more images gain than lose, beyond
    chance: a one-sided sign test at ``SIGN_P`` (4 better and none worse pass; 1 better, or 5 better and 2 worse,
    do not)."""
    better, worse = int((new > old + 1e-9).sum()), int((new < old - 1e-9).sum())
    if new.mean() < old.mean() + MARGIN or better <= worse:
        return False
    return binomtest(better, better + worse, 0.5, alternative="greater").pvalue <= SIGN_P


def _greedy(regions: list[_Regions], tried: list) -> tuple[Steps, float, float]:
    """Greedily: from no step, add the step that raises the mean JS most while it pays (``_pays``), until none
    does. Returns (steps, JS without, JS with); ``tried`` gets every candidate's mean JS and the images it made
    better and worse."""
    current = base = _per_image(regions, Steps())
    steps = Steps()
    while True:
        candidates = []
        if not steps.largest:
            candidates.append(replace(steps, largest=True, min_area=0.0))
            if not steps.min_area:
                candidates += [replace(steps, min_area=a) for a in MIN_AREAS]
        if not steps.fill_holes:
            candidates.append(replace(steps, fill_holes=True))
        scored = [(_per_image(regions, c), c) for c in candidates]
        tried += [{"steps": c.describe(), "JS": round(float(js.mean()), 5), "better": int((js > current + 1e-9).sum()),
                   "worse": int((js < current - 1e-9).sum())} for js, c in scored]
        paying = [(js, c) for js, c in scored if _pays(js, current)]
        if not paying:
            return steps, float(base.mean()), float(current.mean())
        current, steps = max(paying, key=lambda sc: sc[0].mean())


def choose(predictions: list[np.ndarray], truths: list[np.ndarray], task, threshold: float,
           chosen_on: str = "") -> Postprocessing:
    """The postprocessing that raises the mean JS of ``predictions`` against ``truths`` (the validation split;
    never the test split): for binary masks (predictions: probabilities (H, W)) first the threshold, kept at the
    model's ``threshold`` unless another of ``THRESHOLDS`` pays (``_pays``), then the steps; for label
    maps (class maps (H, W)) the steps of each foreground class, on its own JS (pixels of ``task.ignore``, no
    class, left out)."""
    if not predictions:
        return NONE
    report: dict = {}
    if task.thresholded:
        truths_fg = [t > 0 for t in truths]
        by_threshold = {t: np.array([_js(p > t, g) for p, g in zip(predictions, truths_fg)])
                        for t in sorted({*THRESHOLDS, threshold})}
        paying = [t for t in by_threshold if _pays(by_threshold[t], by_threshold[threshold])]
        chosen_t = max(paying, key=lambda t: by_threshold[t].mean()) if paying else threshold
        report["thresholds"] = {f"{t:g}": round(float(js.mean()), 5) for t, js in by_threshold.items()}
        tried: list = []
        regions = [_Regions(p > chosen_t, g, None, None) for p, g in zip(predictions, truths_fg)]
        steps, _, after = _greedy(regions, tried)
        report.update(none=round(float(by_threshold[threshold].mean()), 5), chosen=round(after, 5), tried=tried)
        return Postprocessing(chosen_t if chosen_t != threshold else None, {1: steps}, chosen_on, report)
    classes, before, after = {}, [], []
    for k in range(1, task.classes):
        valid = [t != task.ignore for t in truths]
        tried = []
        regions = [_Regions(p == k, t == k, v, (p != 0) & (p != k)) for p, t, v in zip(predictions, truths, valid)]
        classes[k], b, a = _greedy(regions, tried)
        before.append(b)
        after.append(a)
        report[f"class {k}"] = {"none": round(b, 5), "chosen": round(a, 5), "tried": tried}
    report.update(none=round(float(np.mean(before)), 5), chosen=round(float(np.mean(after)), 5))
    return Postprocessing(None, classes, chosen_on, report)


def shown(task, prediction: np.ndarray, threshold: float, post: Postprocessing) -> tuple[np.ndarray, float]:
    """(prediction, threshold) that give the mask ``post`` makes of ``prediction``: the pair the mask file, the
    overlay and the scores are made of (the probability map stays the network's)."""
    if not any(post.classes.values()):
        return prediction, threshold
    return post.mask_prediction(task, prediction, threshold), 0.5


class PostprocessedScores:
    """An accumulator's stand-in that scores the postprocessed masks of each batch's probabilities (B, C, H, W)
    against their targets (B, 1, H, W): what ``evaluate``'s loop feeds, so one forward pass gives the scores with and
    without (``metrics.Accumulators``)."""

    def __init__(self, accumulator, post: Postprocessing, task, threshold: float):
        self.accumulator, self.post, self.task, self.threshold = accumulator, post, task, threshold

    def update(self, probs, target) -> None:
        for p, t in zip(probs, target):
            prediction = self.task.from_probabilities(p[None]).cpu().numpy()
            self.task.score(self.accumulator, self.post.mask_prediction(self.task, prediction, self.threshold),
                            t[0].cpu().numpy())

    def all_reduce(self) -> None:
        self.accumulator.all_reduce()
