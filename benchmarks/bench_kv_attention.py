"""Decode attention over a quantized KV cache on the GPU against torch SDPA on an fp16 cache.

    python benchmarks/bench_kv_attention.py [--batches 1,16] [--contexts 4096,32768,131072] [--formats kivi-4,...]
    ncu ... python benchmarks/bench_kv_attention.py --profile 1,32768,kivi-4   # one launch (B, context, format)

Shape (Llama-3-8B's attention): 32 query heads, 8 KV heads, head size 128, one query token a sequence, fp16. Per batch and
context: each format of FORMATS through its kernel (tquant.kv.attention.kivi_decode_attention: KIVI-4 /
-2, keys per channel, group 32, residual window 128 tokens in fp16; QoQ's KV4, keys and values per token and head,
no window. tquant.kv.kvquant_attention.kvquant_decode_attention: KVQuant-4 / -3 / -2, NUQ codebooks, pre-RoPE
keys rotated in the kernel, about 1 % key outliers (CSR) and one value outlier a vector, a 1-token sink) and
torch's scaled_dot_product_attention on fp16 K/V of the same length (GQA through enable_gqa), medians in µs: CUDA
graph (do_bench_cudagraph) and eager. Each kernel's output is checked against its torch reference (rel. error
< 1e-2) before timing; caches are random (speed does not depend on the values, outlier counts aside) and large
enough to come from HBM (the 4k batch-1 cache, 16 MB in fp16, is timed over copies). Bytes moved are printed as
GB/s of the cache each reads.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from bench_weight_only import copies_for, time_rotating

from tquant.kv import uniform_format as kv_quant
from tquant.kv import kvquant_format as kvq
from tquant.kv.attention import kivi_decode_attention, kivi_decode_attention_ref
from tquant.kv.kvquant_attention import kvquant_decode_attention, kvquant_decode_attention_ref

HQ, HKV, D = 32, 8, 128
KIVI = {"kivi-4": dict(bits=4, group=32, key_axis="channel", residual=128),  # what kivi_decode_attention takes,
        "kivi-2": dict(bits=2, group=32, key_axis="channel", residual=128),  # and the residual window
        "qoq-4": dict(bits=4, group=D, key_axis="token", residual=0)}
KVQUANT = {"kvquant-4": 4, "kvquant-3": 3, "kvquant-2": 2}
FORMATS = (*KIVI, *KVQUANT)


def kivi_cache(b, t, fmt):
    """(kernel call, reference call, bytes it reads) for a KIVI-layout cache of t tokens."""
    f = KIVI[fmt]
    args = {k: v for k, v in f.items() if k != "residual"}
    tq = t - f["residual"]
    if f["key_axis"] == "channel":
        tq = tq // f["group"] * f["group"]
    k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    pk = kv_quant.key_format(f["key_axis"])[0](k[..., :tq, :], f["bits"], f["group"])
    pv = kv_quant.quantize_values(v[..., :tq, :], f["bits"], f["group"])
    cache = (pk, pv, k[..., tq:, :].contiguous(), v[..., tq:, :].contiguous())
    return (lambda q: kivi_decode_attention(q, *cache, **args),
            lambda q: kivi_decode_attention_ref(q, *cache, **args, sm_scale=D**-0.5),
            pk.nbytes() + pv.nbytes() + 2 * cache[2].numel() * 2)


def kvquant_cache(b, t, fmt):
    """(kernel call, reference call, bytes it reads) for a KVQuant cache of t tokens: a 1-token sink, t - 1 stored
    (the last also exact, as after a decode step), key ranges at the 99th percentile of |k| per channel."""
    bits, t = KVQUANT[fmt], t - 1
    k = torch.randn(b, HKV, t, D, device="cuda")
    v = torch.randn(b, HKV, t, D, device="cuda")
    book = torch.sort(torch.randn(2**bits, device="cuda")).values
    scale = k[0, :, :4096].abs().quantile(0.99, dim=1)  # [HKV, D]
    params = kvq.LayerParams(torch.zeros_like(scale), scale, book / book.abs().max(), book / book.abs().max())
    keys = kvq.quantize_keys(k, params, bits, True)
    values = kvq.quantize_values(v, params.value_codebook, bits, kvq.value_outliers(0.01, D))
    rope = (1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D), 1.0)
    positions = (1 + torch.arange(t, device="cuda", dtype=torch.int32)).expand(b, t).contiguous()
    sink = torch.randn(b, HKV, 1, D, device="cuda", dtype=torch.float16)
    res = k[..., -1:, :].half(), v[..., -1:, :].half()
    args = dict(keys=keys, values=values, params=params, sink_k=sink, sink_v=sink, res_k=res[0], res_v=res[1],
                bits=bits, rope=rope, positions=positions)
    del k, v
    return (lambda q: kvquant_decode_attention(q, **args),
            lambda q: kvquant_decode_attention_ref(q, **args, sm_scale=D**-0.5),
            kvq.nbytes(keys) + kvq.nbytes(values) + positions.numel() * 4)


def random_cache(b, t, fmt):
    return (kivi_cache if fmt in KIVI else kvquant_cache)(b, t, fmt)


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
                fp = [[torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16) for _ in range(2)]
                      for _ in range(copies_for(fp_bytes))]
            except torch.OutOfMemoryError:
                print_fn(f"| {b} | {t} | out of memory |")
                continue
            sdpa = time_rotating([lambda k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                                  for k, v in fp])
            del fp
            cells = [f"{sdpa[0]:.1f} ({sdpa[1]:.1f})"]
            for fmt in formats:
                try:
                    fn, ref, nbytes = random_cache(b, t, fmt)
                    out, want = fn(q).float(), ref(q).float()
                    err = ((out - want).norm() / want.norm()).item()
                    assert err < 1e-2, f"{fmt}: kernel vs reference: rel err {err:.2e}"
                    del want
                    fns = [fn] + [random_cache(b, t, fmt)[0] for _ in range(copies_for(nbytes) - 1)]
                except torch.OutOfMemoryError:
                    cells.append("out of memory | -")
                    continue
                kern = time_rotating([lambda f=f: f(q) for f in fns])
                cells.append(f"{kern[0]:.1f} ({kern[1]:.1f}) [{nbytes / kern[0] / 1e3:.0f} GB/s] | "
                             f"{sdpa[0] / kern[0]:.2f}x")
                del fns, fn, ref
                torch.cuda.empty_cache()
            print_fn(f"| {b} | {t} | " + " | ".join(cells) + " |")


def profile(b, t, fmt):
    """Tune (or read the tuned config), then launch the kernel once more: the launch a profiler looks at."""
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16)
    fn = random_cache(b, t, fmt)[0]
    fn(q)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn(q)
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
