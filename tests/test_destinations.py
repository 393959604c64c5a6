"""Every command that writes files, pointed at a read-only folder and at a full disk: a message and exit code 2, no
traceback, and no partial file under a final name. Both are real file systems (tmpfs mounts), not faked errors."""

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import prepared_synthetic
from PIL import Image

from r2unet.commands.cli import main

pytestmark = pytest.mark.slow


def _mount(folder, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root and mount needed): {done.stderr.strip()[:120]}")


def _fill(folder) -> None:
    """Fill the file system of ``folder`` to the last byte (a file named ``filler``)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture(params=["read-only", "full"])
def destination(request, tmp_path):
    """A folder on a read-only tmpfs, or on a tmpfs filled to the last byte."""
    folder = tmp_path / "dest"
    if request.param == "read-only":
        _mount(folder, "ro,size=1m")
    else:
        _mount(folder, "size=256k")
        _fill(folder)
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = prepared_synthetic(root, 12, seed=2, max_side=120)
    run = root / "run"
    assert main(["train", "--data_path", str(data), "--output_dir", str(run), "--model_type", "U_Net",
                 "--base_channels", "4", "--image_size", "32", "--batch_size", "2", "--num_epochs", "1",
                 "--num_workers", "0", "--device", "cpu"]) == 0
    return root, data, run


def _commands(root, data, run, dest):
    ckpt = str(run / "checkpoints" / "best.pt")
    return {
        "synth": ["synth", "--output", str(dest / "raw"), "--num_images", "3", "--max_side", "100"],
        "prepare": ["prepare", "--origin_data_path", str(root / "raw" / "ISIC2018_Task1-2_Training_Input"),
                    "--origin_GT_path", str(root / "raw" / "ISIC2018_Task1_Training_GroundTruth"), "--data_path",
                    str(dest / "data"), "--image_size", "32"],
        "train": ["train", "--data_path", str(data), "--output_dir", str(dest / "run"), "--model_type", "U_Net",
                  "--base_channels", "4", "--image_size", "32", "--batch_size", "2", "--num_epochs", "1",
                  "--num_workers", "0", "--device", "cpu"],
        "predict": ["predict", "--checkpoint", ckpt, "--input", str(data / "test"), "--output", str(dest / "masks"),
                    "--overlay", "--device", "cpu"],
        "export onnx": ["export", "--checkpoint", ckpt, "--output", str(dest / "m.onnx")],
        "export safetensors": ["export", "--checkpoint", ckpt, "--output", str(dest / "m.safetensors")],
        "evaluate --per_image": ["evaluate", "--checkpoint", ckpt, "--data_path", str(data), "--per_image",
                                 str(dest / "scores.csv"), "--device", "cpu"],
        "compare": ["compare", str(run), "--output", str(dest / "compare.png")],
        "train --cache_dir": ["train", "--data_path", str(data), "--cache_dir", str(dest / "cache"), "--output_dir",
                              str(dest.parent / "run"), "--model_type", "U_Net", "--base_channels", "4",
                              "--image_size", "32", "--batch_size", "2", "--num_epochs", "1", "--num_workers", "2",
                              "--device", "cpu"],
        "demo": ["demo", "--output", str(dest / "demo"), "--num_images", "20", "--num_epochs", "1"],
    }


def _whole(path) -> bool:
    """A file is whole: it parses as what its name says."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            json.loads(path.read_text())
        elif suffix in (".png", ".jpg"):
            Image.open(path).verify()
        elif suffix == ".npy":
            np.load(path, mmap_mode="r")
        elif suffix == ".pt":
            torch.load(path, weights_only=True)
        else:
            return path.stat().st_size > 0
    except Exception:  # noqa: BLE001 - anything that does not parse is partial
        return False
    return True


COMMANDS = ["synth", "prepare", "train", "predict", "export onnx", "export safetensors", "evaluate --per_image",
            "compare", "train --cache_dir", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_or_full_destination_is_named_without_a_traceback(trained, destination, command, capsys):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    argv = _commands(*trained, destination)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err, err
    assert str(destination) in err or "dest" in err, err  # the message names where
    partial = [p for p in destination.rglob("*") if p.is_file() and p.name != "filler" and not _whole(p)]
    assert not partial, partial


@pytest.mark.parametrize("state", ["read-only", "full"])
def test_plot_into_a_read_only_or_full_run_folder_keeps_the_pictures_whole(trained, tmp_path, state, capsys):
    """``plot`` redraws the pictures inside the run folder itself: that folder goes read-only or full after the run."""
    import shutil

    _, _, run = trained
    folder = tmp_path / "run"
    _mount(folder, "size=16m")
    try:
        shutil.copytree(run, folder, dirs_exist_ok=True)
        before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
        if state == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            _fill(folder)
        assert main(["plot", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err and str(folder) in err, err
        assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == before  # the old pictures, whole
        assert not [p for p in folder.rglob("*") if p.is_file() and p.name != "filler" and not _whole(p)]
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
