"""The seed's split command, as its README types it: ``python3 dataset.py`` with its eleven flags (--origin_data_path
--origin_GT_path --train_path --train_GT_path --valid_path --valid_GT_path --test_path --test_GT_path --train_ratio
--valid_ratio --test_ratio). It is ``r2unet prepare`` with the same flags and defaults; it runs from a clone of this
repository without installing the package."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from r2unet.commands.cli import main  # noqa: E402 - after the path above

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
