#!/bin/bash
# The GPU checks in one go, sized for a few minutes on an H100/H200: the teacher and training
# benchmarks (results in benchmarks/results/), a float16 build and fit as a T4 runs them (the student
# loaded back on the GPU in a fresh process), and a two-rank `accelerate launch` build on the GPUs
# there are (two ranks share one GPU), verified. Every step's output goes to $OUT/log.txt; a step
# that fails or runs out of its time does not stop the next.
#   OUT=/tmp/check PY=python3 bash benchmarks/gpu_check.sh
set -u
PY=${PY:-python3}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/log.txt
T0=$SECONDS
stage() { echo "=== $1 at $((SECONDS - T0)) s" | tee -a "$LOG"; }
run() { local limit=$1; shift; timeout "$limit" "$@" >> "$LOG" 2>&1; echo "rc=$? ($*)" >> "$LOG"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, accelerate, zarr; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'zarr', zarr.__version__, 'cc', \
torch.cuda.get_device_capability())"; } >> "$LOG" 2>&1

stage "benchmarks: teacher"
run 240 $PY -m benchmarks.run --profile gpu --only teacher
stage "benchmarks: training"
run 240 $PY -m benchmarks.run --profile gpu --only training --set online_steps=0
cp benchmarks/results/bench-gpu-*"$(date +%F)"* "$OUT"/ 2>/dev/null

D=$OUT/small
stage "float16 build and fit (T4 style)"
run 60 $PY -m featurestore demo-data "$D/images" --per-class 12
run 60 $PY -m featurestore build --images "$D/images" --out "$D/fp16.zarr" --teacher random:tiny --views 4 \
    --dtype float16 --workers 8
run 60 $PY -m trainer fit --store "$D/fp16.zarr" --out "$D/fp16-run" --student shufflenet_v2_x0_5 --image-size 112 \
    --mixed-precision fp16 --steps 30
run 60 $PY -c "import torch; m = torch.jit.load('$D/fp16-run/student.pt', map_location='cuda'); \
print('student.pt on cuda:', tuple(m(torch.rand(2, 3, 112, 112, device='cuda')).shape))"

stage "two-rank accelerate build"
run 90 accelerate launch --multi_gpu --num_processes 2 -m featurestore build --images "$D/images" --out "$D/r2.zarr" \
    --teacher random:medsiglip-448 --views 4 --patch-grid 8 --workers 4 --no-compile
run 40 $PY -m featurestore verify "$D/r2.zarr"
rm -rf "$D"
stage "end"
