# Shared by the launcher scripts: --key=value parsing and the seed's final report lines.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

parse_args() {
    data_path="" output_dir="" nproc="" extra_args=()
    for arg in "$@"; do
        case "$arg" in
            --data_path=*) data_path="${arg#*=}" ;;
            --output_dir=*) output_dir="${arg#*=}" ;;
            --nproc=*) nproc="${arg#*=}" ;;
            *) extra_args+=("$arg") ;;
        esac
    done
    if [ -z "$data_path" ]; then
        echo "usage: bash $0 --data_path=/path/to/prepared_dataset [r2unet train flags]" >&2
        exit 2
    fi
    if [ -n "$output_dir" ] && [ -e "$output_dir/checkpoints/last.pt" ]; then
        extra_args+=("--resume")
    fi
}

# Run the training command, tee its log, then print the seed's three summary lines from results.json.
run_and_report() {
    local start end log out
    out="${output_dir:-}"
    for ((i = 1; i <= $#; i++)); do
        if [ "${!i}" = "--output_dir" ]; then j=$((i + 1)); out="${!j}"; fi
    done
    mkdir -p "$out"
    log="$out/train.log"
    start=$(date +%s)
    "$@" 2>&1 | tee "$log"
    end=$(date +%s)
    python - "$out/results.json" "$((end - start))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"Final Performance images/sec : {r['fps']:.2f}" if r.get("fps") else "Final Performance images/sec : n/a")
# as the seed: pixel accuracy on the (augmented) training batches of the last epoch
print(f"Final Train Accuracy : {r['train']['ACC']:.4f}" if r.get("train") else "Final Train Accuracy : n/a")
print(f"E2E Training Duration sec : {sys.argv[2]}")
PY
}
