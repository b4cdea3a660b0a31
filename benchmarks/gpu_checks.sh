#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU, from the repository root.
# STEPS picks them (default "tests suite train tuning step", plus "recipe" when DATA is set).
# First, side by side (CPU-bound compiling; nothing is timed meanwhile):
#   tests  the Triton kernels compiled on the GPU and checked: attention against float64
#          dense autograd, farthest-point sampling against the PyTorch loop (tests/ -k cuda:
#          test_triton_kernels_on_cuda, test_triton_farthest_point_sampling_on_cuda);
#   suite  the rest of the test suite (-n 4 where pytest-xdist is installed), CUDA visible;
#   train  two short training runs on the GPU through the CLI, on the built-in synthetic
#          shapes (configs/synthetic.yaml in bf16-mixed: the ISAB model, then the SAB
#          encoder at 2048 points), each checkpoint then tested: the automatic Triton paths;
#   tuning (first half) benchmarks/triton_tuning.py --phase compile: the launches it times.
# Then alone on the GPU:
#   tuning benchmarks/triton_tuning.py --phase time: SDPA softmax vs the Triton kernels
#          (defaults, and BASELINE if set: another triton_sinkhorn.py, e.g.
#          `git show ed31184:pointsink/triton_sinkhorn.py > outputs/base.py`), 5 iterations,
#          forward + backward, B=8, H=4, d=64, N = 1024 ... 16384 and the recipe's ISAB
#          shapes, bfloat16 and float32; a per-kernel profile; the launch-configuration sweep
#          (longest kernels first, within the time left); the float64 checks; tuned rows;
#          TUNING_ARGS go to both halves (e.g. "--sweep-dtype float32");
#   step   benchmarks/train_step.py on the GPU: the recipe's training step, timed and
#          profiled (kernels launched, GPU-busy time against wall time), into train.log;
#   ncu    (only when named in STEPS) Nsight Compute's counters for one forward + backward
#          of the attention kernels at N = 4096, bfloat16 then float32
#          (benchmarks/ncu_attention.py): speed of light, occupancy, warp stalls, into ncu.txt;
#   recipe with DATA=<ModelNet10 dir, or a .tar.xz of it>: configs/modelnet10.yaml,
#          Sinkhorn-5, seeds 0 1 2 at once on the one GPU (benchmarks/reproduce.py --jobs 3),
#          RECIPE_ARGS passed to train.py (e.g. "--trainer.max_epochs 20"); not yet timed at
#          width 256 on a GPU (a seed of the 2-block width-128 model without normalized
#          offsets took 7.0 s per epoch on an H200 on 2026-11-28).
# BUDGET (seconds, default 540) bounds it all: each step runs under `timeout`, and the sweep
# takes no further kernel once its time is short. The files land in
# ${OUT:-outputs/gpu-checks}: at most 8 (the device tool's limit) unless STEPS holds both ncu
# and recipe (9); summaries are printed last.
#
#   bash benchmarks/gpu_checks.sh
#   BASELINE=outputs/base.py BUDGET=400 bash benchmarks/gpu_checks.sh
#   STEPS="tests recipe" DATA=.gpu/ModelNet10.tar.xz RECIPE_ARGS="--trainer.max_epochs 30" \
#       bash benchmarks/gpu_checks.sh
#
# Needs pointsink's dependencies importable (pip install -e ".[test]", or PYTHONPATH=. with
# them installed); PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu-checks}
BUDGET=${BUDGET:-540}
STEPS=${STEPS:-"tests suite train tuning step${DATA:+ recipe}"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET - SECONDS)); }
# `timeout` with at least 1 s: `timeout 0` would not limit the step at all.
bounded() { local seconds=$(($1 > 1 ? $1 : 1)); shift; timeout "$seconds" "$@"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to $PYTHON (torch.cuda.is_available() is False)" >&2
    exit 2
fi
{
    echo "steps: $STEPS"
    "$PYTHON" -c "import torch, triton, pytorch_lightning as pl; print('torch', torch.__version__, \
'| triton', triton.__version__, '| pytorch_lightning', pl.__version__, '|', \
torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    nproc
} 2>&1 | tee "$OUT/device.txt"

status=0
pids=()
# The side-by-side steps get half the budget when timed steps follow, else all of it.
phase1=$(left)
if wants tuning || wants step || wants ncu || wants recipe; then phase1=$(($(left) / 2)); fi
if wants tests; then
    bounded "$phase1" "$PYTHON" -m pytest -q -p no:cacheprovider -rA -k cuda \
        tests/test_sinkhorn_attention.py tests/test_triton_sampling.py \
        >"$OUT/tests.log" 2>&1 &
    pids+=($!)
fi
if wants suite; then
    # pytest-xdist comes with the test extra; without it the suite runs in one process.
    workers=()
    "$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 4)
    bounded "$phase1" "$PYTHON" -m pytest -q -p no:cacheprovider "${workers[@]}" tests -k "not cuda" \
        >"$OUT/suite.log" 2>&1 &
    pids+=($!)
fi
if wants train; then
    (
        end=$((SECONDS + phase1))
        runs=/tmp/pointsink-gpu-train
        rm -rf "$runs"  # a warm machine's earlier run would be tested instead
        common=(--config configs/synthetic.yaml --trainer.accelerator gpu
                --trainer.precision bf16-mixed --trainer.enable_progress_bar false)
        for run in isab sab2048; do
            extra=(--trainer.max_epochs 3)
            [ "$run" = sab2048 ] && extra=(--trainer.max_epochs 2 --model.encoder sab
                                            --data.init_args.num_points 2048)
            begin=$SECONDS
            bounded $((end - SECONDS)) "$PYTHON" train.py fit "${common[@]}" "${extra[@]}" \
                --trainer.default_root_dir "$runs/$run" || exit 1
            bounded $((end - SECONDS)) "$PYTHON" train.py test "${common[@]}" "${extra[@]}" \
                --trainer.default_root_dir "$runs/$run" --ckpt_path best || exit 1
            echo "== $run: fit + test in $((SECONDS - begin)) s (beside compiling; not a timing)"
        done
    ) >"$OUT/train.log" 2>&1 &
    pids+=($!)
fi
if wants tuning; then
    bounded "$phase1" "$PYTHON" benchmarks/triton_tuning.py --phase compile --workers 12 \
        ${BASELINE:+--baseline "$BASELINE"} ${TUNING_ARGS:-} >/tmp/pointsink-compile.log 2>&1 \
        || status=1
    grep -E '^compiled' /tmp/pointsink-compile.log >>"$OUT/device.txt"
fi
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "== side-by-side steps done at $SECONDS s" | tee -a "$OUT/device.txt"

if wants tuning; then
    reserve=0  # seconds kept for the steps after this one
    if wants step; then reserve=45; fi
    if wants ncu; then reserve=$((reserve + 150)); fi
    if wants recipe; then reserve=$((reserve + $(left) / 2)); fi
    time_left=$(($(left) - reserve))
    bounded "$time_left" "$PYTHON" benchmarks/triton_tuning.py --phase time \
        --time-budget $((time_left - 15)) ${BASELINE:+--baseline "$BASELINE"} ${TUNING_ARGS:-} \
        --json "$OUT/tuning.json" >"$OUT/tuning.md" 2>"$OUT/tuning.err" || status=1
fi
if wants step; then
    {
        echo "== benchmarks/train_step.py, the recipe's model on the GPU (random points)"
        step_time=$(($(left) - 5))
        if wants recipe; then step_time=45; fi
        bounded "$step_time" "$PYTHON" benchmarks/train_step.py \
            --config configs/modelnet10.yaml --device cuda --threads 4 --repeats 10
    } >>"$OUT/train.log" 2>&1 || status=1
fi
if wants ncu; then
    for dtype in bfloat16 float32; do
        echo "== ncu, $dtype"
        bounded $(($(left) / 2)) ncu --profile-from-start off --clock-control none \
            --section SpeedOfLight --section Occupancy --section WarpStateStats \
            --section LaunchStats --kernel-name regex:"^_(row|col|out|bwd)" \
            "$PYTHON" benchmarks/ncu_attention.py --n 4096 --dtype "$dtype" || status=1
    done >"$OUT/ncu.txt" 2>&1
fi
if wants recipe; then
    if [ -z "${DATA:-}" ]; then
        echo "error: the recipe step needs DATA" >"$OUT/recipe.md"
        status=1
    else
        if [[ "$DATA" == *.tar.xz ]]; then
            mkdir -p /tmp/pointsink-data
            tar -C /tmp/pointsink-data -xJf "$DATA"
            DATA=$(ls -d /tmp/pointsink-data/*/ | head -n 1)
        fi
        bounded $(($(left) - 5)) "$PYTHON" benchmarks/reproduce.py \
            --config configs/modelnet10.yaml --data-root "$DATA" --variants sinkhorn-5 \
            --seeds 0 1 2 --jobs 3 --rerun --out /tmp/pointsink-recipe -- ${RECIPE_ARGS:-} \
            >/tmp/pointsink-recipe.log 2>&1 || status=1
        {
            cat /tmp/pointsink-recipe/summary.md 2>/dev/null || echo "(no summary)"
            echo "== tail of the log"
            tail -n 30 /tmp/pointsink-recipe.log
        } >"$OUT/recipe.md"
    fi
fi

if wants tests; then
    echo "== tests (tail of $OUT/tests.log)"
    tail -n 4 "$OUT/tests.log"
fi
if wants suite; then
    echo "== the rest of the suite (tail of $OUT/suite.log)"
    tail -n 4 "$OUT/suite.log"
fi
if wants train || wants step; then
    echo "== training on the GPU"
    grep -E '^==|^\||test/(oa|macc) |Error' "$OUT/train.log" | head -n 40
fi
if wants tuning; then
    echo "== triton_tuning.py (profile, best configurations, errors, table)"
    grep -vE '^  \(' "$OUT/tuning.md" || tail -n 5 "$OUT/tuning.err"
fi
if wants ncu; then
    echo "== ncu (speed of light and occupancy lines of $OUT/ncu.txt)"
    grep -E '^  _|^==|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per' \
        "$OUT/ncu.txt" | head -n 120
fi
if wants recipe; then
    echo "== modelnet10.yaml recipe"
    head -n 40 "$OUT/recipe.md"
fi
echo "== total $SECONDS s"
exit "$status"
