#!/usr/bin/env bash
# Short single-device performance run as in the seed: a few hundred steps, prints the throughput.
# Usage: bash test/train_performance_1p.sh --data_path=/path/to/prepared_dataset [--output_dir=DIR] [r2unet train flags]
# (default output: runs/train_performance_1p in the repository)
source "$(dirname "$0")/_common.sh"
parse_args train_performance_1p "$@"
run_and_report "$py" -m r2unet train --data_path="$data_path" --model_type R2U_Net --num_epochs 2 \
    --num_epochs_decay 0 --batch_size 16 --lr 0.0002 --apex 1 --apex-opt-level O1 --loss_scale_value 128 \
    --seed 12345 --max_steps_per_epoch 100 --warmup_steps 10 \
    --output_dir "$output_dir" "${extra_args[@]}"
