#!/usr/bin/env bash
# The GPU checks and figures, as one prepared script (for a lent GPU machine with no network).
#
#   bash bench/run_device.sh [CIFAR10_JPEG_TAR]      # writes everything under ${OUT:-/tmp/rlaux-device}
#
# 1. installs the project without dependencies (torch, triton and pytest are preinstalled there;
#    mlxtend may be carried as a wheel in ./wheels/);
# 2. runs the tests that need a GPU (fused kernels without the interpreter, no host syncs, CUDA graphs);
# 3. runs the benchmark suite at full size, then the epoch breakdown;
# 4. with the CIFAR-10 JPEG archive: the end-to-end throughput target run
#    (rlaux-weights --preset fast --amp --compile --cuda-graphs, batch 100).
# Each step's output goes to its own log, and a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlaux-device}
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR="$OUT/inductor"
step() { local name=$1; shift; echo "== $name: $*"; local t=$SECONDS; "$@" > "$OUT/$name.log" 2>&1; echo "   rc $? in $((SECONDS - t)) s"; }

ls wheels/*.whl > /dev/null 2>&1 && step install-wheels python -m pip install --no-deps --no-index wheels/*.whl
step install python -m pip install --no-deps -e .
step gpu-info python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
step tests-gpu python -m pytest -q tests/test_kernels.py tests/test_kernels_focal.py tests/test_kernels_gae.py \
    tests/test_kernels_ppo.py tests/test_speed.py tests/test_compile.py
step bench python -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench.json"
step bench-table python bench/results_table.py "$OUT/bench.json"
step breakdown python bench/epoch_breakdown.py --json "$OUT/breakdown.json"
if [ -n "${1:-}" ]; then
    mkdir -p "$OUT/data" && tar -xzf "$1" -C "$OUT/data"
    step throughput python -m rlaux_fast.train --dataset folder --data-dir "$OUT/data/cifar10" --method rlaux-weights \
        --preset fast --amp --compile --cuda-graphs --batch-size 100 --epochs 5 --no-progress --out "$OUT/run-throughput"
fi
tail -n 3 "$OUT"/*.log
