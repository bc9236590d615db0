#!/bin/bash
# GPU checks and benchmarks of issue 6 (BCQ / LUT-GEMM and SpQR) for the device tool, two calls back to back on one
# warm machine (output to $OUT, else ./gpu_out; tuned configs to $OUT/autotune, merged into autotune_cache/):
#   bash benchmarks/gpu_session_issue6.sh run [SHAPES]     # carry .gguf_a: stages the model's first half, runs the
#                                                          # kernel tests on the GPU, then bench_bcq_spqr.py
#   bash benchmarks/gpu_session_issue6.sh bench SHAPES [ARGS]  # bench_bcq_spqr.py alone (e.g. --kinds bcq)
#   bash benchmarks/gpu_session_issue4.sh quality ROW,ROW  # carry .gguf_b .whl: perplexity rows on the GPU
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune TRITON_CACHE_DIR=$PWD/out/triton_cache  # kept between calls
nvidia-smi -L
if [ "$1" = run ]; then
[ -d .gguf_a ] && mkdir -p /tmp/tquant_model && cp .gguf_a/part /tmp/tquant_model/part_a
TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout 220 python -m pytest -q -p no:cacheprovider -rfE --tb=short \
  ${TESTS:-tests/test_kernels_weight_only.py tests/test_kernels_bcq_matmul.py tests/test_kernels_spqr_matmul.py} \
  > $OUT/kernel_tests.txt 2>&1
echo "kernel tests: rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.txt | tail -15
fi
timeout ${BENCH_TIMEOUT:-370} python benchmarks/bench_bcq_spqr.py ${2:+--shapes $2} "${@:3}" 2>&1 | tee $OUT/bench_bcq_spqr.txt | grep -v "^{"
