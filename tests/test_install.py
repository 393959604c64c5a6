"""The install keeps a CPU machine on PyTorch's CPU build: no extra asks for torch or torchvision again (pip would
take the CUDA build for that second requirement), and an environment whose torch is a CPU build holds no CUDA
package after the README's commands. ``.ci/run`` makes such an environment and runs this file in it."""

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TORCH_BUILDS = {"torch", "torchvision", "torchaudio"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_no_extra_asks_for_torch_again():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert "torch" in {_name(r) for r in project["dependencies"]}  # the one place torch is named
    for extra, requirements in project["optional-dependencies"].items():
        named = {_name(r) for r in requirements} & TORCH_BUILDS
        assert not named, f"the extra [{extra}] requires {named}: on a CPU-only machine it pulls the CUDA build"


def test_a_cpu_build_of_torch_leaves_no_cuda_package_installed():
    if torch.version.cuda is not None:
        pytest.skip(f"this environment's torch ({torch.__version__}) is a CUDA build; .ci/run checks a CPU-only one")
    installed = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    cuda = sorted(n for n in installed if n.startswith("nvidia-") or n in ("triton", "pytorch-triton"))
    assert not cuda, f"CUDA packages in a CPU-only environment: {cuda}"
    assert "r2unet" in installed
