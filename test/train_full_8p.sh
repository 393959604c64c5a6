#!/usr/bin/env bash
# Full 8-process training as the seed's 8p recipe: global batch 128 (16 per GPU), lr 8 x 2e-4 = 0.0016, fp16 AMP.
# Usage: bash test/train_full_8p.sh --data_path=/path/to/prepared_dataset [--nproc=8] [--output_dir=DIR]
#        [r2unet train flags]   (default output: runs/train_full_8p in the repository; run it again to continue)
source "$(dirname "$0")/_common.sh"
parse_args train_full_8p "$@"
run_and_report "$py" -m torch.distributed.run --standalone --nproc_per_node="${nproc:-8}" -m r2unet train \
    --data_path="$data_path" --model_type R2U_Net --num_epochs 150 --batch_size 16 --lr 0.0002 --scale_lr \
    --apex 1 --apex-opt-level O1 --loss_scale_value 128 --seed 12345 --world-size "${nproc:-8}" \
    --output_dir "$output_dir" "${extra_args[@]}"
