import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_data(tmp_path_factory):
    """A small synthetic dataset already split by `prepare` (shared helper for data/engine tests)."""
    from r2unet.data.prepare import prepare_split
    from r2unet.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("data")
    raw = root / "raw"
    generate_dataset(raw, num_images=20, seed=3, max_side=200)
    prepare_split(raw / "ISIC2018_Task1-2_Training_Input", raw / "ISIC2018_Task1_Training_GroundTruth",
                  data_path=root / "split", seed=1)
    return root / "split"
