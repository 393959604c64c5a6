import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r2unet.commands.cli import main


def test_bench_data_json(tiny_data, capsys):
    assert main(["bench", "data", "--data_path", str(tiny_data), "--image_size", "32", "--batch_size", "4",
                 "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["img_per_s"] > 0 and out["cache_build_s"] >= 0 and out["images"] >= 2000


@pytest.mark.parametrize("kind", ["AMX", "AVX2"])
def test_bench_train_reports_every_configuration(capsys, cpu_like, kind):
    """On a bf16-native CPU the rows add bf16, channels_last and fused Adam; elsewhere they build on float32 (what
    train uses there) and the emulated bf16 row is left out, saying so."""
    cpu_like(kind)
    assert main(["bench", "train", "--device", "cpu", "--base_channels", "4", "--image_size", "32",
                 "--batch_size", "2", "--steps", "2", "--warmup", "1", "--t", "1"]) == 0
    out = capsys.readouterr().out
    if kind == "AMX":
        names = ("+ bf16 autocast", "+ channels_last", "+ fused Adam", "default train step (bf16")
    else:
        names = ("no bf16 row: bf16 is emulated on this AVX2", "fp32 + channels_last",
                 "fp32 + channels_last + fused Adam", "default train step (fp32")
        assert "+ bf16 autocast" not in out
    for name in ("fp32 eager (baseline)", *names):
        assert name in out, name
    assert "GFLOP per training image" in out and "of bound" in out
    assert f"measured {'bf16' if kind == 'AMX' else 'fp32'} matmul peak" in out


TINY_TRAIN = ["bench", "train", "--device", "cpu", "--base_channels", "4", "--image_size", "32", "--batch_size", "2",
              "--steps", "2", "--warmup", "1", "--t", "1", "--json"]


def test_bench_train_configs_subset_keeps_the_baseline_first(capsys):
    assert main([*TINY_TRAIN, "--configs", "default,bf16"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["key"] for r in out["rows"]] == ["fp32", "default", "bf16"]
    assert out["rows"][0]["x_baseline"] == 1.0 and all(r["img_per_s"] > 0 for r in out["rows"])


def test_bench_train_unknown_config_is_a_clear_error(capsys):
    assert main([*TINY_TRAIN, "--configs", "fp32,turbo"]) != 0
    assert "unknown turbo" in capsys.readouterr().err


def test_a_failing_compiler_is_reported_in_its_row_not_a_crash(monkeypatch, capsys):
    import torch

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert main([*TINY_TRAIN, "--compile", "on", "--configs", "compile,default"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["compile"]["img_per_s"] is None and "no C++ compiler" in rows["compile"]["error"]
    assert rows["default"]["img_per_s"] > 0 and "[compile failed: eager]" in rows["default"]["config"]


def test_bench_predict_compares_every_path_with_the_naive_loop_and_the_float32_masks(tmp_path, capsys):
    """A tiny network on three synthetic photos: every row timed, its ratio to the naive loop, its FLOP-bound
    fraction, and its masks against the float32 masks (the float32 row itself agrees with them exactly)."""
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    assert main(["bench", "predict", "--device", "cpu", "--base_channels", "4", "--image_size", "32",
                 "--num_images", "3", "--configs", "batch,channels_last,onnxruntime,onnxruntime_int8,default",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["config"]: r for r in out["rows"]}
    assert list(rows) == ["naive", "fp32", "batch", "channels_last", "onnxruntime", "onnxruntime_int8", "default"]
    assert rows["onnxruntime"]["pixels_equal"] > 0.999 and rows["onnxruntime_int8"]["precision"] == "int8"
    assert rows["default"]["runs"]  # what predict ran: the checkpoint, or an export made from it
    assert rows["naive"]["x_naive"] == 1.0 and rows["fp32"]["pixels_equal"] == 1.0
    for row in rows.values():
        assert row["img_per_s"] > 0 and 0 < row["frac_flop_bound"] < 1 and 0 <= row["mask_js"] <= 1
    assert out["images"] == 3 and out["mean_megapixels"] > 0.5  # photos of dermoscopy sizes
    assert main(["bench", "predict", "--configs", "fp64"]) == 2
    assert "--configs: unknown row(s) fp64" in capsys.readouterr().err


@pytest.mark.parametrize("end_to_end", [False, True])
def test_the_step_profile_splits_device_time_into_groups_beside_the_wall_time(end_to_end):
    """benchmarks/profile_step.py is for GPUs, which CI has none of: its plumbing is checked here, on a CPU."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "profile_step.py"), "--device", "cpu", "--base_channels", "4",
           "--image_size", "32", "--batch_size", "2", "--steps", "2", "--json"] + (["--end_to_end"] * end_to_end)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["step"].startswith("default" if end_to_end else "model-only")
    assert result["device_ms_per_step"] > 0 and result["wall_ms_per_step"] > 0
    assert abs(sum(result["groups_percent"].values()) - 100) < 1e-6
    assert result["groups_percent"]["convolution"] > 0 and result["top"]
