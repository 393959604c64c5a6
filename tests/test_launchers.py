"""The seed's launcher scripts (test/train_*_{1p,8p}.sh), run as a user runs them: from another directory, with
relative paths, shrunk to a tiny network by extra flags (later flags override the script's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepared_synthetic

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model_type", "U_Net", "--base_channels", "4", "--image_size", "32", "--batch_size", "2",
        "--max_steps_per_epoch", "2", "--warmup_steps", "0", "--num_epochs", "1", "--num_workers", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's working directory holding a prepared dataset under the relative path 'data'."""
    root = tmp_path_factory.mktemp("launch")
    prepared_synthetic(root, 12, seed=2, max_side=96)
    return root


def _launch(script, cwd, *args):
    # PYTHONFAULTHANDLER: a process that aborts (a C++ terminate at exit, say) prints every thread's stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(REPO / "test" / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_1p_launcher_takes_paths_from_the_callers_directory_reports_and_continues(workdir):
    done = _launch("train_performance_1p.sh", workdir, "--data_path=data", "--output_dir=runs/perf", *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    out = workdir / "runs" / "perf"  # relative to where the script was called from, not to the repository
    results = json.loads((out / "results.json").read_text())
    assert results["fps"] > 0 and results["epochs"] == 1
    lines = done.stdout.splitlines()
    assert f"Final Performance images/sec : {results['fps']:.2f}" in lines
    assert f"Final Train Accuracy : {results['train']['ACC']:.4f}" in lines
    assert any(line.startswith("E2E Training Duration sec : ") for line in lines)
    # called again (after a crash, or to train longer), it continues the run and keeps the first log
    again = _launch("train_performance_1p.sh", workdir, "--data_path=data", "--output_dir=runs/perf", *TINY,
                    "--num_epochs", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "continuing it (--resume)" in again.stdout and "resumed from" in again.stdout
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "train.log").read_text().count("Final Performance") == 0  # the report is printed, not logged
    assert (out / "train.log").read_text().count("FPS: ") == 2


def test_launcher_errors_are_short_and_keep_the_status(workdir):
    done = _launch("train_full_1p.sh", workdir)
    assert done.returncode == 2 and "usage: bash" in done.stderr
    done = _launch("train_full_1p.sh", workdir, "--data_path=missing", "--output_dir=runs/bad", *TINY)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--data_path: missing/train is missing; a prepared dataset holds" in done.stdout  # the trainer's message
    assert "training stopped (exit status 2)" in done.stderr and "Traceback" not in done.stdout + done.stderr


def test_8p_launcher_runs_torchrun_with_the_given_process_count(workdir):
    done = _launch("train_performance_8p.sh", workdir, "--data_path=data", "--nproc=2", "--output_dir=runs/p8",
                   *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((workdir / "runs" / "p8" / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 4
    assert "lr 0.0004" in done.stdout  # --scale_lr: 2 processes x 2e-4
    assert done.stdout.count("Final Performance images/sec") == 1


def test_the_seeds_split_command_works_as_typed(tmp_path):
    """'python3 dataset.py' with the seed's eleven flags, from the caller's folder: the 70/10/20 split into the six
    folders, as the README describes."""
    from r2unet.data.synth import IMAGE_DIR, MASK_DIR, generate_dataset

    generate_dataset(tmp_path / "raw", num_images=20, seed=3, max_side=120)
    flags = ["--origin_data_path", f"raw/{IMAGE_DIR}", "--origin_GT_path", f"raw/{MASK_DIR}",
             "--train_ratio", "0.7", "--valid_ratio", "0.1", "--test_ratio", "0.2"]
    for split in ("train", "valid", "test"):
        flags += [f"--{split}_path", f"./dataset/{split}/", f"--{split}_GT_path", f"./dataset/{split}_GT/"]
    done = subprocess.run([sys.executable, str(REPO / "dataset.py"), *flags], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts = {s: len(list((tmp_path / "dataset" / s).iterdir())) for s in ("train", "valid", "test")}
    assert counts == {"train": 14, "valid": 2, "test": 4}
    assert all(len(list((tmp_path / "dataset" / f"{s}_GT").iterdir())) == n for s, n in counts.items())


def test_the_seeds_dataset_folder_in_a_clone_is_ignored_by_git():
    """Run from a clone, the seed's command writes ./dataset (hundreds of MB with its cache): git status must not
    list it."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("dataset/train/ISIC_0000000.jpg", "dataset/.r2unet_cache/train_224.npy"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"{path} is not ignored: {done.stderr}"


def test_ctrl_c_on_a_launcher_saves_says_so_exits_130_and_a_shorter_rerun_continues(workdir):
    """Ctrl-C reaches every process of the terminal's foreground group: the tee of the launcher's pipe died first,
    the trainer's "continue with --resume" line was lost and the script exited 1. A rerun with fewer epochs then
    failed on a decay length the user never typed (the first run's 50)."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    flags = [*TINY, "--num_epochs", "50"]  # long enough to be interrupted
    proc = subprocess.Popen(["bash", str(REPO / "test" / "train_full_1p.sh"), "--data_path=data",
                             "--output_dir=runs/ctrl_c", *flags], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own group, as a terminal
    log = workdir / "runs" / "ctrl_c" / "train.log"
    try:
        end = time.time() + 240
        while time.time() < end and proc.poll() is None and not (log.exists() and "epoch 2/50" in log.read_text()):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out + err
    assert "continue with --resume" in out and "continue with --resume" in log.read_text()
    assert "training interrupted; run the same command again to continue it" in err and "Traceback" not in out + err
    again = _launch("train_full_1p.sh", workdir, "--data_path=data", "--output_dir=runs/ctrl_c", *TINY,
                    "--num_epochs", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "note: --num_epochs_decay was 50 in the resumed run > --num_epochs 3; decaying over all 3" in again.stdout
    assert json.loads((workdir / "runs" / "ctrl_c" / "results.json").read_text())["epochs"] == 3


def test_a_kill_by_the_kernel_is_named_with_what_to_change(workdir, tmp_path):
    """Killed by the kernel's out-of-memory killer (SIGKILL, 137), the trainer can say nothing: the launcher says
    what most likely happened and what to change. Here the trainer is a stand-in that is killed at once."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nkill -9 $$\n")
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(REPO / "test" / "train_full_1p.sh"), "--data_path=data",
                           "--output_dir=runs/killed"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 137, done.stdout + done.stderr
    assert "killed (SIGKILL, exit status 137), most likely by the kernel because memory ran out" in done.stderr
    assert "a smaller --batch_size, --image_size or --base_channels" in done.stderr


def test_launcher_flags_take_a_space_too_and_a_missing_value_is_named(workdir):
    done = _launch("train_performance_1p.sh", workdir, "--data_path", "data", "--output_dir", "runs/spaced", *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (workdir / "runs" / "spaced" / "results.json").is_file()
    for args, said in ((["--output_dir=runs/x", "--data_path"], "--data_path needs a value"),
                       (["--data_path", "--output_dir=runs/x"], "--data_path needs a value"),
                       (["--output_dir=runs/x"], "--data_path is required")):
        done = _launch("train_full_1p.sh", workdir, *args)
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "a dataset split by 'r2unet prepare'" in done.stderr
