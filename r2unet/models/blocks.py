"""Building blocks shared by the U-Net family.

Attribute names and the order in which sub-modules are registered mirror the reference implementation
(LeeJunHyun/Image_Segmentation, ``network.py``) exactly, because they define ``state_dict`` keys: a checkpoint saved by
the reference loads into these modules with ``strict=True``. Do not rename or reorder them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import DEFAULT_T


def _conv_bn_relu(ch_in: int, ch_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
        nn.BatchNorm2d(ch_out),
        nn.ReLU(inplace=True),
    ]


class ConvBlock(nn.Module):
    """Two (3x3 conv -> BatchNorm -> ReLU) layers: the plain U-Net stage (reference ``conv_block``)."""

    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(ch_in, ch_out), *_conv_bn_relu(ch_out, ch_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConv(nn.Module):
    """Nearest-neighbour x2 upsampling followed by 3x3 conv -> BatchNorm -> ReLU (reference ``up_conv``)."""

    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), *_conv_bn_relu(ch_in, ch_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class RecurrentBlock(nn.Module):
    """Recurrent convolutional layer (RCL) of R2U-Net, https://arxiv.org/abs/1802.06955.

    One conv -> BN -> ReLU unit is *shared* across the ``t`` recurrence steps, exactly as the reference does::

        h = f(x);  repeat t times: h = f(x + h)

    so ``f`` is applied ``t + 1`` times with the same weights (and the same BatchNorm, whose running statistics are
    therefore updated ``t + 1`` times per forward pass in training mode, as in the reference).

    ``step_stats``: each of the ``t + 1`` applications normalises with running statistics of its own
    (``step_norms``, BatchNorms without weights; the shared BatchNorm's scale and shift still apply). In training
    nothing changes (a batch is normalised by its own statistics); in evaluation each step's inputs are normalised
    as training saw them, where the shared statistics average ``t + 1`` different distributions. The weights are
    the reference's; the extra statistics are extra keys (``step_norms.k.running_mean`` ...), which a reference
    checkpoint gets from its shared ones on loading (``checkpoint.load_weights``). Its saved shared statistics are
    the steps' averaged (``_shared_from_steps``), so the reference code can run a checkpoint without the extra keys.
    """

    def __init__(self, ch_out: int, t: int = DEFAULT_T, step_stats: bool = False):
        super().__init__()
        if t < 1:
            raise ValueError(f"t (recurrence steps) must be >= 1, got {t}")
        self.t = t
        self.conv = nn.Sequential(*_conv_bn_relu(ch_out, ch_out))
        self.step_norms = nn.ModuleList(nn.BatchNorm2d(ch_out, affine=False) for _ in range(t + 1)) \
            if step_stats else None
        if step_stats:
            self.register_state_dict_post_hook(_shared_from_steps)

    def _unit(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.step_norms is None:
            return self.conv(x)
        conv, shared, relu = self.conv
        norm = self.step_norms[step]
        # one batch_norm call with this step's statistics and the shared scale and shift, as nn.BatchNorm2d makes it
        # (a separate multiply-add cost 50 % more per bf16 step on a CPU); momentum None: a cumulative average
        factor = 0.0
        if norm.training:
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        return relu(F.batch_norm(conv(x), norm.running_mean, norm.running_var, shared.weight, shared.bias,
                                 norm.training, factor, norm.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._unit(x, 0)
        for step in range(1, self.t + 1):
            h = self._unit(x + h, step)
        return h


def _shared_from_steps(block: RecurrentBlock, state: dict, prefix: str, _metadata) -> None:
    """The shared BatchNorm's statistics in a saved state of a block with per-step statistics: the mean over the
    steps of their means and of their variances, what the reference's shared statistics hold after training (each
    step updates them in turn). The block's own buffers are left as they are (it never reads them)."""
    steps = block.step_norms
    state[f"{prefix}conv.1.running_mean"] = torch.stack([n.running_mean for n in steps]).mean(0)
    state[f"{prefix}conv.1.running_var"] = torch.stack([n.running_var for n in steps]).mean(0)


class RRCNNBlock(nn.Module):
    """Recurrent residual block: 1x1 conv to ``ch_out``, two RecurrentBlocks, and a residual connection."""

    def __init__(self, ch_in: int, ch_out: int, t: int = DEFAULT_T, step_stats: bool = False):
        super().__init__()
        # Registration order (RCNN before Conv_1x1) matches the reference's state_dict order.
        self.RCNN = nn.Sequential(RecurrentBlock(ch_out, t=t, step_stats=step_stats),
                                  RecurrentBlock(ch_out, t=t, step_stats=step_stats))
        self.Conv_1x1 = nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv_1x1(x)
        return x + self.RCNN(x)


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net, https://arxiv.org/abs/1804.03999 (reference ``Attention_block``).

    Args:
        F_g: channels of the gating signal ``g`` (from the decoder).
        F_l: channels of the skip connection ``x`` (from the encoder).
        F_int: channels of the intermediate projection.
    """

    def __init__(self, F_g: int, F_l: int, F_int: int):
        super().__init__()
        self.W_g = nn.Sequential(nn.Conv2d(F_g, F_int, kernel_size=1, bias=True), nn.BatchNorm2d(F_int))
        self.W_x = nn.Sequential(nn.Conv2d(F_l, F_int, kernel_size=1, bias=True), nn.BatchNorm2d(F_int))
        self.psi = nn.Sequential(nn.Conv2d(F_int, 1, kernel_size=1, bias=True), nn.BatchNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        psi = self.psi(self.relu(self.W_g(g) + self.W_x(x)))  # (B, 1, H, W) in [0, 1]
        return x * psi
