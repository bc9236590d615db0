#!/bin/bash
# GPU checks and benchmarks of issue 8 (ABQ-LLM's bit-plane WpAq GEMM) and issue 7's last kernel shape, for the
# device tool (output to $OUT, else ./gpu_out; tuned configs to $OUT/autotune, merged into autotune_cache/):
#   bash benchmarks/gpu_session_issue8.sh run [ARGS]   # carry .whl: the bit-plane kernel tests on the GPU, then
#                                                      # bench_bitplane.py --precompile 16 ARGS
#   bash benchmarks/gpu_session_issue8.sh qoq          # carry .whl: bench_int8_gemms.py on 21760 -> 8192 (QQQ's
#                                                      # shape, QoQ's grid beside QQQ's), the shape issue 7 lacks
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune TRITON_CACHE_DIR=$PWD/out/triton_cache
nvidia-smi -L
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site
if [ "$1" = qoq ]; then
  timeout ${BENCH_TIMEOUT:-550} python benchmarks/bench_int8_gemms.py --shapes 21760x8192 2>&1 |
    tee $OUT/bench_int8_gemms.txt | grep -v "^{"
  exit
fi
TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider -rfE \
  --tb=short tests/test_kernels_bitplane_gemm.py > $OUT/kernel_tests.txt 2>&1
echo "kernel tests: rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.txt | tail -15
shift
timeout ${BENCH_TIMEOUT:-350} python benchmarks/bench_bitplane.py --precompile 16 --json $OUT/bench_bitplane.json "$@" 2>&1 |
  tee $OUT/bench_bitplane.txt | grep -v "^{"
