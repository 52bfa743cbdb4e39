#!/usr/bin/env bash
# The GPU run of issue 19, as two calls of the device tool (docs/TRAINING.md, "The GPU run, prepared").
# Here first: python -m visearch.training.device pack   (-> .device/a, .device/b; both git-ignored)
#   call 1, carry [".device/a"]: bash scripts/device_train.sh check
#   call 2, carry [".device/b"], right after: bash scripts/device_train.sh train
#   here: python -m visearch.training.device unpack --from <files_at> --to runs
# DEVICE_DIR (.device), CONFIGS (paths), BUDGET (seconds each run may take: its fine-tuning epochs are cut to what
# 90 % of it fits, so the schedule ends inside it; a SIGINT at BUDGET stops a run that overruns, best.pt is then what
# the last evaluation saved), PYTHON and SMOKE=1 (a few steps: the CI test on CPU) may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONFIGS=${CONFIGS:-configs/gpu-full.json configs/gpu-views.json}
BUDGET=${BUDGET:-450}
OUT=${OUT:-runs/device-out}
RUNS=${RUNS:-runs}
DEVICE_DIR=${DEVICE_DIR:-.device}
export PYTHONPATH="$(realpath "$DEVICE_DIR")/a/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8

case "${1:-}" in
check)
    "$PYTHON" -m visearch.training.device check --root "$DEVICE_DIR" --parts a
    "$PYTHON" - <<'PY'
import torch, numpy, PIL, cv2, onnx
import visearch.training.train  # noqa: F401 - the training imports on this machine
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, numpy {numpy.__version__}, Pillow {PIL.__version__}, OpenCV {cv2.__version__}: {gpu}")
PY
    ;;
train)
    "$PYTHON" -m visearch.training.device assemble --root "$DEVICE_DIR" --to /tmp/visearch-grocery
    export VISEARCH_GROCERY_DIR=/tmp/visearch-grocery
    smoke=(); [ "${SMOKE:-0}" = 1 ] && smoke=(--smoke)
    pids=(); names=()
    for cfg in $CONFIGS; do
        name=$(basename "$cfg" .json); names+=("$RUNS/$name")
        mkdir -p "$RUNS/$name"
        timeout -s INT "$BUDGET" "$PYTHON" -m visearch.training.cli --config "$cfg" --out "$RUNS/$name" "${smoke[@]}" \
            --budget "$((BUDGET * 9 / 10))" \
            > "$RUNS/$name/summary.json" 2> "$RUNS/$name.log" &
        pids+=($!)
    done
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    for n in "${names[@]}"; do tail -n 2 "$n.log"; done
    "$PYTHON" -m visearch.training.device collect --out "$OUT" "${names[@]}"
    exit $rc
    ;;
*)
    echo "usage: $0 check|train" >&2
    exit 2
    ;;
esac
