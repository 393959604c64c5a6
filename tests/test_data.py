import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r2unet.data.augment import AugmentConfig, eval_batch, train_batch
from r2unet.data.cache import build_cache, split_cache
from r2unet.data.dataset import DeviceTransform, make_loader
from r2unet.data.imageio import DataError, read_image, read_mask
from r2unet.data.prepare import SPLITS, pair_files, prepare_split, split_counts
from r2unet.data.synth import IMAGE_DIR, MASK_DIR, generate_dataset


def _write_pair(img_dir, mask_dir, stem, size=(40, 30), isic=True, img_ext=".jpg"):
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(stem)) % 2**32)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(img_dir / f"{stem}{img_ext}")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:20, 5:25] = 255
    Image.fromarray(mask).save(mask_dir / (f"{stem}_segmentation.png" if isic else f"{stem}.png"))


def _raw(tmp_path, n=10):
    img_dir, mask_dir = tmp_path / "img", tmp_path / "gt"
    for i in range(n):
        _write_pair(img_dir, mask_dir, f"ISIC_{i:07d}")
    return img_dir, mask_dir


@pytest.mark.parametrize("n,ratios,expected", [
    (2594, (0.7, 0.1, 0.2), (1815, 259, 520)),
    (10, (0.7, 0.1, 0.2), (7, 1, 2)),
    (7, (1, 1, 1), (2, 2, 3)),
    (5, (1, 0, 0), (5, 0, 0)),
])
def test_split_arithmetic_matches_reference(n, ratios, expected):
    assert split_counts(n, *ratios) == expected


def test_split_ratios_must_sum_positive():
    with pytest.raises(ValueError, match="positive"):
        split_counts(10, 0, 0, 0)
    with pytest.raises(ValueError, match="--valid_ratio"):
        split_counts(10, 0.7, -0.1, 0.2)


def test_prepare_is_deterministic_and_complete(tmp_path):
    img_dir, mask_dir = _raw(tmp_path, 20)
    logs = []
    a = prepare_split(img_dir, mask_dir, data_path=tmp_path / "a", seed=7, log=logs.append)
    b = prepare_split(img_dir, mask_dir, data_path=tmp_path / "b", seed=7, log=logs.append)
    c = prepare_split(img_dir, mask_dir, data_path=tmp_path / "c", seed=8, log=logs.append)
    assert a["splits"] == b["splits"] and a["splits"] != c["splits"]
    names = [e["image"] for s in SPLITS for e in a["splits"][s]]
    assert sorted(names) == sorted(p.name for p in img_dir.iterdir())
    assert [len(a["splits"][s]) for s in SPLITS] == [14, 2, 4]
    for s in SPLITS:
        assert sorted(p.name for p in (tmp_path / "a" / s).iterdir()) == sorted(e["image"] for e in a["splits"][s])
        assert len(list((tmp_path / "a" / f"{s}_GT").iterdir())) == len(a["splits"][s])
    manifest = json.loads((tmp_path / "a" / "r2unet_manifest.json").read_text())
    assert manifest["seed"] == 7 and len(manifest["source"]["fingerprint"]) == 64
    assert not any("ratios sum" in line for line in logs)
    # ratios that do not sum to 1 are proportions, as in the reference; the log says so
    d = prepare_split(img_dir, mask_dir, data_path=tmp_path / "d", seed=7, train_ratio=0.8, valid_ratio=0.1,
                      test_ratio=0.2, log=logs.append)
    assert [len(d["splits"][s]) for s in SPLITS] == [14, 1, 5]  # int(0.8/1.1*20), int(0.1/1.1*20), the rest
    assert "note: the ratios sum to 1.1; splitting in the proportions 0.727/0.091/0.182" in logs


def test_prepare_with_the_seed_flags(tmp_path):
    img_dir, mask_dir = _raw(tmp_path, 10)
    targets = {s: (tmp_path / "ds" / f"{s}", tmp_path / "ds" / f"{s}_GT_custom") for s in SPLITS}
    prepare_split(img_dir, mask_dir, targets=targets, log=lambda *_: None)
    assert len(list((tmp_path / "ds" / "test_GT_custom").iterdir())) == 2


def test_prepare_without_a_terminal_logs_lines_not_progress_bar_frames(tmp_path, capsys):
    """Under a batch job (stderr not a terminal) the cache build must not fill the log with a bar's \r frames."""
    from r2unet.commands.cli import main

    img_dir, mask_dir = _raw(tmp_path, 10)
    assert main(["prepare", "--origin_data_path", str(img_dir), "--origin_GT_path", str(mask_dir),
                 "--data_path", str(tmp_path / "ds"), "--image_size", "32", "--num_workers", "1"]) == 0
    printed = capsys.readouterr()
    assert "caching 7 of 7 images" in printed.out
    assert "\r" not in printed.err + printed.out and "img/s]" not in printed.err


def test_prepare_refuses_non_empty_target_and_keeps_user_files(tmp_path):
    img_dir, mask_dir = _raw(tmp_path, 10)
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    user_file = out / "train" / "my_notes.txt"
    user_file.write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        prepare_split(img_dir, mask_dir, data_path=out, log=lambda *_: None)
    prepare_split(img_dir, mask_dir, data_path=out, overwrite=True, log=lambda *_: None)
    assert user_file.read_text() == "precious"
    # a second run with --overwrite and another seed (--resplit) replaces only what r2unet wrote
    m = prepare_split(img_dir, mask_dir, data_path=out, overwrite=True, seed=5, resplit=True, log=lambda *_: None)
    assert user_file.read_text() == "precious"
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        [e["image"] for e in m["splits"]["train"]] + ["my_notes.txt"])
    # a user file with the same name as one to be written is never overwritten
    victim = out / "valid" / m["splits"]["train"][0]["image"]
    (out / "r2unet_manifest.json").unlink()
    victim.write_text("user data")
    with pytest.raises(DataError, match="refusing"):
        prepare_split(img_dir, mask_dir, data_path=out, overwrite=True, seed=5, log=lambda *_: None)
    assert victim.read_text() == "user data"


def test_prepare_never_deletes_the_files_it_reads(tmp_path, capsys):
    """Re-splitting a prepared folder's own train split into that folder, even with --overwrite, used to delete
    every file the old manifest listed (its sources too) and then fail with [Errno 2]."""
    from r2unet.commands.cli import main

    img_dir, mask_dir = _raw(tmp_path, 10)
    out = tmp_path / "D"
    prepare_split(img_dir, mask_dir, data_path=out, log=lambda *_: None)
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for extra in ([], ["--overwrite"]):
        assert main(["prepare", "--origin_data_path", str(out / "train"), "--origin_GT_path", str(out / "train_GT"),
                     "--data_path", str(out), "--no_cache", *extra]) == 2
        err = capsys.readouterr().err
        assert "overlaps" in err and "nothing was changed" in err and "Traceback" not in err
        assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before
    # the same sources into another folder work
    prepare_split(out / "train", out / "train_GT", data_path=tmp_path / "again", log=lambda *_: None)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before


def test_synth_refuses_to_overwrite_files_of_the_same_names(tmp_path, capsys):
    """synth writes the real dataset's names (ISIC_0000000.jpg ...): into a folder holding ISIC images it used to
    replace them silently."""
    from r2unet.commands.cli import main
    from r2unet.data.synth import IMAGE_DIR

    photo = tmp_path / "raw" / IMAGE_DIR / "ISIC_0000001.jpg"
    photo.parent.mkdir(parents=True)
    Image.new("RGB", (50, 40), (10, 20, 30)).save(photo)
    original = photo.read_bytes()
    assert main(["synth", "--output", str(tmp_path / "raw"), "--num_images", "3", "--max_side", "100"]) == 2
    err = capsys.readouterr().err
    assert "ISIC_0000001.jpg" in err and "--overwrite" in err and "Traceback" not in err
    assert photo.read_bytes() == original and len(list(photo.parent.iterdir())) == 1  # nothing written
    assert main(["synth", "--output", str(tmp_path / "raw"), "--num_images", "3", "--max_side", "100",
                 "--overwrite"]) == 0
    assert photo.read_bytes() != original and len(list(photo.parent.iterdir())) == 3
    assert main(["synth", "--output", str(tmp_path / "other"), "--max_side", "0"]) == 2
    assert "--max_side must be >= 32" in capsys.readouterr().err


def test_prepare_killed_mid_copy_leaves_no_truncated_file_and_the_rerun_completes(tmp_path, monkeypatch):
    """A kill during prepare's copy left an empty file under its final name, and the rerun refused it even with
    --overwrite ("not written by r2unet"). Copies are now whole or absent, and the rerun finishes the split."""
    import shutil

    from r2unet.data import prepare as prepare_mod

    img_dir, mask_dir = _raw(tmp_path, 10)
    real_copy, calls = shutil.copy2, {"n": 0}

    def killed_on_the_fifth_file(src, dst):
        calls["n"] += 1
        if calls["n"] == 5:
            Path(dst).write_bytes(b"")  # the copy had started
            raise KeyboardInterrupt
        return real_copy(src, dst)

    monkeypatch.setattr(prepare_mod.shutil, "copy2", killed_on_the_fifth_file)
    with pytest.raises(KeyboardInterrupt):
        prepare_split(img_dir, mask_dir, data_path=tmp_path / "out", log=lambda *_: None)
    monkeypatch.setattr(prepare_mod.shutil, "copy2", real_copy)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert written and all(p.stat().st_size > 0 for p in written)
    manifest = prepare_split(img_dir, mask_dir, data_path=tmp_path / "out", overwrite=True, log=lambda *_: None)
    assert manifest["complete"] and len(manifest["written"]) == 20
    assert all(Path(p).stat().st_size > 0 for p in manifest["written"])


def test_prepare_names_an_image_over_the_decompression_bomb_limit_and_skips_it_when_asked(tmp_path, monkeypatch,
                                                                                        capsys):
    from r2unet.commands.cli import main

    img_dir, mask_dir = _raw(tmp_path, 6)
    Image.new("RGB", (200, 200)).save(img_dir / "ISIC_0000009.jpg")
    Image.new("L", (200, 200)).save(mask_dir / "ISIC_0000009_segmentation.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the raw images are small; 200 x 200 is over twice it
    argv = ["prepare", "--origin_data_path", str(img_dir), "--origin_GT_path", str(mask_dir), "--no_cache"]
    assert main([*argv, "--data_path", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "ISIC_0000009.jpg: too large to decode safely" in err and "Traceback" not in err
    assert main([*argv, "--data_path", str(tmp_path / "skipped"), "--skip_bad"]) == 0
    manifest = json.loads((tmp_path / "skipped" / "r2unet_manifest.json").read_text())
    assert sum(len(v) for v in manifest["splits"].values()) == 6 and "ISIC_0000009.jpg" in manifest["skipped"][0]


def test_prepare_skip_bad_takes_a_file_that_only_fails_to_decode_out_of_the_split(tmp_path):
    """A truncated JPEG passes the header check; the cache build skipped it, but its copy stayed in the split, so
    everything that read the split folder later met it again and named the copy, not the source."""
    img_dir, mask_dir = _raw(tmp_path, 10)
    bad = img_dir / "ISIC_0000003.jpg"
    bad.write_bytes(bad.read_bytes()[:-300])  # the header survives, the last pixels do not
    logs = []
    manifest = prepare_split(img_dir, mask_dir, data_path=tmp_path / "o", skip_bad=True, cache_size=32,
                             log=logs.append)
    placed = {p.name for p in (tmp_path / "o").rglob("*") if p.is_file() and p.suffix in (".jpg", ".png")}
    assert "ISIC_0000003.jpg" not in placed and "ISIC_0000003_segmentation.png" not in placed
    assert len(placed) == 18 and sum(len(v) for v in manifest["splits"].values()) == 9
    assert not any("ISIC_0000003" in f for f in manifest["written"])
    assert any(str(bad) in line for line in manifest["skipped"])
    assert any("removed 1 pair(s)" in line and str(bad) in line for line in logs), logs
    assert json.loads((tmp_path / "o" / "r2unet_manifest.json").read_text()) == manifest
    later = []
    for split in ("train", "valid", "test"):  # the caches match the folders: nothing to decode, nothing to skip
        if manifest["splits"][split]:
            split_cache(tmp_path / "o", split, 32, progress=False, log=later.append)
    assert later == []


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_prepare_links_instead_of_copying(tmp_path, link):
    img_dir, mask_dir = _raw(tmp_path, 10)
    m = prepare_split(img_dir, mask_dir, data_path=tmp_path / "o", link=link, log=lambda *_: None)
    f = tmp_path / "o" / "train" / m["splits"]["train"][0]["image"]
    if link == "symlink":
        assert f.is_symlink()
    else:
        assert os.stat(f).st_ino == os.stat(img_dir / f.name).st_ino


def test_pairing_isic_and_same_stem(tmp_path):
    _write_pair(tmp_path / "i", tmp_path / "m", "ISIC_0000001", isic=True)
    _write_pair(tmp_path / "i", tmp_path / "m", "case7", isic=False, img_ext=".png")
    (tmp_path / "i" / "LICENSE.txt").write_text("license")
    (tmp_path / "m" / "orphan.png").write_bytes((tmp_path / "m" / "case7.png").read_bytes())
    _write_pair(tmp_path / "i", tmp_path / "x", "lonely")
    report = pair_files(tmp_path / "i", tmp_path / "m")
    assert [(p.image.name, p.mask.name) for p in report.pairs] == [
        ("ISIC_0000001.jpg", "ISIC_0000001_segmentation.png"), ("case7.png", "case7.png")]
    assert [p.name for p in report.missing_masks] == ["lonely.jpg"]
    assert [p.name for p in report.extra_masks] == ["orphan.png"]
    assert [p.name for p in report.ignored] == ["LICENSE.txt"]


def test_missing_and_extra_masks_are_reported_or_skipped(tmp_path):
    img_dir, mask_dir = _raw(tmp_path, 10)
    (mask_dir / "ISIC_0000003_segmentation.png").rename(mask_dir / "ISIC_0009999_segmentation.png")
    with pytest.raises(DataError) as err:
        prepare_split(img_dir, mask_dir, data_path=tmp_path / "o", log=lambda *_: None)
    assert "ISIC_0000003.jpg: no mask" in str(err.value) and "ISIC_0009999_segmentation.png" in str(err.value)
    logs = []
    m = prepare_split(img_dir, mask_dir, data_path=tmp_path / "o", skip_bad=True, log=logs.append)
    assert sum(len(v) for v in m["splits"].values()) == 9 and len(m["skipped"]) == 2
    assert any("skipping 2" in line for line in logs)


def test_size_mismatch_names_the_file(tmp_path):
    img_dir, mask_dir = _raw(tmp_path, 3)
    Image.new("L", (10, 10)).save(mask_dir / "ISIC_0000001_segmentation.png")
    with pytest.raises(DataError, match="ISIC_0000001_segmentation.png: mask size 10x10 differs"):
        prepare_split(img_dir, mask_dir, data_path=tmp_path / "o", log=lambda *_: None)


def test_empty_folder(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    with pytest.raises(DataError, match="no images found"):
        prepare_split(tmp_path / "i", tmp_path / "m", data_path=tmp_path / "o")
    with pytest.raises(DataError, match="does not exist"):
        prepare_split(tmp_path / "nope", tmp_path / "m", data_path=tmp_path / "o")


def test_truncated_and_fake_images_name_the_file(tmp_path):
    img_dir, mask_dir = _raw(tmp_path, 4)
    good = (img_dir / "ISIC_0000000.jpg").read_bytes()
    (img_dir / "ISIC_0000001.jpg").write_bytes(good[: len(good) // 2])
    (img_dir / "ISIC_0000002.jpg").write_text("this is not a jpeg")
    with pytest.raises(DataError, match="ISIC_0000001.jpg: unreadable or truncated"):
        read_image(img_dir / "ISIC_0000001.jpg")
    with pytest.raises(DataError, match="ISIC_0000002.jpg"):
        read_image(img_dir / "ISIC_0000002.jpg")
    # the cache build decodes everything: both are reported together, or skipped with skip_bad
    with pytest.raises(DataError) as err:
        build_cache(img_dir, mask_dir, tmp_path / "cache", image_size=32, progress=False)
    assert "ISIC_0000001.jpg" in str(err.value) and "ISIC_0000002.jpg" in str(err.value)
    cache = build_cache(img_dir, mask_dir, tmp_path / "cache2", image_size=32, progress=False, skip_bad=True,
                        log=lambda *_: None)
    assert cache.names == ["ISIC_0000000.jpg", "ISIC_0000003.jpg"]


def _mask_variants(tmp_path):
    base = np.zeros((20, 30), bool)
    base[4:15, 6:20] = True
    out = {}
    out["u8_255.png"] = Image.fromarray(base.astype(np.uint8) * 255)
    out["u8_01.png"] = Image.fromarray(base.astype(np.uint8))
    out["bit.png"] = Image.fromarray(base.astype(np.uint8) * 255).convert("1")
    pal = Image.fromarray(base.astype(np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    out["palette.png"] = pal
    out["rgb.png"] = Image.fromarray(np.stack([base * 255] * 3, -1).astype(np.uint8))
    out["u16.png"] = Image.fromarray(base.astype(np.uint16) * 65535)
    out["tiff.tif"] = Image.fromarray(base.astype(np.uint8) * 255)
    out["float.tif"] = Image.fromarray(base.astype(np.float32))
    out["jpeg.jpg"] = Image.fromarray(base.astype(np.uint8) * 255)
    paths = {}
    for name, img in out.items():
        paths[name] = tmp_path / name
        img.save(paths[name], quality=60) if name.endswith(".jpg") else img.save(paths[name])
    return base, paths


def test_every_mask_encoding_is_normalised(tmp_path):
    base, paths = _mask_variants(tmp_path)
    assert np.asarray(Image.open(paths["jpeg.jpg"])).max() not in (0,) and len(
        np.unique(np.asarray(Image.open(paths["jpeg.jpg"])))) > 2  # really scattered values
    for name, path in paths.items():
        m = read_mask(path)
        assert m.dtype == bool and m.shape == base.shape, name
        assert (m == base).mean() > 0.99, name
    assert not read_mask(paths["u8_255.png"]).all()
    empty = tmp_path / "empty.png"
    Image.new("L", (8, 8), 0).save(empty)
    assert not read_mask(empty).any()  # an empty mask stays empty


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".jpeg"])
def test_image_formats(tmp_path, ext):
    _write_pair(tmp_path / "i", tmp_path / "m", "a", img_ext=ext)
    path = tmp_path / "i" / f"a{ext}"
    img = read_image(path)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert np.array_equal(img, np.asarray(Image.open(path).convert("RGB")))  # the file's pixels, as PIL decodes them


def test_cache_is_incremental_and_detects_changes(tmp_path):
    img_dir, mask_dir = _raw(tmp_path, 6)
    logs = []
    c1 = build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, progress=False, log=logs.append)
    assert len(c1) == 6 and c1.images.shape == (6, 48, 48, 3) and set(np.unique(c1.masks)) <= {0, 1}
    assert logs[-1].startswith("caching 6 of 6")
    logs.clear()
    state = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, progress=False, log=logs.append)
    assert logs == []  # nothing to do, and nothing written (an up-to-date cache may be on a read-only mount)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == state
    # change one image's content: only that row is decoded again
    Image.new("RGB", (40, 30), (255, 0, 0)).save(img_dir / "ISIC_0000002.jpg")
    c3 = build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, progress=False, log=logs.append)
    assert logs[-1].startswith("caching 1 of 6")
    assert c3.images[2, ..., 0].mean() > 240
    # add one and remove one: only the new one is decoded
    logs.clear()
    _write_pair(img_dir, mask_dir, "ISIC_0000099")
    (img_dir / "ISIC_0000000.jpg").unlink()
    (mask_dir / "ISIC_0000000_segmentation.png").unlink()
    c4 = build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, progress=False, log=logs.append)
    assert logs[-1].startswith("caching 1 of 6") and "ISIC_0000000.jpg" not in c4.names
    # another image size is another cache
    logs.clear()
    build_cache(img_dir, mask_dir, tmp_path / "c", image_size=64, progress=False, log=logs.append)
    assert logs[-1].startswith("caching 6 of 6")


def _build_in_process(img_dir, mask_dir, cache_dir, start):
    start.wait(60)
    build_cache(img_dir, mask_dir, cache_dir, image_size=32, num_workers=1, progress=False, log=lambda *a: None)


def test_two_processes_building_one_cache_at_once_both_get_it_whole(tmp_path):
    """Two runs started on one dataset build its cache at the same moment: they had replaced each other's arrays
    mid-build ("cannot write the cache ... No such file or directory"); they take turns, and both end with it."""
    import multiprocessing as mp

    img_dir, mask_dir = _raw(tmp_path, 48)
    ctx = mp.get_context("spawn")
    start = ctx.Event()  # all three begin together, once started
    procs = [ctx.Process(target=_build_in_process, args=(img_dir, mask_dir, tmp_path / "c", start))
             for _ in range(3)]
    for p in procs:
        p.start()
    time.sleep(3)
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    logs = []
    cache = build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, progress=False, log=logs.append)
    assert logs == [] and len(cache) == 48  # complete and up to date: nothing decoded again
    assert not (tmp_path / "c" / ".lock").exists()  # the lock file goes with its last holder
    fresh = build_cache(img_dir, mask_dir, tmp_path / "fresh", image_size=32, progress=False, log=lambda *a: None)
    assert np.array_equal(cache.images, fresh.images) and np.array_equal(cache.masks, fresh.masks)


def test_a_build_waits_for_the_process_holding_the_cache_lock_and_says_so(tmp_path):
    import fcntl
    import threading

    img_dir, mask_dir = _raw(tmp_path, 4)
    folder = tmp_path / "c"
    folder.mkdir()
    logs, done = [], threading.Event()
    with open(folder / ".lock", "a") as held:  # another builder (flock: per open file, so a thread waits too)
        fcntl.flock(held, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: (build_cache(img_dir, mask_dir, folder, image_size=32,
                                                              progress=False, log=logs.append), done.set()))
        thread.start()
        for _ in range(600):  # until it reaches the lock (pairing the files comes first)
            if logs or done.is_set():
                break
            time.sleep(0.05)
        assert not done.wait(0.5)  # held back while the lock is taken
        assert logs and logs[0].startswith("waiting for another process building the cache in ")
        fcntl.flock(held, fcntl.LOCK_UN)
    thread.join(60)
    assert done.is_set() and logs[-1].startswith("caching 4 of 4")


def test_a_cache_copies_the_rows_a_donor_cache_holds_of_the_same_files_and_decodes_the_rest(tmp_path):
    """Cross-validation's folds: links to the same files in other folders, whose rows another cache holds."""
    img_dir, mask_dir = _raw(tmp_path, 6)
    build_cache(img_dir, mask_dir, tmp_path / "donor", image_size=32, progress=False, log=lambda *a: None)
    links_i, links_m = tmp_path / "fold" / "i", tmp_path / "fold" / "m"
    links_i.mkdir(parents=True)
    links_m.mkdir(parents=True)
    for p in sorted(img_dir.iterdir())[:4]:  # four of the donor's images, as links
        (links_i / p.name).symlink_to(p)
    for p in sorted(mask_dir.iterdir())[:4]:
        (links_m / p.name).symlink_to(p)
    _write_pair(links_i, links_m, "ISIC_0000077")  # and one the donor does not hold
    Image.new("RGB", (40, 30), (255, 0, 0)).save(img_dir / "ISIC_0000001.jpg")  # changed since the donor's build
    logs = []
    copied = build_cache(links_i, links_m, tmp_path / "c", image_size=32, progress=False, log=logs.append,
                         donors=[tmp_path / "donor", tmp_path / "nowhere"])
    assert logs[0].startswith("caching 2 of 5")  # the changed one and the new one
    fresh = build_cache(links_i, links_m, tmp_path / "fresh", image_size=32, progress=False, log=lambda *a: None)
    assert np.array_equal(copied.images, fresh.images) and np.array_equal(copied.masks, fresh.masks)
    assert np.array_equal(copied.original_hw, fresh.original_hw) and copied.images[1, ..., 0].mean() > 240
    assert build_cache(links_i, links_m, tmp_path / "other", image_size=64, progress=False, log=logs.append,
                       donors=[tmp_path / "donor"]) and logs[-1].startswith("caching 5 of 5")  # another size


def test_a_cache_build_stopped_between_rows_and_meta_is_rebuilt_not_broken(tmp_path, monkeypatch):
    """Rows and done flags reach the disk through the memory map as they are written, the meta (each row's size)
    only every 64 rows: a build stopped in between (Ctrl-C, kill -9) left rows flagged done with no size, and
    every later run failed with "setting an array element with a sequence". Those rows are decoded again."""
    from r2unet.data import cache as cache_mod

    img_dir, mask_dir = _raw(tmp_path, 6)
    real_write = cache_mod._write_meta
    calls = {"n": 0}

    def stop_at_the_last_meta(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # after every row is decoded and flagged, before the meta records their sizes
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(cache_mod, "_write_meta", stop_at_the_last_meta)
    with pytest.raises(KeyboardInterrupt):
        build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, num_workers=1, progress=False, log=print)
    monkeypatch.setattr(cache_mod, "_write_meta", real_write)
    logs = []
    cache = build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, progress=False, log=logs.append)
    assert logs and logs[-1].startswith("caching 6 of 6")
    fresh = build_cache(img_dir, mask_dir, tmp_path / "fresh", image_size=32, progress=False, log=lambda *_: None)
    assert len(cache) == 6 and np.array_equal(cache.images, fresh.images)
    assert np.array_equal(cache.original_hw, fresh.original_hw)


def _striped_batch(n=6, s=64):
    """Images whose red channel *is* the mask: after any geometric transform they must still agree."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, s, s, dtype=torch.uint8)
    for i in range(n):
        y0, x0 = torch.randint(0, s // 2, (2,), generator=g).tolist()
        masks[i, y0:y0 + s // 3, x0:x0 + s // 4] = 1
    images = torch.zeros(n, s, s, 3, dtype=torch.uint8)
    images[..., 0] = masks * 255
    images[..., 1] = 60
    return images, masks


def test_augmentation_moves_image_and_mask_together():
    images, masks = _striped_batch()
    cfg = AugmentConfig(augmentation_prob=1.0, brightness=0, contrast=0, hue=0)
    aspect = torch.tensor([0.75, 1.0, 1.33, 0.56, 1.0, 0.8])
    x, y = train_batch(images, masks, aspect, 48, cfg, torch.Generator().manual_seed(1))
    assert x.shape == (6, 3, 48, 48) and y.shape == (6, 1, 48, 48)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    red = (x[:, :1] * 0.5 + 0.5) > 0.5
    agree = (red == (y > 0.5)).float().mean()
    assert agree > 0.98
    identity, _ = eval_batch(images, masks, 48)
    assert not torch.allclose(x, identity)  # something did move


def test_augmentation_keeps_masks_binary_with_colour_jitter_and_is_seeded():
    images, masks = _striped_batch()
    aspect = torch.ones(6)
    cfg = AugmentConfig(augmentation_prob=0.5)
    a = train_batch(images, masks, aspect, 32, cfg, torch.Generator().manual_seed(3))
    b = train_batch(images, masks, aspect, 32, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(a[1].unique().tolist()) <= {0.0, 1.0}
    assert a[0].min() >= -1 and a[0].max() <= 1


def test_no_augmentation_is_a_plain_resize():
    images, masks = _striped_batch()
    cfg = AugmentConfig(augmentation_prob=0.0)
    x, y = train_batch(images, masks, torch.ones(6), 64, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(x, eval_batch(images, masks, 64)[0], atol=1e-5)
    assert torch.equal(y[:, 0], masks.float())


def test_synth_is_deterministic(tmp_path):
    generate_dataset(tmp_path / "a", 3, seed=4, max_side=300)
    generate_dataset(tmp_path / "b", 3, seed=4, max_side=300)
    for sub in (IMAGE_DIR, MASK_DIR):
        fa = sorted((tmp_path / "a" / sub).iterdir())
        fb = sorted((tmp_path / "b" / sub).iterdir())
        assert [f.name for f in fa] == [f.name for f in fb]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    masks = [read_mask(p) for p in sorted((tmp_path / "a" / MASK_DIR).iterdir())]
    assert all(0.01 < m.mean() < 0.9 for m in masks)


def test_loader_batches_any_size(tiny_data):
    cache = split_cache(tiny_data, "train", 32, progress=False, log=lambda *_: None)
    tf = DeviceTransform(32, torch.device("cpu"), AugmentConfig())
    sizes = []
    for bs in (1, 3, 5):
        for batch in make_loader(cache, bs, train=True, drop_last=False):
            x, y = tf(batch)
            sizes.append(x.shape[0])
            assert x.shape[1:] == (3, 32, 32) and y.shape[1:] == (1, 32, 32)
    assert sum(sizes) == 3 * len(cache)


def test_loader_workers_started_by_spawn_map_the_cache_instead_of_copying_it(tmp_path):
    """Workers started by spawn/forkserver (macOS, Windows, Python >= 3.14 on Linux) receive the dataset pickled: it
    must carry the cache's folder and row table, not the pixels. Also with a skipped bad file, whose row is left out
    by the row table instead of copying the good rows into memory."""
    import pickle

    from r2unet.data.dataset import CachedBatches

    img_dir, mask_dir = _raw(tmp_path, 7)
    (img_dir / "ISIC_0000003.jpg").write_text("not a jpeg")
    cache = build_cache(img_dir, mask_dir, tmp_path / "cache", image_size=112, progress=False, skip_bad=True,
                        log=lambda *_: None)
    assert len(cache) == 6 and "ISIC_0000003.jpg" not in cache.names
    pixels = cache.images.nbytes + cache.masks.nbytes
    assert len(pickle.dumps(cache)) < pixels / 20
    dataset = CachedBatches(cache)
    expected = dataset[list(range(6))]
    assert torch.equal(expected["images"][3], torch.from_numpy(np.array(cache.images[3])))  # row 4 on disk
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[list(range(6))], num_workers=1,
                                         multiprocessing_context="spawn")
    (got,) = list(loader)
    for key in ("images", "masks", "aspect", "index"):
        assert torch.equal(got[key], expected[key]), key


def test_interrupted_prepare_can_be_redone_with_overwrite(tmp_path, monkeypatch):
    from r2unet.data import prepare as prep

    img_dir, mask_dir = _raw(tmp_path, 10)
    real, calls = prep._place, {"n": 0}

    def dies_after_three(src, dst, link):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        real(src, dst, link)

    monkeypatch.setattr(prep, "_place", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_split(img_dir, mask_dir, data_path=tmp_path / "o", log=lambda *_: None)
    monkeypatch.setattr(prep, "_place", real)
    m = prepare_split(img_dir, mask_dir, data_path=tmp_path / "o", overwrite=True, log=lambda *_: None)
    assert m["complete"] and len(m["written"]) == 20


def test_16_bit_and_grayscale_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 31).astype(np.uint16)  # up to ~63k
    Image.fromarray(ramp).save(tmp_path / "a16.png")
    img = read_image(tmp_path / "a16.png")
    assert img.shape == (32, 64, 3) and img.dtype == np.uint8
    assert img[..., 0].max() > 200 and len(np.unique(img[..., 0])) > 100  # the full range survives
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "g.bmp")
    assert (read_image(tmp_path / "g.bmp") == 77).all()


def _rotated_photo(path, size=(60, 40), orientation=6):
    """A JPEG stored ``size`` (w x h, default 60x40) with a red block in its top-left part, tagged EXIF
    ``orientation`` (6: shown turned 90 degrees, 40x60)."""
    from PIL import ImageOps

    w, h = size
    stored = np.full((h, w, 3), 60, np.uint8)
    stored[h // 8:h * 3 // 8, w // 12:w * 5 // 12] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as img:
        shown = np.asarray(ImageOps.exif_transpose(img))
    return stored, shown


@pytest.mark.parametrize("frame", ["displayed", "stored"])
def test_exif_rotated_photos_pair_with_masks_drawn_on_either_frame(tmp_path, frame):
    img_dir, mask_dir = tmp_path / "img", tmp_path / "gt"
    img_dir.mkdir()
    mask_dir.mkdir()
    stored, shown = _rotated_photo(img_dir / "ISIC_0000001.jpg")
    assert shown.shape == (60, 40, 3) and read_image(img_dir / "ISIC_0000001.jpg").shape == (60, 40, 3)
    assert read_image(img_dir / "ISIC_0000001.jpg", oriented=False).shape == (40, 60, 3)
    frame_pixels = shown if frame == "displayed" else stored
    Image.fromarray(((frame_pixels[..., 0] > 150) * 255).astype(np.uint8)).save(
        mask_dir / "ISIC_0000001_segmentation.png")
    for i in range(2, 5):
        _write_pair(img_dir, mask_dir, f"ISIC_{i:07d}")
    prepare_split(img_dir, mask_dir, data_path=tmp_path / "data", train_ratio=1, valid_ratio=0, test_ratio=0,
                  log=lambda *_: None)
    cache = split_cache(tmp_path / "data", "train", 32, progress=False, log=lambda *_: None)
    row = cache.names.index("ISIC_0000001.jpg")
    image, mask = cache.images[row].astype(float), cache.masks[row].astype(bool)
    assert cache.aspect[row] == pytest.approx(60 / 40 if frame == "displayed" else 40 / 60)
    red = image[..., 0] - image[..., 1]
    assert mask.any() and red[mask].mean() > 100 > red[~mask].mean(), "image and mask are in different frames"


def _cached_overlap(tmp_path, size, orientation, frame, image_size=32):
    """Prepare a dataset whose first photo is EXIF-turned with its mask drawn on ``frame`` ("stored" / "shown");
    (how red the photo is under its cached mask minus elsewhere, the log lines)."""
    img_dir, mask_dir = tmp_path / "img", tmp_path / "gt"
    img_dir.mkdir()
    mask_dir.mkdir()
    stored, shown = _rotated_photo(img_dir / "ISIC_0000001.jpg", size, orientation)
    Image.fromarray(((stored if frame == "stored" else shown)[..., 0] > 150).astype(np.uint8) * 255).save(
        mask_dir / "ISIC_0000001_segmentation.png")
    for i in range(2, 5):
        _write_pair(img_dir, mask_dir, f"ISIC_{i:07d}")
    lines = []
    prepare_split(img_dir, mask_dir, data_path=tmp_path / "data", train_ratio=1, valid_ratio=0, test_ratio=0,
                  cache_size=image_size, log=lines.append)
    cache = split_cache(tmp_path / "data", "train", image_size, progress=False, log=lines.append)
    row = cache.names.index("ISIC_0000001.jpg")
    image, mask = cache.images[row].astype(float), cache.masks[row].astype(bool)
    red = image[..., 0] - image[..., 1]
    return red[mask].mean() - red[~mask].mean(), lines


def test_a_near_square_turned_photo_keeps_its_mask_drawn_on_the_stored_pixels(tmp_path):
    """A 400x398 photo with orientation 6 and its mask drawn on the stored pixels: the aspect ratios of the two
    frames differ by 1 %, so the old check took the mask for one drawn on the shown photo (overlap 0, no warning).
    The frame is now told by the exact header sizes."""
    contrast, lines = _cached_overlap(tmp_path, (400, 398), 6, "stored", image_size=64)  # JPEG draft-decoded
    assert contrast > 100, "the photo and its mask were cached in different frames"
    assert not any("warning" in line for line in lines), "the sizes tell the frames apart: nothing is ambiguous"


@pytest.mark.parametrize("size,orientation", [((48, 48), 6), ((60, 40), 3), ((60, 40), 2)])
def test_a_turned_photo_whose_frames_have_one_size_is_taken_as_shown_and_named(tmp_path, size, orientation):
    """A square photo turned 90 degrees, or any photo turned 180 degrees or mirrored: a mask fits either frame. The
    rule takes it as drawn on the photo as shown, and the run names the photo and the rule."""
    contrast, lines = _cached_overlap(tmp_path, size, orientation, "shown")
    assert contrast > 100
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "1 photo(s)" in warning[0] and "ISIC_0000001.jpg" in warning[0], lines
    assert "taken as the latter" in warning[0] and "Orientation tag" in warning[0]


def test_predict_writes_masks_at_the_displayed_size_of_exif_rotated_photos(tmp_path):
    from r2unet.commands.predict import run_predict
    from r2unet.engine.inference import Segmenter
    from r2unet.models import create_model

    (tmp_path / "in").mkdir()
    stored, _ = _rotated_photo(tmp_path / "in" / "photo.jpg")
    (tmp_path / "gt").mkdir()  # ground truth drawn on the stored pixels: the overlay turns it like the photo
    Image.fromarray(((stored[..., 0] > 150) * 255).astype(np.uint8)).save(tmp_path / "gt" / "photo_segmentation.png")
    run_predict(Segmenter.of(create_model("U_Net", base_channels=4), image_size=32), tmp_path / "in",
                tmp_path / "out", save_overlay=True, gt_dir=tmp_path / "gt", progress=False)
    with Image.open(tmp_path / "out" / "photo_segmentation.png") as m, Image.open(tmp_path / "out" /
                                                                               "photo_overlay.jpg") as o:
        assert m.size == o.size == (40, 60)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_as_pil_shows_it(tmp_path, orientation):
    from PIL import ImageOps

    from r2unet.data.imageio import image_size, orient_as_shown

    stored = np.random.default_rng(orientation).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"  # lossless, so the comparison is exact
    Image.fromarray(stored).save(path, exif=exif)
    with Image.open(path) as img:
        shown = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert np.array_equal(read_image(path), shown)
    assert image_size(path) == (shown.shape[1], shown.shape[0])
    assert np.array_equal(orient_as_shown(stored[..., 0] > 127, path), shown[..., 0] > 127)


def test_a_cache_that_cannot_be_written_names_the_folder_and_the_flag(tmp_path, monkeypatch):
    img_dir, mask_dir = _raw(tmp_path, 3)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", read_only)  # what a read-only mount or another user's folder gives
    with pytest.raises(DataError, match=r"cannot write the cache in .*c: Permission denied; .*--cache_dir"):
        build_cache(img_dir, mask_dir, tmp_path / "c", image_size=32, progress=False, log=lambda *_: None)
