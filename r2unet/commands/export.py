"""``r2unet export``: a checkpoint as ONNX (checked with onnxruntime) or as ``.safetensors`` weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine.checkpoint import save_weights_safetensors
from ..engine.inference import load_for_inference, predict_logits
from ..engine.onnx import OnnxModel, export_onnx
from ..engine.task import Task, task_of
from ..errors import ExportError
from ..models import SIZE_MULTIPLE


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, model_overrides: dict | None = None,
                      image_size: int | None = None, check: bool = True, log=print) -> str:
    """``r2unet export``: the checkpoint as ONNX (checked with onnxruntime) or, for a ``.safetensors`` output, its
    weights with the run's settings as metadata. Returns a line saying what was written."""
    stored: dict = {}
    model, cfg = load_for_inference(checkpoint, log=log, image_size=image_size, record=stored,
                                    **(model_overrides or {}))
    post = stored.get("postprocessing")
    if str(output).endswith(".safetensors"):
        save_weights_safetensors(model, output, cfg.to_dict())
        return (f"wrote {output} (weights, and the run's settings as metadata: use it as --checkpoint {output}; it "
                "holds no code and no optimizer state)")
    task = task_of(cfg)
    report = export_onnx(model, output, image_size=cfg.image_size, img_ch=cfg.img_ch, output_note=task.output_note,
                         metadata={"model_type": cfg.model_type, "t": cfg.t, "base_channels": cfg.base_channels,
                                   "threshold": cfg.threshold, **task.onnx_metadata(),
                                   # the decision made on validation, which predict and serve apply to this file
                                   **({"postprocessing": post.to_json()} if post is not None and post.active
                                      else {})})
    if check:
        check_onnx(model, output, task, cfg.image_size, cfg.img_ch, log=log)
    return f"wrote {report['path']} (opset {report['opset']})" + (
        f"; its metadata carries the postprocessing: {post.describe()}" if post is not None and post.active else "")


def check_onnx(model: torch.nn.Module, path: str | Path, task: Task, image_size: int, img_ch: int,
               tolerance: float = 1e-4, log=print) -> float:
    """The exported file against the PyTorch model, both through the inference path (``predict_logits``), on a
    random batch of another size than the export's: the largest difference of their logits, logged; over
    ``tolerance`` is an ExportError (the file is kept for inspection)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, img_ch, image_size + SIZE_MULTIPLE, max(SIZE_MULTIPLE, image_size - SIZE_MULTIPLE), generator=g)
    model = model.eval().float().cpu()
    diff = float((predict_logits(OnnxModel(path), x, task) - predict_logits(model, x, task)).abs().max())
    log(f"onnxruntime vs PyTorch on a {tuple(x.shape)} input: max |diff| = {diff:.2e} (tolerance {tolerance:g})")
    if not diff <= tolerance:
        raise ExportError(f"{path}: ONNX output differs from PyTorch by {diff:.3e} > {tolerance:g}; the exported "
                          "model is not faithful (file kept for inspection)")
    return diff
