"""FP8 GEMMs on the GPU (issue 29): tquant's e4m3 W8A8 against torch._scaled_mm (cuBLASLt FP8), cuBLAS fp16 and
tquant's int8 W8A8, all in the same run.

    python benchmarks/bench_fp8.py [--ms 1,16,64,256,1024,4096] [--shapes 4096x14336,14336x4096] [--json PATH]

Per shape K->N and batch M, fp16 activations with outlier channels (x20 every K/64-th channel), weights ~ 0.02 N(0, 1):
    tquant fp8         quantize_fp8 (per-token e4m3, one pass) + fp8_matmul: the two launches
    fused              fp8_linear, what FP8Linear runs (W8A8): the GEMM quantizing x itself or the two launches,
                       whichever the tuner timed faster for the key (the JSON's "fused path" says which; the fused
                       kernel is a candidate up to M 16)
    tquant fp8 gemm    fp8_matmul alone on pre-quantized activations
    tquant fp8 w-only  fp8_weight_only_matmul (FP8 W8A16)
    scaled_mm          torch._scaled_mm(xq, wq^T, row-wise scales, use_fast_accum=True: the accumulation Triton's fp8
                       tl.dot uses on an H100) on pre-quantized activations: no activation quantization, a lower bound
                       for any W8A8 (M padded to 16 below 16, cuBLASLt's minimum; fp16 out, else bf16 where this torch
                       takes row-wise scales with bf16 output only: the JSON says which)
    scaled_mm exact    the same with use_fast_accum=False (fp32 accumulation)
    cublas fp16        x @ w^T
    tquant int8        act_quant.quantize_activations + w8a8_matmul (per-token int8, per-channel int8 weights)
Each callable cycles through enough copies of its weights (>= 3x the L2) that the weights come from HBM, as
benchmarks/bench_w4a16.py does; times are medians of triton.testing.do_bench_cudagraph over replays, in us. Every
tquant output is checked once against its torch reference (relative error in the JSON). Targets (issue 29): tquant fp8
no slower than scaled_mm at any M, and at M = 4096 at most 0.6x cublas fp16's time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ("tquant fp8", "fused", "tquant fp8 gemm", "tquant fp8 w-only", "scaled_mm", "scaled_mm exact",
           "cublas fp16", "tquant int8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,16,64,256,1024,4096", help="batch sizes M, comma-separated")
    p.add_argument("--shapes", default="4096x14336,14336x4096", help="KxN shapes, comma-separated")
    p.add_argument("--json", default=None, help="where to write the rows (default: $OUT/bench_fp8.json when OUT is "
                                                "set, else bench_fp8.json)")
    return p.parse_args(argv)


def shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        k, sep, n = item.partition("x")
        if not sep or not k.isdigit() or not n.isdigit():
            raise ValueError(f"--shapes takes KxN items such as 4096x14336, not {item!r}")
        out.append((int(k), int(n)))
    return out


def copies_for(nbytes: int, l2_bytes: int) -> int:
    """Weight copies a rotating call cycles through so that they span >= 3x the L2."""
    return max(2, -(-3 * l2_bytes // nbytes))


def table(rows: list[dict]) -> str:
    """Markdown: the times (us), then the ratios the targets name."""
    lines = ["| K->N | M | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    fmt = lambda t: "-" if t is None else f"{t:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    ratio = lambda r, a, b: f"{r[a] / r[b]:.2f}" if r.get(a) and r.get(b) else "-"  # noqa: E731
    lines += ["", "Ratios of times (graph): scaled_mm / tquant fp8 and scaled_mm / fused (>= 1: the target met), "
              "tquant fp8 / cublas fp16 (target <= 0.6 at M = 4096), tquant int8 / tquant fp8.", "",
              "| K->N | M | scaled_mm / fp8 | scaled_mm / fused | scaled_mm exact / fp8 | fp8 / cublas fp16 | "
              "int8 / fp8 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {ratio(r, 'scaled_mm', 'tquant fp8')} | "
                     f"{ratio(r, 'scaled_mm', 'fused')} | "
                     f"{ratio(r, 'scaled_mm exact', 'tquant fp8')} | {ratio(r, 'tquant fp8', 'cublas fp16')} | "
                     f"{ratio(r, 'tquant int8', 'tquant fp8')} |")
    return "\n".join(lines)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv=None):
    a = parse_args(argv)
    import torch
    import triton
    import triton.testing

    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8 needs a CUDA GPU (FP8 tensor cores: an H100 / sm_89 or newer)")
    from tquant.kernels.act_quant import quantize_activations
    from tquant.kernels.fp8_gemm import (fp8_linear, fp8_matmul, fp8_matmul_ref, fp8_weight_only_matmul,
                                         fp8_weight_only_matmul_ref, linear_config, quantize_fp8)
    from tquant.kernels.w8a8_gemm import w8a8_matmul, w8a8_matmul_ref

    from bench_weight_only import graph_us  # the peers' timing: CUDA-graph replays over rotated weight copies

    props = torch.cuda.get_device_properties(0)
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                l2_mb=props.L2_cache_size / 2**20)
    print(json.dumps(info), flush=True)

    def scaled_mm(xq, xs, wq, ws, fast):
        m = xq.shape[0]
        if m < 16:
            xq, xs = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, 16 - m)).view(xq.dtype), \
                torch.nn.functional.pad(xs, (0, 16 - m), value=1.0)
        return torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=scaled_out[0],
                                use_fast_accum=fast)[:m]

    scaled_out = [torch.float16]
    rows = []
    for k, n in shapes(a.shapes):
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).half()
        wq, ws = quantize_fp8(w)
        ws8 = w.float().abs().amax(dim=1) / 127
        wq8 = torch.round(w.float() / ws8[:, None]).clamp(-127, 127).to(torch.int8)
        fp8_copies = [(wq.clone(), ws.clone()) for _ in range(copies_for(wq.numel(), props.L2_cache_size))]
        int8_copies = [(wq8.clone(), ws8.clone()) for _ in range(len(fp8_copies))]
        dense = [w.clone() for _ in range(copies_for(w.numel() * 2, props.L2_cache_size))]
        for m in (int(v) for v in a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            x[:, :: max(1, k // 64)] *= 20
            xq, xs = quantize_fp8(x)
            xq8, xs8 = quantize_activations(x)
            row = {"shape": f"{k}->{n}", "M": m}
            # correctness once (this first call of each tquant kernel also tunes its key)
            row["tquant fp8 err"] = rel(fp8_matmul(*quantize_fp8(x), wq, ws), fp8_matmul_ref(xq, xs, wq, ws))
            row["fused err"] = rel(fp8_linear(x, wq, ws), fp8_matmul_ref(xq, xs, wq, ws))
            row["fused path"] = linear_config(x, None, wq, ws, None)
            row["tquant fp8 w-only err"] = rel(fp8_weight_only_matmul(x, wq, ws), fp8_weight_only_matmul_ref(x, wq, ws))
            row["tquant int8 err"] = rel(w8a8_matmul(xq8, xs8, wq8, ws8), w8a8_matmul_ref(xq8, xs8, wq8, ws8))
            row["tquant fp8 err vs fp16"] = rel(fp8_matmul(xq, xs, wq, ws), x @ w.t())
            row["tquant fp8"] = graph_us([lambda c=c: fp8_matmul(*quantize_fp8(x), *c) for c in fp8_copies])
            row["fused"] = graph_us([lambda c=c: fp8_linear(x, *c) for c in fp8_copies])
            row["tquant fp8 gemm"] = graph_us([lambda c=c: fp8_matmul(xq, xs, *c) for c in fp8_copies])
            row["tquant fp8 w-only"] = graph_us([lambda c=c: fp8_weight_only_matmul(x, *c) for c in fp8_copies])
            for name, fast in (("scaled_mm", True), ("scaled_mm exact", False)):
                try:
                    try:
                        y = scaled_mm(xq, xs, wq, ws, fast)
                    except RuntimeError:  # row-wise scales with bf16 output only in this torch
                        scaled_out[0] = torch.bfloat16
                        y = scaled_mm(xq, xs, wq, ws, fast)
                    row[name + " err vs tquant"] = rel(y.float(), fp8_matmul_ref(xq, xs, wq, ws).float())
                    row[name] = graph_us([lambda c=c: scaled_mm(xq, xs, *c, fast) for c in fp8_copies])
                    row["scaled_mm out"] = str(scaled_out[0]).removeprefix("torch.")
                except Exception as err:  # noqa: BLE001  (a peer failing must not stop the run)
                    row[name] = None
                    print(f"{name} failed at M={m}: {type(err).__name__}: {err}", flush=True)
            row["cublas fp16"] = graph_us([lambda d=d: x @ d.t() for d in dense])
            row["tquant int8"] = graph_us([lambda c=c: w8a8_matmul(*quantize_activations(x), *c) for c in int8_copies])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nMedians in us, do_bench_cudagraph; 'tquant fp8', 'fused' and 'tquant int8' include activation "
          "quantization.\n")
    print(table(rows))
    path = a.json or os.path.join(os.environ.get("OUT", "."), "bench_fp8.json")
    with open(path, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
