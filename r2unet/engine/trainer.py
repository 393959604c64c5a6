"""``train``: a TrainingRun sets up (device, data, model, resume), then ``run`` trains, validates and checkpoints each
epoch and scores the best checkpoint on the test split. Steps: ``loop.py``; device and precision: ``runtime.py``."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import progress as progress_lines
from ..data.augment import AugmentConfig
from ..data.cache import open_split_cache, require_split, split_cache
from ..data.dataset import DeviceTransform, make_loader
from ..data.pairs import SPLITS
from ..data.prepare import data_split, split_changes
from ..errors import CheckpointError, ExportError, Terminated, TrainingError, first_line
from ..fileio import FolderLock, append_line, atomic_write_text
from ..models import RECURRENT
from . import distributed as D
from . import int8, plots
from .budget import check_memory, say_step_time
from .checkpoint import (
    RunFiles,
    load_file,
    load_weights,
    model_state,
    require_training_state,
    save_checkpoint,
    store_postprocessing,
)
from .config import ConfigError, TrainConfig
from .export import export_checkpoint
from .loop import (
    EpochRun,
    JobThroughput,
    build_training,
    draw_samples,
    evaluate,
    interrupt_behind,
    lr_factor,
    precise_bn_batches,
    predictions_and_truths,
    recompute_batchnorm,
)
from .metrics import Accumulators, per_image_spread
from .postprocess import NONE, PostprocessedScores, Postprocessing, choose
from .runtime import (
    CompileWithFallback,
    configure_backends,
    describe_device,
    device_type,
    out_of_memory,
    placement,
    resolve_device,
    seed_everything,
)
from .task import task_of


def _terminate_as_interrupt(signum, frame):
    _expect_workers_to_end()
    raise Terminated(f"signal {signum}")


def _interrupt(signum, frame):
    _expect_workers_to_end()
    raise KeyboardInterrupt


def _expect_workers_to_end() -> None:
    """Ctrl-C or SIGTERM sent to the whole process group (a terminal, a batch scheduler, a service manager) ends the
    data-loading workers too, and the loader's SIGCHLD handler then raised "DataLoader worker ... is killed" in the
    middle of the save of last.pt, which was lost. The run is stopping: their end is expected."""
    if hasattr(signal, "SIGCHLD"):  # a Python handler that does nothing: one already pending then runs it quietly
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)


class SignalNotice:
    """Say at once that Ctrl-C or SIGTERM arrived. Python runs a signal's handler between bytecodes only, so inside
    one long operation (a step's backward pass on a CPU can take minutes) the interrupt would be silent until the
    operation returns. The interpreter's C-level handler also writes the signal's number to a pipe
    (``signal.set_wakeup_fd``); a thread reading it calls ``say(name)``, once per signal, while the main thread is
    still busy.

    The block's end wakes the thread with a byte of its own and joins it: the end of the pipe cannot be relied on
    (forked data-loader workers hold its write end too), and a thread left to finish while the interpreter shuts
    down, letting go of what ``say`` refers to (a training run's tensors), aborts the process."""

    NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
    STOP = 0  # no signal has the number 0

    def __init__(self, say):
        self.say, self.old, self.fds, self.thread = say, None, None, None
        self.lock, self.handled, self.said = threading.Lock(), False, set()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self.old, self.fds = signal.set_wakeup_fd(write, warn_on_full_buffer=False), (read, write)
        self.thread = threading.Thread(target=self._watch, args=(read,), name="signal-notice", daemon=True)
        self.thread.start()
        return self

    def _watch(self, read: int) -> None:
        while True:
            for number in os.read(read, 64):
                if number == self.STOP:
                    return
                with self.lock:  # said before the main thread's own words on it, or not at all
                    if number in self.NAMES and not self.handled and number not in self.said:
                        self.said.add(number)
                        self.say(self.NAMES[number])

    def handle(self) -> None:
        """The main thread has the interrupt in hand (and says so itself): no notice after this."""
        with self.lock:
            self.handled = True

    def __exit__(self, *exc):
        if self.fds is not None:
            signal.set_wakeup_fd(self.old)
            read, write = self.fds
            os.set_blocking(write, True)
            os.write(write, bytes([self.STOP]))
            self.thread.join()
            os.close(read)
            os.close(write)
        return False


# settings that name this machine's folders and devices: each process keeps its own
NODE_LOCAL = ("output_dir", "data_path", "cache_dir", "device", "device_index")


def fit(cfg: TrainConfig, log=print, return_model: bool = False):
    """Train as configured; return the results (also written to ``results.json``), and with ``return_model`` the
    trained model of this process too (the best checkpoint's weights)."""
    cfg.validate()
    joined = D.in_group()  # a group joined before (crossval's, for all its folds) is left to its owner
    info = D.init_distributed(device_type(cfg.device), timeout_s=cfg.dist_timeout_s)
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
            run = TrainingRun(cfg, info, log if info.is_main else (lambda *a, **k: None))
            results = run.run()
        finally:
            if lock:
                lock.release()
        return (results, run.model) if return_model else results
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
        if not joined:
            D.cleanup()


def batch_and_lr(cfg: TrainConfig, world: int) -> tuple[int, int, float]:
    """(batch per process, global batch, learning rate): ``--batch_size`` is per process, ``--global_batch_size``
    is divided among the processes, ``--scale_lr`` scales ``--lr`` by the global batch over ``--lr_batch_size``."""
    batch = cfg.batch_size
    if cfg.global_batch_size is not None:
        if cfg.global_batch_size % world:
            raise ConfigError(f"--global_batch_size {cfg.global_batch_size} is not divisible by the {world} processes")
        batch = cfg.global_batch_size // world
    global_batch = batch * world
    lr = cfg.lr * (global_batch / (cfg.lr_batch_size or batch)) if cfg.scale_lr else cfg.lr
    return batch, global_batch, lr


class TrainingSetup:
    """What a training step needs, set up from the settings in this order (the seed comes before anything draws
    random numbers): the device and how the model runs there (``runtime.placement``), the batch and learning rate,
    the seed and backend switches, the task, the caches of ``splits`` with their samplers, loaders and the two
    device transforms (augmenting for training, plain for scoring), then the model, optimiser and loss scaler.
    ``train`` (``TrainingRun``) and ``bench train`` both build on it."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, log, splits: tuple[str, ...] = SPLITS):
        self.cfg, self.info, self.log = cfg, info, log
        self.device = resolve_device(cfg.device, cfg.device_index, info.local_rank if info.distributed else None)
        self.place = placement(cfg, self.device)
        self.precision, self.channels_last = self.place.precision, self.place.channels_last
        self.batch_size, self.global_batch, self.lr = batch_and_lr(cfg, info.world_size)
        seed_everything(cfg.seed + info.rank)
        configure_backends(self.device, cfg.deterministic)
        if cfg.detect_anomaly:
            torch.autograd.set_detect_anomaly(True)
        self.task = task_of(cfg)
        self._check_memory()  # before the caches are built: a run that cannot fit stops before minutes of decoding
        self._setup_data(splits)
        self.model, self.optimizer, self.scaler = build_training(
            cfg, self.device, self.precision, self.lr, self.channels_last, sync_bn=cfg.sync_bn and info.distributed)
        # an exponential moving average of the weights (--ema), updated after every step; its buffers follow the
        # model's (and precise BatchNorm recomputes them for its weights before it is scored)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=False) \
            if cfg.ema else None

    @property
    def scored_model(self) -> nn.Module:
        """The network that is validated, kept in best.pt and tested: the weights' moving average with --ema."""
        return self.ema.module if self.ema is not None else self.model

    def _check_memory(self) -> None:
        """Rank 0 says what a step needs against what its device has; a run that cannot fit stops everywhere."""
        problem = None
        if self.info.is_main and not self.cfg.no_memory_check:
            try:
                check_memory(self.cfg, self.place, self.batch_size, self.info.world_size, self.log)
            except ConfigError as exc:
                problem = str(exc)
        problem = D.broadcast_object(problem)
        if problem:
            raise ConfigError(problem)

    def _setup_data(self, splits: tuple[str, ...]) -> None:
        """Caches, samplers, loaders and the two device transforms (augmenting for training, plain for scoring).
        Rank 0 builds/updates the caches first; then the first process of every other node validates them (a no-op
        on a shared file system, a build on a node-local one); then every process opens them."""
        cfg, info, data_path, targets = self.cfg, self.info, Path(self.cfg.data_path), self.task.targets

        def build():
            return {s: split_cache(data_path, s, cfg.image_size, cache_dir=cfg.cache_dir, targets=targets,
                                   num_workers=cfg.num_workers or None, skip_bad=cfg.skip_bad,
                                   progress=sys.stderr.isatty() and info.is_main, log=self.log) for s in splits}

        caches = build() if info.is_main else {}
        D.barrier()
        if info.local_rank == 0 and not info.is_main:
            caches = build()
        D.barrier()
        self.caches = caches or {s: open_split_cache(data_path, s, cfg.image_size, cfg.cache_dir, targets)
                                 for s in splits}
        self.train_sampler = D.EpochBatchSampler(len(self.caches["train"]), self.batch_size, info, cfg.seed)
        if len(self.train_sampler) == 0:
            raise ConfigError(f"--batch_size {self.batch_size}: larger than this process's share of the "
                              f"{len(self.caches['train'])} training images")
        scored = [s for s in ("valid", "test") if s in splits]
        self.shards = {s: D.ShardSampler(len(self.caches[s]), info) for s in scored}  # disjoint
        pin = self.device.type == "cuda"
        self.loaders = {
            "train": make_loader(self.caches["train"], self.batch_size, train=True, batch_sampler=self.train_sampler,
                                 num_workers=cfg.num_workers, pin_memory=pin),
            **{s: make_loader(self.caches[s], self.batch_size, train=False, sampler=self.shards[s], num_workers=0,
                              pin_memory=pin, drop_last=False) for s in scored},
        }
        if cfg.precise_bn and "train" in splits:  # fixed training batches, unaugmented, for precise BatchNorm
            self.loaders["precise_bn"] = make_loader(
                self.caches["train"], self.batch_size, train=False, num_workers=0, pin_memory=pin,
                batch_sampler=precise_bn_batches(len(self.caches["train"]), self.batch_size, cfg.precise_bn,
                                                 cfg.seed, info))
        self.augment, self.plain = (DeviceTransform(cfg.image_size, self.device, a, seed=cfg.seed + 7919 * info.rank,
                                                    img_ch=cfg.img_ch, labels=targets.nearest)
                                    for a in (AugmentConfig(augmentation_prob=cfg.augmentation_prob), None))

    def wrap_for_training(self) -> nn.Module:
        """The model as the training step calls it: DistributedDataParallel across processes, then compiled."""
        model = self.model
        if self.info.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return CompileWithFallback(model, self.log, self.cfg.compile_mode) if self.place.compile else model


class TrainingRun(TrainingSetup):
    """One run of ``train``: the run folder checked, a ``TrainingSetup``, resume, then ``run()``."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, log):
        self.cfg, self.info, self.log = cfg, info, log
        self.files = RunFiles(cfg.output_dir)
        self._check_run_folder()
        super().__init__(cfg, info, log)
        self.data_split = data_split(cfg.data_path) if info.is_main else None  # recorded in every checkpoint
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(e, cfg))
        self.start_epoch, self.start_step, self.carried, self.best_score, self.best_epoch = 0, 0, {}, float("-inf"), -1
        if cfg.resume:
            self._resume()
        for group in self.optimizer.param_groups:  # the decay schedule follows the (possibly extended) num_epochs
            group["lr"] = self.lr * lr_factor(self.start_epoch, cfg)
        self.bar = progress_lines.training_bar(info.is_main, len(self.train_sampler), self.global_batch)
        self.log = progress_lines.around_bars(log, self.bar)
        self.train_model = self.wrap_for_training()
        self._write_run_folder()
        self._log_header(self.place.note)
        self.step_s = None  # the expected seconds of a step (CPU: the time probe's)
        if self.info.is_main and self.device.type == "cpu" and self.start_epoch < cfg.num_epochs:
            self.step_s = say_step_time(cfg, self.place, self.batch_size, len(self.train_sampler),
                                        cfg.num_epochs - self.start_epoch, self.log)
        self.writer = self._tensorboard_writer()
        self.sample_idx = list(range(min(6, len(self.caches["valid"]))))
        self.state, self.epoch_done, self.throughput = None, False, JobThroughput()  # state: the loop's (EpochRun)
        self.last_train = None  # training-batch scores of the last epoch trained in this session

    # ------------------------------------------------------------------------------------------------------ set-up
    def _check_run_folder(self) -> None:
        """Rank 0 writes the run folder and is the only one that must be able to read it (nodes need not share a
        disk); the data's three splits must exist before any work."""
        has_run = D.broadcast_object(self.files.last.exists())
        if not self.cfg.resume and has_run:
            raise ConfigError(f"--output_dir: {self.files.dir} already holds a run (checkpoints/last.pt); pass "
                              "--resume to continue it or choose another --output_dir (nothing was deleted)")
        if self.cfg.resume and not has_run:
            raise ConfigError(f"--resume: no checkpoint at {self.files.last}")
        for split in SPLITS:
            require_split(Path(self.cfg.data_path), split)

    def _resume(self) -> None:
        ckpt = _load_on_rank0(self.files.last, self.info)
        load_weights(self.model, model_state(ckpt), str(self.files.last))
        if self.ema is not None:
            self._resume_ema(ckpt.get("extra", {}).get("ema"))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_step = ckpt["epoch"], ckpt.get("step", 0)
        self.best_score, self.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
        self._check_split(ckpt.get("data_split"))
        rng = ckpt.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "augment" in rng and not self.info.distributed:
            self.augment.generator.set_state(rng["augment"])
        self.carried = ckpt.get("extra", {}).get("epoch_state", {}) if self.start_step else {}
        last, epochs = self.files.last, self.cfg.num_epochs
        if self.start_epoch >= epochs:
            self.log(f"{last} has finished all {epochs} epochs: scoring best.pt on the test split again (to train "
                     f"longer, pass --num_epochs N with N > {epochs})")
        else:
            self.log(f"resumed from {last}: epoch {self.start_epoch + 1}"
                     + (f", step {self.start_step}" if self.start_step else ""))

    def _resume_ema(self, saved: dict | None) -> None:
        """The moving average as last.pt kept it; a run that had none starts it from the resumed weights (said)."""
        if saved is None:
            self.log(f"note: {self.files.last} holds no moving average of the weights (the run had no --ema): "
                     "it starts from the resumed weights")
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema), use_buffers=False)
            return
        self.ema.load_state_dict({k: v.to(self.device) for k, v in saved.items()})

    def _check_split(self, recorded: dict | None) -> None:
        """A resumed run on data whose split changed since it started (images moved between splits, added or
        removed) stops, saying what changed, unless ``--accept_split_change``; then the best checkpoint is chosen
        anew when the validation split changed. Rank 0 compares; every process hears its verdict."""
        changes = None
        if self.info.is_main and recorded and recorded.get("fingerprint") != self.data_split["fingerprint"]:
            changes = split_changes(recorded.get("splits", {}), self.data_split["splits"])
        changes = D.broadcast_object(changes)
        if not changes:
            return
        what = f"the split of {self.cfg.data_path} is not the one this run trained on: " + "; ".join(changes)
        moved = any(c.split(": ")[0].endswith(("from train to valid", "from train to test")) for c in changes)
        valid = any(" valid" in c.split(": ")[0] for c in changes)
        if not self.cfg.accept_split_change:
            raise ConfigError(
                f"--resume: {what}."
                + (" The model has trained on images that are now in the validation or test split: their scores "
                   "would be optimistic." if moved else "")
                + (" best.pt was chosen on the old validation split." if valid else "")
                + (" Re-prepare so that each image keeps its split ('r2unet prepare --overwrite' with the previous "
                   "--seed does that), start a new run, or pass --accept_split_change to go on" if moved else
                   " Pass --accept_split_change to go on with this split, or start a new run"))
        self.log(f"warning: {what}; going on (--accept_split_change)")
        if valid:
            self.best_score, self.best_epoch = float("-inf"), -1
            self.log("note: the validation split changed: best.pt will be chosen anew from the next validation")

    def _write_run_folder(self) -> None:
        if not self.info.is_main:
            return
        self.files.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.files.dir / "config.json")
        if self.cfg.resume and self.files.metrics.exists():  # drop rows of epochs the checkpoint does not cover
            rows = [r for r in plots.read_metrics(self.files.metrics) if r["epoch"] <= self.start_epoch]
            atomic_write_text(self.files.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def _log_header(self, precision_note: str | None) -> None:
        cfg, caches = self.cfg, self.caches
        name = f"{cfg.model_type} (t={cfg.t})" if cfg.model_type in RECURRENT else cfg.model_type
        compiled = ("on" + (f" ({cfg.compile_mode})" if cfg.compile_mode != "default" else "")) \
            if self.place.compile else "off"
        self.log(f"{name} on {describe_device(self.device)}, {self.precision.name}, compile {compiled}, "
                 f"channels_last {'on' if self.channels_last else 'off'}; {self.info.world_size} process(es) x batch "
                 f"{self.batch_size} = global batch {self.global_batch}, lr {self.lr:g}; train/valid/test = "
                 f"{len(caches['train'])}/{len(caches['valid'])}/{len(caches['test'])} images")
        if precision_note:
            self.log(precision_note)
        if len(caches["train"]) < self.global_batch:  # say it before hours of one update per epoch
            self.log(f"note: the global batch {self.global_batch} is larger than the {len(caches['train'])} training "
                     "images: every epoch is a single partial step; a smaller --batch_size or fewer processes "
                     "updates the model more often")
        if cfg.int8 == "on" and not int8.runnable():  # said now, not after hours of training
            self.log("note: --int8 on needs onnx and onnxruntime (pip install 'r2unet[export]'): this run will "
                     "train and test without writing its int8 model")
        if cfg.device_index is not None and self.device.type == "cpu":
            self.log(f"note: --npu_idx {cfg.device_index}: there is no CUDA GPU here, so training runs on the CPU")

    def _tensorboard_writer(self):
        if not (self.cfg.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'r2unet[tensorboard]'") \
                from None
        return SummaryWriter(str(self.files.dir / "tensorboard"))

    # --------------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        """Train the remaining epochs, then score the best checkpoint on the test split. Ctrl-C / SIGTERM saves
        ``last.pt`` (the step reached) and re-raises."""
        plots.load()  # now, not inside an epoch, where a signal could land in the import
        handlers = {}  # the signals' handlers before the run, restored after it
        if threading.current_thread() is threading.main_thread():
            numbers = (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGCHLD", None))
            handlers = {n: h for n in numbers if n is not None and (h := signal.getsignal(n)) is not None}
            signal.signal(signal.SIGTERM, _terminate_as_interrupt)
            signal.signal(signal.SIGINT, _interrupt)
        session_start = time.perf_counter()  # for the run's ETA: wall time per epoch in this session, all included
        with SignalNotice(self._acknowledge) as notice:  # a line at once, even while a long step runs
            ran_out = None
            try:
                for epoch in range(self.start_epoch, self.cfg.num_epochs):
                    trained = self.train_epoch(epoch)
                    validated = None
                    if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.num_epochs:
                        validated = self.validate(epoch)
                    per_epoch = (time.perf_counter() - session_start) / (epoch + 1 - self.start_epoch)
                    self.record(epoch, trained, validated, eta_s=per_epoch * (self.cfg.num_epochs - epoch - 1))
                    # the schedule steps once the epoch is done: an interruption before this point resumes the epoch
                    # (its last step reached) with its own learning rate
                    with warnings.catch_warnings():  # a run resumed at an epoch's end steps the schedule first
                        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
                        self.scheduler.step()
                    self.epoch_done = True
                    self.save_last(epoch + 1, 0)
                    D.barrier()
                if self.bar:
                    self.bar.close()
                return self.finish()
            except (KeyboardInterrupt, ImportError) as exc:  # an interrupt inside a module's first import comes
                interrupt = interrupt_behind(exc)  # wrapped in an ImportError ("initialization failed")
                if interrupt is None:
                    raise
                notice.handle()
                self._save_interrupted()
                raise interrupt from None
            except RuntimeError as exc:
                if not out_of_memory(exc):
                    raise
                ran_out = first_line(exc, 200)  # the step's tensors go with the exception, at the block's end
            finally:
                if self.writer:
                    self.writer.close()
                for number, handler in handlers.items():
                    signal.signal(number, handler)
            where = self._save_interrupted("out of memory")
            raise TrainingError(
                f"out of memory in {where} ({ran_out}). last.pt keeps the step reached: --resume continues once more "
                "memory is free; a smaller --batch_size, --image_size or --base_channels needs less (the run's first "
                "lines say what a step needs and what the machine had)")

    def _save_interrupted(self, why: str = "interrupted") -> str:
        """Save last.pt at the step an interrupt (or a failed allocation) reached, a step cut short to be redone on
        resume, and say so; return where it stopped ("epoch 3, step 12")."""
        if self.bar:
            self.bar.close()
        state, done = self.state, self.epoch_done
        if state is None:  # before the first step of this session
            epoch, step = self.start_epoch, self.start_step
        else:
            epoch, step = (state.epoch + 1, 0) if done else (state.epoch, state.steps)
            if state.in_step and state.buffers_before_step is not None:  # the step is redone on resume, with the
                state.buffers_before_step.restore()  # BatchNorm statistics from before it
        in_step = state is not None and state.in_step
        self.save_last(epoch, step, None if done or state is None else state.carried(),
                       state.augment_rng if in_step else None)
        self.log(f"{why}: saved {self.files.last} (epoch {epoch + 1}, step {step}); continue with --resume")
        return f"epoch {epoch + 1}, step {step + 1}" if in_step else f"epoch {epoch + 1}"

    def _acknowledge(self, name: str) -> None:
        """What a signal's arrival prints (from ``SignalNotice``'s thread): what happens next, and how long it may
        take when a step is slow."""
        wait = f" (a step takes about {self.step_s:.0f} s here)" if self.step_s and self.step_s >= 2 else ""
        self.log(f"received {name}: stopping when the operation running now returns{wait}, then saving "
                 f"{self.files.last}")

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training (from the step a resume landed on): its part of the metrics.jsonl row. The loop
        (``EpochRun``) owns the epoch's state; between its steps, the run saves ``last.pt`` when it is due."""
        cfg = self.cfg
        skip = self.start_step if epoch == self.start_epoch else 0
        self.train_sampler.set_epoch(epoch, skip)
        total = len(self.train_sampler) + skip
        if self.bar:
            self.bar.reset(total=total)
            self.bar.update(skip)
            self.bar.set_description(f"epoch {epoch + 1}/{cfg.num_epochs}")

            def progress(state, loss: float) -> None:  # the bar counts steps (shown as images)
                self.bar.update(state.steps - self.bar.n)
                self.bar.set_postfix(loss=f"{loss:.4f}")
        else:  # no terminal (a batch job's log): a line now and then, so a long epoch is not silent
            progress = progress_lines.EpochLines(self.log, epoch, cfg.num_epochs, total, skip, self.global_batch,
                                                 early=epoch == self.start_epoch)
        steps = EpochRun(self.train_model, self.loaders["train"], self.augment, self.optimizer, self.scaler,
                         self.precision, cfg, self.task, epoch, steps_done=skip,
                         carried=self.carried if skip else None,
                         nonfinite_run=self.state.nonfinite_run if self.state else None, progress=progress,
                         channels_last=self.channels_last,
                         after_step=(lambda: self.ema.update_parameters(self.model)) if self.ema else None)
        self.state, self.epoch_done = steps.state, False
        state = steps.state
        carried_images, t0 = state.images, time.perf_counter()  # images trained before a resume: not timed here
        for state in steps:
            if cfg.save_every_steps and state.steps % cfg.save_every_steps == 0:
                self.save_last(epoch, state.steps, state.carried())
        epoch_lr = self.optimizer.param_groups[0]["lr"]
        epoch_fps, epoch_s = self.throughput.add_epoch(state, state.images - carried_images,
                                                       time.perf_counter() - t0, self.device)
        sums = torch.tensor([state.loss_sum, state.steps - state.skipped, state.skipped], dtype=torch.float64)
        loss_total, taken, skipped = D.all_reduce_sum(sums.to(self.device)).tolist()
        state.train_metrics.all_reduce()
        # none when a resume landed after the epoch's last step (killed before the epoch-end save)
        train_scores = state.train_metrics.compute() if state.train_metrics.num_images else None
        self.last_train = train_scores or self.last_train
        return {"epoch": epoch + 1, "train_loss": loss_total / taken if taken else None,  # None: every step skipped
                "skipped_steps": int(skipped), "lr": epoch_lr, "train_img_per_s": epoch_fps, "epoch_seconds": epoch_s,
                "train": train_scores}

    def validate(self, epoch: int) -> dict:
        """Score the validation split; keep ``best.pt`` on JS + DC (with no validation split: the latest epoch).
        Eager, not compiled: the compiled graph is for training mode at the training batch size. The model scored
        is ``scored_model`` (the weights' moving average with --ema); first its BatchNorm statistics are recomputed
        for its weights (--precise_bn, the same on every process) or, without that, taken from rank 0, so every
        shard is scored with the model best.pt keeps. Its part of the metrics.jsonl row: the scores, and whether
        they are the best so far."""
        model = self.scored_model
        if "precise_bn" in self.loaders:  # the statistics of these weights, the same on every process
            recompute_batchnorm(model, self.loaders["precise_bn"], self.plain, self.precision, self.channels_last)
        else:
            D.broadcast_module(model, buffers_only=True)
        valid = None
        if len(self.caches["valid"]):
            valid = evaluate(model, self.loaders["valid"], self.plain, self.precision, self.task,
                             self.cfg.threshold, self.channels_last, "validation" if self.bar else None).compute()
        score = (valid["JS"] + valid["DC"]) if valid else float(epoch)
        if score <= self.best_score:
            return {"valid": valid}
        self.best_score, self.best_epoch = score, epoch + 1
        if self.info.is_main:
            save_checkpoint(self.files.best, model=model, config=self.cfg.to_dict(), epoch=epoch + 1,
                            best_score=self.best_score, best_epoch=self.best_epoch, data_split=self.data_split)
        return {"valid": valid, "best": True}

    def record(self, epoch: int, trained: dict, validated: dict | None, eta_s: float) -> None:
        """The epoch's row (``trained``, then ``validated`` when it was) in metrics.jsonl and the log, TensorBoard,
        curves.png and (every few epochs) the sample grid."""
        if not self.info.is_main:
            return
        row = {**trained, **(validated or {})}
        append_line(self.files.metrics, json.dumps(row))
        progress_lines.log_epoch(self.log, row, self.cfg.num_epochs, eta_s)
        if self.writer:
            progress_lines.tensorboard_row(self.writer, row)
        plots.plot_curves(plots.read_metrics(self.files.metrics), self.files.dir / "curves.png")
        if self.sample_idx and ((epoch + 1) % self.cfg.sample_every == 0 or epoch + 1 == self.cfg.num_epochs):
            self.files.samples.mkdir(exist_ok=True)
            draw_samples(self.scored_model, self.caches["valid"], self.sample_idx, self.plain, self.precision,
                         self.task, self.cfg.threshold, self.files.samples / f"epoch_{epoch + 1:03d}.png",
                         f"epoch {epoch + 1}")

    def save_last(self, epoch: int, step: int, extra: dict | None = None, augment_rng=None) -> None:
        if self.info.is_main:
            rng = {"torch": torch.get_rng_state(),
                   "augment": augment_rng if augment_rng is not None else self.augment.generator.get_state()}
            save_checkpoint(self.files.last, model=self.model, config=self.cfg.to_dict(), epoch=epoch, step=step,
                            optimizer=self.optimizer, scaler=self.scaler, scheduler=self.scheduler,
                            best_score=self.best_score, best_epoch=self.best_epoch, rng=rng,
                            extra={**(extra or {}), **({"ema": {k: v.detach().cpu() for k, v in
                                                            self.ema.state_dict().items()}} if self.ema else {})},
                            data_split=self.data_split)

    def finish(self) -> dict:
        """The best model's scores on the *test* split, written to results.json. Rank 0 wrote best.pt; the others
        get its weights by broadcast, so nodes without a shared file system score the same model."""
        files, cfg = self.files, self.cfg
        if self.info.is_main and files.best.exists():
            load_weights(self.model, model_state(load_file(files.best)), str(files.best))
        D.broadcast_module(self.model)
        post = self._choose_postprocessing()
        (test, test_spread), (post_test, post_spread) = self._test_scores(post)
        fps, train = self.throughput.fps, self.last_train
        if fps is None:  # nothing trained in this session (a finished run resumed): keep what training measured
            previous = files.previous_results()
            fps, train = previous.get("fps"), previous.get("train")
        results = {"test": test, "test_spread": test_spread, "train": train, "best_epoch": self.best_epoch,
                   "best_valid_JS_plus_DC": self.best_score, "fps": fps, "model_type": cfg.model_type, "t": cfg.t,
                   "image_size": cfg.image_size, "global_batch_size": self.global_batch,
                   "world_size": self.info.world_size, "precision": self.precision.name, "epochs": cfg.num_epochs,
                   "device": str(self.device), "torch": str(torch.__version__),
                   "split_fingerprint": (self.data_split or {}).get("fingerprint"),
                   "postprocessing": post.to_dict() if post.chosen_on else None,
                   "test_postprocessed": post_test, "test_postprocessed_spread": post_spread}
        if self.info.is_main:
            self._write_results(results)
            if cfg.int8 == "on":
                self._write_int8()
        return results

    def _write_int8(self) -> None:
        """``--int8 on``: the kept model as an int8 model beside the run (``export.export_checkpoint``), which
        predict, serve and evaluate run in its place on a CPU if its masks agree with float32's. If they do not, a
        float32 export beside it instead: what runs in the checkpoint's place on a CPU without native bf16, with
        float32's masks (onnxruntime's float32 ran 1.3-1.5x PyTorch's on two CPUs; benchmarks/README.md). The run's
        results stand without either: a model that cannot be made (no onnxruntime, no validation images) is a
        warning."""
        if not self.files.best.exists():
            return
        errors = (ExportError, OSError, RuntimeError, ValueError)  # what the ONNX exporter and quantiser raise
        try:
            self.log(export_checkpoint(self.files.dir, None, quantize=True, log=self.log))
        except errors as exc:
            self.log(f"warning: --int8 on: no int8 model written ({first_line(exc) or type(exc).__name__}). The "
                     f"run is complete; 'r2unet export --checkpoint {self.files.dir} --int8' makes it later")
            return
        if int8.companion(self.files.dir, float32=False, image_size=self.cfg.image_size) is not None:
            return
        float_file = int8.run_folder(self.files.dir) / "model.onnx"
        self.log("the int8 model does not run by default; a float32 export runs in its place on CPUs without "
                 "native bf16:")
        try:
            self.log(export_checkpoint(self.files.dir, float_file, log=self.log))
        except errors as exc:
            self.log(f"warning: no float32 export written ({first_line(exc) or type(exc).__name__}). The run is "
                     f"complete; 'r2unet export --checkpoint {self.files.dir} --output {float_file}' makes it later")

    def _choose_postprocessing(self) -> Postprocessing:
        """The postprocessing of the kept model, chosen on the validation split (``postprocess.choose``; every
        process gets every image's prediction and decides alike), and stored in best.pt and postprocessing.json."""
        if self.cfg.postprocess == "none" or not len(self.caches["valid"]):
            return NONE
        predictions, truths = predictions_and_truths(self.model, self.loaders["valid"], self.plain, self.precision,
                                                     self.task, self.channels_last)
        order = D.gather_lists(self.shards["valid"].indices)  # the split's order: as a 1-process run decides
        pairs = dict(zip(order, zip(D.gather_lists(predictions), D.gather_lists(truths))))
        predictions, truths = zip(*(pairs[i] for i in sorted(pairs)))
        post = choose(list(predictions), list(truths), self.task, self.cfg.threshold,
                      f"the validation split ({len(pairs)} images at {self.cfg.image_size} px)")
        if self.info.is_main and self.files.best.exists():
            store_postprocessing(self.files, post)
        return post

    def _test_scores(self, post: Postprocessing) -> list[tuple[dict | None, dict | None]]:
        """The test split's scores and their spread, as the network gives them and after ``post`` (None, None when
        nothing is chosen); one forward pass."""
        if not len(self.caches["test"]):
            return [(None, None), (None, None)]
        raw = self.task.accumulator(self.cfg.threshold, self.device, keep_per_image=True)
        processed = self.task.accumulator(0.5, self.device, keep_per_image=True) if post.active else None
        threshold = post.threshold_or(self.cfg.threshold)
        fed = Accumulators(raw, PostprocessedScores(processed, post, self.task, threshold)) \
            if processed is not None else raw
        evaluate(self.model, self.loaders["test"], self.plain, self.precision, self.task, self.cfg.threshold,
                 self.channels_last, "test" if self.bar else None, accumulator=fed)
        return [self._with_spread(acc) for acc in (raw, processed)]

    def _with_spread(self, acc) -> tuple[dict | None, dict | None]:
        """The scores, and from every image's scores of all shards the sd and a 95 % bootstrap interval per mean
        (error bars)."""
        if acc is None:
            return None, None
        per = acc.per_image()
        rows = dict(zip(D.gather_lists(self.shards["test"].indices), D.gather_lists(list(zip(*per.values())))))
        rows = [rows[i] for i in sorted(rows)]  # the split's order: the same interval as a 1-process run
        return acc.compute(), per_image_spread({k: [r[j] for r in rows] for j, k in enumerate(per)})

    def _write_results(self, results: dict) -> None:
        files, test, spread = self.files, results["test"], results["test_spread"]
        atomic_write_text(files.results, json.dumps(results, indent=2) + "\n")
        if self.sample_idx:  # the kept model, as 'r2unet plot' redraws it (samples/ holds the epochs)
            draw_samples(self.model, self.caches["valid"], self.sample_idx, self.plain, self.precision, self.task,
                         self.cfg.threshold, files.dir / "samples.png", f"best checkpoint (epoch {self.best_epoch})")
        if test:
            self.log(f"test (best epoch {results['best_epoch']}): "
                     + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
            self.log("  95% CI of the means: " + "  ".join(
                f"{k} {spread[k]['ci'][0]:.3f}-{spread[k]['ci'][1]:.3f}" for k in ("JS", "DC", "ACC")))
        if results["postprocessing"]:
            post = Postprocessing.from_dict(results["postprocessing"])
            self.log(f"postprocessing {post.headline()} (validation JS "
                     f"{post.valid_JS['none']:.4f} -> {post.valid_JS['chosen']:.4f})")
            if results["test_postprocessed"]:
                after, ci = results["test_postprocessed"], results["test_postprocessed_spread"]["JS"]["ci"]
                self.log(f"test with it: JS {after['JS']:.4f} ({ci[0]:.3f}-{ci[1]:.3f})  DC {after['DC']:.4f}  "
                         f"(without: JS {test['JS']:.4f}  DC {test['DC']:.4f})")
        if results["fps"] is not None:
            self.log(f"FPS: {results['fps']:.2f}")


# ------------------------------------------------------------------------------------------------------- helpers
def _load_on_rank0(path: Path, info: D.DistInfo) -> dict:
    """The training checkpoint at ``path`` as rank 0 reads it, on every process (a failure is raised everywhere)."""
    payload = None
    if info.is_main:
        try:
            payload = ("ok", require_training_state(load_file(path), path))
        except CheckpointError as exc:
            payload = ("error", str(exc))
    status, value = D.broadcast_object(payload)
    if status == "error":
        raise CheckpointError(value)
    return value
