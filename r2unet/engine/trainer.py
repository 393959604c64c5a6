"""Training and evaluation: ``fit`` (the main job), ``train_one_epoch`` and ``evaluate`` (using a trained model:
``inference.py``).

The trainer is the only place that decides devices, precision, compilation and distribution.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import plots
from .. import progress as progress_lines
from ..data.augment import MEAN, STD, AugmentConfig
from ..data.dataset import DeviceTransform, make_loader, open_split_cache, require_split, split_cache
from ..fileio import FolderLock, atomic_write, atomic_write_text
from ..messages import first_line
from ..metrics import METRIC_NAMES, MetricAccumulator, per_image_spread
from ..models import RECURRENT, create_model
from . import distributed as D
from .checkpoint import CheckpointError, load_file, load_weights, model_state, save_checkpoint
from .config import ConfigError, TrainConfig
from .runtime import (
    CompileWithFallback,
    Precision,
    configure_backends,
    describe_device,
    place_model,
    resolve_amp,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    skip_nonfinite_step,
    synchronize,
)

SPLITS = ("train", "valid", "test")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says where and what was kept."""


# ----------------------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """The reference's schedule: constant, then linear decay over the last ``num_epochs_decay`` epochs (by
    lr / num_epochs_decay after each of them). ``epoch`` is 0-based; the value applies during that epoch."""
    if cfg.num_epochs_decay == 0:
        return 1.0
    done_decay = max(0, epoch - (cfg.num_epochs - cfg.num_epochs_decay))
    return max(0.0, 1.0 - done_decay / cfg.num_epochs_decay)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, dice: bool) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    if dice:
        probs = torch.sigmoid(logits.float()).flatten(1)
        t = target.flatten(1)
        loss = loss + (1 - (2 * (probs * t).sum(1) + 1) / (probs.sum(1) + t.sum(1) + 1)).mean()
    return loss


# ------------------------------------------------------------------------------------------------------- train/eval
def train_one_epoch(model, loader, transform, optimizer, scaler, precision: Precision, cfg: TrainConfig,
                    state: dict, on_step=None, progress=None, channels_last: bool = False) -> dict:
    """One pass over ``loader``. Loss and non-finite counts stay on the device; the host syncs only at log points.

    ``state`` carries what survives an interruption mid-epoch: ``loss_sum``, ``steps``, ``images``.
    Returns the epoch's mean loss and steady-state throughput (steps after ``cfg.warmup_steps``; in an epoch of no
    more steps than that, all but the first, which carries compilation and start-up)."""
    model.train()
    device = precision.device
    warmup = cfg.warmup_steps
    steps_here = _len_or_none(loader)
    if steps_here is not None:
        if cfg.max_steps_per_epoch:
            steps_here = min(steps_here, cfg.max_steps_per_epoch - state["steps"])
        if steps_here <= warmup:  # too short for the full warm-up: leave out only the first step
            warmup = min(1, max(0, steps_here - 1))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    state["loss_device"] = loss_sum  # updated in place; read by checkpoints written mid-epoch
    # training-batch metrics (after augmentation), accumulated on the device like the reference's per-step scores
    metrics = state.setdefault("train_metrics", MetricAccumulator(threshold=cfg.threshold, device=device))
    nonfinite_run = torch.zeros((), dtype=torch.int64, device=device)
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    unit_scale = torch.ones((), dtype=torch.float32, device=device)  # made once, not every step
    steady_images, steady_start, steps_this_call = 0, None, 0
    for batch in loader:
        if steady_start is None and steps_this_call >= warmup:
            synchronize(device)
            steady_start = time.perf_counter()
        # the augmentation RNG as it was before this batch: a checkpoint written before the step completes
        # resumes with exactly this batch's augmentation
        state["augment_rng"] = transform.generator.get_state()
        state["in_step"] = True
        x, y = transform(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits, loss = _forward_backward(model, x, y, precision, scaler, optimizer, cfg.loss == "dice_bce")
        finite = torch.isfinite(loss)
        if scaler.is_enabled():  # fp16: the scaler skips steps with inf/NaN gradients by itself
            scaler.step(optimizer)
            scaler.update()
        else:
            finite = finite & skip_nonfinite_step(optimizer, found_inf, unit_scale)
        state["steps"] += 1
        state["in_step"] = False
        loss_sum += torch.where(finite, loss.detach().double(), 0.0)
        metrics.update(torch.sigmoid(logits.detach().float()), y)
        nonfinite_run = torch.where(finite, 0, nonfinite_run + 1)
        steps_this_call += 1
        state["images"] += x.shape[0]
        if steady_start is not None:
            steady_images += x.shape[0]
        if state["steps"] % cfg.log_every == 0:
            bad = int(nonfinite_run.item())
            if bad >= cfg.max_nonfinite_steps:
                raise TrainingError(f"loss was NaN/Inf for {bad} consecutive steps (epoch {state['epoch'] + 1}, "
                                    f"step {state['steps']}); stopping. The last good checkpoint is kept; try a "
                                    "lower --lr, --amp off, or --detect_anomaly to find the operation")
            if progress is not None:
                progress(state, float(loss.detach()))
        if on_step is not None:
            on_step(state)
        if cfg.max_steps_per_epoch and state["steps"] >= cfg.max_steps_per_epoch:
            break
    synchronize(device)
    end = time.perf_counter()
    state["loss_sum"] = state.get("loss_sum", 0.0) + float(state.pop("loss_device").item())
    state["steady_images"] = state.get("steady_images", 0) + steady_images
    state["steady_seconds"] = state.get("steady_seconds", 0.0) + (end - steady_start if steady_start else 0.0)
    return state


def _len_or_none(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length
        return None


def _forward_backward(model, x, y, precision: Precision, scaler, optimizer, dice: bool):
    """Forward, loss and backward (scaled for fp16). torch.compile lowers the backward lazily, at the first
    ``backward()``: if that fails, a ``CompileWithFallback`` model falls back to eager and the step is redone."""
    for attempt in (1, 2):
        with precision.autocast():
            logits = model(x)
        loss = bce_dice_loss(logits, y, dice)
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


@torch.no_grad()
def evaluate(model, loader, transform, precision: Precision, threshold: float = 0.5,
             channels_last: bool = False, progress: str | None = None,
             keep_per_image: bool = False, accumulator=None) -> MetricAccumulator:
    """Accumulate metrics over ``loader`` on the device; all-reduced across processes (shards are disjoint).
    ``progress``: a description to show a progress bar under (None: no bar); ``keep_per_image``: see
    ``MetricAccumulator.per_image``; ``accumulator``: what to feed instead of a new ``MetricAccumulator`` (e.g.
    ``metrics.Accumulators`` for a threshold sweep); it is returned."""
    model.eval()
    acc = accumulator if accumulator is not None else MetricAccumulator(
        threshold=threshold, device=precision.device, keep_per_image=keep_per_image)
    if progress is not None:
        from tqdm import tqdm

        loader = tqdm(loader, desc=progress, unit="batch", leave=False, dynamic_ncols=True)
    for batch in loader:
        x, y = transform(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            logits = model(x)
        acc.update(torch.sigmoid(logits.float()), y)
    acc.all_reduce()
    return acc


# ---------------------------------------------------------------------------------------------------------- the job
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


def _log_fn(info: D.DistInfo, log):
    return log if info.is_main else (lambda *a, **k: None)


def build_model(cfg: TrainConfig) -> nn.Module:
    return create_model(cfg.model_type, img_ch=cfg.img_ch, output_ch=cfg.output_ch, t=cfg.t,
                        base_channels=cfg.base_channels)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (save, then exit). A subclass on purpose: CPython kills itself with SIGINT at
    exit when a *plain* KeyboardInterrupt passed through certain C-level frames, even if it was caught later."""


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


def _terminate_as_interrupt(signum, frame):
    raise Terminated(f"signal {signum}")


# settings that name this machine's folders and devices: each process keeps its own
NODE_LOCAL = ("output_dir", "data_path", "cache_dir", "device", "device_index")


def fit(cfg: TrainConfig, log=print, return_model: bool = False):
    """Train as configured; return the results (also written to ``results.json``), and with ``return_model`` the
    trained model of this process too (the best checkpoint's weights)."""
    cfg.validate()
    probe = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) \
        else "cpu"
    info = D.init_distributed(probe, timeout_s=cfg.dist_timeout_s)
    try:
        if info.distributed:  # one run: rank 0's settings everywhere (on --resume, those of its last.pt)
            own = cfg.to_dict()
            cfg = TrainConfig.from_dict({**D.broadcast_object(own), **{k: own[k] for k in NODE_LOCAL}})
        # one training per run folder: a second 'train' into it (say the same command in another terminal, before
        # the first has written last.pt) is refused instead of both writing the same files
        lock = FolderLock(cfg.output_dir) if info.is_main else None
        problem = D.broadcast_object(lock.acquire() if lock else None)
        if problem:
            raise ConfigError(f"--output_dir: {problem}")
        try:
            results, model = _fit(cfg, info, _log_fn(info, log))
        finally:
            if lock:
                lock.release()
        return (results, model) if return_model else results
    except RuntimeError as exc:
        if not info.distributed or isinstance(exc, (TrainingError, CheckpointError)):
            raise
        # A collective failed: usually another process crashed, was killed, or stalled past --dist_timeout_s.
        first = first_line(exc, 300) or type(exc).__name__
        raise TrainingError(
            f"process {info.rank} of {info.world_size} stopped: {first}. If another process crashed or was killed, "
            f"see its log; the last checkpoint in {Path(cfg.output_dir) / 'checkpoints'} is kept, continue with "
            "--resume (any number of processes)") from exc
    finally:
        D.cleanup()


def _fit(cfg: TrainConfig, info: D.DistInfo, log) -> tuple[dict, nn.Module]:
    run = RunFiles(cfg.output_dir)
    device = resolve_device(cfg.device, cfg.device_index, info.local_rank if info.distributed else None)
    precision, precision_note = resolve_amp(cfg.amp, device)
    use_compile = resolve_compile(cfg.compile, device)
    channels_last = resolve_channels_last(cfg.channels_last, precision, cfg.base_channels)

    # Batch semantics: --batch_size is per process; --global_batch_size is divided among processes.
    if cfg.global_batch_size is not None:
        if cfg.global_batch_size % info.world_size:
            raise ConfigError(f"--global_batch_size {cfg.global_batch_size} is not divisible by the "
                              f"{info.world_size} processes")
        cfg.batch_size = cfg.global_batch_size // info.world_size
    global_batch = cfg.batch_size * info.world_size
    lr = cfg.lr * (global_batch / (cfg.lr_batch_size or cfg.batch_size)) if cfg.scale_lr else cfg.lr

    # Rank 0 writes the run folder and is the only one that must be able to read it (nodes need not share a disk).
    has_run = D.broadcast_object(run.last.exists())
    if not cfg.resume and has_run:
        raise ConfigError(f"--output_dir: {run.dir} already holds a run (checkpoints/last.pt); pass --resume to "
                          "continue it or choose another --output_dir (nothing was deleted)")
    if cfg.resume and not has_run:
        raise ConfigError(f"--resume: no checkpoint at {run.last}")
    data_path = Path(cfg.data_path)
    for split in SPLITS:  # all three before any work
        require_split(data_path, split)

    seed_everything(cfg.seed + info.rank)
    configure_backends(device, cfg.deterministic)
    if cfg.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)

    # Data: rank 0 builds/updates the caches first; then the first process of every other node validates them (a
    # no-op on a shared file system, a build on a node-local one); then every process opens them.
    def build():
        return {s: split_cache(data_path, s, cfg.image_size, cache_dir=cfg.cache_dir,
                               num_workers=cfg.num_workers or None, skip_bad=cfg.skip_bad,
                               progress=sys.stderr.isatty() and info.is_main, log=log) for s in SPLITS}

    caches = build() if info.is_main else {}
    D.barrier()
    if info.local_rank == 0 and not info.is_main:
        caches = build()
    D.barrier()
    if not caches:
        caches = {s: open_split_cache(data_path, s, cfg.image_size, cfg.cache_dir) for s in SPLITS}
    pin = device.type == "cuda"
    train_sampler = D.EpochBatchSampler(len(caches["train"]), cfg.batch_size, info, cfg.seed)
    if len(train_sampler) == 0:
        raise ConfigError(f"--batch_size {cfg.batch_size}: larger than this process's share of the "
                          f"{len(caches['train'])} training images")
    shards = {s: D.ShardSampler(len(caches[s]), info) for s in ("valid", "test")}  # disjoint, in rank order
    loaders = {
        "train": make_loader(caches["train"], cfg.batch_size, train=True, batch_sampler=train_sampler,
                             num_workers=cfg.num_workers, pin_memory=pin),
        **{s: make_loader(caches[s], cfg.batch_size, train=False, sampler=shards[s], num_workers=0,
                          pin_memory=pin, drop_last=False) for s in ("valid", "test")},
    }
    augment = DeviceTransform(cfg.image_size, device, AugmentConfig(augmentation_prob=cfg.augmentation_prob),
                              seed=cfg.seed + 7919 * info.rank, img_ch=cfg.img_ch)
    plain = DeviceTransform(cfg.image_size, device, None, img_ch=cfg.img_ch)

    # Model, optimiser, precision.
    model, optimizer, scaler = build_training(cfg, device, precision, lr, channels_last,
                                              sync_bn=cfg.sync_bn and info.distributed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))

    start_epoch, start_step, best_score, best_epoch = 0, 0, float("-inf"), -1
    epoch_state_carry: dict = {}
    if cfg.resume:
        ckpt = _load_on_rank0(run.last, info)
        load_weights(model, model_state(ckpt), str(run.last))
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = ckpt["epoch"], ckpt.get("step", 0)
        best_score, best_epoch = ckpt["best_score"], ckpt["best_epoch"]
        rng = ckpt.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "augment" in rng and not info.distributed:
            augment.generator.set_state(rng["augment"])
        epoch_state_carry = ckpt.get("extra", {}).get("epoch_state", {}) if start_step else {}
        if start_epoch >= cfg.num_epochs:
            log(f"{run.last} has finished all {cfg.num_epochs} epochs: scoring best.pt on the test split again "
                f"(to train longer, pass --num_epochs N with N > {cfg.num_epochs})")
        else:
            log(f"resumed from {run.last}: epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""))
    for group in optimizer.param_groups:  # the decay schedule follows the (possibly extended) num_epochs
        group["lr"] = lr * lr_factor(start_epoch, cfg)

    bar = _progress(info, len(train_sampler), global_batch)
    log = _around_bars(log, bar)
    ddp_model = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = CompileWithFallback(ddp_model, log, cfg.compile_mode) if use_compile else ddp_model

    if info.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        run.ckpt_dir.mkdir(exist_ok=True)
        cfg.save(run.dir / "config.json")
        if cfg.resume and run.metrics.exists():  # drop rows of epochs the checkpoint does not cover
            rows = [r for r in plots.read_metrics(run.metrics) if r["epoch"] <= start_epoch]
            run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"{cfg.model_type} (t={cfg.t})" if cfg.model_type in RECURRENT else cfg.model_type
    compiled = ("on" + (f" ({cfg.compile_mode})" if cfg.compile_mode != "default" else "")) if use_compile else "off"
    log(f"{name} on {describe_device(device)}, {precision.name}, compile {compiled}, "
        f"channels_last {'on' if channels_last else 'off'}; {info.world_size} process(es) x batch {cfg.batch_size} "
        f"= global batch {global_batch}, lr {lr:g}; train/valid/test = "
        f"{len(caches['train'])}/{len(caches['valid'])}/{len(caches['test'])} images")
    if precision_note:
        log(precision_note)

    writer = None
    if cfg.tensorboard and info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'r2unet[tensorboard]'") \
                from None
        writer = SummaryWriter(str(run.dir / "tensorboard"))

    sample_idx = list(range(min(6, len(caches["valid"]))))
    epoch_state = {"epoch": start_epoch, "steps": 0, "images": 0, "loss_sum": 0.0}

    def save_last(epoch: int, step: int, extra: dict | None = None, augment_rng=None):
        if info.is_main:
            rng = {"torch": torch.get_rng_state(),
                   "augment": augment_rng if augment_rng is not None else augment.generator.get_state()}
            save_checkpoint(run.last, model=model, config=cfg.to_dict(), epoch=epoch, step=step,
                            optimizer=optimizer, scaler=scaler, scheduler=scheduler, best_score=best_score,
                            best_epoch=best_epoch, rng=rng, extra=extra)

    def mid_epoch(state) -> dict:
        """What a checkpoint written inside an epoch carries to finish that epoch's statistics after a resume."""
        device_part = float(state["loss_device"].item()) if "loss_device" in state else 0.0
        return {"epoch_state": {"images": state["images"], "loss_sum": state.get("loss_sum", 0.0) + device_part}}

    def on_step(state):
        if cfg.save_every_steps and state["steps"] % cfg.save_every_steps == 0:
            save_last(state["epoch"], state["steps"], mid_epoch(state))

    old_term = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if _main_thread() else None
    total_steady_images = total_steady_seconds = 0.0
    session_start = time.perf_counter()  # for the run's ETA: wall time per epoch in this session, all included
    last_train = None  # training-batch metrics of the last epoch run in this session
    results: dict = {}
    try:
        for epoch in range(start_epoch, cfg.num_epochs):
            skip = start_step if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch, skip)
            epoch_state = {"epoch": epoch, "steps": skip, "images": 0, "loss_sum": 0.0}
            if skip and epoch_state_carry:
                epoch_state.update({k: epoch_state_carry[k] for k in ("images", "loss_sum") if k in epoch_state_carry})
            t0 = time.perf_counter()
            if bar:
                bar.reset(total=len(train_sampler) + skip)
                bar.update(skip)
                bar.set_description(f"epoch {epoch + 1}/{cfg.num_epochs}")
            if bar:
                progress = lambda s, loss: (bar.update(cfg.log_every), bar.set_postfix(loss=f"{loss:.4f}"))  # noqa: E731
            else:  # no terminal (a batch job's log): a line now and then, so a long epoch is not silent
                progress = _LogLines(log, epoch, cfg.num_epochs, len(train_sampler) + skip, skip, global_batch)
            carried_images = epoch_state["images"]  # trained before a resume: not part of this session's time
            train_one_epoch(train_model, loaders["train"], augment, optimizer, scaler, precision, cfg, epoch_state,
                            on_step=on_step, progress=progress, channels_last=channels_last)
            epoch_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            # Whole-job throughput: images summed over processes / the slowest process's steady time.
            stats = torch.tensor([epoch_state["steady_images"], epoch_state["images"] - carried_images,
                                  epoch_state["loss_sum"], epoch_state["steps"]], dtype=torch.float64, device=device)
            D.all_reduce_sum(stats)
            slow = D.all_reduce_max(torch.tensor([epoch_state["steady_seconds"], time.perf_counter() - t0],
                                                 dtype=torch.float64, device=device))
            steady_images, images_here, loss_total, steps = stats.tolist()
            steady_s, epoch_s = slow.tolist()
            if steady_s <= 0:  # too few steps for a steady state: count the whole epoch
                steady_images, steady_s = images_here, (epoch_s if images_here else 0.0)
            total_steady_images += steady_images
            total_steady_seconds += steady_s
            epoch_fps = steady_images / steady_s if steady_s > 0 else 0.0
            train_loss = loss_total / max(1.0, steps)
            train_metrics = epoch_state.pop("train_metrics")
            train_metrics.all_reduce()
            # none when a resume landed after the epoch's last step (killed before the epoch-end save)
            train_scores = train_metrics.compute() if train_metrics.num_images else None
            row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": epoch_lr, "train_img_per_s": epoch_fps,
                   "epoch_seconds": epoch_s, "train": train_scores}
            last_train = row["train"] or last_train
            is_last = epoch + 1 == cfg.num_epochs
            if (epoch + 1) % cfg.eval_every == 0 or is_last:
                # eager: the compiled graph is for training mode at the training batch size; eval mode and a last
                # partial batch would each cost a recompilation. Every shard scored with the model best.pt keeps.
                D.broadcast_module(model, buffers_only=True)
                valid = evaluate(model, loaders["valid"], plain, precision, cfg.threshold, channels_last,
                                 "validation" if bar else None).compute() if len(caches["valid"]) else None
                row["valid"] = valid
                score = (valid["JS"] + valid["DC"]) if valid else float(epoch)  # no valid split: the latest
                if score > best_score:
                    best_score, best_epoch = score, epoch + 1
                    row["best"] = True
                    if info.is_main:
                        save_checkpoint(run.best, model=model, config=cfg.to_dict(), epoch=epoch + 1,
                                        best_score=best_score, best_epoch=best_epoch)
            if info.is_main:
                with open(run.metrics, "a") as f:
                    f.write(json.dumps(row) + "\n")
                per_epoch = (time.perf_counter() - session_start) / (epoch + 1 - start_epoch)
                _log_epoch(log, row, cfg.num_epochs, eta_s=per_epoch * (cfg.num_epochs - epoch - 1))
                if writer:
                    _tensorboard(writer, row)
                plots.plot_curves(plots.read_metrics(run.metrics), run.dir / "curves.png")
                if sample_idx and ((epoch + 1) % cfg.sample_every == 0 or is_last):
                    run.samples.mkdir(exist_ok=True)
                    draw_samples(model, caches["valid"], sample_idx, plain, precision, cfg,
                                 run.samples / f"epoch_{epoch + 1:03d}.png", f"epoch {epoch + 1}")
            save_last(epoch + 1, 0)
            D.barrier()
        if bar:
            bar.close()
        # Final scores: the best model on the *test* split. Rank 0 wrote best.pt; the others get its weights by
        # broadcast, so nodes without a shared file system score the same model.
        if info.is_main and run.best.exists():
            load_weights(model, model_state(load_file(run.best)), str(run.best))
        D.broadcast_module(model)
        test = test_spread = None
        if len(caches["test"]):
            test_acc = evaluate(model, loaders["test"], plain, precision, cfg.threshold, channels_last,
                                "test" if bar else None, keep_per_image=True)
            test = test_acc.compute()
            # every image's scores, from all shards: sd and a 95 % bootstrap interval per mean (error bars)
            rows = dict(zip(D.gather_lists(shards["test"].indices),
                            D.gather_lists(list(zip(*test_acc.per_image().values())))))
            rows = [rows[i] for i in sorted(rows)]  # the split's order: the same interval as a 1-process run
            test_spread = per_image_spread({k: [r[j] for r in rows] for j, k in enumerate(METRIC_NAMES)})
        if total_steady_seconds > 0:
            fps = total_steady_images / total_steady_seconds
        else:  # nothing trained in this session (a finished run resumed): keep what the training measured
            previous = _previous_results(run)
            fps, last_train = previous.get("fps"), previous.get("train")
        results = {"test": test, "test_spread": test_spread, "train": last_train, "best_epoch": best_epoch,
                   "best_valid_JS_plus_DC": best_score, "fps": fps,
                   "model_type": cfg.model_type, "t": cfg.t, "image_size": cfg.image_size,
                   "global_batch_size": global_batch, "world_size": info.world_size, "precision": precision.name,
                   "epochs": cfg.num_epochs, "device": str(device), "torch": str(torch.__version__)}
        if info.is_main:
            atomic_write_text(run.results, json.dumps(results, indent=2) + "\n")
            if sample_idx:
                final = run.samples / f"epoch_{cfg.num_epochs:03d}.png"
                if final.exists():
                    atomic_write(run.dir / "samples.png", lambda tmp: shutil.copyfile(final, tmp))
            if test:
                log(f"test (best epoch {best_epoch}): "
                    + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
                log("  95% CI of the means: " + "  ".join(
                    f"{k} {test_spread[k]['ci'][0]:.3f}-{test_spread[k]['ci'][1]:.3f}" for k in ("JS", "DC", "ACC")))
            if fps is not None:
                log(f"FPS: {fps:.2f}")
        return results, model
    except KeyboardInterrupt:
        if bar:
            bar.close()
        # interrupted inside a step: that step is redone on resume, with the augmentation it had drawn
        save_last(epoch_state["epoch"], epoch_state["steps"], mid_epoch(epoch_state),
                  epoch_state.get("augment_rng") if epoch_state.get("in_step") else None)
        log(f"interrupted: saved {run.last} (epoch {epoch_state['epoch'] + 1}, step {epoch_state['steps']}); "
            "continue with --resume")
        raise
    finally:
        if writer:
            writer.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _load_on_rank0(path: Path, info: D.DistInfo) -> dict:
    """The checkpoint at ``path`` as rank 0 reads it, on every process (a failure is raised everywhere)."""
    payload = None
    if info.is_main:
        try:
            payload = ("ok", load_file(path))
        except CheckpointError as exc:
            payload = ("error", str(exc))
    status, value = D.broadcast_object(payload)
    if status == "error":
        raise CheckpointError(value)
    return value


def _previous_results(run: RunFiles) -> dict:
    try:
        return json.loads(run.results.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _around_bars(log, bar):
    """``log`` that clears the progress bars (stderr) while it prints, so a message never lands inside a bar's line."""
    if bar is None:
        return log
    from tqdm import tqdm

    def write(*args, **kwargs):
        with tqdm.external_write_mode(file=sys.stderr):
            log(*args, **kwargs)

    return write


class _LogLines:
    """Progress inside an epoch without a terminal: at log points, one line at most every
    ``progress.LOG_INTERVAL_S`` (the interval of every other long loop's lines, see ``r2unet/progress.py``)."""

    def __init__(self, log, epoch: int, num_epochs: int, total_steps: int, first_step: int, images_per_step: int):
        self.log, self.epoch, self.num_epochs, self.total = log, epoch, num_epochs, total_steps
        self.first, self.images_per_step = first_step, images_per_step
        self.start = self.last = time.perf_counter()

    def __call__(self, state: dict, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last < progress_lines.LOG_INTERVAL_S:
            return
        self.last = now
        done = state["steps"] - self.first
        rate = done * self.images_per_step / max(now - self.start, 1e-9)
        left = (self.total - state["steps"]) * (now - self.start) / max(done, 1)
        self.log(f"  epoch {self.epoch + 1}/{self.num_epochs}  step {state['steps']}/{self.total}  loss {loss:.4f}  "
                 f"{rate:.1f} img/s  epoch ends in {progress_lines.duration(left)}")


def _progress(info: D.DistInfo, total: int, images_per_batch: int):
    """A tqdm bar counting batches but showing images and img/s (the whole job's), on a terminal only."""
    if not info.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", unit_scale=images_per_batch, dynamic_ncols=True, leave=False)


def _log_epoch(log, row: dict, num_epochs: int, eta_s: float = 0.0) -> None:
    msg = (f"epoch {row['epoch']}/{num_epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
           f"{row['train_img_per_s']:.1f} img/s")
    if row.get("valid"):
        v = row["valid"]
        msg += f"  valid JS {v['JS']:.4f} DC {v['DC']:.4f} ACC {v['ACC']:.4f}" + ("  (best)" if row.get("best") else "")
    if row["epoch"] < num_epochs:
        msg += f"  ETA {progress_lines.duration(eta_s)}"
    log(msg)


def _tensorboard(writer, row: dict) -> None:
    step = row["epoch"]
    writer.add_scalar("train/loss", row["train_loss"], step)
    writer.add_scalar("train/lr", row["lr"], step)
    writer.add_scalar("train/img_per_s", row["train_img_per_s"], step)
    for k, v in (row.get("valid") or {}).items():
        writer.add_scalar(f"valid/{k}", v, step)


@torch.no_grad()
def draw_samples(model, cache, indices, transform, precision, cfg, out, title, row_titles=None) -> Path:
    """Grid of image | ground truth | prediction for the cache's images at ``indices``."""
    images, masks = cache.batch(indices)
    batch = {"images": torch.from_numpy(np.ascontiguousarray(images)),
             "masks": torch.from_numpy(np.ascontiguousarray(masks))}
    x, y = transform(batch)
    model.eval()
    with precision.autocast():
        probs = torch.sigmoid(model(x).float())
    rgb = x if x.shape[1] == 3 else x.expand(-1, 3, -1, -1)
    images = ((rgb * STD + MEAN).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    return plots.sample_grid(images, (y[:, 0] > 0.5).cpu().numpy(), (probs[:, 0] > cfg.threshold).cpu().numpy(),
                             out, title, row_titles)


__all__ = ["CheckpointError", "TrainingError", "evaluate", "fit", "lr_factor", "train_one_epoch"]
