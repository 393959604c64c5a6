"""``r2unet bench predict``: how fast whole photos become mask files, by each path this package has, against a
reference-style loop, measured in one run.

Rows: ``naive`` (the loop a research repository writes: PIL decode, resize to the network size, one float32 forward
per image, the mask resized back with PIL and saved), ``fp32`` (``predict``'s path in float32, NCHW: JPEG draft
decoding, the device's batch (1 on a CPU, 8 on a GPU), decoding and writing on threads), each option on its own on
top of it (``batch``: the other batch size, channels_last, bf16, torch.compile, onnxruntime: ``r2unet export``'s
file, onnxruntime int8: ``export --int8``'s), and ``default`` (what ``predict`` runs here: for the bench's own
network, after those exports, which it may run in the checkpoint's place). Each row's img/s, its
ratio to the naive loop, its fraction of this device's FLOP bound, and how its masks agree with the float32 ones
(equal pixels, and the JS between the masks).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from .. import defaults
from ..engine import int8, runtime
from ..engine.checkpoint import save_checkpoint
from ..engine.config import TrainConfig
from ..engine.export import export_checkpoint
from ..engine.inference import Segmenter
from ..engine.onnx import OnnxModel
from ..engine.runtime import describe_device, resolve_device, synchronize
from ..errors import first_line
from ..models import create_model
from .predict import run_predict

ROWS = ("naive", "fp32", "batch", "channels_last", "bf16", "compile", "onnxruntime", "onnxruntime_int8", "default")
# photo sizes as dermoscopy datasets hold them (ISIC 2018: 576x768 up to 4288x2848)
PHOTO_SIZES = ((1024, 768), (1504, 1129), (2048, 1536), (3008, 2000), (4288, 2848), (1022, 767))


def synthetic_photos(folder: Path, num_images: int, seed: int = 0) -> list[Path]:
    """``num_images`` JPEG photos of the sizes dermoscopy datasets hold, with a lesion-like blob."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        yy, xx = np.mgrid[:h, :w]
        blob = ((yy - h / 2) ** 2 / (h / 4) ** 2 + (xx - w / 2) ** 2 / (w / 4) ** 2) < 1
        img = np.full((h, w, 3), (210, 170, 150), np.uint8)
        img[blob] = (120, 80, 60)
        img = np.clip(img.astype(np.int16) + g.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"photo{i:02d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def naive_loop(model: torch.nn.Module, paths: list[Path], output: Path, image_size: int) -> None:
    """The reference-style loop, on purpose as a research repository writes it."""
    model.eval()
    device = next(model.parameters()).device
    for path in paths:
        img = Image.open(path).convert("RGB")
        x = torch.from_numpy(np.asarray(img.resize((image_size, image_size), Image.BILINEAR), np.float32) / 255)
        x = ((x - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0).to(device)
        with torch.no_grad():
            prob = torch.sigmoid(model(x))[0, 0].cpu().numpy()
        mask = Image.fromarray((prob * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
        Image.fromarray(((np.asarray(mask) > 127) * 255).astype(np.uint8)).save(output / f"{path.stem}.png")


def _masks(folder: Path, suffix: str) -> dict[str, np.ndarray]:
    return {p.name[: -len(suffix)]: np.asarray(Image.open(p)) > 0 for p in sorted(folder.glob(f"*{suffix}"))}


def _agreement(masks: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, float]:
    """(share of equal pixels, mean JS between the masks) over the images both have."""
    equal = total = 0
    js = []
    for name, ref in reference.items():
        got = masks.get(name)
        if got is None or got.shape != ref.shape:
            continue
        equal += int((got == ref).sum())
        total += ref.size
        union = int((got | ref).sum())
        js.append(1.0 if union == 0 else int((got & ref).sum()) / union)
    return (equal / total if total else float("nan")), (float(np.mean(js)) if js else float("nan"))


def bench_predict(checkpoint: str | Path | None = None, input_path: str | Path | None = None, device: str = "auto",
                  num_images: int = 12, model_type: str = defaults.MODEL_TYPE, t: int = 2,
                  base_channels: int = defaults.BASE_CHANNELS, image_size: int = defaults.IMAGE_SIZE,
                  configs: str = "all", log=print) -> dict:
    """Each row of the module docstring on the same photos (``input_path``, else ``num_images`` synthetic photos of
    dermoscopy sizes) and model (``checkpoint``, else a fresh network of ``model_type``), each run once after a
    warm-up on two photos; the rows asked for in ``configs`` ('all' or a comma list of ``ROWS``)."""
    dev = resolve_device(device)
    keys = list(ROWS) if configs == "all" else [k.strip() for k in configs.split(",")]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise ValueError(f"--configs: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    keys = ["naive", "fp32"] + [k for k in keys if k not in ("naive", "fp32")]
    with tempfile.TemporaryDirectory(prefix="r2unet-bench-predict-") as tmp:
        tmp = Path(tmp)
        if checkpoint is None:
            torch.manual_seed(0)
            model = create_model(model_type, t=t, base_channels=base_channels)
            with torch.no_grad():  # BatchNorm statistics of a trained network's scale: outputs that vary
                model.train()
                for _ in range(2):
                    model(torch.randn(2, 3, 64, 64))
            checkpoint = tmp / "model.pt"
            save_checkpoint(checkpoint, model=model, config=TrainConfig(
                model_type=model_type, t=t, base_channels=base_channels, image_size=image_size).to_dict(), epoch=0)
        paths = sorted(Path(input_path).iterdir()) if input_path else synthetic_photos(tmp / "photos", num_images)
        fp32 = Segmenter(checkpoint, device=str(dev), amp="off", runtime="torch", log=lambda *_: None)
        _memory_format(fp32, False)
        size = fp32.image_size
        megapixels = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in paths) / len(paths) / 1e6
        log(f"bench predict: {fp32.cfg.model_type} at {size} px on {describe_device(dev)}, {len(paths)} photos "
            f"(mean {megapixels:.1f} MP), rows: {', '.join(keys)}")
        rows, masks = [], {}
        for key in keys:
            out = tmp / key
            out.mkdir()
            try:
                seconds = _run_row(key, checkpoint, fp32, paths, out, dev, size, tmp)
                row = {"config": key, "img_per_s": len(paths) / seconds, "seconds": seconds}
                masks[key] = _masks(out, ".png" if key == "naive" else "_segmentation.png")
            except Exception as exc:  # noqa: BLE001 - one path failing (a compiler, a quantiser) is a result
                if key in ("naive", "fp32"):
                    raise
                row = {"config": key, "img_per_s": None, "error": f"{type(exc).__name__}: {first_line(exc, 200)}"}
            rows.append(row)
            log(f"  {key:<18}" + (f"{row['img_per_s']:8.2f} img/s" if row["img_per_s"]
                                  else f"  failed: {row['error']}"))
        flops = _forward_flops(fp32, size)
        peaks = {"fp32": runtime.peak_tflops(dev, dtype=torch.float32)[0]}
        if dev.type == "cuda" or runtime.cpu_info().native_bf16:
            peaks["bf16"] = runtime.peak_tflops(dev, dtype=torch.bfloat16)[0]
        default = _runs(Segmenter(checkpoint, device=str(dev), log=lambda *_: None).members[0])
        naive = rows[0]["img_per_s"]
        for row in rows:
            ok = row["img_per_s"] is not None
            row["precision"] = {"bf16": "bf16", "onnxruntime_int8": "int8"}.get(row["config"], "fp32")
            if row["config"] == "default":
                row["precision"], row["runs"] = default
            row["x_naive"] = row["img_per_s"] / naive if ok else None
            peak = peaks.get(row["precision"], peaks["fp32"])
            row["frac_flop_bound"] = row["img_per_s"] * flops / (peak * 1e12) if ok else None
            equal, js = _agreement(masks[row["config"]], masks["fp32"]) if ok else (None, None)
            row["pixels_equal"], row["mask_js"] = equal, js
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu: {runtime.cpu_info().label}",
            "threads": torch.get_num_threads(), "torch": str(torch.__version__), "model_type": fp32.cfg.model_type,
            "t": fp32.cfg.t, "base_channels": fp32.cfg.base_channels, "image_size": size,
            "images": len(paths), "mean_megapixels": megapixels, "forward_gflop_per_image": flops / 1e9,
            "peak_tflops": peaks, "batch": fp32.batch_size, "rows": rows}


def _run_row(key: str, checkpoint, fp32: Segmenter, paths: list[Path], out: Path, dev, size: int, tmp: Path) -> float:
    """Seconds one row takes for ``paths`` (after a warm-up on two of them, written elsewhere)."""
    if key == "naive":
        model = fp32.members[0].model

        def run(ps, o):
            naive_loop(model, ps, o, size)
    else:
        segmenter, batch = _segmenter_for(key, checkpoint, fp32, dev, tmp, paths, size)

        def run(ps, o):
            with torch.inference_mode():
                run_predict(segmenter, _folder(ps, tmp / f"in_{key}_{len(ps)}"), o, batch_size=batch,
                            progress=False, log=lambda *_: None)
    warm = tmp / f"warm_{key}"
    warm.mkdir()
    run(paths if key == "compile" else paths[:2], warm)  # compiled graphs are made for each batch shape: all of them
    synchronize(dev)
    t0 = time.perf_counter()
    run(paths, out)
    synchronize(dev)
    return time.perf_counter() - t0


def _folder(paths: list[Path], folder: Path) -> Path:
    """A folder holding links to ``paths`` (predict reads a folder)."""
    if not folder.exists():
        folder.mkdir()
        for p in paths:
            (folder / p.name).symlink_to(p.resolve())
    return folder


def _segmenter_for(key: str, checkpoint, fp32: Segmenter, dev, tmp: Path, paths: list[Path], size: int):
    """The Segmenter and batch size of one row. The ONNX rows are made by ``r2unet export`` (``--int8``: calibrated
    on every other photo, its masks checked on the others); for the bench's own network they are written beside
    its checkpoint, as into a run folder, so that the ``default`` row runs what ``predict`` would run after them."""
    quiet = lambda *_: None  # noqa: E731
    if key == "default":
        return Segmenter(checkpoint, device=str(dev), log=quiet), None
    if key in ("fp32", "batch"):
        other = defaults.PREDICT_BATCH_CPU if fp32.batch_size == defaults.PREDICT_BATCH else defaults.PREDICT_BATCH
        return fp32, other if key == "batch" else fp32.batch_size
    if key in ("onnxruntime", "onnxruntime_int8"):
        folder = tmp if Path(checkpoint).parent == tmp else tmp / "exports"  # never into a user's run
        if key == "onnxruntime":
            path = folder / "model.onnx"
            export_checkpoint(checkpoint, path, check=False, log=quiet)
        else:
            path = folder / "model.int8.onnx"
            export_checkpoint(checkpoint, path, quantize=True, calibration=_folder(paths, tmp / "calibration"),
                              log=quiet)
        return Segmenter(path, log=quiet), fp32.batch_size
    segmenter = Segmenter(checkpoint, device=str(dev), amp="bf16" if key == "bf16" else "off", runtime="torch",
                          log=quiet)
    _memory_format(segmenter, key == "channels_last")
    if key == "compile":
        segmenter.members[0].model = torch.compile(segmenter.members[0].model, dynamic=False)
    return segmenter, fp32.batch_size


def _runs(member) -> tuple[str, str]:
    """(precision, what computes it) of the default row's model."""
    if isinstance(member.model, OnnxModel):
        return member.model.metadata.get(int8.PRECISION, "fp32"), member.runs
    return ("bf16" if member.precision.dtype == torch.bfloat16 else "fp32"), member.runs


def _memory_format(segmenter: Segmenter, channels_last: bool) -> None:
    member = segmenter.members[0]
    member.channels_last = channels_last
    member.model = member.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _forward_flops(segmenter: Segmenter, size: int) -> float:
    """FLOPs of one forward pass of one image at the network size."""
    model = segmenter.members[0].model
    if isinstance(model, OnnxModel):
        return float("nan")
    x = torch.randn(1, segmenter.cfg.img_ch, size, size, device=segmenter.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def predict_report(result: dict) -> str:
    """``bench predict``'s table."""
    r = result
    lines = [f"bench predict: {r['model_type']} (t={r['t']}, base {r['base_channels']}) at {r['image_size']} px, "
             f"{r['images']} photos of {r['mean_megapixels']:.1f} MP on average; {r['device']}, {r['threads']} "
             f"thread(s), torch {r['torch']}; batch {r['batch']}; forward {r['forward_gflop_per_image']:.1f} "
             "GFLOP/image; matmul peak " + ", ".join(f"{v:.2f} TFLOP/s {k}" for k, v in r["peak_tflops"].items())
             + " (the FLOP bound of each row is in its own precision; int8 against the fp32 one)",
             f"  {'row':<18}{'img/s':>8}  {'x naive':>7}  {'FLOP bound':>10}  {'pixels = fp32':>13}  "
             f"{'JS vs fp32':>10}"]
    for row in r["rows"]:
        if row["img_per_s"] is None:
            lines.append(f"  {row['config']:<18}  failed: {row['error']}")
            continue
        lines.append(f"  {row['config']:<18}{row['img_per_s']:8.2f}  {row['x_naive']:7.2f}  "
                     f"{row['frac_flop_bound']:10.1%}  {row['pixels_equal']:13.4%}  {row['mask_js']:10.4f}")
    lines += [f"  default runs {row['runs']}" for row in r["rows"] if row.get("runs")]
    return "\n".join(lines)
