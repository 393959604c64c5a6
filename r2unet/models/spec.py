"""What the rest of the package (and the command line) needs to know about the networks without building one: their
names, which are recurrent, the default recurrence and the input-size multiple. No torch here: ``r2unet --help``
must answer without importing it."""

# the reference's names, in its order; ``registry.MODELS`` maps each to its constructor
MODEL_NAMES = ("U_Net", "R2U_Net", "AttU_Net", "R2AttU_Net")
RECURRENT = frozenset({"R2U_Net", "R2AttU_Net"})

# Recurrence steps of R2U-Net and Attention R2U-Net unless given: 3, the reference's training default (its main.py
# --t), which trained the reference checkpoints users bring. (Its network constructors default to 2, as the R2U-Net
# paper used; pass t=2 / --t 2 for that.)
DEFAULT_T = 3

DEPTH = 5  # encoder stages; the input side must be divisible by 2 ** (DEPTH - 1) = 16
SIZE_MULTIPLE = 2 ** (DEPTH - 1)


def list_models() -> list[str]:
    return list(MODEL_NAMES)
