"""Label maps (several classes): every encoding read to class indices, and values outside the classes named."""

import numpy as np
import pytest
from PIL import Image

from r2unet.data.imageio import DataError, class_colors, read_label_map, read_mask, save_label_map
from r2unet.data.synth import IMAGE_DIR, MASK_DIR, generate_dataset

LABELS = np.array([[0, 1, 2, 2], [0, 0, 1, 2], [1, 1, 0, 0]], np.uint8)


def test_a_palette_label_map_written_by_r2unet_reads_back_its_classes(tmp_path):
    save_label_map(LABELS, tmp_path / "m.png", 3)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and img.getpalette()[:9] == [v for c in class_colors(3) for v in c]
    assert np.array_equal(read_label_map(tmp_path / "m.png", 3), LABELS)


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_grayscale_values_are_the_classes(tmp_path, mode):
    Image.fromarray(LABELS.astype(np.uint16 if mode == "I;16" else np.uint8)).save(tmp_path / "m.png")
    assert np.array_equal(read_label_map(tmp_path / "m.png", 3), LABELS)


def test_an_rgb_label_map_is_read_through_the_class_colours(tmp_path):
    colors = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    Image.fromarray(np.array(colors, np.uint8)[LABELS]).save(tmp_path / "m.png")
    assert np.array_equal(read_label_map(tmp_path / "m.png", 3, colors), LABELS)
    with pytest.raises(DataError, match="needs the colour of each class"):
        read_label_map(tmp_path / "m.png", 3)
    with pytest.raises(DataError, match=r"m.png: colour \(0, 255, 0\) is none of the 2 classes' colours"):
        read_label_map(tmp_path / "m.png", 2, colors)


def test_a_label_outside_the_classes_is_named_with_the_file(tmp_path):
    Image.fromarray(LABELS * 100).save(tmp_path / "scaled.png")  # 0/100/200: not class indices
    with pytest.raises(DataError, match=r"scaled.png: label 200 outside the 3 classes 0..2"):
        read_label_map(tmp_path / "scaled.png", 3)


def test_synth_makes_a_three_class_set_whose_union_is_the_binary_set(tmp_path):
    generate_dataset(tmp_path / "binary", num_images=3, seed=1, max_side=200)
    generate_dataset(tmp_path / "three", num_images=3, seed=1, max_side=200, num_classes=3)
    for mask in sorted((tmp_path / "three" / MASK_DIR).iterdir()):
        labels = read_label_map(mask, 3)
        counts = np.bincount(labels.ravel(), minlength=3)
        assert counts.min() > 0 and labels.max() == 2  # background, lesion and core all present
        assert np.array_equal(labels > 0, read_mask(tmp_path / "binary" / MASK_DIR / mask.name))
    binary = sorted((tmp_path / "binary" / IMAGE_DIR).iterdir())
    three = sorted((tmp_path / "three" / IMAGE_DIR).iterdir())
    assert [p.name for p in binary] == [p.name for p in three]
    assert any(p.read_bytes() != q.read_bytes() for p, q in zip(binary, three))  # the core is drawn darker
    with pytest.raises(ValueError, match="--num_classes"):
        generate_dataset(tmp_path / "four", num_images=1, num_classes=4)
