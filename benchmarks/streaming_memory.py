"""Peak memory of streaming quantization (tquant.quantize_to_disk) against the in-memory path, on the CPU (issue 28).

    python benchmarks/streaming_memory.py                       # rtn and gptq, 8 blocks (~10 min on 2 CPU cores)
    python benchmarks/streaming_memory.py --methods rtn --blocks 4
    python benchmarks/streaming_memory.py --arch mixtral      # the mixture-of-experts checkpoint below

A random Llama (hidden 1024, intermediate 2816, 16 heads, vocabulary 32000, untied head; 25.7 MB a block and 131 MB
of embedding + head in bf16), or with --arch mixtral a random Mixtral of the same attention and 4 experts of
intermediate 1408, top-2 (41.0 MiB a block, its experts stored one tensor each and fused by transformers on loading,
by tquant.streaming through transformers' rules), is saved as bf16 safetensors shards of 50 MB, then quantized W4 g128 (gptq on 16 x 128
calibration tokens) twice, each in a fresh process:
    in memory   tquant.models.load_model + tquant.quantize + tquant.save
    streaming   tquant.quantize_to_disk (the same model, method, calibration)
Peak = the process's VmHWM (peak resident set, file pages of mapped shards included) at the end, minus its VmRSS
after the imports, with the high-water mark reset there (/proc/self/clear_refs). The two checkpoints are compared
tensor for tensor. The glibc allocator runs with MALLOC_MMAP_THRESHOLD_=131072 (--malloc-default: without it), so
that a freed block's tensors go back to the system as they do for a large model's (glibc's dynamic threshold keeps
tensors up to 32 MB, this model's size, in its heap after the first is freed). Results merge into --json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 1024, 2816, 16, 32000
EXPERTS, EXPERT_INTERMEDIATE = 4, 1408  # --arch mixtral


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(mode: str, method: str, src: str, out: str) -> None:
    """One measured run; prints {"peak_mib", "seconds"} as JSON."""
    import time

    import torch

    import tquant
    import tquant.streaming
    from tquant.models import load_model

    calib = torch.load(os.path.join(src, "calib.pt"))
    options = {"bits": 4, "group_size": 128, "calib": calib, "batch_size": 4, "progress": False}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base, start = proc_status("VmRSS"), time.time()
    if mode == "memory":
        model, _ = load_model(src)
        tquant.quantize(model, method, **options)
        tquant.config.tquant_config(model.config)["base_model"] = src
        tquant.save(model, out, max_shard_size="50MB")
    else:
        tquant.quantize_to_disk(src, out, method, max_shard_size="50MB", **options)
    print(json.dumps({"peak_mib": (proc_status("VmHWM") - base) / 2**20, "seconds": time.time() - start}))


def make_model(path: str, blocks: int, arch: str = "llama") -> dict:
    """The random bf16 Llama (or Mixtral) saved in shards, and its calibration ids; returns its sizes in MiB."""
    import torch
    import transformers

    from tests.tiny_models import byte_tokenizer

    torch.manual_seed(0)
    shape = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": blocks, "num_attention_heads": HEADS,
             "num_key_value_heads": HEADS, "tie_word_embeddings": False, "dtype": "bfloat16"}
    config = (transformers.MixtralConfig(intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=EXPERTS,
                                         num_experts_per_tok=2, **shape) if arch == "mixtral"
              else transformers.LlamaConfig(intermediate_size=INTERMEDIATE, **shape))
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="50MB")
    byte_tokenizer().save_pretrained(path)  # load_model reads one; the calibration is token ids
    torch.save(torch.randint(0, VOCAB, (16, 128), generator=torch.Generator().manual_seed(1)),
               os.path.join(path, "calib.pt"))
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return {"block_mib": block / 2**20, "embeddings_and_head_mib": 2 * VOCAB * HIDDEN * 2 / 2**20,
            "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def same_tensors(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        return {k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(d, f)).items()}

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--arch", choices=("llama", "mixtral"), default="llama")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--malloc-default", action="store_true", help="leave glibc's mmap threshold dynamic")
    p.add_argument("--json", default="benchmarks/results/cpu/streaming_memory.json")
    p.add_argument("--child", nargs=4, metavar=("MODE", "METHOD", "SRC", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    env = dict(os.environ) | ({} if a.malloc_default else {"MALLOC_MMAP_THRESHOLD_": "131072"})
    results = {}
    if os.path.isfile(a.json):
        with open(a.json) as f:
            results = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "model")
        sizes = make_model(src, a.blocks, a.arch)
        print(f"{a.arch}: {a.blocks} blocks of {sizes['block_mib']:.1f} MiB, embedding + head "
              f"{sizes['embeddings_and_head_mib']:.1f} MiB, {sizes['model_mib']:.1f} MiB in all (bf16)")
        for method in a.methods.split(","):
            row = dict(sizes, arch=a.arch, blocks=a.blocks, malloc=("default" if a.malloc_default else "mmap threshold 128 KiB"))
            for mode in ("memory", "streaming"):
                out = os.path.join(tmp, f"{method}-{mode}")
                run = subprocess.run([sys.executable, __file__, "--child", mode, method, src, out], env=env,
                                     capture_output=True, text=True, check=False)
                if run.returncode:
                    raise SystemExit(run.stderr[-3000:])
                row[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            row["identical_tensors"] = same_tensors(*(os.path.join(tmp, f"{method}-{m}") for m in ("memory",
                                                                                                    "streaming")))
            print(f"{method}: in memory {row['memory']['peak_mib']:.0f} MiB peak, {row['memory']['seconds']:.1f} s; "
                  f"streaming {row['streaming']['peak_mib']:.0f} MiB peak, {row['streaming']['seconds']:.1f} s; "
                  f"identical tensors: {row['identical_tensors']}")
            arch = "" if a.arch == "llama" else f"{a.arch} "
            results[f"{arch}{method} {a.blocks} blocks{' malloc-default' if a.malloc_default else ''}"] = row
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
