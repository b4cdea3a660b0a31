#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU, from the repository root.
# First, side by side (CPU-bound compiling; nothing is timed meanwhile):
#   1. the Triton kernels compiled on the GPU and checked: attention against float64 dense
#      autograd, farthest-point sampling against the PyTorch loop (tests/ -k cuda:
#      test_triton_kernels_on_cuda, test_triton_farthest_point_sampling_on_cuda);
#   2. the rest of the test suite (-n 4, pytest-xdist), CUDA visible;
#   3. two short training runs on the GPU through the CLI, on the built-in synthetic shapes
#      (configs/synthetic.yaml in bf16-mixed: the ISAB model, then the SAB encoder at 2048
#      points), then each checkpoint tested: the model's automatic Triton path end to end;
#   4. benchmarks/triton_tuning.py --phase compile: every launch that step 5 times.
# Then alone on the GPU:
#   5. benchmarks/triton_tuning.py --phase time: SDPA softmax vs the Triton kernels (defaults,
#      and BASELINE if set: another triton_sinkhorn.py, e.g.
#      `git show ed31184:pointsink/triton_sinkhorn.py > outputs/base.py`), 5 iterations,
#      forward + backward, B=8, H=4, d=64, N = 1024 ... 16384 and the recipe's ISAB shapes,
#      bfloat16 and float32; a per-kernel profile; the launch-configuration sweep (longest
#      kernels first, within the time left); the float64 checks; the tuned rows;
#   6. benchmarks/train_step.py on the GPU: the recipe's training step, timed and profiled
#      (kernels launched, GPU-busy time against wall time), appended to train.log;
#   7. with DATA=<ModelNet10 dir>: the configs/modelnet10.yaml recipe, Sinkhorn-5, seeds
#      0 1 2 trained at once on the one GPU (benchmarks/reproduce.py --jobs 3; ~12 minutes
#      at the 7.0 s per epoch of one seed measured on an H200 on 2026-11-28).
# BUDGET (seconds, default 540) bounds steps 1-6: each runs under `timeout`, and the sweep
# takes no further kernel once its time is short. Logs and tables go to
# ${OUT:-outputs/gpu-checks}, summaries are printed last.
#
#   bash benchmarks/gpu_checks.sh
#   BASELINE=outputs/base.py BUDGET=400 bash benchmarks/gpu_checks.sh
#   DATA=../shared/data/ModelNet10 bash benchmarks/gpu_checks.sh
#
# Needs pointsink's dependencies importable (pip install -e ".[test]", or PYTHONPATH=. with
# them installed); PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu-checks}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET - SECONDS)); }

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to $PYTHON (torch.cuda.is_available() is False)" >&2
    exit 2
fi
{
    "$PYTHON" -c "import torch, triton, pytorch_lightning as pl; print('torch', torch.__version__, \
'| triton', triton.__version__, '| pytorch_lightning', pl.__version__, '|', \
torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    nproc
} 2>&1 | tee "$OUT/device.txt"

status=0
phase1=$(( $(left) / 2 ))
timeout "$phase1" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_sinkhorn_attention.py \
    tests/test_triton_sampling.py -k cuda -rA >"$OUT/tests.log" 2>&1 &
tests_pid=$!
# The rest of the suite on a machine where CUDA is visible (4 helpers, pytest-xdist).
timeout "$phase1" "$PYTHON" -m pytest -q -p no:cacheprovider -n 4 tests -k "not cuda" \
    >"$OUT/suite.log" 2>&1 &
suite_pid=$!
(
    end=$((SECONDS + phase1))
    runs=/tmp/pointsink-gpu-train
    common=(--config configs/synthetic.yaml --trainer.accelerator gpu
            --trainer.precision bf16-mixed --trainer.enable_progress_bar false)
    for run in isab sab2048; do
        extra=(--trainer.max_epochs 3)
        [ "$run" = sab2048 ] && extra=(--trainer.max_epochs 2 --model.encoder sab
                                        --data.init_args.num_points 2048)
        begin=$SECONDS
        timeout $((end - SECONDS)) "$PYTHON" train.py fit "${common[@]}" "${extra[@]}" \
            --trainer.default_root_dir "$runs/$run" || exit 1
        ckpt=$(ls "$runs/$run"/lightning_logs/*/checkpoints/best.ckpt | tail -n 1)
        timeout $((end - SECONDS)) "$PYTHON" train.py test "${common[@]}" "${extra[@]}" \
            --trainer.default_root_dir "$runs/$run" --ckpt_path "$ckpt" || exit 1
        echo "== $run: fit + test in $((SECONDS - begin)) s (beside compiling; not a timing)"
    done
) >"$OUT/train.log" 2>&1 &
train_pid=$!
timeout "$phase1" "$PYTHON" benchmarks/triton_tuning.py --phase compile --workers 12 \
    ${BASELINE:+--baseline "$BASELINE"} >"$OUT/compile.log" 2>&1 || status=1
wait "$tests_pid" || status=1
wait "$suite_pid" || status=1
wait "$train_pid" || status=1
echo "== compiling, tests and training done at $SECONDS s" | tee -a "$OUT/device.txt"

time_left=$(left)
timeout $((time_left - 45)) "$PYTHON" benchmarks/triton_tuning.py --phase time \
    --time-budget $((time_left - 60)) ${BASELINE:+--baseline "$BASELINE"} \
    --json "$OUT/tuning.json" >"$OUT/tuning.md" 2>"$OUT/tuning.err" || status=1
{
    echo "== benchmarks/train_step.py, the recipe's model on the GPU (random points)"
    timeout $(($(left) - 5)) "$PYTHON" benchmarks/train_step.py --config configs/modelnet10.yaml \
        --device cuda --threads 4 --repeats 10
} >>"$OUT/train.log" 2>&1 || status=1

if [ -n "${DATA:-}" ]; then
    "$PYTHON" benchmarks/reproduce.py --config configs/modelnet10.yaml --data-root "$DATA" \
        --variants sinkhorn-5 --seeds 0 1 2 --jobs 3 --out "$OUT/recipe" \
        -- ${RECIPE_ARGS:-} >"$OUT/recipe.log" 2>&1 || status=1
fi

echo "== tests (tail of $OUT/tests.log)"
tail -n 4 "$OUT/tests.log"
echo "== the rest of the suite (tail of $OUT/suite.log)"
tail -n 4 "$OUT/suite.log"
echo "== training on the GPU (synthetic shapes)"
grep -E '^==|^\||test/(oa|macc) |Error' "$OUT/train.log" | head -n 40
echo "== compiling: $(grep -E '^compiled' "$OUT/compile.log")"
echo "== triton_tuning.py (profile, best configurations, errors, table)"
grep -vE '^  \(' "$OUT/tuning.md" || tail -n 5 "$OUT/tuning.err"
if [ -n "${DATA:-}" ]; then
    echo "== modelnet10.yaml recipe"
    cat "$OUT/recipe/summary.md" 2>/dev/null || tail -n 5 "$OUT/recipe.log"
fi
echo "== total $SECONDS s"
exit "$status"
