"""Two CPU processes with gloo: identical weights on all ranks, sharded evaluation equal to a 1-process one, and
2 x batch B with SyncBatchNorm equal to 1 x batch 2B after one step."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import prepared_synthetic

from r2unet.commands.cli import main
from r2unet.engine.checkpoint import load_file
from r2unet.engine.config import TrainConfig

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """23 pairs -> 16/2/5: the test split does not divide evenly between 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    prepared_synthetic(root, 23, seed=5, max_side=160)
    # build the caches once, before processes race for them
    from r2unet.data.cache import split_cache

    for split in ("train", "valid", "test"):
        split_cache(root / "data", split, 32, progress=False, log=lambda *_: None)
    return root / "data"


def _worker(rank, world, port, cfg_dict, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from r2unet.engine.trainer import fit

    results, model = fit(TrainConfig.from_dict(cfg_dict), log=lambda *_: None, return_model=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"r{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, "results_rank0.json"), "w") as f:
            json.dump(results, f)


def _cfg(data, out, **kw):
    base = dict(model_type="R2U_Net", t=1, base_channels=4, image_size=32, batch_size=2, num_epochs=1,
                num_epochs_decay=0, num_workers=0, device="cpu", data_path=str(data), output_dir=str(out),
                seed=11, log_every=1, amp="off", dist_timeout_s=60)
    base.update(kw)
    return TrainConfig(**base).to_dict()


def _spawn(world, cfg, out):
    os.makedirs(out, exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), cfg, str(out)), nprocs=world, join=True)


def test_two_processes_identical_weights_and_exact_sharded_evaluation(odd_data, tmp_path, capsys):
    out = tmp_path / "ddp"
    _spawn(2, _cfg(odd_data, out, num_epochs=3, lr=0.01), out)  # lr: predictions that are not all background
    w0, w1 = (torch.load(out / f"r{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    results = json.loads((out / "results_rank0.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 4
    # the checkpoint has no DDP prefix and a 1-process evaluation gives the same scores on the uneven split
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--data_path", str(odd_data),
                 "--split", "test", "--json", "--device", "cpu"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["num_images"] == 5
    for k, v in results["test"].items():
        assert single[k] == pytest.approx(v, abs=1e-12), k
    # the per-image scores gathered from both shards, in the split's order: the same error bars as one process
    assert results["test_spread"]["JS"]["sd"] > 0
    for k, spread in single["spread"].items():
        got = results["test_spread"][k]
        assert [got["sd"], *got["ci"]] == pytest.approx([spread["sd"], *spread["ci"]], abs=1e-12), k
    # the validation scores that chose best.pt are best.pt's scores: every rank validated with rank 0's batch-norm
    # statistics (without sync_bn each rank's running statistics drift apart over the steps of an epoch)
    row = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["epoch"] == results["best_epoch"])
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--data_path", str(odd_data),
                 "--split", "valid", "--json", "--device", "cpu"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < single["JS"] < 1 and 0 < single["ACC"] < 1  # a comparison that can tell models apart
    for k, v in row["valid"].items():
        assert single[k] == pytest.approx(v, abs=1e-12), k


def _worker_own_folder(rank, world, port, cfg_dict, out_dir):
    """As _worker, but rank 1 sees another, empty run folder: a second node whose disk is not rank 0's."""
    if rank == 1:
        cfg_dict = dict(cfg_dict, output_dir=os.path.join(out_dir, "node1"))
    _worker(rank, world, port, cfg_dict, out_dir)


def test_final_test_scores_need_no_shared_file_system(odd_data, tmp_path, capsys):
    """Every process scores the test split with the weights rank 0 kept as best.pt, even where only rank 0 can
    read that file: the weights travel by broadcast, not through the disk."""
    out = tmp_path / "ddp"
    os.makedirs(out)
    cfg = _cfg(odd_data, out, num_epochs=3, lr=0.03, seed=16)  # seed and lr: a run whose best epoch is not the last
    mp.spawn(_worker_own_folder, args=(2, _free_port(), cfg, str(out)), nprocs=2, join=True)
    results = json.loads((out / "results_rank0.json").read_text())
    assert results["best_epoch"] != 3  # best.pt is not the last epoch's model, so a mix-up would show
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--data_path", str(odd_data),
                 "--split", "test", "--json", "--device", "cpu"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k, v in results["test"].items():
        assert single[k] == pytest.approx(v, abs=1e-12), k


def _cli_worker(rank, world, port, argv_by_rank):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert main(argv_by_rank[rank]) == 0


def test_resume_needs_no_shared_file_system(odd_data, tmp_path):
    """'r2unet train --resume' where only rank 0 can read the run folder (rank 1's is another, empty one): rank 1
    gets the run's settings and state from rank 0 and the resumed run ends where one on a shared disk does."""
    flags = ["--data_path", str(odd_data), "--model_type", "R2U_Net", "--t", "1", "--base_channels", "4",
             "--image_size", "32", "--batch_size", "2", "--num_epochs", "1", "--num_epochs_decay", "0",
             "--num_workers", "0", "--device", "cpu", "--seed", "11", "--amp", "off", "--lr", "0.01",
             "--augmentation_prob", "0"]
    finals = []
    for layout in ("shared", "split"):
        out = tmp_path / layout
        rank1 = out if layout == "shared" else tmp_path / "node1"
        first = [["train", "--output_dir", str(d), *flags] for d in (out, rank1)]
        mp.spawn(_cli_worker, args=(2, _free_port(), first), nprocs=2, join=True)
        # the resume names only what changes, as users do; the network comes from the checkpoint
        again = [["train", "--output_dir", str(d), "--resume", "--num_epochs", "2", "--data_path", str(odd_data),
                  "--device", "cpu", "--num_workers", "0"] for d in (out, rank1)]
        mp.spawn(_cli_worker, args=(2, _free_port(), again), nprocs=2, join=True)
        finals.append(load_file(out / "checkpoints" / "last.pt"))
    assert finals[0]["epoch"] == finals[1]["epoch"] == 2
    for k, v in finals[0]["model"].items():
        assert torch.equal(v, finals[1]["model"][k]), k


def test_sync_bn_two_by_b_equals_one_by_two_b(odd_data, tmp_path):
    common = dict(max_steps_per_epoch=1, augmentation_prob=0.0, eval_every=1, precise_bn=0)  # the step's statistics
    _spawn(2, _cfg(odd_data, tmp_path / "two", batch_size=2, sync_bn=True, **common), tmp_path / "two")
    _spawn(1, _cfg(odd_data, tmp_path / "one", batch_size=4, **common), tmp_path / "one")
    two = load_file(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    one = load_file(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    start = __import__("r2unet").create_model("R2U_Net", t=1, base_channels=4).state_dict()
    lr = 2e-4
    close = total = 0
    for k in one:
        if not one[k].is_floating_point():
            continue
        if "running" in k:  # batch statistics over the 2B images: exact up to float rounding
            assert torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-6), k
        else:
            # Adam's first step moves each weight by ~lr * sign(grad): weights whose gradient is ~0 in exact
            # arithmetic (conv biases feeding BatchNorm) may flip sign on rounding noise, hence atol 2.1 * lr.
            assert torch.allclose(two[k], one[k], atol=2.1 * lr), k
            close += torch.isclose(two[k], one[k], rtol=1e-4, atol=1e-6).sum().item()
            total += one[k].numel()
            assert not torch.equal(one[k], start[k]), f"{k} did not move"
    assert close / total > 0.9  # all but the zero-gradient weights agree tightly


def test_torchrun_launches_the_cli(odd_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "r2unet",
           "train", "--data_path", str(odd_data), "--output_dir", str(out), "--model_type", "U_Net",
           "--base_channels", "4", "--image_size", "32", "--batch_size", "2", "--num_epochs", "1",
           "--num_workers", "0", "--device", "cpu", "--world-size", "2", "--global_batch_size", "4", "--scale_lr"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout + done.stderr
    assert done.stdout.count("FPS: ") == 1, log  # only rank 0 prints
    assert "2 process(es) x batch 2 = global batch 4, lr 0.0004" in done.stdout, log
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["fps"] > 0
    state = load_file(out / "checkpoints" / "last.pt")["model"]
    assert not any(k.startswith("module.") for k in state)


def _worker_rank1_dies(rank, world, port, cfg_dict, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from r2unet.engine import task, trainer

    if rank == 1:  # dies in epoch 2, after the epoch-1 checkpoint was written
        real, calls = task.BinaryTask.loss, {"n": 0}

        def dying_loss(*args):
            calls["n"] += 1
            if calls["n"] == 6:
                os._exit(3)
            return real(*args)

        task.BinaryTask.loss = dying_loss
    try:
        trainer.fit(TrainConfig.from_dict(cfg_dict), log=lambda *_: None)
    except Exception as exc:  # noqa: BLE001 - the test reads what rank 0 saw
        with open(os.path.join(out_dir, f"error_r{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def test_a_dead_rank_makes_the_others_fail_not_hang_and_resume_works(odd_data, tmp_path):
    import time

    out = tmp_path / "crash"
    out.mkdir()
    cfg = _cfg(odd_data, out, num_epochs=3, dist_timeout_s=30)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker_rank1_dies, args=(r, 2, port, cfg, str(out))) for r in range(2)]
    start = time.time()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert not any(p.is_alive() for p in procs), "a process hung after its peer died"
    for p in procs:
        p.kill() if p.is_alive() else None
    assert procs[1].exitcode == 3 and procs[0].exitcode == 1
    assert time.time() - start < 110
    error = (out / "error_r0.txt").read_text()  # rank 0 failed with an error instead of waiting forever
    assert error.startswith("TrainingError: process 0 of 2 stopped") and "--resume" in error
    # the epoch-1 checkpoint survives the crash and a 1-process --resume finishes the run
    assert load_file(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["world_size"] == 1


def _precise_bn_worker(rank, world, port, data, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from r2unet.data.cache import open_split_cache
    from r2unet.data.dataset import DeviceTransform, make_loader
    from r2unet.engine import distributed as D
    from r2unet.engine.loop import precise_bn_batches, recompute_batchnorm
    from r2unet.engine.runtime import Precision
    from r2unet.models import create_model

    info = D.init_distributed("cpu") if world > 1 else D.DistInfo()
    try:
        torch.manual_seed(0)
        model = create_model("R2U_Net", t=2, base_channels=4)
        cache = open_split_cache(data, "train", 32, None)
        loader = make_loader(cache, 2, train=False, batch_sampler=precise_bn_batches(len(cache), 2, 8, 3, info))
        cpu = torch.device("cpu")
        recompute_batchnorm(model, loader, DeviceTransform(32, cpu, None), Precision(None, cpu))
        torch.save(model.state_dict(), os.path.join(out_dir, f"w{world}r{rank}.pt"))
    finally:
        D.cleanup()


def test_precise_bn_across_processes_equals_one_process(odd_data, tmp_path):
    """Two processes share out the fixed batches; every process ends with the statistics one process computes over
    all of them (equal up to the order of the sums), so validation on every shard scores one model."""
    mp.spawn(_precise_bn_worker, args=(2, _free_port(), odd_data, tmp_path), nprocs=2, join=True)
    _precise_bn_worker(0, 1, 0, odd_data, tmp_path)
    r0, r1, one = (torch.load(tmp_path / f, weights_only=True) for f in ("w2r0.pt", "w2r1.pt", "w1r0.pt"))
    stats = [k for k in one if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in one:
        assert torch.equal(r0[k], r1[k]), k  # the same on every process, bit for bit
    for k in stats:
        assert torch.allclose(r0[k], one[k], rtol=1e-5, atol=1e-6), k
        assert int(r0[k.rsplit(".", 1)[0] + ".num_batches_tracked"]) == \
            int(one[k.rsplit(".", 1)[0] + ".num_batches_tracked"])


def test_crossval_under_two_processes_trains_each_fold_on_both(odd_data, tmp_path):
    """'torchrun ... r2unet crossval': every fold trains on all the processes (one process group for all folds),
    then rank 0 alone predicts the held-out folds and scores the ensemble."""
    out = tmp_path / "cv"
    argv = ["crossval", "--folds", "2", "--data_path", str(odd_data), "--output_dir", str(out), "--model_type",
            "U_Net", "--base_channels", "4", "--image_size", "32", "--batch_size", "2", "--num_epochs", "1",
            "--num_epochs_decay", "0", "--num_workers", "0", "--device", "cpu", "--amp", "off", "--seed", "3"]
    mp.spawn(_cli_worker, args=(2, _free_port(), [argv, argv]), nprocs=2, join=True)
    for k in range(2):
        results = json.loads((out / f"fold_{k}" / "results.json").read_text())
        assert results["world_size"] == 2 and (out / f"fold_{k}" / "oof.npz").is_file()
    report = json.loads((out / "crossval.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["fold 1", "fold 2", "ensemble of 2"]
