"""Command-line interface: each command's flags, and a call into the library that prints (train's flags: config)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from PIL import Image

from .. import __version__, defaults
from ..data.imageio import MAX_PIXELS_ENV, DataError, set_max_pixels
from ..data.pairs import SPLITS
from ..data.targets import targets_for
from ..engine.config import COMPILE_MODES, ConfigError, TrainConfig, load_class_colors
from ..errors import CheckpointError, ExportError, Terminated, TrainingError, for_user
from ..models import list_models
from .args import (
    add_checkpoint_flags,
    add_train_flags,
    parse_command_line,
    positive_float,
    positive_int,
    show_defaults,
)


# ------------------------------------------------------------------------------------------------------- commands
def _max_pixels_flag(p) -> None:
    p.add_argument("--max_pixels", type=positive_int, default=None,
                   help="largest image decoded, width x height (default: R2UNET_MAX_PIXELS, else Pillow's 89478485); "
                        "larger ones are refused from their header")


def _synth(p) -> None:
    """write a synthetic dataset in the raw ISIC 2018 layout"""
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--num_images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_side", type=int, default=2400, help="longest side of the largest images")
    p.add_argument("--overwrite", action="store_true", help="replace files of the same names (ISIC's) in --output")
    p.add_argument("--num_classes", type=int, choices=[1, 3], default=1, help="3: label maps of lesion and core")
    p.add_argument("--hard", action="store_true", help="add what real photos carry: dense hair, ruler marks, dark "
                   "corners, satellite blobs that are not lesion, pale areas inside the lesion that are")


def _cmd_synth(args) -> None:
    from ..data.synth import generate_dataset

    out = generate_dataset(args.output, num_images=args.num_images, seed=args.seed, max_side=args.max_side,
                           progress=sys.stderr.isatty(), overwrite=args.overwrite, num_classes=args.num_classes,
                           hard=args.hard)
    print(f"wrote {args.num_images} image/mask pairs under {out}")


def _prepare(p) -> None:
    """split raw images/masks into train/valid/test and build the cache"""
    for flag, folder in (("data", "Task1-2_Training_Input"), ("GT", "Task1_Training_GroundTruth")):  # the seed's
        p.add_argument(f"--origin_{flag}_path", default=f"../ISIC/dataset/ISIC2018_{folder}")
    for split, ratio in zip(SPLITS, (0.7, 0.1, 0.2)):
        p.add_argument(f"--{split}_path", default=f"./dataset/{split}/")
        p.add_argument(f"--{split}_GT_path", default=f"./dataset/{split}_GT/")
        p.add_argument(f"--{split}_ratio", type=float, default=ratio)
    p.add_argument("--data_path", help="write DIR/train, DIR/train_GT, ... instead of the six folder flags")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (the split is deterministic for a seed)")
    p.add_argument("--overwrite", action="store_true", help="replace files a previous prepare wrote (only those); "
                   "every image keeps its split, images new to the source are assigned")
    p.add_argument("--resplit", action="store_true", help="with --overwrite: shuffle every image anew (moves images "
                   "a model may have trained on into other splits)")
    p.add_argument("--skip_bad", action="store_true", help="list and skip bad files instead of stopping")
    p.add_argument("--link", choices=["copy", "hardlink", "symlink"], default="copy")
    p.add_argument("--image_size", type=int, default=defaults.IMAGE_SIZE, help="training size the cache is built for")
    p.add_argument("--num_workers", type=int, default=None, help="processes decoding images (default: all cores)")
    p.add_argument("--no_cache", action="store_true", help="only split; the cache is built when training starts")
    p.add_argument("--mask_suffix", help="masks are named <image stem>SUFFIX.<ext> (default: found, see README)")
    p.add_argument("--recursive", action="store_true", help="one folder per case: pair the files in subfolders")
    p.add_argument("--num_classes", type=int, default=1, help="K >= 2: label maps; the cache keeps K classes")
    p.add_argument("--class_colors", help="JSON/YAML list of [r, g, b] per class, for label maps in RGB")
    _max_pixels_flag(p)


def _cmd_prepare(args) -> None:
    from ..data.prepare import prepare_split

    targets = None if args.data_path else {
        s: (getattr(args, f"{s}_path"), getattr(args, f"{s}_GT_path")) for s in SPLITS}
    prepare_split(args.origin_data_path, args.origin_GT_path, data_path=args.data_path, targets=targets,
                  train_ratio=args.train_ratio, valid_ratio=args.valid_ratio, test_ratio=args.test_ratio,
                  seed=args.seed, overwrite=args.overwrite, skip_bad=args.skip_bad, link=args.link,
                  progress=sys.stderr.isatty(), cache_size=None if args.no_cache else args.image_size,
                  cache_workers=args.num_workers, mask_suffix=args.mask_suffix, recursive=args.recursive,
                  masks=targets_for(args.num_classes, load_class_colors(args.class_colors, args.num_classes)),
                  resplit=args.resplit)


def _train(p) -> None:
    """train a network (the reference's flags work as they are)"""
    add_train_flags(p)


def _train_config(args) -> TrainConfig:
    """The run's settings from the flags given (precedence and the reference's flags: ``train_settings``)."""
    from ..engine.settings import train_settings  # torch: not for --help

    return train_settings({k: v for k, v in vars(args).items() if k not in ("func", "command", "parser")})


def _cmd_train(args) -> None:
    from ..engine.trainer import fit

    fit(_train_config(args))  # Ctrl-C / SIGTERM: fit saves last.pt and says so; main() exits with 130


def _crossval(p) -> None:
    """k-fold cross-validation over train+valid, then the folds' ensemble scored on the test split"""
    p.add_argument("--folds", type=positive_int, default=5, help="folds (default: 5)")
    p.add_argument("--fold", type=int, default=None, help="train this fold alone (0-based; e.g. one per GPU side "
                   "by side); a call without it trains the folds left and scores the ensemble")
    p.add_argument("--single", metavar="RUN", help="a run of 'train' on the same data, shown beside the folds")
    add_train_flags(p)


def _cmd_crossval(args) -> None:
    from ..engine.crossval import CrossValidation

    folds, only, single = args.folds, args.fold, args.single
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "parser", "folds", "fold", "single",
                                                              "resume")}
    given.setdefault("output_dir", "runs/crossval")
    from ..engine.settings import train_settings

    CrossValidation(train_settings(given), folds).run(only, single)


def _overrides(args) -> dict:
    return {"model_type": args.model_type, "t": args.t, "base_channels": args.base_channels}


def _evaluate(p) -> None:
    """metrics of a checkpoint on a split of a prepared dataset"""
    add_checkpoint_flags(p, batch_size=16)
    p.add_argument("--data_path", required=True)
    p.add_argument("--split", choices=list(SPLITS), default="test")
    p.add_argument("--resolution", choices=["training", "original"], default="training",
                   help="training: score at the network's size, as training does (default); original: score each "
                        "image at its own resolution against its mask file, as the ISIC 2018 challenge did")
    p.add_argument("--per_image", metavar="CSV", help="also write every image's scores to CSV and name the worst")
    p.add_argument("--cache_dir", help="where the decode-once cache lives (default DATA_PATH/.r2unet_cache)")
    p.add_argument("--thresholds", metavar="LIST",
                   help="also score at these thresholds and name the best JS, e.g. 0.3:0.7:0.05 or 0.4,0.5,0.6 "
                        "(choose on --split valid)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _max_pixels_flag(p)


def _cmd_evaluate(args) -> None:
    from ..engine.evaluation import evaluate_checkpoint, evaluation_report
    from ..engine.metrics import parse_thresholds

    metrics = evaluate_checkpoint(args.checkpoint, args.data_path, split=args.split, batch_size=args.batch_size,
                                  device=args.device, threshold=args.threshold, image_size=args.image_size,
                                  amp=args.amp, **_overrides(args), per_image_csv=args.per_image,
                                  resolution=args.resolution, tta=args.tta, cache_dir=args.cache_dir,
                                  thresholds=parse_thresholds(args.thresholds) if args.thresholds else None,
                                  postprocess=args.postprocess, runtime=args.runtime,
                                  log=(lambda *_: None) if args.json else print)
    print(json.dumps(metrics) if args.json else evaluation_report(metrics, args.split, args.resolution, args.tta))


def _postprocess(p) -> None:
    """choose a run's postprocessing on its validation split; then its test scores with and without"""
    p.add_argument("--run", required=True, help="a run folder of 'r2unet train'")
    p.add_argument("--data_path", default=None, help="its prepared dataset (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache_dir", help="where the decode-once cache lives (default DATA_PATH/.r2unet_cache)")


def _cmd_postprocess(args) -> None:
    from ..engine.evaluation import choose_postprocessing, evaluate_checkpoint, evaluation_report, postprocessing_report

    post, data = choose_postprocessing(args.run, args.data_path, device=args.device, cache_dir=args.cache_dir)
    print(postprocessing_report(post))
    if post.active:
        metrics = evaluate_checkpoint(args.run, data, split="test", device=args.device, cache_dir=args.cache_dir)
        print(evaluation_report(metrics, "test", "training", False))


def _predict(p) -> None:
    """segment images: masks at the original resolution, overlays"""
    add_checkpoint_flags(p, batch_size=0)  # the device's
    p.add_argument("--input", required=True, help="an image or a folder of images")
    p.add_argument("--output", required=True, help="folder for <stem>_segmentation.png")
    p.add_argument("--save_probs", action="store_true", help="also write <stem>_prob.png (8-bit probabilities)")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg with the contour(s)")
    p.add_argument("--gt_dir", help="ground-truth masks: each image with one is scored (JS, DC ... printed, and "
                                    "scores.csv), and its contour is drawn on the binary overlay")
    p.add_argument("--skip_existing", action="store_true",
                   help="leave out images whose outputs are already in --output (continue an interrupted run)")
    _max_pixels_flag(p)


def _cmd_predict(args) -> None:
    from .predict import PartialPrediction, predict_checkpoint

    try:
        written = predict_checkpoint(args.checkpoint, args.input, args.output, model_overrides=_overrides(args),
                                     device=args.device, amp=args.amp, image_size=args.image_size,
                                     threshold=args.threshold, batch_size=args.batch_size, tta=args.tta,
                                     save_probs=args.save_probs, save_overlay=args.overlay, gt_dir=args.gt_dir,
                                     skip_existing=args.skip_existing, postprocess=args.postprocess,
                                     runtime=args.runtime)
    except PartialPrediction as exc:  # the readable images were written: say where, then name the others
        print(f"wrote {len(exc.written)} mask(s) to {args.output}")
        raise
    print(f"wrote {len(written)} mask(s) to {args.output}")


def _export(p) -> None:
    """ONNX export checked with onnxruntime, or weights as .safetensors"""
    add_checkpoint_flags(p)
    p.add_argument("--output", help="model.onnx, or model.safetensors for the weights alone (required, except "
                                    "with --int8: the run's model.int8.onnx)")
    p.add_argument("--no_check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights and activations (onnxruntime): calibrated on the run's training images, its "
                        "masks checked against float32's on its validation images; kept in the run folder, it runs "
                        "in the checkpoint's place on a CPU (a folder of runs: each run's)")
    p.add_argument("--calibration", help="with --int8: a folder of images like those you will segment, to "
                                         "calibrate on and check against (alternate images), instead of the run's")


def _cmd_export(args) -> None:
    from ..engine.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.output, model_overrides=_overrides(args),
                            image_size=args.image_size, check=not args.no_check, quantize=args.int8,
                            calibration=args.calibration))


def _plot(p) -> None:
    """redraw curves.png (from metrics.jsonl) and samples.png (from best.pt)"""
    p.add_argument("run_dir")
    p.add_argument("--curves_only", action="store_true", help="do not redraw the sample grid")


def _cmd_plot(args) -> None:
    from ..engine.evaluation import redraw_samples
    from ..engine.plots import redraw

    paths = [*redraw(args.run_dir), *([] if args.curves_only else [redraw_samples(args.run_dir)])]
    print("\n".join(f"wrote {path}" for path in paths if path is not None))


def _compare(p) -> None:
    """several runs side by side: curves and test scores in one picture and a table"""
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", default="compare.png", help="the picture")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _cmd_compare(args) -> None:
    from ..engine.plots import compare_runs, comparison_table

    path, runs = compare_runs(args.run_dirs, args.output)
    print(json.dumps({"picture": str(path), "runs": runs}) if args.json else f"{comparison_table(runs)}\nwrote {path}")


def _demo(p) -> None:
    """synthetic data -> prepare -> train a small R2U-Net on the CPU -> test scores"""
    p.add_argument("--output", default="runs/demo", help="folder for the synthetic data and the run")
    p.add_argument("--num_images", type=positive_int, default=160, help="synthetic image/mask pairs")
    p.add_argument("--num_epochs", type=positive_int, default=None, help="default: 20")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hard", action="store_true", help="the harder synthetic set (synth --hard): hair, rulers, dark "
                   "corners, satellite blobs; postprocessing has something to fix")


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.output, num_images=args.num_images, num_epochs=args.num_epochs, seed=args.seed, hard=args.hard)


def _serve(p) -> None:
    """a web page and an HTTP API that segment uploaded images (needs the serve extra)"""
    add_checkpoint_flags(p, batch_size=0)  # the device's
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_mb", type=positive_float, default=50, help="largest image file accepted, in MiB")
    p.add_argument("--max_request_mb", type=positive_float, default=None,
                   help="largest request body (a batch of files), in MiB (default: twice --max_mb)")
    p.add_argument("--max_files", type=positive_int, default=16, help="most files in one /predict/batch request")
    p.add_argument("--batch_wait_ms", type=float, default=5, help="requests that arrive within this many ms of each "
                   "other run as one batch (of at most --batch_size images)")
    p.add_argument("--allowed_hosts", metavar="NAMES", help="comma list of further host names clients use to reach "
                   "this server (a proxy's, a LAN name); '*': any (default: this machine's names)")
    p.add_argument("--allowed_origins", metavar="ORIGINS", help="comma list of origins (https://example.org) whose "
                   "pages may POST to this server and read the answers (default: only its own page)")
    _max_pixels_flag(p)


def _cmd_serve(args) -> None:
    # Before torch loads OpenMP: its threads sleep between requests instead of spinning on the cores the HTTP
    # threads need (one small image: p50 337 -> 299 ms on a 2-core CPU; benchmarks/README.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .serve import serve

    serve(args.checkpoint, args.host, args.port, args.device, args.tta, args.max_mb, model_overrides=_overrides(args),
          amp=args.amp, image_size=args.image_size, threshold=args.threshold, max_request_mb=args.max_request_mb,
          max_files=args.max_files, allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
          max_batch=args.batch_size, batch_wait_ms=args.batch_wait_ms, postprocess=args.postprocess,
          runtime=args.runtime)


def _bench(p) -> None:
    """benchmarks: 'data' (loader + augmentation), 'train' (training step) or 'predict' (photos to mask files)"""
    p.add_argument("what", choices=["data", "train", "predict"])
    p.add_argument("--data_path", help="prepared dataset (data: required; train: default a synthetic one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model_type", default=defaults.MODEL_TYPE, choices=list_models())
    for name, default in (("image_size", defaults.IMAGE_SIZE), ("batch_size", defaults.BATCH_SIZE),
                          ("t", defaults.T), ("base_channels", defaults.BASE_CHANNELS),
                          ("steps", 20), ("warmup", 5), ("num_workers", 0)):
        p.add_argument(f"--{name}", type=int, default=default, help={"steps": "timed steps per configuration",
                                                                        "warmup": "untimed steps first"}.get(name))
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="train: the compiled rows (auto: on CUDA) and, when on or off, the default row's setting "
                        "(auto: train's default, off)")
    p.add_argument("--compile_mode", choices=COMPILE_MODES, default="default", help="of the compiled rows")
    p.add_argument("--configs", default="all", help="train: 'all' or a comma list of fp32, cudnn_benchmark, bf16, "
                   "channels_last, fused, compile, cudagraphs, default (the baseline always runs); predict: 'all' or "
                   "a comma list of batch1, channels_last, bf16, compile, onnxruntime, onnxruntime_int8, default (the "
                   "naive loop and fp32 always run)")
    p.add_argument("--checkpoint", help="predict: the model (default: a fresh network of --model_type, --t 2)")
    p.add_argument("--input", help="predict: a folder of photos (default: synthetic photos of dermoscopy sizes)")
    p.add_argument("--num_images", type=positive_int, default=12, help="predict: synthetic photos")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_bench(args) -> None:
    from . import bench

    # --json: stdout stays one JSON object; progress goes to stderr, which keeps what finished if cut short
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    if args.what == "train":
        result = bench.bench_train(args.model_type, batch_size=args.batch_size, image_size=args.image_size, t=args.t,
                                   base_channels=args.base_channels, device=args.device, steps=args.steps,
                                   warmup=args.warmup, compile_model=args.compile, compile_mode=args.compile_mode,
                                   configs=args.configs, data_path=args.data_path, log=log)
        print(json.dumps(result) if args.json else bench.train_report(result))
        return
    if args.what == "predict":
        from .bench_predict import bench_predict, predict_report

        t = args.t if "--t" in sys.argv else 2  # the R2U-Net paper's t, as the measurements in benchmarks/ use
        result = bench_predict(args.checkpoint, args.input, args.device, args.num_images, args.model_type, t,
                               args.base_channels, args.image_size, args.configs, log=log)
        print(json.dumps(result) if args.json else predict_report(result))
        return
    if not args.data_path:
        raise ConfigError("bench data needs --data_path (a prepared dataset)")
    result = bench.bench_data(args.data_path, image_size=args.image_size, batch_size=args.batch_size,
                              device=args.device, num_workers=args.num_workers, log=log)
    print(json.dumps(result) if args.json else bench.data_report(result))


# each command: (its flags, what it runs); the flags function's docstring is the command's help
COMMANDS = {"synth": (_synth, _cmd_synth), "prepare": (_prepare, _cmd_prepare), "train": (_train, _cmd_train),
            "crossval": (_crossval, _cmd_crossval), "evaluate": (_evaluate, _cmd_evaluate),
            "postprocess": (_postprocess, _cmd_postprocess),
            "predict": (_predict, _cmd_predict),
            "export": (_export, _cmd_export), "plot": (_plot, _cmd_plot), "compare": (_compare, _cmd_compare),
            "demo": (_demo, _cmd_demo), "serve": (_serve, _cmd_serve), "bench": (_bench, _cmd_bench)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2unet",
        description="Train and run R2U-Net, U-Net, Attention U-Net and Attention R2U-Net for medical image "
                    "segmentation (ISIC 2018 Task 1 and any image/mask folders).",
        epilog="quick start: 'r2unet demo' (synthetic data, CPU, about a minute); "
               "'r2unet COMMAND --help' for each command's flags.")
    parser.add_argument("--version", action="version", version=f"r2unet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_flags, run) in COMMANDS.items():
        train = name == "train"  # its 60 flags: a usage line, not a page
        p = sub.add_parser(name, help=add_flags.__doc__, argument_default=argparse.SUPPRESS if train else None,
                           usage="%(prog)s [-h] --data_path DIR [--output_dir DIR] [FLAGS]" if train else None)
        add_flags(p)
        p.set_defaults(func=run, parser=p)
        show_defaults(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a pipe or a file (tee, a batch job's log) gets each line as it is said
        if isinstance(stream, io.TextIOWrapper) and not stream.line_buffering:
            stream.reconfigure(line_buffering=True)
    limit_before, pillow_before = os.environ.get(MAX_PIXELS_ENV), Image.MAX_IMAGE_PIXELS
    try:
        set_max_pixels(getattr(args, "max_pixels", None))
        args.func(args)
    except (DataError, ValueError, OSError, CheckpointError, TrainingError, ExportError) as exc:
        where = f" [rank {os.environ.get('RANK')}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"r2unet {args.command}{where}: error: {for_user(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143): whatever was running has saved its state
        terminated = isinstance(exc, Terminated)
        print(f"r2unet {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:  # the limit was this command's (main may be called again in one process)
        if limit_before is None:
            os.environ.pop(MAX_PIXELS_ENV, None)
        else:
            os.environ[MAX_PIXELS_ENV] = limit_before
        Image.MAX_IMAGE_PIXELS = pillow_before
    return 0


if __name__ == "__main__":
    sys.exit(main())
