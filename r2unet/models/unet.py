"""The U-Net family: U-Net, R2U-Net, Attention U-Net and Attention R2U-Net as options of one network.

- U-Net: Ronneberger et al., https://arxiv.org/abs/1505.04597
- R2U-Net: Alom et al., https://arxiv.org/abs/1802.06955 (recurrent residual stages)
- Attention U-Net: Oktay et al., https://arxiv.org/abs/1804.03999 (attention gates on the skip connections)

Module names follow the reference implementation so that its ``state_dict`` files load unchanged:
encoder stages are ``Conv1..Conv5`` (``RRCNN1..RRCNN5`` when recurrent), decoder stages ``Up5..Up2`` (up-sampling),
``Att5..Att2`` (attention gates) and ``Up_conv5..Up_conv2`` (``Up_RRCNN5..Up_RRCNN2`` when recurrent).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import AttentionGate, ConvBlock, RRCNNBlock, UpConv
from .spec import DEFAULT_BASE_CHANNELS, DEFAULT_T, DEPTH, SIZE_MULTIPLE


class UNetFamily(nn.Module):
    """Encoder-decoder segmentation network returning logits of shape (B, output_ch, H, W).

    Args:
        img_ch: input channels (3 for RGB).
        output_ch: output channels (1 for binary segmentation; apply ``sigmoid`` for probabilities).
        recurrent: use recurrent residual (RRCNN) stages instead of plain double-conv stages (R2U-Net).
        attention: gate each skip connection with an attention gate (Attention U-Net).
        t: recurrence steps of each recurrent block (only with ``recurrent``).
        step_stats: BatchNorm statistics of their own for each recurrence step (``blocks.RecurrentBlock``).
        base_channels: width of the first stage; stage ``i`` has ``base_channels * 2**i`` channels (64 -> 64..1024).
    """

    def __init__(
        self,
        img_ch: int = 3,
        output_ch: int = 1,
        *,
        recurrent: bool = False,
        attention: bool = False,
        t: int = DEFAULT_T,
        base_channels: int = DEFAULT_BASE_CHANNELS,
        step_stats: bool = False,
    ):
        super().__init__()
        for name, value in (("img_ch", img_ch), ("output_ch", output_ch), ("base_channels", base_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if attention and base_channels < 2:
            raise ValueError("base_channels must be >= 2 with attention gates (their width is half the stage's)")
        self.recurrent, self.attention = recurrent, attention
        self.t = t if recurrent else None
        widths = [base_channels * 2**i for i in range(DEPTH)]  # 64, 128, 256, 512, 1024

        def stage(ch_in: int, ch_out: int) -> nn.Module:
            return RRCNNBlock(ch_in, ch_out, t=t, step_stats=step_stats) if recurrent else ConvBlock(ch_in, ch_out)

        self._enc_names = [f"{'RRCNN' if recurrent else 'Conv'}{i + 1}" for i in range(DEPTH)]
        self._dec_names = [f"{'Up_RRCNN' if recurrent else 'Up_conv'}{i + 1}" for i in range(1, DEPTH)]

        # Registration order defines the state_dict order; it mirrors the reference.
        self.Maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        ch_in = img_ch
        for name, width in zip(self._enc_names, widths):
            self.add_module(name, stage(ch_in, width))
            ch_in = width
        for level in range(DEPTH - 1, 0, -1):  # 4, 3, 2, 1 -> modules Up5/Att5/Up_conv5 ... Up2/Att2/Up_conv2
            hi, lo = widths[level], widths[level - 1]
            self.add_module(f"Up{level + 1}", UpConv(hi, lo))
            if attention:
                self.add_module(f"Att{level + 1}", AttentionGate(F_g=lo, F_l=lo, F_int=lo // 2))
            self.add_module(self._dec_names[level - 1], stage(hi, lo))
        self.Conv_1x1 = nn.Conv2d(widths[0], output_ch, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            near = [max(SIZE_MULTIPLE, round(s / SIZE_MULTIPLE) * SIZE_MULTIPLE) for s in (h, w)]
            raise ValueError(
                f"input size {h}x{w} is not divisible by {SIZE_MULTIPLE}; nearest valid size is {near[0]}x{near[1]}"
            )
        skips = []
        for i, name in enumerate(self._enc_names):
            x = getattr(self, name)(x if i == 0 else self.Maxpool(x))
            skips.append(x)  # (B, base*2**i, H/2**i, W/2**i)
        d = skips.pop()
        for level in range(DEPTH - 1, 0, -1):
            d = getattr(self, f"Up{level + 1}")(d)
            skip = skips.pop()
            if self.attention:
                skip = getattr(self, f"Att{level + 1}")(g=d, x=skip)
            d = getattr(self, self._dec_names[level - 1])(torch.cat((skip, d), dim=1))
        return self.Conv_1x1(d)


def U_Net(img_ch: int = 3, output_ch: int = 1, base_channels: int = DEFAULT_BASE_CHANNELS) -> UNetFamily:
    """U-Net (https://arxiv.org/abs/1505.04597)."""
    return UNetFamily(img_ch, output_ch, base_channels=base_channels)


def R2U_Net(img_ch: int = 3, output_ch: int = 1, t: int = DEFAULT_T,
            base_channels: int = DEFAULT_BASE_CHANNELS, step_stats: bool = False) -> UNetFamily:
    """Recurrent residual U-Net (https://arxiv.org/abs/1802.06955)."""
    return UNetFamily(img_ch, output_ch, recurrent=True, t=t, base_channels=base_channels, step_stats=step_stats)


def AttU_Net(img_ch: int = 3, output_ch: int = 1, base_channels: int = DEFAULT_BASE_CHANNELS) -> UNetFamily:
    """Attention U-Net (https://arxiv.org/abs/1804.03999)."""
    return UNetFamily(img_ch, output_ch, attention=True, base_channels=base_channels)


def R2AttU_Net(img_ch: int = 3, output_ch: int = 1, t: int = DEFAULT_T,
               base_channels: int = DEFAULT_BASE_CHANNELS, step_stats: bool = False) -> UNetFamily:
    """Recurrent residual U-Net with attention gates."""
    return UNetFamily(img_ch, output_ch, recurrent=True, attention=True, t=t, base_channels=base_channels,
                      step_stats=step_stats)
