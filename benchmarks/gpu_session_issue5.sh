#!/bin/bash
# GPU checks and benchmarks of issue 5 (KV cache), plus the Hadamard kernel tests left open by issue 4, for the
# device tool (output to $OUT, else ./gpu_out; tuned configs to $OUT/autotune, merged into autotune_cache/):
#   bash benchmarks/gpu_session_issue5.sh tests    # kernel tests on the GPU: Hadamard, KV attention (full logs)
#   bash benchmarks/gpu_session_issue5.sh bench [--contexts 4096,32768,131072 ...]   # bench_kv_attention.py
#   bash benchmarks/gpu_session_issue5.sh profile B,context,bits   # Nsight Compute on one tuned kernel launch
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune
nvidia-smi -L
if [ "$1" = tests ]; then
  for k in hadamard kv; do
    TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout 240 python -m pytest -q -p no:cacheprovider -rfE --tb=long \
      -k "kernels and $k" tests > $OUT/tests_$k.txt 2>&1
    echo "tests $k: rc $?"; tail -4 $OUT/tests_$k.txt
  done
elif [ "$1" = bench ]; then
  shift
  (cd benchmarks && timeout 420 python bench_kv_attention.py "$@") 2>&1 | tee $OUT/bench_kv.txt
elif [ "$1" = profile ]; then
  (cd benchmarks && timeout 240 ncu --profile-from-start off --kernel-name regex:_kv_attention_kernel \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    python bench_kv_attention.py --profile "$2") > $OUT/ncu_$2.txt 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Local|Block Size|Grid Size|Compute \(SM\)" $OUT/ncu_$2.txt
fi
