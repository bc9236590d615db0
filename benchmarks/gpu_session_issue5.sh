#!/bin/bash
# GPU checks and benchmarks of issue 5 (KV cache), plus the Hadamard kernel tests left open by issue 4, for the
# device tool (output to $OUT, else ./gpu_out; tuned configs to $OUT/autotune, merged into autotune_cache/):
#   bash benchmarks/gpu_session_issue5.sh tests [hadamard kv]   # kernel tests on the GPU (full logs)
#   bash benchmarks/gpu_session_issue5.sh bench [--contexts 4096,32768,131072 ...]   # bench_kv_attention.py
#   bash benchmarks/gpu_session_issue5.sh profile B,context,format   # Nsight Compute on one tuned kernel launch
# The KV quality tables of the real model on the GPU, float32 (the model file travels in two carries, as in
# benchmarks/gpu_session_issue4.sh: run its `prepare` here once, then two calls back to back on one warm machine):
#   bash benchmarks/gpu_session_issue4.sh stage                            # carry .gguf_a
#   bash benchmarks/gpu_session_issue5.sh quality PPL_ROWS NEEDLE_ROWS     # carry .gguf_b .whl
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune
nvidia-smi -L
if [ "$1" = tests ]; then
  shift; for k in ${@:-hadamard kv}; do
    TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout 240 python -m pytest -q -p no:cacheprovider -rfE --tb=long \
      -k "kernels and $k" tests > $OUT/tests_$k.txt 2>&1
    echo "tests $k: rc $?"; tail -4 $OUT/tests_$k.txt
  done
elif [ "$1" = bench ]; then
  shift
  (cd benchmarks && timeout 420 python bench_kv_attention.py "$@") 2>&1 | tee $OUT/bench_kv.txt
elif [ "$1" = quality ]; then
  MODEL=/tmp/tquant_model
  cat $MODEL/part_a .gguf_b/part > $MODEL/smollm2.gguf || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.gguf_b:$PWD:/tmp/site TQUANT_AUTOTUNE=0  # Python 3.11's pydoc corpus; default configs
  cd benchmarks
  timeout 400 python quality_kv.py --device cuda --model $MODEL/smollm2.gguf --rows "$2" --batch 40 \
    --json $OUT/quality_kv.json 2>&1 | grep --line-buffered -v -i "warn\|it/s\]" | tee $OUT/quality_kv.txt
  timeout 150 python needle_kv.py --device cuda --model $MODEL/smollm2.gguf --rows "$3" --trials 6 \
    --json $OUT/needle_kv.json 2>&1 | grep --line-buffered -v -i "warn\|it/s\]" | tee $OUT/needle_kv.txt
elif [ "$1" = profile ]; then
  (cd benchmarks && timeout 240 ncu --profile-from-start off --kernel-name regex:_kv_attention_kernel \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    python bench_kv_attention.py --profile "$2") > $OUT/ncu_$2.txt 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Local|Block Size|Grid Size|Compute \(SM\)" $OUT/ncu_$2.txt
fi
