#!/usr/bin/env bash
# GPU smoke test, one line per check, in a few minutes, on a machine with the repository and no network:
#   references/gpu_smoke.sh [WHEEL_DIR]
# WHEEL_DIR: a folder of wheels made beforehand with `pip download pycocotools -d WHEEL_DIR`, installed from when
# pycocotools is missing. The data is generated (a Penn-Fudan-layout folder, as the tests make it); the model starts
# from random weights (--weights none). Checks: 30 training steps with fp16 autocast and loss scaling, 30 with bf16,
# --resume, --test-only evaluation, predict.py (also in batches of 4), --accumulate 2 with --ema under fp16,
# --device cuda:1 and 2-process torchrun runs (with 2+ GPUs; one accumulating, so that DDP's no_sync runs).
# Exit status: the number of failed checks. Logs stay in the printed work folder.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-}
WORK=$(mktemp -d -t gpu_smoke.XXXXXX)
PY=${PYTHON:-python}
failures=0

check() {  # check NAME COMMAND...: run it, print PASS/FAIL with its time; a failure shows the log's tail
    local name=$1 start=$SECONDS
    shift
    if "$@" >"$WORK/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s)"
    else
        echo "FAIL $name ($((SECONDS - start)) s), log $WORK/$name.log:"
        tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
        failures=$((failures + 1))
    fi
}

steps_were() {  # steps_were RUN_DIR N: the last epoch in log.jsonl ran N steps, every loss finite
    $PY - "$1/log.jsonl" "$2" <<'EOF'
import json, math, sys
epochs = [json.loads(line) for line in open(sys.argv[1]) if '"train"' in line]
train = epochs[-1]["train"]
assert train["steps"] == int(sys.argv[2]), f"{train['steps']} steps, expected {sys.argv[2]}"
assert all(math.isfinite(v) for k, v in train.items() if k.startswith("loss")), train
print({k: round(v, 4) for k, v in train.items() if k.startswith("loss")})
EOF
}

GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [[ $GPUS -lt 1 ]]; then
    echo "FAIL cuda: torch sees no CUDA GPU ($($PY -c 'import torch; print(torch.__version__)' 2>&1))"
    exit 1
fi
echo "work folder $WORK; $GPUS GPU(s): $($PY -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"

if ! $PY -c "import pycocotools" 2>/dev/null; then
    if [[ -z $WHEELS ]]; then
        echo "FAIL pycocotools: not installed; pass a wheel folder made with: pip download pycocotools -d DIR"
        exit 1
    fi
    check install_pycocotools $PY -m pip install --no-index --find-links "$WHEELS" pycocotools
fi

# 64 images, 4 held out: 60 training images = 30 steps of batch 2
check make_data $PY -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_pennfudan; \
make_pennfudan('$WORK/pf', num_images=64, sizes=((240, 320), (300, 200)))"
COMMON=(--data-path "$WORK/pf" --val-size 4 --weights none --model maskrcnn_resnet50_fpn --min-size 320
    --max-size 480 -b 2 -j 2 --print-freq 10 --report-images 1 --aspect-ratio-group-factor -1)

check train_fp16 $PY train.py "${COMMON[@]}" --epochs 1 --amp-dtype fp16 --output-dir "$WORK/fp16"
check fp16_30_steps steps_were "$WORK/fp16" 30
check train_bf16 $PY train.py "${COMMON[@]}" --epochs 1 --amp-dtype bf16 --output-dir "$WORK/bf16"
check bf16_30_steps steps_were "$WORK/bf16" 30
check resume $PY train.py "${COMMON[@]}" --epochs 2 --amp-dtype fp16 --output-dir "$WORK/fp16" --resume auto
check resume_continued grep -q "Resumed from .*continuing at epoch 1" "$WORK/resume.log"
check evaluate $PY train.py "${COMMON[@]}" --test-only --resume "$WORK/fp16/checkpoint.pth" --output-dir "$WORK/eval"
check evaluate_scored grep -q "IoU metric: segm" "$WORK/evaluate.log"
check predict $PY predict.py --checkpoint "$WORK/fp16/checkpoint.pth" "$WORK/pf/PNGImages" --out "$WORK/pred" \
    --score-thresh 0.0 --device cuda
check predict_wrote test -s "$WORK/pred/results.json"
check predict_batch_4 $PY predict.py --checkpoint "$WORK/fp16/checkpoint.pth" "$WORK/pf/PNGImages" --out "$WORK/pred4" \
    --score-thresh 0.0 --device cuda --batch-size 4
check accumulate_ema $PY train.py "${COMMON[@]}" --epochs 1 --amp-dtype fp16 --accumulate 2 --ema 0.99 \
    --output-dir "$WORK/acc"
check accumulate_30_batches steps_were "$WORK/acc" 30
if [[ $GPUS -ge 2 ]]; then
    check device_cuda1 $PY train.py "${COMMON[@]}" --epochs 1 --device cuda:1 --output-dir "$WORK/cuda1"
    check torchrun_2_gpus $PY -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${COMMON[@]}" \
        --epochs 1 --output-dir "$WORK/ddp"
    check torchrun_15_steps steps_were "$WORK/ddp" 15  # 60 images over 2 processes of batch 2
    check torchrun_accumulate $PY -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${COMMON[@]}" \
        --epochs 1 --accumulate 2 --output-dir "$WORK/ddp_acc"
    check torchrun_accumulate_15_batches steps_were "$WORK/ddp_acc" 15
else
    echo "SKIP device_cuda1, torchrun_2_gpus: one GPU"
fi
echo "$failures failed; logs in $WORK"
exit "$failures"
