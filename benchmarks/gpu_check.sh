#!/usr/bin/env bash
# One prepared script for a lent GPU machine (device tool): GPU tests, training-step benchmarks, data pipeline and a
# short fp32-vs-default accuracy comparison. Installs nothing; uses the machine's torch. Most important first, and
# the summary is rewritten after every stage, so a run cut short by the lease still returns what it measured.
# $OUT gets summary.txt, summary.json and results.tar.gz (all logs/JSON): three files, under the device tool's limit.
#   run:  bash benchmarks/gpu_check.sh          (about 10 minutes on an H100/H200)
#   dry run of the plumbing on a CPU:
#         DEVICE=cpu SIZE=32 BATCH=2 BASE=4 STEPS=2 EPOCHS=1 NIMG=40 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/r2unet_gpu}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-224} BATCH=${BATCH:-16} BASE=${BASE:-64} STEPS=${STEPS:-30} EPOCHS=${EPOCHS:-8}
NIMG=${NIMG:-400}
PY=${PY:-python3}
WORK=$(mktemp -d)
RAW="$WORK/results"  # outside $OUT: the device tool returns at most 8 files, so $OUT only gets the three below
mkdir -p "$RAW" "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

summarize() {
    $PY benchmarks/summarize_gpu_check.py "$RAW" "$OUT/summary.json" > "$OUT/summary.txt" 2>&1
    tar -czf "$OUT/results.tar.gz" -C "$WORK" results 2>/dev/null
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  date -u; } > "$RAW/gpu.txt" 2>&1

# 1. correctness on the GPU
timeout 120 $PY -m pytest -q -x tests/test_gpu.py tests/test_models.py tests/test_metrics.py > "$RAW/tests.log" 2>&1
echo "tests rc=$?" >> "$RAW/tests.log"
summarize

bench_train() {  # model, timeout
    timeout "$2" $PY -m r2unet bench train --model_type "$1" --t 2 --batch_size "$BATCH" --image_size "$SIZE" \
        --base_channels "$BASE" --device "$DEVICE" --steps "$STEPS" --warmup 10 --json \
        > "$RAW/bench_train_$1.json" 2> "$RAW/bench_train_$1.err"
    summarize
}

# 2. the headline: R2U-Net t=2, 224, batch 16 — baseline, each optimisation, default end to end
bench_train R2U_Net 240

# 3. data pipeline on the GPU, and the dataset for the accuracy runs
$PY -m r2unet synth --output "$WORK/raw" --num_images "$NIMG" --seed 1 > /dev/null 2>&1
$PY -m r2unet prepare --origin_data_path "$WORK/raw/ISIC2018_Task1-2_Training_Input" \
    --origin_GT_path "$WORK/raw/ISIC2018_Task1_Training_GroundTruth" --data_path "$WORK/data" > /dev/null 2>&1
timeout 60 $PY -m r2unet bench data --data_path "$WORK/data" --device "$DEVICE" --num_workers 4 --json \
    > "$RAW/bench_data.json" 2> "$RAW/bench_data.err"
summarize

# 4. accuracy: fp32 eager vs the default fast configuration, same seed and data, short run
for cfg in "fp32:--amp off --compile off --channels_last off" "default:"; do
    name=${cfg%%:*}; flags=${cfg#*:}
    # shellcheck disable=SC2086  # $flags is a list of flags
    timeout 150 $PY -m r2unet train --data_path "$WORK/data" --output_dir "$WORK/acc_$name" --model_type R2U_Net \
        --t 2 --num_epochs "$EPOCHS" --num_epochs_decay 0 --batch_size "$BATCH" --image_size "$SIZE" \
        --base_channels "$BASE" --lr 1e-3 --num_workers 4 --device "$DEVICE" $flags > "$RAW/acc_$name.log" 2>&1
    cp "$WORK/acc_$name/results.json" "$RAW/acc_$name.json" 2>/dev/null
    summarize
done

# 5. the other three networks
for m in U_Net AttU_Net R2AttU_Net; do
    bench_train "$m" 150
done
rm -rf "$WORK"
cat "$OUT/summary.txt"
