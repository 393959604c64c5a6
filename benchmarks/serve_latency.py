"""Latency and throughput of ``r2unet serve``, against ``predict`` on the same images and machine.

Starts ``r2unet serve`` on a free local port (a subprocess, as users run it), then:

1. one small image at a time, ``--requests`` times: p50 and p95 latency, beside what the work itself costs in one
   process (decode, the model's forward pass, encoding the mask PNG: ``Segmenter.segment`` timed directly);
2. ``--clients`` concurrent clients sending the full-size photos: images per second;
3. ``predict`` on the same photos (its file loop with the model loaded, and the command with its start-up): images
   per second, and the ratio of serve's to the first.

    python benchmarks/serve_latency.py                       # a fresh R2U-Net (t=2, base 64) on synthetic photos
    python benchmarks/serve_latency.py --checkpoint runs/r2u --input photos/ --clients 8

Prints a table (``--json``: one JSON object). Nothing of it is asserted by the tests: timings depend on the machine.
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from r2unet.commands.bench_predict import synthetic_photos
from r2unet.commands.predict import run_predict
from r2unet.data.imageio import InMemory
from r2unet.engine.checkpoint import save_checkpoint
from r2unet.engine.config import TrainConfig
from r2unet.engine.inference import Segmenter
from r2unet.models import create_model


def _post(url: str, name: str, data: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return r.read()


def _fresh_checkpoint(folder: Path, base_channels: int = 64) -> Path:
    torch.manual_seed(0)
    model = create_model("R2U_Net", t=2, base_channels=base_channels)
    with torch.no_grad():
        model.train()
        model(torch.randn(2, 3, 64, 64))
    path = folder / "model.pt"
    save_checkpoint(path, model=model, config=TrainConfig(model_type="R2U_Net", t=2, base_channels=base_channels
                                                          ).to_dict(), epoch=0)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--input", help="a folder of photos (default: synthetic photos of dermoscopy sizes)")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="one-at-a-time requests of the small image")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base_channels", type=int, default=64, help="of the fresh network (without --checkpoint)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="r2unet-serve-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or str(_fresh_checkpoint(tmp, args.base_channels))
        photos = sorted(Path(args.input).iterdir()) if args.input else synthetic_photos(tmp / "photos",
                                                                                         args.num_images)
        small = tmp / "small.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(small)
        result = {"checkpoint": checkpoint, "photos": len(photos), "clients": args.clients}

        # what one small image costs in one process: the floor of a request's latency
        segmenter = Segmenter(checkpoint, device=args.device, log=lambda *_: None)
        data = small.read_bytes()
        segmenter.segment(InMemory("small.png", data))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            segmenter.segment(InMemory("small.png", data))
            times.append(time.perf_counter() - t0)
        result["in_process_s"] = statistics.median(times)
        del segmenter

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = subprocess.Popen([sys.executable, "-m", "r2unet", "serve", "--checkpoint", checkpoint, "--port",
                                   str(port), "--device", args.device, "--max_mb", "200"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1).read()
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit(f"serve stopped: {server.stderr.read().decode()[-2000:]}") from None
                    time.sleep(0.5)
            _post(f"{url}/predict", "small.png", data)  # warm-up
            latencies = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                _post(f"{url}/predict", "small.png", data)
                latencies.append(time.perf_counter() - t0)
            latencies.sort()
            result["p50_s"] = latencies[len(latencies) // 2]
            result["p95_s"] = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
            result["p50_over_in_process"] = result["p50_s"] / result["in_process_s"]

            jobs = [(p.name, p.read_bytes()) for p in photos]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda job: _post(f"{url}/predict", *job), jobs))
            result["serve_img_per_s"] = len(jobs) / (time.perf_counter() - t0)
        finally:
            server.terminate()
            server.wait(timeout=30)

        folder = tmp / "in"
        folder.mkdir()
        for p in photos:
            (folder / p.name).symlink_to(p.resolve())
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "r2unet", "predict", "--checkpoint", checkpoint, "--input", str(folder),
                        "--output", str(tmp / "out"), "--device", args.device], check=True, capture_output=True)
        result["predict_cli_img_per_s"] = len(photos) / (time.perf_counter() - t0)  # start-up included, as typed
        segmenter = Segmenter(checkpoint, device=args.device, log=lambda *_: None)
        run_predict(segmenter, folder, tmp / "warm", log=lambda *_: None, progress=False)  # warm-up
        t0 = time.perf_counter()
        run_predict(segmenter, folder, tmp / "out2", log=lambda *_: None, progress=False)
        result["predict_img_per_s"] = len(photos) / (time.perf_counter() - t0)  # the model already loaded
        result["serve_over_predict"] = result["serve_img_per_s"] / result["predict_img_per_s"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"one small image (320x256) at a time, {args.requests} requests: p50 {result['p50_s'] * 1000:.0f} ms, "
          f"p95 {result['p95_s'] * 1000:.0f} ms; the same work in one process {result['in_process_s'] * 1000:.0f} ms "
          f"(p50 / that = {result['p50_over_in_process']:.2f})")
    print(f"{args.clients} concurrent clients, {len(photos)} photos: serve {result['serve_img_per_s']:.2f} img/s, "
          f"predict {result['predict_img_per_s']:.2f} img/s with the model loaded (serve / predict = "
          f"{result['serve_over_predict']:.2f}; the predict command, start-up included: "
          f"{result['predict_cli_img_per_s']:.2f} img/s)")


if __name__ == "__main__":
    main()
