#!/usr/bin/env bash
# Short 8-process performance run: global batch 128, prints the whole job's throughput.
# Usage: bash test/train_performance_8p.sh --data_path=/path/to/prepared_dataset [--nproc=8] [--output_dir=DIR]
#        [r2unet train flags]   (default output: runs/train_performance_8p in the repository)
source "$(dirname "$0")/_common.sh"
parse_args train_performance_8p "$@"
run_and_report "$py" -m torch.distributed.run --standalone --nproc_per_node="${nproc:-8}" -m r2unet train \
    --data_path="$data_path" --model_type R2U_Net --num_epochs 2 --num_epochs_decay 0 --batch_size 16 --lr 0.0002 \
    --scale_lr --apex 1 --apex-opt-level O1 --loss_scale_value 128 --seed 12345 --max_steps_per_epoch 100 \
    --warmup_steps 10 --world-size "${nproc:-8}" --output_dir "$output_dir" "${extra_args[@]}"
