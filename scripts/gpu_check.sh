#!/usr/bin/env bash
# The GPU checks, as one run on an H100/H200 (device time is scarce: everything in one call).
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# 1. bf16 kernel correctness (`pytest -m gpu`), 2. the kernel benchmark at both shapes,
# 3. the end-to-end training benchmark beside eai-sparsify (from an array on the GPU and from a
# cache on local disk). Each writes its log / JSON lines under OUT_DIR; a step that fails or runs
# out of time does not stop the next one. eai-sparsify and its dependencies may come as wheels in
# .whl/ (see scripts/README.md); without them its rows print "skipped".
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"

echo "== pytest -m gpu"
timeout "${GPU_TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_kernels_triton.py tests/test_kernels_eager.py >"$out/pytest_gpu.log" 2>&1
echo "exit $?"; tail -n 15 "$out/pytest_gpu.log"

echo "== bench_kernels"
timeout "${KERNELS_S:-200}" python3 scripts/bench_kernels.py ${KERNELS_ARGS:-} \
  >"$out/bench_kernels.jsonl" 2>"$out/bench_kernels.err"
echo "exit $?"; cat "$out/bench_kernels.jsonl"; tail -n 5 "$out/bench_kernels.err"

echo "== bench_train"
timeout "${TRAIN_S:-240}" python3 scripts/bench_train.py --compare --steps 256 \
  --shape 768 --shape 4096 --feed array --feed cache ${TRAIN_ARGS:-} \
  >"$out/bench_train.jsonl" 2>"$out/bench_train.err"
echo "exit $?"; cat "$out/bench_train.jsonl"; tail -n 5 "$out/bench_train.err"
