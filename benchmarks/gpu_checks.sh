#!/usr/bin/env bash
# MEM's GPU checks (issue 4) in one run of under 10 minutes on a CUDA host, e.g. through the device tool:
#
#     bash benchmarks/gpu_checks.sh          # results in $OUT, default runs/gpu_checks
#
# The host needs torch with CUDA, numpy, Pillow, safetensors and pytest (a GPU image has them; nothing is
# downloaded): this package is installed without its dependencies into a scratch folder. Then, each step under
# its own time limit so that the whole run ends in time: the CUDA tests (tests/test_mem_cuda.py), and the speed
# of ours against the official way on the GPU, with GPU memory -- rn_tiny with one caption per image, the
# paper's RN50 at 224 px on Flickr8K's share, and COCO's share with photo-sized JPEGs. What comes back is small
# on purpose (a device run returns at most 8 files): steps.txt (GPU, versions, each step's exit status and
# time) and gpu_checks.tar.gz (every log and result file).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-runs/gpu_checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/work"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
pack() { tar czf "$OUT/gpu_checks.tar.gz" -C "$WORK" . && rm -rf "$WORK"; }
trap pack EXIT

SITE=$(mktemp -d)
if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . > "$WORK/install.log" 2>&1; then
    echo "installing the package failed:" | tee -a "$OUT/steps.txt"
    tail -20 "$WORK/install.log" | tee -a "$OUT/steps.txt"
    exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Run from outside the checkout: its top-level aigis/ folder holds only part of the namespace (the stage folders
# install beside it), and `python -m` puts the current folder first on the import path.
cd "$WORK"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PY -c "import numpy, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, \
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} | tee -a "$OUT/steps.txt"

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to NAME.log, record the exit status
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    status=$?
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    tail -3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$OUT/steps.txt"
}

step cuda_tests 150 $PY -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_mem_cuda.py"
step speed_rn_tiny 80 $PY "$REPO/benchmarks/mem_speed.py" --device cuda --pairs 512 --batch 128 \
    --name "$WORK/mem_speed_cuda_rn_tiny_512"
step speed_rn50 150 $PY "$REPO/benchmarks/mem_speed.py" --device cuda --clip RN50 --size 224 --captions-per-image 5 \
    --pairs 256 --batch 128 --clip-vocab --paper-schedule flickr8k --source-size 500x375 --outer 3 \
    --name "$WORK/mem_speed_cuda_schedule_flickr8k_rn50_224"
step speed_coco 190 $PY "$REPO/benchmarks/mem_speed.py" --device cuda --captions-per-image 5 --pairs 896 --batch 128 \
    --clip-vocab --paper-schedule coco --source-size 640x480 --outer 4 \
    --name "$WORK/mem_speed_cuda_schedule_coco_896"
