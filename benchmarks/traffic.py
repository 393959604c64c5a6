"""The two floors of one training image (METHOD: count before measuring): FLOPs, and the bytes an *unfused* (eager)
step moves through memory, counted per operator with a dispatch mode on the CPU under bf16 autocast.

    python benchmarks/traffic.py [--image_size 224] [--t 2]

Bytes are each operator's tensor outputs (written) and inputs (read), views excluded: what an eager step moves when
every operator reads its inputs from and writes its outputs to device memory once. A compiler that fuses pointwise
operators into their neighbours moves less; the convolutions' own traffic is the part no fusion removes.
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--t", type=int, default=2)
    args = parser.parse_args()
    print(f"per training image at {args.image_size}x{args.image_size}, bf16 autocast, channels_last, t={args.t}:")
    for name in list_models():
        model = create_model(name, t=args.t).to(memory_format=torch.channels_last)
        x = torch.randn(1, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
        traffic, flops = _Traffic(), FlopCounterMode(display=False)
        for mode in (traffic, flops):  # one pass each: stacked modes would see each other's operators
            with mode, torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
                target = torch.zeros_like(logits, dtype=torch.float32)
                F.binary_cross_entropy_with_logits(logits.float(), target).backward()
            model.zero_grad(set_to_none=True)
        print(f"  {name:<11} {flops.get_total_flops() / 1e9:7.1f} GFLOP  {traffic.ops:4d} operators  "
              f"{traffic.written / 1e9:5.2f} GB written + {traffic.read / 1e9:5.2f} GB read (unfused)")


if __name__ == "__main__":
    main()
