"""Label maps of several classes: a synthetic 3-class set through prepare -> train -> evaluate -> predict -> export,
and the pieces (metrics, loss, augmentation, cache) checked on their own."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from r2unet.commands.cli import main
from r2unet.data.augment import AugmentConfig, train_batch
from r2unet.data.cache import split_cache
from r2unet.data.imageio import DataError, LabelMapsFound, read_label_map
from r2unet.data.synth import IMAGE_DIR, MASK_DIR, generate_dataset
from r2unet.data.targets import LabelMaps
from r2unet.engine.metrics import ClassAccumulator


def test_class_scores_are_counted_per_image_and_class():
    target = torch.tensor([[[[0, 1, 1, 2], [0, 0, 2, 2]]]], dtype=torch.float32)  # (1, 1, 2, 4)
    pred = torch.tensor([[[0, 1, 2, 2], [0, 0, 2, 0]]])
    probs = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    acc = ClassAccumulator(3)
    acc.update(probs, target)
    out = acc.compute()
    assert out["ACC"] == pytest.approx(6 / 8)
    assert out["JS_1"] == pytest.approx(1 / 2) and out["DC_1"] == pytest.approx(2 / 3)  # tp 1, fn 1
    assert out["JS_2"] == pytest.approx(2 / 4) and out["DC_2"] == pytest.approx(4 / 6)  # tp 2, fp 1, fn 1
    assert out["JS"] == pytest.approx(0.5) and out["DC"] == pytest.approx((2 / 3 + 4 / 6) / 2)
    empty = ClassAccumulator(3)  # a class neither labelled nor predicted scores 1, as an empty binary mask does
    empty.update(torch.nn.functional.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), 3).permute(0, 3, 1, 2).float(),
                 torch.zeros(1, 1, 2, 2))
    assert empty.compute()["JS_2"] == 1.0


def test_augmentation_moves_labels_by_nearest_neighbour_only():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(4, 64, 64, dtype=torch.uint8)
    labels[:, 10:40, 12:50] = 1
    labels[:, 20:30, 20:35] = 2
    images = torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8, generator=g)
    _, y = train_batch(images, labels, torch.ones(4), 48, AugmentConfig(augmentation_prob=1.0), g, labels=True)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0, 2.0} and (y == 2).any() and (y == 1).any()


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    generate_dataset(root / "raw", num_images=40, seed=5, max_side=160, num_classes=3)
    assert main(["prepare", "--origin_data_path", str(root / "raw" / IMAGE_DIR), "--origin_GT_path",
                 str(root / "raw" / MASK_DIR), "--data_path", str(root / "data"), "--num_classes", "3",
                 "--image_size", "48"]) == 0  # the label cache for the training below
    return root


def test_a_label_cache_keeps_class_indices_in_a_folder_of_its_own(three_classes):
    data = three_classes / "data"
    cache = split_cache(data, "valid", 32, targets=LabelMaps(3), progress=False, log=lambda *_: None)
    assert cache.folder.name == "valid-48-3classes" and set(np.unique(cache.masks)) == {0, 1, 2}
    with pytest.raises(LabelMapsFound, match="look like 3 classes"):  # read as binary masks, classes would merge
        split_cache(data, "valid", 32, progress=False, log=lambda *_: None)


def test_three_classes_train_evaluate_predict_and_export(three_classes, tmp_path, capsys):
    data, run = three_classes / "data", tmp_path / "run"
    assert main(["train", "--data_path", str(data), "--output_dir", str(run), "--num_classes", "3", "--model_type",
                 "U_Net", "--base_channels", "8", "--image_size", "48", "--batch_size", "4", "--num_epochs", "6",
                 "--lr", "0.002", "--beta1", "0.9", "--amp", "off", "--num_workers", "0", "--device", "cpu"]) == 0
    assert "caching" not in capsys.readouterr().out  # prepare --num_classes 3 built the caches train reads
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    fractions = {k: np.mean([(read_label_map(p, 3) == k).mean() for p in sorted((data / "test_GT").iterdir())])
                 for k in (1, 2)}
    for k in (1, 2):  # well above what labelling every pixel k scores (JS = the class's pixel share)
        assert test[f"JS_{k}"] > max(0.1, 2 * fractions[k]), (k, test, fractions)
    assert test["JS"] == pytest.approx((test["JS_1"] + test["JS_2"]) / 2)
    drawn = (run / "samples.png").read_bytes()  # the classes in colour; 'plot' redraws the same picture
    assert main(["plot", str(run)]) == 0 and (run / "samples.png").read_bytes() == drawn
    capsys.readouterr()

    assert main(["evaluate", "--checkpoint", str(run), "--data_path", str(data), "--device", "cpu", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # evaluate applies the postprocessing the run chose on validation, as results.json's postprocessed scores did
    expected = results["test_postprocessed"] or test
    assert scored["JS_2"] == pytest.approx(expected["JS_2"]) and "pooled" not in scored
    assert main(["evaluate", "--checkpoint", str(run), "--data_path", str(data), "--device", "cpu"]) == 0
    assert "JS_1" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(run), "--data_path", str(data), "--device", "cpu", "--json",
                 "--resolution", "original", "--tta"]) == 0  # each photo's class map against its label map file
    at_size = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at_size["num_images"] == scored["num_images"] and abs(at_size["JS"] - scored["JS"]) < 0.1
    assert main(["evaluate", "--checkpoint", str(run), "--data_path", str(data), "--device", "cpu",
                 "--thresholds", "0.3,0.5"]) == 2
    assert "--thresholds: for binary masks only; this checkpoint segments 3 classes" in capsys.readouterr().err

    out = tmp_path / "masks"
    assert main(["predict", "--checkpoint", str(run), "--input", str(data / "test"), "--output", str(out),
                 "--overlay", "--device", "cpu"]) == 0
    for image in sorted((data / "test").iterdir()):
        with Image.open(out / f"{image.stem}_segmentation.png") as m, Image.open(image) as i:
            assert m.mode == "P" and m.size == i.size  # a class map at the photo's own size
        assert read_label_map(out / f"{image.stem}_segmentation.png", 3).max() <= 2
        assert (out / f"{image.stem}_overlay.jpg").is_file()

    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import onnx

    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.onnx")]) == 0  # self-checked
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["r2unet.num_classes"] == "3" and json.loads(props["r2unet.class_colors"])[0] == [0, 0, 0]
    assert "argmax over the 3 logits" in props["r2unet.preprocessing"]


def test_a_run_keeps_the_colours_of_a_class_colors_file_not_its_path(tmp_path):
    from r2unet.engine.settings import train_settings

    table = tmp_path / "colors.json"
    table.write_text(json.dumps([[0, 0, 0], [255, 0, 0], [0, 0, 255]]))
    cfg = train_settings({"num_classes": 3, "class_colors": str(table)})
    table.unlink()  # the file may go; the run's settings still name the colours
    assert json.loads(cfg.class_colors) == [[0, 0, 0], [255, 0, 0], [0, 0, 255]]


# --------------------------------------------------------------------------- 255: pixels of no class, ignored
def test_pixels_of_no_class_are_read_and_left_out_of_the_loss_and_the_scores(tmp_path):
    from r2unet.data.targets import IGNORE, LabelMaps
    from r2unet.engine.task import task_for

    labels = np.array([[0, 1, 1, 2], [0, IGNORE, 2, 2], [IGNORE, IGNORE, 0, 0]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "m.png")
    assert np.array_equal(LabelMaps(3).read(tmp_path / "m.png"), labels)  # kept as it is
    Image.fromarray(np.where(labels == IGNORE, 7, labels).astype(np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match="label 7 outside the 3 classes"):  # any other value is still named
        LabelMaps(3).read(tmp_path / "bad.png")

    task = task_for(3)
    target = torch.from_numpy(labels)[None, None].float()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 3, 4, generator=g, requires_grad=True)
    for kind in ("bce", "dice_bce", "focal", "tversky"):
        other = logits.detach().clone()
        other[..., torch.from_numpy(labels == IGNORE)] += 5.0  # only the ignored pixels' logits differ
        assert torch.equal(task.loss(logits, target, kind), task.loss(other, target, kind))
        grad, = torch.autograd.grad(task.loss(logits, target, kind), logits)
        assert (grad[..., torch.from_numpy(labels == IGNORE)] == 0).all()

    right = torch.from_numpy(np.where(labels == IGNORE, 0, labels)).long()
    probs = torch.nn.functional.one_hot(right, 3).permute(2, 0, 1)[None].float()
    wrong_where_ignored = probs.clone()
    wrong_where_ignored[:, :, torch.from_numpy(labels == IGNORE)] = torch.tensor([0.0, 0.0, 1.0])[:, None]
    for p in (probs, wrong_where_ignored):
        acc = task.accumulator()
        acc.update(p, target)
        scores = acc.compute()
        assert scores["ACC"] == 1.0 and scores["JS"] == 1.0 and scores["DC"] == 1.0, scores


def test_a_label_map_set_with_pixels_of_no_class_prepares_trains_and_evaluates(tmp_path, capsys):
    generate_dataset(tmp_path / "raw", num_images=14, seed=8, max_side=120, num_classes=3)
    for p in sorted((tmp_path / "raw" / MASK_DIR).iterdir()):  # a 2-pixel band of no class around each lesion
        labels = np.asarray(Image.open(p)).copy()
        lesion = labels > 0
        grown = lesion.copy()
        for axis in (0, 1):
            for shift in (-2, 2):
                grown |= np.roll(lesion, shift, axis)
        labels[grown & ~lesion] = 255
        Image.fromarray(labels).save(p)  # grey values 0, 1, 2 and 255
    images, masks, data = tmp_path / "raw" / IMAGE_DIR, tmp_path / "raw" / MASK_DIR, tmp_path / "data"
    argv = ["prepare", "--origin_data_path", str(images), "--origin_GT_path", str(masks), "--data_path", str(data),
            "--image_size", "32"]
    assert main(argv) == 2  # without --num_classes: not read as binary masks (255 would be the lesion)
    assert "--num_classes 3" in capsys.readouterr().err
    assert main([*argv, "--num_classes", "3"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data_path", str(data), "--output_dir", str(run), "--num_classes", "3", "--model_type",
                 "U_Net", "--base_channels", "4", "--image_size", "32", "--batch_size", "4", "--num_epochs", "1",
                 "--amp", "off", "--num_workers", "0", "--device", "cpu", "--loss", "dice_bce"]) == 0
    assert np.isfinite(json.loads((run / "results.json").read_text())["test"]["JS"])
    for resolution in ("training", "original"):
        assert main(["evaluate", "--checkpoint", str(run), "--data_path", str(data), "--device", "cpu", "--json",
                     "--resolution", resolution]) == 0
