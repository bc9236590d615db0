#!/bin/bash
# Every GPU check and benchmark of issue 3's session, in two calls of the device tool:
#   bash benchmarks/gpu_session_issue3.sh checks    # kernel tests on the GPU + model-level checks per method
#   bash benchmarks/gpu_session_issue3.sh bench     # bench_int8_gemms.py on all shapes
# Output goes to $OUT (device tool) or ./gpu_out.
set -x
OUT=${OUT:-gpu_out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH
export PYTHONUNBUFFERED=1
if [ "$1" = checks ]; then
  TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 python -m pytest -q -x -k "kernels and (act_quant or w8a8 or w4a8 or w4a4 or act_quant_linear)" tests 2>&1 | tail -15 | tee $OUT/kernel_tests.txt
  for spec in 'smoothquant {"alpha":0.5}' 'smoothquant {"alpha":0.5,"act_static":true}' \
              'zeroquant {"bits":8,"mlp_bits":4,"group_size":128,"lkd":true,"lkd_steps":20}' \
              'qqq {"group_size":128,"smooth_grid":10}' 'qqq {"group_size":-1,"act_bits":4,"smooth_grid":10}'; do
    set -- $spec
    python benchmarks/gpu_checks.py --layers 2 --method $1 --options "$2" 2>&1 | grep -v Warning
  done | tee $OUT/gpu_checks.txt
else
  python benchmarks/bench_int8_gemms.py --shapes ${SHAPES:-4096x14336,14336x4096,21760x8192} --json $OUT/bench.json 2>&1 | tee $OUT/bench.txt
fi
