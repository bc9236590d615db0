#!/bin/bash
# GPU checks and benchmarks of issue 7 (QoQ, W4A8KV4) for the device tool (output to $OUT, else ./gpu_out; tuned
# configs to $OUT/autotune, merged into autotune_cache/):
#   bash benchmarks/gpu_session_issue7.sh run [ARGS]   # carry .gguf_a .whl: stages the model's first half, installs
#                                                      # the wheels (gemlite, a peer), runs the W4A8 kernel tests
#                                                      # (zero points included) on the GPU, then
#                                                      # bench_int8_gemms.py ARGS (QoQ's grid beside QQQ's)
#   bash benchmarks/gpu_session_issue4.sh quality qoq-rtn-g64,qoq-yx-g64,... --decode-from 511
#                                                      # carry .gguf_b .whl, right after run: the ablation rows
#   bash benchmarks/gpu_session_issue7.sh e2e [ARGS]   # the static decoder's GPU tests (CUDA-graph replay, the
#                                                      # length-bounded KV4 kernel), then benchmarks/e2e.py ARGS
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune TRITON_CACHE_DIR=$PWD/out/triton_cache
nvidia-smi -L
if [ "$1" = e2e ]; then
  TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-150} python -m pytest -q -p no:cacheprovider -rfE \
    --tb=short tests/test_decode.py tests/test_kernels_kv_attention.py -k "kernels and (graph or static or inside)" \
    > $OUT/kernel_tests.txt 2>&1
  echo "kernel tests: rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.txt | tail -15
  shift
  TQUANT_AUTOTUNE=0 timeout ${BENCH_TIMEOUT:-380} python benchmarks/e2e.py --json $OUT/e2e.json "$@" 2>&1 |
    grep -v -i warn | tee $OUT/e2e.txt
  exit
fi
[ -d .gguf_a ] && mkdir -p /tmp/tquant_model && cp .gguf_a/part /tmp/tquant_model/part_a
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site
TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider -rfE \
  --tb=short tests/test_kernels_w4a8.py tests/test_kernels_act_quant_linear.py > $OUT/kernel_tests.txt 2>&1
echo "kernel tests: rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.txt | tail -15
shift
timeout ${BENCH_TIMEOUT:-330} python benchmarks/bench_int8_gemms.py "$@" 2>&1 | tee $OUT/bench_int8_gemms.txt | grep -v "^{"
