"""ONNX: export a model with dynamic batch and spatial size (checked against PyTorch with onnxruntime), and run an
exported file as a model (``OnnxModel``, ``load_onnx``: its metadata checked against its graph)."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..data.augment import MEAN, STD
from ..errors import ExportError
from ..fileio import atomic_write, check_writable
from ..models import SIZE_MULTIPLE
from . import runtime
from .config import ConfigError, TrainConfig

OPSET = 18  # supported by onnxruntime >= 1.14 and by torch's exporter


def preprocessing_note(image_size: int, img_ch: int = 3, output: str = "mask = sigmoid(logits) > threshold") -> str:
    """How an image becomes the network's input and its logits a mask (``output``, the task's ``output_note``), in
    words, for deployers of the exported model."""
    channels = "RGB" if img_ch == 3 else "grayscale (the mean of R, G and B)"
    return (f"{channels}, float in [0, 1] (uint8 / 255), resized to {image_size}x{image_size} (bilinear, "
            f"antialiased, aspect ratio not kept), normalised as (x - {MEAN}) / {STD}, layout NCHW; "
            f"{output}, resized back to the image's size")


def export_onnx(model: torch.nn.Module, output: str | Path, image_size: int = defaults.IMAGE_SIZE, img_ch: int = 3,
                metadata: dict | None = None, output_note: str = "mask = sigmoid(logits) > threshold") -> dict:
    """Write ``output`` (input ``image`` (N, C, H, W), output ``logits`` (N, K, H, W); N, H, W dynamic, H and W
    multiples of 16). The file's metadata (``metadata_props``) records the preprocessing (``preprocessing_note``)
    and ``metadata`` (e.g. the run's model type, threshold and classes), so the model can be deployed without this
    package. ``r2unet export`` then checks it against PyTorch through the inference path."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("export needs onnx and onnxruntime: pip install 'r2unet[export]'") from None
    model = model.eval().float().cpu()
    output = Path(output)
    check_writable(output)  # a read-only or full destination, before the exporter's seconds of work
    output.parent.mkdir(parents=True, exist_ok=True)
    if image_size < SIZE_MULTIPLE or image_size % SIZE_MULTIPLE:
        raise ExportError(f"--image_size: must be a positive multiple of {SIZE_MULTIPLE} (the networks pool 4 "
                          f"times), got {image_size}")
    example = torch.randn(1, img_ch, image_size, image_size)
    props = {"r2unet.preprocessing": preprocessing_note(image_size, img_ch, output_note),
             "r2unet.image_size": image_size, **{f"r2unet.{k}": v for k, v in (metadata or {}).items()}}
    try:
        atomic_write(output, lambda tmp: (_export(model, example, tmp), add_metadata(tmp, props)))
    finally:  # the exporter's side files (external data) next to the temporary file
        for side in output.parent.glob(f".{output.name}.tmp*"):
            side.unlink(missing_ok=True)
    return {"path": str(output), "opset": OPSET}


def add_metadata(path: Path, entries: dict) -> None:
    """``entries`` added to the ``metadata_props`` of the ONNX file ``path`` (in place)."""
    import onnx

    proto = onnx.load(str(path))
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, str(value)
    onnx.save(proto, str(path))


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    h16 = torch.export.Dim("h16", min=1, max=512)
    w16 = torch.export.Dim("w16", min=1, max=512)
    dynamic = {"x": {0: batch, 2: SIZE_MULTIPLE * h16, 3: SIZE_MULTIPLE * w16}}
    # the exporter says it skips torchvision's operators where torchvision is not installed: nothing r2unet uses
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines, not a command's output
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                              opset_version=OPSET, dynamo=True, dynamic_shapes=dynamic, external_data=False)
    except OSError:  # the destination (a full disk, a read-only folder): the other exporter cannot help
        raise
    except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter
        try:
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                              opset_version=17, dynamo=False,
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "height", 3: "width"}})
        except Exception as exc2:  # noqa: BLE001
            raise ExportError(f"ONNX export failed: {exc}; fallback exporter: {exc2}") from None
    finally:
        registration.setLevel(level)


class OnnxModel(torch.nn.Module):
    """An exported ``.onnx`` file run by onnxruntime (CPU) behind the torch module interface ``predict`` uses. A
    batch is run in chunks of at most ``max_batch`` images (a graph with a fixed batch size: that size, the last
    chunk padded), so memory stays bounded whatever batch the caller hands it."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running an .onnx model needs onnxruntime: pip install 'r2unet[export]'") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors: the file is not a usable model
            raise ExportError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        self.path = Path(path)
        self.input = self.session.get_inputs()[0]
        self.output = self.session.get_outputs()[0]
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.fixed_batch = _fixed(self.input.shape, 0)
        self.max_batch = self.fixed_batch or 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu().numpy()
        outs = []
        for i in range(0, len(x), self.max_batch):
            chunk = x[i:i + self.max_batch]
            if self.fixed_batch and len(chunk) < self.fixed_batch:  # padded to the graph's batch size
                pad = np.zeros((self.fixed_batch - len(chunk), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(self.session.run(None, {self.input.name: chunk})[0][:len(x) - i])
        return torch.from_numpy(np.concatenate(outs))


def _fixed(shape, axis: int) -> int | None:
    """A graph dimension fixed to a number, or None when it is symbolic (dynamic)."""
    value = shape[axis] if len(shape) > axis else None
    return value if isinstance(value, int) and value > 0 else None

# bytes of activations per pixel of the input and channel of the first stage, at onnxruntime's peak for one image:
# measured 6.0 for R2U-Net (t=2, base 16) at 512 and 1024 px; 8 leaves room
ONNX_BYTES_PER_PIXEL_CHANNEL = 8 * 4


def load_onnx(path: str | Path, image_size: int | None = None, log=print):
    """(``OnnxModel``, its settings as a ``TrainConfig``) from an ``.onnx`` file ``r2unet export`` wrote: the
    network, input size, threshold and classes are read from its metadata, and checked against the graph: the
    class count against the output's channels, the input size against a fixed input shape and against the memory
    one image at that size needs. Each inconsistency names the file and the key."""
    model = OnnxModel(path)
    meta = {k.removeprefix("r2unet."): v for k, v in model.metadata.items() if k.startswith("r2unet.")}
    if "image_size" not in meta:
        raise ExportError(f"{path}: an ONNX file without r2unet's metadata (r2unet export writes it)")

    def number(key: str, default, kind=int, low=1, high=None):
        if key not in meta:
            return default
        try:
            value = kind(meta[key])
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high) or value != value:
            bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise ExportError(f"{path}: metadata r2unet.{key} is {meta[key][:40]!r}, not a "
                              f"{'whole number' if kind is int else 'number'} {bounds}")
        return value

    size = image_size or number("image_size", None, low=SIZE_MULTIPLE)
    channels, in_h, in_w = (_fixed(model.input.shape, a) for a in (1, 2, 3))
    if (in_h or in_w) and (in_h, in_w) != (size, size):
        raise ExportError(f"{path}: its input is fixed at {in_h}x{in_w} pixels, but "
                          + (f"--image_size {size}" if image_size else f"metadata r2unet.image_size says {size}")
                          + " (a graph with a fixed size runs only at that size; export it again with "
                            "'r2unet export', whose graphs take any size)")
    base = number("base_channels", 64, high=4096)
    need = size * size * base * ONNX_BYTES_PER_PIXEL_CHANNEL
    free = runtime.available_memory()
    if free is not None and need > free:
        raise ExportError(f"{path}: " + (f"--image_size {size}" if image_size else f"metadata r2unet.image_size {size}")
                          + f" needs about {need / 2**30:.1f} GiB for one image (base_channels {base}), more than the "
                          f"{free / 2**30:.1f} GiB of memory available; the size the model was trained at is usually "
                          "a few hundred pixels")
    if free is not None:
        model.max_batch = max(1, min(model.max_batch, int(free // 2 // need)))
    outputs = _output_channels(model, path, channels or 3)
    classes = number("num_classes", None, high=255)
    if classes is None and outputs > 1:
        classes = outputs
        log(f"note: {path} has {outputs} output channels and no r2unet.num_classes in its metadata: read as a label "
            f"map of {outputs} classes (the argmax), not as a binary mask")
    classes = classes or 1
    if classes != outputs:
        raise ExportError(f"{path}: metadata r2unet.num_classes says {classes}, but its output has {outputs} "
                          f"channel(s){' (a binary model has one)' if outputs == 1 else ''}; the metadata does not "
                          "describe this graph")
    try:
        cfg = TrainConfig(model_type=meta.get("model_type", TrainConfig.model_type),
                          t=number("t", TrainConfig.t), base_channels=base, image_size=size,
                          threshold=number("threshold", TrainConfig.threshold, kind=float, low=0.0, high=1.0),
                          num_classes=classes,
                          class_colors=meta.get("class_colors"),
                          img_ch=channels or 3, device="cpu", amp="off", channels_last="off").validate()
    except ConfigError as exc:
        raise ExportError(f"{path}: its metadata: {str(exc).removeprefix('--')}") from None
    return model.eval(), cfg


def _output_channels(model: OnnxModel, path, img_ch: int) -> int:
    """The output's channel count: from the graph when fixed, else from a forward pass on a small input."""
    fixed = _fixed(model.output.shape, 1)
    if fixed is not None:
        return fixed
    side = _fixed(model.input.shape, 2) or SIZE_MULTIPLE * 2
    try:
        return int(model(torch.zeros(1, img_ch, side, _fixed(model.input.shape, 3) or side)).shape[1])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors: the graph does not take an image
        raise ExportError(f"{path}: does not run on a {img_ch}-channel image ({str(exc).splitlines()[0][:200]})"
                          ) from None
