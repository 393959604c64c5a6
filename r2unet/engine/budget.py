"""What a training run will cost, said before it starts: the memory one step needs against what the machine has
(a run that cannot fit stops, naming settings that would), and on a CPU the time of a step from a short probe.

Memory is computed, not guessed: the network runs once on PyTorch's ``meta`` device (shapes only, no memory, no
arithmetic) at the run's size, batch and precision, and every tensor autograd keeps for the backward pass is
counted. On top come the weights, their gradients and Adam's two moments. The backward pass's transient buffers and
the allocator's slack are a fixed share of the activations (``TRANSIENT``), measured on the four networks at 64-224
px in float32 and bf16 (the peak resident memory of real steps grew by 0.9-1.5x the activations, the weights' state
aside). The memory it is set against is the room left for this process: what the machine, the process's cgroup and
its own limits still give (``runtime.memory_available``), or a GPU's free memory; what the process holds already is
outside both.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .. import defaults
from ..models import SIZE_MULTIPLE
from ..progress import duration
from .config import ConfigError, TrainConfig
from .loop import build_model
from .runtime import Placement, memory_available

TRANSIENT = 1.6  # peak memory of a step / the activations it keeps (the weights' state aside): 1.46 at most, measured
PROBE_SIZE, PROBE_BATCH = 64, 4  # the time probe: passes of 1 and 4 images of at most this side
LONG_RUN_S = 4 * 3600  # beyond this, a CPU run is told how to train faster
SPARE = 0.1  # the share of the room the settings suggested leave free (the estimate is not exact to the byte)
CLOSE = 0.85  # beyond this share of the memory available, a run is said to be close to the limit
GB = 2**30


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 2**20:.0f} MB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs at its peak beyond what the process holds before training."""

    activations: int  # what autograd keeps for the backward pass, for the whole batch
    weights: int  # parameters, gradients, Adam's two moments (and a 16-bit copy under mixed precision)

    @property
    def need(self) -> int:
        return int(self.activations * TRANSIENT) + self.weights

    def describe(self, cfg: TrainConfig, batch: int, dtype_name: str) -> str:
        return (f"about {_gb(self.need)} (a batch of {batch} at {cfg.image_size}x{cfg.image_size} in {dtype_name}: "
                f"activations {_gb(self.activations)}, x{TRANSIENT} at the backward pass's peak; weights, gradients "
                f"and Adam {_gb(self.weights)})")


def saved_bytes(cfg: TrainConfig, size: int, batch: int, dtype: torch.dtype | None,
                base_channels: int | None = None) -> tuple[int, int]:
    """(activation bytes autograd keeps for one training step, parameter count) of the settings' network with
    ``batch`` images of ``size`` px, computed on the meta device (no memory, no arithmetic, no random numbers).
    ``dtype``: the autocast dtype (None: float32); the network is run in it, as autocast runs its convolutions."""
    with torch.device("meta"):
        model = build_model(cfg if base_channels is None else cfg.updated(base_channels=base_channels))
        x = torch.empty(batch, cfg.img_ch, size, size)
    if dtype is not None:
        model, x = model.to(dtype), x.to(dtype)
    params = {id(p) for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if id(t) not in params:  # the weights are counted once, below
            total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().mean()
    return total, sum(p.numel() for p in model.parameters())


def estimate_memory(cfg: TrainConfig, place: Placement, batch: int, size: int | None = None,
                    base_channels: int | None = None) -> MemoryEstimate:
    """What one step of ``batch`` images at ``size`` (default: the settings') needs on ``place``'s device."""
    dtype = place.precision.dtype
    activations, n_params = saved_bytes(cfg, size or cfg.image_size, batch, dtype, base_channels)
    weights = n_params * (4 * 4 + (2 if dtype is not None else 0))  # fp32 weights, grads, two moments; 16-bit copy
    return MemoryEstimate(activations, weights)


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free, what they are) on ``device``: the GPU's free memory, or what this process may take on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)} ({_gb(total)})"
    return memory_available()


def check_memory(cfg: TrainConfig, place: Placement, batch: int, world: int, log) -> MemoryEstimate | None:
    """Say what a step needs against what the device has; raise ``ConfigError`` (with settings that fit) when it
    cannot fit. ``world``: processes of the job; on a CPU, those of this machine share its memory."""
    found = device_memory(place.device)
    if found is None:
        return None
    available, source = found
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if place.device.type == "cpu" else 1
    share = available // max(1, sharing)
    need = estimate_memory(cfg, place, batch)
    what = need.describe(cfg, batch, place.precision.name)
    per = f" for each of the {sharing} processes on this machine" if sharing > 1 else ""
    if need.need > share:
        fits = fitting_settings(cfg, place, batch, share, world)
        raise ConfigError(
            f"not enough memory for this run: a training step needs {what}{per}, and {_gb(available)} is {source}. "
            + (f"Settings that fit, with {SPARE:.0%} to spare: {'; or '.join(fits)}. " if fits
               else "No smaller batch, size or width fits. ")
            + "Nothing was trained; --no_memory_check trains anyway (at the risk of being killed)")
    log(f"memory: a training step needs {what}{per}; {_gb(available)} {source}")
    if need.need > CLOSE * share:
        log(f"note: that is {need.need / share:.0%} of the memory available: other programs may push the run out "
            "(a smaller --batch_size leaves room)")
    return need


def fitting_settings(cfg: TrainConfig, place: Placement, batch: int, room: int, world: int) -> list[str]:
    """Flags that fit in ``room`` bytes with ``SPARE`` of it left, each changing one setting: the largest batch,
    the largest image size, the widest network (halving --base_channels)."""
    fits, room = [], int(room * (1 - SPARE))
    one = estimate_memory(cfg, place, 1)
    largest = int((room - one.weights) / (one.activations * TRANSIENT)) if room > one.weights else 0
    if largest >= 1:
        if cfg.global_batch_size is not None:
            fits.append(f"--global_batch_size {largest * world}")
        else:
            fits.append(f"--batch_size {largest}")
    for size in range(cfg.image_size - SIZE_MULTIPLE, SIZE_MULTIPLE - 1, -SIZE_MULTIPLE):
        if estimate_memory(cfg, place, batch, size=size).need <= room:
            fits.append(f"--image_size {size}")
            break
    width = cfg.base_channels // 2
    while width >= 4:
        if estimate_memory(cfg, place, batch, base_channels=width).need <= room:
            fits.append(f"--base_channels {width} (a new model: its checkpoints do not load into the "
                        f"{cfg.base_channels}-channel one)")
            break
        width //= 2
    return fits


# ----------------------------------------------------------------------------------------------------------- time
def probe_step_seconds(cfg: TrainConfig, place: Placement, batch: int) -> tuple[float, int]:
    """(estimated seconds of one training step of ``batch`` images, the probe's side): forward and backward passes
    of 1 and of ``PROBE_BATCH`` images of at most ``PROBE_SIZE`` px (each the faster of two), extended along the line
    through them to the run's pixels per step. (Scaling one small pass up instead overestimates 2-5x: a small pass
    uses the CPU less well.) The probe's model is its own and draws no random numbers from the run's generators."""
    side = min(cfg.image_size, PROBE_SIZE)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg).to(place.device).train()
        if place.channels_last:
            model = model.to(memory_format=torch.channels_last)
        seconds = {n: _pass_seconds(model, place, n, cfg.img_ch, side) for n in (1, PROBE_BATCH)}
    per_image = (seconds[PROBE_BATCH] - seconds[1]) / (PROBE_BATCH - 1)
    images = batch * (cfg.image_size / side) ** 2  # the step's pixels, in probe images
    return max(seconds[1], seconds[1] + per_image * (images - 1)), side


def _pass_seconds(model, place: Placement, n: int, channels: int, side: int) -> float:
    x = torch.randn(n, channels, side, side, device=place.device)
    if place.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    best = math.inf
    for _ in range(2):  # the first pass at a shape also creates the kernels' primitives
        start = time.perf_counter()
        with place.precision.autocast():
            out = model(x)
        out.float().mean().backward()
        best = min(best, time.perf_counter() - start)
    return best


def say_step_time(cfg: TrainConfig, place: Placement, batch: int, steps_per_epoch: int, epochs_left: int,
                  log) -> float:
    """On a CPU: one line with the expected time of a step, an epoch and the run (from ``probe_step_seconds``), and
    when the run is long, how to make it shorter. Returns the seconds of a step."""
    step_s, side = probe_step_seconds(cfg, place, batch)
    epoch_s = step_s * steps_per_epoch

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'s' if n != 1 else ''}"

    log(f"time: a step of {plural(batch, 'image')} takes about {step_s:.2g} s on this CPU (probed at {side}x{side}), "
        f"an epoch of {plural(steps_per_epoch, 'step')} about {duration(epoch_s)}, {plural(epochs_left, 'epoch')} "
        f"about {duration(epoch_s * epochs_left)} (validation aside)")
    if epoch_s * epochs_left > LONG_RUN_S and cfg.base_channels > defaults.PRESETS["laptop"]["base_channels"]:
        log("note: that is a long run for a CPU; a smaller network trains many times faster: --preset laptop "
            "(README, 'Training on a CPU'), or a GPU")
    return step_s
