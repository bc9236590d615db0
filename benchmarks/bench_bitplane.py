"""Bit-plane WpAq GEMM (ABQ-LLM, tquant.kernels.bitplane_gemm) on the GPU against cuBLAS fp16, cuBLAS int8 and the
W4A8 / W8A8 kernels (tquant.kernels.w4a8_gemm, w8a8_gemm), all in the same run.

    python benchmarks/bench_bitplane.py [--ms 1,16,64,256,1024,4096] [--shapes 4096x14336] [--json out.json]

Per shape K->N and batch M: W2A8, W3A8, W4A4, W4A8, W8A8 per channel (and W2A8 g128), asymmetric weights and
per-token asymmetric activations (bitplane_gemm.quantize_weight_ref; act_quant.quantize_activations(zero_point=True),
quantized once before timing: these columns time the GEMM alone; the activation kernel is timed in its own column),
tuned per key on first call (every variant: "rebuild", "planes", and "dense" from M = 256; the chosen one is
printed; run with TQUANT_AUTOTUNE=retune to tune past the shipped entries); up to M = 16 also
the popcount GEMV (bitplane_gemv, ABQ-LLM's binary AND + popc path on the same planes). Tuning compiles
every candidate of every key; --precompile P first compiles them all in P processes into the shared Triton cache
(each launch in a worker only compiles: its output and time are not used), so the tuning itself reads compiled
kernels. Peers: cuBLAS
fp16 (x @ w^T), cuBLAS int8 (torch._int_mm on pre-quantized activations, M padded to 32 below 17), tquant W4A8 and
W8A8 per channel (w4a8_matmul, w8a8_matmul on pre-quantized activations).
Every tquant output is checked against its torch reference. Medians in us: do_bench_cudagraph (eager do_bench in
parentheses).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8_gemms import bench, rel  # noqa: E402
from tquant.kernels import autotune_cache  # noqa: E402
from tquant.kernels.act_quant import quantize_activations  # noqa: E402
from tquant.kernels import bitplane_gemm  # noqa: E402
from tquant.kernels.bitplane_gemm import bitplane_matmul_ref, quantize_weight_ref  # noqa: E402
from tquant.kernels.bitplane_matmul import bitplane_matmul  # noqa: E402
from tquant.kernels.bitplane_gemv import bitplane_gemv  # noqa: E402
from tquant.kernels.w4a8_gemm import w4a8_matmul  # noqa: E402
from tquant.kernels.w8a8_gemm import w8a8_matmul  # noqa: E402
from tquant.modules.act_quant_linear import w4a8_quantize_weight  # noqa: E402

COMBOS = [(2, 8, None), (2, 8, 128), (3, 8, None), (4, 4, None), (4, 8, None), (8, 8, None)]  # (p, q, group)
GEMV_MAX_M = 16  # the popcount GEMV (bitplane_gemv) is timed up to this batch


def compile_all(job):
    """Worker: launch every tuning candidate of the keys (k, n, [m], (bits, act_bits, group)) once, so each is
    compiled into the shared Triton cache."""
    k, n, ms, (bits, act_bits, group) = job
    weight = [t.cuda() for t in quantize_weight_ref(torch.randn(n, k) * 0.02, bits, group or k)]
    for m in ms:
        xq, xs, xz = quantize_activations(torch.randn(m, k, device="cuda").half(), bits=act_bits, zero_point=True)
        for config in bitplane_gemm.configs(triton.next_power_of_2(m), k, group or k):
            try:
                bitplane_gemm.launch(config, xq, xs, xz, *weight, bits, act_bits, group or k, None, torch.float16)
            except Exception:  # noqa: BLE001  (the tuner leaves out what cannot launch, as here)
                pass
    torch.cuda.synchronize()
    return job[3]


def precompile(shapes, ms, processes):
    """Compiles every candidate of every key in `processes` worker processes (spawned: each its own CUDA context),
    one job per combination and class of M that compiles differently (Triton specializes M = 1 and M % 16 == 0; the
    candidates differ by bitplane_gemm.TILES' batch classes)."""
    classes = {}
    for m in ms:
        classes.setdefault((m == 1, m % 16 == 0, tuple(bitplane_gemm.tile_shapes(triton.next_power_of_2(m)))), m)
    jobs = [(k, n, [m], combo) for k, n in shapes for combo in COMBOS for m in classes.values()]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for combo in pool.map(compile_all, jobs):
            print("compiled", combo, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,16,64,256,1024,4096")
    p.add_argument("--shapes", default="4096x14336")
    p.add_argument("--json", default=None)
    p.add_argument("--precompile", type=int, default=0, help="worker processes compiling the candidates first")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    shapes = [tuple(map(int, shape.split("x"))) for shape in a.shapes.split(",")]
    if a.precompile:
        t0 = time.time()
        precompile(shapes, [int(m) for m in a.ms.split(",")], a.precompile)
        print(f"precompiled in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for k, n in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        wh = w.half()
        weights = {(bits, group): [t.cuda() for t in quantize_weight_ref(w.cpu(), bits, group or k)]
                   for bits, _, group in COMBOS}
        w4 = [t.cuda() if t is not None else None for t in w4a8_quantize_weight(w.cpu())]
        ws8 = (w.abs().amax(1) / 127).float()
        wq8 = torch.round(w / ws8[:, None]).to(torch.int8)
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            x[:, :: max(1, k // 64)] *= 20  # outlier channels
            row = {"shape": f"{k}->{n}", "M": m}
            for bits, act_bits, group in COMBOS:
                xq, xs, xz = quantize_activations(x, bits=act_bits, zero_point=True)
                args = (xq, xs, xz, *weights[bits, group])  # planes, w_scale, w_zero, w_sum
                kw = dict(bits=bits, act_bits=act_bits, group_size=group or k)
                name = f"W{bits}A{act_bits}" + (f" g{group}" if group else "")
                row[name + " err"] = rel(bitplane_matmul(*args, **kw), bitplane_matmul_ref(*args, **kw))
                row[name] = bench(lambda: bitplane_matmul(*args, **kw))
                entries = autotune_cache._entries(autotune_cache.device_name(x.device))
                chosen = [v["config"] for key, v in entries.items()
                          if key.startswith("bitplane_matmul|") and f"M={triton.next_power_of_2(m)}," in key
                          and f",p={bits},q={act_bits},g={group or k}," in key]
                row[name + " config"] = chosen[0] if chosen else None
                if m <= GEMV_MAX_M:
                    row[name + " gemv err"] = rel(bitplane_gemv(*args, **kw), bitplane_matmul_ref(*args, **kw))
                    row[name + " gemv"] = bench(lambda: bitplane_gemv(*args, **kw))
            row["act quant A8 asym"] = bench(lambda: quantize_activations(x, bits=8, zero_point=True))
            xq8, xs8 = quantize_activations(x)
            row["W4A8 (w4a8_gemm)"] = bench(lambda: w4a8_matmul(xq8, xs8, w4[0], w4[1]))
            row["W8A8 (w8a8_gemm)"] = bench(lambda: w8a8_matmul(xq8, xs8, wq8, ws8))
            row["cuBLAS fp16"] = bench(lambda: x @ wh.t())
            xq32 = torch.nn.functional.pad(xq8, (0, 0, 0, max(0, 32 - m))) if m < 17 else xq8
            wt = wq8.t()
            row["cuBLAS int8"] = bench(lambda: torch._int_mm(xq32, wt))
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = [f"W{b}A{q}" + (f" g{gr}" if gr else "") for b, q, gr in COMBOS] + [
        "W4A8 (w4a8_gemm)", "W8A8 (w8a8_gemm)", "cuBLAS fp16", "cuBLAS int8"]
    gemv = [f"W{b}A{q}" + (f" g{gr}" if gr else "") + " gemv" for b, q, gr in COMBOS]
    print("\n| K->N | M | " + " | ".join(names + gemv) + " |")
    print("|---|---|" + "---|" * len(names + gemv))
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | " + " | ".join(
            f"{r[nm][0]:.1f} ({r[nm][1]:.0f})" if nm in r else "" for nm in names + gemv) + " |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
