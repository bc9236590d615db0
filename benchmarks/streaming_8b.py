"""Issue 28's 8B measurement: streaming GPTQ (tquant.quantize_to_disk) of a random model of Llama-3-8B's shapes on one
GPU, with quantize time, time per block, peak GPU memory and peak host memory.

    python benchmarks/streaming_8b.py --folder /tmp/llama3-8b-random --device cuda --budget 560 \\
        --json $OUT/streaming_8b.json
    (the same command again on the same machine continues a stopped quantization: --resume of quantize_to_disk)

Steps, each skipped when done:
  1. write   a random model of the shape below as bf16 safetensors shards (--shard-size, 2 GB) in --folder: one
             tensor at a time drawn on --device (normal(0, 0.02); norms 1), a shard written as soon as it is full,
             so host memory holds one shard; config.json, then the index last (its presence = the model is whole).
             8.03 B parameters, 16.1 GB (15.0 GiB) on disk for the 8B shape.
  2. quantize  in a fresh process: tquant.quantize_to_disk(folder, out, "gptq", bits=4, group_size=128, calib=128 x
             2048 random token ids (seed 0), device=--device), resuming the run stopped in `out` when there is
             one. The process stops itself after the block that would let the next one end past --budget seconds
             (counted from the script's start; the machine's call limit is 10 minutes) or after --max-blocks blocks;
             the record says "finished": false, and the same command continues.
Each call adds a row to `out`.record.json and writes the whole record to --json: per call its wall time, blocks done
and seconds per block (the first includes building the skeleton, reading the embeddings and running the calibration
through them; a resumed call's first, reading the stopped run's states), torch.cuda.max_memory_allocated / reserved,
and the process's peak resident set (VmHWM: file pages of mapped shards included); in total the quantize seconds of
all calls and the largest peaks.

"One block's needs" (printed, and in the record), the GPU memory a block cannot do without, as issue 28 counts it:
  the block's weights in bf16 (q, k, v, o, gate, up, down, two norms)
  + the GPTQ Hessians in fp32, one per input group (q/k/v share one of hidden^2, o one of hidden^2, gate/up one of
    hidden^2, down one of intermediate^2)
  + the calibration hidden states entering and leaving the block, bf16: 2 x samples x seqlen x hidden.
Llama-3-8B: 0.406 + 0.953 + 4.000 = 5.36 GiB, so issue 28's target is a peak under 8.15 GiB (+ 3 GB = 2.79 GiB).

Shape options (--layers, --hidden, --intermediate, --heads, --kv-heads, --vocab, --samples, --seqlen) default to
Llama-3-8B's and 128 x 2048; tests/test_streaming_8b.py runs the script end to end on the CPU at a tiny scale.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.streaming_memory import proc_status

GIB = 2**30


def llama_config(a):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=max(8192, a.seqlen),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor the model's checkpoint holds (transformers' own class built on meta)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def block_needs(a) -> dict[str, float]:
    """One block's needs in GiB (module docstring)."""
    kv = a.hidden // a.heads * a.kv_heads
    weights = (2 * a.hidden * a.hidden + 2 * a.hidden * kv + 3 * a.hidden * a.intermediate + 2 * a.hidden) * 2
    hessians = (3 * a.hidden**2 + a.intermediate**2) * 4
    states = 2 * a.samples * a.seqlen * a.hidden * 2
    return {"weights_bf16_gib": weights / GIB, "hessians_fp32_gib": hessians / GIB,
            "hidden_states_in_out_gib": states / GIB, "total_gib": (weights + hessians + states) / GIB}


def write_model(a) -> float | None:
    """Step 1; seconds taken, None when the model was there."""
    import torch
    from safetensors.torch import save_file

    from tquant.serialization import INDEX, SHARD, shard_bytes

    if os.path.isfile(os.path.join(a.folder, INDEX)):
        return None
    start = time.time()
    os.makedirs(a.folder, exist_ok=True)
    config = llama_config(a)
    shapes = tensor_shapes(config)
    limit, shards, size = shard_bytes(a.shard_size), [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(shards):
        tensors = {}
        for name in names:
            g = torch.Generator(a.device).manual_seed(len(weight_map))
            if name.endswith("norm.weight"):
                t = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = torch.randn(shapes[name], generator=g, device=a.device, dtype=torch.bfloat16).mul_(0.02).cpu()
            tensors[name] = t
            weight_map[name] = SHARD.format(k + 1, len(shards))
        save_file(tensors, os.path.join(a.folder, weight_map[names[0]]), metadata={"format": "pt"})
        del tensors
    config.save_pretrained(a.folder)
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    with open(os.path.join(a.folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return time.time() - start


class Stop(Exception):
    """Raised after a block when the call's budget or --max-blocks says to stop; the run resumes from there."""


def child(a) -> None:
    """Step 2, in its own process; prints its row as JSON on its last line (the log, one line per block, on
    stderr)."""
    import logging

    import torch

    import tquant
    from tquant.streaming.progress import WORK

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    deadline = a.started + a.budget
    calib = torch.randint(0, a.vocab, (a.samples, a.seqlen), generator=torch.Generator().manual_seed(0))
    resume = os.path.isdir(os.path.join(a.out, WORK))
    start = last = time.time()
    row = {"resumed": resume, "blocks": [], "block_seconds": []}

    def on_block(i, n):
        nonlocal last
        now = time.time()
        row["blocks"].append(i)
        row["block_seconds"].append(now - last)
        last = now
        print(f"block {i}: {row['block_seconds'][-1]:.1f} s; peaks so far: {peaks()}", file=sys.stderr, flush=True)
        slowest = max(row["block_seconds"][1:] or row["block_seconds"])
        if i + 1 < n and (now + 2 * slowest > deadline or len(row["blocks"]) == a.max_blocks):
            raise Stop

    def peaks() -> str:
        gpu = (f"GPU allocated {torch.cuda.max_memory_allocated() / GIB:.2f} GiB, reserved "
               f"{torch.cuda.max_memory_reserved() / GIB:.2f} GiB, " if a.device == "cuda" else "")
        return f"{gpu}host RSS {proc_status('VmHWM') / GIB:.2f} GiB"

    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        tquant.quantize_to_disk(a.folder, a.out, "gptq", bits=4, group_size=128, calib=calib, device=a.device,
                                resume=resume, on_block=on_block, progress=True)
        row["finished"] = True
    except Stop:
        row["finished"] = False
    row["wall_s"] = time.time() - start
    if a.device == "cuda":
        row["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        row["gpu"] = torch.cuda.get_device_name()
    row["peak_rss_gib"] = proc_status("VmHWM") / GIB
    print(json.dumps(row))


def totals(calls: list[dict]) -> dict:
    quantized = [c for c in calls if "blocks" in c]
    peaks = {k: max((c[k] for c in quantized if k in c), default=None)
             for k in ("peak_gpu_allocated_gib", "peak_gpu_reserved_gib", "peak_rss_gib")}
    return {"quantize_s": sum(c["wall_s"] for c in quantized), "blocks_done": sum(len(c["blocks"]) for c in quantized),
            "finished": any(c.get("finished") for c in quantized), **peaks}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", required=True, help="the random model's folder (written when it holds no index)")
    p.add_argument("--out", help="the quantized checkpoint (default: FOLDER-gptq-w4g128)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=560, help="seconds this call may take (the process stops itself)")
    p.add_argument("--max-blocks", type=int, default=0, help="stop after this many blocks in this call (0: no limit)")
    p.add_argument("--json", help="where the whole record goes too")
    p.add_argument("--shard-size", default="2GB")
    for name, default in (("layers", 32), ("hidden", 4096), ("intermediate", 14336), ("heads", 32), ("kv-heads", 8),
                          ("vocab", 128256), ("samples", 128), ("seqlen", 2048)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.out = a.out or a.folder.rstrip("/") + "-gptq-w4g128"
    a.started = a.started or time.time()
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    if a.child:
        return child(a)
    needs = block_needs(a)
    print(f"one block's needs: {needs['weights_bf16_gib']:.3f} GiB of bf16 weights + {needs['hessians_fp32_gib']:.3f} "
          f"GiB of fp32 Hessians + {needs['hidden_states_in_out_gib']:.3f} GiB of hidden states in and out = "
          f"{needs['total_gib']:.2f} GiB; target: peak GPU memory under {needs['total_gib'] + 3e9 / GIB:.2f} GiB",
          flush=True)
    record_path = a.out.rstrip("/") + ".record.json"
    record = {"calls": []}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
    call = {}
    wrote = write_model(a)
    if wrote is not None:
        call["write_model_s"] = wrote
        print(f"wrote the random model in {wrote:.1f} s", flush=True)
    if not (record["calls"] and totals(record["calls"])["finished"]):
        argv = [sys.executable, __file__, "--child", "--started", str(a.started)] + [
            arg for k, v in vars(a).items() if k not in ("child", "started", "json") and v is not None
            for arg in (f"--{k.replace('_', '-')}", str(v))]
        run = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
        if run.returncode:
            raise SystemExit(f"the quantize step failed (exit {run.returncode}); {run.stdout[-2000:]}")
        call |= json.loads(run.stdout.strip().splitlines()[-1])
    if call:
        record["calls"].append(call)
    record |= {"shape": {k: getattr(a, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")},
               "calibration": [a.samples, a.seqlen], "method": "gptq W4 g128", "device": a.device,
               "one_block_needs": needs, "total": totals(record["calls"])}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(record, f, indent=2)
    t = record["total"]
    gpu = (f"peak GPU allocated {t['peak_gpu_allocated_gib']:.2f} GiB, reserved {t['peak_gpu_reserved_gib']:.2f} GiB; "
           if t["peak_gpu_allocated_gib"] is not None else "")
    print(f"{t['blocks_done']}/{a.layers} blocks in {t['quantize_s']:.1f} s of quantize calls; {gpu}peak host RSS "
          f"{t['peak_rss_gib']:.2f} GiB; " + ("finished" if t["finished"] else "stopped: run the same command again"))
    return record


if __name__ == "__main__":
    main()
