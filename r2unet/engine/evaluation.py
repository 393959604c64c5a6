"""Scoring a trained model: ``evaluate_checkpoint`` (``r2unet evaluate``) on a split of a prepared dataset, at the
network's size or at each image's own (through ``inference.predict_images``), its printed report, and a run's
redrawn sample grid (``r2unet plot``)."""

from __future__ import annotations

import csv
import io
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import defaults
from ..data.cache import split_cache
from ..data.dataset import DeviceTransform, make_loader
from ..data.imageio import LabelMapsFound, NotBinaryMask
from ..data.pairs import SPLITS, checked_pairs, note_ambiguous, report_problems, split_folders
from ..data.prepare import data_split
from ..fileio import atomic_write_text
from ..progress import track
from .checkpoint import RunFiles, load_file, store_postprocessing
from .config import ConfigError, TrainConfig
from .inference import Averaged, Segmenter, load_for_inference, read_gt_for
from .loop import draw_samples, evaluate, predictions_and_truths
from .metrics import Accumulators, per_image_spread
from .postprocess import MARGIN, SIGN_P, PostprocessedScores, choose
from .runtime import Precision
from .task import task_of

RESOLUTIONS = ("training", "original")


def evaluate_checkpoint(checkpoints, data_path: str | Path, split: str = "test",
                        batch_size: int = defaults.BATCH_SIZE,
                        device: str = "auto", threshold: float | None = None, image_size: int | None = None,
                        amp: str | None = None, per_image_csv: str | Path | None = None, resolution: str = "training",
                        tta: bool = False, cache_dir: str | Path | None = None,
                        thresholds: list[float] | None = None, postprocess: str = "auto", runtime: str = "auto",
                        log=print, **model_overrides) -> dict:
    """Metrics of a checkpoint (or of the models of an ensemble, averaged: ``inference.Segmenter``) on one split of a
    prepared dataset (also ``pooled`` scores under ``"pooled"``).

    ``resolution``: ``"training"`` scores at the network's size, as training's validation and test do (and the
    reference); ``"original"`` scores every image at its own resolution against its mask file, as the ISIC 2018
    challenge did, with the prediction made as ``predict`` makes it. ``tta``: average the flipped predictions
    (``predict --tta``).
    With ``per_image_csv``, every image's scores are written there (one row per image, in the split's order) and the
    five images with the lowest JS are returned under ``"worst"`` and drawn in ``<csv stem>_worst.png``
    (``"worst_picture"``): where to look first. ``amp``: None runs the forward in the precision the checkpoint was
    trained in (its ``amp`` setting), so the scores match the run's ``results.json``. ``cache_dir``: where the
    decode-once cache lives (default ``data_path/.r2unet_cache``). ``thresholds``: also score the split at each of
    these thresholds (same forward passes) under ``"threshold_sweep"``, and name the one with the best mean JS
    (``"best_threshold"``): choose it on the validation split, then pass it to evaluate/predict as ``threshold``.
    ``postprocess``: "auto" scores the masks after the postprocessing the run chose on validation (as predict
    writes them; the scores without it under ``"without_postprocessing"``), "none" the network's. ``runtime``:
    "auto" scores what predict runs (an int8 or ONNX model made from the checkpoint, where it would run in float32
    on a CPU: ``Segmenter``), "torch" the checkpoint itself."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be train, valid or test, got {split!r}")
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    recorded: dict = {}
    # amp None: the precision the run was trained (and tested) in
    segmenter = Segmenter(checkpoints, model_overrides=model_overrides, device=device, amp=amp,
                          image_size=image_size, threshold=threshold, log=log, record=recorded,
                          postprocess=postprocess, runtime=runtime)
    cfg, task, dev, threshold = segmenter.cfg, segmenter.task, segmenter.device, segmenter.threshold
    post = segmenter.post
    split_note = _split_since_training(recorded.get("data_split"), cfg, data_path, split, log)
    _folds_trained_on(checkpoints, split, log)
    if thresholds and not task.thresholded:
        raise ConfigError(f"--thresholds: for binary masks only; this checkpoint segments {task.classes} classes "
                          "(a class map is the argmax, with no threshold)")
    precision, channels_last = segmenter.members[0].precision, segmenter.members[0].channels_last
    acc, raw, sweep, fed = _accumulators(task, threshold, cfg.threshold, post, dev, thresholds or (), split, log)
    transform = DeviceTransform(cfg.image_size, dev, None, img_ch=cfg.img_ch, labels=task.targets.nearest)
    cache = None
    scored = _scoring_module(segmenter, tta, resolution, per_image_csv, log)
    with _binary_model_on_label_maps(segmenter.names[0], split):
        if resolution == "original":
            names = _score_at_original_size(segmenter, data_path, split, fed, batch_size, tta, log)
        else:
            cache = split_cache(data_path, split, cfg.image_size, cache_dir=cache_dir, targets=task.targets, log=log)
            names = cache.names
            loader = make_loader(cache, batch_size, train=False, drop_last=False, pin_memory=dev.type == "cuda")
            evaluate(scored, loader, transform, precision, task, threshold, channels_last,
                     progress=f"{split} split" if sys.stderr.isatty() else None, accumulator=fed)
    out = _scores(acc, raw, sweep, post, resolution, tta, split_note)
    if per_image_csv is not None:
        def draw(cache, rows, picture, title, row_titles):
            draw_samples(scored, cache, rows, transform, precision, task, cfg.threshold, picture, title, row_titles)

        def open_cache():
            return cache if cache is not None else split_cache(data_path, split, cfg.image_size, cache_dir=cache_dir,
                                                               targets=task.targets, log=log)

        out.update(_per_image_report(acc.per_image(), names, per_image_csv, split, resolution, log=log, draw=draw,
                                     open_cache=open_cache))
    return out


def _accumulators(task, threshold: float, trained_threshold: float, post, dev, thresholds, split: str, log):
    """(the scores reported, the scores without postprocessing or None, one per swept threshold, what the
    predictions are fed to: all of them at once)."""
    acc = task.accumulator(threshold if not post.active else 0.5, dev, keep_per_image=True)
    raw = task.accumulator(trained_threshold, dev, keep_per_image=True) if post.active else None  # without, beside
    sweep = [task.accumulator(t, dev) for t in thresholds]
    if sweep and split == "test":
        log("note: a threshold chosen on the test split makes its test scores optimistic; sweep on --split valid")
    if post.active:
        return acc, raw, sweep, Accumulators(PostprocessedScores(acc, post, task, threshold), raw, *sweep)
    return acc, raw, sweep, Accumulators(acc, *sweep) if sweep else acc


def _scores(acc, raw, sweep, post, resolution: str, tta: bool, split_note: dict | None) -> dict:
    """What ``evaluate_checkpoint`` reports from its accumulators: the means over images (and pooled), their spread,
    how the masks were made, the scores without postprocessing and the threshold sweep."""
    out = acc.compute("image")
    if "pooled" in acc.reductions:
        out["pooled"] = acc.compute("pooled")
    out["num_images"] = acc.num_images
    # spread of the per-image scores: the sd, and a 95 % bootstrap interval of each mean (a paper's error bars)
    out["spread"] = per_image_spread(acc.per_image())
    out["resolution"], out["tta"] = resolution, tta
    out["postprocessing"] = post.describe() if post.active else None
    if raw is not None:
        out["without_postprocessing"] = raw.compute("image")
        out["without_spread"] = per_image_spread(raw.per_image())
    if split_note:
        out["split_changed"] = split_note
    if sweep:
        out["threshold_sweep"] = [{"threshold": a.threshold, **a.compute("image")} for a in sweep]
        out["best_threshold"] = max(out["threshold_sweep"], key=lambda r: r["JS"])["threshold"]
    return out


def _split_since_training(recorded: dict | None, cfg: TrainConfig, data_path, split: str, log) -> dict | None:
    """A checkpoint scored on its own run's data whose ``split`` is no longer what it was in training: said, with
    how many of its images the model trained on (its scores are then not the run's, and optimistic)."""
    if not recorded or Path(data_path).resolve() != Path(cfg.data_path).resolve():
        return None
    now = set(data_split(data_path)["splits"][split])
    before = set(recorded.get("splits", {}).get(split, []))
    if now == before:
        return None
    seen = sorted(now & set(recorded.get("splits", {}).get("train", []))) if split != "train" else []
    added, removed = sorted(now - before), sorted(before - now)
    log(f"warning: the {split} split of {data_path} is not the one this model was trained with: "
        + (f"{len(seen)} of its images were in the model's training split ({', '.join(seen[:5])}"
           + (" ..." if len(seen) > 5 else "") + "), " if seen else "")
        + f"{len(added)} added and {len(removed)} removed since; these scores are not the run's test scores"
        + (", and are optimistic (the model has seen those images)" if seen else ""))
    return {"trained_on": seen, "added": len(added), "removed": len(removed)}


def _folds_trained_on(checkpoints, split: str, log) -> None:
    """The ensemble of a cross-validation scored on its own training or validation split: every image there trained
    all folds but one, so the scores are optimistic; said."""
    given = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if split != "test" and any((Path(c) / "folds.json").is_file() for c in given):
        log(f"warning: the {split} split's images trained all but one of this cross-validation's folds: these "
            "scores are optimistic; score the ensemble on the test split (or each fold on its own held-out fold)")


@contextmanager
def _binary_model_on_label_maps(checkpoint, split: str):
    """A binary model scored on masks that hold class labels: said as such (the scores would merge the classes)."""
    try:
        yield
    except (NotBinaryMask, LabelMapsFound) as exc:
        example = exc if isinstance(exc, NotBinaryMask) else max(exc.examples, key=lambda e: e.classes)
        raise ConfigError(f"{checkpoint}: a model of binary masks (one output), but the {split} split holds label "
                          f"maps ({example.path}: {example.found}; about {exc.classes} classes): its scores would "
                          f"merge the classes. Evaluate a model trained on them with --num_classes {exc.classes}"
                          ) from None


def _scoring_module(segmenter: Segmenter, tta: bool, resolution: str, per_image_csv, log):
    """The models as one network on training-size inputs (the split's cache): what training-size scores and the
    picture of the worst images need. An ensemble of several sizes scored at the original resolution draws that
    picture with its first model, said in a note."""
    if resolution == "training":
        return segmenter.as_module(tta)
    if per_image_csv is None:
        return None
    try:
        return segmenter.as_module(tta)
    except ConfigError:
        log(f"note: the models take different sizes; the picture of the worst images shows {segmenter.names[0]}'s "
            "predictions")
        return Averaged([segmenter.members[0].model], segmenter.task, tta)


def _score_at_original_size(segmenter: Segmenter, data_path, split: str, accumulator, batch_size: int, tta: bool,
                            log) -> list[str]:
    """Score every image of the split at its own size against its mask file (``predict``'s way); its names."""
    image_dir, mask_dir = split_folders(data_path, split)
    if not image_dir.is_dir():
        raise ConfigError(f"--data_path: {image_dir} is missing; run 'r2unet prepare' first")
    pairs, problems, _ = checked_pairs(image_dir, mask_dir)
    report_problems(problems, skip_bad=False, log=log)
    note_ambiguous(pairs, log)
    score_at_original_resolution(segmenter, pairs, accumulator, batch_size=batch_size, tta=tta, log=log)
    return [p.image.name for p in pairs]


@torch.no_grad()
def score_at_original_resolution(segmenter: Segmenter, pairs, accumulator, batch_size: int | None = None,
                                 tta: bool = False, progress: bool | None = None, log=print) -> None:
    """Add each (image, mask) pair's scores to ``accumulator`` at the image's original resolution, as the ISIC 2018
    challenge scored: the prediction is made exactly as ``predict`` makes it (``Segmenter.predict``: network size
    in, logits resized back to the original size) and compared with the mask file as it is, pixel for pixel
    (``task.score``). ``pairs``: objects with ``.image`` and ``.mask`` paths."""
    pairs = list(pairs)
    masks = {p.image: p.mask for p in pairs}
    task = segmenter.task
    results = segmenter.predict([p.image for p in pairs], batch_size, tta)
    for path, _, prediction in track(results, len(pairs), "scoring at the original resolution", log=log,
                                     terminal=progress):
        task.score(accumulator, prediction, read_gt_for(masks[path], path, prediction.shape, task.targets))


def _per_image_report(scores: dict, names: list[str], per_image_csv, split: str, resolution: str, log, draw,
                      open_cache) -> dict:
    """Every image's scores to ``per_image_csv`` (in the split's order); the five lowest-JS images named and drawn
    in ``<csv stem>_worst.png`` (seeing the failures beats reading their names)."""

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes file names that hold commas
    writer.writerow(["image", *scores])
    writer.writerows([name, *(f"{scores[k][i]:.6f}" for k in scores)] for i, name in enumerate(names))
    atomic_write_text(per_image_csv, text.getvalue())
    order = sorted(range(len(names)), key=lambda i: scores["JS"][i])[:5]
    cache = open_cache()  # the picture is drawn at the network's size, from the cache
    row_of = {name: i for i, name in enumerate(cache.names)}
    picture = Path(per_image_csv).with_name(Path(per_image_csv).stem + "_worst.png")
    draw(cache, [row_of[names[i]] for i in order], picture,
         f"lowest JS on the {split} split" + (" (scored at each image's size, drawn at the network's)"
                                              if resolution == "original" else "")
         + "\ngreen: prediction, blue: ground truth",
         [f"{names[i]}  JS {scores['JS'][i]:.3f}" for i in order])
    return {"per_image_csv": str(per_image_csv), "worst_picture": str(picture),
            "worst": [{"image": names[i], "JS": scores["JS"][i], "DC": scores["DC"][i]} for i in order]}


def choose_postprocessing(run_dir: str | Path, data_path: str | Path | None = None, device: str = "auto",
                          cache_dir: str | Path | None = None, log=print):
    """``r2unet postprocess``: choose the postprocessing of an existing run's best checkpoint on the validation split
    of its data (``data_path``, default the run's), as training does at its end, and store it with the run
    (best.pt, postprocessing.json). Returns the decision (``postprocess.Postprocessing``) and the data's folder."""
    run = RunFiles(run_dir)
    if not run.best.is_file():
        raise ConfigError(f"{run_dir}: no run's checkpoints/best.pt there; pass a run folder of 'r2unet train'")
    segmenter = Segmenter(run.dir, device=device, log=log, postprocess="none", runtime="torch")
    cfg, task = segmenter.cfg, segmenter.task
    data_path = Path(data_path or cfg.data_path)
    names, predictions, truths = validation_predictions(segmenter, data_path, cache_dir or cfg.cache_dir, log)
    if not names:
        raise ConfigError(f"{data_path}: its validation split is empty; postprocessing is chosen on validation "
                          "images only (never on the test split)")
    post = choose(predictions, truths, task, cfg.threshold,
                  f"the validation split ({len(names)} images at {cfg.image_size} px)")
    store_postprocessing(run, post)
    return post, data_path


def validation_predictions(segmenter: Segmenter, data_path, cache_dir=None, log=print) -> tuple[list, list, list]:
    """(names, predictions, ground truths) of the validation split of ``data_path`` by the first model of
    ``segmenter``, at the network's size (``loop.predictions_and_truths``): what postprocessing is chosen on."""
    cfg, task, member = segmenter.cfg, segmenter.task, segmenter.members[0]
    cache = split_cache(data_path, "valid", cfg.image_size, cache_dir=cache_dir, targets=task.targets, log=log)
    loader = make_loader(cache, defaults.BATCH_SIZE, train=False, drop_last=False)
    transform = DeviceTransform(cfg.image_size, member.device, None, img_ch=cfg.img_ch, labels=task.targets.nearest)
    predictions, truths = predictions_and_truths(member.model, loader, transform, member.precision, task,
                                                 member.channels_last)
    return list(cache.names), predictions, truths


def postprocessing_report(post) -> str:
    """What ``choose_postprocessing`` tried and chose, as a table of mean validation JS."""
    report = post.valid_JS
    lines = [post.headline(),
             f"  validation JS without: {report['none']:.4f}   with: {report['chosen']:.4f}"]
    if "thresholds" in report:
        lines.append("  thresholds: " + "  ".join(f"{t} {js:.4f}" for t, js in report["thresholds"].items()))
    for scope, tried in ([("", report["tried"])] if "tried" in report else
                         [(f"{k}: ", v["tried"]) for k, v in report.items() if isinstance(v, dict) and "tried" in v]):
        last = {row["steps"]: row for row in tried}  # the last round each step was tried in
        lines.append(f"  {scope}steps tried (mean JS, images better/worse): " + "; ".join(
            f"{s} {r['JS']:.4f} +{r['better']}/-{r['worse']}" for s, r in last.items()))
    lines.append(f"  a step is kept only if it raises the mean validation JS by {MARGIN:g} or more and makes more "
                 f"images better than worse beyond chance (sign test, p <= {SIGN_P:g}); stored in best.pt and "
                 "postprocessing.json (evaluate, predict, serve and export apply it; --postprocess none does not)")
    return "\n".join(lines)


def redraw_samples(run_dir: str | Path, device: str = "cpu", log=print) -> Path | None:
    """Redraw ``samples.png`` of a run from its best checkpoint and the validation images it was trained on."""
    run = RunFiles(run_dir)
    if not run.best.exists():
        return None
    model, cfg = load_for_inference(run.best)
    data_path = Path(cfg.data_path)
    if not (data_path / "valid").is_dir():
        log(f"samples not redrawn: the run's data ({data_path / 'valid'}) is not here")
        return None
    dev, task = torch.device(device), task_of(cfg)
    cache = split_cache(data_path, "valid", cfg.image_size, cache_dir=cfg.cache_dir, progress=False,
                        log=lambda *_: None, targets=task.targets)
    if not len(cache):
        return None
    best = load_file(run.best)
    return draw_samples(model.to(dev), cache, list(range(min(6, len(cache)))),
                        DeviceTransform(cfg.image_size, dev, None, img_ch=cfg.img_ch, labels=task.targets.nearest),
                        Precision(None, dev), task, cfg.threshold, run.dir / "samples.png",
                        f"best checkpoint (epoch {best.get('best_epoch', '?')})")


def evaluation_report(metrics: dict, split: str, resolution: str, tta: bool) -> str:
    """``evaluate``'s printout: each metric's per-image mean, sd, 95 % CI and pooled value; the threshold sweep;
    where the per-image scores and the worst images are."""
    where = "at each image's original resolution" if resolution == "original" else "at the network's size"
    classes = "JS_1" in metrics  # label maps: the foreground means, then each class
    lines = [f"{split} split, {metrics['num_images']} images {where}{', flip TTA' if tta else ''}; per-image scores"
             + (" (JS, DC: means over the foreground classes; JS_k, DC_k: class k):" if classes
                else ", and pooled over all pixels:")]
    spread = metrics.get("spread", {})
    if spread:
        lines.append(f"  {'':<15}{'mean':>6}  {'sd':>6}  {'95% CI of the mean':>18}" + ("" if classes else "  pooled"))
    names = [k for k in spread if k in metrics] if classes else \
        ("ACC", "SE", "SP", "PC", "F1", "JS", "DC", "JS_thresholded")
    for k in names:
        line = f"  {k:<15}{metrics[k]:.4f}"
        if k in spread:
            lo, hi = spread[k]["ci"]
            line += f"  {spread[k]['sd']:.4f}  {lo:>8.4f} - {hi:.4f}"
        if "pooled" in metrics and k in metrics["pooled"]:
            line += f"  {metrics['pooled'][k]:.4f}"
        lines.append(line)
    if metrics.get("postprocessing"):
        without = metrics["without_postprocessing"]
        lines.append(f"after the postprocessing chosen on validation ({metrics['postprocessing']}); without it: "
                     f"JS {without['JS']:.4f}  DC {without['DC']:.4f} (--postprocess none scores the network's masks)")
    if metrics.get("threshold_sweep"):
        lines += [f"\nthreshold sweep on the {split} split (per-image means):",
                  f"  {'threshold':>9}  {'JS':>6}  {'DC':>6}  {'JS_thr':>6}  {'ACC':>6}"]
        for row in metrics["threshold_sweep"]:
            best = "  <- best JS" if row["threshold"] == metrics["best_threshold"] else ""
            lines.append(f"  {row['threshold']:>9g}  {row['JS']:.4f}  {row['DC']:.4f}  {row['JS_thresholded']:.4f}  "
                         f"{row['ACC']:.4f}{best}")
        lines.append(f"use it with --threshold {metrics['best_threshold']:g} (evaluate on the test split, predict)")
    if metrics.get("worst"):
        lines.append(f"per-image scores: {metrics['per_image_csv']}; lowest JS: "
                     + ", ".join(f"{w['image']} ({w['JS']:.3f})" for w in metrics["worst"])
                     + f"; pictured in {metrics['worst_picture']}")
    return "\n".join(lines)
