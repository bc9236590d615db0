# Sourced by the gpu_session_*.sh scripts on the device machine: output folder, tuning and Triton cache dirs, and the
# carried wheels (.whl: gguf, gemlite) installed into /tmp/site.
OUT=${OUT:-gpu_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TQUANT_AUTOTUNE_DIR=$OUT/autotune TRITON_CACHE_DIR=$PWD/out/triton_cache
nvidia-smi -L
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site
