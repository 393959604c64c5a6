"""What a run will cost, said before it starts: the memory estimate against what the process may take (a run that
cannot fit stops, naming settings that do fit), the step time from a probe, the first steps' pace, a signal
acknowledged during a long operation, and the presets."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import prepared_synthetic

from r2unet.engine import budget
from r2unet.engine.config import ConfigError, TrainConfig
from r2unet.engine.runtime import memory_available, placement
from r2unet.engine.settings import train_settings
from r2unet.engine.trainer import SignalNotice
from r2unet.progress import EpochLines

resource = pytest.importorskip("resource", reason="process memory limits (ulimit) are POSIX-only")

# a network and size whose steps a 2.5 GB address limit holds only at a small batch, in float32 on every CPU
HEAVY = ["--base_channels", "16", "--image_size", "128", "--amp", "off", "--num_workers", "0", "--num_epochs", "1",
         "--max_steps_per_epoch", "2", "--warmup_steps", "0", "--device", "cpu"]
DATA_LIMIT = 2500 * 2**20  # ulimit -d: what the trainer process may map privately


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("budget"), 28, seed=4, max_side=160)


def _train_limited(data, out, *flags):
    """``r2unet train`` in a process whose private memory is limited (``ulimit -d``), as a small machine or a
    cgroup would; its exit status and output."""
    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "r2unet", "train", "--data_path", str(data), "--output_dir",
                           str(out), *HEAVY, *flags], capture_output=True, text=True, env=env, preexec_fn=limit,
                          timeout=600)


def test_a_run_that_cannot_fit_stops_before_training_and_the_batch_it_names_trains(data, tmp_path):
    done = _train_limited(data, tmp_path / "big", "--batch_size", "64")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "not enough memory for this run: a training step needs about" in out
    assert "left under this process's limit (ulimit -d) of 2.4 GB" in out and "Traceback" not in out
    assert not (tmp_path / "big" / "checkpoints").exists()  # stopped before any training
    assert not (data / ".r2unet_cache").exists()  # and before the caches were built
    fits = re.search(r"Settings that fit, with 10% to spare: --batch_size (\d+); or --image_size (\d+)", out)
    assert fits, out
    batch = int(fits.group(1))
    assert 1 <= batch < 64 and int(fits.group(2)) < 128
    ok = _train_limited(data, tmp_path / "fits", "--batch_size", str(batch))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "memory: a training step needs about" in ok.stdout
    assert json.loads((tmp_path / "fits" / "results.json").read_text())["global_batch_size"] == batch

    # past the estimate (--no_memory_check), the failed allocation is said, last.pt kept, and no traceback shown
    over = _train_limited(data, tmp_path / "over", "--batch_size", str(3 * batch), "--no_memory_check")
    out = over.stdout + over.stderr
    assert over.returncode == 2, out
    assert "error: out of memory in epoch 1, step 1" in out and "Traceback" not in out
    assert (tmp_path / "over" / "checkpoints" / "last.pt").is_file()


def test_the_memory_available_counts_the_process_limit():
    script = textwrap.dedent("""
        import resource
        from r2unet.engine.runtime import memory_available
        resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))
        room, source = memory_available()
        print(room, source)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    room, source = done.stdout.split(" ", 1)
    assert 0 < int(room) < 3 * 2**30 and "ulimit -d" in source, done.stderr
    unlimited = memory_available()
    assert unlimited is None or unlimited[0] > 0


def test_the_estimate_covers_what_a_real_step_takes():
    """The peak resident memory of two real training steps grows by no more than the estimate (and not by far
    less: an estimate ten times too high would stop runs that fit)."""
    script = textwrap.dedent("""
        import json, torch
        from r2unet.engine.budget import estimate_memory
        from r2unet.engine.config import TrainConfig
        from r2unet.engine.loop import build_model
        from r2unet.engine.runtime import placement
        cfg = TrainConfig(base_channels=16, t=2, image_size=128, batch_size=4, amp="off")
        model = build_model(cfg)
        opt = torch.optim.Adam(model.parameters(), fused=True)
        x, y = torch.randn(4, 3, 128, 128), torch.rand(4, 1, 128, 128).round()
        before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
        for _ in range(2):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
        # VmHWM: this process's own peak (ru_maxrss starts at the parent's size: Linux keeps it across fork + exec,
        # so a test suite grown large would be counted)
        grew = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024 - before
        print(json.dumps([grew, estimate_memory(cfg, placement(cfg, torch.device("cpu")), 4).need]))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    grew, need = json.loads(done.stdout)
    assert grew <= need <= 4 * grew, (grew, need)


def test_activations_scale_with_batch_and_pixels_and_halve_in_bf16():
    cfg = TrainConfig(base_channels=8, t=2, image_size=64)
    one, _ = budget.saved_bytes(cfg, 64, 1, None)
    assert budget.saved_bytes(cfg, 64, 4, None)[0] == pytest.approx(4 * one, rel=0.01)
    assert budget.saved_bytes(cfg, 128, 1, None)[0] == pytest.approx(4 * one, rel=0.02)
    assert budget.saved_bytes(cfg, 64, 1, torch.bfloat16)[0] == pytest.approx(one / 2, rel=0.02)
    before = torch.get_rng_state()
    budget.estimate_memory(cfg, placement(cfg, torch.device("cpu")), 2)
    budget.probe_step_seconds(cfg, placement(cfg, torch.device("cpu")), 2)
    assert torch.equal(before, torch.get_rng_state())  # a run's random numbers are untouched by either


def test_settings_that_fit_each_fit_and_name_the_flag():
    cfg = TrainConfig(base_channels=16, t=2, image_size=128, batch_size=32, amp="off")
    place = placement(cfg, torch.device("cpu"))
    room = int(budget.estimate_memory(cfg, place, 32).need / 3 * (1 - budget.SPARE))
    fits = budget.fitting_settings(cfg, place, 32, int(room / (1 - budget.SPARE)), world=1)
    assert [f.split()[0] for f in fits] == ["--batch_size", "--image_size", "--base_channels"]
    batch, size, width = (int(f.split()[1]) for f in fits)
    assert budget.estimate_memory(cfg, place, batch).need <= room < budget.estimate_memory(cfg, place, batch + 1).need
    assert budget.estimate_memory(cfg, place, 32, size=size).need <= room
    assert budget.estimate_memory(cfg, place, 32, size=size + 16).need > room
    assert budget.estimate_memory(cfg, place, 32, base_channels=width).need <= room


def test_a_train_log_says_the_step_time_and_shows_the_first_step(tiny_data, tmp_path):
    from r2unet.engine.trainer import fit

    lines = []
    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, batch_size=2, num_epochs=2,
                      num_epochs_decay=1, num_workers=0, device="cpu", data_path=str(tiny_data),
                      output_dir=str(tmp_path / "run"), log_every=50)
    fit(cfg, log=lines.append)
    text = "\n".join(lines)
    assert re.search(r"time: a step of 2 images takes about [\d.e-]+ s on this CPU \(probed at 32x32\), an epoch of "
                     r"\d+ steps? about \S+, 2 epochs about", text), text
    # with --log_every 50, longer than the epoch: the first step is shown anyway, in the first epoch only
    first = [line for line in lines if re.match(r"\s+epoch \d/2\s+step 1/", line)]
    assert len(first) == 1 and first[0].lstrip().startswith("epoch 1/2") and "the first with start-up" in first[0]


def test_epoch_lines_show_the_first_two_log_points_then_one_a_minute():
    said = []
    lines = EpochLines(said.append, epoch=0, num_epochs=3, total_steps=100, first_step=0, images_per_step=8,
                       early=True)
    for steps in (1, 10, 20, 30):
        lines(type("State", (), {"steps": steps})(), 0.5)
    assert [line.split("step ")[1].split()[0] for line in said] == ["1/100", "10/100"]
    quiet = EpochLines(said.append, 1, 3, 100, 0, 8)
    quiet(type("State", (), {"steps": 1})(), 0.5)
    assert len(said) == 2


def test_a_signal_is_acknowledged_while_a_long_operation_still_runs():
    """Python runs a handler only after the running operation returns; the notice comes from the wake-up pipe at
    once, while the main thread is still inside one long call into PyTorch (sized here to last about 2 s)."""
    a = torch.randn(2500, 2500) / 2500**0.5
    start = time.perf_counter()
    a @ a
    squarings = min(200, max(4, round(2.0 / max(time.perf_counter() - start, 1e-4))))
    said, handled = [], []
    old = signal.signal(signal.SIGTERM, lambda *_: handled.append(time.perf_counter()))
    try:
        with SignalNotice(lambda name: said.append((name, time.perf_counter()))) as notice:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
            torch.linalg.matrix_power(a, 2**min(squarings, 60))
            time.sleep(0.3)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert said and said[0][0] == "SIGTERM"
    # its thread is gone when the block ends: a daemon thread letting go of a training run's tensors while the
    # interpreter shut down aborted 1 process in 5 ("terminate called without an active exception")
    assert not notice.thread.is_alive()
    # the handler ran when the call returned (about 1.7 s after the signal); the notice came long before
    assert handled and handled[0] - said[0][1] > 0.1


def test_presets_fill_settings_the_flags_and_config_file_override(tmp_path):
    laptop = train_settings({"preset": "laptop"})
    assert (laptop.base_channels, laptop.image_size, laptop.t, laptop.num_epochs) == (16, 128, 2, 30)
    assert laptop.int8 == "on" and train_settings({}).int8 == "off"  # the laptop's run ends with its fast model
    given = train_settings({"preset": "laptop", "batch_size": 4, "image_size": 96})
    assert (given.batch_size, given.image_size, given.base_channels) == (4, 96, 16)
    config = tmp_path / "c.yaml"
    config.write_text("preset: laptop\nnum_epochs: 10\n")
    from_file = train_settings({"config": str(config)})
    assert (from_file.base_channels, from_file.num_epochs, from_file.num_epochs_decay) == (16, 10, 10)
    gpu = train_settings({"preset": "gpu"})
    assert (gpu.base_channels, gpu.image_size, gpu.num_epochs) == (64, 224, 150)
    with pytest.raises(ConfigError, match="--preset: must be one of laptop, gpu"):
        train_settings({"preset": "desktop"})
