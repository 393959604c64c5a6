"""r2unet: R2U-Net and its family (U-Net, Attention U-Net, Attention R2U-Net) for medical image segmentation."""

from .models.spec import list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name: str):
    if name == "create_model":  # loads torch: only when a network is built
        from .models.registry import create_model

        return create_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
