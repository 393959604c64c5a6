"""Benchmarks: the data pipeline (``bench data``) and the training step (``bench train``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import defaults
from ..data.augment import AugmentConfig
from ..data.cache import split_cache
from ..data.dataset import DeviceTransform, make_loader
from ..data.prepare import prepare_split
from ..data.synth import IMAGE_DIR, MASK_DIR, generate_dataset
from ..engine import distributed as D
from ..engine import runtime
from ..engine.config import TrainConfig
from ..engine.loop import StepBuffers, train_one_epoch, train_step
from ..engine.runtime import Precision, describe_device, place_model, resolve_compile, resolve_device, synchronize
from ..engine.task import BINARY_TASK
from ..engine.trainer import TrainingSetup
from ..errors import first_line
from ..models import create_model


def train_report(result: dict) -> str:
    """``bench train``'s table: every row's img/s, ratio to the baseline and fraction of the FLOP bound."""
    r = result
    lines = [f"\n{r['model_type']} t={r['t']} base {r['base_channels']}, {r['image_size']}px, batch {r['batch_size']} "
             f"on {r['device']} (torch {r['torch']}, {r['threads']} threads): {r['train_gflop_per_image']:.1f} GFLOP "
             f"per training image; measured {r['peak_dtype']} matmul peak {r['peak_tflops']:.2f} TFLOP/s -> bound "
             f"{r['flop_bound_img_per_s']:.0f} img/s",
             f"{'configuration':<58}{'img/s':>9}{'x base':>8}{'of bound':>10}"]
    for row in r["rows"]:
        if row["img_per_s"] is None:
            lines.append(f"{row['config']:<58} failed: {row['error']}")
        else:
            lines.append(f"{row['config']:<58}{row['img_per_s']:9.1f}{row['x_baseline']:8.2f}"
                         f"{100 * row['frac_flop_bound']:9.1f}%")
    return "\n".join(lines)


def data_report(result: dict) -> str:
    return (f"data pipeline on {result['device']}: {result['img_per_s']:.0f} img/s (batch {result['batch_size']}, "
            f"{result['image_size']}x{result['image_size']}); cache build {result['cache_build_s']:.2f} s for "
            f"{result['cached_images']} images")


def bench_data(
    data_path: str | Path,
    image_size: int = defaults.IMAGE_SIZE,
    batch_size: int = defaults.BATCH_SIZE,
    device: str = "cpu",
    num_workers: int = 0,
    min_images: int = 2000,
    augmentation_prob: float = 0.4,
    log=print,
) -> dict:
    """Images/s of augmented training batches delivered on ``device`` from the cache (built first, timed apart)."""
    dev = resolve_device(device)
    t0 = time.perf_counter()
    cache = split_cache(data_path, "train", image_size, log=log)
    cache_build_s = time.perf_counter() - t0
    loader = make_loader(cache, batch_size, train=True, num_workers=num_workers, pin_memory=dev.type == "cuda",
                         drop_last=False)
    transform = DeviceTransform(image_size, dev, AugmentConfig(augmentation_prob=augmentation_prob))
    for batch in loader:  # warm-up: first touches of the memory map, worker start, kernels
        transform(batch)
        break
    synchronize(dev)
    images, start = 0, time.perf_counter()
    while images < min_images:
        for batch in loader:
            x, y = transform(batch)
            images += x.shape[0]
    synchronize(dev)
    elapsed = time.perf_counter() - start
    return {"img_per_s": images / elapsed, "cache_build_s": cache_build_s, "images": images, "seconds": elapsed,
            "device": str(dev), "image_size": image_size, "batch_size": batch_size, "num_workers": num_workers,
            "cached_images": len(cache), "torch": str(torch.__version__)}


def train_flops_per_image(model: torch.nn.Module, batch_size: int, image_size: int, img_ch: int = 3) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch.utils.flop_counter."""
    device = next(model.parameters()).device
    x = torch.randn(batch_size, img_ch, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def _time_steps(step, device: torch.device, steps: int, warmup: int, on_first_step=None) -> float:
    """Seconds of ``steps`` steps after ``warmup`` untimed ones; ``on_first_step(seconds)`` hears the first step's
    time (for an estimate of a long run)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step()
        if i == 0 and on_first_step is not None:
            synchronize(device)
            on_first_step(time.perf_counter() - t0)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - t0


def model_step(model_type, t, base_channels, image_size, batch_size, device, *, bf16, channels_last, fused,
                compile_model, compile_mode="default", cudnn_benchmark=True):
    """A model-only training step on fixed device tensors: ``train``'s own ``loop.train_step`` (forward,
    BCE-with-logits, backward, Adam), without the data pipeline. With ``fused`` it is train's step exactly (fused
    Adam skipping non-finite steps on the device); without, the reference's plain ``optimizer.step()``."""
    torch.backends.cudnn.benchmark = cudnn_benchmark  # a global switch: each row sets its own
    torch.manual_seed(0)
    model = place_model(create_model(model_type, t=t, base_channels=base_channels), device, channels_last)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = (torch.rand(batch_size, 1, image_size, image_size, device=device) > 0.5).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True if fused else None)
    fwd = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compile_model else model
    precision = Precision(torch.bfloat16 if bf16 else None, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    buffers = StepBuffers(device) if fused else None

    def step():
        train_step(fwd, x, y, precision, scaler, opt, buffers, BINARY_TASK.loss)

    return step, model


FAST = dict(bf16=True, channels_last=True, fused=True)  # the fast model-only step on GPUs and bf16-native CPUs


def configs_for(device: torch.device) -> dict:
    """name -> (row label, options of the model-only step); "default" is the trainer's own step, end to end. The
    baseline is PyTorch's defaults (cuDNN benchmark off); every later row has it on, as train does. Where bf16 is
    not native (CPUs without AMX / AVX512-BF16) the rows after the bf16 row build on float32, the precision train
    uses there, and the bf16 row shows the emulated cost."""
    native = device.type == "cuda" or runtime.cpu_info().native_bf16
    fast = dict(FAST, bf16=native)
    fp = "" if native else "fp32 "
    return {
        "fp32": ("fp32 eager (baseline)", dict(bf16=False, channels_last=False, fused=False, compile_model=False,
                                               cudnn_benchmark=False)),
        "cudnn_benchmark": ("+ cuDNN benchmark", dict(bf16=False, channels_last=False, fused=False,
                                                      compile_model=False)),
        "bf16": ("+ bf16 autocast" + ("" if native else " (emulated here)"),
                 dict(bf16=True, channels_last=False, fused=False, compile_model=False)),
        "channels_last": (f"{fp}+ channels_last", dict(fast, fused=False, compile_model=False)),
        "fused": (f"{fp}+ channels_last + fused Adam" if fp else "+ fused Adam", dict(fast, compile_model=False)),
        "compile": (f"{fp}+ channels_last + fused Adam + torch.compile" if fp else "+ torch.compile",
                    dict(fast, compile_model=True)),
        "default": None,
        # after the default row: an alternative to weigh, not part of the default (the row to lose if time runs out)
        "cudagraphs": ("+ CUDA graphs (compile reduce-overhead)",
                       dict(fast, compile_model=True, compile_mode="reduce-overhead")),
    }


CONFIG_NAMES = tuple(configs_for(torch.device("cuda")))


def parse_configs(spec: str, device: torch.device, use_compile: bool) -> list[str]:
    """``all`` or a comma list of configuration names; the baseline always comes first (it is the ratios' reference).
    ``all`` leaves out what cannot run here or would only measure an emulation: compiled rows when compilation is
    off, GPU-only rows on a CPU, the bf16 row on a CPU without native bf16."""
    if spec == "all":
        gpu_only = ("cudagraphs", "cudnn_benchmark")
        names = [n for n in CONFIG_NAMES if (n not in ("compile", "cudagraphs") or use_compile)
                 and (n not in gpu_only or device.type == "cuda")]
        if device.type == "cpu" and not runtime.cpu_info().native_bf16:
            names.remove("bf16")
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIG_NAMES]
        if unknown:
            raise ValueError(f"--configs: unknown {', '.join(unknown)}; choose from all, {', '.join(CONFIG_NAMES)}")
    return ["fp32"] + [n for n in names if n != "fp32"]


def bench_train(model_type: str = defaults.MODEL_TYPE, batch_size: int = defaults.BATCH_SIZE,
                image_size: int = defaults.IMAGE_SIZE, t: int = defaults.T,
                base_channels: int = defaults.BASE_CHANNELS, device: str = "auto", steps: int = 20, warmup: int = 5,
                compile_model: str = "auto", compile_mode: str = "default", configs: str = "all",
                data_path: str | Path | None = None, log=print) -> dict:
    """img/s of a plain fp32 eager step, each optimisation added, and the default training configuration, measured
    in one run, with ratios to the baseline and the fraction of the FLOP bound of this device."""
    for name, value in (("batch_size", batch_size), ("steps", steps), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"--{name}: must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {warmup}")
    dev = resolve_device(device)
    use_compile = resolve_compile(compile_model, dev)
    rows = []
    flops = None
    keys = parse_configs(configs, dev, use_compile)
    table = configs_for(dev)
    log(f"bench train: {model_type} at {image_size} px, batch {batch_size} on {describe_device(dev)}: "
        f"{len(keys)} configuration(s) x ({warmup} warm-up + {steps} timed) steps")
    if configs == "all" and "bf16" not in keys and dev.type == "cpu":
        log(f"  (no bf16 row: bf16 is emulated on this {runtime.cpu_info().label} CPU; --configs fp32,bf16 to see "
            "its cost)")

    def estimate(first_step_s: float) -> None:  # the fp32 baseline is the slowest row: a ceiling for the others
        total_min = first_step_s * (warmup + steps) * len(keys) / 60
        if total_min > 2:
            log(f"  one fp32 step took {first_step_s:.1f} s: up to ~{total_min:.0f} min in all"
                + (" (on a CPU, try --base_channels 16 --image_size 128 --batch_size 8)" if dev.type == "cpu" else ""))

    for key in keys:
        name, opts = table[key] or ("default train step", {})
        if key == "compile" and compile_mode != "default":
            opts = dict(opts, compile_mode=compile_mode)
            name += f" ({compile_mode})"
        try:
            if key == "default":
                # --compile on/off decide for the default row too; auto: as train runs it
                row = _bench_default_training(model_type, t, base_channels, image_size, batch_size, dev, steps,
                                              warmup, data_path, None if compile_model == "auto" else compile_model,
                                              compile_mode, log)
            else:
                step, model = model_step(model_type, t, base_channels, image_size, batch_size, dev, **opts)
                seconds = _time_steps(step, dev, steps, warmup + (3 if opts["compile_model"] else 0),
                                      on_first_step=estimate if key == "fp32" else None)
                if flops is None:
                    flops = train_flops_per_image(model, batch_size, image_size)
                row = {"config": name, "img_per_s": batch_size * steps / seconds}
                del step, model
        except Exception as exc:  # noqa: BLE001 - one configuration failing (e.g. a compiler error) is a result
            if key == "fp32":
                raise
            row = {"config": name, "img_per_s": None, "error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        row["key"] = key
        rows.append(row)
        log(f"  {row['config']:<52}" + (f"{row['img_per_s']:10.1f} img/s" if row["img_per_s"] is not None
                                        else f"  failed: {row['error']}"))
    peak, peak_dtype = runtime.peak_tflops(dev)
    base = rows[0]["img_per_s"]
    for row in rows:
        ok = row["img_per_s"] is not None
        row["x_baseline"] = row["img_per_s"] / base if ok else None
        row["frac_flop_bound"] = row["img_per_s"] * flops / (peak * 1e12) if ok else None
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu: {runtime.cpu_info().label}",
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "model_type": model_type, "t": t, "base_channels": base_channels, "image_size": image_size,
            "batch_size": batch_size, "train_gflop_per_image": flops / 1e9, "peak_tflops": peak,
            "peak_dtype": peak_dtype,
            "flop_bound_img_per_s": peak * 1e12 / flops, "rows": rows}


class DefaultTraining:
    """The trainer's own step with its default settings, as ``train`` sets it up (but the run folder): batches from
    the cache, augmentation on the device, loss, backward, optimizer and training metrics (``train_one_epoch``),
    ``warmup + steps`` steps an epoch. Without ``data_path``, on synthetic images in a temporary folder, enough for
    one epoch (the warm-up is excluded once per epoch). ``compile_flag``: train's ``--compile`` (None: its default).
    A context manager; ``epoch()`` runs the next epoch."""

    def __init__(self, model_type, t, base_channels, image_size, batch_size, dev, steps, warmup, data_path=None,
                 compile_flag: str | None = None, compile_mode: str = "default", log=print):
        self._tmp = tempfile.TemporaryDirectory(prefix="r2unet-bench-") if data_path is None else None
        self._epoch = 0
        try:
            if data_path is None:
                raw = Path(self._tmp.name) / "raw"
                generate_dataset(raw, num_images=min(512, batch_size * (warmup + steps + 1)), seed=0, max_side=400)
                data_path = Path(self._tmp.name) / "data"
                prepare_split(raw / IMAGE_DIR, raw / MASK_DIR, data_path=data_path, train_ratio=1, valid_ratio=0,
                              test_ratio=0, log=lambda *_: None)
            compiling = {} if compile_flag is None else {"compile": compile_flag}  # None: train's default
            self.cfg = TrainConfig(model_type=model_type, t=t, base_channels=base_channels, image_size=image_size,
                                   batch_size=batch_size, device=dev.type, warmup_steps=warmup, log_every=10**9,
                                   max_steps_per_epoch=warmup + steps, num_workers=2 if dev.type == "cuda" else 0,
                                   compile_mode=compile_mode, data_path=str(data_path), **compiling)
            self.setup = TrainingSetup(self.cfg, D.DistInfo(), log, splits=("train",))
            self.model = self.setup.wrap_for_training()
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._tmp is not None:
            self._tmp.cleanup()

    def epoch(self):
        """One epoch; its state holds the steady-state images and seconds (after the warm-up steps)."""
        s = self.setup
        s.train_sampler.set_epoch(self._epoch)
        state = train_one_epoch(self.model, s.loaders["train"], s.augment, s.optimizer, s.scaler, s.precision,
                                self.cfg, s.task, self._epoch, channels_last=s.channels_last)
        self._epoch += 1
        return state

    def name(self) -> str:
        s = self.setup
        mode = self.cfg.compile_mode
        compiled = (", compile" + (f" {mode}" if mode != "default" else "")) if s.place.compile else ""
        name = (f"default train step ({s.precision.name}{', channels_last' if s.channels_last else ''}{compiled}, "
                "data+aug)")
        return name + (" [compile failed: eager]" if s.place.compile and self.model.fell_back else "")


def _bench_default_training(model_type, t, base_channels, image_size, batch_size, dev, steps, warmup,
                            data_path, compile_flag: str | None = None, compile_mode: str = "default",
                            log=print) -> dict:
    """The default row of ``bench train``: the steady-state img/s of ``DefaultTraining``."""
    with DefaultTraining(model_type, t, base_channels, image_size, batch_size, dev, steps, warmup, data_path,
                         compile_flag, compile_mode, log) as run:
        images = seconds = 0.0
        while images < batch_size * steps:
            state = run.epoch()
            images += state.steady_images
            seconds += state.steady_seconds
        return {"config": run.name(), "img_per_s": images / max(seconds, 1e-9)}
