#!/bin/bash
# GPU checks and benchmarks of issue 8 (ABQ-LLM's bit-plane WpAq GEMM) and issue 7's last kernel shape, for the
# device tool (output to $OUT, else ./gpu_out; tuned configs to $OUT/autotune, merged into autotune_cache/):
#   bash benchmarks/gpu_session_issue8.sh run [ARGS]   # (or "tests" / "bench ARGS" for one half) carry .whl (and .gguf_a to stage the model for a
#                                                      # gpu_session_issue4.sh quality call next): the bit-plane
#                                                      # kernel tests and the CUDA-only tests of speed and
#                                                      # decode on the GPU, then bench_bitplane.py ARGS
#   bash benchmarks/gpu_session_issue8.sh qoq          # carry .whl: bench_int8_gemms.py on 21760 -> 8192 (QQQ's
#                                                      # shape, QoQ's grid beside QQQ's), the shape issue 7 lacks
source benchmarks/gpu_env.sh
if [ "$1" = qoq ]; then
  timeout ${BENCH_TIMEOUT:-550} python benchmarks/bench_int8_gemms.py --shapes 21760x8192 2>&1 |
    tee $OUT/bench_int8_gemms.txt | grep -v "^{"
  exit
fi
# with .gguf_a carried, the model's first half is staged for a following gpu_session_issue4.sh quality call
[ -d .gguf_a ] && mkdir -p /tmp/tquant_model && cp .gguf_a/part /tmp/tquant_model/part_a
if [ "$1" != bench ]; then  # "tests": only the tests; "bench": only the benchmark; "run": both
# the GPU run of the kernel tests: every fixed case, each config, the A16 paths and the module (hypothesis's random
# shapes compile a kernel each and ran past the time on the GPU; they run in CI under the interpreter)
TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-120} python -m pytest -q -p no:cacheprovider -rfE \
  --tb=short tests/test_kernels_bitplane_gemm.py tests/test_kernels_bitplane_gemv.py tests/test_abq.py \
  -k "kernels and (every_gpu_config or int32 or decode_codes or issue or padding or a16_each or linear_triton or long_groups or pack_activations_kernel or popcount)" > $OUT/kernel_tests.txt 2>&1
echo "kernel tests: rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.txt | tail -15
# the tests the CPU skips: the speed report's CUDA path (issue 9) and the CUDA-graph decoder (issue 7)
TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout ${CUDA_TEST_TIMEOUT:-150} python -m pytest -q -p no:cacheprovider -rfE \
  --tb=short tests/test_speed.py tests/test_decode.py -k "cuda or graph_replay" > $OUT/cuda_tests.txt 2>&1
echo "CUDA-only tests: rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/cuda_tests.txt | tail -15
fi
[ "$1" = tests ] && exit
shift
# retune: the shipped bit-plane entries predate the "dense" and deep-K candidates
TQUANT_AUTOTUNE=retune timeout ${BENCH_TIMEOUT:-360} python benchmarks/bench_bitplane.py --precompile 16 --json $OUT/bench_bitplane.json "$@" 2>&1 |
  tee $OUT/bench_bitplane.txt | grep -v "^{"
