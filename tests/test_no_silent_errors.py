"""Plausible inputs that used to give a wrong result with exit code 0: each now ends in a message that names the
problem and the fix (or in the right result). Binary masks as real datasets store them keep working unchanged."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from r2unet.commands.cli import main
from r2unet.data.imageio import DataError, NotBinaryMask, label_map_found, read_mask
from r2unet.data.synth import IMAGE_DIR, MASK_DIR, generate_dataset

TINY_TRAIN = ["--model_type", "U_Net", "--base_channels", "4", "--image_size", "32", "--batch_size", "2",
              "--num_workers", "0", "--device", "cpu", "--num_epochs_decay", "0", "--amp", "off"]


def _gray_label_maps(root, n: int = 12):
    """A raw set whose masks are grayscale label maps with values {0, 1, 2} (lesion 1, its core 2)."""
    generate_dataset(root, num_images=n, seed=2, max_side=120, num_classes=3)
    for p in sorted((root / MASK_DIR).iterdir()):
        Image.fromarray(np.asarray(Image.open(p))).save(p)  # palette indices -> the same values as grey levels
    return root / IMAGE_DIR, root / MASK_DIR


def _prepare(images, masks, data, *extra):
    return main(["prepare", "--origin_data_path", str(images), "--origin_GT_path", str(masks), "--data_path",
                 str(data), "--image_size", "32", *extra])


# ------------------------------------------------------------------------------ label maps read as binary masks
def test_a_label_map_set_without_num_classes_stops_saying_how_many_classes_and_the_flag(tmp_path, capsys):
    images, masks = _gray_label_maps(tmp_path / "raw")
    assert Image.open(next(masks.iterdir())).mode == "L"
    assert _prepare(images, masks, tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert "label maps, not binary masks" in err and "look like 3 classes" in err and "--num_classes 3" in err
    assert not (tmp_path / "data" / "train").exists()  # stopped before any file was written
    for flag in ([], ["--no_cache"], ["--num_classes", "1"]):  # the binary default, said or not, with or without cache
        assert _prepare(images, masks, tmp_path / "d2", *flag) == 2
        assert "--num_classes 3" in capsys.readouterr().err
    # with the flag, the same set prepares, trains and scores its classes
    assert _prepare(images, masks, tmp_path / "data", "--num_classes", "3") == 0


def test_training_or_evaluating_as_binary_on_a_label_map_split_is_refused(tmp_path, capsys):
    images, masks = _gray_label_maps(tmp_path / "raw", n=14)
    data = tmp_path / "data"
    assert _prepare(images, masks, data, "--num_classes", "3") == 0
    # train without --num_classes on the label-map split: the cache build stops at the first label map
    assert main(["train", "--data_path", str(data), "--output_dir", str(tmp_path / "bin"), "--num_epochs", "1",
                 *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert "label maps, not binary masks" in err and "--num_classes 3" in err
    assert not (tmp_path / "bin" / "results.json").exists()
    # a binary checkpoint evaluated on it is named as such, at either resolution
    from r2unet import create_model
    from r2unet.engine.checkpoint import save_weights_safetensors

    save_weights_safetensors(create_model("U_Net", base_channels=4), tmp_path / "binary.safetensors",
                             {"model_type": "U_Net", "base_channels": 4, "image_size": 32})
    for resolution in ("training", "original"):
        assert main(["evaluate", "--checkpoint", str(tmp_path / "binary.safetensors"), "--data_path", str(data),
                     "--device", "cpu", "--resolution", resolution]) == 2
        err = capsys.readouterr().err
        assert "a model of binary masks" in err and "label maps" in err and "--num_classes 3" in err


def test_an_rgb_label_map_is_refused_with_the_colours_to_pass_and_they_work(tmp_path, capsys):
    generate_dataset(tmp_path / "raw", num_images=10, seed=4, max_side=120, num_classes=3)
    colours = [(0, 0, 0), (255, 255, 0), (0, 128, 255)]
    for p in sorted((tmp_path / "raw" / MASK_DIR).iterdir()):
        labels = np.asarray(Image.open(p))
        Image.fromarray(np.asarray(colours, np.uint8)[labels]).save(p)  # RGB: yellow lesion, blue core
    images, masks = tmp_path / "raw" / IMAGE_DIR, tmp_path / "raw" / MASK_DIR
    assert _prepare(images, masks, tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert "RGB colours" in err and "--num_classes 3" in err
    flag = err.split("--class_colors '")[1].split("'")[0]
    assert json.loads(flag) == [list(c) for c in colours]  # black first, then by area: what to type
    assert _prepare(images, masks, tmp_path / "data", "--num_classes", "3", "--class_colors", flag) == 0


def test_binary_masks_as_datasets_store_them_are_still_binary(tmp_path):
    base = np.zeros((300, 400), bool)
    yy, xx = np.mgrid[:300, :400]
    base[(yy - 140) ** 2 / 90**2 + (xx - 210) ** 2 / 150**2 < 1] = True  # a curved lesion, as real ones are
    gray = base.astype(np.uint8) * 255
    cases = {"jpeg_q20": ("JPEG", Image.fromarray(gray), {"quality": 20}),
             "jpeg_red_q30": ("JPEG", Image.fromarray(np.stack([gray, 0 * gray, 0 * gray], -1)), {"quality": 30}),
             "resized": ("PNG", Image.fromarray(gray).resize((131, 97), Image.BILINEAR).resize((400, 300)), {}),
             "antialiased_small": ("PNG", Image.fromarray(gray).resize((40, 30), Image.LANCZOS), {}),
             "u16": ("PNG", Image.fromarray(base.astype(np.uint16) * 65535), {}),
             "white_on_black_rgba": ("PNG", Image.fromarray(np.stack([gray] * 3 + [gray * 0 + 255], -1)), {}),
             "empty": ("PNG", Image.fromarray(gray * 0), {}),
             "one_grey_level": ("PNG", Image.fromarray(base.astype(np.uint8) * 200), {})}
    for name, (fmt, img, opts) in cases.items():
        data = io.BytesIO()
        img.save(data, fmt, **opts)
        decoded = Image.open(io.BytesIO(data.getvalue()))
        assert label_map_found(decoded) is None, name
        path = tmp_path / f"{name}.{fmt.lower()}"
        path.write_bytes(data.getvalue())
        m = read_mask(path)
        if name == "empty":
            assert not m.any()
        elif name not in ("antialiased_small",):
            assert (m == base).mean() > 0.98, name


@pytest.mark.parametrize("values,classes", [((0, 1, 2), 3), ((0, 2), 3), ((0, 1, 2, 3, 4), 5), ((0, 85, 170, 255), 4),
                                            ((0, 127, 254), 3)])
def test_label_values_in_a_grey_mask_are_named_with_the_classes_they_look_like(tmp_path, values, classes):
    m = np.zeros((60, 90), np.uint8)
    for k, v in enumerate(values):
        m[:, k * 90 // len(values):] = v
    Image.fromarray(m).save(tmp_path / "m.png")
    with pytest.raises(NotBinaryMask) as err:
        read_mask(tmp_path / "m.png")
    assert err.value.classes == classes and f"--num_classes {classes}" in str(err.value)
    assert isinstance(err.value, DataError) and "m.png" in str(err.value)


def test_an_onnx_whose_output_has_several_channels_and_no_class_count_does_not_merge_them(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import warnings

    import onnx

    from r2unet import create_model
    from r2unet.engine.onnx import load_onnx

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(create_model("U_Net", base_channels=4, output_ch=3).eval(), (torch.zeros(1, 3, 32, 32),),
                          str(path), input_names=["image"], output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}})
    proto = onnx.load(str(path))
    for key, value in (("image_size", "32"), ("model_type", "U_Net"), ("base_channels", "4")):  # no num_classes
        prop = proto.metadata_props.add()
        prop.key, prop.value = f"r2unet.{key}", value
    onnx.save(proto, str(path))
    logs = []
    _, cfg = load_onnx(path, log=logs.append)
    assert cfg.num_classes == 3 and any("3 output channels" in line and "m.onnx" in line for line in logs)


# ------------------------------------------------------------------------------------ ONNX metadata that lies
@pytest.fixture(scope="module")
def onnx_graphs(tmp_path_factory):
    """A small binary U-Net exported twice: by r2unet (any batch and size) and traced at 1x3x32x32 (a fixed shape,
    as other tools export)."""
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import warnings

    from r2unet import create_model
    from r2unet.engine.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = create_model("U_Net", base_channels=4).eval()
    export_onnx(model, root / "dynamic.onnx", image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(root / "fixed.onnx"), input_names=["image"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    return root


def _onnx_with(graphs, dest, props: dict, *, fixed: bool = False):
    """A copy of one of ``onnx_graphs`` whose r2unet metadata is replaced by ``props``."""
    import onnx

    proto = onnx.load(str(graphs / ("fixed.onnx" if fixed else "dynamic.onnx")))
    del proto.metadata_props[:]
    for key, value in {"image_size": "32", "model_type": "U_Net", "base_channels": "4", **props}.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = f"r2unet.{key}", str(value)
    onnx.save(proto, str(dest))
    return dest


def _photos(folder, n: int = 3):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((40 + 8 * i, 50, 3), 60 * i, np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_onnx_metadata_that_contradicts_the_graph_is_named_by_file_and_key(onnx_graphs, tmp_path, capsys,
                                                                          monkeypatch):
    from r2unet.engine import runtime

    photos = _photos(tmp_path / "photos")
    monkeypatch.setattr(runtime, "available_memory", lambda: 2 * 2**30)  # the same answer on every machine
    cases = {"classes.onnx": ({"num_classes": "5"}, "r2unet.num_classes says 5, but its output has 1 channel"),
             "huge.onnx": ({"image_size": "8192"}, "r2unet.image_size 8192 needs about"),
             "abc.onnx": ({"image_size": "abc"}, "r2unet.image_size is 'abc', not a whole number"),
             "threshold.onnx": ({"threshold": "7"}, "r2unet.threshold is '7'")}
    for name, (props, message) in cases.items():
        path = _onnx_with(onnx_graphs, tmp_path / name, props)
        assert main(["predict", "--checkpoint", str(path), "--input", str(photos), "--output",
                     str(tmp_path / "out" / name)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and name in err and "Traceback" not in err, (name, err)
        assert not list((tmp_path / "out" / name).glob("*.png")) if (tmp_path / "out" / name).exists() else True


def test_an_onnx_with_a_fixed_input_shape_runs_at_that_shape_or_says_why_not(onnx_graphs, tmp_path, capsys):
    photos = _photos(tmp_path / "photos", n=5)
    fixed = _onnx_with(onnx_graphs, tmp_path / "fixed.onnx", {}, fixed=True)  # 1x3x32x32; 5 images, batches of 8
    assert main(["predict", "--checkpoint", str(fixed), "--input", str(photos), "--output", str(tmp_path / "a"),
                 "--batch_size", "8"]) == 0
    assert len(list((tmp_path / "a").glob("*_segmentation.png"))) == 5
    dynamic = _onnx_with(onnx_graphs, tmp_path / "dynamic.onnx", {})  # the same weights: the same masks
    assert main(["predict", "--checkpoint", str(dynamic), "--input", str(photos), "--output", str(tmp_path / "b")]) == 0
    for p in sorted((tmp_path / "a").iterdir()):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "b" / p.name))), p.name
    capsys.readouterr()
    wrong = _onnx_with(onnx_graphs, tmp_path / "fixed64.onnx", {"image_size": "64"}, fixed=True)
    assert main(["predict", "--checkpoint", str(wrong), "--input", str(photos), "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "fixed64.onnx: its input is fixed at 32x32 pixels, but metadata r2unet.image_size says 64" in err


# ----------------------------------------------------------------------------- palettes against the colour table
def test_a_palette_that_orders_its_colours_its_own_way_is_read_by_colour_and_named(tmp_path, capsys):
    from r2unet.data.cache import split_cache
    from r2unet.data.imageio import class_colors, read_label_map
    from r2unet.data.targets import LabelMaps

    generate_dataset(tmp_path / "raw", num_images=12, seed=6, max_side=120, num_classes=3)
    masks = sorted((tmp_path / "raw" / MASK_DIR).iterdir())
    colours = class_colors(3)
    truth = {p.name: np.asarray(Image.open(p)).copy() for p in masks}
    for p in masks[::3]:  # a paint program's palette: index 1 is the core's colour, index 2 the lesion's
        img = Image.fromarray(np.array([0, 2, 1], np.uint8)[truth[p.name]], mode="P")
        img.putpalette([*colours[0], *colours[2], *colours[1]])
        img.save(p)
        assert not np.array_equal(np.asarray(Image.open(p)), truth[p.name])  # the indices differ, the picture not
    table = tmp_path / "colors.json"
    table.write_text(json.dumps([list(c) for c in colours]))
    for p in masks:
        assert np.array_equal(read_label_map(p, 3, colours), truth[p.name]), p.name
    data = tmp_path / "data"
    assert _prepare(tmp_path / "raw" / IMAGE_DIR, tmp_path / "raw" / MASK_DIR, data, "--num_classes", "3",
                    "--class_colors", str(table)) == 0
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if "number their classes differently from --class_colors" in line]
    assert warned and all(sum(p.name in line for line in warned) == 1 for p in masks[::3])  # each named, once
    # the cache the training reads holds the classes the colours say, for every mask
    for split in ("train", "valid", "test"):
        cache = split_cache(data, split, 32, targets=LabelMaps(3, tuple(colours)), progress=False,
                            log=lambda *_: None)
        for name, row in zip(cache.names, cache.masks):
            small = np.asarray(Image.fromarray(truth[name.replace(".jpg", "_segmentation.png")]).resize(
                row.shape[::-1], Image.NEAREST))
            assert np.array_equal(row, small), name
    # a palette colour that is none of the classes' is named with its index
    img = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), mode="P")
    img.putpalette([*colours[0], *colours[1], *colours[2], 9, 9, 9])
    img.save(tmp_path / "odd.png")
    with pytest.raises(DataError, match=r"odd.png: palette index 3 has colour \(9, 9, 9\)"):
        read_label_map(tmp_path / "odd.png", 3, colours)


# ------------------------------------------------------------------------------------------ linked case folders
def test_linked_case_folders_are_followed_and_a_loop_is_named_not_followed(tmp_path, capsys):
    import os

    cases, elsewhere = tmp_path / "cases", tmp_path / "elsewhere"
    for root, name in ((cases, "c1"), (cases, "c2"), (elsewhere, "c3"), (elsewhere, "c4")):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / name / "image.png")
        mask = np.zeros((40, 50), np.uint8)
        mask[10:30, 10:40] = 255
        Image.fromarray(mask).save(root / name / "label.png")
    os.symlink(elsewhere / "c3", cases / "c3")  # case folders kept on another disk, linked in
    os.symlink(elsewhere / "c4", cases / "c4")
    os.symlink(cases, cases / "c2" / "back")  # a link back up: a loop
    os.symlink(tmp_path / "gone", cases / "c5")  # a link to nothing
    data = tmp_path / "data"
    assert main(["prepare", "--origin_data_path", str(cases), "--origin_GT_path", str(cases), "--data_path", str(data),
                 "--recursive", "--no_cache", "--train_ratio", "1", "--valid_ratio", "0", "--test_ratio", "0"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((data / "r2unet_manifest.json").read_text())
    assert sorted(e["image"] for e in manifest["splits"]["train"]) == [f"c{i}_image.png" for i in (1, 2, 3, 4)]
    assert f"{cases / 'c2' / 'back'}: the same folder as {cases}" in out  # read once, said
    assert f"{cases / 'c5'}: a link to {tmp_path / 'gone'}, which does not exist" in out
    assert len(manifest["passed_over"]) == 2


# --------------------------------------------------------------------------------------------- stable splits
def _members(manifest: dict) -> dict:
    return {e["image"]: split for split, entries in manifest["splits"].items() for e in entries}


def test_a_re_split_keeps_every_image_in_its_split_and_a_resume_on_a_changed_split_says_what_changed(tmp_path, capsys):
    import shutil

    raw, more = tmp_path / "raw", tmp_path / "more"
    generate_dataset(raw, num_images=30, seed=1, max_side=100)
    generate_dataset(more, num_images=10, seed=2, max_side=100)  # other names: ISIC_02000xx
    images, masks = raw / IMAGE_DIR, raw / MASK_DIR
    data, run = tmp_path / "data", tmp_path / "run"
    prepare = ["prepare", "--origin_data_path", str(images), "--origin_GT_path", str(masks), "--data_path", str(data),
               "--no_cache", "--seed", "3"]
    assert main(prepare) == 0
    first = json.loads((data / "r2unet_manifest.json").read_text())
    train = ["train", "--data_path", str(data), "--output_dir", str(run), *TINY_TRAIN]
    assert main([*train, "--num_epochs", "1"]) == 0
    recorded = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["data_split"]
    assert sorted(recorded["splits"]["train"]) == sorted(n for n, s in _members(first).items() if s == "train")
    assert json.loads((run / "results.json").read_text())["split_fingerprint"] == recorded["fingerprint"]

    # ten images added to the source, prepared again: every image keeps its split, only the new ones are assigned
    for folder in (IMAGE_DIR, MASK_DIR):
        for p in (more / folder).iterdir():
            shutil.copy(p, raw / folder / p.name)
    assert main([*prepare, "--overwrite"]) == 0
    assert "kept the split of 30 image(s), added" in capsys.readouterr().out
    second = json.loads((data / "r2unet_manifest.json").read_text())
    before, after = _members(first), _members(second)
    assert all(after[name] == split for name, split in before.items())  # nobody moved
    assert len(after) == 40 and [s for s in after.values()].count("train") == 28  # 70 % of the new total
    assert main([*prepare, "--overwrite"]) == 0 and _members(
        json.loads((data / "r2unet_manifest.json").read_text())) == after  # reproducible
    capsys.readouterr()

    # --resume on it: refused, saying what changed, unless told to go on
    assert main([*train, "--resume", "--num_epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the split of" in err and "7 added to train" in err and "--accept_split_change" in err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1  # nothing trained
    assert main([*train, "--resume", "--num_epochs", "2", "--accept_split_change"]) == 0
    assert "going on (--accept_split_change)" in capsys.readouterr().out

    # another seed would move images: refused; --resplit shuffles anew, and then resume and evaluate say so
    assert main([*prepare[:-1], "5", "--overwrite"]) == 2
    assert "would move images a model may have trained on" in capsys.readouterr().err
    assert main([*prepare[:-1], "5", "--overwrite", "--resplit"]) == 0
    capsys.readouterr()
    assert main([*train, "--resume", "--num_epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "moved from train to test" in err or "moved from train to valid" in err
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--data_path", str(data),
                 "--device", "cpu", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    third = _members(json.loads((data / "r2unet_manifest.json").read_text()))
    trained_then = {n for n, s in after.items() if s == "train"}
    moved = sorted(n for n, s in third.items() if s == "test" and n in trained_then)
    assert moved and scored["split_changed"]["trained_on"] == moved


# ------------------------------------------------------------------------------------ one pixel limit, header reads
def _tiny_checkpoint(tmp_path):
    from r2unet import create_model
    from r2unet.engine.checkpoint import save_weights_safetensors

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_weights_safetensors(create_model("U_Net", base_channels=4), path,
                             {"model_type": "U_Net", "base_channels": 4, "image_size": 32})
    return path


def test_an_image_between_one_and_two_times_the_pixel_limit_is_refused_everywhere(tmp_path, capsys, monkeypatch):
    """Pillow refuses images over twice its limit but only warns between one and two times it: a 140 KB PNG
    declaring 12000 x 12000 was decoded (14 s, 3.1 GB). Here the limit is lowered instead of making such a file."""
    raw = tmp_path / "raw"
    generate_dataset(raw, num_images=6, seed=3, max_side=256)
    big = np.zeros((120, 120), np.uint8)  # 14 400 pixels: between one and two times the limit
    big[30:90, 30:90] = 255
    for p in (raw / IMAGE_DIR).iterdir():  # the others small enough
        Image.open(p).resize((60, 45)).save(p)
        mask = raw / MASK_DIR / f"{p.stem}_segmentation.png"
        Image.open(mask).resize((60, 45)).save(mask)
    Image.fromarray(np.stack([big] * 3, -1)).save(raw / IMAGE_DIR / "ISIC_9999999.jpg")
    Image.fromarray(big).save(raw / MASK_DIR / "ISIC_9999999_segmentation.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    argv = ["prepare", "--origin_data_path", str(raw / IMAGE_DIR), "--origin_GT_path", str(raw / MASK_DIR),
            "--image_size", "32"]
    assert main([*argv, "--data_path", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "ISIC_9999999.jpg: too large to decode safely: 120x120 = 14,400 pixels, over the limit of 10,000" in err
    assert main([*argv, "--data_path", str(tmp_path / "b"), "--max_pixels", "20000"]) == 0  # the limit is a flag

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.stack([big] * 3, -1)).save(photos / "big.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(photos / "small.png")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(_tiny_checkpoint(tmp_path)), "--input", str(photos), "--output",
                 str(out), "--device", "cpu"]) == 2
    assert "big.png: too large to decode safely" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["small_segmentation.png"]
    with pytest.raises(DataError, match="too large to decode safely"):
        read_mask(photos / "big.png")


def test_size_checks_read_headers_only_and_png_exif_orientation_is_still_seen(tmp_path, monkeypatch):
    from PIL import ImageFile

    from r2unet.data.imageio import image_size, mask_frame, read_image
    from r2unet.data.pairs import Pair, check_pair

    photo = np.zeros((300, 400, 3), np.uint8)
    photo[:, :200] = 200
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees
    Image.fromarray(photo).save(tmp_path / "turned.png", exif=exif.tobytes())
    Image.fromarray(photo).save(tmp_path / "plain.png")
    Image.fromarray(np.zeros((400, 300), np.uint8)).save(tmp_path / "mask.png")
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (loads.append(self.filename), real(self))[1])
    assert image_size(tmp_path / "turned.png") == (300, 400) and image_size(tmp_path / "plain.png") == (400, 300)
    assert mask_frame(tmp_path / "turned.png", (300, 400)) == (True, False)
    check_pair(Pair(tmp_path / "turned.png", tmp_path / "mask.png"))
    assert loads == []  # no pixel decoded for a size
    shown = read_image(tmp_path / "turned.png")
    assert shown.shape == (400, 300, 3) and shown[0, -1, 0] == 200  # the pixels turned as the header says
