"""int8 models made from a checkpoint, run in its place on CPUs.

A CPU without native bf16 (AVX2 only, or AVX-512 without bf16) runs PyTorch in float32, which already reaches
60-85 % of the float32 matmul bound on an R2U-Net (benchmarks/README.md, "Predict and serve"): only less arithmetic
per pixel makes it much faster. ``r2unet export --int8`` writes an onnxruntime model with int8 weights and uint8
activations (``export_int8``), its activation ranges calibrated on images like the ones to segment and its masks
checked against float32 PyTorch's on other images, pixel for pixel, at the images' own size.

Kept beside the run (``RUN/model.int8.onnx``), it is a *companion* of the checkpoint it was made from: on a CPU
``predict``, ``serve`` and ``evaluate`` run it in place of the checkpoint (``companion``) when it was made from the
same checkpoint file (a digest in its metadata) and its masks matched on at least ``AGREEMENT`` of the pixels. It
outran PyTorch on an AMX CPU too (R2U-Net t=2 at 224 px: 4.1-4.3 img/s against 3.6 in bf16). A float ONNX export
made from the checkpoint (``r2unet export``) is a companion where PyTorch would run float32: onnxruntime's float32
ran 1.3-1.4x PyTorch's there."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.imageio import is_image_file
from ..errors import ExportError
from ..fileio import atomic_write, check_writable
from .checkpoint import RunFiles

AGREEMENT = 0.999  # the share of pixels whose masks must equal float32's for a model to run by default
CALIBRATION_IMAGES, CHECK_IMAGES = 16, 32  # at most, from the run's training and validation splits
SOURCE, AGREED, CHECKED_ON, PRECISION = ("r2unet.source_sha256", "r2unet.mask_agreement", "r2unet.checked_on",
                                         "r2unet.precision")


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The file a ``--checkpoint`` names: itself, or a run folder's ``checkpoints/best.pt``."""
    path = Path(checkpoint)
    return RunFiles(path).best if path.is_dir() else path


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (what ties an exported model to the checkpoint it was made from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def quantize_int8(source: str | Path, output: str | Path, calibration: Iterable[np.ndarray], *,
                  per_channel: bool = True, reduce_range: bool = True) -> Path:
    """``source`` (a float ONNX model) with int8 weights and uint8 activations, written to ``output``: onnxruntime's
    static quantisation (QDQ) after its graph optimisations (batch norm folded into the convolutions), the
    activation ranges calibrated on ``calibration`` (network inputs (1, C, S, S) float32), with the float model's
    metadata.

    ``reduce_range``: weights in 7 bits, so that where onnxruntime multiplies uint8 by int8 pairwise into int16
    (x86 CPUs without VNNI: AVX2) no sum saturates, and the file computes there what it computed where its masks
    were checked. ``per_channel``: a scale per output channel of each convolution."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ExportError("int8 quantisation needs onnx and onnxruntime: pip install 'r2unet[export]'") from None
    source, output = Path(source), Path(output)
    check_writable(output)
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name

    class Inputs(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {name: np.ascontiguousarray(x, dtype=np.float32)}

    def write(tmp: Path) -> None:
        folded = tmp.with_name(tmp.name + ".folded.onnx")
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantiser's advice, printed through the root logger
        try:
            quant_pre_process(str(source), str(folded), skip_symbolic_shape=True)
            quantize_static(str(folded), str(tmp), Inputs(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                            reduce_range=reduce_range)
        finally:
            logging.getLogger().setLevel(quiet)
            folded.unlink(missing_ok=True)
        quantized = onnx.load(str(tmp))
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(onnx.load(str(source), load_external_data=False).metadata_props)
        onnx.save(quantized, str(tmp))

    atomic_write(output, write)
    return output


def sample_images(cfg, calibration: str | Path | None) -> tuple[list[Path], list[Path], str]:
    """(images to calibrate on, other images to check the masks on, what the latter are): from ``calibration``, a
    folder of images (alternately one and the other, in name order), else the run's dataset (``cfg.data_path``): its
    training split to calibrate, its validation split to check; each spread evenly over its files."""
    def spread(paths: Sequence[Path], n: int) -> list[Path]:
        return [paths[int(i * len(paths) / n)] for i in range(n)] if len(paths) > n else list(paths)

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)) if folder.is_dir() else []

    if calibration is not None:
        found = images(Path(calibration))
        if len(found) < 2:
            raise ExportError(f"--calibration {calibration}: needs at least 2 images (half calibrate, half check the "
                              f"masks), found {len(found)}")
        checks = spread(found[1::2], CHECK_IMAGES)
        return spread(found[0::2], CALIBRATION_IMAGES), checks, f"{len(checks)} images of {calibration}"
    data = Path(cfg.data_path)
    train, valid = images(data / "train"), images(data / "valid")
    if not (train and valid):
        raise ExportError(f"--int8 calibrates on the run's training images and checks its masks on the validation "
                          f"images, and {data} holds no train/ and valid/ images here; pass --calibration DIR: a "
                          "folder of images like those you will segment (32 is plenty)")
    checks = spread(valid, CHECK_IMAGES)
    return spread(train, CALIBRATION_IMAGES), checks, f"{len(checks)} validation images of {data}"


def mask_agreement(reference, candidate, paths: list[Path]) -> float:
    """The share of pixels whose masks two ``Segmenter``s agree on, over ``paths`` at the images' own size, as
    ``predict`` makes them (without postprocessing, which would hide differences)."""
    equal = total = 0
    with torch.inference_mode():
        for (_, _, a), (_, _, b) in zip(reference.predict(paths), candidate.predict(paths)):
            ma, mb = reference.task.mask(a, reference.threshold), candidate.task.mask(b, candidate.threshold)
            equal += int((ma == mb).sum())
            total += ma.size
    return equal / total if total else float("nan")


def companion_folders(checkpoint: str | Path) -> set[Path]:
    """Where a checkpoint's companions are looked for: its folder, and the run folder above ``checkpoints/``."""
    return {checkpoint_file(checkpoint).parent, run_folder(checkpoint)}


def runnable() -> bool:
    """Whether onnxruntime (and onnx, to read a file's metadata) are installed: the ``export`` extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def run_folder(checkpoint: str | Path) -> Path:
    """The run a checkpoint belongs to (the folder above ``checkpoints/``), else the checkpoint's folder: where
    ``export --int8`` puts its int8 model by default."""
    ckpt = checkpoint_file(checkpoint)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def made_from(checkpoint: str | Path) -> list[tuple[Path, dict]]:
    """The exported models (with their metadata) in the run folder and the checkpoint's folder that were made from
    ``checkpoint``'s file, as its digest says; none without onnx."""
    if not runnable():
        return []
    import onnx

    found, digest = [], None
    for path in sorted(p for folder in companion_folders(checkpoint) for p in folder.glob("*.onnx")):
        try:
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception:  # noqa: BLE001 - an unreadable file is nobody's companion
            continue
        if SOURCE in meta:
            digest = digest or file_digest(checkpoint_file(checkpoint))
            if meta[SOURCE] == digest:
                found.append((path, meta))
    return found


def _agreement(meta: dict) -> float:
    """The share of equal pixels a file records (0 when it records none, or not as a number)."""
    try:
        return float(meta.get(AGREED, 0))
    except ValueError:
        return 0.0


def _checked(meta: dict, image_size: int | None) -> bool:
    """An int8 model's masks matched float32's closely enough, at the size it runs at."""
    same_size = image_size is None or meta.get("r2unet.image_size") == str(image_size)
    return same_size and _agreement(meta) >= AGREEMENT


def companion(checkpoint: str | Path, int8: bool = True, float32: bool = True,
              image_size: int | None = None) -> tuple[Path, dict] | None:
    """The fastest exported model made from ``checkpoint`` that may run in its place, with its metadata
    (``made_from``): an int8 one whose masks matched float32's on at least ``AGREEMENT`` of the pixels (when
    ``int8``, and at the size it was checked at: ``image_size``), else a float one (when ``float32``: where PyTorch
    would run float32; bf16 PyTorch outran onnxruntime's float32 2.4x on an AMX CPU, and int8 1.2x)."""
    found = [(0 if meta.get(PRECISION) == "int8" else 1, path, meta) for path, meta in made_from(checkpoint)
             if (meta.get(PRECISION) == "int8" and int8 and _checked(meta, image_size))
             or (meta.get(PRECISION) != "int8" and float32)]
    return min(found, key=lambda f: f[0])[1:] if found else None


def advice(checkpoint: str | Path, int8: bool = True) -> str:
    """What makes a checkpoint that runs in float32 on a CPU faster, when nothing runs in its place (``int8``:
    whether an int8 model may)."""
    run = run_folder(checkpoint)
    float_export = f"r2unet export --checkpoint {checkpoint} --output {run / 'model.onnx'}"
    if not int8:
        return (f"note: float32 asked for, and this CPU runs {checkpoint} in PyTorch; a float32 ONNX export runs in "
                f"its place, with the same masks, faster: {float_export}")
    failed = [(path, meta) for path, meta in made_from(checkpoint) if meta.get(PRECISION) == "int8"]
    if failed:
        path, meta = failed[0]
        return (f"note: this CPU runs {checkpoint} in float32; {path.name}, made from it, matched float32's masks on "
                f"{100 * _agreement(meta):.3f} % of the pixels only (or at another size), under the "
                f"{100 * AGREEMENT:g} % it needs to run in its place. A float32 export runs there with float32's "
                f"masks: {float_export}")
    return (f"note: this CPU runs {checkpoint} in float32; 'r2unet export --checkpoint {checkpoint} --int8' writes "
            f"{run / 'model.int8.onnx'}, an int8 model checked against it, that predict, serve and evaluate then run "
            "in its place (4x float32 PyTorch's speed on the CPU it was measured on: benchmarks/README.md)")


def describe(path: Path, meta: dict) -> str:
    """What a companion is, for the line that says it runs."""
    if meta.get(PRECISION) == "int8":
        return (f"{path} (onnxruntime, int8; its masks matched float32's on {100 * _agreement(meta):.2f} % of the "
                f"pixels of {meta.get(CHECKED_ON, 'held-out images')})")
    return f"{path} (onnxruntime, float32)"
