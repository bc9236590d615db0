#!/bin/bash
# Every GPU check and benchmark of issue 4 (QuIP#), in two calls of the device tool:
#   bash benchmarks/gpu_session_issue4.sh checks   # kernel tests on the GPU + model-level checks of quip#
#   bash benchmarks/gpu_session_issue4.sh bench [bench_hadamard,bench_e8p,bench_quip_linear]   # benchmarks
# Output goes to $OUT (device tool) or ./gpu_out; tuned configs to $OUT/autotune (merged into autotune_cache/).
set -x
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune
if [ "$1" = checks ]; then
  TRITON_INTERPRET=0 TQUANT_AUTOTUNE=0 timeout 300 python -m pytest -q -x -p no:cacheprovider \
    -k "kernels and (hadamard or e8p or quip)" tests 2>&1 | tail -25 | tee $OUT/kernel_tests.txt
  for spec in '{"bits":2}' '{"bits":4,"ft_epochs":1}'; do
    timeout 200 python benchmarks/gpu_checks.py --layers 2 --inter 6144 --method quip# --options "$spec" 2>&1 | grep -v Warning
  done | tee $OUT/gpu_checks.txt
else
  BENCHES=${2:-bench_hadamard,bench_e8p,bench_quip_linear} python - <<'PY' 2>&1 | tee $OUT/bench.txt
import importlib, os, sys; sys.path.insert(0, "benchmarks")
for mod in [importlib.import_module(name) for name in os.environ["BENCHES"].split(",")]:
    print(f"## {mod.__name__}", flush=True)
    try:
        mod.run()
    except Exception as e:  # keep the other benchmarks' numbers
        print(f"{mod.__name__} failed: {type(e).__name__}: {e}", flush=True)
PY
fi
