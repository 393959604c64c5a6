"""Where a training step's device time goes: torch.profiler over a few steps of the model-only step in the fast
configuration (bf16, channels_last, fused Adam, compiled on GPUs), kernels grouped into convolutions, compiler-fused
elementwise/normalisation kernels, other elementwise work, the optimizer and copies. Run by gpu_check.sh.

It also prints the convolutions' throughput: the step's FLOPs (torch.utils.flop_counter counts only convolutions
here) over the convolution kernels' device time, as a fraction of a large bf16 matmul's measured rate. That fraction
is the ``e`` of benchmarks/README.md, which decides whether 550 img/s is reachable.

    python benchmarks/profile_step.py [--model_type R2U_Net --batch_size 16 --image_size 224 --device cuda]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from r2unet.commands.bench import FAST, model_step, train_flops_per_image
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
    parser.add_argument("--compile", choices=["on", "off"], default=None, help="default: on for CUDA")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dev = torch.device(args.device)
    compiled = (args.compile or ("on" if dev.type == "cuda" else "off")) == "on"
    configure_backends(dev)
    step, model = model_step(args.model_type, args.t, args.base_channels, args.image_size, args.batch_size, dev,
                             **FAST, compile_model=compiled)
    flops_per_step = train_flops_per_image(model, args.batch_size, args.image_size) * args.batch_size
    for _ in range(5):  # compilation, cuDNN autotuning, allocator warm-up
        step()
    synchronize(dev)
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(args.steps):
            step()
        synchronize(dev)
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    # on a GPU, the kernels' own rows only: a CPU operator's "self device time" repeats the kernels it launched
    rows = [(e.key, getattr(e, attr, 0.0), e.count) for e in events if getattr(e, attr, 0.0) > 0
            and (not cuda or e.device_type != torch.autograd.DeviceType.CPU)]
    total = sum(r[1] for r in rows) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for name, us, _ in rows:
        groups[group_of(name)] += us
    per_step_ms = total / 1e3 / args.steps
    conv_ms = groups.get("convolution", 0.0) / 1e3 / args.steps
    conv_tflops = flops_per_step / (conv_ms * 1e-3) / 1e12 if conv_ms else None
    peak = peak_tflops(dev)[0] if cuda else None
    result = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "compiled": compiled,
              "model_type": args.model_type, "batch_size": args.batch_size, "image_size": args.image_size,
              "device_ms_per_step": per_step_ms, "img_per_s_if_busy": args.batch_size / per_step_ms * 1e3,
              "convolution_ms_per_step": conv_ms, "convolution_tflops": conv_tflops, "peak_bf16_tflops": peak,
              "convolution_fraction_of_peak": conv_tflops / peak if conv_tflops and peak else None,
              "groups_percent": {g: 100 * us / total for g, us in sorted(groups.items(), key=lambda x: -x[1])},
              "top": [{"name": n[:120], "percent": 100 * us / total, "calls_per_step": c / args.steps}
                      for n, us, c in sorted(rows, key=lambda r: -r[1])[:15]]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model_type} batch {args.batch_size} {args.image_size}px on {result['device']} "
          f"(compiled: {compiled}): {per_step_ms:.2f} ms of {'device' if cuda else 'CPU'} time per step "
          f"-> {result['img_per_s_if_busy']:.0f} img/s if the device never idles")
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
