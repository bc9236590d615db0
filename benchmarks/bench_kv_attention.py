"""Decode attention over a quantized KV cache on the GPU (issue 5) against torch SDPA on an fp16 cache.

    python benchmarks/bench_kv_attention.py [--batches 1,16] [--contexts 4096,32768,131072] [--formats kivi-4,...]
    ncu ... python benchmarks/bench_kv_attention.py --profile 1,32768,kivi-4   # one launch (B, context, format)

Shape of the issue: 32 query heads, 8 KV heads, head size 128, one query token a sequence, fp16. Per batch and
context: the kernel (tquant.kernels.kv_attention.kivi_decode_attention) on each format of FORMATS (KIVI-4 / -2:
keys per channel, group 32, residual window 128 tokens in fp16; QoQ's KV4: keys and values per token and head,
no window) and torch's scaled_dot_product_attention on fp16 K/V of the same length (GQA through enable_gqa),
medians in µs: CUDA graph (do_bench_cudagraph) and eager. The kernel's output is checked
against its torch reference (rel. error < 1e-2) before timing; caches are random (speed does not depend on
the values) and large enough to come from HBM (the 4k batch-1 cache, 16 MB in fp16, is timed over copies).
Bytes moved are printed as GB/s of the cache each reads.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from bench_weight_only import copies_for, time_rotating

from tquant import kv_quant
from tquant.kernels.kv_attention import kivi_decode_attention, kivi_decode_attention_ref

HQ, HKV, D = 32, 8, 128
FORMATS = {"kivi-4": dict(bits=4, group=32, key_axis="channel", residual=128),  # what kivi_decode_attention takes,
           "kivi-2": dict(bits=2, group=32, key_axis="channel", residual=128),  # and the residual window
           "qoq-4": dict(bits=4, group=D, key_axis="token", residual=0)}


def random_cache(b, t, fmt):
    """((packed K, packed V, residual K, residual V), (K, V)) for a context of t tokens in format fmt."""
    f = FORMATS[fmt]
    tq = t - f["residual"]
    if f["key_axis"] == "channel":
        tq = tq // f["group"] * f["group"]
    quantize_keys = kv_quant.key_format(f["key_axis"])[0]
    k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    pk, pv = quantize_keys(k[..., :tq, :], f["bits"], f["group"]), kv_quant.quantize_values(v[..., :tq, :], f["bits"], f["group"])
    return (pk, pv, k[..., tq:, :].contiguous(), v[..., tq:, :].contiguous()), (k, v)


def kernel_args(fmt):
    return {k: v for k, v in FORMATS[fmt].items() if k != "residual"}


def run(batches=(1, 16), contexts=(4096, 32768, 131072), formats=tuple(FORMATS), print_fn=print):
    print_fn(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print_fn("| B | context | SDPA fp16 graph (eager) | " + " | ".join(f"{f} graph (eager) | speed-up" for f in formats)
             + " |")
    print_fn("|---|---|---|" + "---|---|" * len(formats))
    for b in batches:
        for t in contexts:
            q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16)
            fp_bytes = 2 * b * HKV * t * D * 2
            try:
                fp = [random_cache(b, t, "kivi-2")[1] for _ in range(copies_for(fp_bytes))]
            except torch.OutOfMemoryError:
                print_fn(f"| {b} | {t} | out of memory |")
                continue
            sdpa = time_rotating([lambda k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                                  for k, v in fp])
            del fp
            cells = [f"{sdpa[0]:.1f} ({sdpa[1]:.1f})"]
            for fmt in formats:
                caches = [random_cache(b, t, fmt)[0] for _ in range(2)]
                pk, pv, rk, rv = caches[0]
                nbytes = pk.nbytes() + pv.nbytes() + 2 * rk.numel() * 2
                caches += [random_cache(b, t, fmt)[0] for _ in range(copies_for(nbytes) - 2)]
                out = kivi_decode_attention(q, pk, pv, rk, rv, **kernel_args(fmt))
                ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, **kernel_args(fmt), sm_scale=D**-0.5)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 1e-2, f"kernel vs reference: rel err {err:.2e}"
                kivi = time_rotating([lambda c=c: kivi_decode_attention(q, *c, **kernel_args(fmt)) for c in caches])
                cells.append(f"{kivi[0]:.1f} ({kivi[1]:.1f}) [{nbytes / kivi[0] / 1e3:.0f} GB/s] | {sdpa[0] / kivi[0]:.2f}x")
                del caches
            print_fn(f"| {b} | {t} | " + " | ".join(cells) + " |")


def profile(b, t, fmt):
    """Tune (or read the tuned config), then launch the kernel once more: the launch a profiler looks at."""
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16)
    cache = random_cache(b, t, fmt)[0]
    kivi_decode_attention(q, *cache, **kernel_args(fmt))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    kivi_decode_attention(q, *cache, **kernel_args(fmt))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16")
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--profile", default=None, help="B,context,format: one launch for a profiler")
    a = p.parse_args()
    if a.profile:
        b, t, fmt = a.profile.split(",")
        return profile(int(b), int(t), fmt)
    run([int(v) for v in a.batches.split(",")], [int(v) for v in a.contexts.split(",")], a.formats.split(","))


if __name__ == "__main__":
    main()
