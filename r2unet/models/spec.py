"""What the rest of the package (and the command line) needs to know about the networks without building one: their
names, which are recurrent, the default recurrence and width, and the input-size multiple. No torch here:
``r2unet --help`` must answer without importing it."""

from ..defaults import BASE_CHANNELS, T

# the reference's names, in its order, each (recurrent, attention): one family (``unet.UNetFamily``) whose
# constructors of these names ``registry.MODELS`` maps to
FAMILY = {"U_Net": (False, False), "R2U_Net": (True, False), "AttU_Net": (False, True), "R2AttU_Net": (True, True)}
MODEL_NAMES = tuple(FAMILY)
RECURRENT = frozenset(name for name, (recurrent, _) in FAMILY.items() if recurrent)

# Recurrence steps and first-stage width unless given (``r2unet.defaults`` says why)
DEFAULT_T, DEFAULT_BASE_CHANNELS = T, BASE_CHANNELS

DEPTH = 5  # encoder stages; the input side must be divisible by 2 ** (DEPTH - 1) = 16
SIZE_MULTIPLE = 2 ** (DEPTH - 1)


def list_models() -> list[str]:
    return list(MODEL_NAMES)
