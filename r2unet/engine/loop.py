"""The loops of training and scoring: one training step, one epoch, one pass of evaluation, a sample grid.

``train`` (``trainer.py``), ``bench train`` and ``evaluate`` run these same functions. Loss, metric counts and the
non-finite checks stay on the device between log points.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.augment import MEAN, STD
from ..errors import TrainingError
from ..models import create_model
from . import distributed as D
from . import plots
from .config import TrainConfig
from .metrics import Accumulator
from .runtime import CompileWithFallback, Precision, place_model, skip_nonfinite_step, synchronize
from .task import task_of


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """``exc`` if it is an interrupt, else the interrupt it was raised from (None if none): a signal that lands
    inside a module's first import surfaces as an ImportError ("initialization failed") raised from it."""
    while exc is not None and not isinstance(exc, KeyboardInterrupt):
        exc = exc.__cause__ or exc.__context__
    return exc


# ------------------------------------------------------------------------------------------------- model and step
def build_model(cfg: TrainConfig) -> nn.Module:
    """The network the settings describe, with the outputs its task needs (one per class of label maps)."""
    return create_model(cfg.model_type, img_ch=cfg.img_ch, output_ch=task_of(cfg).channels, t=cfg.t,
                        base_channels=cfg.base_channels, step_stats=cfg.step_stats)


def build_training(cfg: TrainConfig, device: torch.device, precision: Precision, lr: float, channels_last: bool,
                   sync_bn: bool = False):
    """The model on its device, the optimiser and the loss scaler, as ``train`` uses them (and ``bench train``)."""
    model = build_model(cfg)
    if sync_bn:
        model = D.convert_sync_batchnorm(model, device.type)
    place_model(model, device, channels_last)
    # Fused Adam: one kernel for all parameters (CUDA and CPU); same arithmetic as the reference's Adam.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    init_scale = 2.0**16 if cfg.loss_scale == "dynamic" else float(cfg.loss_scale)
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=precision.dtype == torch.float16)
    return model, optimizer, scaler


def lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """The reference's schedule: constant, then linear decay over the last ``num_epochs_decay`` epochs (by
    lr / num_epochs_decay after each of them). ``epoch`` is 0-based; the value applies during that epoch."""
    if cfg.num_epochs_decay == 0:
        return 1.0
    done_decay = max(0, epoch - (cfg.num_epochs - cfg.num_epochs_decay))
    return max(0.0, 1.0 - done_decay / cfg.num_epochs_decay)


class StepBuffers:
    """Device scalars a step reuses instead of making them every step: the non-finite flag and the unit scale of
    the finiteness check."""

    def __init__(self, device: torch.device):
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.unit_scale = torch.ones((), dtype=torch.float32, device=device)


def train_step(model, x, y, precision: Precision, scaler, optimizer, buffers: StepBuffers | None, loss_fn):
    """One optimisation step: forward, ``loss_fn(logits, y)``, backward, and the optimiser's update unless a
    gradient is non-finite (fp16: the GradScaler decides; otherwise a fused check on the device). Returns the
    logits, the loss and a device bool: the step was taken with a finite loss. No host synchronisation. ``buffers``
    None: a plain ``optimizer.step()`` with no check (the reference's step, ``bench train``'s baseline)."""
    logits, loss = _forward_backward(model, x, y, precision, scaler, optimizer, loss_fn)
    finite = torch.isfinite(loss)
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif buffers is None:
        optimizer.step()
    else:
        finite = finite & skip_nonfinite_step(optimizer, buffers.found_inf, buffers.unit_scale)
    return logits, loss, finite


def _forward_backward(model, x, y, precision: Precision, scaler, optimizer, loss_fn):
    """Forward, loss and backward (scaled for fp16). torch.compile lowers the backward lazily, at the first
    ``backward()``: if that fails, a ``CompileWithFallback`` model falls back to eager and the step is redone."""
    for attempt in (1, 2):
        with precision.autocast():
            logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        try:
            scaler.scale(loss).backward()  # a disabled scaler returns the loss as it is
        except Exception as exc:
            if attempt == 2 or not (isinstance(model, CompileWithFallback) and model.backward_failed(exc)):
                raise
            continue
        if isinstance(model, CompileWithFallback):
            model.backward_succeeded()
        return logits, loss
    raise AssertionError("unreachable")


class BufferSnapshot:
    """The model's buffers (BatchNorm running statistics and counts) as they were before a step, kept in one flat
    tensor per dtype so that taking, restoring and choosing cost a few kernels, not one per buffer."""

    def __init__(self, model: nn.Module):
        self.groups = []  # (the model's buffers of one dtype, a flat copy, views of that copy shaped like them)
        for dtype in dict.fromkeys(b.dtype for b in model.buffers()):
            live = [b for b in model.buffers() if b.dtype == dtype]
            flat = torch.cat([b.detach().reshape(-1) for b in live])
            self.groups.append((live, flat, _views(flat, live)))

    def take(self) -> None:
        for live, _, saved in self.groups:
            torch._foreach_copy_(saved, live)

    def restore(self) -> None:
        for live, _, saved in self.groups:
            torch._foreach_copy_(live, saved)

    def keep_if(self, ok: torch.Tensor) -> None:
        """Keep the step's changes where the device bool ``ok`` is set, else go back to the snapshot (decided on the
        device: a NaN forward pass leaves no NaN/Inf in the running statistics, and no host synchronisation)."""
        for live, flat, _ in self.groups:
            chosen = torch.where(ok, torch.cat([b.detach().reshape(-1) for b in live]), flat)
            torch._foreach_copy_(live, _views(chosen, live))


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut into views shaped like the tensors ``like`` (laid end to end)."""
    return [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in like]), like)]


# -------------------------------------------------------------------------------------------------------- an epoch
@dataclass
class EpochState:
    """What one epoch has done so far; what survives an interruption mid-epoch goes into ``last.pt``."""

    epoch: int  # 0-based
    steps: int = 0  # steps done in this epoch, including those before a resume
    images: int = 0  # images trained in this epoch, including those before a resume
    loss_sum: float = 0.0  # sum of finite step losses, on the host
    loss_device: torch.Tensor | None = None  # the part of the sum still on the device (during the loop)
    skipped: int = 0  # steps skipped for a NaN/Inf loss or gradient, on the host
    skipped_device: torch.Tensor | None = None  # the part of that count still on the device (during the loop)
    in_step: bool = False  # inside a step: an interruption redoes it on resume
    augment_rng: torch.Tensor | None = None  # the augmentation RNG before the current step
    train_metrics: Accumulator | None = None  # training-batch scores (after augmentation)
    steady_images: int = 0  # images and seconds of the steps after the warm-up (throughput)
    steady_seconds: float = 0.0
    buffers_before_step: BufferSnapshot | None = None  # the model's buffers (BatchNorm statistics) before the step
    nonfinite_run: torch.Tensor | None = None  # consecutive non-finite steps, on the device, across epochs

    def carried(self) -> dict:
        """What a checkpoint written inside the epoch carries, to finish the epoch's statistics after a resume."""
        on_device = self.loss_device is not None
        return {"epoch_state": {"images": self.images,
                                "loss_sum": self.loss_sum + (float(self.loss_device.item()) if on_device else 0.0),
                                "skipped": self.skipped + (int(self.skipped_device.item()) if on_device else 0)}}


class SteadyClock:
    """Times the steps after a warm-up: the first ``warmup`` steps of a loop carry compilation and start-up."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.start: float | None = None
        self.images = self.steps = 0

    def before_step(self) -> None:
        if self.start is None and self.steps >= self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def after_step(self, images: int) -> None:
        self.steps += 1
        if self.start is not None:
            self.images += images

    def stop(self) -> tuple[int, float]:
        """(images, seconds) of the steady part; waits for the device."""
        synchronize(self.device)
        return self.images, (time.perf_counter() - self.start if self.start is not None else 0.0)


def _warmup_steps(loader, cfg: TrainConfig, steps_done: int) -> int:
    """``cfg.warmup_steps``, or in an epoch of no more steps than that, 1 (all but the first step are timed)."""
    try:
        steps_here = len(loader)
    except TypeError:  # an iterable without a length
        return cfg.warmup_steps
    if cfg.max_steps_per_epoch:
        steps_here = min(steps_here, cfg.max_steps_per_epoch - steps_done)
    return cfg.warmup_steps if steps_here > cfg.warmup_steps else min(1, max(0, steps_here - 1))


class EpochRun:
    """One epoch of training, step by step: iterating it runs the steps over ``loader`` and yields the epoch's
    ``state`` after each, so the caller decides what happens between steps (``train`` saves mid-epoch there). The
    loop owns the state and is the only one writing it; the caller reads it, also after an interruption.

    ``steps_done``, ``carried``: where a resumed epoch starts (its steps, and ``EpochState.carried()`` of the
    checkpoint); ``nonfinite_run``: the count of non-finite steps in a row, carried across epochs. The host syncs
    only at log points (``cfg.log_every``, and the epoch's first step, so that a slow run shows its pace early),
    where a run of ``cfg.max_nonfinite_steps`` non-finite steps stops training. When the steps are done, the state
    holds the epoch's loss sum, skipped steps and steady-state images and seconds (the steps after
    ``cfg.warmup_steps``)."""

    def __init__(self, model, loader, transform, optimizer, scaler, precision: Precision, cfg: TrainConfig, task,
                 epoch: int, *, steps_done: int = 0, carried: dict | None = None, nonfinite_run=None,
                 progress=None, channels_last: bool = False, after_step=None):
        self.model, self.loader, self.transform, self.optimizer = model, loader, transform, optimizer
        self.after_step = after_step
        self.scaler, self.precision, self.cfg, self.task = scaler, precision, cfg, task
        self.progress, self.channels_last = progress, channels_last
        device = precision.device
        self.state = EpochState(epoch, steps=steps_done, nonfinite_run=nonfinite_run,
                                train_metrics=task.accumulator(cfg.threshold, device))
        if carried:
            self.state.images, self.state.loss_sum, self.state.skipped = (carried.get(k, 0) for k in
                                                                          ("images", "loss_sum", "skipped"))
        if self.state.nonfinite_run is None:
            self.state.nonfinite_run = torch.zeros((), dtype=torch.int64, device=device)

    def __iter__(self) -> Iterator[EpochState]:
        model, cfg, state, transform = self.model, self.cfg, self.state, self.transform
        model.train()
        device = self.precision.device
        state.loss_device = torch.zeros((), dtype=torch.float64, device=device)  # read by mid-epoch checkpoints
        state.skipped_device = torch.zeros((), dtype=torch.int64, device=device)
        buffers, clock = StepBuffers(device), SteadyClock(device, _warmup_steps(self.loader, cfg, state.steps))
        state.buffers_before_step = snapshot = BufferSnapshot(model)
        first = state.steps + 1  # reported as soon as it is done: on a CPU a step can take minutes

        def loss_fn(logits, y):
            return self.task.loss(logits, y, cfg.loss, cfg.focal_gamma, cfg.tversky_alpha, cfg.tversky_beta)

        for batch in self.loader:
            clock.before_step()
            # what the step changes besides the weights, as it was before it: a checkpoint written inside the step
            # resumes with this batch's augmentation and without the BatchNorm updates of its interrupted forward
            state.augment_rng, state.in_step = transform.generator.get_state(), True
            snapshot.take()
            x, y = transform(batch)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits, loss, finite = train_step(model, x, y, self.precision, self.scaler, self.optimizer, buffers,
                                              loss_fn)
            state.steps, state.in_step, state.images = state.steps + 1, False, state.images + x.shape[0]
            snapshot.keep_if(finite)  # a skipped step leaves no trace: neither in the weights nor in the statistics
            if self.after_step is not None:  # e.g. the moving average of the weights
                self.after_step()
            state.loss_device += torch.where(finite, loss.detach().double(), 0.0)
            state.skipped_device += (~finite).long()
            state.train_metrics.update(self.task.probabilities(logits.detach()), y)
            state.nonfinite_run = torch.where(finite, 0, state.nonfinite_run + 1)
            clock.after_step(x.shape[0])
            if state.steps % cfg.log_every == 0 or state.steps == first:
                _check_nonfinite(int(state.nonfinite_run.item()), cfg, state)
                if self.progress is not None:
                    self.progress(state, float(loss.detach()))
            yield state
            if cfg.max_steps_per_epoch and state.steps >= cfg.max_steps_per_epoch:
                break
        images, seconds = clock.stop()
        _check_nonfinite(int(state.nonfinite_run.item()), cfg, state)  # epochs shorter than --log_every too
        state.loss_sum += float(state.loss_device.item())
        state.skipped += int(state.skipped_device.item())
        state.loss_device = state.skipped_device = None
        state.steady_images += images
        state.steady_seconds += seconds


def train_one_epoch(model, loader, transform, optimizer, scaler, precision: Precision, cfg: TrainConfig, task,
                    epoch: int = 0, **options) -> EpochState:
    """An ``EpochRun`` run to its end, with nothing between the steps; its state."""
    run = EpochRun(model, loader, transform, optimizer, scaler, precision, cfg, task, epoch, **options)
    for _ in run:
        pass
    return run.state


def _check_nonfinite(bad: int, cfg: TrainConfig, state: EpochState) -> None:
    if bad >= cfg.max_nonfinite_steps:
        raise TrainingError(f"loss was NaN/Inf for {bad} consecutive steps (epoch {state.epoch + 1}, step "
                            f"{state.steps}); stopping. The last good checkpoint is kept; try a lower --lr, --amp "
                            "off, or --detect_anomaly to find the operation")


class JobThroughput:
    """The whole job's images/s over the run: images summed over processes / the slowest process's steady time."""

    def __init__(self):
        self.images = self.seconds = 0.0

    def add_epoch(self, state: EpochState, images_here: int, epoch_s: float,
                  device: torch.device) -> tuple[float, float]:
        """Add one epoch (``images_here``: trained in this session); return its images/s and the slowest process's
        time for it."""
        stats = torch.tensor([state.steady_images, images_here], dtype=torch.float64, device=device)
        D.all_reduce_sum(stats)
        slow = D.all_reduce_max(torch.tensor([state.steady_seconds, epoch_s], dtype=torch.float64, device=device))
        steady_images, images = stats.tolist()
        steady_s, epoch_s = slow.tolist()
        if steady_s <= 0:  # too few steps for a steady state: count the whole epoch
            steady_images, steady_s = images, (epoch_s if images else 0.0)
        self.images += steady_images
        self.seconds += steady_s
        return (steady_images / steady_s if steady_s > 0 else 0.0), epoch_s

    @property
    def fps(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


# --------------------------------------------------------------------------------------- BatchNorm statistics
def precise_bn_batches(n_images: int, batch_size: int, num_batches: int, seed: int,
                       info: D.DistInfo) -> list[list[int]]:
    """This process's share of the fixed training batches that ``recompute_batchnorm`` runs: ``num_batches`` full
    batches of a seeded order of the training images (the same every epoch, so epochs differ by their weights
    only), as many for each process (``rank, rank + world, ...``): the batches of a 1-process run, spread."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n_images - batch_size + 1, batch_size)][:num_batches]
    usable = len(batches) - len(batches) % info.world_size  # as many forward passes per process (SyncBatchNorm)
    return batches[info.rank:usable:info.world_size]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader, transform, precision: Precision,
                        channels_last: bool = False) -> int:
    """Precise BatchNorm: the running statistics recomputed for the weights as they are now, as the plain average
    of the batch statistics over ``loader``'s batches (training mode, no gradient), instead of the momentum-0.1
    averages that training leaves, which lag the weights by several steps and, in R2U-Net's recurrent blocks (one
    BatchNorm applied t + 1 times per forward), mix steps of different inputs. Across processes each statistic is
    averaged over every process's calls; a BatchNorm no forward pass calls (the shared one of a network with
    statistics per recurrence step) keeps what it had. Returns the number of forward passes here."""
    norms = batchnorms(model)
    if not norms:
        return 0
    momenta, was_training = [bn.momentum for bn in norms], model.training
    before = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calls
    model.train()
    passes = 0
    try:
        for batch in loader:
            x, _ = transform(batch)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                model(x)
            passes += 1
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)
    if D.world_size() > 1:  # weighted by each process's calls: the average over all of them
        calls = torch.stack([bn.num_batches_tracked for bn in norms]).to(torch.float64)
        sums = [t.double() * n for bn, n in zip(norms, calls) for t in (bn.running_mean, bn.running_var)]
        D.all_reduce_sum(calls)
        for t in sums:
            D.all_reduce_sum(t)
        for k, bn in enumerate(norms):
            bn.running_mean.copy_(sums[2 * k] / calls[k].clamp_min(1))
            bn.running_var.copy_(sums[2 * k + 1] / calls[k].clamp_min(1))
            bn.num_batches_tracked.fill_(int(calls[k]))
    for bn, (mean, var, count) in zip(norms, before):
        if int(bn.num_batches_tracked) == 0:  # not called: its statistics are not these weights' to replace
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
    return passes


# ------------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model, loader, transform, precision: Precision, task, threshold: float = 0.5,
             channels_last: bool = False, progress: str | None = None, keep_per_image: bool = False,
             accumulator=None):
    """Accumulate ``task``'s scores over ``loader`` on the device; all-reduced across processes (shards are
    disjoint). ``progress``: a description to show a progress bar under (None: no bar); ``keep_per_image``: see
    ``Accumulator.per_image``; ``accumulator``: what to feed instead of the task's (e.g. ``metrics.Accumulators``
    for a threshold sweep); it is returned."""
    model.eval()
    acc = accumulator if accumulator is not None else task.accumulator(threshold, precision.device, keep_per_image)
    if progress is not None:
        loader = tqdm(loader, desc=progress, unit="batch", leave=False, dynamic_ncols=True)
    for batch in loader:
        x, y = transform(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            logits = model(x)
        acc.update(task.probabilities(logits), y)
    acc.all_reduce()
    return acc


class _Kept:
    """An accumulator's stand-in for ``evaluate``'s loop that keeps every image's prediction and ground truth."""

    def __init__(self, task):
        self.task, self.predictions, self.truths = task, [], []

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        for p, t in zip(probs, target):
            self.predictions.append(self.task.from_probabilities(p[None]).cpu().numpy())
            self.truths.append(self.task.truth(t))

    def all_reduce(self) -> None:  # each process keeps its own images
        pass


def predictions_and_truths(model, loader, transform, precision: Precision, task,
                           channels_last: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every image's prediction at the network's size (``task.from_probabilities``: probabilities (H, W) float32 of
    a binary mask, the class map of label maps) and its ground truth (H, W), on the host, in ``loader``'s order: what
    the postprocessing is chosen on (``postprocess.choose``). ``evaluate``'s loop, keeping instead of scoring."""
    kept = evaluate(model, loader, transform, precision, task, channels_last=channels_last, accumulator=_Kept(task))
    return kept.predictions, kept.truths


@torch.no_grad()
def draw_samples(model, cache, indices, transform, precision, task, threshold: float, out, title, row_titles=None):
    """Grid of image | ground truth | prediction for the cache's images at ``indices`` (``task.sample_panels``)."""
    images, masks = cache.batch(indices)
    batch = {"images": torch.from_numpy(np.ascontiguousarray(images)),
             "masks": torch.from_numpy(np.ascontiguousarray(masks))}
    x, y = transform(batch)
    model.eval()
    with precision.autocast():
        probs = task.probabilities(model(x))
    rgb = x if x.shape[1] == 3 else x.expand(-1, 3, -1, -1)
    images = ((rgb * STD + MEAN).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    rows = [task.sample_panels(images[i], y[i], probs[i], threshold, row_titles[i] if row_titles else None)
            for i in range(len(images))]
    return plots.sample_grid(rows, out, title)
