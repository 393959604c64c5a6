"""Every file whole or absent, even where an encoder ignores a short write; messages bounded whatever the input."""

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from r2unet.commands.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from r2unet import create_model
    from r2unet.engine.checkpoint import save_weights_safetensors

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_weights_safetensors(create_model("U_Net", base_channels=4), path,
                             {"model_type": "U_Net", "base_channels": 4, "image_size": 32})
    return path


def _photos(folder, n: int, size):
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(n):  # noisy photos: their overlays are large JPEGs for their size
        Image.fromarray(g.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _decodes(path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()  # a truncated JPEG or PNG fails here ("image file is truncated")
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_nearly_full_disk_leaves_no_truncated_overlay_under_its_final_name(tiny_model, tmp_path):
    """Pillow's JPEG encoder writes to the file descriptor itself and ignored the short write of a full disk: the
    cut-short file was fsynced and renamed, in 7 of 8 runs. Encoded in memory and written in one checked write, a
    file is now whole or absent, whatever room is left."""
    photos = _photos(tmp_path / "photos", 3, size=(120, 160))  # overlays of about 20 KB: one encoder write each
    for k, free in enumerate(range(8192, 65536, 8192)):
        disk = tmp_path / f"disk{k}"
        disk.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                                 text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (root and mount needed): {mounted.stderr.strip()[:120]}")
        try:
            with open(disk / "filler", "wb") as f:  # leave ``free`` bytes
                f.write(b"\0" * (1024 * 1024 - free))
            rc = main(["predict", "--checkpoint", str(tiny_model), "--input", str(photos), "--output",
                       str(disk / "out"), "--overlay", "--device", "cpu"])
            written = [p for p in (disk / "out").rglob("*") if p.is_file()] if (disk / "out").exists() else []
            assert rc in (0, 2)
            assert all(_decodes(p) for p in written), [p.name for p in written if not _decodes(p)]
            assert not [p for p in written if p.name.startswith(".")]  # no temporary file left either
        finally:
            subprocess.run(["umount", str(disk)], capture_output=True)


def test_skip_existing_makes_a_cut_short_output_again(tiny_model, tmp_path, capsys):
    photos = _photos(tmp_path / "photos", 3, size=(60, 80))
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(tiny_model), "--input", str(photos), "--output", str(out), "--overlay",
            "--device", "cpu"]
    assert main(argv) == 0
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    cut = out / "p1_overlay.jpg"
    cut.write_bytes(whole[cut.name][: len(whole[cut.name]) // 2])  # as a full disk left it before
    (out / "p2_segmentation.png").write_bytes(whole["p2_segmentation.png"][:-20])
    capsys.readouterr()
    assert main([*argv, "--skip_existing"]) == 0
    printed = capsys.readouterr().out
    assert "2 output file(s) in" in printed and "p1_overlay.jpg" in printed and "are made again" in printed
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole


def _alias_bomb(levels: int) -> str:
    """A YAML list of anchored lists, each holding the one before nine times: its last entry expands to 9**levels
    strings, from a few hundred bytes."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("key", ["model_type", "batch_size", "lr", "class_colors"])
def test_a_config_value_that_expands_to_megabytes_is_quoted_in_a_few_characters(tmp_path, capsys, key):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"{key}: {_alias_bomb(6)}\n")
    assert config.stat().st_size < 1000
    assert main(["train", "--config", str(config), "--data_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err) < 2000 and "bomb.yaml" in err and key in err  # printed whole: 9**6 strings, about 5 MB


def test_a_config_file_sets_settings_only(tmp_path, capsys):
    typed = tmp_path / "typed.yaml"
    typed.write_text("model_type: U_Net\nextra: {a: 1}\n")
    assert main(["train", "--config", str(typed), "--data_path", str(tmp_path)]) == 2
    assert "unknown setting(s) in" in capsys.readouterr().err  # 'extra' is a record of old runs, not a setting


def test_a_binary_file_given_as_a_config_is_named(tmp_path, capsys):
    blob = tmp_path / "weights.yaml"
    blob.write_bytes(bytes(range(256)) * 4)
    assert main(["train", "--config", str(blob), "--data_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--config: {blob} is not a text file (byte 0x80 at offset 128 is not UTF-8)" in err
    assert main(["prepare", "--origin_data_path", str(tmp_path), "--origin_GT_path", str(tmp_path), "--data_path",
                 str(tmp_path / "d"), "--num_classes", "3", "--class_colors", str(blob)]) == 2
    assert f"--class_colors: {blob} is not a text file" in capsys.readouterr().err
