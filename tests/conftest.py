import os

import pytest
import torch

from r2unet.engine import runtime
from r2unet.engine.runtime import CpuInfo

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CPU_KINDS = {"AMX": CpuInfo(vector_isa="AVX512", amx=True, avx512_bf16=True, onednn_limit=None),
             "AVX2": CpuInfo(vector_isa="AVX2", amx=False, avx512_bf16=False, onednn_limit=None)}


@pytest.fixture
def cpu_like(monkeypatch):
    """``cpu_like("AVX2")`` (or "AMX"): the device policy sees a CPU of that kind (what it decides, not how fast the
    kernels are: they still run on this machine), so both kinds' choices are tested on any machine."""

    real_peak = runtime.peak_tflops

    def use(kind: str) -> CpuInfo:
        info = CPU_KINDS[kind]
        monkeypatch.setattr(runtime, "cpu_info", lambda: info)
        # a small matmul: a bf16 one where this machine emulates bf16 would take a minute at the full size
        monkeypatch.setattr(runtime, "peak_tflops", lambda device, n=None: real_peak(device, 128))
        monkeypatch.setattr(CpuInfo, "native_bf16", property(lambda self: self.amx or self.avx512_bf16))
        return info

    return use


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


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 256 KiB tmpfs: a full disk for real (needs root and mount; skipped, saying so, elsewhere)."""
    import subprocess

    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root and mount needed): {mounted.stderr.strip()[:120]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
