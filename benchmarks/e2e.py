"""End-to-end greedy decoding of a Llama-shaped model with random weights on the GPU, through tquant.StaticDecoder
(static cache, each decode step one CUDA-graph replay), fp16 against its quantized copies in the same run.

    python benchmarks/e2e.py [--layers 8] [--batches 1,16,64] [--prompt 1024] [--new 128]
                             [--variants fp16,w4a16,w8a8,qoq-w4a8,qoq-w4a8kv4] [--json out.json]

Model: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128, vocab 128256), --layers
decoder layers, fp16, HF's random init (N(0, 0.02)). Each variant quantizes a copy data-free (speed does not
depend on the weights' values):
    fp16          the model as is, fp16 cache (decode attention: masked SDPA over the static cache)
    w4a16         rtn bits=4 group 128 (PackedLinear: the weight-only kernels)
    w8a8          zeroquant bits=8 (ActQuantLinear: per-token int8 activations, W8A8 GEMM)
    qoq-w4a8      qoq's data-free steps (progressive grid, group 128; no rotation: folded, it costs nothing at run
                  time), fp16 cache
    qoq-w4a8kv4   the same with its KV4 cache (per-token 4-bit codes, tquant.kernels.kv_attention)
Per variant and batch B: the prompt (B x prompt random tokens) is prefilled, then new - 1 greedy steps. Printed:
time to first token (the prefill, ms), decode ms per step and tokens/s (B tokens a step), the ratio of tokens/s to
fp16's at the same B, weight bytes and KV-cache bytes per token. fp16 also runs its steps eagerly (no graph) at
batch 1: what launches cost. Every variant's prefill logits are compared with fp16's (relative error).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tquant  # noqa: E402
from tquant.decode import StaticDecoder  # noqa: E402
from tquant.models import model_bytes  # noqa: E402

NO_CALIB = dict(smooth_attention=0, smooth_xw=False, reorder=False, calib_range=False, rotate=False)
VARIANTS = {
    "fp16": None,
    "w4a16": ("rtn", dict(bits=4, group_size=128)),
    "w8a8": ("zeroquant", dict(bits=8)),
    "qoq-w4a8": ("qoq", dict(group_size=128, kv_bits=16, **NO_CALIB)),
    "qoq-w4a8kv4": ("qoq", dict(group_size=128, kv_bits=4, **NO_CALIB)),
}


def llama8b(layers: int):
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()


def timed(fn):
    """(result, ms) of fn() in CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


def decode_run(model, batch: int, prompt: int, new: int, graphs: bool = True) -> dict:
    dec = StaticDecoder(model, batch, prompt + new, graphs=graphs)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(batch))
    dec.generate(ids, 3)  # warm-up: the prefill's kernels, the graph capture, the decode kernels
    torch.cuda.synchronize()
    logits, ttft = timed(lambda: dec.prefill(ids))
    first = logits.float().clone()
    nxt = logits.argmax(-1)

    def steps():
        token = nxt
        for _ in range(new - 1):
            token = dec.step(token).argmax(-1)
        return token

    _, decode_ms = timed(steps)
    out = {"batch": batch, "ttft_ms": round(ttft, 2), "step_ms": round(decode_ms / (new - 1), 3),
           "tokens_per_s": round(batch * (new - 1) / decode_ms * 1e3, 1),
           "kv_bytes_per_token": dec.cache.bytes_per_token()}
    del dec
    torch.cuda.empty_cache()
    return out, first


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__,
          "transformers", transformers.__version__, flush=True)
    base = llama8b(a.layers)
    batches = [int(b) for b in a.batches.split(",")]
    results, fp_logits = {}, {}
    for name in a.variants.split(","):
        t = time.time()
        model = base
        if VARIANTS[name] is not None:
            method, opts = VARIANTS[name]
            model = tquant.quantize(copy.deepcopy(base), method, device="cuda", progress=False, **opts)
        rows = []
        for b in batches:
            try:
                row, logits = decode_run(model, b, a.prompt, a.new)
            except Exception as e:  # keep the other rows' numbers
                print(f"{name} batch {b} failed: {type(e).__name__}: {e}", flush=True)
                continue
            if name == "fp16":
                fp_logits[b] = logits
            elif b in fp_logits:
                row["prefill_logits_rel_err"] = round(((logits - fp_logits[b]).norm() / fp_logits[b].norm()).item(), 4)
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        if name == "fp16" and 1 in batches:
            row, _ = decode_run(model, 1, a.prompt, a.new, graphs=False)
            print("fp16 eager (no graph)", json.dumps(row), flush=True)
            results["fp16-eager"] = {"rows": [row]}
        results[name] = {"weight_bytes": model_bytes(model), "rows": rows, "seconds": round(time.time() - t)}
        if model is not base:
            del model
            torch.cuda.empty_cache()
    print(f"\n{a.layers} layers of Llama-3-8B shapes, prompt {a.prompt}, {a.new} new tokens; tokens/s (x fp16)")
    print("| variant | weights GB | KV B/token | " + " | ".join(f"B={b} TTFT ms | B={b} tok/s" for b in batches) + " |")
    print("|---|---|---|" + "---|---|" * len(batches))
    for name, r in results.items():
        cells = []
        for b in batches:
            row = next((x for x in r["rows"] if x["batch"] == b), None)
            ref = next((x for x in results.get("fp16", {"rows": []})["rows"] if x["batch"] == b), None)
            if row is None:
                cells += ["", ""]
                continue
            ratio = f" ({row['tokens_per_s'] / ref['tokens_per_s']:.2f}x)" if ref else ""
            cells += [f"{row['ttft_ms']:.1f}", f"{row['tokens_per_s']:.0f}{ratio}"]
        kv = r["rows"][0]["kv_bytes_per_token"] if r["rows"] else ""
        gb = f"{r['weight_bytes'] / 1e9:.2f}" if "weight_bytes" in r else ""
        print(f"| {name} | {gb} | {kv} | " + " | ".join(cells) + " |")
    if a.json:
        json.dump(results, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
