"""Weight-only matmul on the GPU: correctness of every path, autotuning, and timings against peers.

    python benchmarks/bench_weight_only.py [--ms 1,16,256,4096] [--shapes 4096x14336,14336x4096] [--out DIR]

For each shape K->N and batch M (fp16 activations, W4A16, group 128) it times:
    tquant      weight_only_matmul (tuned on first call; the chosen path and config are printed)
    cublas      x @ w with a dense fp16 w (torch)
    tinygemm    torch.ops.aten._weight_int4pack_mm (bf16 activations, as that op requires)
    gemlite     gemlite A16Wn 4-bit group 128 (if importable)
Timings are medians: "graph" from triton.testing.do_bench_cudagraph over replays that rotate through
enough weight copies to overflow L2, "eager" from triton.testing.do_bench (which flushes L2 each call).
Before timing, every path of tquant (gemv, gemm in place, gemm tiled, dense) is checked against the
torch reference for bits 2/3/4/8 with and without perm, fp16 and bf16 (the GEMM's packed half2
dequantization for 2/4/8 bits, the fp32 one for 3 bits and bf16 8-bit). TQUANT_AUTOTUNE_DIR decides
where the tuned configs go (copy that file to autotune_cache/ to ship it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tquant.kernels import autotune_cache, dequant_gemm, dequant_gemv  # noqa: E402
from tquant.kernels.runtime import device_name  # noqa: E402
from tquant.kernels.weight_only_matmul import DENSE, run_path, weight_only_matmul, weight_only_matmul_ref  # noqa: E402
from tquant.formats.packing import pack_codes  # noqa: E402

L2_BYTES = 50 * 2**20
T0 = time.time()


def log(*args):
    print(*args, flush=True)


def make_weight(n, k, bits, group_size, dtype, perm, gen):
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, device="cuda")
    g = k // group_size
    scales = (torch.rand(g, n, generator=gen, device="cuda") * 0.02 + 0.002).to(dtype)
    zeros = torch.randint(0, 2**bits, (g, n), generator=gen, device="cuda").to(dtype)
    p = torch.randperm(k, generator=gen, device="cuda").to(torch.int32) if perm else None
    return dict(codes=codes, qweight=pack_codes(codes, bits), scales=scales, zeros=zeros, perm=p)


def rel_err(y, ref):
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def check_paths(k, n, ms, gen):
    """Every path's first config vs the reference, bits 2/3/4/8, with/without perm, fp16 and bf16 (g128 or
    per-channel)."""
    log(f"\n== correctness of every path, K={k} N={n} (rel. error vs torch fp32 reference) ==")
    worst = {torch.float16: 0.0, torch.bfloat16: 0.0}
    for dtype, bits, perm in itertools.product(worst, (2, 3, 4, 8), (False, True)):
        for group_size in ((128, k) if bits == 4 else (128,)):
            w = make_weight(n, k, bits, group_size, dtype, perm, gen)
            bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
            row = []
            for m in ms:
                x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
                args = (x, w["qweight"], w["scales"], w["zeros"], w["perm"], bias)
                kw = dict(bits=bits, group_size=group_size, in_features=k)
                ref = weight_only_matmul_ref(*args[:4], perm=w["perm"], bias=bias, **kw)
                if m == 1:
                    paths = {"gemv": dequant_gemv.configs(n, w["qweight"].shape[0])[0]}
                else:
                    gemm = dequant_gemm.configs(m, n, w["qweight"].shape[0])
                    paths = {"gemm": gemm[0], "dense": DENSE}
                    paths.update(("gemm split-K", c) for c in gemm if c["SPLIT_K"] > 1)  # the last one, if any
                for name, config in paths.items():
                    try:
                        err = rel_err(run_path(config, *args, **kw), ref)
                    except Exception as e:  # noqa: BLE001
                        log(f"  FAILED bits={bits} perm={perm} M={m} {name} {config}: {type(e).__name__}: {e}")
                        err = float("inf")
                    worst[dtype] = max(worst[dtype], err)
                    row.append(f"M={m} {name}: {err:.1e}")
            log(f"{str(dtype)[6:]} bits={bits} perm={int(perm)} group={group_size}: " + ", ".join(row))
    ok = worst[torch.float16] < 5e-3 and worst[torch.bfloat16] < 2e-2
    log(f"worst relative error: fp16 {worst[torch.float16]:.2e}, bf16 {worst[torch.bfloat16]:.2e} "
        f"({'OK' if ok else 'TOO LARGE'}), {time.time() - T0:.0f} s")
    return max(worst.values())


def copies_for(nbytes):
    return max(2, -(-3 * L2_BYTES // nbytes))


def rotating(fns):
    """One call a step, cycling through fns (each on its own weight copy, so the weights come from HBM); called once."""
    i = [0]

    def step():
        fns[i[0] % len(fns)]()
        i[0] += 1

    step()
    torch.cuda.synchronize()
    return step


def graph_us(fns, rep=200):
    """Median us of CUDA-graph replays of the rotating calls (triton.testing.do_bench_cudagraph)."""
    return triton.testing.do_bench_cudagraph(rotating(fns), rep=rep, return_mode="median") * 1e3


def time_rotating(fns):
    """(graph us, eager us): medians over calls that rotate through fns (each on its own weight copy)."""
    step = rotating(fns)
    graph = triton.testing.do_bench_cudagraph(step, rep=200, return_mode="median") * 1e3
    eager = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") * 1e3
    return graph, eager


def tinygemm_fns(w, k, n, group_size, copies):
    """torch's int4 tinygemm: w = (q - 8) * scale + zero_point, so zero_point = (8 - zero) * scale."""
    codes = w["codes"].to(torch.int32)
    packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    scales = w["scales"].float()
    sz = torch.stack([scales, (8 - w["zeros"].float()) * scales], dim=-1).bfloat16().contiguous()
    packs = [packed] + [packed.clone() for _ in range(copies - 1)]
    return lambda x: [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p, group_size, sz) for p in packs]


def gemlite_fns(w, k, n, group_size, copies):
    from gemlite.helper import A16Wn

    layers = [A16Wn(device="cuda", dtype=torch.float16).from_weights(
        w["codes"].to(torch.uint8), w["scales"].t().contiguous(), w["zeros"].t().contiguous(), W_nbits=4,
        group_size=group_size) for _ in range(copies)]
    return lambda x: [lambda layer=layer: layer(x) for layer in layers]


def bench_shape(k, n, ms, gen, peers, tuned):
    group_size, bits = 128, 4
    log(f"\n== W4A16 g128, K={k} -> N={n}, fp16 ==")
    w = make_weight(n, k, bits, group_size, torch.float16, False, gen)
    qbytes = w["qweight"].numel() * 4 + 2 * w["scales"].numel() * 2
    n_q = copies_for(qbytes)
    qcopies = [(w["qweight"].clone(), w["scales"].clone(), w["zeros"].clone()) for _ in range(n_q)]
    g = torch.arange(k, device="cuda") // group_size
    wdense = (w["codes"].t().float() - w["zeros"].float()[g]) * w["scales"].float()[g]  # [K, N] fp32
    dcopies = [wdense.half() for _ in range(copies_for(wdense.numel() * 2))]
    makers = {}
    if "tinygemm" in peers:
        try:
            makers["tinygemm"] = tinygemm_fns(w, k, n, group_size, n_q)
        except Exception as err:  # noqa: BLE001
            log(f"tinygemm unavailable: {type(err).__name__}: {err}")
    if "gemlite" in peers:
        try:
            makers["gemlite"] = gemlite_fns(w, k, n, group_size, n_q)
        except Exception as err:  # noqa: BLE001
            log(f"gemlite unavailable: {type(err).__name__}: {err}")
    deq = time_rotating([lambda q=q: dequant_gemm.dequantize(q[0], q[1], q[2], None, bits=bits, group_size=group_size,
                                                              in_features=k, dtype=torch.float16) for q in qcopies])
    log(f"dequantize to fp16 alone (graph/eager us): {deq[0]:.1f}/{deq[1]:.1f}")
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device="cuda").half()
        ref = x.float() @ wdense.float()
        kw = dict(bits=bits, group_size=group_size, in_features=k)
        t0 = time.time()
        y = weight_only_matmul(x, w["qweight"], w["scales"], w["zeros"], **kw)
        tune_s = time.time() - t0
        res = {"M": m, "err_tquant": rel_err(y, ref), "tune_s": round(tune_s, 1), "config": tuned.pop("last", "cached")}
        res["tquant"] = time_rotating([
            lambda q=q: weight_only_matmul(x, q[0], q[1], q[2], **kw) for q in qcopies])
        res["err_cublas"] = rel_err(x @ dcopies[0], ref)
        res["cublas"] = time_rotating([lambda d=d: x @ d for d in dcopies])
        for name, make in makers.items():
            xp = x.bfloat16() if name == "tinygemm" else x
            try:
                fns = make(xp)
                res[f"err_{name}"] = rel_err(fns[0]().float().reshape(m, n), ref)
                res[name] = time_rotating(fns)
            except Exception as err:  # noqa: BLE001
                log(f"{name} failed at M={m}: {type(err).__name__}: {err}")
        rows.append(res)
        log(json.dumps(res, default=str) + f"  [{time.time() - T0:.0f} s]")
    return rows


def record_tuning(tuned, print_fn=log, label=None):
    """Wrap the tuner's benchmark to print the 5 fastest configs of every key it tunes (with label(config), the
    fastest of each label instead); returns the original."""
    real = autotune_cache.benchmark

    def recording(configs, run):
        timed = real(configs, run)
        print_fn(f"  tuned {len(configs)} candidates ({len(timed)} ran); fastest" + (" of each kind:" if label else ":"))
        shown = timed[:5] if label is None else [next(t for t in timed if label(t[1]) == name)
                                                 for name in dict.fromkeys(label(c) for _, c in timed)]
        for us, config in shown:
            print_fn(f"    {us:9.2f} us  {config}")
        tuned["last"] = timed[0][1]
        return timed

    autotune_cache.benchmark = recording
    return real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16,256,4096")
    ap.add_argument("--shapes", default="4096x14336,14336x4096")
    ap.add_argument("--peers", default="cublas,tinygemm,gemlite")
    ap.add_argument("--check", default="4096x14336", help="shape(s) for the every-path correctness sweep ('' = none)")
    ap.add_argument("--tune-ms", default="", help="more batch sizes to tune (no timing), to fill the shipped cache")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    log(f"GPU {torch.cuda.get_device_name()} ({device_name(torch.device('cuda'))}), torch {torch.__version__}, "
        f"triton {triton.__version__}, autotune dir {autotune_cache.user_dir()}")
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    log(f"device copy: {2 * src.numel() / copy_ms / 1e9:.2f} TB/s (read + write)")
    del src, dst
    worst = 0.0
    for shape in filter(None, args.check.split(",")):
        k, n = map(int, shape.split("x"))
        worst = max(worst, check_paths(k, n, [1, 16, 256], gen))
    tuned = {}
    record_tuning(tuned)
    results = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        rows = bench_shape(k, n, ms, gen, args.peers.split(","), tuned)
        for r in rows:
            r["K"], r["N"] = k, n
        results += rows
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_weight_only.json").write_text(json.dumps(
        dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
             worst_check_error=worst, results=results), indent=1, default=str))
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = make_weight(n, k, 4, 128, torch.float16, False, gen)
        for m in filter(None, args.tune_ms.split(",")):
            log(f"tuning K={k} N={n} M={m}")
            x = torch.randn(int(m), k, generator=gen, device="cuda").half()
            weight_only_matmul(x, w["qweight"], w["scales"], w["zeros"], bits=4, group_size=128, in_features=k)
    peers = [p for p in ("cublas", "tinygemm", "gemlite") if any(p in r for r in results)]
    log("\nK->N        M | tquant graph/eager us | " + " | ".join(f"{p} graph/eager (x tquant)" for p in peers))
    for r in results:
        t = r["tquant"]
        cells = [f"{r[p][0]:8.1f}/{r[p][1]:8.1f} ({r[p][0] / t[0]:4.2f}x)" if p in r else "n/a" for p in peers]
        log(f"{r['K']}->{r['N']} {r['M']:5d} | {t[0]:8.1f}/{t[1]:8.1f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
