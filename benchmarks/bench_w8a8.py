"""W8A8 on the GPU (issue 3, first kernels): correctness and timings against cuBLAS fp16 and cuBLAS int8.

    python benchmarks/bench_w8a8.py [--ms 1,16,64,256,1024,4096] [--shapes 4096x14336,14336x4096]

Per shape K->N and batch M, fp16 activations:
    tquant      quantize_activations (per-token int8) + w8a8_matmul: the timed path includes the activation quant
    gemm only   w8a8_matmul on pre-quantized activations
    cublas_fp16 x @ w^T
    cublas_int8 torch._int_mm(xq, wq^T) on pre-quantized activations, int32 out (M padded to 32 below 17)
Medians in us: "graph" = triton.testing.do_bench_cudagraph, "eager" = triton.testing.do_bench. The
int8 weight (4096 x 14336 = 58 MB) exceeds the 50 MB L2; every tuned config is printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tquant.kernels.act_quant import quantize_activations  # noqa: E402
from tquant.kernels.w8a8_gemm import w8a8_matmul  # noqa: E402


def bench(fn):
    """(graph, eager) medians in us (triton.testing reports ms)."""
    return (1e3 * triton.testing.do_bench_cudagraph(fn, rep=200),
            1e3 * triton.testing.do_bench(fn, rep=200, return_mode="median"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,16,64,256,1024,4096")
    p.add_argument("--shapes", default="4096x14336,14336x4096")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows = []
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", generator=g).half()
        w_scale = w.float().abs().amax(dim=1) / 127
        wq = torch.round(w.float() / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            x[:, :: max(1, k // 64)] *= 20  # outlier channels
            xq, xs = quantize_activations(x)
            y = w8a8_matmul(xq, xs, wq, w_scale)
            ref = (xq.double() * xs.double()[:, None]) @ (wq.double() * w_scale.double()[:, None]).t()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            full_err = ((y.double() - (x.double() @ w.double().t())).norm() / (x.double() @ w.double().t()).norm()).item()
            tq = bench(lambda: w8a8_matmul(*quantize_activations(x), wq, w_scale))
            gemm = bench(lambda: w8a8_matmul(xq, xs, wq, w_scale))
            fp16 = bench(lambda: x @ w.t())
            xq32 = torch.nn.functional.pad(xq, (0, 0, 0, max(0, 32 - m))) if m < 17 else xq
            i8 = bench(lambda: torch._int_mm(xq32, wq.t()))
            rows.append((f"{k}->{n}", m, tq, gemm, fp16, i8))
            print(f"K={k} N={n} M={m}: rel err vs int reference {err:.1e}, vs fp16 x@w {full_err:.1e}; "
                  f"tquant {tq[0]:.1f}/{tq[1]:.1f} us, gemm {gemm[0]:.1f}, cublas fp16 {fp16[0]:.1f}, "
                  f"int8 {i8[0]:.1f}", flush=True)
    print("\n| K->N | M | tquant act-quant+GEMM graph/eager | GEMM only | cuBLAS fp16 | x | cuBLAS int8 | x |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, m, tq, gemm, fp16, i8 in rows:
        print(f"| {shape} | {m} | {tq[0]:.1f} / {tq[1]:.1f} | {gemm[0]:.1f} | {fp16[0]:.1f} | {fp16[0] / tq[0]:.2f} "
              f"| {i8[0]:.1f} | {i8[0] / tq[0]:.2f} |")


if __name__ == "__main__":
    main()
