"""Where a training step's device time goes: torch.profiler over a few steps of the model-only step in the fast
configuration (bf16, channels_last, fused Adam, compiled on GPUs), kernels grouped into convolutions, compiler-fused
elementwise/normalisation kernels, other elementwise work, the optimizer and copies. Run by gpu_check.sh.
``--end_to_end``: the trainer's default step instead (cache batch -> augmentation -> step -> metrics, as ``bench
train``'s default row runs it), which adds the data, augmentation and metric kernels.

Beside the device time per step it prints the wall time per step of the same steps run without the profiler: their
difference is the time the device waited (launch gaps, the host, the data).

It also prints the convolutions' throughput: the step's FLOPs (torch.utils.flop_counter counts only convolutions
here) over the convolution kernels' device time, as a fraction of a large bf16 matmul's measured rate. That fraction
is the ``e`` of benchmarks/README.md, which decides whether 550 img/s is reachable.

    python benchmarks/profile_step.py [--model_type R2U_Net --batch_size 16 --image_size 224 --device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from r2unet.commands.bench import FAST, DefaultTraining, model_step, train_flops_per_image
from r2unet.engine.runtime import configure_backends, peak_tflops, synchronize

# substrings of kernel names, first match wins (cuDNN/CUTLASS convolution kernels carry these in their names)
GROUPS = [
    ("convolution", ("conv", "cudnn", "implicit", "xmma", "cutlass", "wgrad", "dgrad", "gemm", "sm90", "sm80")),
    ("optimizer", ("adam",)),
    ("compiler-fused (triton)", ("triton",)),
    ("batch norm", ("batch_norm", "batchnorm", "bn_")),
    ("copies", ("copy", "memcpy", "memset", "fill")),
]


def group_of(name: str) -> str:
    lower = name.lower()
    for group, keys in GROUPS:
        if any(k in lower for k in keys):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_type", default="R2U_Net")
    parser.add_argument("--t", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--base_channels", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", choices=["on", "off"], default=None,
                        help="default: on for the model-only step on CUDA; train's own default with --end_to_end")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--end_to_end", action="store_true", help="the trainer's default step, data and metrics "
                        "included, instead of the model-only step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dev = torch.device(args.device)
    configure_backends(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if args.end_to_end:
        prof, wall_ms, steps, model, compiled = _profile_default_step(args, dev, activities)
    else:
        compiled = (args.compile or ("on" if dev.type == "cuda" else "off")) == "on"
        prof, wall_ms, steps, model = _profile_model_step(args, dev, compiled, activities)
    flops_per_step = train_flops_per_image(model, args.batch_size, args.image_size) * args.batch_size
    report(prof, args, dev, compiled, steps, wall_ms, flops_per_step)


def _profile_model_step(args, dev, compiled, activities):
    """The model-only step: warmed up, timed without the profiler, then profiled over ``args.steps`` steps."""
    step, model = model_step(args.model_type, args.t, args.base_channels, args.image_size, args.batch_size, dev,
                             **FAST, compile_model=compiled)
    for _ in range(5):  # compilation, cuDNN autotuning, allocator warm-up
        step()
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(dev)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(dev)
    return prof, wall_ms, args.steps, model


def _profile_default_step(args, dev, activities):
    """The trainer's default step (``--compile`` as given, else train's own default), epochs of 3 warm-up +
    ``args.steps`` steps: one to compile, one timed without the profiler (its steady steps), one profiled whole.
    Also returns whether the step ran compiled."""
    with DefaultTraining(args.model_type, args.t, args.base_channels, args.image_size, args.batch_size, dev,
                         args.steps, 3, compile_flag=args.compile, log=lambda *_: None) as run:
        run.epoch()
        state = run.epoch()
        wall_ms = state.steady_seconds * 1e3 / max(1, state.steady_images // args.batch_size)
        with profile(activities=activities) as prof:
            state = run.epoch()
            synchronize(dev)
        return prof, wall_ms, state.steps, run.setup.model, run.setup.place.compile and not run.model.fell_back


def report(prof, args, dev, compiled, steps, wall_ms, flops_per_step) -> None:
    """Device time per kernel group and the top kernels of ``steps`` profiled steps, beside ``wall_ms``."""
    cuda = dev.type == "cuda"
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    # on a GPU, the kernels' own rows only: a CPU operator's "self device time" repeats the kernels it launched
    rows = [(e.key, getattr(e, attr, 0.0), e.count) for e in events if getattr(e, attr, 0.0) > 0
            and (not cuda or e.device_type != torch.autograd.DeviceType.CPU)]
    total = sum(r[1] for r in rows) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for name, us, _ in rows:
        groups[group_of(name)] += us
    per_step_ms = total / 1e3 / steps
    conv_ms = groups.get("convolution", 0.0) / 1e3 / steps
    conv_tflops = flops_per_step / (conv_ms * 1e-3) / 1e12 if conv_ms else None
    peak = peak_tflops(dev)[0] if cuda else None
    result = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "compiled": compiled,
              "step": "default (data, augmentation, metrics)" if args.end_to_end else "model-only",
              "model_type": args.model_type, "batch_size": args.batch_size, "image_size": args.image_size,
              "device_ms_per_step": per_step_ms, "img_per_s_if_busy": args.batch_size / per_step_ms * 1e3,
              "wall_ms_per_step": wall_ms, "img_per_s": args.batch_size / wall_ms * 1e3,
              "device_busy_percent": 100 * per_step_ms / wall_ms,
              "convolution_ms_per_step": conv_ms, "convolution_tflops": conv_tflops, "peak_bf16_tflops": peak,
              "convolution_fraction_of_peak": conv_tflops / peak if conv_tflops and peak else None,
              "groups_percent": {g: 100 * us / total for g, us in sorted(groups.items(), key=lambda x: -x[1])},
              "top": [{"name": n[:120], "percent": 100 * us / total, "calls_per_step": c / steps}
                      for n, us, c in sorted(rows, key=lambda r: -r[1])[:15]]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model_type} batch {args.batch_size} {args.image_size}px on {result['device']}, {result['step']} "
          f"step (compiled: {compiled}): {per_step_ms:.2f} ms of {'device' if cuda else 'CPU'} time per step "
          f"-> {result['img_per_s_if_busy']:.0f} img/s if the device never idles; {wall_ms:.2f} ms of wall time "
          f"({result['img_per_s']:.0f} img/s" + (f", the device busy {result['device_busy_percent']:.0f} % of it)"
                                                  if cuda else ")"))
    for g, pct in result["groups_percent"].items():
        print(f"  {g:<26}{pct:6.1f}%")
    if conv_tflops:
        of_peak = f", {100 * conv_tflops / peak:.0f}% of a bf16 matmul's {peak:.0f} TFLOP/s" if peak else ""
        print(f"convolutions: {flops_per_step / 1e9:.1f} GFLOP in {conv_ms:.2f} ms per step = "
              f"{conv_tflops:.2f} TFLOP/s{of_peak}")
    print("top kernels:")
    for row in result["top"]:
        print(f"  {row['percent']:5.1f}%  x{row['calls_per_step']:<5.0f} {row['name']}")


if __name__ == "__main__":
    main()
