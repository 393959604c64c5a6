"""Model names -> constructors. ``create_model`` is the one way the rest of the package builds a network."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import unet
from .spec import DEFAULT_BASE_CHANNELS, DEFAULT_T, MODEL_NAMES, RECURRENT

MODELS: dict[str, Callable[..., nn.Module]] = {name: getattr(unet, name) for name in MODEL_NAMES}


def create_model(
    name: str, img_ch: int = 3, output_ch: int = 1, t: int = DEFAULT_T, base_channels: int = DEFAULT_BASE_CHANNELS,
    step_stats: bool = False,
) -> nn.Module:
    """Build a network by its reference name (``U_Net``, ``R2U_Net``, ``AttU_Net``, ``R2AttU_Net``).

    ``t`` (recurrence steps, >= 1) and ``step_stats`` (BatchNorm statistics per recurrence step) apply to the
    recurrent networks only and are ignored by the others.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(MODELS)}")
    if name in RECURRENT:
        if int(t) < 1:
            raise ValueError(f"t (recurrence steps) must be >= 1, got {t}")
        return MODELS[name](img_ch=img_ch, output_ch=output_ch, t=int(t), base_channels=base_channels,
                            step_stats=step_stats)
    return MODELS[name](img_ch=img_ch, output_ch=output_ch, base_channels=base_channels)
