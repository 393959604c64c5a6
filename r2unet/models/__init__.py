"""The networks. The names, the recurrence default and the size multiple (``spec``) import without torch; the
modules themselves load on first use, so the command line's help answers without importing torch."""

from importlib import import_module

from .spec import DEFAULT_T, MODEL_NAMES, RECURRENT, SIZE_MULTIPLE, list_models

_LAZY = {"AttentionGate": "blocks", "ConvBlock": "blocks", "RecurrentBlock": "blocks", "RRCNNBlock": "blocks",
         "UpConv": "blocks", "MODELS": "registry", "create_model": "registry", "UNetFamily": "unet",
         **dict.fromkeys(MODEL_NAMES, "unet")}

__all__ = ["DEFAULT_T", "MODEL_NAMES", "RECURRENT", "SIZE_MULTIPLE", "list_models", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
