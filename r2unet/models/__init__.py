from .blocks import DEFAULT_T, AttentionGate, ConvBlock, RecurrentBlock, RRCNNBlock, UpConv
from .registry import MODELS, RECURRENT, create_model, list_models
from .unet import SIZE_MULTIPLE, AttU_Net, R2AttU_Net, R2U_Net, U_Net, UNetFamily

__all__ = [
    "DEFAULT_T", "AttU_Net", "AttentionGate", "ConvBlock", "MODELS", "R2AttU_Net", "R2U_Net", "RECURRENT", "RRCNNBlock",
    "RecurrentBlock", "SIZE_MULTIPLE", "U_Net", "UNetFamily", "UpConv", "create_model", "list_models",
]
