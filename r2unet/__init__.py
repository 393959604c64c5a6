"""r2unet: R2U-Net and its family (U-Net, Attention U-Net, Attention R2U-Net) for medical image segmentation."""

from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models"]
