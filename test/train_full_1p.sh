#!/usr/bin/env bash
# Full single-device training as in the seed: R2U-Net, 150 epochs, batch 16, lr 2e-4, fp16 AMP, seed 12345.
# Usage: bash test/train_full_1p.sh --data_path=/path/to/prepared_dataset [--output_dir=DIR] [r2unet train flags]
# (default output: runs/train_full_1p in the repository; run it again after a crash to continue the run)
source "$(dirname "$0")/_common.sh"
parse_args train_full_1p "$@"
run_and_report "$py" -m r2unet train --data_path="$data_path" --model_type R2U_Net --num_epochs 150 \
    --batch_size 16 --lr 0.0002 --apex 1 --apex-opt-level O1 --loss_scale_value 128 --seed 12345 \
    --output_dir "$output_dir" "${extra_args[@]}"
