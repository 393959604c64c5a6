import json
import os

import numpy as np
import pytest
import torch

from r2unet.commands.cli import main
from r2unet.engine.config import TrainConfig
from r2unet.engine.loop import lr_factor
from r2unet.engine.task import BINARY_TASK

TINY = ["--model_type", "R2U_Net", "--t", "1", "--base_channels", "4", "--image_size", "32", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--seed", "3", "--num_epochs_decay", "1", "--log_every", "1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    assert main(["synth", "--output", str(root / "raw"), "--num_images", "24", "--seed", "2", "--max_side", "160"]) == 0
    assert main(["prepare", "--origin_data_path", str(root / "raw" / "ISIC2018_Task1-2_Training_Input"),
                 "--origin_GT_path", str(root / "raw" / "ISIC2018_Task1_Training_GroundTruth"),
                 "--data_path", str(root / "data"), "--image_size", "32", "--num_workers", "1"]) == 0
    return root


def _train(root, out, *extra):
    return main(["train", "--data_path", str(root / "data"), "--output_dir", str(out), *TINY, *extra])


def test_end_to_end_train_evaluate_resume(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(prepared, out, "--num_epochs", "2") == 0
    printed = capsys.readouterr()
    assert "FPS: " in printed.out
    epoch_lines = [line for line in printed.out.splitlines() if line.startswith("epoch ")]
    assert "  ETA " in epoch_lines[0] and "ETA" not in epoch_lines[1]  # the run's remaining time, until the last
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"ACC", "SE", "SP", "PC", "F1", "JS", "DC", "JS_thresholded"}
    assert results["model_type"] == "R2U_Net" and results["fps"] > 0 and results["best_epoch"] in (1, 2)
    assert set(results["train"]) == set(results["test"]) and 0 <= results["train"]["ACC"] <= 1
    for f in ("config.json", "metrics.jsonl", "curves.png", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / f).is_file(), f
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["optimizer"] and ckpt["config"]["t"] == 1

    # evaluate reproduces the reported test metrics from the best checkpoint (its cache elsewhere, as for a
    # read-only dataset)
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--data_path",
                 str(prepared / "data"), "--split", "test", "--json", "--device", "cpu",
                 "--cache_dir", str(tmp_path / "elsewhere")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k, v in results["test"].items():
        assert evaluated[k] == pytest.approx(v, abs=1e-9), k
        lo, hi = evaluated["spread"][k]["ci"]  # error bars: a bootstrap interval around each per-image mean
        assert lo <= v + 1e-12 and v - 1e-12 <= hi, k
    for k, spread in evaluated["spread"].items():  # training reports them too
        got = results["test_spread"][k]
        assert [got["sd"], *got["ci"]] == pytest.approx([spread["sd"], *spread["ci"]], abs=1e-9), k
    assert (tmp_path / "elsewhere" / "test-48" / "images.npy").is_file()

    # a threshold sweep (here at each image's own resolution) scores the same forward passes at every threshold:
    # its row at the checkpoint's threshold is the main result, and the best JS is named
    for resolution in ("training", "original"):
        assert main(["evaluate", "--checkpoint", str(out), "--data_path", str(prepared / "data"), "--split",
                     "valid", "--json", "--device", "cpu", "--thresholds", "0.2:0.8:0.3",
                     "--resolution", resolution]) == 0
        swept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        rows = {r["threshold"]: r for r in swept["threshold_sweep"]}
        assert sorted(rows) == [0.2, 0.5, 0.8]
        assert all(rows[0.5][k] == swept[k] for k in ("JS", "DC", "ACC", "JS_thresholded")), resolution
        assert swept["best_threshold"] == max(rows, key=lambda t: rows[t]["JS"])

    # resume continues from epoch 2 to 3 with the checkpoint's settings
    assert _train(prepared, out, "--resume", "--num_epochs", "3") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 3
    assert "resumed from" in capsys.readouterr().out

    # pictures: the sample grid of the last epoch, and `r2unet plot` redraws curves and samples
    from PIL import Image

    assert Image.open(out / "samples.png").format == "PNG"
    (out / "curves.png").unlink()
    (out / "samples.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert Image.open(out / "curves.png").format == "PNG" and Image.open(out / "samples.png").format == "PNG"

    # predict with the best checkpoint: one binary mask per test image, at that image's own size
    test_images = sorted((prepared / "data" / "test").iterdir())
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--input",
                 str(prepared / "data" / "test"), "--output", str(tmp_path / "masks"), "--device", "cpu"]) == 0
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert len(masks) == len(test_images) > 0
    for image, mask in zip(test_images, masks):
        with Image.open(image) as a, Image.open(mask) as b:
            assert a.size == b.size and set(np.unique(np.asarray(b))) <= {0, 255}, mask.name


def test_two_cpu_runs_with_the_same_seed_are_identical(prepared, tmp_path):
    for name in ("a", "b"):
        assert _train(prepared, tmp_path / name, "--num_epochs", "1") == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["test"] == b["test"]
    wa = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_is_not_overwritten(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(prepared, out, "--num_epochs", "1") == 0
    capsys.readouterr()
    assert _train(prepared, out, "--num_epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err


def test_one_training_per_run_folder(prepared, tmp_path, capsys):
    """A second 'train' into a folder another live process is writing is refused before it writes anything; a lock
    left by a process that is gone (kill -9) is taken over; a finished or failed run leaves no lock."""
    import json
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive: us
    assert _train(prepared, out, "--num_epochs", "1") == 2
    assert f"in use by another r2unet process (pid {os.getpid()}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    assert _train(prepared, out, "--num_epochs", "1") == 0  # stale: taken over
    assert not (out / ".lock").exists() and (out / "results.json").is_file()
    # a run that stops at once (no data) leaves neither a lock nor the folder it would have created
    assert _train(tmp_path / "nowhere", tmp_path / "new", "--num_epochs", "1") == 2
    assert not (tmp_path / "new").exists()


def test_reference_schedule():
    cfg = TrainConfig(num_epochs=10, num_epochs_decay=4)
    factors = [lr_factor(e, cfg) for e in range(10)]
    # the reference lowers lr by lr/decay after each of the last `decay` epochs: it never trains at 0
    assert factors == [1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert lr_factor(3, TrainConfig(num_epochs=5, num_epochs_decay=0)) == 1


@pytest.mark.parametrize("flag,value,message", [
    ("--image_size", "100", "--image_size: must be a positive multiple of 16"),
    ("--t", "0", "--t: recurrence steps must be >= 1"),
    ("--batch_size", "0", "--batch_size: must be >= 1"),
    ("--lr", "-1", "--lr: must be > 0"),
    ("--num_epochs_decay", "500", "--num_epochs_decay"),
    ("--lr_batch_size", "0", "--lr_batch_size: must be >= 1"),
    ("--augmentation_prob", "1.5", "--augmentation_prob"),
    ("--loss_scale_value", "abc", "--loss_scale_value"),
    ("--img_ch", "2", "--img_ch"),
])
def test_bad_flags_fail_before_work(flag, value, message, tmp_path, capsys):
    assert main(["train", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o"), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command,flag,value,message", [
    ("predict", "--threshold", "1.5", "must be between 0 and 1"),
    ("evaluate", "--threshold", "0", "must be between 0 and 1"),
    ("predict", "--batch_size", "0", "must be >= 1"),
    ("evaluate", "--batch_size", "-2", "must be >= 1"),
])
def test_inference_flags_are_checked_before_any_work(command, flag, value, message, tmp_path, capsys):
    where = ["--input", str(tmp_path), "--output", str(tmp_path / "o")] if command == "predict" else \
        ["--data_path", str(tmp_path)]
    with pytest.raises(SystemExit):  # argparse: usage and the message, exit code 2
        main([command, "--checkpoint", str(tmp_path / "none.pt"), *where, flag, value])
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_unknown_model_and_missing_folders(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse lists the choices
        main(["train", "--model_type", "R3U_Net"])
    assert "R2AttU_Net" in capsys.readouterr().err
    assert main(["train", "--data_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--data_path" in err and "r2unet prepare" in err


def test_config_file_and_command_line_precedence(tmp_path):
    from r2unet.commands.cli import _train_config, build_parser

    (tmp_path / "c.yaml").write_text("lr: 0.001\nbatch_size: 8\nmodel_type: AttU_Net\n")
    (tmp_path / "c.toml").write_text("lr = 0.003\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--batch_size", "2"])
    cfg = _train_config(args)
    assert (cfg.lr, cfg.batch_size, cfg.model_type, cfg.beta1) == (0.001, 2, "AttU_Net", 0.5)
    assert _train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "c.toml")])).lr == 0.003
    apex = _train_config(build_parser().parse_args(["train", "--apex", "1", "--apex-opt-level", "O2",
                                                    "--loss_scale_value", "128", "--npu_idx", "0"]))
    assert (apex.amp, apex.loss_scale, apex.device_index) == ("fp16", "128", 0)
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        _train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))
    # values of the wrong type are named; YAML's natural spellings are taken
    (tmp_path / "types.yaml").write_text("lr: 1\nloss_scale: 128\nglobal_batch_size: null\nresume: false\n")
    typed = _train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "types.yaml")]))
    assert (typed.lr, typed.loss_scale, typed.global_batch_size) == (1.0, "128", None)
    for text, message in (("lr: abc", "lr in .* must be a number, got 'abc'"),
                          ("batch_size: 2.5", "batch_size in .* must be a whole number, got 2.5"),
                          ("num_epochs: true", "num_epochs in .* must be a whole number, got True"),
                          ("scale_lr: 'yes'", "scale_lr in .* must be true or false, got 'yes'"),
                          ("model_type: [U_Net]", "model_type in .* must be a string")):
        (tmp_path / "wrong.yaml").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            _train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "wrong.yaml")]))


def test_evaluate_accepts_a_reference_state_dict(prepared, tmp_path, capsys):
    from r2unet import create_model

    torch.manual_seed(0)
    model = create_model("AttU_Net", base_channels=4)
    torch.save(model.state_dict(), tmp_path / "AttU_Net-ref.pkl")  # what the reference writes
    assert main(["evaluate", "--checkpoint", str(tmp_path / "AttU_Net-ref.pkl"), "--model_type", "AttU_Net",
                 "--base_channels", "4", "--image_size", "32", "--data_path", str(prepared / "data"),
                 "--split", "valid", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= out["JS"] <= 1 and out["num_images"] == 2
    # without the flags the network is read from the weights: the same scores
    assert main(["evaluate", "--checkpoint", str(tmp_path / "AttU_Net-ref.pkl"), "--image_size", "32",
                 "--data_path", str(prepared / "data"), "--split", "valid", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["JS"] == out["JS"]
    # a --model_type that does not fit: a readable key report, no traceback
    assert main(["evaluate", "--checkpoint", str(tmp_path / "AttU_Net-ref.pkl"), "--model_type", "R2U_Net",
                 "--data_path", str(prepared / "data")]) == 2
    assert "missing keys" in capsys.readouterr().err


def test_tensorboard_logging(prepared, tmp_path):
    """--tensorboard writes each epoch's loss, learning rate and validation scores: the numbers of metrics.jsonl."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _train(prepared, out, "--num_epochs", "2", "--tensorboard") == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train_loss" in r]  # the epochs' rows
    assert [r["epoch"] for r in rows] == [1, 2]
    for tag, of in (("train/loss", lambda r: r["train_loss"]), ("train/lr", lambda r: r["lr"]),
                    ("valid/JS", lambda r: r["valid"]["JS"]), ("valid/DC", lambda r: r["valid"]["DC"])):
        written = events.Scalars(tag)
        assert [e.step for e in written] == [1, 2], tag
        assert [e.value for e in written] == pytest.approx([of(r) for r in rows], rel=1e-6), tag


def test_compile_failure_falls_back_to_eager(prepared, tmp_path, monkeypatch, capsys):
    def broken_compile(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C compiler found (simulated)")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "run"
    assert _train(prepared, out, "--num_epochs", "1", "--compile", "on") == 0
    printed = capsys.readouterr().out
    assert "torch.compile failed (RuntimeError: no C compiler found (simulated)); continuing in eager mode" in printed
    assert "compile on" in printed and (out / "results.json").exists()


def _compile_with_failing_backward(fail_on_calls):
    """A stand-in for torch.compile whose graphs' backward raises on the given backward calls (1-based)."""
    calls = {"n": 0}

    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            calls["n"] += 1
            if calls["n"] in fail_on_calls:
                raise RuntimeError(f"backward kernel failed to build (simulated, call {calls['n']})")
            return grad

    def fake_compile(module, *args, **kwargs):
        return lambda *a, **k: Fails.apply(module(*a, **k))

    return fake_compile, calls


def test_a_backward_that_fails_to_compile_falls_back_to_eager(prepared, tmp_path, monkeypatch, capsys):
    fake, calls = _compile_with_failing_backward({1})
    monkeypatch.setattr(torch, "compile", fake)
    assert _train(prepared, tmp_path / "run", "--num_epochs", "1", "--compile", "on") == 0
    printed = capsys.readouterr().out
    assert "torch.compile failed (RuntimeError: backward kernel failed to build (simulated, call 1))" in printed
    assert calls["n"] == 1 and (tmp_path / "run" / "results.json").exists()  # eager from then on


def test_a_backward_error_after_compiled_steps_worked_is_not_hidden(prepared, tmp_path, monkeypatch, capsys):
    fake, calls = _compile_with_failing_backward({3})
    monkeypatch.setattr(torch, "compile", fake)
    with pytest.raises(RuntimeError, match="simulated, call 3"):  # a real error: its traceback, not a fallback
        _train(prepared, tmp_path / "run", "--num_epochs", "1", "--compile", "on")
    assert calls["n"] == 3 and "continuing in eager mode" not in capsys.readouterr().out


def test_long_epochs_log_progress_lines_without_a_terminal(prepared, tmp_path, monkeypatch, capsys):
    import re

    from r2unet import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # every log point; the default is once a minute
    assert _train(prepared, tmp_path / "run", "--num_epochs", "1") == 0
    found = re.findall(r"epoch 1/1  step (\d+)/(\d+)  loss ([\d.]+)  ([\d.]+) img/s \(([\d.e-]+) s/step[^)]*\)  "
                       r"epoch ends in (\w+)", capsys.readouterr().out)
    assert len(found) >= 2, found
    steps = [int(f[0]) for f in found]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == int(found[-1][1]), "every step, up to the last"
    assert all(float(f[2]) > 0 and float(f[3]) > 0 and float(f[4]) > 0 for f in found)
    assert found[-1][5] == "0s"  # the time left in the epoch, none at its last step


def test_evaluate_with_a_progress_bar_gives_the_same_scores(prepared):
    from r2unet.data.cache import split_cache
    from r2unet.data.dataset import DeviceTransform, make_loader
    from r2unet.engine.loop import evaluate
    from r2unet.engine.runtime import Precision
    from r2unet.models import create_model

    torch.manual_seed(0)
    model = create_model("U_Net", base_channels=4)
    cache = split_cache(prepared / "data", "test", 32, progress=False, log=lambda *_: None)
    loader = make_loader(cache, 2, train=False, drop_last=False)
    transform = DeviceTransform(32, torch.device("cpu"), None)
    precision = Precision(None, torch.device("cpu"))
    plain = evaluate(model, loader, transform, precision, BINARY_TASK).compute()
    with_bar = evaluate(model, loader, transform, precision, BINARY_TASK, progress="test split").compute()
    assert plain == with_bar


def test_evaluate_writes_per_image_scores_and_names_the_worst(prepared, tmp_path, capsys):
    import csv

    out = tmp_path / "run"
    assert _train(prepared, out, "--num_epochs", "1") == 0
    capsys.readouterr()
    table = tmp_path / "scores.csv"
    args = ["evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--data_path", str(prepared / "data"),
            "--device", "cpu", "--per_image", str(table)]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = list(csv.DictReader(table.open()))
    test_images = sorted(p.name for p in (prepared / "data" / "test").iterdir())
    assert sorted(r["image"] for r in rows) == test_images and len(rows) == summary["num_images"]
    for k in ("ACC", "SE", "SP", "PC", "F1", "JS", "DC"):
        values = [float(r[k]) for r in rows]
        assert all(0 <= v <= 1 for v in values)
        assert np.mean(values) == pytest.approx(summary[k], abs=1e-6), k  # the table's mean is the reported score
    worst = sorted(rows, key=lambda r: float(r["JS"]))[0]
    assert summary["worst"][0]["image"] == worst["image"] and len(summary["worst"]) == min(5, len(rows))
    from PIL import Image

    picture = Image.open(summary["worst_picture"])  # one row per named image: taller than wide
    assert picture.format == "PNG" and picture.size[1] > 1.5 * picture.size[0]
    assert summary["worst_picture"] == str(tmp_path / "scores_worst.png")
    assert main(args) == 0
    assert f"lowest JS: {worst['image']}" in capsys.readouterr().out


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_results(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(prepared, out, "--num_epochs", "1") == 0
    before = json.loads((out / "results.json").read_text())
    rows_before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _train(prepared, out, "--resume") == 0
    printed = capsys.readouterr().out
    assert "has finished all 1 epochs" in printed and "--num_epochs N with N > 1" in printed
    after = json.loads((out / "results.json").read_text())
    assert after["fps"] == before["fps"] > 0 and after["train"] == before["train"]  # not clobbered with 0 / None
    assert after["test"] == before["test"] and (out / "metrics.jsonl").read_text() == rows_before


def _js_dc(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    tp, fp, fn = int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
    if fp + fn == 0:
        return 1.0, 1.0
    return tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)


def test_evaluate_at_the_original_resolution_scores_the_masks_predict_writes(prepared, tmp_path, capsys):
    """`evaluate --resolution original` scores each test image at its own size against its mask file: the same
    numbers as comparing `predict`'s written masks with the ground-truth files by hand (with and without TTA)."""
    from PIL import Image

    from r2unet.data.imageio import read_mask
    from r2unet.engine.inference import load_for_inference, predict_images

    out = tmp_path / "run"
    assert _train(prepared, out, "--num_epochs", "1") == 0
    ckpt, data = str(out / "checkpoints" / "best.pt"), prepared / "data"
    images = sorted((data / "test").iterdir())
    assert len({Image.open(p).size for p in images}) > 1  # the originals differ in size (and from the 32 px input)
    # a one-epoch model's probabilities sit in a narrow band: threshold at their median so that the masks are
    # neither empty nor full, and the small changes TTA makes flip some pixels
    model, cfg = load_for_inference(ckpt)
    probs = np.concatenate([p.ravel() for _, _, p in predict_images(model, images, 32, torch.device("cpu"),
                                                                      BINARY_TASK)])
    threshold = str(float(np.median(probs)))
    js_of = {}
    for tta in ([], ["--tta"]):
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", ckpt, "--data_path", str(data), "--device", "cpu", "--threshold",
                     threshold, "--resolution", "original", "--json", *tta]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        masks = tmp_path / f"masks{len(tta)}"
        assert main(["predict", "--checkpoint", ckpt, "--input", str(data / "test"), "--output", str(masks),
                     "--device", "cpu", "--threshold", threshold, *tta]) == 0
        by_hand = []
        for image in images:
            gt = read_mask(next((data / "test_GT").glob(f"{image.stem}_segmentation.*")))
            pred = np.asarray(Image.open(masks / f"{image.stem}_segmentation.png")) > 127
            assert pred.shape == gt.shape and 0 < pred.mean() < 1
            by_hand.append(_js_dc(pred, gt))
        assert summary["num_images"] == len(images) and (summary["resolution"], summary["tta"]) == ("original",
                                                                                                   bool(tta))
        assert summary["JS"] == pytest.approx(np.mean([js for js, _ in by_hand]), abs=1e-9)
        assert summary["DC"] == pytest.approx(np.mean([dc for _, dc in by_hand]), abs=1e-9)
        js_of[bool(tta)] = summary["JS"]
    assert js_of[True] != js_of[False]  # TTA really changed the predictions that were scored
    assert main(["evaluate", "--checkpoint", ckpt, "--data_path", str(data), "--device", "cpu", "--threshold",
                 threshold, "--json"]) == 0
    at_training_size = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at_training_size["resolution"] == "training" and at_training_size["JS"] != js_of[False]
    assert main(["evaluate", "--checkpoint", ckpt, "--data_path", str(data), "--device", "cpu", "--threshold",
                 threshold, "--json", "--tta"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["JS"] != at_training_size["JS"]


@pytest.mark.parametrize("batches,expected_steady", [(3, 2), (10, 5), (1, 1)])
def test_steady_throughput_skips_the_warmup_even_in_short_epochs(batches, expected_steady):
    """5 warm-up steps are left out of the img/s; an epoch of no more than 5 steps leaves out only its first (which
    carries compilation and start-up) instead of falling back to timing the whole epoch."""
    from r2unet.data.augment import AugmentConfig
    from r2unet.data.dataset import DeviceTransform
    from r2unet.engine.loop import build_training, train_one_epoch
    from r2unet.engine.runtime import Precision

    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, batch_size=2, warmup_steps=5,
                      device="cpu", amp="off", log_every=100)
    device = torch.device("cpu")
    precision = Precision(None, device)
    model, optimizer, scaler = build_training(cfg, device, precision, cfg.lr, channels_last=False)
    g = torch.Generator().manual_seed(0)
    loader = [{"images": torch.randint(0, 255, (2, 48, 48, 3), dtype=torch.uint8, generator=g),
               "masks": torch.randint(0, 2, (2, 48, 48), dtype=torch.uint8, generator=g),
               "aspect": torch.ones(2)} for _ in range(batches)]
    state = train_one_epoch(model, loader, DeviceTransform(32, device, AugmentConfig()), optimizer, scaler, precision,
                            cfg, BINARY_TASK)
    assert state.steps == batches and state.steady_images == 2 * expected_steady
    assert state.steady_seconds > 0


def test_demo_runs_the_whole_pipeline_and_refuses_to_overwrite(tmp_path, capsys):
    """The README's first command, shortened: synthetic data -> prepare -> train -> test scores (two epochs, less
    than the demo's decay length, which used to be a fixed 8 epochs and failed validation)."""
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--num_images", "20", "--num_epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "for 2 epochs on the CPU" in printed and "demo done. test JS" in printed
    assert f"r2unet serve --checkpoint {out / 'run'}" in printed  # and how to show the model to someone
    results = json.loads((out / "demo_results.json").read_text())
    assert results["epochs"] == 2 and 0 <= results["test"]["JS"] <= 1
    for f in ("run/curves.png", "run/samples.png", "run/checkpoints/best.pt", "run/results.json"):
        assert (out / f).is_file(), f
    assert main(["demo", "--output", str(out), "--num_epochs", "2"]) == 2
    assert "already holds a demo run" in capsys.readouterr().err
    assert main(["demo", "--output", str(tmp_path / "few"), "--num_images", "5"]) == 2
    assert "at least 20 images" in capsys.readouterr().err


def test_scale_lr_follows_the_batch_the_lr_was_tuned_for(prepared, tmp_path, capsys):
    """One process, batch 4, an lr tuned for batch 2: --scale_lr doubles it; without --lr_batch_size it keeps it
    (lr x processes), and without --scale_lr nothing changes."""
    for extra, lr in ((["--lr_batch_size", "2", "--scale_lr"], "0.002"), (["--scale_lr"], "0.001"),
                      (["--lr_batch_size", "2"], "0.001")):
        out = tmp_path / f"run{len(extra)}{lr}"
        assert _train(prepared, out, "--num_epochs", "1", "--max_steps_per_epoch", "1", "--lr", "0.001",
                      *extra) == 0
        assert f"global batch 4, lr {lr};" in capsys.readouterr().out, extra


def test_durations_read_as_people_write_them():
    from r2unet.progress import duration

    assert [duration(s) for s in (0, 44.6, 60, 725, 3599, 3600, 11220, -3)] == \
        ["0s", "45s", "1m00s", "12m05s", "59m59s", "1h00m", "3h07m", "0s"]


def test_an_unprepared_folder_is_named_with_what_to_run(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
    ckpt = tmp_path / "m.pt"
    torch.save(__import__("r2unet").create_model("U_Net", base_channels=4).state_dict(), ckpt)
    for argv in (["evaluate", "--checkpoint", str(ckpt), "--model_type", "U_Net", "--base_channels", "4",
                  "--data_path", str(raw)],
                 ["bench", "data", "--data_path", str(raw)],
                 ["train", "--data_path", str(raw), "--output_dir", str(tmp_path / "run")]):
        assert main(argv) == 2
        assert "is missing; a prepared dataset holds train/ train_GT/" in capsys.readouterr().err, argv[0]


def test_toml_configs_on_a_python_without_tomllib_say_what_to_install(tmp_path, monkeypatch):
    import sys

    from r2unet.engine.config import ConfigError, read_config_file

    (tmp_path / "c.toml").write_text("lr = 0.003\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10, which pyproject allows
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match="needs Python >= 3.11 or 'pip install tomli'"):
        read_config_file(tmp_path / "c.toml")


def test_every_train_flag_comes_from_a_setting_and_shows_its_default():
    """One source of truth: each TrainConfig field is a train flag (with the field's choices), and --help gives
    every flag's default."""
    import dataclasses

    from r2unet.commands.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    flags = {a.dest: a for a in train._actions if a.option_strings and a.dest != "help"}
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "extra"]
    assert {f.name for f in fields} <= set(flags)
    for f in fields:
        assert (flags[f.name].choices and list(flags[f.name].choices)) == (f.metadata["choices"] and
                                                                          list(f.metadata["choices"])), f.name
    missing = [a.option_strings[0] for a in flags.values() if "default" not in (a.help or "")]
    assert not missing, missing
    text = train.format_help()
    assert "--npu_idx" in text and "--loss_scale_value" in text and "(default: 0.0002)" in text


def test_a_checkpoint_written_mid_epoch_carries_the_loss_still_on_the_device():
    from r2unet.engine.loop import EpochState

    state = EpochState(epoch=2, steps=5, images=10, loss_sum=1.5)
    state.loss_device = torch.tensor(0.25, dtype=torch.float64)
    state.skipped, state.skipped_device = 1, torch.tensor(2)
    assert state.carried() == {"epoch_state": {"images": 10, "loss_sum": 1.75, "skipped": 3}}
    state.loss_device = state.skipped_device = None
    assert state.carried()["epoch_state"]["loss_sum"] == 1.5 and state.carried()["epoch_state"]["skipped"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is for machines without a CUDA GPU")
def test_a_gpu_index_on_a_machine_without_a_gpu_is_said_not_ignored(tiny_data, tmp_path, capsys):
    assert main(["train", "--data_path", str(tiny_data), "--output_dir", str(tmp_path / "run"), "--npu_idx", "0",
                 "--model_type", "U_Net", "--base_channels", "4", "--image_size", "32", "--batch_size", "2",
                 "--num_epochs", "1", "--num_workers", "0"]) == 0
    assert "--npu_idx 0: there is no CUDA GPU here, so training runs on the CPU" in capsys.readouterr().out


def test_the_decay_note_comes_once_per_job_and_not_before_an_error(monkeypatch, capsys):
    from r2unet.engine.settings import train_settings

    train_settings({"num_epochs": 3})
    assert "decaying over all 3 epochs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--lr"):
        train_settings({"num_epochs": 3, "lr": -1.0})
    assert capsys.readouterr().out == ""  # an unrelated error is not preceded by the note
    monkeypatch.setenv("RANK", "1")
    train_settings({"num_epochs": 3})
    assert capsys.readouterr().out == ""  # the other processes of a torchrun job stay quiet


def test_resuming_a_run_saved_with_compile_auto_on_a_gpu_says_it_compiles_and_how_not_to(monkeypatch, tmp_path):
    """Runs saved when ``--compile auto`` was the default still compile on a GPU when resumed; the user is told,
    with the flag that continues them eagerly (and that flag is taken)."""
    from r2unet.engine.checkpoint import save_checkpoint
    from r2unet.engine.settings import train_settings
    from r2unet.models import create_model

    def saved_with(compile_setting: str):
        out = tmp_path / compile_setting
        cfg = TrainConfig(output_dir=str(out), model_type="U_Net", base_channels=4, compile=compile_setting)
        model = create_model("U_Net", base_channels=4)
        save_checkpoint(out / "checkpoints" / "last.pt", model=model, config=cfg.to_dict(), epoch=1,
                        optimizer=torch.optim.Adam(model.parameters()))
        return str(out)

    def notes(given: dict) -> tuple[str, TrainConfig]:
        lines = []
        cfg = train_settings({"resume": True, **given}, log=lines.append)
        return " ".join(line for line in lines if "--compile" in line), cfg

    auto, off = saved_with("auto"), saved_with("off")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    said, cfg = notes({"output_dir": auto})
    assert "saved with --compile auto" in said and "Add --compile off" in said and cfg.compile == "auto"
    said, cfg = notes({"output_dir": auto, "compile": "off"})
    assert said == "" and cfg.compile == "off"  # the flag is taken, and nothing more is said
    assert notes({"output_dir": off})[0] == ""  # a run that never compiled
    assert notes({"output_dir": auto, "device": "cpu"})[0] == ""  # auto does not compile on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert notes({"output_dir": auto})[0] == ""


def test_samples_png_from_train_is_what_plot_redraws_the_kept_model(tiny_data, tmp_path):
    """samples.png meant the last epoch after train and the best checkpoint after `r2unet plot`: now both draw the
    kept model (best.pt), so the file is the same whichever wrote it last."""
    out = tmp_path / "run"
    assert main(["train", "--data_path", str(tiny_data), "--output_dir", str(out), "--model_type", "U_Net",
                 "--base_channels", "4", "--image_size", "32", "--batch_size", "2", "--num_epochs", "2",
                 "--num_workers", "0", "--device", "cpu", "--amp", "off"]) == 0
    from_train = (out / "samples.png").read_bytes()
    assert main(["plot", str(out)]) == 0
    assert (out / "samples.png").read_bytes() == from_train


def test_a_global_batch_larger_than_the_training_split_is_said_at_the_start(tiny_data, tmp_path, capsys):
    """8 processes x 16 on 84 training images is one partial step per epoch: the run says so before it starts."""
    argv = ["train", "--data_path", str(tiny_data), "--model_type", "U_Net", "--base_channels", "4", "--image_size",
            "32", "--num_epochs", "1", "--num_workers", "0", "--device", "cpu"]
    assert main([*argv, "--batch_size", "16", "--output_dir", str(tmp_path / "big")]) == 0
    out = capsys.readouterr().out
    assert "note: the global batch 16 is larger than the 14 training images: every epoch is a single partial step" \
        in out
    assert out.index("every epoch is a single partial step") < out.index("epoch 1/1")
    assert main([*argv, "--batch_size", "14", "--output_dir", str(tmp_path / "fits")]) == 0
    assert "partial step" not in capsys.readouterr().out


def test_a_compiled_step_updates_weights_and_batchnorm_statistics_like_the_eager_step():
    """torch.compile must not change what a training step does: R2U-Net's shared BatchNorms update their running
    statistics three times a forward, which the compiled graph must chain as eager mode does (one recurrent
    residual block here; the GPU test takes the whole network)."""
    from conftest import assert_same_step, eager_and_compiled_steps

    eager, compiled, loss_eager, loss_compiled, lr = eager_and_compiled_steps("cpu", whole=False)
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-4)
    assert_same_step(eager, compiled, lr, stats_tol=1e-4)
