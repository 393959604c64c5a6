"""``r2unet export``: a checkpoint as ONNX (checked with onnxruntime), as an int8 ONNX model (its masks checked
against float32's), or as ``.safetensors`` weights."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ExportError
from ..fileio import atomic_write, check_writable
from ..models import SIZE_MULTIPLE
from . import int8
from .checkpoint import save_weights_safetensors
from .config import TrainConfig
from .inference import Segmenter, _to_input, load_for_inference, model_folders, predict_logits
from .onnx import OnnxModel, add_metadata, export_onnx
from .postprocess import Postprocessing
from .task import Task, task_of


def export_checkpoint(checkpoint: str | Path, output: str | Path | None, *, model_overrides: dict | None = None,
                      image_size: int | None = None, check: bool = True, quantize: bool = False,
                      calibration: str | Path | None = None, log=print) -> str:
    """``r2unet export``: the checkpoint as ONNX (checked with onnxruntime); with ``quantize``, as an int8 ONNX
    model (``export_int8``); for a ``.safetensors`` output, its weights with the run's settings as metadata. Returns
    a line saying what was written."""
    if str(checkpoint).lower().endswith(".onnx"):
        raise ExportError(f"--checkpoint {checkpoint} is an ONNX file already; export reads the checkpoint it was made "
                          "from (a run folder, a .pt, a .safetensors or the reference's .pkl)")
    if calibration is not None and not quantize:
        raise ExportError("--calibration: the images an int8 model is calibrated on; it goes with --int8")
    if output is None:
        if not quantize:
            raise ExportError("--output: where to write (model.onnx, or model.safetensors for the weights alone)")
        runs = model_folders(checkpoint)
        if runs != [Path(checkpoint)]:  # a folder of runs (cross-validation folds, seeds): each run's own file
            return "\n".join(export_checkpoint(run, None, model_overrides=model_overrides, image_size=image_size,
                                                quantize=True, calibration=calibration, log=log) for run in runs)
        output = int8.run_folder(checkpoint) / "model.int8.onnx"
    stored: dict = {}
    model, cfg = load_for_inference(checkpoint, log=log, image_size=image_size, record=stored,
                                    **(model_overrides or {}))
    post = stored.get("postprocessing")
    if str(output).endswith(".safetensors"):
        if quantize:
            raise ExportError("--int8 writes an ONNX model: give --output a .onnx name")
        save_weights_safetensors(model, output, cfg.to_dict())
        return (f"wrote {output} (weights, and the run's settings as metadata: use it as --checkpoint {output}; it "
                "holds no code and no optimizer state)")
    if quantize:
        return export_int8(checkpoint, model, cfg, post, output, calibration, log)
    task = task_of(cfg)
    report = export_onnx(model, output, image_size=cfg.image_size, img_ch=cfg.img_ch, output_note=task.output_note,
                         metadata=_metadata(checkpoint, cfg, task, post))
    if check:
        check_onnx(model, output, task, cfg.image_size, cfg.img_ch, log=log)
    return f"wrote {report['path']} (opset {report['opset']})" + (
        f"; its metadata carries the postprocessing: {post.describe()}" if post is not None and post.active else "")


def _metadata(checkpoint, cfg: TrainConfig, task: Task, post: Postprocessing | None) -> dict:
    """What an exported file records: the network and how its output reads, the postprocessing chosen on
    validation (which predict and serve apply to it), and the digest of the checkpoint it was made from (which
    makes it the checkpoint's companion, ``int8.companion``)."""
    source = int8.checkpoint_file(checkpoint)
    return {"model_type": cfg.model_type, "t": cfg.t, "base_channels": cfg.base_channels, "threshold": cfg.threshold,
            **task.onnx_metadata(),
            **({"postprocessing": post.to_json()} if post is not None and post.active else {}),
            **({"source_sha256": int8.file_digest(source)} if source.is_file() and source.suffix != ".onnx" else {})}


def export_int8(checkpoint, model: torch.nn.Module, cfg: TrainConfig, post: Postprocessing | None, output,
                calibration, log=print) -> str:
    """``output``: the model with int8 weights and activations (``int8.quantize_int8``), calibrated on images like
    those to segment and its masks checked against float32 PyTorch's on other images (``int8.sample_images``); the
    share of equal pixels is kept in its metadata. Under ``int8.AGREEMENT`` the file is still written, but nothing
    runs it in the checkpoint's place."""
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise ExportError(f"--int8 writes an ONNX model: --output {output} should end in .onnx")
    check_writable(output)
    calibrate, checks, checked_on = int8.sample_images(cfg, calibration)
    task = task_of(cfg)
    reference = Segmenter.of(model.eval().float().cpu(), cfg, device="cpu")
    log(f"int8: calibrating on {len(calibrate)} images, then checking the masks on {checked_on}")
    with tempfile.TemporaryDirectory(prefix="r2unet-int8-") as tmp:
        fp32_file, int8_file = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export_onnx(reference.members[0].model, fp32_file, image_size=cfg.image_size, img_ch=cfg.img_ch,
                    output_note=task.output_note, metadata={**_metadata(checkpoint, cfg, task, post),
                                                            "precision": "int8"})
        int8.quantize_int8(fp32_file, int8_file, (_to_input(reference.decode(p)[1], cfg.image_size, cfg.img_ch)
                                                  .numpy() for p in calibrate))
        agreement = int8.mask_agreement(reference, Segmenter(int8_file, log=lambda *_: None, postprocess="none"),
                                        checks)
        add_metadata(int8_file, {int8.AGREED: f"{agreement:.6f}", int8.CHECKED_ON: checked_on})
        atomic_write(output, lambda t: shutil.copyfile(int8_file, t))
    line = (f"wrote {output} (int8): its masks equal float32's on {100 * agreement:.3f} % of the pixels of "
            f"{checked_on}")
    if agreement < int8.AGREEMENT:
        return line + (f", under the {100 * int8.AGREEMENT:g} % a model needs to run by default: nothing runs it in "
                       f"the checkpoint's place (--checkpoint it to use it knowingly). A float32 export runs there "
                       f"instead, with float32's masks: r2unet export --checkpoint {checkpoint} --output "
                       f"{int8.run_folder(checkpoint) / 'model.onnx'}")
    if output.resolve().parent in {f.resolve() for f in int8.companion_folders(checkpoint)}:
        return line + "; on a CPU, predict, serve and evaluate run it in the checkpoint's place"
    return line + (f"; kept in {int8.run_folder(checkpoint)}/ instead, predict, serve and evaluate would run it in the "
                   "checkpoint's place on a CPU")


def check_onnx(model: torch.nn.Module, path: str | Path, task: Task, image_size: int, img_ch: int,
               tolerance: float = 1e-4, log=print) -> float:
    """The exported file against the PyTorch model, both through the inference path (``predict_logits``), on a
    random batch of another size than the export's: the largest difference of their logits, logged; over
    ``tolerance`` times the logits' scale (their largest magnitude, at least 1: float32 summed in another order
    differs in proportion to the values) is an ExportError (the file is kept for inspection)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, img_ch, image_size + SIZE_MULTIPLE, max(SIZE_MULTIPLE, image_size - SIZE_MULTIPLE), generator=g)
    model = model.eval().float().cpu()
    want = predict_logits(model, x, task)
    diff = float((predict_logits(OnnxModel(path), x, task) - want).abs().max())
    limit = tolerance * max(1.0, float(want.abs().max()))
    log(f"onnxruntime vs PyTorch on a {tuple(x.shape)} input: max |diff| = {diff:.2e} (tolerance {limit:.2e})")
    if not diff <= limit:
        raise ExportError(f"{path}: ONNX output differs from PyTorch by {diff:.3e} > {limit:.3e} ({tolerance:g} of "
                          "the logits' scale); the exported model is not faithful (file kept for inspection)")
    return diff
