# Shared by the launcher scripts: --key=value parsing and the seed's final report lines.
# Paths on the command line are taken relative to the directory the script is called from; the package is found
# even when it is not installed (the repository goes first on PYTHONPATH).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# the interpreter: python, else python3 (a system without the unversioned name)
py="$(command -v python || command -v python3 || true)"
if [ -z "$py" ]; then
    echo "$0: no python or python3 on PATH (activate the environment r2unet is installed in)" >&2
    exit 2
fi

# parse_args DEFAULT_RUN_NAME "$@": sets data_path, output_dir (default runs/DEFAULT_RUN_NAME in the repository),
# nproc and extra_args; adds --resume when output_dir already holds a run (a relaunch after a crash continues it).
# The launcher's own flags take --flag=value or --flag value; every other flag goes to 'r2unet train' as it is.
usage() {
    echo "usage: bash $0 --data_path=DIR [--output_dir=DIR] [r2unet train flags]" >&2
    echo "  DIR: a dataset split by 'r2unet prepare' (it holds train/, train_GT/, valid/ ...)" >&2
    [ -n "${1:-}" ] && echo "$0: $1" >&2
    exit 2
}

parse_args() {
    local default_name="$1"
    shift
    data_path="" output_dir="" nproc="" extra_args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --data_path=*) data_path="${1#*=}" ;;
            --output_dir=*) output_dir="${1#*=}" ;;
            --nproc=*) nproc="${1#*=}" ;;
            --data_path|--output_dir|--nproc)
                if [ $# -lt 2 ] || [[ "$2" == --* ]]; then usage "$1 needs a value (e.g. $1=VALUE)"; fi
                case "$1" in
                    --data_path) data_path="$2" ;;
                    --output_dir) output_dir="$2" ;;
                    --nproc) nproc="$2" ;;
                esac
                shift ;;
            *) extra_args+=("$1") ;;
        esac
        shift
    done
    if [ -z "$data_path" ]; then
        usage "--data_path is required"
    fi
    output_dir="${output_dir:-$repo/runs/$default_name}"
    if [ -e "$output_dir/checkpoints/last.pt" ]; then
        echo "$output_dir holds a run: continuing it (--resume)"
        extra_args+=("--resume")
    fi
}

# Run the training command (its --output_dir is $output_dir), tee its log to $output_dir/train.log, then print the
# seed's three summary lines from results.json.
run_and_report() {
    local start end log status
    mkdir -p "$output_dir"
    log="$output_dir/train.log"
    start=$(date +%s)
    set +e
    # Ctrl-C and SIGTERM reach every process of the pipe: tee ignores them and writes to the end, so the trainer's
    # last words ("saved last.pt ... continue with --resume") reach the screen and the log, and its exit status
    # (130 after Ctrl-C, 143 after SIGTERM) is the script's.
    "$@" 2>&1 | (trap '' INT TERM; exec tee -a "$log")
    status=${PIPESTATUS[0]}
    set -e
    end=$(date +%s)
    if [ "$status" -eq 130 ] || [ "$status" -eq 143 ]; then
        echo "training interrupted; run the same command again to continue it; log: $log" >&2
        exit "$status"
    elif [ "$status" -eq 137 ]; then
        # SIGKILL: nothing in the process could say why; on a training run it is almost always the kernel's
        # out-of-memory killer ('dmesg' or 'journalctl -k' shows "Out of memory: Killed process")
        echo "training was killed (SIGKILL, exit status 137), most likely by the kernel because memory ran out." >&2
        echo "  a step needs less memory with a smaller --batch_size, --image_size or --base_channels (the run's" >&2
        echo "  first lines say what a step needs and what the machine has); run the same command again to" >&2
        echo "  continue from the last checkpoint with the same settings; log: $log" >&2
        exit "$status"
    elif [ "$status" -ne 0 ]; then
        echo "training stopped (exit status $status); log: $log" >&2
        exit "$status"
    fi
    "$py" - "$output_dir/results.json" "$((end - start))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"Final Performance images/sec : {r['fps']:.2f}" if r.get("fps") else "Final Performance images/sec : n/a")
# as the seed: pixel accuracy on the (augmented) training batches of the last epoch
print(f"Final Train Accuracy : {r['train']['ACC']:.4f}" if r.get("train") else "Final Train Accuracy : n/a")
print(f"E2E Training Duration sec : {sys.argv[2]}")
PY
}
