"""k-fold cross-validation: stable folds, a kill -9 mid-fold that a rerun finishes bit-identically, the ensemble's
scores beside each fold's, and the folder as a model for predict."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import prepared_synthetic
from PIL import Image

from r2unet.commands.cli import main
from r2unet.engine.checkpoint import load_file
from r2unet.engine.crossval import assign_folds

pytestmark = pytest.mark.slow


def test_folds_are_balanced_seeded_and_the_same_for_the_same_names():
    names = [f"ISIC_{i:07d}.jpg" for i in range(23)]
    folds = assign_folds(names, 5, seed=3)
    assert sorted(np.bincount(list(folds.values()))) == [4, 4, 5, 5, 5]
    assert assign_folds(list(reversed(names)), 5, seed=3) == folds  # order of listing does not matter
    assert assign_folds(names, 5, seed=4) != folds


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("cv"), num_images=30, seed=8, max_side=96)


def _argv(data, out):
    return ["crossval", "--folds", "3", "--data_path", str(data), "--output_dir", str(out), "--model_type", "U_Net",
            "--base_channels", "4", "--image_size", "32", "--batch_size", "4", "--num_epochs", "4",
            "--num_epochs_decay", "2", "--lr", "0.003", "--beta1", "0.9", "--amp", "off", "--num_workers", "0",
            "--device", "cpu", "--seed", "2"]


def test_crossval_killed_mid_fold_finishes_on_rerun_as_if_never_killed(cv_data, tmp_path, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(_argv(cv_data, whole)) == 0
    table = capsys.readouterr().out
    assert "ensemble of 3" in table and "fold 3" in table
    # every file is decoded once for all the folds: fold 1's three splits, then rows copied from its caches
    assert [line.split(" images from ")[0] for line in table.splitlines() if line.startswith("caching ")] == \
        ["caching 16 of 16", "caching 8 of 8", "caching 6 of 6"]
    from r2unet.data.cache import build_cache, cache_folder
    from r2unet.data.pairs import split_folders

    copied = cache_folder(whole / "fold_1" / "data", "train", 32)
    fresh = build_cache(*split_folders(whole / "fold_1" / "data", "train"), tmp_path / "fresh", image_size=32,
                        log=lambda *a: None)  # the same split decoded anew: the same rows, byte for byte
    for name in ("images.npy", "masks.npy"):
        assert np.array_equal(np.load(copied / name), np.load(tmp_path / "fresh" / name)), name
    assert json.loads((copied / "meta.json").read_text())["entries"] == \
        json.loads((tmp_path / "fresh" / "meta.json").read_text())["entries"] and len(fresh) == 16

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "r2unet", *_argv(cv_data, killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "fold_1" / "checkpoints" / "last.pt"  # the second fold has finished an epoch
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the crossval ended before the kill"
    assert (killed / "fold_0" / "results.json").exists() and not (killed / "fold_1" / "results.json").exists()
    assert main(_argv(cv_data, killed)) == 0  # finishes fold 2 from its last.pt, then fold 3 and the ensemble
    assert "continuing from" in capsys.readouterr().out

    for k in range(3):
        a, b = (load_file(d / f"fold_{k}" / "checkpoints" / "best.pt")["model"] for d in (whole, killed))
        assert all(torch.equal(a[n], b[n]) for n in a), f"fold {k}"
    reports = [json.loads((d / "crossval.json").read_text()) for d in (whole, killed)]
    assert reports[0]["rows"] == reports[1]["rows"]
    rows = {r["name"]: r for r in reports[0]["rows"]}
    assert set(rows) == {"fold 1", "fold 2", "fold 3", "ensemble of 3"}
    for row in rows.values():
        assert 0 <= row["JS_ci"][0] <= row["JS"] <= row["JS_ci"][1] <= 1

    # the folds never saw the test split; each fold's validation images are its own, and all together are train+valid
    plan = json.loads((whole / "folds.json").read_text())
    held_out = [set(np.load(whole / f"fold_{k}" / "oof.npz")["names"]) for k in range(3)]
    assert set().union(*held_out) == set(plan["assignment"]) and not set(plan["test"]) & set(plan["assignment"])
    assert sum(map(len, held_out)) == len(plan["assignment"])

    # a rerun of a finished cross-validation redoes nothing and prints the same table
    assert main(_argv(cv_data, whole)) == 0
    assert "training in" not in capsys.readouterr().out

    # the ensemble scored on the images its folds trained on is said to be optimistic
    said = []
    from r2unet.engine.evaluation import evaluate_checkpoint

    evaluate_checkpoint(whole, cv_data, split="valid", device="cpu", log=said.append)
    assert any("optimistic" in line for line in said)

    # the folder is a model: the ensemble of the folds, with its postprocessing
    out = tmp_path / "masks"
    assert main(["predict", "--checkpoint", str(whole), "--input", str(cv_data / "test"), "--output", str(out),
                 "--device", "cpu"]) == 0
    from r2unet.engine.inference import Segmenter
    from r2unet.engine.postprocess import Postprocessing

    segmenter = Segmenter(whole, device="cpu")
    assert len(segmenter.members) == 3
    assert segmenter.post == Postprocessing.from_dict((whole / "postprocessing.json").read_text())
    first = sorted((cv_data / "test").iterdir())[0]
    with Image.open(out / f"{first.stem}_segmentation.png") as m, Image.open(first) as i:
        assert m.size == i.size


def test_crossval_refuses_data_whose_splits_changed(cv_data, tmp_path):
    out = tmp_path / "cv"
    assert main([*_argv(cv_data, out), "--fold", "0", "--num_epochs", "1", "--num_epochs_decay", "0"]) == 0
    assert (out / "fold_0" / "results.json").exists() and not (out / "fold_1").exists()
    moved = next((cv_data / "valid").iterdir())
    changed = tmp_path / "changed"
    shutil.copytree(cv_data, changed, symlinks=True)
    (changed / "valid" / moved.name).rename(changed / "test" / moved.name)
    for gt in (changed / "valid_GT").iterdir():
        if gt.name.startswith(moved.stem):
            gt.rename(changed / "test_GT" / gt.name)
    assert main([*_argv(changed, out), "--num_epochs", "1", "--num_epochs_decay", "0"]) == 2
