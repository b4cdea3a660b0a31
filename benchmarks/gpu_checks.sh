#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU, from the repository root:
#   1. the Triton kernels compiled on the GPU and checked against float64 dense autograd
#      (tests/test_sinkhorn_attention.py -k cuda: test_triton_kernels_on_cuda);
#   2. benchmarks/triton_tuning.py: each kernel's launch configuration swept at N = 8192 in
#      bfloat16, the best ones checked against float64, then SDPA softmax vs the Triton
#      kernels (defaults, best, and BASELINE if set: another triton_sinkhorn.py, e.g.
#      `git show ed31184:pointsink/triton_sinkhorn.py > outputs/base.py`), 5 iterations,
#      forward + backward, B=8, H=4, d=64, N = 1024 ... 16384, and the recipe's ISAB shapes,
#      in bfloat16 and float32;
#   3. with DATA=<ModelNet10 dir>: the configs/modelnet10.yaml recipe, Sinkhorn-5, seeds
#      0 1 2 trained at once on the one GPU (benchmarks/reproduce.py --jobs 3).
# Check 2 replaced benchmarks/attention.py's run on 2026-12-04 and has not yet run on a GPU
# (only its CPU smoke test under TRITON_INTERPRET=1). On one H200 (2026-11-28,
# benchmarks/RESULTS.md) the earlier checks took 128 s (tests) and 107 s (attention.py), and
# one seed of the recipe 7.0 s per epoch. Logs and tables go to ${OUT:-outputs/gpu-checks};
# the tables are printed last.
#
#   bash benchmarks/gpu_checks.sh                 # checks 1 and 2 (a few minutes)
#   BASELINE=outputs/base.py bash benchmarks/gpu_checks.sh
#   DATA=../shared/data/ModelNet10 bash benchmarks/gpu_checks.sh
#   DATA=... RECIPE_ARGS="--model.channels 256 --trainer.max_epochs 50" bash benchmarks/gpu_checks.sh
#
# Needs pointsink's dependencies importable (pip install -e ".[test]", or PYTHONPATH=. with
# them installed); PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to $PYTHON (torch.cuda.is_available() is False)" >&2
    exit 2
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, '| triton', \
triton.__version__, '|', torch.cuda.get_device_name())" | tee "$OUT/device.txt"

status=0
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_sinkhorn_attention.py -k cuda -rA \
    >"$OUT/tests.log" 2>&1 || status=1

"$PYTHON" benchmarks/triton_tuning.py --workers 12 ${BASELINE:+--baseline "$BASELINE"} \
    --json "$OUT/tuning.json" >"$OUT/tuning.md" 2>"$OUT/tuning.err" || status=1

if [ -n "${DATA:-}" ]; then
    "$PYTHON" benchmarks/reproduce.py --config configs/modelnet10.yaml --data-root "$DATA" \
        --variants sinkhorn-5 --seeds 0 1 2 --jobs 3 --out "$OUT/recipe" \
        -- ${RECIPE_ARGS:-} >"$OUT/recipe.log" 2>&1 || status=1
fi

echo "== tests (tail of $OUT/tests.log)"
tail -n 3 "$OUT/tests.log"
echo "== triton_tuning.py (best configurations, errors, table)"
grep -E '^(best|errors|\|)' "$OUT/tuning.md" || tail -n 5 "$OUT/tuning.err"
if [ -n "${DATA:-}" ]; then
    echo "== modelnet10.yaml recipe"
    cat "$OUT/recipe/summary.md" 2>/dev/null || tail -n 5 "$OUT/recipe.log"
fi
exit "$status"
