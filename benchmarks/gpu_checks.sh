#!/usr/bin/env bash
# MEM's GPU checks in one run of about 8 minutes at most on a CUDA host:
#
#     bash benchmarks/gpu_checks.sh                                  # results in $OUT, default runs/gpu_checks
#     OFFICIAL=/path/to/Multimodal-Unlearnable-Examples bash benchmarks/gpu_checks.sh   # with the speed step
#
# The host needs torch with CUDA, numpy, Pillow, safetensors and pytest (a GPU image has them; nothing is
# downloaded): this package is installed without its dependencies into a scratch folder (or, if pip cannot
# build it there, laid out as its namespace with links to the stage folders). Then, each step under
# its own time limit so that the whole run ends in time: the CUDA tests (tests/test_mem_cuda.py), the jobs under
# torchrun over NCCL (tests/test_distributed_cuda.py, 150 s at most), and, when
# OFFICIAL names a checkout of the official code (git clone, see benchmarks/mem_official.py), the official code
# against ours on the GPU phase by phase, with each side's peak GPU memory (benchmarks/mem_official.py --device
# cuda: RN50 at 224 px, float32). What comes back is small on purpose (two files, for hosts that return few):
# steps.txt (GPU, versions, each step's exit status and time) and gpu_checks.tar.gz (every log and result file).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-runs/gpu_checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "${OFFICIAL:-}" ]; then OFFICIAL=$(cd "$OFFICIAL" && pwd) || exit 1; fi
WORK="$OUT/work"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
pack() { tar czf "$OUT/gpu_checks.tar.gz" -C "$WORK" . && rm -rf "$WORK"; }
trap pack EXIT

SITE=$(mktemp -d)
if ! timeout -k 5 120 $PY -m pip install -q --no-deps --no-build-isolation --no-index --ignore-requires-python \
        --target "$SITE" . > "$WORK/install.log" 2>&1; then
    echo "pip could not install the package (install.log); laying out the aigis namespace by links" \
        | tee -a "$OUT/steps.txt"
    rm -rf "$SITE" && mkdir -p "$SITE/aigis"
    cp -r aigis/. "$SITE/aigis/"
    for stage in training export serving client protection; do ln -s "$REPO/$stage" "$SITE/aigis/$stage"; done
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Run from outside the checkout: its top-level aigis/ folder holds only part of the namespace (the stage folders
# install beside it), and `python -m` puts the current folder first on the import path.
cd "$WORK"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PY -c "import numpy, torch, PIL, safetensors, pytest, aigis.protection.mem as mem; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'aigis from', mem.__file__, \
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} | tee -a "$OUT/steps.txt"

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to NAME.log, record the exit status
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    status=$?
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    tail -3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$OUT/steps.txt"
}

step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_mem_cuda.py"
# `aigis train` and `aigis protect` under torchrun on the GPU(s): NCCL, a process per GPU (min(GPUs, 2)), a protection
# job killed and resumed; training needs peft and scikit-image and skips, saying so, where the image lacks them.
step torchrun_cuda 150 $PY -m pytest -q -rs -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_distributed_cuda.py"
if [ -n "${OFFICIAL:-}" ]; then
    step speed_official 420 $PY "$REPO/benchmarks/mem_official.py" --device cuda --official "$OFFICIAL" \
        --images 32 --runs 3 --threads 4 --name "$WORK/mem_official_cuda"
else
    echo "speed_official: skipped (OFFICIAL names no checkout of the official code)" | tee -a "$OUT/steps.txt"
fi
