#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU, from the repository root:
#   1. the Triton kernels compiled on the GPU and checked against float64 dense autograd
#      (tests/test_sinkhorn_attention.py, including test_triton_kernels_on_cuda);
#   2. benchmarks/attention.py: SDPA softmax vs dense / chunked / Triton Sinkhorn attention,
#      5 iterations, forward + backward, B=8, H=4, d=64, N = 1024 ... 16384, fp32 and bf16;
#   3. with DATA=<ModelNet10 dir>: the configs/modelnet10.yaml recipe, Sinkhorn-5, seeds
#      0 1 2 trained at once on the one GPU (benchmarks/reproduce.py --jobs 3).
# On one H200 (2026-11-28, benchmarks/RESULTS.md): 32 of check 1's tests (-k "cuda or sm90 or
# chunked_matches or one_iteration") took 128 s, check 2 took 107 s, and one seed of the recipe
# alone 7.0 s per epoch (60 epochs: about 7 minutes); three seeds at once were not timed.
# Logs and tables go to ${OUT:-outputs/gpu-checks}; the tables are printed last.
#
#   bash benchmarks/gpu_checks.sh                 # checks 1 and 2 (a few minutes)
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
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_sinkhorn_attention.py \
    >"$OUT/tests.log" 2>&1 || status=1

for dtype in float32 bfloat16; do
    "$PYTHON" benchmarks/attention.py --device cuda --sizes 1024 2048 4096 8192 16384 \
        --batch 8 --heads 4 --dim 64 --n-iter 5 --dtype "$dtype" \
        --json "$OUT/attention-$dtype.json" >"$OUT/attention-$dtype.md" 2>&1 || status=1
done

if [ -n "${DATA:-}" ]; then
    "$PYTHON" benchmarks/reproduce.py --config configs/modelnet10.yaml --data-root "$DATA" \
        --variants sinkhorn-5 --seeds 0 1 2 --jobs 3 --out "$OUT/recipe" \
        -- ${RECIPE_ARGS:-} >"$OUT/recipe.log" 2>&1 || status=1
fi

echo "== tests (tail of $OUT/tests.log)"
tail -n 3 "$OUT/tests.log"
for dtype in float32 bfloat16; do
    echo "== attention, $dtype"
    grep '^|' "$OUT/attention-$dtype.md" || tail -n 5 "$OUT/attention-$dtype.md"
done
if [ -n "${DATA:-}" ]; then
    echo "== modelnet10.yaml recipe"
    cat "$OUT/recipe/summary.md" 2>/dev/null || tail -n 5 "$OUT/recipe.log"
fi
exit "$status"
