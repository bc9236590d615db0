"""Weight-activation GEMMs on the GPU: W8A8, W4A8 per-channel / per-group, W4A4, against cuBLAS fp16,
cuBLAS int8 and gemlite A8W8 / A8W4, all measured in the same run.

    python benchmarks/bench_int8_gemms.py [--ms 1,16,64,256,1024,4096] [--shapes 4096x14336,14336x4096,21760x8192]

Per shape K->N (21760 -> 8192 is QQQ's) and batch M, fp16 activations with outlier channels:
    tquant W8A8      quantize_activations (per-token int8) + w8a8_matmul
    tquant W4A8      quantize_activations + w4a8_matmul, per-channel ("pc") and group 128 ("g128", QQQ's grid;
                     "qoq g128": QoQ's progressive grid, zero points per group)
    tquant W4A4      quantize_activations(bits=4, pack=False) + w4a8_matmul: 4-bit codes held in int8 (what
                     ActQuantLinear runs; Hopper has no int4 MMA), per-channel
    W4A4 packed      quantize_activations(bits=4) + w4a8_matmul(act_bits=4): nibbles unpacked in the GEMM
                     (each tquant time includes the activation-quantization kernel)
    cublas_fp16      x @ w^T
    cublas_int8      torch._int_mm(xq, wq^T) on pre-quantized activations, int32 out (M padded to 32 below 17);
                     no activation quantization and no epilogue: a lower bound for any W8A8
    gemlite A8W8     gemlite.helper.A8W8_int8_dynamic (its own dynamic activation quant included)
    gemlite A8W4     gemlite.helper.A8W4_HQQ_INT_dynamic, int8 activations, symmetric (zero 8), per-channel and
                     group 128
Medians in us: "graph" = triton.testing.do_bench_cudagraph, "eager" = triton.testing.do_bench. Each tquant
output is checked against its torch reference (relative error printed). Tuned configs are saved to the user
autotune cache; --save-cache copies them to OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tquant.kernels.act_quant import quantize_activations  # noqa: E402
from tquant.kernels.w4a8_gemm import w4a8_matmul, w4a8_matmul_ref  # noqa: E402
from tquant.kernels.w8a8_gemm import w8a8_matmul, w8a8_matmul_ref  # noqa: E402
from tquant.modules.act_quant_linear import w4a8_quantize_weight  # noqa: E402


def bench(fn):
    """(graph, eager) medians in us (triton.testing reports ms)."""
    return (1e3 * triton.testing.do_bench_cudagraph(fn, rep=100),
            1e3 * triton.testing.do_bench(fn, rep=100, return_mode="median"))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gemlite_layers(w):
    """{name: callable x -> y} for gemlite's A8W8 and A8W4 (pc, g128) on w [N, K] fp16, or {} without gemlite."""
    try:
        from gemlite.helper import A8W4_HQQ_INT_dynamic, A8W8_int8_dynamic
    except ImportError as e:
        print("gemlite not available:", e)
        return {}
    out = {"gemlite A8W8": A8W8_int8_dynamic(device="cuda", dtype=torch.float16).from_weights(w.clone())}
    n, k = w.shape
    for gs in (k, 128):
        wg = w.float().view(n, k // gs, gs)  # symmetric, zero 8: gemlite's int8 path takes integer zeros only
        scale = (wg.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8)
        zero = torch.full_like(scale, 8.0)
        wq = torch.clamp(torch.round(wg / scale) + zero, 0, 15).to(torch.uint8).view(n, k)
        layer = A8W4_HQQ_INT_dynamic(device="cuda", dtype=torch.float16, fp8=torch.int8)
        out["gemlite A8W4 " + ("pc" if gs == k else "g128")] = layer.from_weights(
            wq, scale.view(n, -1).half(), zero.view(n, -1).half())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,16,64,256,1024,4096")
    p.add_argument("--shapes", default="4096x14336,14336x4096,21760x8192")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows = []
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).half()
        w_scale = w.float().abs().amax(dim=1) / 127
        wq8 = torch.round(w.float() / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        w4 = {"pc": w4a8_quantize_weight(w.float().cpu()),
              "g128": w4a8_quantize_weight(w.float().cpu(), group_size=128),
              "qoq g128": w4a8_quantize_weight(w.float().cpu(), group_size=128, zero_point=True)}
        w4 = {key: [t.cuda() if t is not None else None for t in v] for key, v in w4.items()}
        peers = gemlite_layers(w)
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            x[:, :: max(1, k // 64)] *= 20  # outlier channels
            xq, xs = quantize_activations(x)
            xq4, xs4 = quantize_activations(x, bits=4)
            t0 = time.time()
            calls = {
                "W8A8": (lambda: w8a8_matmul(*quantize_activations(x), wq8, w_scale),
                         lambda: w8a8_matmul_ref(xq, xs, wq8, w_scale)),
            }
            for key, (qw, ws, sg, sz) in w4.items():
                gs = 128 if sg is not None else None
                calls[f"W4A8 {key}"] = (
                    lambda qw=qw, ws=ws, sg=sg, sz=sz, gs=gs: w4a8_matmul(*quantize_activations(x), qw, ws,
                                                                          group_scale=sg, group_zero=sz, group_size=gs),
                    lambda qw=qw, ws=ws, sg=sg, sz=sz, gs=gs: w4a8_matmul_ref(xq, xs, qw, ws, group_scale=sg,
                                                                              group_zero=sz, group_size=gs))
            qw, ws, _, _ = w4["pc"]
            calls["W4A4 pc"] = (lambda: w4a8_matmul(*quantize_activations(x, bits=4, pack=False), qw, ws),
                                lambda: w4a8_matmul_ref(xq4, xs4, qw, ws, act_bits=4))
            calls["W4A4 packed"] = (lambda: w4a8_matmul(*quantize_activations(x, bits=4), qw, ws, act_bits=4),
                                    lambda: w4a8_matmul_ref(xq4, xs4, qw, ws, act_bits=4))
            row = {"shape": f"{k}->{n}", "M": m}
            for name, (fn, ref) in calls.items():
                err = rel(fn(), ref())
                row[name] = bench(fn)
                row[name + " err"] = err
            row["cuBLAS fp16"] = bench(lambda: x @ w.t())
            xq32 = torch.nn.functional.pad(xq, (0, 0, 0, max(0, 32 - m))) if m < 17 else xq
            wt = wq8.t()
            row["cuBLAS int8"] = bench(lambda: torch._int_mm(xq32, wt))
            for name, layer in peers.items():
                try:
                    y = layer(x)
                    row[name + " err vs fp16"] = rel(y, x @ w.t())
                    row[name] = bench(lambda: layer(x))
                except Exception as e:  # noqa: BLE001  (a peer failing must not stop the run)
                    row[name] = None
                    print(f"{name} failed at M={m}: {type(e).__name__}: {e}")
            rows.append(row)
            print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
    names = ["W8A8", "W4A8 pc", "W4A8 g128", "W4A8 qoq g128", "W4A4 pc", "W4A4 packed", "cuBLAS fp16", "cuBLAS int8", "gemlite A8W8",
             "gemlite A8W4 pc", "gemlite A8W4 g128"]
    print("\nGraph-timed medians in us (eager in parentheses); tquant columns include activation quantization.\n")
    print("| K->N | M | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    fmt = lambda t: "-" if not t else f"{t[0]:.1f} ({t[1]:.1f})"
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | " + " | ".join(fmt(r.get(nm)) for nm in names) + " |")
    print("\nRatios (peer time / tquant time, graph): >1 means tquant is faster.\n")
    print("| K->N | M | W8A8 vs fp16 | W8A8 vs int8 | W8A8 vs gemlite A8W8 | W4A8 pc vs fp16 | W4A8 pc vs gemlite "
          "A8W4 pc | W4A8 g128 / pc time | W4A4 vs fp16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratio = lambda r, a_, b_: f"{r[a_][0] / r[b_][0]:.2f}" if r.get(a_) and r.get(b_) else "-"
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | {ratio(r, 'cuBLAS fp16', 'W8A8')} | {ratio(r, 'cuBLAS int8', 'W8A8')} | "
              f"{ratio(r, 'gemlite A8W8', 'W8A8')} | {ratio(r, 'cuBLAS fp16', 'W4A8 pc')} | "
              f"{ratio(r, 'gemlite A8W4 pc', 'W4A8 pc')} | {ratio(r, 'W4A8 g128', 'W4A8 pc')} | "
              f"{ratio(r, 'cuBLAS fp16', 'W4A4 pc')} |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    cache = os.path.expanduser("~/.cache/tquant/autotune")
    if os.environ.get("OUT") and os.path.isdir(cache):
        for f in os.listdir(cache):
            os.system(f"cp {cache}/{f} $OUT/autotune_{f}")


if __name__ == "__main__":
    main()
