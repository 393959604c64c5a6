"""Checkpoints: the one reader and writer of the checkpoint format.

- Written atomically (temporary file in the same folder, fsync, rename): a crash at any moment leaves either the old
  or the new file, never a half-written one. A failed write (disk full, permission) keeps the previous file.
- Read with ``torch.load(weights_only=True)`` only: a file whose unpickling would run code is refused.
- Reads r2unet checkpoints (a dict with ``format: "r2unet"``), bare ``state_dict`` files such as the reference's
  ``.pkl``, and ``.safetensors`` weight files (``r2unet export --output model.safetensors`` writes one).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, first_line
from ..fileio import atomic_write, atomic_write_text, free_space, naming
from ..models import list_models
from ..models.spec import FAMILY
from .runtime import CompileWithFallback


class RunFiles:
    """Files of one run folder (written by rank 0 only)."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.ckpt_dir = self.dir / "checkpoints"
        self.last = self.ckpt_dir / "last.pt"
        self.best = self.ckpt_dir / "best.pt"
        self.metrics = self.dir / "metrics.jsonl"
        self.results = self.dir / "results.json"
        self.samples = self.dir / "samples"

    def previous_results(self) -> dict:
        """results.json as a previous session wrote it ({} if there is none)."""
        try:
            return json.loads(self.results.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

FORMAT = "r2unet"
VERSION = 1


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` through ``atomic_write``: a crash leaves the previous file or the new one, never half."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError ("unexpected pos ...")
        raise CheckpointError(f"could not write checkpoint {path}: {_write_failure(exc, Path(path))}; "
                              "the previous checkpoint (if any) is unchanged") from None


def _write_failure(exc: Exception, path: Path) -> str:
    """Why a write failed, in words: an OS error as ``atomic_write`` names it (with the free space on a full disk),
    anything else (torch's "unexpected pos" on a full disk) with the free space; and the size of the file it
    replaces."""
    if isinstance(exc, OSError):
        reason = naming(exc, path).strerror
    else:
        reason = "; ".join(filter(None, (f"the write failed ({first_line(exc, 120)})", free_space(path.parent))))
    if path.exists():
        reason += f"; the file it replaces takes {path.stat().st_size / 2**20:.1f} MiB"
    return reason


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``), torch.compile (``._orig_mod``) and compile-fallback wrappers."""
    while True:
        if isinstance(model, CompileWithFallback):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def load_file(path: str | Path) -> dict:
    """Load a checkpoint file safely (``weights_only=True``) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":  # weights only, by construction: nothing in it can run
        return _load_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..) or, in old versions, a pickle (protocol byte 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        what = ("an ONNX model: an export for deployment (onnxruntime), not something to load back"
                if path.suffix.lower() == ".onnx" else "not a PyTorch checkpoint")
        raise CheckpointError(f"{path} is {what}; pass an r2unet checkpoint (.pt), a run folder, a .safetensors "
                              "export or a reference state_dict (.pkl/.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects other than tensors and plain containers, and "
            f"loading it could run arbitrary code. Only load files from sources you trust. "
            f"({first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    return obj


def _load_safetensors(path: Path) -> dict:
    """A bare state_dict; for a file ``r2unet export`` wrote, the weights with the run's settings (text metadata) as
    ``{"format": "r2unet", "model": ..., "config": ...}``, so that it is used like a checkpoint."""
    try:
        state = load_safetensors(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        return state
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError as exc:
        config = exc
    if not isinstance(config, dict):  # not silently a bare state_dict: its t and threshold would be guessed
        raise CheckpointError(f"{path} was written by r2unet export but its settings (metadata 'config') are "
                              f"damaged ({config if isinstance(config, Exception) else type(config).__name__}); "
                              "export it again from its checkpoint")
    return {"format": FORMAT, "model": state, "config": config} if config else state


def is_r2unet_checkpoint(obj: dict) -> bool:
    return obj.get("format") == FORMAT


def require_training_state(obj, path) -> dict:
    """``obj`` (read from ``path``) as --resume needs it: the last.pt of a run, with the optimizer's state."""
    if not isinstance(obj, dict) or not is_r2unet_checkpoint(obj):
        what = "a bare state_dict (weights only)" if isinstance(obj, dict) else "not an r2unet checkpoint"
    elif obj.get("optimizer") is None or "config" not in obj:
        what = "a model checkpoint without the optimizer's state (a copy of best.pt?)"
    else:
        return obj
    raise CheckpointError(f"--resume: {path} is {what}; resuming needs the last.pt a run writes (weights, optimizer, "
                          "schedule, epoch). To start a new run from these weights, train into another --output_dir")


def model_state(obj: dict) -> dict[str, torch.Tensor]:
    """The model weights of a loaded file: an r2unet checkpoint's ``model`` or a bare state_dict."""
    state = obj["model"] if is_r2unet_checkpoint(obj) else obj
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the file holds neither an r2unet checkpoint nor a state_dict of tensors")
    # strip the prefixes of DDP ("module.") and torch.compile ("_orig_mod.") if a foreign file carries them
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def infer_architecture(state: dict[str, torch.Tensor]) -> dict | None:
    """What a bare state_dict's keys and shapes say of its network: ``model_type``, ``base_channels``, ``img_ch``,
    ``output_ch`` (None when it is not one of the four). ``t`` is not among them: the recurrent blocks reuse their
    weights ``t`` times, so every ``t`` has the same weights."""
    if "Conv_1x1.weight" not in state:
        return None
    recurrent, attention = "RRCNN1.Conv_1x1.weight" in state, "Att5.W_g.0.weight" in state
    first = state.get("RRCNN1.Conv_1x1.weight" if recurrent else "Conv1.conv.0.weight")  # reads the image channels
    if first is None:
        return None
    model_type = next(name for name, kind in FAMILY.items() if kind == (recurrent, attention))
    head = state["Conv_1x1.weight"]
    return {"model_type": model_type, "base_channels": int(head.shape[1]), "img_ch": int(first.shape[1]),
            "output_ch": int(head.shape[0]), "step_stats": any(".step_norms." in k for k in state)}


def _with_step_stats(state: dict[str, torch.Tensor], target: dict) -> dict[str, torch.Tensor]:
    """A checkpoint of shared recurrent statistics (the reference's) for a model with statistics per recurrence
    step (``--step_stats``): each step starts from the shared ones ("...RCNN.0.step_norms.2.running_mean" from
    "...RCNN.0.conv.1.running_mean")."""
    missing = [k for k in target if ".step_norms." in k and k not in state]
    if not missing:
        return state
    state = dict(state)
    for key in missing:
        block, rest = key.split(".step_norms.", 1)
        shared = f"{block}.conv.1.{rest.split('.', 1)[1]}"
        if shared in state:
            state[key] = state[shared].clone()
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a readable report of missing/unexpected keys and shape mismatches."""
    target = unwrap(model).state_dict()
    state = _with_step_stats(state, target)
    if state and not any(k in target for k in state):
        ours = ", ".join(list_models())
        shown = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"{source} is not a checkpoint of these networks ({ours}): none of its {len(state)} weight names is one "
            f"of theirs (its first: {shown}). r2unet loads its own checkpoints and the reference implementation's "
            "(LeeJunHyun/Image_Segmentation and its Ascend port); a model of another library needs that library")
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        def block(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:15]) + (f"\n    ... and {len(items) - 15} more" if len(items) > 15 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}"

        raise CheckpointError(
            f"{source} does not fit this model (wrong --model_type, --t, --base_channels, --img_ch or "
            f"--output_ch?)" + block("missing keys", missing) + block("unexpected keys", unexpected)
            + block("shape mismatches", mismatched))
    unwrap(model).load_state_dict(state, strict=True)


def save_weights_safetensors(model: nn.Module, path: str | Path, config: dict | None = None) -> None:
    """The model's weights (and buffers) alone as a safetensors file; the config goes into its text metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(config or {})}
    try:
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' own error on a full disk
        raise CheckpointError(f"could not write {path}: {_write_failure(exc, Path(path))}") from None


def save_checkpoint(path: str | Path, *, model: nn.Module, config: dict, epoch: int, step: int = 0,
                    optimizer=None, scaler=None, scheduler=None, best_score: float = float("-inf"),
                    best_epoch: int = -1, rng: dict | None = None, extra: dict | None = None,
                    data_split: dict | None = None) -> None:
    """Write everything needed to resume. ``epoch`` is the epoch to continue from, ``step`` the batches done in it;
    ``data_split``: which image was in which split (``prepare.data_split``), so a changed split is noticed."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "config": config,
        "epoch": epoch,
        "step": step,
        "best_score": best_score,
        "best_epoch": best_epoch,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng or {},
        "extra": extra or {},
        "torch_version": str(torch.__version__),
    }
    if data_split is not None:
        state["data_split"] = data_split
    atomic_save(state, path)


def store_postprocessing(files: RunFiles, post) -> None:
    """Keep a decision with the run: in best.pt (so that evaluate, predict, serve and export find it with the
    weights) and in postprocessing.json (to read)."""
    best = load_file(files.best)
    best["postprocessing"] = post.to_dict()
    atomic_save(best, files.best)
    atomic_write_text(files.dir / "postprocessing.json", json.dumps(post.to_dict(), indent=2) + "\n")
