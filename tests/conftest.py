import os

import pytest
import torch

from r2unet.engine import runtime
from r2unet.engine.runtime import CpuInfo

# Two threads per test process, or the cores shared out among pytest-xdist's workers so they do not fight over them.
# The processes a test starts get the same count (OMP_NUM_THREADS, read when torch loads): a run in the test's own
# process and one in a subprocess must round alike to end with equal weights.
_threads = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(_threads)
torch.set_num_threads(_threads)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it installed, pytest ignores this
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core, at most four (each may start two training processes of its own)."""
    return max(1, min(4, os.cpu_count() or 1))


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


def eager_and_compiled_steps(device: str, amp: str = "off", channels_last: bool = False, base_channels: int = 4,
                             size: int = 32, whole: bool = True):
    """One ``train`` step (``loop.train_step`` with its non-finite guard, fused Adam and the statistics'
    snapshot) of R2U-Net t=2 from equal weights on one batch, eagerly and through ``CompileWithFallback``. Its
    recurrent blocks apply one BatchNorm three times a forward, so a compiled graph must chain three updates of the
    same running statistics. ``whole`` False: one recurrent residual block and a 1x1 head instead of the network
    (a CPU compiles the whole one in over a minute). Returns ``(eager_model, compiled_model, eager_loss,
    compiled_loss, lr)``; the compiled model is the plain module (its weights), and the step must not have fallen
    back to eager."""
    import copy

    from r2unet.engine.loop import BufferSnapshot, StepBuffers, train_step
    from r2unet.engine.runtime import CompileWithFallback, Precision, place_model
    from r2unet.engine.task import BINARY_TASK
    from r2unet.models import create_model
    from r2unet.models.blocks import RRCNNBlock

    dev = torch.device(device)
    torch.manual_seed(0)
    network = create_model("R2U_Net", t=2, base_channels=base_channels) if whole else \
        torch.nn.Sequential(RRCNNBlock(3, base_channels, t=2), torch.nn.Conv2d(base_channels, 1, 1))
    eager = place_model(network, dev, channels_last)
    plain = copy.deepcopy(eager)
    compiled = CompileWithFallback(plain, log=print)
    x = torch.randn(4, 3, size, size, device=dev)
    y = (torch.rand(4, 1, size, size, device=dev) > 0.5).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"off": None, "bf16": torch.bfloat16}[amp]
    lr, losses = 1e-3, []
    for forward, model in ((eager, eager), (compiled, plain)):
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999), fused=True)
        snapshot = BufferSnapshot(model)
        snapshot.take()
        scaler = torch.amp.GradScaler(dev.type, enabled=False)
        _, loss, finite = train_step(forward, x, y, Precision(dtype, dev), scaler, optimizer, StepBuffers(dev),
                                     BINARY_TASK.loss)
        snapshot.keep_if(finite)
        assert bool(finite)
        losses.append(float(loss.detach()))
    assert not compiled.fell_back
    return eager, plain, losses[0], losses[1], lr


def assert_same_step(eager, compiled, lr: float, stats_tol: float, weights: bool = True) -> None:
    """The two models after one step agree: every running statistic within ``stats_tol`` of the largest of its
    tensor, the same update counts, and (``weights``) the weights moved alike: Adam's first update is +-lr per
    element wherever the gradient is not ~0; elements whose gradient is ~0 may flip, a wrong or skipped update moves
    all of them. Not in bf16: at initialisation on random labels its gradients agree with float32's in sign on
    only ~57 % of the elements, eager or compiled alike (R2U-Net, 16 channels, 64 px, CPU)."""
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers()):
        if a.is_floating_point():
            scale = a.float().abs().max().clamp_min(1e-6)
            assert float((a.float() - b.float()).abs().max() / scale) < stats_tol, name
        else:
            assert torch.equal(a, b), name
    if not weights:
        return
    moved = [((p.detach() - q.detach()).abs() / lr).mean() for (n, p), (_, q)
             in zip(eager.named_parameters(), compiled.named_parameters()) if n.endswith("weight")]
    assert float(torch.stack(moved).mean()) < 0.5
