"""The floors of one training image (METHOD: count before measuring): FLOPs, and the bytes a step moves through
memory, counted on the CPU under bf16 autocast with channels_last, forward + backward.

    python benchmarks/traffic.py [--image_size 224] [--t 2] [--models R2U_Net ...] [--compiled]

Bytes are counted twice per network, at batch 1 and batch 2: the difference is what each image adds (activations),
the rest is what a step moves whatever its batch (weights, their bf16 copies, weight gradients), so the bytes per
image at batch B are ``per_image + per_step / B``.

- *unfused*: each operator's tensor outputs (written) and inputs (read), views excluded: what an eager step moves when
  every operator reads its inputs from memory and writes its outputs once (a lower bound for eager kernels: batch
  norm, for one, really reads its input twice, for the statistics and for the normalisation);
- ``--compiled``: the bytes inductor's own cost model counts for the kernels it generates for the compiled step
  (``torch.compile``, CPU code generation; on a GPU the fusion decisions are made by the same scheduler but may
  differ in detail). Compiling takes about 1.5 min per network and batch on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from r2unet.models import create_model, list_models

_VIEWS = {torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.t, torch.ops.aten.detach,
          torch.ops.aten.permute, torch.ops.aten.expand, torch.ops.aten.as_strided, torch.ops.aten.transpose,
          torch.ops.aten.unsqueeze, torch.ops.aten.squeeze, torch.ops.aten.slice, torch.ops.aten.alias}


class _Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.written = self.read = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in _VIEWS:
            return out
        self.ops += 1
        self.written += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.read += sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs))[0]
                         if isinstance(t, torch.Tensor))
        return out


def _step(model, batch: int, image_size: int, mode=None) -> None:
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with mode if mode is not None else contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), torch.zeros_like(logits, dtype=torch.float32)).backward()


def _model(name: str, t: int):
    return create_model(name, t=t).to(memory_format=torch.channels_last)


def eager_counts(name: str, t: int, image_size: int, batch: int) -> tuple[float, int, int, int]:
    """FLOPs, bytes written, bytes read and the operator count of one unfused step at ``batch``."""
    model = _model(name, t)
    traffic, flops = _Traffic(), FlopCounterMode(display=False)
    for mode in (traffic, flops):  # one pass each: stacked modes would see each other's operators
        _step(model, batch, image_size, mode)
        model.zero_grad(set_to_none=True)
    return flops.get_total_flops(), traffic.written, traffic.read, traffic.ops


def compiled_counts(name: str, t: int, image_size: int, batch: int) -> dict[str, int]:
    """Bytes inductor counts for the kernels of one compiled step, by group: convolutions forward and backward
    (cuDNN / oneDNN calls), the generated kernels (batch norm, ReLU, adds, ... fused), the rest."""
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics

    torch._dynamo.reset()
    inductor_config.fx_graph_cache = False  # count a fresh compilation, not a cache hit (which records nothing)
    # inductor records the byte counts only while its metrics log is on; keep the (very long) records off the screen
    torch._logging.set_logs(inductor_metrics=True)
    metrics_log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    metrics_log.addFilter(_drop)
    try:
        metrics.reset()
        _step(torch.compile(_model(name, t), dynamic=False), batch, image_size)
        groups: collections.Counter = collections.Counter()
        for node, num_elem in metrics.nodes_num_elem:  # (node, bytes // 4), see GraphLowering.count_bytes
            kernel = str(getattr(getattr(node, "node", None), "python_kernel_name", "") or "")
            if "convolution_backward" in kernel:
                group = "convolution backward"
            elif "convolution" in kernel:
                group = "convolution forward"
            elif type(node).__name__ == "ExternKernelSchedulerNode":
                group = "other library calls"
            else:
                group = "generated kernels"
            groups[group] += num_elem * 4
        return groups
    finally:
        metrics_log.removeFilter(_drop)
        torch._logging.set_logs()


def _drop(record) -> bool:
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--t", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--compiled", action="store_true", help="also count the compiled step's kernels (slow)")
    args = parser.parse_args()
    gb = 1e9
    print(f"training step at {args.image_size}x{args.image_size}, bf16 autocast, channels_last, t={args.t}; "
          "bytes per image + per step (batch-independent):")
    for name in args.models:
        f1, w1, r1, ops = eager_counts(name, args.t, args.image_size, 1)
        _, w2, r2, _ = eager_counts(name, args.t, args.image_size, 2)
        print(f"  {name:<11} {f1 / gb:7.1f} GFLOP/image  {ops:4d} operators  unfused: "
              f"{(w2 - w1) / gb:5.2f} GB written + {(r2 - r1) / gb:5.2f} GB read per image, "
              f"+ {(2 * (w1 + r1) - (w2 + r2)) / gb:5.2f} GB per step")
        if args.compiled:
            c1 = compiled_counts(name, args.t, args.image_size, 1)
            c2 = compiled_counts(name, args.t, args.image_size, 2)
            for group in sorted(set(c1) | set(c2)):
                print(f"  {'':<11} compiled, {group:<21} {(c2[group] - c1[group]) / gb:5.2f} GB per image "
                      f"+ {(2 * c1[group] - c2[group]) / gb:5.2f} GB per step")
            total1, total2 = sum(c1.values()), sum(c2.values())
            print(f"  {'':<11} compiled, {'total':<21} {(total2 - total1) / gb:5.2f} GB per image "
                  f"+ {(2 * total1 - total2) / gb:5.2f} GB per step")


if __name__ == "__main__":
    main()
