"""Summarise the raw outputs of benchmarks/gpu_check.sh: a short table on stdout and a summary JSON file.

    python benchmarks/summarize_gpu_check.py RAW_DIR SUMMARY_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _last_json(path: Path):
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, IndexError, json.JSONDecodeError):
        return None


def main(raw: Path, out_json: Path) -> None:
    summary: dict = {"gpu": (raw / "gpu.txt").read_text().strip() if (raw / "gpu.txt").exists() else None}
    print(summary["gpu"])
    if (raw / "tests.log").exists():
        tail = [line for line in (raw / "tests.log").read_text().splitlines() if line.strip()][-2:]
        summary["tests"] = tail
        print("tests:", " | ".join(tail))
    summary["bench_train"] = {}
    for f in sorted(raw.glob("bench_train_*.json")):
        r = _last_json(f)
        name = f.stem.removeprefix("bench_train_")
        if r is None:
            err = (raw / f"{f.stem}.err")
            print(f"{name}: no result" + (f" ({err.read_text().strip().splitlines()[-1][:200]})"
                                          if err.exists() and err.read_text().strip() else ""))
            continue
        summary["bench_train"][name] = r
        print(f"{name} (t={r['t']}, {r['image_size']}px, batch {r['batch_size']}): "
              f"{r['train_gflop_per_image']:.1f} GFLOP/img, measured peak {r['peak_bf16_tflops']:.0f} TFLOP/s, "
              f"bound {r['flop_bound_img_per_s']:.0f} img/s")
        for row in r["rows"]:
            print(f"   {row['config']:<62}{row['img_per_s']:8.1f} img/s {row['x_baseline']:5.2f}x "
                  f"{100 * row['frac_flop_bound']:5.1f}% of bound")
    data = _last_json(raw / "bench_data.json") if (raw / "bench_data.json").exists() else None
    summary["bench_data"] = data
    if data:
        print(f"data pipeline: {data['img_per_s']:.0f} img/s on {data['device']}")
    summary["accuracy"] = {}
    for name in ("fp32", "default"):
        f = raw / f"acc_{name}.json"
        if f.exists():
            r = json.loads(f.read_text())
            summary["accuracy"][name] = r
            print(f"accuracy {name}: test JS {r['test']['JS']:.4f} DC {r['test']['DC']:.4f}, best epoch "
                  f"{r['best_epoch']}, {r['fps']:.0f} img/s ({r['precision']})")
    out_json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
