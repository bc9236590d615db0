"""Decode attention over a KIVI-quantized KV cache on the GPU (issue 5) against torch SDPA on an fp16 cache.

    python benchmarks/bench_kv_attention.py [--batches 1,16] [--contexts 4096,32768,131072] [--bits 4,2]
    ncu ... python benchmarks/bench_kv_attention.py --profile 1,32768,4   # one launch (B, context, bits) to profile

Shape of the issue: 32 query heads, 8 KV heads, head size 128, one query token a sequence, fp16. Per batch and
context: the kernel (tquant.kernels.kv_attention.kivi_decode_attention; KIVI group 32, residual window 128
tokens in fp16) and torch's scaled_dot_product_attention on fp16 K/V of the same length (GQA through
enable_gqa), medians in µs: CUDA graph (do_bench_cudagraph) and eager. The kernel's output is checked
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

HQ, HKV, D, GROUP, RESIDUAL = 32, 8, 128, 32, 128


def random_cache(b, t, bits):
    tq = (t - RESIDUAL) // GROUP * GROUP
    k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    pk, pv = kv_quant.quantize_keys(k[..., :tq, :], bits, GROUP), kv_quant.quantize_values(v[..., :tq, :], bits, GROUP)
    return (pk, pv, k[..., tq:, :].contiguous(), v[..., tq:, :].contiguous()), (k, v)


def run(batches=(1, 16), contexts=(4096, 32768, 131072), bits_list=(4, 2), print_fn=print):
    print_fn(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print_fn("| B | context | SDPA fp16 graph (eager) | " + " | ".join(f"KIVI-{b} graph (eager) | speed-up" for b in bits_list)
             + " |")
    print_fn("|---|---|---|" + "---|---|" * len(bits_list))
    for b in batches:
        for t in contexts:
            q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16)
            fp_bytes = 2 * b * HKV * t * D * 2
            try:
                fp = [random_cache(b, t, 2)[1] for _ in range(copies_for(fp_bytes))]
            except torch.OutOfMemoryError:
                print_fn(f"| {b} | {t} | out of memory |")
                continue
            sdpa = time_rotating([lambda k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                                  for k, v in fp])
            del fp
            cells = [f"{sdpa[0]:.1f} ({sdpa[1]:.1f})"]
            for bits in bits_list:
                caches = [random_cache(b, t, bits)[0] for _ in range(2)]
                pk, pv, rk, rv = caches[0]
                nbytes = pk.nbytes() + pv.nbytes() + 2 * rk.numel() * 2
                caches += [random_cache(b, t, bits)[0] for _ in range(copies_for(nbytes) - 2)]
                out = kivi_decode_attention(q, pk, pv, rk, rv, bits=bits, group=GROUP)
                ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, bits=bits, group=GROUP, sm_scale=D**-0.5)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 1e-2, f"kernel vs reference: rel err {err:.2e}"
                kivi = time_rotating([lambda c=c: kivi_decode_attention(q, *c, bits=bits, group=GROUP) for c in caches])
                cells.append(f"{kivi[0]:.1f} ({kivi[1]:.1f}) [{nbytes / kivi[0] / 1e3:.0f} GB/s] | {sdpa[0] / kivi[0]:.2f}x")
                del caches
            print_fn(f"| {b} | {t} | " + " | ".join(cells) + " |")


def profile(b, t, bits):
    """Tune (or read the tuned config), then launch the kernel once more: the launch a profiler looks at."""
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16)
    cache = random_cache(b, t, bits)[0]
    kivi_decode_attention(q, *cache, bits=bits, group=GROUP)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    kivi_decode_attention(q, *cache, bits=bits, group=GROUP)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16")
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--bits", default="4,2")
    p.add_argument("--profile", default=None, help="B,context,bits: one launch for a profiler")
    a = p.parse_args()
    if a.profile:
        return profile(*(int(v) for v in a.profile.split(",")))
    run([int(v) for v in a.batches.split(",")], [int(v) for v in a.contexts.split(",")],
        [int(v) for v in a.bits.split(",")])


if __name__ == "__main__":
    main()
