#!/usr/bin/env bash
# One call on a CUDA machine verifies and benchmarks the cupy backend (issue 5):
#   (a) device, cupy and CUDA versions
#   (b) the GPU tests: pytest -m gpu (includes the cupy cases of tests/test_backend_equivalence.py)
#   (c) per-op benchmark at the default U-Net (base 16, depth 4, batch 8, 256x256), each op
#       checked against the numpy reference first
#   (d) the full training step at base 32 and 64 (depth 4, batch 16, 1x256x256): minunet cupy vs
#       a PyTorch twin, float32 with TF32 off and on, after a same-weights twin check
#   (e) training on the GPU: 3 epochs on the shipped sample (base 16, batch 8, 256x256), then the same
#       run interrupted in epoch 2 and resumed, which must give the same weights bit for bit
#       (benchmarks/gpu_train_check.py): images/s and the epoch time projected to the full data
#   (f) a short summary table, printed last
# Usage, from the repository root:  PYTHONPATH=. bash benchmarks/gpu_check.sh
# Every stage has its own `timeout` (sum 560 s, so under 9.5 minutes even if all hit; ~4 expected).
# Outputs go to $OUT when set (gpu_check.txt, gpu_ops.json, gpu_step.json, gpu_train.json, summary.txt).
set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset CUPY_TF32  # cupy's GEMMs in plain FP32
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DIR=${OUT:-${TMPDIR:-/tmp}/minunet_gpu_check}
mkdir -p "$DIR"
LOG="$DIR/gpu_check.txt"
: > "$LOG"
START=$(date +%s)

stage() { echo; echo "== $* ($(($(date +%s) - START)) s elapsed)" | tee -a "$LOG"; }

stage "(a) device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
DEVICE=$(timeout 45 "$PY" benchmarks/gpu_bench.py device 2>&1 | tail -1)
echo "$DEVICE" | tee -a "$LOG"
timeout 20 "$PY" -c "import numpy, numba; print('numpy', numpy.__version__, 'numba', numba.__version__)" 2>&1 | tee -a "$LOG"
timeout 40 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" 2>&1 | tee -a "$LOG"

stage "(b) GPU tests: pytest -m gpu tests/"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/ 2>&1 | tee "$DIR/pytest_gpu.txt" | tail -40 | tee -a "$LOG"
TEST_RC=${PIPESTATUS[0]}
TESTS_LINE="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$DIR/pytest_gpu.txt" | tail -1) (rc $TEST_RC)"
[ "$TEST_RC" = 124 ] && TESTS_LINE="TIMED OUT after 120 s: $TESTS_LINE"

stage "(c) per-op benchmark"
timeout 90 "$PY" benchmarks/gpu_bench.py ops --json-dir "$DIR" 2>&1 | tee -a "$LOG"
OPS_RC=${PIPESTATUS[0]}
[ "$OPS_RC" = 124 ] && echo "per-op benchmark TIMED OUT after 90 s" | tee -a "$LOG"

stage "(d) training step vs PyTorch"
timeout 130 "$PY" benchmarks/gpu_bench.py step --json-dir "$DIR" 2>&1 | tee -a "$LOG"
STEP_RC=${PIPESTATUS[0]}
[ "$STEP_RC" = 124 ] && echo "training-step benchmark TIMED OUT after 130 s" | tee -a "$LOG"

stage "(e) training on the GPU, interrupted and resumed"
timeout 100 "$PY" benchmarks/gpu_train_check.py --backend cupy --out "$DIR/train_runs" --json "$DIR/gpu_train.json" \
    2>&1 | tee -a "$LOG"
TRAIN_RC=${PIPESTATUS[0]}
[ "$TRAIN_RC" = 124 ] && echo "training check TIMED OUT after 100 s" | tee -a "$LOG"

stage "(f) summary"
timeout 15 "$PY" benchmarks/gpu_bench.py summary --json-dir "$DIR" --tests-line "$TESTS_LINE" \
    --device-line "$DEVICE" 2>&1 | tee -a "$LOG"
echo "rc: tests $TEST_RC, ops $OPS_RC, step $STEP_RC, train $TRAIN_RC; total $(($(date +%s) - START)) s; files in $DIR" | tee -a "$LOG"
[ "$TEST_RC" = 0 ] && [ "$OPS_RC" = 0 ] && [ "$STEP_RC" = 0 ] && [ "$TRAIN_RC" = 0 ]
