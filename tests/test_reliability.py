import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from r2unet import create_model
from r2unet.commands.cli import main
from r2unet.engine import checkpoint as ckpt_mod
from r2unet.engine.checkpoint import CheckpointError, load_file, load_weights, model_state, save_checkpoint
from r2unet.engine.config import TrainConfig
from r2unet.engine.task import BINARY_TASK, BinaryTask

TINY = ["--model_type", "U_Net", "--base_channels", "4", "--image_size", "32", "--batch_size", "2",
        "--num_workers", "0", "--device", "cpu", "--num_epochs_decay", "0", "--log_every", "1"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_file(evil)
    for argv in (["evaluate", "--checkpoint", str(evil), "--data_path", str(tmp_path)],
                 ["predict", "--checkpoint", str(evil), "--input", str(tmp_path), "--output", str(tmp_path / "o")],
                 ["export", "--checkpoint", str(evil), "--output", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # the start of an ONNX protobuf
    for name, message in (("photo.jpg", "not a PyTorch checkpoint"), ("notes.txt", "not a PyTorch checkpoint"),
                          ("empty.pt", "not a PyTorch checkpoint"), ("model.onnx", "is an ONNX model")):
        with pytest.raises(CheckpointError, match=message):
            load_file(tmp_path / name)
    # evaluate takes an exported model too: one that onnxruntime cannot read is named as such
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model.onnx"), "--data_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: not a readable ONNX model" in err and "refusing" not in err
    # both of torch.save's formats still load, and a malicious old-format pickle is still refused
    model = create_model("U_Net", base_channels=4)
    torch.save(model.state_dict(), tmp_path / "old.pkl", _use_new_zipfile_serialization=False)
    assert set(load_file(tmp_path / "old.pkl")) == set(model.state_dict())
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(str(marker))}, tmp_path / "evil_old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_file(tmp_path / "evil_old.pt")
    assert not marker.exists()


def test_wrong_architecture_lists_keys_and_shapes(tmp_path):
    src = create_model("R2U_Net", t=2, base_channels=4)
    torch.save(src.state_dict(), tmp_path / "r2u.pkl")
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("U_Net", base_channels=4), model_state(load_file(tmp_path / "r2u.pkl")), "r2u.pkl")
    text = str(err.value)
    assert "missing keys" in text and "Conv1.conv.0.weight" in text and "unexpected keys" in text
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("R2U_Net", base_channels=8), model_state(load_file(tmp_path / "r2u.pkl")))
    assert "shape mismatches" in str(err.value) and "checkpoint (4, 3, 1, 1) vs model (8, 3, 1, 1)" in str(err.value)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    model = create_model("U_Net", base_channels=4)
    torch.save({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    torch.manual_seed(1)  # another initialisation: the load must replace it
    other = create_model("U_Net", base_channels=4)
    assert not torch.equal(other.Conv1.conv[0].weight, model.Conv1.conv[0].weight)
    load_weights(other, model_state(load_file(tmp_path / "w.pt")))
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = create_model("U_Net", base_channels=4)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=model, config={}, epoch=1)
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint"):
        save_checkpoint(path, model=model, config={}, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_persistent_nan_loss_stops_with_epoch_and_step(tiny_data, tmp_path, monkeypatch):
    from r2unet.engine import trainer

    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, batch_size=2, num_epochs=3,
                      num_epochs_decay=0, num_workers=0, device="cpu", data_path=str(tiny_data),
                      output_dir=str(tmp_path / "run"), log_every=1, max_nonfinite_steps=3)
    real_loss = BinaryTask.loss
    calls = {"n": 0}

    def loss_goes_nan_in_epoch_2(task, logits, target, *options):
        calls["n"] += 1
        loss = real_loss(task, logits, target, *options)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    steps_per_epoch = 14 // 2  # 14 training images of the shared fixture, batch 2
    monkeypatch.setattr(BinaryTask, "loss", loss_goes_nan_in_epoch_2)
    with pytest.raises(trainer.TrainingError, match=r"epoch 2, step 3"):
        trainer.fit(cfg, log=lambda *_: None)
    last = load_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_single_nan_step_does_not_poison_weights(tiny_data, tmp_path, monkeypatch):
    from r2unet.engine import trainer

    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, batch_size=2, num_epochs=1,
                      num_epochs_decay=0, num_workers=0, device="cpu", data_path=str(tiny_data),
                      output_dir=str(tmp_path / "run"), log_every=1, amp="off")
    real_loss = BinaryTask.loss
    calls = {"n": 0}

    def one_nan(task, logits, target, *options):
        calls["n"] += 1
        loss = real_loss(task, logits, target, *options)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(BinaryTask, "loss", one_nan)
    results = trainer.fit(cfg, log=lambda *_: None)
    assert results["test"] is not None and all(v == v for v in results["test"].values())
    last = load_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


class _NaNOnBatches:
    """A training transform whose images turn NaN on the given batches (0-based): a NaN forward pass, which moves
    BatchNorm's running statistics to NaN before any loss or gradient is seen."""

    def __init__(self, transform, bad):
        self.transform, self.bad, self.calls = transform, set(bad), 0
        self.generator = transform.generator

    def __call__(self, batch):
        x, y = self.transform(batch)
        self.calls += 1
        return (x * float("nan") if self.calls - 1 in self.bad else x), y


def test_a_skipped_step_leaves_the_batchnorm_statistics_as_they_were():
    """Skipping a non-finite step protected the weights, but the forward pass had already moved BatchNorm's running
    statistics to NaN, and they stayed NaN for the rest of the run (and in best.pt). Now a skipped step leaves the
    model exactly as a run without that batch would."""
    from r2unet.data.dataset import DeviceTransform
    from r2unet.engine.loop import build_training, train_one_epoch
    from r2unet.engine.runtime import Precision

    cfg = TrainConfig(model_type="R2U_Net", t=2, base_channels=4, image_size=32, batch_size=2, device="cpu",
                      amp="off", log_every=100)
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    batches = [{"images": torch.randint(0, 255, (2, 40, 40, 3), dtype=torch.uint8, generator=g),
                "masks": torch.randint(0, 2, (2, 40, 40), dtype=torch.uint8, generator=g),
                "aspect": torch.ones(2)} for _ in range(3)]
    models, skipped = [], []
    for loader, bad in ((batches, {1}), (batches[:1] + batches[2:], set())):
        torch.manual_seed(0)
        model, optimizer, scaler = build_training(cfg, device, Precision(None, device), cfg.lr, channels_last=False)
        transform = DeviceTransform(32, device, None)  # no augmentation: both runs see the same pixels
        state = train_one_epoch(model, loader, _NaNOnBatches(transform, bad), optimizer, scaler,
                                Precision(None, device), cfg, BINARY_TASK, 0)
        models.append(model)
        skipped.append(getattr(state, "skipped", None))
    with_nan, without = (dict(m.state_dict()) for m in models)
    assert all(torch.isfinite(v).all() for v in with_nan.values()), "a NaN forward pass poisoned the statistics"
    assert all(torch.equal(with_nan[k], without[k]) for k in with_nan), "the skipped step left a trace"
    assert skipped == [1, 0]


def test_an_epoch_of_only_skipped_steps_is_logged_as_such_and_changes_nothing(tiny_data, tmp_path, monkeypatch):
    """An epoch whose every step was NaN was logged as "loss 0.0000" (the sum of no losses over the step count)."""
    from r2unet.engine import loop, trainer

    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, batch_size=2, num_epochs=2,
                      num_epochs_decay=0, num_workers=0, device="cpu", data_path=str(tiny_data), amp="off",
                      output_dir=str(tmp_path / "run"), log_every=1)
    real_step, steps_per_epoch, calls = loop.train_step, 14 // 2, {"n": 0}

    def nan_input_in_epoch_2(model, x, *args, **kwargs):
        calls["n"] += 1
        return real_step(model, x * float("nan") if calls["n"] > steps_per_epoch else x, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", nan_input_in_epoch_2)
    lines = []
    trainer.fit(cfg, log=lines.append)
    assert any(f"epoch 2/2  loss NaN/Inf ({steps_per_epoch} steps skipped: NaN/Inf)" in line for line in lines), lines
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] is None and rows[1]["skipped_steps"] == steps_per_epoch
    assert rows[0]["skipped_steps"] == 0 and rows[0]["train_loss"] > 0
    assert rows[1]["valid"] == rows[0]["valid"], "an epoch of skipped steps changed the model"
    last = load_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_gradient_skips_the_whole_optimizer_step(fused):
    from r2unet.engine.runtime import skip_nonfinite_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    found_inf = torch.zeros(())

    def step(poison: bool):
        model(torch.randn(5, 4)).sum().backward()
        if poison:
            model[1].weight.grad[0, 0] = float("nan")
        taken = skip_nonfinite_step(opt, found_inf)
        opt.zero_grad(set_to_none=True)
        return bool(taken)

    assert step(poison=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    assert not step(poison=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN gradient changed the weights"
    if fused:  # the fused kernel skips the update entirely: moments and step count are untouched too
        assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
        assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters())
    assert not hasattr(opt, "found_inf")  # the flag is only attached for the step
    assert step(poison=False)
    assert not torch.equal(before["1.weight"], model.state_dict()["1.weight"]), "a finite step must update"


def _spawn_train(data, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "r2unet", "train", "--data_path", str(data), "--output_dir",
                             str(out), *TINY, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)


def _wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_completes(tiny_data, tmp_path):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    proc = _spawn_train(tiny_data, out, "--num_epochs", "3", "--save_every_steps", "1")
    try:
        assert _wait_for(lambda: last.exists() and load_file(last)["epoch"] >= 1 and load_file(last)["step"] >= 2)
    except CheckpointError:
        pass  # never a half-written file: see the loop below
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_file(last)  # loadable after SIGKILL at an arbitrary moment
    assert state["epoch"] >= 1
    done = subprocess.run([sys.executable, "-m", "r2unet", "train", "--data_path", str(tiny_data), "--output_dir",
                           str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["test"] is not None
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_after_the_last_step_of_an_epoch_but_before_its_end(tiny_data, tmp_path, capsys):
    """A kill can land after the epoch's last step was saved (--save_every_steps) and before the epoch-end save: the
    resumed epoch then has no step left. It must close the epoch (no training scores, no made-up img/s) and go on."""
    out = tmp_path / "run"
    assert main(["train", "--data_path", str(tiny_data), "--output_dir", str(out), *TINY, "--num_epochs", "2"]) == 0
    last = out / "checkpoints" / "last.pt"
    state = load_file(last)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = 7  # 14 training images, batch 2
    # as saved by --save_every_steps after epoch 2's last step: epoch index 1 in progress, all its steps done
    state.update(epoch=1, step=steps, extra={"epoch_state": {"images": 14, "loss_sum": rows[1]["train_loss"] * steps}})
    torch.save(state, last)
    (out / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (out / "results.json").unlink()  # the killed run never got that far
    capsys.readouterr()
    assert main(["train", "--data_path", str(tiny_data), "--output_dir", str(out), "--resume"]) == 0
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[1]["train"] is None and resumed[1]["train_img_per_s"] == 0.0
    assert resumed[1]["train_loss"] == pytest.approx(rows[1]["train_loss"])
    results = json.loads((out / "results.json").read_text())
    assert results["test"] is not None and results["fps"] is None  # nothing was trained in this session


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = _spawn_train(tiny_data, out, "--num_epochs", "50")
    assert _wait_for(lambda: (out / "metrics.jsonl").exists())
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout  # 128 + SIGTERM, by exit code, not by dying of a signal
    assert "interrupted: saved" in stdout and "--resume" in stdout
    state = load_file(out / "checkpoints" / "last.pt")
    assert state["epoch"] >= 1 or state["step"] >= 1  # the interrupted epoch's progress is kept


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_loading_workers_still_saves(tiny_data, tmp_path):
    """A batch scheduler, a service manager or a terminal signals every process of the job: the loading workers
    died first, and the loader's report of it ("DataLoader worker ... is killed") cut short the save of last.pt."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "r2unet", "train", "--data_path", str(tiny_data), "--output_dir",
                             str(out), *TINY, "--num_epochs", "200", "--num_workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True)
    try:
        assert _wait_for(lambda: (out / "metrics.jsonl").exists())
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stdout
    assert "interrupted: saved" in stdout and "could not write" not in stdout and "Traceback" not in stdout
    state = load_file(out / "checkpoints" / "last.pt")
    assert state["epoch"] >= 1 or state["step"] >= 1


def test_deterministic_flag_gives_bit_identical_cpu_runs(tiny_data, tmp_path):
    for name in ("a", "b"):
        assert main(["train", "--data_path", str(tiny_data), "--output_dir", str(tmp_path / name), *TINY,
                     "--num_epochs", "1", "--deterministic", "--num_workers", "2"]) == 0
    wa = load_file(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    wb = load_file(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_interrupt_mid_epoch_equals_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """Interrupted at step 3 of epoch 2 and resumed, the run ends with the same weights, bit for bit."""
    from r2unet.data import dataset
    from r2unet.engine import trainer

    def cfg(name, resume=False):
        return TrainConfig(model_type="R2U_Net", t=1, base_channels=4, image_size=32, batch_size=2, num_epochs=2,
                           num_epochs_decay=1, num_workers=0, device="cpu", amp="off", data_path=str(tiny_data),
                           output_dir=str(tmp_path / name), augmentation_prob=1.0, resume=resume)

    trainer.fit(cfg("straight"), log=lambda *_: None)

    real_call, calls = dataset.DeviceTransform.__call__, {"n": 0}

    def interrupt_tenth_training_batch(self, batch):
        if self.augment is not None:
            calls["n"] += 1
            if calls["n"] == 10:  # 7 batches per epoch: epoch 2, step 3
                raise KeyboardInterrupt
        return real_call(self, batch)

    monkeypatch.setattr(dataset.DeviceTransform, "__call__", interrupt_tenth_training_batch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg("interrupted"), log=lambda *_: None)
    saved = load_file(tmp_path / "interrupted" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 2)
    monkeypatch.setattr(dataset.DeviceTransform, "__call__", real_call)
    trainer.fit(cfg("interrupted", resume=True), log=lambda *_: None)

    a = load_file(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_file(tmp_path / "interrupted" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("straight", "interrupted")]
    assert [r["epoch"] for r in rows[1]] == [1, 2]
    assert rows[0][1]["train_loss"] == pytest.approx(rows[1][1]["train_loss"], rel=1e-9)


@pytest.mark.parametrize("where", ["inside the forward pass", "during validation"])
def test_resume_after_an_interrupt_anywhere_equals_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch, where):
    """Ctrl-C inside a step's forward pass (BatchNorm statistics already updated) or during the end-of-epoch
    validation (the LR schedule used to step twice on resume), then --resume: the same weights and statistics, bit
    for bit, and the same learning rates, as a run never interrupted."""
    from r2unet.engine import trainer

    def cfg(name, resume=False):
        return TrainConfig(model_type="R2U_Net", t=1, base_channels=4, image_size=32, batch_size=2, num_epochs=3,
                           num_epochs_decay=2, num_workers=0, device="cpu", amp="off", data_path=str(tiny_data),
                           output_dir=str(tmp_path / name), augmentation_prob=1.0, resume=resume)

    trainer.fit(cfg("straight"), log=lambda *_: None)
    target, name = (BinaryTask, "loss") if where == "inside the forward pass" else (trainer, "evaluate")
    real, calls = getattr(target, name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (10 if target is BinaryTask else 1):  # epoch 2, step 3 / the first validation
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg("interrupted"), log=lambda *_: None)
    monkeypatch.setattr(target, name, real)
    trainer.fit(cfg("interrupted", resume=True), log=lambda *_: None)
    a, b = (load_file(tmp_path / n / "checkpoints" / "last.pt") for n in ("straight", "interrupted"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("straight", "interrupted")]
    assert [r["epoch"] for r in rows[1]] == [1, 2, 3] and [r["lr"] for r in rows[1]] == [r["lr"] for r in rows[0]]


def test_nonfinite_steps_are_counted_across_short_epochs(tiny_data, tmp_path, monkeypatch):
    """Epochs shorter than --log_every were never checked, and the count of non-finite steps in a row restarted
    every epoch: a diverged run with short epochs trained on to the end. Now the count runs across epochs and every
    epoch's end is a check point."""
    from r2unet.engine import trainer

    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, batch_size=2, num_epochs=5,
                      num_epochs_decay=0, num_workers=0, device="cpu", data_path=str(tiny_data),
                      output_dir=str(tmp_path / "run"), max_nonfinite_steps=10)  # log_every 10 > 7 steps/epoch
    real_loss, calls = BinaryTask.loss, {"n": 0}

    def nan_after_the_first_epoch(task, logits, target, *options):
        calls["n"] += 1
        loss = real_loss(task, logits, target, *options)
        return loss * float("nan") if calls["n"] > 7 else loss

    monkeypatch.setattr(BinaryTask, "loss", nan_after_the_first_epoch)
    with pytest.raises(trainer.TrainingError, match=r"14 consecutive steps \(epoch 3, step 7\)"):
        trainer.fit(cfg, log=lambda *_: None)
    assert load_file(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2


def test_an_infinite_learning_rate_is_refused(tmp_path, capsys):
    from r2unet.commands.cli import main

    assert main(["train", "--lr", "inf", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--lr: must be > 0 and finite, got inf" in capsys.readouterr().err


def test_a_full_disk_while_saving_names_the_file_and_the_free_space(small_disk):
    """torch reports a full disk as a RuntimeError ("unexpected pos ..."), not the OSError a faked failure raises;
    on a real full disk the message names the file and the free space, and no partial file is left."""
    model = create_model("U_Net", base_channels=16)  # 8.2 MiB of weights: more than the 256 KiB disk holds
    path = small_disk / "last.pt"
    with pytest.raises(CheckpointError, match=r"last\.pt: .*MiB free in .*previous checkpoint"):
        save_checkpoint(path, model=model, config={}, epoch=1)
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("kind", ["bare state_dict", "copy of best.pt"])
def test_resume_from_a_last_pt_that_is_not_a_training_checkpoint_says_what_it_is(tiny_data, tmp_path, capsys, kind):
    from r2unet.commands.cli import main

    run = tmp_path / "run"
    flags = ["--data_path", str(tiny_data), "--output_dir", str(run), "--model_type", "U_Net", "--base_channels", "4",
             "--image_size", "32", "--batch_size", "2", "--num_epochs", "1", "--num_workers", "0", "--device", "cpu"]
    assert main(["train", *flags]) == 0
    last = run / "checkpoints" / "last.pt"
    if kind == "bare state_dict":
        torch.save(load_file(last)["model"], last)
    else:
        last.write_bytes((run / "checkpoints" / "best.pt").read_bytes())
    capsys.readouterr()
    assert main(["train", *flags, "--resume", "--num_epochs", "2"]) == 2
    err = capsys.readouterr().err
    expected = "a bare state_dict" if kind == "bare state_dict" else "without the optimizer's state"
    assert expected in err and "needs the last.pt a run writes" in err and "Traceback" not in err


def test_temporary_files_of_killed_writers_are_cleaned_up(tmp_path):
    """A writer killed between its temporary file and the rename (kill -9) left .NAME.tmpPID behind for good; the
    next write of that file removes those of processes that are gone, and leaves a live writer's alone."""
    import os

    from r2unet.fileio import atomic_write_text

    path = tmp_path / "results.json"
    dead = tmp_path / ".results.json.tmp999999999"  # no such process
    alive = tmp_path / f".results.json.tmp{os.getppid()}"
    dead.write_text("half")
    alive.write_text("being written")
    atomic_write_text(path, "{}")
    assert path.read_text() == "{}" and not dead.exists() and alive.exists()


@pytest.mark.parametrize("argv,message", [
    (["bench", "train", "--device", "cpu", "--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["prepare", "--origin_data_path", "IMG", "--origin_GT_path", "GT", "--data_path", "OUT", "--image_size", "7"],
     "--image_size: the training size must be a positive multiple of 16"),
])
def test_sizes_that_cannot_work_are_named_before_any_work(tmp_path, capsys, argv, message):
    from r2unet.commands.cli import main

    argv = [str(tmp_path / a) if a in ("IMG", "GT", "OUT") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "OUT").exists()


def test_a_signal_inside_a_first_import_is_still_an_interrupt(tiny_data, tmp_path, monkeypatch, capsys):
    """SIGTERM landing inside a module's first import (it happened in matplotlib's, drawing curves.png) surfaces as
    an ImportError raised from the interrupt; it used to end in a traceback and exit 1 with nothing saved."""
    from r2unet.commands.cli import main
    from r2unet.engine import plots
    from r2unet.errors import Terminated

    def import_interrupted(*args, **kwargs):
        try:
            raise Terminated("signal 15")
        except Terminated as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(plots, "plot_curves", import_interrupted)
    run = tmp_path / "run"
    assert main(["train", "--data_path", str(tiny_data), "--output_dir", str(run), "--model_type", "U_Net",
                 "--base_channels", "4", "--image_size", "32", "--batch_size", "2", "--num_epochs", "2",
                 "--num_workers", "0", "--device", "cpu"]) == 143
    captured = capsys.readouterr()
    assert "terminated" in captured.err and "continue with --resume" in captured.out
    assert load_file(run / "checkpoints" / "last.pt")["step"] == 7  # the epoch's last step, before its end


def _children(pid: int) -> list[int]:
    kids = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(stat))
    return kids


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")
def test_a_cache_larger_than_the_free_space_is_refused_before_any_row_is_written(tiny_data, small_disk):
    """Rows were written into sparse memory-mapped files: on a disk that fills up, that is a SIGBUS ("Bus error",
    exit 135) that leaves the decoding workers running. The blocks are now claimed first; a disk without room is
    named with the space needed. In a subprocess: on the old code the SIGBUS would kill the test run itself."""
    done = subprocess.run([sys.executable, "-m", "r2unet", "train", "--data_path", str(tiny_data), "--cache_dir",
                           str(small_disk / "cache"), "--output_dir", str(small_disk.parent / "run"), *TINY,
                           "--image_size", "128", "--num_workers", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    assert f"cannot write the cache in {small_disk / 'cache' / 'train-176'}: it needs" in done.stderr
    assert "MiB free in" in done.stderr
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")
def test_decoding_workers_exit_when_the_cache_build_is_killed(tiny_data, tmp_path):
    """``kill -9`` during caching left the decoding workers waiting on their queue for good (30+ minutes seen)."""
    script = (
        "import sys, time\n"
        "from r2unet.data import cache\n"
        "def _decode_row(args):\n"
        "    time.sleep(120)\n"
        "cache._decode_row = _decode_row  # a decode that takes long enough to kill the build in the middle\n"
        f"cache.build_cache({str(tiny_data / 'train')!r}, {str(tiny_data / 'train_GT')!r}, {str(tmp_path / 'c')!r},"
        " image_size=32, num_workers=2, progress=False, log=lambda m: print(m, flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        assert "caching" in proc.stdout.readline()
        assert _wait_for(lambda: len(_children(proc.pid)) >= 2, timeout=60)
        workers = _children(proc.pid)
        time.sleep(0.5)
        assert all(_running(w) for w in workers)
        proc.kill()
        proc.wait()
        assert _wait_for(lambda: not any(_running(w) for w in workers), timeout=10), "workers outlived the build"
    finally:
        proc.kill()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
