import json

from r2unet.cli import main


def test_bench_data_json(tiny_data, capsys):
    assert main(["bench", "data", "--data_path", str(tiny_data), "--image_size", "32", "--batch_size", "4",
                 "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["img_per_s"] > 0 and out["cache_build_s"] >= 0 and out["images"] >= 2000


def test_bench_train_reports_every_configuration(capsys):
    assert main(["bench", "train", "--device", "cpu", "--base_channels", "4", "--image_size", "32",
                 "--batch_size", "2", "--steps", "2", "--warmup", "1", "--t", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("fp32 eager (baseline)", "+ bf16 autocast", "+ channels_last", "+ fused Adam",
                 "default train step"):
        assert name in out, name
    assert "GFLOP per training image" in out and "of bound" in out
