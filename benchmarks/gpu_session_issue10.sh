#!/bin/bash
# GPU runs of issue 10 (end-to-end speed), for the device tool (output to $OUT, else ./gpu_out; tuned configs to
# $OUT/autotune, merge them into autotune_cache/). Carry .whl (gemlite's wheel for the peer: `pip wheel --no-deps
# gemlite==0.6.0.post2 gguf==0.19.0 -w .whl` where PyPI is reachable). Each call fits the tool's 600 s; fp16 runs
# in every e2e call, so each call's ratios are against the fp16 of the same run:
#   bash benchmarks/gpu_session_issue10.sh tests                  # the decode step's kernels and the CUDA-only tests
#   bash benchmarks/gpu_session_issue10.sh e2e VARIANTS [ARGS]    # benchmarks/e2e.py --variants fp16,VARIANTS
#       e.g. e2e gptq-w4a16,gemlite-a16w4,fp16-kv4,fp16-kivi2 --tune --profile   then
#            e2e qqq-w4a8,qoq-w4a8,qoq-w4a8kv4,smoothquant-w8a8 --tune --profile   then   e2e quip#-2 --tune --profile
# Merge the calls' JSON and draw the plot here: python benchmarks/e2e.py --merge gpu_out/e2e_*.json --plot PNG
source benchmarks/gpu_env.sh
if [ "$1" = tests ]; then
  TQUANT_AUTOTUNE=0 TRITON_INTERPRET=0 timeout ${TEST_TIMEOUT:-300} python -m pytest -q -p no:cacheprovider -rfE --tb=short \
    tests/test_kernels_decoder_ops.py tests/test_tune.py tests/test_speed.py tests/test_decode.py \
    -k "decoder_ops or fused or cuda or graph_replay or tune_model" 2>&1 | tail -20 | tee $OUT/cuda_tests.txt
elif [ "$1" = e2e ]; then
  tag=${2//[^a-z0-9-]/_}; variants=fp16,$2; shift 2
  timeout ${E2E_TIMEOUT:-560} python benchmarks/e2e.py --variants "$variants" --json $OUT/e2e_$tag.json "$@" 2>&1 |
    grep -v -i warn | tee $OUT/e2e_$tag.txt
fi
