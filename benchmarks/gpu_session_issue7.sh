#!/bin/bash
# GPU checks and benchmarks of issue 7 (QoQ, W4A8KV4) for the device tool, two calls back to back on one warm
# machine (output to $OUT, else ./gpu_out; tuned configs to $OUT/autotune, merged into autotune_cache/):
#   bash benchmarks/gpu_session_issue7.sh run [ARGS]   # carry .gguf_a .whl: stages the model's first half, installs
#                                                      # the wheels (gemlite, a peer), runs the W4A8
#                                                      # kernel tests (zero points included) on the GPU, then
#                                                      # bench_int8_gemms.py ARGS (QoQ's grid beside QQQ's)
#   bash benchmarks/gpu_session_issue4.sh quality qoq-rtn-g64,qoq-yx-g64,... --decode-from 511
#                                                      # carry .gguf_b .whl: the ablation rows on the GPU
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune TRITON_CACHE_DIR=$PWD/out/triton_cache
nvidia-smi -L
[ -d .gguf_a ] && mkdir -p /tmp/tquant_model && cp .gguf_a/part /tmp/tquant_model/part_a
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site
TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider -rfE \
  --tb=short tests/test_kernels_w4a8.py tests/test_kernels_act_quant_linear.py > $OUT/kernel_tests.txt 2>&1
echo "kernel tests: rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.txt | tail -15
shift
timeout ${BENCH_TIMEOUT:-330} python benchmarks/bench_int8_gemms.py "$@" 2>&1 | tee $OUT/bench_int8_gemms.txt | grep -v "^{"
