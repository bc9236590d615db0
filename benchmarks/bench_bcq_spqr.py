"""Batch-1 (and small-batch) latency of the BCQ and SpQR matmuls against cuBLAS fp16, tquant's W4A16 and tinygemm.

    python benchmarks/bench_bcq_spqr.py [--shapes 512x2048,...] [--ms 1] [--extra-m 8@8192x32768] [--kinds bcq,spqr]
                                        [--out DIR]

Shapes are N x K (output x input features), LUT-GEMM's from 512 x 2048 to 12288 x 49152; activations fp16
(tinygemm: bf16, as its op requires). Per shape and batch M it times
    fp16       x @ W^T with a dense fp16 weight (cuBLAS)
    w4a16      tquant weight_only_matmul, 4-bit, group 128 (tuned on first call)
    tinygemm   torch.ops.aten._weight_int4pack_mm, 4-bit, group 128
    bcq-qQ     tquant bcq_matmul, q binary planes, group 128 (-off: with LUT-GEMM's offset)
    spqr-...   tquant spqr_matmul: bilevel dense part (bits, beta1, scale bits; beta2 = 16) + 1 % outliers in CSR
               (-dense: the dense part alone, weight_only_matmul with the bilevel stats)
Timings are medians in us of triton.testing.do_bench_cudagraph (graph) and triton.testing.do_bench (eager), each
rotating through enough weight copies to overflow L2 (bench_weight_only.time_rotating). Before timing, every kernel's
output at that shape is checked against its torch reference (relative error printed).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_weight_only import copies_for, log, make_weight, record_tuning, rel_err, time_rotating, tinygemm_fns  # noqa: E402
from tquant.kernels.bcq_matmul import bcq_matmul, bcq_matmul_ref  # noqa: E402
from tquant.kernels.runtime import device_name  # noqa: E402
from tquant.kernels.spqr_matmul import spqr_matmul, spqr_matmul_ref  # noqa: E402
from tquant.kernels.weight_only_matmul import weight_only_matmul  # noqa: E402

SHAPES = "512x2048,1024x4096,2048x8192,4096x16384,7168x28672,8192x32768,12288x49152"
BCQ = [(4, False), (3, False), (2, False), (4, True)]
SPQR = [(3, 16, 3), (4, 64, 4), (3, 64, 4)]  # (bits, beta1, scale_bits)
OUTLIERS = 0.01


def rand_words(shape, gen):
    return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device="cuda", dtype=torch.int64).to(torch.int32)


def bcq_weight(n, k, q, offset, gen, group=128):
    planes = rand_words((q, k // 32, n), gen)
    alphas = (torch.rand(q, k // group, n, generator=gen, device="cuda") * 0.02 + 0.001).half()
    off = (torch.randn(k // group, n, generator=gen, device="cuda") * 0.01).half() if offset else None
    return planes, alphas, off


def spqr_weight(n, k, bits, group, scale_bits, gen, stat_group=16):
    words = -(-k // (32 // bits))
    stats = torch.randint(0, 2 ** (scale_bits + bits), (k // group, n), generator=gen, device="cuda").to(torch.uint8)
    meta = (torch.rand(2, k // group, n // stat_group, generator=gen, device="cuda") * 0.01 + 0.001).half()
    per_row = max(1, round(OUTLIERS * k))
    cols = torch.sort(torch.stack([torch.randperm(k, generator=gen, device="cuda")[:per_row] for _ in range(n)]
                                  ) if n * k < 2**27 else torch.randint(0, k, (n, per_row), generator=gen,
                                                                         device="cuda"), dim=1).values
    row_ptr = (torch.arange(n + 1, device="cuda") * per_row).to(torch.int32)
    vals = (torch.randn(n * per_row, generator=gen, device="cuda") * 0.1).half()
    perm = torch.randperm(k, generator=gen, device="cuda").to(torch.int32)
    return [rand_words((words, n), gen), stats, meta, row_ptr, cols.reshape(-1).to(torch.int16), vals], dict(
        bits=bits, group_size=group, scale_bits=scale_bits, stat_group=stat_group, perm=perm)


def weight_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def bench_shape(n, k, m, gen, results, kinds):
    x = torch.randn(m, k, generator=gen, device="cuda").half()
    row = {"N": n, "K": k, "M": m}
    dense = torch.randn(k, n, generator=gen, device="cuda").half() * 0.02
    row["fp16"] = time_rotating([lambda d=d: x @ d for d in [dense] + [dense.clone() for _ in range(
        copies_for(dense.numel() * 2) - 1)]])
    del dense
    w = make_weight(n, k, 4, 128, torch.float16, False, gen)
    copies = copies_for(weight_bytes([w["qweight"], w["scales"], w["zeros"]]))
    kw = dict(bits=4, group_size=128, in_features=k)
    qs = [(w["qweight"].clone(), w["scales"].clone(), w["zeros"].clone()) for _ in range(copies)]
    weight_only_matmul(x, *qs[0], **kw)
    row["w4a16"] = time_rotating([lambda q=q: weight_only_matmul(x, *q, **kw) for q in qs])
    try:
        fns = tinygemm_fns(w, k, n, 128, copies)(x.bfloat16())
        row["tinygemm"] = time_rotating(fns)
    except Exception as err:  # noqa: BLE001
        log(f"tinygemm unavailable: {type(err).__name__}: {err}")
    del w, qs
    for q, offset in BCQ if "bcq" in kinds else []:
        name = f"bcq-q{q}" + ("-off" if offset else "")
        planes, alphas, off = bcq_weight(n, k, q, offset, gen)
        row[f"err_{name}"] = rel_err(bcq_matmul(x, planes, alphas, off), bcq_matmul_ref(x, planes, alphas, off)) \
            if n * k <= 2**26 else None
        copies_w = [(planes, alphas, off)] + [(planes.clone(), alphas.clone(), off) for _ in range(
            copies_for(weight_bytes([planes, alphas, off])) - 1)]
        row[name] = time_rotating([lambda c=c: bcq_matmul(x, *c) for c in copies_w])
        del copies_w, planes
    for bits, group, sb in SPQR if "spqr" in kinds else []:
        name = f"spqr-w{bits}-g{group}-s{sb}"
        args, skw = spqr_weight(n, k, bits, group, sb, gen)
        row[f"err_{name}"] = rel_err(spqr_matmul(x, *args, **skw), spqr_matmul_ref(x, *args, **skw)) \
            if n * k <= 2**26 else None
        copies_w = [args] + [[a.clone() for a in args] for _ in range(copies_for(weight_bytes(args)) - 1)]
        row[name] = time_rotating([lambda c=c: spqr_matmul(x, *c, **skw) for c in copies_w])
        dense_kw = dict(bits=bits, group_size=group, in_features=k, perm=skw["perm"], bilevel=(sb, skw["stat_group"]))
        row[name + "-dense"] = time_rotating([lambda c=c: weight_only_matmul(x, *c[:3], **dense_kw) for c in copies_w])
        del copies_w, args
    results.append(row)
    log(json.dumps(row) + f"  [{time.time() - T0:.0f} s]")


T0 = time.time()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ms", default="1")
    ap.add_argument("--extra-m", default="8@8192x32768", help="M@NxK pairs timed besides --ms")
    ap.add_argument("--kinds", default="bcq,spqr", help="which of bcq, spqr to time (fp16 and the peers always)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    log(f"GPU {torch.cuda.get_device_name()} ({device_name(torch.device('cuda'))}), torch {torch.__version__}, "
        f"triton {triton.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    record_tuning({}, label=lambda c: c.get("path", ""))
    runs = [(s, int(m)) for s in a.shapes.split(",") for m in a.ms.split(",")]
    runs += [(s, int(m)) for m, s in (item.split("@") for item in filter(None, a.extra_m.split(",")))]
    results = []
    for shape, m in runs:
        n, k = map(int, shape.split("x"))
        try:
            bench_shape(n, k, m, gen, results, a.kinds.split(","))
        except Exception as err:  # noqa: BLE001  (keep the other shapes' numbers)
            log(f"{shape} M={m} failed: {type(err).__name__}: {err}")
        torch.cuda.empty_cache()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_bcq_spqr.json").write_text(json.dumps(
        dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, results=results),
        indent=1))
    names = list(dict.fromkeys(k for r in results for k in r if isinstance(r[k], list)))
    log("\nN x K, M | " + " | ".join(names) + "   (graph us; x = fp16 time / this)")
    for r in results:
        cells = [f"{r[k][0]:7.1f} ({r['fp16'][0] / r[k][0]:4.2f}x)" if k in r else "n/a" for k in names]
        log(f"{r['N']}x{r['K']}, {r['M']} | " + " | ".join(cells))
    log("\neager us: " + "; ".join(f"{r['N']}x{r['K']},{r['M']}: " + ", ".join(
        f"{k} {r[k][1]:.1f}" for k in names if k in r) for r in results))


if __name__ == "__main__":
    main()
