"""Pairing users' own folders: every common mask naming, one folder per case, and the messages when pairing is
ambiguous or finds nothing."""

import json

import numpy as np
import pytest
from PIL import Image

from r2unet.commands.cli import main
from r2unet.data.cache import split_cache
from r2unet.data.imageio import DataError
from r2unet.data.pairs import CASE_RULE, checked_pairs, pair_files
from r2unet.data.prepare import prepare_split


def _image(path, size=(40, 30), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[5:20, 5:25] = 255
    Image.fromarray(m).save(path)


@pytest.mark.parametrize("suffix", ["", "_segmentation", "_mask", "_Mask", "_gt", "_GT", "_label", "_seg", "_lesion",
                                    "_anno", "-mask"])
@pytest.mark.parametrize("exts", [(".jpg", ".png"), (".JPG", ".bmp"), (".png", ".PNG")])
def test_every_common_mask_naming_pairs_by_itself(tmp_path, suffix, exts):
    img_ext, mask_ext = exts
    for i in range(3):
        _image(tmp_path / "img" / f"case{i}{img_ext}", seed=i)
        _mask(tmp_path / "gt" / f"case{i}{suffix}{mask_ext}")
    report = pair_files(tmp_path / "img", tmp_path / "gt")
    assert [(p.image.name, p.mask.name) for p in report.pairs] == \
        [(f"case{i}{img_ext}", f"case{i}{suffix}{mask_ext}") for i in range(3)]
    assert not report.missing_masks and not report.extra_masks and not report.ambiguous
    assert report.summary() == {"pairs": 3, "rules": {f"<stem>{suffix.lower()}": 3}}


def test_a_dataset_with_another_naming_prepares_trains_and_records_the_rule(tmp_path):
    for i in range(10):
        _image(tmp_path / "img" / f"scan_{i:02d}.png", seed=i)
        _mask(tmp_path / "gt" / f"scan_{i:02d}_Mask.png")
    lines = []
    manifest = prepare_split(tmp_path / "img", tmp_path / "gt", data_path=tmp_path / "d", cache_size=32,
                             log=lines.append)
    assert "paired 10 image(s) with masks: 10 as <stem>_mask" in lines
    assert manifest["pairing"] == {"pairs": 10, "rules": {"<stem>_mask": 10}, "mask_suffix": None,
                                   "recursive": False}
    assert (tmp_path / "d" / "train_GT" / f"{manifest['splits']['train'][0]['image'][:-4]}_Mask.png").is_file()
    assert len(split_cache(tmp_path / "d", "train", 32, progress=False, log=lambda *_: None)) == 7


def test_two_masks_for_one_image_are_named_and_mask_suffix_chooses(tmp_path):
    for i in range(4):
        _image(tmp_path / "img" / f"x{i}.png", seed=i)
        _mask(tmp_path / "gt" / f"x{i}_mask.png")
    _mask(tmp_path / "gt" / "x2.png")  # the exact stem too: which one is x2's mask?
    with pytest.raises(DataError, match=r"x2.png: more than one mask matches: x2.png, x2_mask.png; choose one naming "
                                        r"with --mask_suffix"):
        prepare_split(tmp_path / "img", tmp_path / "gt", data_path=tmp_path / "d", log=lambda *_: None)
    manifest = prepare_split(tmp_path / "img", tmp_path / "gt", data_path=tmp_path / "d", mask_suffix="_mask",
                             log=lambda *_: None, skip_bad=True)  # x2.png itself is then a mask without an image
    assert sum(len(v) for v in manifest["splits"].values()) == 4
    assert manifest["pairing"]["mask_suffix"] == "_mask"


def test_an_unusual_mask_suffix_is_given_and_the_copies_pair_again(tmp_path):
    for i in range(10):
        _image(tmp_path / "img" / f"p{i}.jpg", seed=i)
        _mask(tmp_path / "gt" / f"p{i}_contour.png")
    with pytest.raises(DataError) as nothing:
        prepare_split(tmp_path / "img", tmp_path / "gt", data_path=tmp_path / "d", log=lambda *_: None)
    said = str(nothing.value)
    assert "for p0.jpg these were looked for: p0.*, p0_segmentation.*, p0_mask.*" in said
    assert "the mask folder holds p0_contour.png, p1_contour.png" in said and "--mask_suffix" in said
    assert "problem" not in said  # one message, not one line per image and one per mask
    manifest = prepare_split(tmp_path / "img", tmp_path / "gt", data_path=tmp_path / "d", mask_suffix="_contour",
                             cache_size=32, log=lambda *_: None)
    entry = manifest["splits"]["train"][0]
    stem = entry["image"][:-4]
    assert entry == {"image": f"{stem}.jpg", "mask": f"{stem}.png", "from": [f"{stem}.jpg", f"{stem}_contour.png"]}
    assert len(split_cache(tmp_path / "d", "train", 32, progress=False, log=lambda *_: None)) == 7


def test_one_folder_per_case_in_every_common_shape(tmp_path):
    """--recursive: images and masks in subfolders of each case, side by side, or as image.png + label.png."""
    root = tmp_path / "cases"
    for i in range(3):
        _image(root / f"a{i}" / "images" / f"a{i}.png", seed=i)
        _mask(root / f"a{i}" / "masks" / f"a{i}.png")
        _image(root / f"b{i}" / f"b{i}.jpg", seed=10 + i)
        _mask(root / f"b{i}" / f"b{i}_seg.png")
        _image(root / f"c{i}" / "image.png", seed=20 + i)  # every case names its files the same
        _mask(root / f"c{i}" / "label.png")
    report = pair_files(root, root, recursive=True)
    assert not report.missing_masks and not report.extra_masks and not report.ambiguous
    pairs = {p.out_stem: (p.image.relative_to(root).as_posix(), p.mask.relative_to(root).as_posix())
             for p in report.pairs}
    assert pairs["a1"] == ("a1/images/a1.png", "a1/masks/a1.png")
    assert pairs["b2"] == ("b2/b2.jpg", "b2/b2_seg.png")
    assert pairs["c0_image"] == ("c0/image.png", "c0/label.png")
    assert report.summary()["rules"] == {"<stem>": 3, "<stem>_seg": 3, CASE_RULE: 3}
    assert main(["prepare", "--origin_data_path", str(root), "--origin_GT_path", str(root), "--data_path",
                 str(tmp_path / "d"), "--recursive", "--image_size", "32"]) == 0
    manifest = json.loads((tmp_path / "d" / "r2unet_manifest.json").read_text())
    names = sorted(e["image"] for s in manifest["splits"].values() for e in s)
    assert len(names) == 9 and "c1_image.png" in names and "a0.png" in names
    for split in (s for s in ("train", "valid", "test") if manifest["splits"][s]):  # the copies pair again
        pairs, problems, _ = checked_pairs(tmp_path / "d" / split, tmp_path / "d" / f"{split}_GT")
        assert not problems and len(pairs) == len(manifest["splits"][split])


def test_without_recursive_a_case_layout_says_where_to_look(tmp_path):
    _image(tmp_path / "cases" / "a" / "images" / "a.png")
    _mask(tmp_path / "cases" / "a" / "masks" / "a.png")
    with pytest.raises(DataError, match="no images found .*--recursive looks in subfolders"):
        pair_files(tmp_path / "cases", tmp_path / "cases")


def test_predict_finds_ground_truth_of_any_common_naming(tmp_path):
    from r2unet.commands.predict import find_gt, gt_masks

    _mask(tmp_path / "gt" / "a_GT.PNG")
    _mask(tmp_path / "gt" / "b.bmp")
    index = gt_masks(tmp_path / "gt")
    assert find_gt(index, tmp_path / "in" / "a.jpg").name == "a_GT.PNG"
    assert find_gt(index, tmp_path / "in" / "b.jpg").name == "b.bmp"
    assert find_gt(index, tmp_path / "in" / "c.jpg") is None


def test_folders_given_the_other_way_round_are_said_to_look_swapped(tmp_path):
    """The mask folder as the images: with ISIC's naming nothing pairs (it used to advise --mask_suffix); with one
    naming for both (Kvasir: images/x.jpg, masks/x.jpg, JPEG masks) everything pairs, and photos would have been
    thresholded into masks without a word."""
    from r2unet.data.synth import IMAGE_DIR, MASK_DIR, generate_dataset

    raw = tmp_path / "isic"
    generate_dataset(raw, num_images=6, seed=5, max_side=120)
    with pytest.raises(DataError, match="the two folders look swapped") as caught:
        prepare_split(raw / MASK_DIR, raw / IMAGE_DIR, data_path=tmp_path / "d1", log=lambda *_: None)
    assert "--mask_suffix" not in str(caught.value) and "--origin_data_path" in str(caught.value)
    kvasir = tmp_path / "kvasir"
    (kvasir / "images").mkdir(parents=True)
    (kvasir / "masks").mkdir()
    for photo in sorted((raw / IMAGE_DIR).iterdir()):  # the same stems, masks saved as JPEG as Kvasir's are
        Image.open(photo).save(kvasir / "images" / f"{photo.stem}.jpg")
        mask = next((raw / MASK_DIR).glob(f"{photo.stem}*"))
        Image.open(mask).convert("L").save(kvasir / "masks" / f"{photo.stem}.jpg", quality=75)
    assert len(pair_files(kvasir / "masks", kvasir / "images").pairs) == 6
    with pytest.raises(DataError, match=r"look like masks .*, and the masks in .* like photos: the two folders"):
        prepare_split(kvasir / "masks", kvasir / "images", data_path=tmp_path / "d2", log=lambda *_: None)
    manifest = prepare_split(kvasir / "images", kvasir / "masks", data_path=tmp_path / "d3", log=lambda *_: None)
    assert sum(len(v) for v in manifest["splits"].values()) == 6  # the right way round, it prepares
