#!/usr/bin/env bash
# The GPU checks, as one run on an H100/H200 (device time is scarce: everything in one call).
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# 1. bf16 kernel correctness (`pytest -m gpu`); 2. the end-to-end training benchmark beside
# eai-sparsify from an array on the GPU at both shapes of issue 16; 3. the kernel benchmark;
# 4. the end-to-end benchmark fed from a cache on local disk. Each writes its log or JSON lines
# under OUT_DIR; a step that fails or runs out of time does not stop the next one.
# eai-sparsify and its dependencies may come as wheels in .whl/ (kernels/README.md); without
# them its rows print "skipped".
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS FILE COMMAND...
  local name=$1 seconds=$2 file=$3
  shift 3
  echo "== $name"
  echo "== $name" >>"$out/errors.log"
  timeout "$seconds" "$@" >"$out/$file" 2>>"$out/errors.log"
  echo "exit $?"
  grep -v '^{' "$out/$file" | tail -n 12
  grep '^{' "$out/$file" || true
  tail -n 3 "$out/errors.log"
}
step pytest_gpu "${GPU_TEST_S:-120}" pytest_gpu.log \
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton.py
step train_array "${TRAIN_S:-170}" bench_train_array.jsonl \
  python3 scripts/bench_train.py --steps 256 --shape 768 --shape 4096 --feed array \
  --library saekit --library saekit-bare --library eai-sparsify
step kernels "${KERNELS_S:-200}" bench_kernels.jsonl python3 scripts/bench_kernels.py
step train_cache "${CACHE_S:-60}" bench_train_cache.jsonl \
  python3 scripts/bench_train.py --steps 256 --shape 768 --feed cache \
  --library saekit --library eai-sparsify
