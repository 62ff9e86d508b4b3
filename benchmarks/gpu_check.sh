#!/usr/bin/env bash
# The GPU checks in one prepared run, for a session that is lent a GPU machine (issue 15: the full
# cifar10-speed recipe on one GPU, target 10 s or less on an H100 or H200).
#
# The device machine has torch, torchvision, timm, onnx, onnxruntime, safetensors, scikit-learn and
# matplotlib but nothing outside it can be reached, so imgcls runs from the source tree (PYTHONPATH)
# and the CIFAR-10 archive travels in an ignored folder of the checkout:
#
#   mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/ && grep -qx '/.gpu/' .git/info/exclude \
#       || echo /.gpu/ >> .git/info/exclude
#   device run: bash benchmarks/gpu_check.sh   (carry: [".gpu"], timeout_s: 540)
#
# It prints the GPU, then trains `--recipe cifar10-speed` on all 50,000 training JPEGs twice, eager and
# with --compile (the array cache is built once, by the first run), each scored on the 10,000 test
# JPEGs plain and with TTA, and writes the logs to $OUT (or /tmp/gpu-check). Each run prints its
# learning curve and "training: S s in the loop": the figure to hold against the 10 s target.
#
# SMOKE=1 runs the same steps on 2,000 training images for 2 epochs: the script's own check on any
# machine (about 2 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
ARCHIVE=${ARCHIVE:-.gpu/cifar10-jpeg.tar.gz}
[ -f "$ARCHIVE" ] || ARCHIVE=../shared/data/cifar10-jpeg.tar.gz
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export IMGCLS_CACHE_DIR=${IMGCLS_CACHE_DIR:-/tmp/imgcls-gpu-cache}
PY=$(command -v python3 || command -v python)

SIZE=()
if [ "${SMOKE:-0}" = 1 ]; then
    SIZE=(--recipe-train-images 2000 --recipe-test-images 500 --recipe-epochs 2 --recipe-batch-size 250)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision, onnxruntime; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'onnxruntime', onnxruntime.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

for mode in eager compile; do
    flags=()
    [ "$mode" = compile ] && flags=(--recipe-compile)
    start=$(date +%s)
    "$PY" benchmarks/cifar10.py --models --recipe cifar10-speed --archive "$ARCHIVE" --data /tmp/data \
        "${SIZE[@]}" "${flags[@]}" 2>&1 | tee "$OUT/cifar10-speed-$mode.log"
    echo "cifar10-speed ($mode): $(( $(date +%s) - start )) s for the whole benchmark" | tee -a "$OUT/cifar10-speed-$mode.log"
done
