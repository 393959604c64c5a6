"""Command-line interface: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys

from .data.io import DataError

REF_ORIGIN_DATA = "../ISIC/dataset/ISIC2018_Task1-2_Training_Input"
REF_ORIGIN_GT = "../ISIC/dataset/ISIC2018_Task1_Training_GroundTruth"


class UserError(Exception):
    """An error whose message is for the user; printed without a traceback."""


def _cmd_synth(args) -> None:
    from .data.synth import generate_dataset

    out = generate_dataset(args.output, num_images=args.num_images, seed=args.seed, max_side=args.max_side,
                           progress=True)
    print(f"wrote {args.num_images} image/mask pairs under {out}")


def _cmd_prepare(args) -> None:
    from .data.dataset import split_cache
    from .data.prepare import SPLITS, prepare_split

    kwargs = dict(train_ratio=args.train_ratio, valid_ratio=args.valid_ratio, test_ratio=args.test_ratio,
                  seed=args.seed, overwrite=args.overwrite, skip_bad=args.skip_bad, link=args.link)
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


def _cmd_bench(args) -> None:
    from . import bench

    if args.what == "data":
        result = bench.bench_data(args.data_path, image_size=args.image_size, batch_size=args.batch_size,
                                  device=args.device, num_workers=args.num_workers,
                                  log=(lambda *_: None) if args.json else print)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"data pipeline on {result['device']}: {result['img_per_s']:.0f} img/s "
                  f"(batch {args.batch_size}, {args.image_size}x{args.image_size}); cache build "
                  f"{result['cache_build_s']:.2f} s for {result['cached_images']} images")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="r2unet", description=__doc__.splitlines()[0] if __doc__ else None)
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

    p = sub.add_parser("bench", help="benchmarks: 'data' (loader + augmentation) or 'train' (training step)")
    p.add_argument("what", choices=["data"])
    p.add_argument("--data_path", help="prepared dataset (output of prepare)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UserError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"r2unet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"r2unet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
