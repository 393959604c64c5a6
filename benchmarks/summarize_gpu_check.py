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


def _tail(path: Path, n: int = 3) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()][-n:]
    except OSError:
        return []


def _bench_train(raw: Path, summary: dict) -> None:
    summary["bench_train"] = {}
    stems = {f.stem for f in raw.glob("bench_train_*.err")}
    for stem in sorted(stems, key=lambda s: (s != "bench_train_R2U_Net", s)):
        name = stem.removeprefix("bench_train_")
        r = _last_json(raw / f"{stem}.out")
        if r is None:  # cut short or failed: the rows it finished are in its stderr
            print(f"{name}: no result; last lines: " + " | ".join(_tail(raw / f"{stem}.err", 6)))
            continue
        summary["bench_train"][name] = r
        print(f"{name} (t={r['t']}, {r['image_size']}px, batch {r['batch_size']}, {r['device']}): "
              f"{r['train_gflop_per_image']:.1f} GFLOP/img, "
              f"measured {r['peak_dtype']} peak {r['peak_tflops']:.0f} TFLOP/s, "
              f"bound {r['flop_bound_img_per_s']:.0f} img/s")
        by_key = {}
        for row in r["rows"]:
            by_key[row.get("key")] = row
            if row["img_per_s"] is None:
                print(f"   {row['config']:<62} failed: {row['error'][:120]}")
                continue
            print(f"   {row['config']:<62}{row['img_per_s']:8.1f} img/s {row['x_baseline']:5.2f}x "
                  f"{100 * row['frac_flop_bound']:5.1f}% of bound")
        model_only = [by_key[k]["img_per_s"] for k in ("compile", "cudagraphs", "fused")
                      if k in by_key and by_key[k]["img_per_s"]]
        if "default" in by_key and by_key["default"]["img_per_s"] and model_only:
            ratio = by_key["default"]["img_per_s"] / max(model_only)
            r["e2e_over_best_model_only"] = ratio
            print(f"   end to end / best model-only step: {ratio:.3f}")


def _accuracy(raw: Path, summary: dict) -> None:
    summary["accuracy"] = {}
    # beside the GPU tests and each other on one card: their img/s are no throughput figures
    shared = " on a shared card" if (raw / "acc_concurrent").exists() else ""
    for f in sorted(raw.glob("acc_*.err")):
        name = f.stem.removeprefix("acc_")
        res = raw / f"acc_{name}.results.json"
        if not res.exists():
            print(f"accuracy {name}: no result; last lines: " + " | ".join(_tail(f, 4)))
            continue
        r = json.loads(res.read_text())
        valid_js = []
        metrics = raw / f"acc_{name}.metrics.jsonl"
        if metrics.exists():
            valid_js = [json.loads(line)["valid"]["JS"] for line in metrics.read_text().splitlines()
                        if line.strip() and json.loads(line).get("valid")]
        r["valid_JS_per_epoch"] = valid_js
        summary["accuracy"][name] = r
        last = valid_js[-3:]
        best_valid = (f"best valid JS {max(valid_js):.4f}, mean of the last {len(last)} epochs "
                      f"{sum(last) / len(last):.4f}, " if valid_js else "")
        print(f"accuracy {name}: {best_valid}test JS {r['test']['JS']:.4f} DC {r['test']['DC']:.4f} "
              f"(best epoch {r['best_epoch']}), {r['fps']:.0f} img/s{shared} ({r['precision']})")
    _accuracy_by_arm(summary["accuracy"])


def _accuracy_by_arm(runs: dict) -> None:
    """Runs named ARM_seedN: each arm's mean over its seeds (test JS; validation JS of the last three epochs)."""
    arms: dict[str, list[dict]] = {}
    for name, r in runs.items():
        arm, sep, seed = name.rpartition("_seed")
        if sep and seed.isdigit():
            arms.setdefault(arm, []).append(r)
    for arm, rs in arms.items():
        if len(rs) < 2:
            continue
        test = [r["test"]["JS"] for r in rs]
        valid = [sum(r["valid_JS_per_epoch"][-3:]) / len(r["valid_JS_per_epoch"][-3:]) for r in rs
                 if r["valid_JS_per_epoch"]]
        line = f"accuracy arm {arm}, {len(rs)} seeds: test JS mean {sum(test) / len(test):.4f} " \
               f"(min {min(test):.4f}, max {max(test):.4f})"
        if valid:
            line += f"; validation JS of the last epochs, mean {sum(valid) / len(valid):.4f}"
        print(line)


def _profile(raw: Path, stage: str, summary: dict) -> None:
    """profile_step.py's groups and top kernels (``profile``: the model-only step; ``profile_e2e``: the default)."""
    prof = _last_json(raw / f"{stage}.out")
    summary[stage] = prof
    if not prof:
        if (raw / f"{stage}.err").exists():
            print(f"{stage}: no result; " + " | ".join(_tail(raw / f"{stage}.err", 2)))
        return
    wall = (f"; wall {prof['wall_ms_per_step']:.1f} ms ({prof['img_per_s']:.0f} img/s, device busy "
            f"{prof['device_busy_percent']:.0f} %)" if "wall_ms_per_step" in prof else "")
    print(f"{stage} ({prof.get('step', 'model-only')}, {'compiled' if prof['compiled'] else 'eager'}): "
          f"{prof['device_ms_per_step']:.1f} ms device time per step ({prof['img_per_s_if_busy']:.0f} img/s if never "
          f"idle){wall}; " + ", ".join(f"{g} {pct:.0f}%" for g, pct in prof["groups_percent"].items()))
    if prof.get("convolution_fraction_of_peak"):
        print(f"   convolutions: {prof['convolution_tflops']:.0f} TFLOP/s = e "
              f"{prof['convolution_fraction_of_peak']:.2f} of the bf16 matmul peak (benchmarks/README.md: 550 "
              "img/s needs e >= 0.72 on an H200, >= 0.92 on an H100)")
    for row in prof["top"][:6 if stage == "profile" else 10]:
        print(f"   {row['percent']:5.1f}%  x{row['calls_per_step']:<4.0f} {row['name'][:90]}")


def _inference(raw: Path, summary: dict) -> None:
    """bench predict's table and the server's latency and throughput."""
    predict = _last_json(raw / "bench_predict.out")
    summary["bench_predict"] = predict
    if predict:
        from r2unet.commands.bench_predict import predict_report

        print(predict_report(predict))
    elif (raw / "bench_predict.err").exists():
        print("bench predict: no result; " + " | ".join(_tail(raw / "bench_predict.err", 2)))
    serve = _last_json(raw / "serve.out")
    summary["serve"] = serve
    if serve:
        print("serve: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in serve.items()
                                    if not isinstance(v, (dict, list))))
    elif (raw / "serve.err").exists():
        print("serve: no result; " + " | ".join(_tail(raw / "serve.err", 2)))


def main(raw: Path, out_json: Path) -> None:
    summary: dict = {"gpu": (raw / "gpu.txt").read_text().strip() if (raw / "gpu.txt").exists() else None}
    print(summary["gpu"])
    if (raw / "tests.err").exists():
        summary["tests"] = _tail(raw / "tests.out", 2) + _tail(raw / "tests.err", 1)
        print("tests:", " | ".join(summary["tests"]))
    _bench_train(raw, summary)
    data = _last_json(raw / "bench_data.out")
    summary["bench_data"] = data
    if data:
        print(f"data pipeline: {data['img_per_s']:.0f} img/s on {data['device']}")
    elif (raw / "bench_data.err").exists():
        print("data pipeline: no result; " + " | ".join(_tail(raw / "bench_data.err", 2)))
    _accuracy(raw, summary)
    for stage in ("profile", "profile_e2e"):
        _profile(raw, stage, summary)
    _inference(raw, summary)
    out_json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
