#!/usr/bin/env bash
# One script for the GPU machine (1× H200, 16 cores, no network): the Transfusion preset at 256²,
# bf16, full loss (LPIPS-VGG, MoCo ResNet-50 with random weights: same cost), D on from step 0.
#   1. our step at batch 8, 16, 32: img/s, MFU (3.1 TFLOP/image, 989 TFLOP/s bf16 peak), peak memory
#   2. at batch 16: ours vs the reference loop (and the reference alternating G/D batches), and the
#      speed ideas (reference λ, channels-last, cudnn.benchmark, foreach Adam)
#   3. COMPILE=1 only: ours vs ours + torch.compile (minutes of compilation)
#   4. the data path (workers 0-8) against the step's img/s, and the eval metrics, when their
#      packages are there
# Everything printed is also written to $OUT/gpu_bench.log (and JSON files beside it) when OUT is set.
#
#   bash benchmarks/gpu_bench.sh fetch-wheels   # here, once: wheels of what the device image lacks -> .whl/
#   bash benchmarks/gpu_bench.sh                # on the device (device tool: run with carry [".whl"])
#   bash benchmarks/gpu_bench.sh smoke          # here, on CPU: the same steps with the tiny preset
#   bash benchmarks/gpu_bench.sh selftest [ARGS] # on the device: benchmarks/gpu_selftest.py ARGS (its checks and
#                                               # exit status), after the same wheel install
#
# The device image has python3 with torch, accelerate, torchmetrics, scikit-image, safetensors,
# but not diffusers, lpips, kornia (nor datasets/torchdata/torch-fidelity for the data and eval parts),
# and no package index: those travel as wheels in .whl/ (git-ignored through .git/info/exclude).
set -uo pipefail  # no -e: a failing part must not lose the numbers of the others
cd "$(dirname "$0")/.."
MODE=${1:-gpu}

# Versions of the venv the project is tested in; py3.12 x86-64 wheels, as the device runs.
WHEELS="diffusers lpips kornia kornia_rs torchdata datasets dill multiprocess torch-fidelity"

if [ "$MODE" = "fetch-wheels" ]; then
    PY=${PYTHON:-.venv/bin/python}
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    specs=$($PY - $WHEELS <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{name}=={m.version(name)}" for name in sys.argv[1:]))
EOF
) || exit 1
    echo "fetching $specs"
    # shellcheck disable=SC2086
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl $specs || exit 1
    du -sh .whl && ls .whl
    exit 0
fi

if [ "$MODE" = "smoke" ]; then  # CPU, tiny preset: checks that every part runs end to end
    PY=${PYTHON:-.venv/bin/python}
    DEVICE=cpu PRESET=${PRESET:-tiny} RES=${RES:-32} PREC=${PREC:-no} BATCHES=${BATCHES:-2,4} CMP_BATCH=${CMP_BATCH:-2}
    SWEEP_STEPS="--warmup 1 --steps 1 --rounds 1" CMP_STEPS="--warmup 1 --steps 2 --rounds 2"
    DATA_ARGS="--num_images 16 --images 16 --workers 0,1 --resolution $RES --batch_size 4"
    EVAL_ARGS="--resolution 64 --batch_size 4 --batches 1 --rounds 1 --preset tiny --num_images 8"
    export HF_HUB_OFFLINE=1
elif [ "$MODE" = "gpu" ]; then
    PY=${PYTHON:-python3}
    DEVICE=cuda PRESET=${PRESET:-transfusion} RES=${RES:-256} PREC=${PREC:-bf16} BATCHES=${BATCHES:-8,16,32} CMP_BATCH=${CMP_BATCH:-16}
    SWEEP_STEPS="--warmup 3 --steps 10 --rounds 2" CMP_STEPS="--warmup 3 --steps 12 --rounds 3"
    DATA_ARGS="--num_images 200 --images 400 --workers 0,2,4,8 --resolution $RES --batch_size $CMP_BATCH"
    EVAL_ARGS="--device cuda --resolution $RES --batch_size 32 --batches 4 --rounds 2 --preset $PRESET --num_images 64"
elif [ "$MODE" = "selftest" ]; then
    PY=${PYTHON:-python3}
    DEVICE=cuda
else
    echo "usage: $0 [gpu|smoke|selftest|fetch-wheels]" >&2
    exit 2
fi

OUT_DIR=${OUT:-$(mktemp -d /tmp/gpu_bench.XXXX)}
exec > >(tee "$OUT_DIR/gpu_bench.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
section() { echo; echo "=== $1 ($(( $(date +%s) - START )) s)"; }

if ! $PY -c "import diffusers, lpips, kornia" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "installing .whl/ failed"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'EOF' || { echo "missing packages: run 'bash benchmarks/gpu_bench.sh fetch-wheels' where pip works and carry .whl"; exit 1; }
import importlib.metadata as m
import torch, diffusers, lpips, kornia, accelerate
print("python packages:", ", ".join(f"{n} {m.version(n)}" for n in ("torch", "diffusers", "lpips", "kornia", "accelerate")))
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
echo "$(nproc) CPUs; output in $OUT_DIR"
if [ "$MODE" = "selftest" ]; then
    $PY benchmarks/gpu_selftest.py "${@:2}" --json "$OUT_DIR/selftest.json"
    exit $?
fi

COMMON="--device $DEVICE --preset $PRESET --resolution $RES --mixed_precision $PREC"
section "1. our step, batch sizes $BATCHES"
# shellcheck disable=SC2086
$PY benchmarks/bench_train_step.py $COMMON --variants ours --batch_sizes "$BATCHES" $SWEEP_STEPS --json "$OUT_DIR/sweep.json"

section "2. ours vs the reference loop and the speed ideas, batch $CMP_BATCH"
# shellcheck disable=SC2086
$PY benchmarks/bench_train_step.py $COMMON --batch_size "$CMP_BATCH" --baseline reference $CMP_STEPS \
    --variants ours,reference,reference_alternating,ours_ref_lambda,ours_channels_last,ours_cudnn_benchmark,ours_foreach_adam \
    --json "$OUT_DIR/compare.json"

if [ "${COMPILE:-0}" = 1 ]; then
    section "3. torch.compile, batch $CMP_BATCH"
    # shellcheck disable=SC2086
    timeout 420 $PY benchmarks/bench_train_step.py $COMMON --batch_size "$CMP_BATCH" --baseline ours \
        --variants ours,ours_compile --warmup 2 --steps 8 --rounds 2 --json "$OUT_DIR/compile.json"
fi

section "4. data path and eval metrics"
if $PY -c "import datasets, torchdata" 2>/dev/null; then
    step_rate=$($PY -c "
import json, sys
runs = json.load(open('$OUT_DIR/sweep.json'))['runs']
print(next((r['rows'][0]['images_per_s'] for r in runs if r['batch_size'] == $CMP_BATCH), runs[0]['rows'][0]['images_per_s']))
" 2>/dev/null)
    # shellcheck disable=SC2086
    $PY benchmarks/bench_data.py $DATA_ARGS ${step_rate:+--step_images_per_s $step_rate}
    # shellcheck disable=SC2086
    $PY benchmarks/bench_eval.py $EVAL_ARGS
else
    echo "datasets/torchdata not importable: data and end-to-end eval skipped; metrics only"
    # shellcheck disable=SC2086
    $PY benchmarks/bench_eval.py $EVAL_ARGS --no-end_to_end
fi
section "done"
