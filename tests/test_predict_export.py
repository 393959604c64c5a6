import copy

import numpy as np
import pytest
import torch
from PIL import Image

from r2unet import create_model
from r2unet.commands.cli import main
from r2unet.engine.checkpoint import save_checkpoint
from r2unet.engine.config import TrainConfig
from r2unet.engine.inference import _at_size, predict_logits
from r2unet.engine.plots import plot_curves, redraw, sample_grid
from r2unet.engine.task import BINARY_TASK


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TrainConfig(model_type="R2AttU_Net", t=2, base_channels=4, image_size=32)
    model = create_model("R2AttU_Net", t=2, base_channels=4)
    with torch.no_grad():  # give BatchNorm non-trivial running statistics so outputs vary with the input
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.3)
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, model=model, config=cfg.to_dict(), epoch=1)
    return path, model


def _random_photos(folder, shapes, prefix: str, seed: int, ext: str = ".png"):
    """``folder/<prefix><i><ext>``: noise photos of the (height, width) ``shapes``; returns the folder."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{prefix}{i}{ext}")
    return folder


def test_predict_writes_binary_masks_at_original_sizes(checkpoint, tmp_path):
    path, _ = checkpoint
    sizes = [(50, 37), (123, 200), (640, 480), (33, 33)]
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        ext = [".jpg", ".png", ".bmp", ".tif"][i]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"img{i}{ext}")
    (src / "notes.txt").write_text("not an image")
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(np.zeros((37, 50), np.uint8)).save(gt / "img0_segmentation.png")
    assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(tmp_path / "out"),
                 "--overlay", "--save_probs", "--gt_dir", str(gt), "--batch_size", "3", "--device", "cpu"]) == 0
    for i, (w, h) in enumerate(sizes):
        mask = Image.open(tmp_path / "out" / f"img{i}_segmentation.png")
        assert mask.size == (w, h)
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        assert Image.open(tmp_path / "out" / f"img{i}_prob.png").size == (w, h)
        assert Image.open(tmp_path / "out" / f"img{i}_overlay.jpg").size == (w, h)


def test_overlays_show_the_photos_own_pixels_not_the_reduced_decode(checkpoint, tmp_path):
    """The network's input of a big JPEG comes from a reduced (draft) decode; the overlay must not be that reduced
    image scaled back up (blurred), but the photo at full resolution."""
    path, _ = checkpoint
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)  # fine detail that a blur would wipe out
    Image.fromarray(photo).save(src / "big.jpg", quality=95)
    assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(tmp_path / "out"),
                 "--overlay", "--device", "cpu"]) == 0
    shown = np.asarray(Image.open(tmp_path / "out" / "big_overlay.jpg")).astype(int)
    decoded = np.asarray(Image.open(src / "big.jpg")).astype(int)
    mask = np.asarray(Image.open(tmp_path / "out" / "big_segmentation.png")) > 0
    from r2unet.engine.plots import contour

    away = ~contour(mask)
    for _ in range(4):  # stay clear of the drawn outline and its JPEG ringing
        away[1:] &= away[:-1]
        away[:-1] &= away[1:]
        away[:, 1:] &= away[:, :-1]
        away[:, :-1] &= away[:, 1:]
    assert np.abs(shown - decoded)[away].mean() < 12  # only the overlay's own JPEG encoding differs


def test_threaded_prediction_keeps_order_and_values(checkpoint, tmp_path):
    from r2unet.engine.inference import predict_images

    _, model = checkpoint
    rng = np.random.default_rng(3)
    paths = []
    for i in range(7):  # three batches of 3, 3, 1 with different sizes, so a mix-up shows in the shapes
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (20 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)).save(paths[-1])
    one = list(predict_images(model, paths, 32, torch.device("cpu"), BINARY_TASK, batch_size=3, workers=1))
    many = list(predict_images(model, paths, 32, torch.device("cpu"), BINARY_TASK, batch_size=3, workers=4))
    assert [p for p, _, _ in many] == paths
    for (_, _, a), (_, _, b), path in zip(one, many, paths):
        assert a.shape == Image.open(path).size[::-1] and np.array_equal(a, b)


def test_long_runs_without_a_terminal_log_progress_lines(checkpoint, tmp_path, capsys, monkeypatch):
    from r2unet import progress

    path, _ = checkpoint
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(src / f"im{i}.png")
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line per image; the default is once a minute
    assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(tmp_path / "o"),
                 "--batch_size", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert [line.split(" (")[0] for line in printed.out.splitlines() if line.startswith("predict:")] == \
        ["predict: 1/4 img", "predict: 2/4 img", "predict: 3/4 img"]
    assert "\r" not in printed.err


def test_tta_is_the_mean_of_flipped_predictions(checkpoint):
    _, model = checkpoint
    model.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        p0 = torch.sigmoid(model(x))
        ph = torch.sigmoid(model(x.flip(3))).flip(3)
        pv = torch.sigmoid(model(x.flip(2))).flip(2)
        got = torch.sigmoid(predict_logits(model, x, BINARY_TASK, tta=True))
    assert torch.allclose(got, (p0 + ph + pv) / 3, atol=1e-5)
    assert not torch.allclose(got, p0, atol=1e-6)


def test_banded_upsampling_equals_one_interpolate():
    logits = torch.randn(1, 16, 16)
    small = _at_size([logits], 300, 200, BINARY_TASK, max_pixels=10**9)
    banded = _at_size([logits], 300, 200, BINARY_TASK, max_pixels=5000)
    assert np.abs(small - banded).max() < 1e-5


def test_a_run_folder_stands_for_its_best_checkpoint(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    from r2unet.engine.inference import load_for_inference

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(path.read_bytes())
    loaded, cfg = load_for_inference(run)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "is a folder, not a checkpoint" in capsys.readouterr().err


def test_predict_rejects_missing_input(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["predict", "--checkpoint", str(path), "--input", str(tmp_path / "nope"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unreadable_images_are_skipped_named_and_the_rest_written(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    src = _random_photos(tmp_path / "in", [(40 + i, 60) for i in range(3)], "ok", seed=1, ext=".jpg")
    (src / "fake.png").write_text("not a png")
    (src / "truncated.jpg").write_bytes((src / "ok1.jpg").read_bytes()[:600])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(out),
                 "--batch_size", "2", "--device", "cpu"]) == 2
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [f"ok{i}_segmentation.png" for i in range(3)]
    assert Image.open(out / "ok2_segmentation.png").size == (60, 42)
    assert "wrote 3 mask(s)" in printed.out
    assert "2 image(s) could not be read" in printed.err and "fake.png" in printed.err
    assert "truncated.jpg" in printed.err


def test_an_image_over_the_decompression_bomb_limit_is_skipped_named_and_the_rest_written(checkpoint, tmp_path,
                                                                                           capsys, monkeypatch):
    """Pillow refuses images over twice Image.MAX_IMAGE_PIXELS (a "decompression bomb"): predict stopped with a
    traceback and wrote nothing for the good images. The limit is lowered here instead of making a huge file."""
    path, _ = checkpoint
    src = _random_photos(tmp_path / "in", [(40, 60), (42, 60)], "ok", seed=1, ext=".jpg")
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(src / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40 000 pixels is over twice the limit
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(out),
                 "--device", "cpu"]) == 2
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["ok0_segmentation.png", "ok1_segmentation.png"]
    assert "huge.png" in printed.err and "too large to decode safely" in printed.err
    assert "Traceback" not in printed.err


def test_inputs_that_would_overwrite_each_other_are_refused_and_outputs_are_not_inputs(checkpoint, tmp_path,
                                                                                         capsys):
    path, _ = checkpoint
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.full((30, 40, 3), 120, np.uint8)).save(src / name)
    # the folder is its own output: a second run must not segment the masks and overlays the first one wrote
    for _ in range(2):
        assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(src), "--overlay",
                     "--save_probs", "--device", "cpu"]) == 0
        assert "wrote 2 mask(s)" in capsys.readouterr().out
    assert sorted(p.name for p in src.iterdir()) == sorted(
        ["a.jpg", "b.jpg"] + [f"{s}{suffix}" for s in "ab" for suffix in ("_segmentation.png", "_prob.png",
                                                                            "_overlay.jpg")])
    Image.fromarray(np.full((30, 40, 3), 60, np.uint8)).save(src / "a.png")  # a's masks would be overwritten
    assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    assert "a.jpg and a.png" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_reference_state_dict_predicts(tmp_path):
    model = create_model("U_Net", base_channels=4)
    torch.save(model.state_dict(), tmp_path / "ref.pkl")
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(tmp_path / "ref.pkl"), "--model_type", "U_Net",
                 "--base_channels", "4", "--image_size", "32", "--input", str(tmp_path / "a.png"),
                 "--output", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "o" / "a_segmentation.png").size == (30, 40)


def test_export_onnx_round_trip(checkpoint, tmp_path, capfd):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    path, _ = checkpoint
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx")]) == 0
    out, err = capfd.readouterr()
    assert "max |diff|" in out and (tmp_path / "m.onnx").stat().st_size > 1000
    assert "torchvision" not in err  # the exporter's note that it skips torchvision's operators: not for users
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 96)).astype(np.float32)  # another batch and size
    _, model = checkpoint
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {"image": x})[0] - ref).max() <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map  # enough to deploy it without this package
    assert meta["r2unet.model_type"] == "R2AttU_Net" and meta["r2unet.image_size"] == "32"
    assert meta["r2unet.threshold"] == "0.5" and "(x - 0.5) / 0.5" in meta["r2unet.preprocessing"]


def test_curves_and_grid_are_valid_pngs(tmp_path):
    rows = [{"epoch": e, "train_loss": 1 / e, "lr": 1e-3, "valid": {"JS": 0.1 * e, "DC": 0.12 * e},
             "train": {"JS": 0.11 * e}, **({"best": True} if e in (1, 3) else {})} for e in range(1, 5)]
    rows.append({"epoch": 5, "train_loss": 0.2, "lr": 1e-3})  # an epoch without validation (--eval_every)
    plot_curves(rows, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").format == "PNG"
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:20, 8:20] = True
    sample_grid([[(imgs[i], "image"), (masks[i], "ground truth"), (masks[i], "prediction")] for i in range(2)],
                tmp_path / "grid.png", "t")
    im = Image.open(tmp_path / "grid.png")
    assert im.format == "PNG" and im.size[0] > im.size[1]  # two rows of three panels
    (tmp_path / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows) + '{"epo')
    assert redraw(tmp_path)[0].name == "curves.png"  # a line cut by a crash is ignored


def test_safetensors_weights_round_trip(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "w.safetensors"
    assert main(["export", "--checkpoint", str(path), "--output", str(out)]) == 0
    assert "run's settings" in capsys.readouterr().out
    from safetensors.torch import save_file

    from r2unet.engine.inference import load_for_inference

    # the settings travel in the metadata: no --model_type/--t/--base_channels/--image_size needed
    loaded, cfg = load_for_inference(out)
    assert (cfg.model_type, cfg.t, cfg.base_channels, cfg.image_size) == ("R2AttU_Net", 2, 4, 32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # a bare safetensors state_dict from elsewhere still loads with the architecture given
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    loaded, _ = load_for_inference(bare, model_type="R2AttU_Net", t=2, base_channels=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_predict_defaults_to_the_checkpoints_threshold_and_precision(checkpoint, tmp_path):
    """A run trained with --amp off and --threshold 0.3 predicts in float32 at 0.3 unless told otherwise (so its
    masks agree with its reported scores)."""
    _, model = checkpoint
    path = tmp_path / "best.pt"
    cfg = TrainConfig(model_type="R2AttU_Net", t=2, base_channels=4, image_size=32, amp="off", threshold=0.3)
    save_checkpoint(path, model=model, config=cfg.to_dict(), epoch=1)
    src = _random_photos(tmp_path / "in", [(48, 64)] * 3, "p", seed=1)

    def run(name, *flags):
        assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(tmp_path / name),
                     "--save_probs", "--device", "cpu", *flags]) == 0
        return {kind: np.stack([np.asarray(Image.open(tmp_path / name / f"p{i}_{kind}.png")) for i in range(3)])
                for kind in ("segmentation", "prob")}

    default, explicit = run("default"), run("explicit", "--amp", "off", "--threshold", "0.3")
    assert np.array_equal(default["segmentation"], explicit["segmentation"])
    assert np.array_equal(default["prob"], explicit["prob"])
    # the comparisons can fail: the other threshold and precision give other outputs
    assert not np.array_equal(run("half", "--amp", "off", "--threshold", "0.5")["segmentation"],
                              default["segmentation"])
    assert not np.array_equal(run("bf16", "--amp", "bf16", "--threshold", "0.3")["prob"], default["prob"])


def test_an_interrupted_prediction_continues_with_skip_existing(checkpoint, tmp_path, monkeypatch, capsys):
    import r2unet.engine.inference as P

    path, _ = checkpoint
    src = _random_photos(tmp_path / "in", [(40 + i, 50) for i in range(5)], "q", seed=2)
    args = ["predict", "--checkpoint", str(path), "--input", str(src), "--device", "cpu", "--batch_size", "2",
            "--overlay"]
    assert main([*args, "--output", str(tmp_path / "clean")]) == 0

    real, calls = P._at_size, {"n": 0}

    def interrupted_on_the_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(P, "_at_size", interrupted_on_the_fourth)
    assert main([*args, "--output", str(out)]) == 130
    assert "run the same command with --skip_existing" in capsys.readouterr().out
    monkeypatch.setattr(P, "_at_size", real)
    done = sorted(p.name for p in out.glob("*_segmentation.png"))
    assert 0 < len(done) < 5 and not list(out.glob(".*"))  # whole files only, no temporary ones left
    before = {name: (out / name).stat().st_mtime_ns for name in done}

    assert main([*args, "--output", str(out), "--skip_existing"]) == 0
    printed = capsys.readouterr().out
    assert f"skipping {len(done)} image(s)" in printed and f"wrote {5 - len(done)} mask(s)" in printed
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # not written again
    for i in range(5):
        for suffix in ("_segmentation.png", "_overlay.jpg"):
            a, b = (np.asarray(Image.open(d / f"q{i}{suffix}")) for d in (tmp_path / "clean", out))
            assert np.array_equal(a, b), (i, suffix)


def _fake_run(folder, model, t, js_per_epoch, test_js=None):
    """A run folder as training leaves it (metrics.jsonl, config.json; results.json once finished)."""
    import json

    folder.mkdir(parents=True)
    best = max(range(len(js_per_epoch)), key=lambda i: js_per_epoch[i])
    rows = [{"epoch": i + 1, "train_loss": 1.0 - js, "lr": 2e-4, "valid": {"JS": js, "DC": min(1.0, js + 0.1)},
             **({"best": True} if i == best else {})} for i, js in enumerate(js_per_epoch)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.json").write_text(json.dumps({"model_type": model, "t": t}))
    if test_js is not None:
        (folder / "results.json").write_text(json.dumps({
            "test": {"JS": test_js, "DC": test_js + 0.1, "ACC": 0.9}, "best_epoch": best + 1,
            "test_spread": {k: {"sd": 0.1, "ci": [v - 0.05, v + 0.04], "level": 0.95}
                            for k, v in (("JS", test_js), ("DC", test_js + 0.1))},
            "best_valid_JS_plus_DC": 1.0, "fps": 123.4, "model_type": model, "t": t}))


def test_compare_draws_and_tabulates_several_runs(tmp_path, capsys):
    import json

    _fake_run(tmp_path / "a" / "run", "U_Net", 3, [0.3, 0.5, 0.45], test_js=0.52)
    _fake_run(tmp_path / "b" / "run", "R2U_Net", 2, [0.4, 0.6, 0.7], test_js=0.66)
    _fake_run(tmp_path / "c", "AttU_Net", 3, [0.2, 0.3])  # still training: no test scores yet
    runs = [str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), str(tmp_path / "c")]
    out = tmp_path / "cmp.png"
    assert main(["compare", *runs, "--output", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert Image.open(out).format == "PNG"
    assert table[1].split() == ["a/run", "(U_Net)", "3", "2", "0.5000", "0.5200", "0.470-0.560", "0.6200",
                                "0.9000", "123.4"]
    assert table[2].split() == ["b/run", "(R2U_Net", "t=2)", "3", "3", "0.7000", "0.6600", "0.610-0.700",
                                "0.7600", "0.9000", "123.4"]
    assert table[3].split() == ["c", "(AttU_Net)", "2", "2", "0.3000", "-", "-", "-", "-", "-"]
    assert main(["compare", *runs, "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["test"]["JS"] if r["test"] else None for r in report["runs"]] == [0.52, 0.66, None]
    assert main(["compare", str(tmp_path / "a"), "--output", str(out)]) == 2  # a folder that is not a run
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_a_reference_state_dict_needs_no_architecture_flags_but_t(tmp_path):
    from r2unet.engine.inference import load_for_inference

    torch.manual_seed(0)
    model = create_model("AttU_Net", base_channels=4).eval()
    torch.save(model.state_dict(), tmp_path / "AttU_Net-100-0.0002-70-0.4.pkl")  # the reference's file name
    said = []
    loaded, cfg = load_for_inference(tmp_path / "AttU_Net-100-0.0002-70-0.4.pkl", log=said.append)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert (cfg.model_type, cfg.base_channels) == ("AttU_Net", 4) and "AttU_Net with base_channels 4" in said[0]
    # a recurrent network's t is not in its weights: the default is said, and --t is taken as given
    torch.save(create_model("R2U_Net", t=2, base_channels=4).state_dict(), tmp_path / "r2u.pkl")
    said.clear()
    assert load_for_inference(tmp_path / "r2u.pkl", log=said.append)[1].t == 3
    assert "do not record t: using t=3" in said[0]
    said.clear()
    assert load_for_inference(tmp_path / "r2u.pkl", t=2, log=said.append)[1].t == 2 and "record t" not in said[0]


def test_export_at_a_size_the_networks_cannot_take_is_named(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    path, _ = checkpoint
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx"), "--image_size", "7"]) == 2
    err = capsys.readouterr().err
    assert "--image_size: must be a positive multiple of 16" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_safetensors_file_with_damaged_settings_is_named_not_guessed(checkpoint, tmp_path, capsys):
    """An exported .safetensors whose settings metadata is damaged was silently read as a bare state_dict (its t,
    threshold and image size then guessed)."""
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint
    good = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(path), "--output", str(good)]) == 0
    bad = tmp_path / "damaged.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={"format": "r2unet", "config": '{"model_type": "R2U'})
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(bad), "--output", str(tmp_path / "again.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "damaged.safetensors was written by r2unet export but its settings" in err and "Traceback" not in err


def test_predict_with_ground_truth_prints_each_images_scores_and_their_mean(checkpoint, tmp_path, capsys):
    """--gt_dir used to draw the ground truth and print no number: each image with a mask is scored at its own size
    (as evaluate --resolution original), one line each, then the mean; scores.csv has every score."""
    from r2unet.engine.metrics import MetricAccumulator

    path, _ = checkpoint
    src = _random_photos(tmp_path / "in", [(40, 50), (64, 48), (30, 30)], "p", seed=4)
    gt = tmp_path / "gt"
    gt.mkdir()
    truths = {}
    for i, (h, w) in enumerate([(40, 50), (64, 48)]):  # p2 has no mask: counted, not scored
        m = np.zeros((h, w), bool)
        m[5:h // 2, 4:w // 2] = True
        Image.fromarray(m).convert("1").save(gt / f"p{i}_mask.png")  # 1-bit PNG masks
        truths[f"p{i}.png"] = m
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(path), "--input", str(src), "--output", str(out), "--gt_dir",
                 str(gt), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    rows = dict(line.split(",", 1) for line in (out / "scores.csv").read_text().splitlines()[1:])
    assert sorted(rows) == ["p0.png", "p1.png"]
    js = []
    for name, truth in truths.items():  # each image's JS by hand, from the mask predict wrote
        mask = np.asarray(Image.open(out / f"{name[:-4]}_segmentation.png")) > 127
        acc = MetricAccumulator()
        acc.update(torch.from_numpy(mask).float()[None, None], torch.from_numpy(truth).float()[None, None])
        js.append(acc.compute()["JS"])
        assert f"  {name}  JS {js[-1]:.4f}  DC " in text
    assert f"mean of 2 image(s) against {gt}: JS {np.mean(js):.4f}" in text
    assert "(1 without a mask there, not scored)" in text
    assert 0 < np.mean(js) < 1, js  # a mask neither empty nor the truth: the numbers are the comparison's


def test_a_checkpoint_of_another_network_is_named_as_such(tmp_path, capsys):
    """A torchvision FCN's state_dict (326 keys) used to get "wrong --model_type?" and 300 lines of keys."""
    foreign = {f"backbone.layer{i}.0.conv1.weight": torch.zeros(8, 8, 3, 3) for i in range(1, 5)}
    foreign["classifier.4.weight"] = torch.zeros(1, 8, 1, 1)
    torch.save(foreign, tmp_path / "fcn.pth")
    src = _random_photos(tmp_path / "in", [(20, 20)], "p", seed=1)
    assert main(["predict", "--checkpoint", str(tmp_path / "fcn.pth"), "--input", str(src), "--output",
                 str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint of these networks (U_Net, R2U_Net, AttU_Net, R2AttU_Net): none of its 5 weight" in err
    assert "wrong --model_type" not in err and err.count("\n") == 1


def test_scoring_at_the_original_resolution_warns_of_nothing(checkpoint, tmp_path, capsys):
    """A 1-bit PNG mask (and every photo) was read into an array over Pillow's read-only buffer: PyTorch warned
    "The given NumPy array is not writable" in the middle of evaluate --resolution original's report."""
    import warnings

    from conftest import prepared_synthetic

    data = prepared_synthetic(tmp_path, 10, seed=6, max_side=80)
    for mask in (data / "test_GT").iterdir():
        Image.open(mask).convert("L").point(lambda v: 255 if v > 127 else 0).convert("1").save(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["evaluate", "--checkpoint", str(checkpoint[0]), "--data_path", str(data), "--resolution",
                     "original", "--device", "cpu"]) == 0
    assert "JS" in capsys.readouterr().out


def test_the_export_check_refuses_a_file_that_computes_something_else_and_scales_with_the_logits(tmp_path):
    """check_onnx compares the file with the model it came from: a file whose weights differ is refused, and its
    tolerance follows the logits' scale (large logits summed in another order differ more, in proportion)."""
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    from r2unet.engine.export import check_onnx
    from r2unet.engine.onnx import export_onnx
    from r2unet.errors import ExportError

    torch.manual_seed(0)
    model = create_model("U_Net", base_channels=4).eval()
    export_onnx(model, tmp_path / "m.onnx", image_size=32)
    assert check_onnx(model, tmp_path / "m.onnx", BINARY_TASK, 32, 3, log=lambda *_: None) <= 1e-4
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.Conv_1x1.weight.mul_(1.01)  # 1 % off: a file that no longer computes this model
    with pytest.raises(ExportError, match="not faithful"):
        check_onnx(changed, tmp_path / "m.onnx", BINARY_TASK, 32, 3, log=lambda *_: None)
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.Conv_1x1.weight.mul_(1e4)
        big.Conv_1x1.bias.mul_(1e4)
    export_onnx(big, tmp_path / "big.onnx", image_size=32)
    logs = []
    check_onnx(big, tmp_path / "big.onnx", BINARY_TASK, 32, 3, log=logs.append)  # float32 rounding of logits ~1e4
    assert "tolerance" in logs[0]
