#!/usr/bin/env bash
# One prepared script for a lent GPU machine (device tool): GPU tests, training-step benchmarks of the four networks,
# data pipeline, and a short fp32-vs-default accuracy run. Installs nothing; uses the machine's torch.
# Results go to $OUT (JSON + logs); a short table is printed last.
#   run: bash benchmarks/gpu_check.sh        (budget: ~10 minutes on an H100/H200)
set -uo pipefail
OUT=${OUT:-/tmp/r2unet_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1

# 1. correctness on the GPU
timeout 180 $PY -m pytest -q -x tests/test_gpu.py tests/test_models.py tests/test_metrics.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"

# 2. training step: baseline, each optimisation, default end to end (R2U-Net t=2, 224, batch 16) + the others
for m in R2U_Net U_Net AttU_Net R2AttU_Net; do
    timeout 150 $PY -m r2unet bench train --model_type "$m" --t 2 --batch_size 16 --image_size 224 \
        --device cuda --steps 30 --warmup 10 --json > "$OUT/bench_train_$m.json" 2> "$OUT/bench_train_$m.err"
done

# 3. data pipeline on the GPU
$PY -m r2unet synth --output "$OUT/tmp/raw" --num_images 400 --seed 1 > /dev/null 2>&1
$PY -m r2unet prepare --origin_data_path "$OUT/tmp/raw/ISIC2018_Task1-2_Training_Input" \
    --origin_GT_path "$OUT/tmp/raw/ISIC2018_Task1_Training_GroundTruth" --data_path "$OUT/tmp/data" > /dev/null 2>&1
timeout 60 $PY -m r2unet bench data --data_path "$OUT/tmp/data" --device cuda --num_workers 4 --json \
    > "$OUT/bench_data.json" 2> "$OUT/bench_data.err"

# 4. accuracy: fp32 eager vs the default fast configuration, same seed and data, short run
for cfg in "fp32:--amp off --compile off --channels_last off" "default:"; do
    name=${cfg%%:*}; flags=${cfg#*:}
    timeout 150 $PY -m r2unet train --data_path "$OUT/tmp/data" --output_dir "$OUT/tmp/acc_$name" --model_type R2U_Net \
        --t 2 --num_epochs 8 --num_epochs_decay 4 --batch_size 16 --lr 1e-3 --num_workers 4 $flags \
        > "$OUT/acc_$name.log" 2>&1
    cp "$OUT/tmp/acc_$name/results.json" "$OUT/acc_$name.json" 2>/dev/null
done
rm -rf "$OUT/tmp"

$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(open(out / "gpu.txt").read().strip())
print(open(out / "tests.log").read().strip().splitlines()[-2:])
for f in sorted(out.glob("bench_train_*.json")):
    try:
        r = json.loads(f.read_text().strip().splitlines()[-1])
    except Exception as e:
        print(f.name, "failed", e); continue
    print(f"{r['model_type']}: {r['train_gflop_per_image']:.0f} GFLOP/img, peak {r['peak_bf16_tflops']:.0f} TFLOP/s, "
          f"bound {r['flop_bound_img_per_s']:.0f} img/s")
    for row in r["rows"]:
        print(f"   {row['config']:<60}{row['img_per_s']:8.1f} img/s {row['x_baseline']:5.2f}x "
              f"{100*row['frac_flop_bound']:5.1f}%")
try:
    print("data:", json.loads((out / "bench_data.json").read_text())["img_per_s"], "img/s")
except Exception as e:
    print("data failed", e)
for name in ("fp32", "default"):
    try:
        r = json.loads((out / f"acc_{name}.json").read_text())
        print(f"accuracy {name}: test JS {r['test']['JS']:.4f} DC {r['test']['DC']:.4f} fps {r['fps']:.0f} "
              f"({r['precision']})")
    except Exception as e:
        print("accuracy", name, "failed", e)
PY
