"""Model names -> constructors. ``create_model`` is the one way the rest of the package builds a network."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .spec import DEFAULT_T, MODEL_NAMES, RECURRENT
from .unet import AttU_Net, R2AttU_Net, R2U_Net, U_Net

MODELS: dict[str, Callable[..., nn.Module]] = {
    "U_Net": U_Net,
    "R2U_Net": R2U_Net,
    "AttU_Net": AttU_Net,
    "R2AttU_Net": R2AttU_Net,
}
assert tuple(MODELS) == MODEL_NAMES, "spec.MODEL_NAMES lists the networks, in this order"


def create_model(
    name: str, img_ch: int = 3, output_ch: int = 1, t: int = DEFAULT_T, base_channels: int = 64
) -> nn.Module:
    """Build a network by its reference name (``U_Net``, ``R2U_Net``, ``AttU_Net``, ``R2AttU_Net``).

    ``t`` (recurrence steps, >= 1) applies to the recurrent networks only and is ignored by the others.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(MODELS)}")
    if name in RECURRENT:
        if int(t) < 1:
            raise ValueError(f"t (recurrence steps) must be >= 1, got {t}")
        return MODELS[name](img_ch=img_ch, output_ch=output_ch, t=int(t), base_channels=base_channels)
    return MODELS[name](img_ch=img_ch, output_ch=output_ch, base_channels=base_channels)
