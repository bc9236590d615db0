"""W4A16 small-batch profile: timings against the byte floor, peers in the same run, and an ncu child mode.

    python benchmarks/bench_w4a16.py [--shapes 4096x6144,...] [--ms 1,16,64] [--groups 128,pc]
                                       [--impls tquant,cublas,tinygemm,gemlite] [--out DIR]
    ncu --profile-from-start off ... python benchmarks/bench_w4a16.py --ncu-case K,N,M,IMPL[,GROUP]
                                       # warm (and tuned) calls, then one more inside cudaProfilerStart / Stop,
                                       # so ncu sees the tuned launch and never a tuning candidate

For each shape K->N, batch M and group size (128 or per-channel, "pc"), fp16 activations:
    floor   = (qweight + scales + zeros + x + y bytes) / copy bandwidth (a 1 GiB device-to-device copy in the same
              run, bytes read + written)
    tquant  weight_only_matmul (tuned on its first call; TQUANT_AUTOTUNE_DIR says where the tuned configs go)
    cublas  x @ w with a dense fp16 w;  tinygemm  torch.ops.aten._weight_int4pack_mm (bf16 x, groups 32..256 only)
    gemlite gemlite A16Wn 4-bit (if importable)
Times are medians of triton.testing.do_bench_cudagraph over replays that cycle through enough weight copies
(>= 3x the L2) that the weights come from HBM. Each impl's output is checked against the fp32 reference once.
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
from tquant.kernels.weight_only_matmul import weight_only_matmul  # noqa: E402
from tquant.formats.packing import pack_codes  # noqa: E402

from bench_weight_only import graph_us  # noqa: E402

T0 = time.time()


def log(*args):
    print(*args, flush=True)


def l2_bytes():
    return torch.cuda.get_device_properties(0).L2_cache_size


def copies_for(nbytes):
    return max(2, -(-3 * l2_bytes() // nbytes))


def make_weight(n, k, group, gen, dtype=torch.float16):
    bits = 4
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, device="cuda")
    g = k // group
    scales = (torch.rand(g, n, generator=gen, device="cuda") * 0.02 + 0.002).to(dtype)
    zeros = torch.randint(0, 2**bits, (g, n), generator=gen, device="cuda").to(dtype)
    return dict(codes=codes, qweight=pack_codes(codes, bits), scales=scales, zeros=zeros, perm=None)


def floor_bytes(m, k, n, group):
    g = k // group
    return k * n // 2 + 2 * g * n * 2 + m * k * 2 + m * n * 2


def rel_err(y, ref):
    y = y.float().reshape(ref.shape)
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def tquant_fns(w, k, n, group, copies):
    qc = [(w["qweight"].clone(), w["scales"].clone(), w["zeros"].clone()) for _ in range(copies)]
    kw = dict(bits=4, group_size=group, in_features=k)
    return lambda x: [lambda q=q: weight_only_matmul(x, q[0], q[1], q[2], **kw) for q in qc]


def tinygemm_fns(w, k, n, group, copies):
    """w = (q - 8) * scale + zero_point, so zero_point = (8 - zero) * scale; groups 32..256 only."""
    if group not in (32, 64, 128, 256):
        raise ValueError(f"tinygemm takes groups 32..256, not {group}")
    codes = w["codes"].to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
    scales = w["scales"].float()
    sz = torch.stack([scales, (8 - w["zeros"].float()) * scales], dim=-1).bfloat16().contiguous()
    packs = [packed] + [packed.clone() for _ in range(copies - 1)]
    return lambda x: [lambda p=p: torch.ops.aten._weight_int4pack_mm(x.bfloat16(), p, group, sz) for p in packs]


def gemlite_fns(w, k, n, group, copies):
    from gemlite.helper import A16Wn

    layers = [A16Wn(device="cuda", dtype=torch.float16).from_weights(
        w["codes"].to(torch.uint8), w["scales"].t().contiguous(), w["zeros"].t().contiguous(), W_nbits=4,
        group_size=group) for _ in range(copies)]
    return lambda x: [lambda layer=layer: layer(x) for layer in layers]


def bench(args):
    gen = torch.Generator(device="cuda").manual_seed(0)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.random_(0, 255)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    bw = 2 * src.numel() / copy_ms / 1e9  # TB/s = bytes / ms / 1e9
    del src, dst
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                sms=torch.cuda.get_device_properties(0).multi_processor_count, l2_mb=l2_bytes() / 2**20,
                copy_tb_s=round(bw, 3))
    try:
        import gemlite
        info["gemlite"] = getattr(gemlite, "__version__", "?")
    except ImportError:
        info["gemlite"] = None
    log(json.dumps(info))
    impls = args.impls.split(",")
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        dense = None
        cublas_us = {}
        for gname in args.groups.split(","):
            if time.time() - T0 > args.budget_s:
                log(f"time budget {args.budget_s} s reached: skipping {shape} {gname}")
                continue
            group = k if gname == "pc" else int(gname)
            w = make_weight(n, k, group, gen)
            gidx = torch.arange(k, device="cuda") // group
            wref = (w["codes"].t().float() - w["zeros"].float()[gidx]) * w["scales"].float()[gidx]  # [K, N]
            if "cublas" in impls and dense is None:
                dense = [wref.half() for _ in range(copies_for(k * n * 2))]
            qbytes = k * n // 2 + 2 * (k // group) * n * 2
            n_copies = copies_for(qbytes)
            makers = {}
            for name in impls:
                maker = dict(tquant=tquant_fns, tinygemm=tinygemm_fns, gemlite=gemlite_fns).get(name)
                if maker is None:
                    continue
                try:
                    makers[name] = maker(w, k, n, group, n_copies)
                except Exception as err:  # noqa: BLE001
                    log(f"{name} unavailable for {shape} g{gname}: {type(err).__name__}: {str(err)[:200]}")
            for m in [int(v) for v in args.ms.split(",")]:
                x = torch.randn(m, k, generator=gen, device="cuda").half()
                ref = x.float() @ wref
                floor_us = floor_bytes(m, k, n, group) / (bw * 1e6)
                row = dict(K=k, N=n, M=m, group=gname, floor_us=round(floor_us, 2))
                if "cublas" in impls:
                    if m not in cublas_us:
                        cublas_us[m] = graph_us([lambda d=d: x @ d for d in dense])
                    row["cublas"] = round(cublas_us[m], 2)
                for name, make in makers.items():
                    try:
                        fns = make(x)
                        row[f"err_{name}"] = float(f"{rel_err(fns[0](), ref):.2e}")
                        row[name] = round(graph_us(fns), 2)
                    except Exception as err:  # noqa: BLE001
                        log(f"{name} failed at {shape} M={m} g{gname}: {type(err).__name__}: {str(err)[:300]}")
                rows.append(row)
                log(json.dumps(row) + f"  [{time.time() - T0:.0f} s]")
            del makers, w, wref
        del dense
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "w4a16_profile.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    names = [i for i in impls if any(i in r for r in rows)]
    log(f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, copy {bw:.2f} TB/s; "
        "us (x floor); err = max rel. error of that impl")
    log(f"{'K->N':>12} {'g':>4} {'M':>3} {'floor':>6} | " + " | ".join(f"{nm:>15}" for nm in names))
    for r in rows:
        cells = [f"{r[nm]:7.1f} ({r[nm] / r['floor_us']:4.2f}x)" if nm in r else f"{'n/a':>15}" for nm in names]
        log(f"{r['K']:>5}->{r['N']:<6} {r['group']:>4} {r['M']:>3} {r['floor_us']:6.1f} | " + " | ".join(cells))


def ncu_case(spec):
    """Run one impl (tuned first, config from TQUANT_AUTOTUNE_DIR) a few times, then once more with the profiler on, for
    `ncu --profile-from-start off` to catch that launch alone."""
    parts = spec.split(",")
    k, n, m = map(int, parts[:3])
    name = parts[3]
    group = int(parts[4]) if len(parts) > 4 and parts[4] != "pc" else (k if len(parts) > 4 else 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = make_weight(n, k, group, gen)
    maker = dict(tquant=tquant_fns, tinygemm=tinygemm_fns, gemlite=gemlite_fns)[name]
    fn = maker(w, k, n, group, 1)(torch.randn(m, k, generator=gen, device="cuda").half())[0]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,14336x4096,4096x6144,4096x4096,4096x28672")
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--groups", default="128,pc")
    ap.add_argument("--impls", default="tquant,cublas,tinygemm,gemlite")
    ap.add_argument("--budget-s", type=float, default=330)
    ap.add_argument("--ncu-case", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.ncu_case:
        ncu_case(args.ncu_case)
    else:
        bench(args)


if __name__ == "__main__":
    main()
