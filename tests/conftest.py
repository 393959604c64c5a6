import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def prepared_synthetic(root, num_images: int, seed: int, max_side: int, split_seed: int = 0, name: str = "data"):
    """Synthetic lesions under ``root/raw``, split by ``prepare`` into ``root/<name>`` (returned)."""
    from r2unet.data.prepare import prepare_split
    from r2unet.data.synth import IMAGE_DIR, MASK_DIR, generate_dataset

    generate_dataset(root / "raw", num_images=num_images, seed=seed, max_side=max_side)
    prepare_split(root / "raw" / IMAGE_DIR, root / "raw" / MASK_DIR, data_path=root / name, seed=split_seed,
                  log=lambda *_: None)
    return root / name


@pytest.fixture
def tiny_data(tmp_path_factory):
    """A small synthetic dataset already split by `prepare` (shared helper for data/engine tests)."""
    return prepared_synthetic(tmp_path_factory.mktemp("data"), 20, seed=3, max_side=200, split_seed=1, name="split")
