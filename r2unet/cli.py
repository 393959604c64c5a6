"""Command-line interface: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .data.io import DataError
from .engine.checkpoint import CheckpointError
from .engine.config import COMPILE_MODES, TrainConfig
from .engine.trainer import TrainingError
from .export import ExportError
from .models import list_models

REF_ORIGIN_DATA = "../ISIC/dataset/ISIC2018_Task1-2_Training_Input"
REF_ORIGIN_GT = "../ISIC/dataset/ISIC2018_Task1_Training_GroundTruth"


class UserError(Exception):
    """An error whose message is for the user; printed without a traceback."""


def _cmd_synth(args) -> None:
    from .data.synth import generate_dataset

    out = generate_dataset(args.output, num_images=args.num_images, seed=args.seed, max_side=args.max_side,
                           progress=sys.stderr.isatty())
    print(f"wrote {args.num_images} image/mask pairs under {out}")


def _cmd_prepare(args) -> None:
    from .data.dataset import split_cache
    from .data.prepare import SPLITS, prepare_split

    kwargs = dict(train_ratio=args.train_ratio, valid_ratio=args.valid_ratio, test_ratio=args.test_ratio,
                  seed=args.seed, overwrite=args.overwrite, skip_bad=args.skip_bad, link=args.link,
                  progress=sys.stderr.isatty())
    if args.data_path:
        manifest = prepare_split(args.origin_data_path, args.origin_GT_path, data_path=args.data_path, **kwargs)
    else:
        targets = {s: (getattr(args, f"{s}_path"), getattr(args, f"{s}_GT_path")) for s in SPLITS}
        manifest = prepare_split(args.origin_data_path, args.origin_GT_path, targets=targets, **kwargs)
    if args.data_path and not args.no_cache:
        for split in SPLITS:
            if manifest["splits"][split]:
                split_cache(args.data_path, split, args.image_size, num_workers=args.num_workers,
                            skip_bad=args.skip_bad)


def _probability(text: str) -> float:
    """argparse type of --threshold: a probability strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _stderr_log(*args) -> None:
    """Progress of a --json run: stdout stays one JSON object, stderr keeps what finished if the run is cut short."""
    print(*args, file=sys.stderr, flush=True)


def _cmd_bench(args) -> None:
    from . import bench

    if args.what == "train":
        result = bench.bench_train(args.model_type, batch_size=args.batch_size, image_size=args.image_size, t=args.t,
                                   base_channels=args.base_channels, device=args.device, steps=args.steps,
                                   warmup=args.warmup, compile_model=args.compile, compile_mode=args.compile_mode,
                                   configs=args.configs, data_path=args.data_path,
                                   log=_stderr_log if args.json else print)
        if args.json:
            print(json.dumps(result))
            return
        print(f"\n{result['model_type']} t={result['t']} base {result['base_channels']}, {result['image_size']}px, "
              f"batch {result['batch_size']} on {result['device']} (torch {result['torch']}, "
              f"{result['threads']} threads): {result['train_gflop_per_image']:.1f} GFLOP per training image; "
              f"measured {result['peak_dtype']} matmul peak {result['peak_tflops']:.2f} TFLOP/s -> bound "
              f"{result['flop_bound_img_per_s']:.0f} img/s")
        print(f"{'configuration':<58}{'img/s':>9}{'x base':>8}{'of bound':>10}")
        for row in result["rows"]:
            if row["img_per_s"] is None:
                print(f"{row['config']:<58} failed: {row['error']}")
                continue
            print(f"{row['config']:<58}{row['img_per_s']:9.1f}{row['x_baseline']:8.2f}"
                  f"{100 * row['frac_flop_bound']:9.1f}%")
    elif args.what == "data":
        if not args.data_path:
            raise UserError("bench data needs --data_path (a prepared dataset)")
        device = args.device if args.device != "auto" else ("cuda" if __import__("torch").cuda.is_available()
                                                             else "cpu")
        result = bench.bench_data(args.data_path, image_size=args.image_size, batch_size=args.batch_size,
                                  device=device, num_workers=args.num_workers,
                                  log=_stderr_log if args.json else print)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"data pipeline on {result['device']}: {result['img_per_s']:.0f} img/s "
                  f"(batch {args.batch_size}, {args.image_size}x{args.image_size}); cache build "
                  f"{result['cache_build_s']:.2f} s for {result['cached_images']} images")


def _train_config(args) -> TrainConfig:
    """defaults < --config file < the checkpoint's config (with --resume) < flags given on the command line."""
    from pathlib import Path

    from .engine.checkpoint import load_file
    from .engine.config import read_config_file

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    values: dict = {}
    if "config" in given:
        values.update(read_config_file(given.pop("config")))
    # The seed's flags, mapped onto ours.
    apex, level = given.pop("apex", None), given.pop("apex_opt_level", "O1")
    if "amp" not in given and apex is not None:
        given["amp"] = "fp16" if apex and level in ("O1", "O2") else "off"
    if "loss_scale_value" in given:
        given["loss_scale"] = str(given.pop("loss_scale_value"))
    if "npu_idx" in given:
        given["device_index"] = given.pop("npu_idx")
    world = given.pop("world_size", None)
    if world is not None and world > 1 and int(os.environ.get("WORLD_SIZE", "1")) != world:
        raise UserError(f"--world-size {world}: launch the processes with torchrun, e.g. "
                        f"'torchrun --nproc_per_node={world} -m r2unet train ...' (see README, Multi-GPU)")
    resume = given.get("resume", values.get("resume", False))
    if resume:
        out = Path(given.get("output_dir", values.get("output_dir", TrainConfig.output_dir)))
        last = out / "checkpoints" / "last.pt"
        if last.exists():
            values.update({k: v for k, v in load_file(last)["config"].items() if k != "extra"})
    values.update(given)
    values["resume"] = bool(resume)
    epochs = values.get("num_epochs", TrainConfig.num_epochs)
    decay = values.get("num_epochs_decay", TrainConfig.num_epochs_decay)
    if "num_epochs_decay" not in values and decay > epochs:
        # the default decay (70 epochs) is longer than a short run: decay over the whole run, and say so
        values["num_epochs_decay"] = epochs
        print(f"note: --num_epochs_decay defaults to 70 > --num_epochs {epochs}; decaying over all {epochs} epochs")
    return TrainConfig.from_dict(values).validate()


def _cmd_train(args) -> None:
    from .engine.trainer import fit

    fit(_train_config(args))  # Ctrl-C / SIGTERM: fit saves last.pt and says so; main() exits with 130


def _print_metrics(metrics: dict, as_json: bool, header: str) -> None:
    if as_json:
        print(json.dumps(metrics))
        return
    print(header)
    spread = metrics.get("spread", {})
    if spread:
        print(f"  {'':<15}{'mean':>6}  {'sd':>6}  {'95% CI of the mean':>18}  pooled")
    for k in ("ACC", "SE", "SP", "PC", "F1", "JS", "DC", "JS_thresholded"):
        line = f"  {k:<15}{metrics[k]:.4f}"
        if k in spread:
            lo, hi = spread[k]["ci"]
            line += f"  {spread[k]['sd']:.4f}  {lo:>8.4f} - {hi:.4f}"
        if "pooled" in metrics and k in metrics["pooled"]:
            line += f"  {metrics['pooled'][k]:.4f}"
        print(line)


def _cmd_evaluate(args) -> None:
    from .engine.inference import evaluate_checkpoint
    from .metrics import parse_thresholds

    metrics = evaluate_checkpoint(args.checkpoint, args.data_path, split=args.split, batch_size=args.batch_size,
                                  device=args.device, threshold=args.threshold, image_size=args.image_size,
                                  amp=args.amp, model_type=args.model_type, t=args.t,
                                  base_channels=args.base_channels, per_image_csv=args.per_image,
                                  resolution=args.resolution, tta=args.tta, cache_dir=args.cache_dir,
                                  thresholds=parse_thresholds(args.thresholds) if args.thresholds else None,
                                  log=(lambda *_: None) if args.json else print)
    where = "at each image's original resolution" if args.resolution == "original" else "at the network's size"
    _print_metrics(metrics, args.json, f"{args.split} split, {metrics['num_images']} images {where}"
                   f"{', flip TTA' if args.tta else ''}; per-image scores, and pooled over all pixels:")
    if metrics.get("threshold_sweep") and not args.json:
        print(f"\nthreshold sweep on the {args.split} split (per-image means):")
        print(f"  {'threshold':>9}  {'JS':>6}  {'DC':>6}  {'JS_thr':>6}  {'ACC':>6}")
        for row in metrics["threshold_sweep"]:
            best = "  <- best JS" if row["threshold"] == metrics["best_threshold"] else ""
            print(f"  {row['threshold']:>9g}  {row['JS']:.4f}  {row['DC']:.4f}  {row['JS_thresholded']:.4f}  "
                  f"{row['ACC']:.4f}{best}")
        print(f"use it with --threshold {metrics['best_threshold']:g} (evaluate on the test split, predict)")
    if metrics.get("worst") and not args.json:
        print(f"per-image scores: {metrics['per_image_csv']}; lowest JS: "
              + ", ".join(f"{w['image']} ({w['JS']:.3f})" for w in metrics["worst"])
              + f"; pictured in {metrics['worst_picture']}")


def _load_model(args):
    from .engine.inference import load_for_inference

    return load_for_inference(args.checkpoint, model_type=args.model_type, t=args.t,
                              base_channels=args.base_channels)


def _cmd_predict(args) -> None:
    import torch

    from .engine.inference import ready_for_inference
    from .engine.runtime import resolve_device
    from .predict import PartialPrediction, run_predict

    model, cfg = _load_model(args)
    cfg.device, cfg.amp = args.device, args.amp or cfg.amp
    cfg.validate()
    device = resolve_device(cfg.device, cfg.device_index)
    model, precision, channels_last = ready_for_inference(model, cfg, device)
    try:
        with torch.inference_mode():
            written = run_predict(model, args.input, args.output, args.image_size or cfg.image_size, device,
                                  batch_size=args.batch_size, tta=args.tta,
                                  threshold=args.threshold if args.threshold is not None else cfg.threshold,
                                  autocast=precision.autocast, channels_last=channels_last,
                                  save_probs=args.save_probs, save_overlay=args.overlay, gt_dir=args.gt_dir,
                                  img_ch=cfg.img_ch, skip_existing=args.skip_existing)
    except PartialPrediction as exc:  # the readable images were written: say where, then name the others
        print(f"wrote {len(exc.written)} mask(s) to {args.output}")
        raise
    print(f"wrote {len(written)} mask(s) to {args.output}")


def _cmd_export(args) -> None:
    from .export import export_onnx

    model, cfg = _load_model(args)
    if args.output.endswith(".safetensors"):
        from .engine.checkpoint import save_weights_safetensors

        save_weights_safetensors(model, args.output, cfg.to_dict())
        print(f"wrote {args.output} (weights, and the run's settings as metadata: use it as --checkpoint "
              f"{args.output}; it holds no code and no optimizer state)")
        return
    report = export_onnx(model, args.output, image_size=args.image_size or cfg.image_size, img_ch=cfg.img_ch,
                         check=not args.no_check,
                         metadata={"model_type": cfg.model_type, "t": cfg.t, "base_channels": cfg.base_channels,
                                   "threshold": cfg.threshold})
    print(f"wrote {report['path']} (opset {report['opset']})")


def _cmd_plot(args) -> None:
    from .engine.inference import redraw_samples
    from .plots import redraw

    for path in redraw(args.run_dir):
        print(f"wrote {path}")
    if not args.curves_only and (path := redraw_samples(args.run_dir)) is not None:
        print(f"wrote {path}")


def _cmd_compare(args) -> None:
    from .plots import compare_runs

    path, runs = compare_runs(args.run_dirs, args.output)
    if args.json:
        print(json.dumps({"picture": str(path), "runs": runs}))
        return

    def score(s, key):
        return f"{s['test'][key]:.4f}" if s["test"] else "-"

    def interval(s, key):
        return "{:.3f}-{:.3f}".format(*s["test_spread"][key]["ci"]) if s.get("test_spread") else "-"

    width = max(len(s["label"]) for s in runs)
    print(f"{'run':<{width}}  epochs  best  valid JS  test JS  (95% CI)     test DC  test ACC   img/s")
    for s in runs:
        valid = f"{s['best_valid']['JS']:.4f}" if s["best_valid"] else "-"
        fps = f"{s['fps']:.1f}" if s["fps"] else "-"
        print(f"{s['label']:<{width}}  {s['epochs']:>6}  {s['best_epoch'] or '-':>4}  {valid:>8}  "
              f"{score(s, 'JS'):>7}  {interval(s, 'JS'):<11}  {score(s, 'DC'):>7}  {score(s, 'ACC'):>8}  {fps:>6}")
    print(f"wrote {path}")


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.output, num_images=args.num_images, num_epochs=args.num_epochs, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="r2unet",
        description="Train and run R2U-Net, U-Net, Attention U-Net and Attention R2U-Net for medical image "
                    "segmentation (ISIC 2018 Task 1 and any image/mask folders).",
        epilog="quick start: 'r2unet demo' (synthetic data, CPU, about a minute); "
               "'r2unet COMMAND --help' for each command's flags.")
    parser.add_argument("--version", action="version", version=f"r2unet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in the raw ISIC 2018 layout")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--num_images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_side", type=int, default=2400, help="longest side of the largest images")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="split raw images/masks into train/valid/test and build the cache")
    p.add_argument("--origin_data_path", default=REF_ORIGIN_DATA)
    p.add_argument("--origin_GT_path", default=REF_ORIGIN_GT)
    for split in ("train", "valid", "test"):
        p.add_argument(f"--{split}_path", default=f"./dataset/{split}/")
        p.add_argument(f"--{split}_GT_path", default=f"./dataset/{split}_GT/")
    p.add_argument("--train_ratio", type=float, default=0.7)
    p.add_argument("--valid_ratio", type=float, default=0.1)
    p.add_argument("--test_ratio", type=float, default=0.2)
    p.add_argument("--data_path", help="write DIR/train, DIR/train_GT, ... instead of the six folder flags")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (the split is deterministic for a seed)")
    p.add_argument("--overwrite", action="store_true", help="replace files a previous prepare wrote (only those)")
    p.add_argument("--skip_bad", action="store_true", help="list and skip bad files instead of stopping")
    p.add_argument("--link", choices=["copy", "hardlink", "symlink"], default="copy")
    p.add_argument("--image_size", type=int, default=224, help="training size the cache is built for")
    p.add_argument("--num_workers", type=int, default=None, help="processes decoding images (default: all cores)")
    p.add_argument("--no_cache", action="store_true", help="only split; the cache is built when training starts")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train a network (the reference's flags work as they are)",
                       argument_default=argparse.SUPPRESS)
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a split of a prepared dataset")
    _add_checkpoint_flag(p)
    p.add_argument("--data_path", required=True)
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    _add_model_override_flags(p)
    p.add_argument("--image_size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--batch_size", type=_positive_int, default=16)
    p.add_argument("--threshold", type=_probability, default=None, help="default: the checkpoint's (0.5)")
    p.add_argument("--device", default="auto")
    _add_inference_amp_flag(p)
    p.add_argument("--resolution", choices=["training", "original"], default="training",
                   help="training: score at the network's size, as training does (default); original: score each "
                        "image at its own resolution against its mask file, as the ISIC 2018 challenge did")
    p.add_argument("--tta", action="store_true", help="average the probabilities of flipped inputs (predict --tta)")
    p.add_argument("--per_image", metavar="CSV", help="also write every image's scores to CSV and name the worst")
    p.add_argument("--cache_dir", help="where the decode-once cache lives (default DATA_PATH/.r2unet_cache)")
    p.add_argument("--thresholds", metavar="LIST",
                   help="also score at these thresholds and name the best JS, e.g. 0.3:0.7:0.05 or 0.4,0.5,0.6 "
                        "(choose on --split valid)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="segment images: masks at the original resolution, overlays")
    _add_checkpoint_flag(p)
    p.add_argument("--input", required=True, help="an image or a folder of images")
    p.add_argument("--output", required=True, help="folder for <stem>_segmentation.png")
    _add_model_override_flags(p)
    p.add_argument("--image_size", type=int, default=None, help="network input size (default: the checkpoint's)")
    p.add_argument("--batch_size", type=_positive_int, default=8)
    p.add_argument("--threshold", type=_probability, default=None, help="default: the checkpoint's (0.5)")
    p.add_argument("--tta", action="store_true", help="average the probabilities of flipped inputs")
    _add_inference_amp_flag(p)
    p.add_argument("--save_probs", action="store_true", help="also write <stem>_prob.png (8-bit probabilities)")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg with the contour(s)")
    p.add_argument("--gt_dir", help="ground-truth masks: their contour is drawn on the overlay too")
    p.add_argument("--skip_existing", action="store_true",
                   help="leave out images whose outputs are already in --output (continue an interrupted run)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="ONNX export checked with onnxruntime, or weights as .safetensors")
    _add_checkpoint_flag(p)
    p.add_argument("--output", required=True, help="model.onnx, or model.safetensors for the weights alone")
    _add_model_override_flags(p)
    p.add_argument("--image_size", type=int, default=None, help="example size (the exported model is dynamic)")
    p.add_argument("--no_check", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("plot", help="redraw curves.png (from metrics.jsonl) and samples.png (from best.pt)")
    p.add_argument("run_dir")
    p.add_argument("--curves_only", action="store_true", help="do not redraw the sample grid")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("compare", help="several runs side by side: curves and test scores in one picture and a table")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", default="compare.png", help="the picture")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="synthetic data -> prepare -> train a small R2U-Net on the CPU -> test scores")
    p.add_argument("--output", default="runs/demo", help="folder for the synthetic data and the run")
    p.add_argument("--num_images", type=_positive_int, default=160, help="synthetic image/mask pairs")
    p.add_argument("--num_epochs", type=_positive_int, default=None, help="default: 20")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks: 'data' (loader + augmentation) or 'train' (training step)")
    p.add_argument("what", choices=["data", "train"])
    p.add_argument("--data_path", help="prepared dataset (data: required; train: default a synthetic one)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model_type", default="R2U_Net", choices=list_models())
    p.add_argument("--t", type=int, default=2)
    p.add_argument("--base_channels", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    p.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode of the '+ torch.compile' row and the default step (default: "
                        "'default')")
    p.add_argument("--configs", default="all", help="train: 'all' or a comma list of fp32, cudnn_benchmark, bf16, "
                   "channels_last, fused, compile, cudagraphs, default (the baseline always runs)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)
    for command in sub.choices.values():
        _show_defaults(command)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """'(default: X)' after every flag whose help does not already say its default (train's flags default to
    None here and state the config's defaults themselves)."""
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            continue
        if action.help is argparse.SUPPRESS or "default" in (action.help or ""):
            continue
        action.help = f"{action.help} (default: {default})" if action.help else f"default: {default}"


def _add_checkpoint_flag(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="r2unet checkpoint, a run folder (its best.pt), .safetensors, or the reference's .pkl")


def _add_inference_amp_flag(p) -> None:
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=None,
                   help="precision of the forward pass; default: the checkpoint's training setting (auto for a "
                        "reference checkpoint), so scores match the run's; auto: bf16 on GPUs and on CPUs with "
                        "native bf16 (AMX / AVX512-BF16), float32 on other CPUs (and channels_last where training "
                        "uses it); off: float32")


def _add_model_override_flags(p) -> None:
    p.add_argument("--model_type", choices=list_models(), default=None,
                   help="overrides the checkpoint's (a bare state_dict's is read from its weights)")
    p.add_argument("--t", type=int, default=None, help="recurrence steps: a bare state_dict's weights do not "
                   "record them (default 3, the reference's); overrides the checkpoint's")
    p.add_argument("--base_channels", type=int, default=None, help="overrides the checkpoint's (a bare "
                   "state_dict's is read from its weights)")


def _add_train_flags(p) -> None:
    g = p.add_argument_group("the reference's flags")
    g.add_argument("--model_type", choices=list_models(), help="default R2U_Net")
    g.add_argument("--t", type=int, help="recurrence steps (default 3)")
    g.add_argument("--image_size", type=int, help="square training size, multiple of 16 (default 224)")
    g.add_argument("--img_ch", type=int, help="input channels: 3 (RGB) or 1 (grayscale)")
    g.add_argument("--output_ch", type=int)
    g.add_argument("--num_epochs", type=int, help="default 100")
    g.add_argument("--num_epochs_decay", type=int, help="epochs of linear LR decay at the end (default 70)")
    g.add_argument("--batch_size", type=int, help="per process (default 16)")
    g.add_argument("--num_workers", type=int, help="data loader processes (default 2)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    g.add_argument("--beta1", type=float, help="default 0.5")
    g.add_argument("--beta2", type=float, help="default 0.999")
    g.add_argument("--augmentation_prob", type=float, help="default 0.4")
    g.add_argument("--data_path", help="prepared dataset: train/ train_GT/ valid/ valid_GT/ test/ test_GT/")
    g.add_argument("--seed", type=int, help="default 12345")
    g.add_argument("--apex", type=int, choices=[0, 1],
                   help="1: mixed precision (fp16 with O1/O2 on GPUs; on CPUs bf16 where native, else float32)")
    g.add_argument("--apex-opt-level", "--apex_opt_level", dest="apex_opt_level", choices=["O0", "O1", "O2"])
    g.add_argument("--loss_scale_value", help="initial fp16 loss scale, a number or 'dynamic'")
    g.add_argument("--npu_idx", type=int, help="device index (alias of cuda:N)")
    g.add_argument("--world-size", "--world_size", dest="world_size", type=int,
                   help="number of processes; launch them with torchrun")
    g = p.add_argument_group("r2unet")
    g.add_argument("--device", help="auto | cuda | cpu | cuda:N (default auto)")
    g.add_argument("--amp", choices=["auto", "off", "fp16", "bf16"],
                   help="mixed precision (default auto: bf16 on GPUs and on CPUs with native bf16, AMX / "
                        "AVX512-BF16; float32 on other CPUs, where bf16 is emulated and slow)")
    g.add_argument("--base_channels", type=int, help="width of the first stage (default 64)")
    g.add_argument("--output_dir", help="run folder (default runs/r2unet)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt")
    g.add_argument("--config", help="YAML/TOML/JSON file of settings; command-line flags override it")
    g.add_argument("--loss", choices=["bce", "dice_bce"])
    g.add_argument("--global_batch_size", type=int, help="alternative to --batch_size: divided among processes")
    g.add_argument("--scale_lr", action="store_true", help="linear scaling rule: multiply --lr by the global "
                   "batch / --lr_batch_size, i.e. by the number of processes by default (the 8p recipe: 8 x 2e-4 = "
                   "0.0016)")
    g.add_argument("--lr_batch_size", type=int, help="with --scale_lr: the batch size --lr was tuned for (default: "
                   "--batch_size); e.g. --batch_size 64 --lr_batch_size 16 --scale_lr trains one GPU at 4 x --lr")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes")
    g.add_argument("--dist_timeout_s", type=float, help="seconds before a collective waiting on a dead process "
                   "fails (default 600)")
    g.add_argument("--compile", choices=["auto", "on", "off"], help="torch.compile (auto: on for CUDA)")
    g.add_argument("--compile_mode", choices=COMPILE_MODES, help="torch.compile mode (default 'default'; "
                   "reduce-overhead adds CUDA graphs)")
    g.add_argument("--channels_last", choices=["auto", "on", "off"], help="auto: on for CUDA")
    g.add_argument("--deterministic", action="store_true", help="bit-identical CPU runs (see README for GPUs)")
    g.add_argument("--detect_anomaly", action="store_true", help="autograd anomaly detection (slow; debugging)")
    g.add_argument("--max_nonfinite_steps", type=int, help="consecutive NaN/Inf losses before stopping (20)")
    g.add_argument("--max_steps_per_epoch", type=int, help="cap steps per epoch (performance runs)")
    g.add_argument("--warmup_steps", type=int, help="steps per epoch left out of the FPS (default 5)")
    g.add_argument("--eval_every", type=int, help="epochs between validations (default 1)")
    g.add_argument("--sample_every", type=int, help="epochs between sample grids (default 5)")
    g.add_argument("--save_every_steps", type=int, help="also write last.pt every N steps (default: epoch ends)")
    g.add_argument("--log_every", type=int, help="steps between host syncs for logging/NaN checks (default 10)")
    g.add_argument("--cache_dir", help="where the decode-once cache lives (default DATA_PATH/.r2unet_cache)")
    g.add_argument("--skip_bad", action="store_true", help="list and skip bad files instead of stopping")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT_DIR/tensorboard")
    g.add_argument("--threshold", type=float, help="probability threshold of the metrics (default 0.5)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UserError, DataError, ValueError, FileNotFoundError, CheckpointError, TrainingError,
            ExportError) as exc:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        where = f" [rank {rank}]" if rank is not None else ""
        print(f"r2unet {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143): whatever was running has saved its state
        terminated = type(exc).__name__ == "Terminated"
        print(f"r2unet {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
