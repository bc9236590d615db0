"""Pick the fastest launch config per (kernel, shape key) once per GPU, and remember it in JSON.

    config = tune(kernel, key, configs, run, device)   # run(config) launches the kernel once

Lookup: memory, then the user file, then the shipped file; a miss benchmarks every candidate in CUDA
graphs with the L2 flushed before each call (benchmark; candidates that fail to compile or launch are
skipped), keeps the fastest and adds it to the user file.
    shipped file:  <repo>/autotune_cache/<gpu>.json (installed as tquant/autotune_cache/<gpu>.json)
    user file:     $TQUANT_AUTOTUNE_DIR/<gpu>.json, default ~/.cache/tquant/autotune/<gpu>.json
    format:        {"format": 1, "gpu": "<gpu>", "entries": {"<kernel>|<key>": {"config": {...}, "us": t}}}
                   (t: the tuner's median in us, GPU time with the L2 flushed before each call)
A file for another GPU, a malformed file, or an entry whose config is not among the current candidates
(stale after a code change) is ignored, and the key is tuned again.
Without benchmarking (one candidate, TQUANT_AUTOTUNE=0, or inside CUDA-graph capture) an uncached key
gets configs[0], so list the safest default first. TQUANT_AUTOTUNE=retune skips both files (each key is tuned again
on its first use in the process and the user file rewritten): after new candidates join a kernel, or to re-measure.
TQUANT_AUTOTUNE_LOG=1 prints every timed candidate of each key tuned (fastest first) to stderr: the file keeps
only the winner.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .runtime import device_name

FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[1]
# installed: tquant/autotune_cache/ (package data); source checkout: <repo>/autotune_cache/
SHIPPED_DIR = next((d for d in (_PACKAGE / "autotune_cache", _PACKAGE.parent / "autotune_cache") if d.is_dir()),
                   _PACKAGE.parent / "autotune_cache")

_memory: dict[str, dict[str, dict]] = {}  # gpu -> {entry key -> entry}
_chosen: dict[tuple[str, str], dict] = {}  # (gpu, entry key) -> config, the per-call fast path


def user_dir() -> Path:
    return Path(os.environ.get("TQUANT_AUTOTUNE_DIR", Path.home() / ".cache" / "tquant" / "autotune"))


def entry_key(kernel: str, key: dict[str, Any]) -> str:
    return kernel + "|" + ",".join(f"{k}={v}" for k, v in key.items())


def read_entries(path: Path, gpu: str) -> dict[str, dict]:
    """Entries of one cache file; {} if it is missing, malformed or written for another GPU."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring unreadable autotune cache {path}: {err}")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("gpu") != gpu:
        warnings.warn(f"ignoring autotune cache {path}: not format {FORMAT} for {gpu}")
        return {}
    entries = data.get("entries")
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def write_entry(path: Path, gpu: str, name: str, entry: dict) -> None:
    """Add one entry to a cache file (merging with what is there), atomically."""
    entries = read_entries(path, gpu)
    entries[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "gpu": gpu, "entries": dict(sorted(entries.items()))}, indent=1)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text + "\n")
    os.replace(f.name, path)


def _entries(gpu: str) -> dict[str, dict]:
    if gpu not in _memory:
        shipped, user = read_entries(SHIPPED_DIR / f"{gpu}.json", gpu), read_entries(user_dir() / f"{gpu}.json", gpu)
        _memory[gpu] = {**shipped, **user}
    return _memory[gpu]


def clear_chosen() -> None:
    """Forget this process's chosen configs, so that the next call of each key looks up (or, with
    TQUANT_AUTOTUNE=retune, tunes) again."""
    _chosen.clear()


def cached_config(gpu: str, name: str, configs: list[dict]) -> dict | None:
    """The cached config for an entry if it is one of the current candidates, else None."""
    entry = _entries(gpu).get(name)
    config = entry.get("config") if entry else None
    return next((c for c in configs if c == config), None)


def benchmark(configs: list[dict], run: Callable[[dict], Any], desc: str = "autotune") -> list[tuple[float, dict]]:
    """[(median time in us, config)], fastest first; configs that raise are left out. GPU time alone:
    CUDA graphs of reps x (L2 flush, run) minus reps x (L2 flush), so the host's launch overhead (larger
    than microsecond kernels, and what eager timing of them mostly measures) does not decide. The flush
    reads twice the L2's size (a sum), leaving no dirty lines for the timed call to write back. A progress bar
    (desc) shows the candidates: compiling each takes seconds, so a first tuning on a new GPU is not silent."""
    flush = torch.empty(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size // 2,
                        dtype=torch.int32, device="cuda")
    base = _graph_us(flush.sum)
    timed, error = [], None
    for config in tqdm(configs, desc=desc, unit="config", leave=False):
        try:
            run(config)  # compiles; the first split-K call also allocates its counters outside capture
            us = _graph_us(lambda: (flush.sum(), run(config))) - base
        except Exception as err:  # a config the GPU cannot run (too much shared memory, too many registers)
            error = err
            continue
        timed.append((us, config))
    if not timed:
        raise RuntimeError(f"{desc}: none of the {len(configs)} candidate configs could be launched on this GPU (last "
                           f"error: {type(error).__name__}: {error}); this kernel does not support this GPU or shape")
    return rank(timed, lambda config: _graph_us(lambda: run(config)))


def rank(timed: list[tuple[float, dict]], warm_us: Callable[[dict], float]) -> list[tuple[float, dict]]:
    """timed [(us with the L2 flushed, minus the flush; config)], fastest first. Where the fastest comes out at or
    below zero the kernel is shorter than the flush's run-to-run noise (its data fits in the L2, e.g. a 4096 x 4096
    4-bit weight), so that order is noise: every config is
    ranked by warm_us(config) instead, its time with a warm L2."""
    timed = sorted(timed, key=lambda t: t[0])
    if timed[0][0] <= 0:
        timed = sorted(((warm_us(config), config) for _, config in timed), key=lambda t: t[0])
    return timed


def _graph_us(fn: Callable[[], Any], reps: int = 20, samples: int = 7) -> float:
    """Median time of one fn() in us, replaying a CUDA graph of reps calls."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[samples // 2]


def tune(kernel: str, key: dict[str, Any], configs: list[dict], run: Callable[[dict], Any],
         device: torch.device) -> dict:
    gpu = device_name(device)
    name = entry_key(kernel, key)
    config = _chosen.get((gpu, name))
    if config is not None:
        return config
    config = cached_config(gpu, name, configs) if os.environ.get("TQUANT_AUTOTUNE") != "retune" else None
    if config is not None:
        _chosen[gpu, name] = config
        return config
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if len(configs) == 1 or os.environ.get("TQUANT_AUTOTUNE") == "0" or capturing:
        return configs[0]
    ranked = benchmark(configs, run, desc=f"autotune {name} (once per GPU)")
    if os.environ.get("TQUANT_AUTOTUNE_LOG"):  # every candidate's time, not only the winner's the file keeps
        for us, config in ranked:
            print(f"autotune {name}: {us:.2f} us {config}", file=sys.stderr)
    us, config = ranked[0]
    entry = {"config": config, "us": round(us, 2)}
    _entries(gpu)[name] = entry
    _chosen[gpu, name] = config
    try:
        write_entry(user_dir() / f"{gpu}.json", gpu, name, entry)
    except OSError as err:
        warnings.warn(f"could not save autotune result: {err}")
    return config
