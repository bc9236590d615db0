"""The whole QuIP# layer on the GPU: input RHT + E8P decode-matmul + output RHT (QuipLinear), fp16.

    python benchmarks/bench_quip_linear.py [--shapes 4096x14336,14336x4096] [--ms 1,16] [--bits 2,4]

Per shape and M: QuipLinear (CUDA graph and eager), the same layer unfused (separate multiplies and casts around
the transforms), its three launches alone (input RHT with su fused, E8P matmul, output RHT with sv fused), cuBLAS
fp16 (x @ W^T) and tquant's W4A16 g128 PackedLinear, medians in µs over calls that rotate through enough weight copies that the
weights come from HBM (bench_weight_only.time_rotating); the module's output is checked against its torch reference
first. Random codes and signs (speed does not depend on the values).
"""
from __future__ import annotations

import argparse

import torch
import triton
from bench_weight_only import copies_for, time_rotating

from tquant.kernels.e8p_matmul import e8p_matmul
from tquant.kernels.hadamard import hadamard_transform
from tquant.modules import PackedLinear, QuipLinear
from tquant.formats.weights import QuantizedWeight


def random_quip(k, n, bits):
    mod = QuipLinear(k, n, bits=bits, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    mod.codes.copy_(torch.randint(-(1 << 15), 1 << 15, mod.codes.shape, device="cuda", generator=g))
    if mod.codes2 is not None:
        hi = 256 if bits == 3 else 1 << 15
        lo = 0 if bits == 3 else -(1 << 15)
        mod.codes2.copy_(torch.randint(lo, hi, mod.codes2.shape, device="cuda", generator=g))
    mod.su.copy_(torch.randint(0, 2, (k,), device="cuda", generator=g) * 2.0 - 1)
    mod.sv.copy_((torch.randint(0, 2, (n,), device="cuda", generator=g) * 2.0 - 1) * 0.01)
    return mod


def unfused_forward(mod, x):
    """The layer as separate launches (the module before su, sv and the bias moved into the transforms): the
    baseline that the fused module is measured against."""
    x2 = (x.float() * mod.su).to(x.dtype)
    y = e8p_matmul(hadamard_transform(x2), mod.codes, mod.codes2, bits=mod.bits)
    return (hadamard_transform(y, transpose=True).float() * mod.sv).to(x.dtype)


def run(shapes=((4096, 14336), (14336, 4096)), ms=(1, 16), bits_list=(2, 4), print_fn=print):
    print_fn(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print_fn("| K->N | M | bits | QuipLinear graph (eager) | unfused graph | RHT in | E8P matmul | RHT out | cuBLAS fp16 "
             "| W4A16 g128 |")
    print_fn("|---|---|---|---|---|---|---|---|---|---|")
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        ws = [w.clone() for _ in range(copies_for(w.numel() * 2))]
        w4 = PackedLinear.from_quantized(QuantizedWeight.from_rtn(w, 4, 128, False), None, torch.float16)
        w4s = [w4] + [PackedLinear.from_quantized(QuantizedWeight.from_rtn(w, 4, 128, False), None, torch.float16)
                      for _ in range(copies_for(w4.qweight.numel() * 4) - 1)]
        for bits in bits_list:
            mod = random_quip(k, n, bits)
            mods = [mod] + [random_quip(k, n, bits) for _ in range(copies_for(mod.codes.numel() * 2 * (1 + (bits > 2))) - 1)]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                y = mod(x)
                mod.backend = "torch"
                ref = mod(x)
                mod.backend = "auto"
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 1e-2, f"QuipLinear kernel vs reference: rel err {err:.2e}"
                xr = hadamard_transform(x, in_scale=mod.su)
                yr = e8p_matmul(xr, mod.codes, mod.codes2, bits=bits)
                full = time_rotating([lambda q=q: q(x) for q in mods])
                parts = [time_rotating([lambda: hadamard_transform(x, in_scale=mod.su)])[0],
                         time_rotating([lambda q=q: e8p_matmul(xr, q.codes, q.codes2, bits=bits) for q in mods])[0],
                         time_rotating([lambda: hadamard_transform(yr, transpose=True, out_scale=mod.sv)])[0]]
                unfused = time_rotating([lambda q=q: unfused_forward(q, x) for q in mods])[0]
                cublas = time_rotating([lambda v=v: x @ v.t() for v in ws])[0]
                packed = time_rotating([lambda q=q: q(x) for q in w4s])[0]
                print_fn(f"| {k}->{n} | {m} | {bits} | {full[0]:.1f} ({full[1]:.1f}) | {unfused:.1f} | {parts[0]:.1f} | "
                         f"{parts[1]:.1f} | {parts[2]:.1f} | {cublas:.1f} | {packed:.1f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4096x14336,14336x4096")
    p.add_argument("--ms", default="1,16")
    p.add_argument("--bits", default="2,4")
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    run(shapes, [int(m) for m in a.ms.split(",")], [int(b) for b in a.bits.split(",")])


if __name__ == "__main__":
    main()
