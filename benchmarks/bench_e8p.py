"""E8P (QuIP#) lattice-codebook matmul on the GPU: correctness of every candidate, then timings against peers.

    python benchmarks/bench_e8p.py [--ms 1,16] [--shapes 4096x14336,14336x4096] [--bits 2,3,4] [--out DIR]

For each shape K->N and batch M (fp16 activations) it times:
    e8p{2,3,4}  tquant e8p_matmul at 2, 3, 4 bits (tuned on the first call; the chosen config is printed)
    cublas      x @ w.T with a dense random fp16 w [N, K] (torch)
    w4a16       tquant weight_only_matmul, 4-bit group-128 packed weights (as bench_weight_only builds them)
Timings are medians in us: "graph" from triton.testing.do_bench_cudagraph over replays that rotate through
enough weight copies (>= 3x a 50 MB L2) that the weights come from HBM, "eager" from triton.testing.do_bench
(which flushes L2 before each call; for microsecond kernels it mostly measures the host). "x roof" is the
graph time over the byte roofline: weight bytes / 3.35e12 B/s, with the bytes stated per row (E8P: codes
2 B + codes2 1 B (3 bits) or 2 B (4 bits) per 8 weights, plus the 3 KB of decoding tables).
Before timing, every tuning candidate of every (shape, M, bits) is checked against the fp32 torch reference
(e8p_matmul_ref), as are the tuned e8p_matmul call and the W4A16 peer. TQUANT_AUTOTUNE_DIR decides where
the tuned configs go (copy that file to autotune_cache/ to ship them).
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
from bench_weight_only import copies_for, make_weight, record_tuning, rel_err, time_rotating  # noqa: E402
from tquant.kernels import autotune_cache
from tquant.kernels.e8p_matmul import (
    CODES2_DTYPE,
    candidates,
    e8p_matmul,
    e8p_matmul_ref,
    run_path,
    table_words,
)
from tquant.kernels.runtime import next_power_of_2
from tquant.kernels.weight_only_matmul import weight_only_matmul, weight_only_matmul_ref

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
TOL = 5e-3  # relative error (norm) against the fp32 reference, fp16 output


def e8p_weight(k, n, bits, gen):
    """Random E8P codes over all 2^16 indices (and codes2 for bits): (codes, codes2)."""
    codes = torch.randint(-2**15, 2**15, (k // 8, n), generator=gen, device="cuda", dtype=torch.int32).to(torch.int16)
    if bits == 2:
        return codes, None
    hi = 256 if bits == 3 else 2**16
    lo = 0 if bits == 3 else -2**15
    codes2 = torch.randint(lo, lo + hi, (k // 8, n), generator=gen, device="cuda", dtype=torch.int32)
    return codes, codes2.to(CODES2_DTYPE[bits])


def e8p_bytes(k, n, bits):
    per_code = {2: 2, 3: 3, 4: 4}[bits]
    return k // 8 * n * per_code + table_words().numel() * 4


def check_candidates(x, codes, codes2, bits, print_fn):
    """Every tuning candidate for this key against the reference: the worst error per path."""
    ref = e8p_matmul_ref(x, codes, codes2, bits=bits)
    worst = {}
    for config in candidates(next_power_of_2(x.shape[0]), codes.shape[1], codes.shape[0]):
        try:
            err = rel_err(run_path(config, x, codes, codes2, None, bits=bits), ref)
        except Exception as e:  # noqa: BLE001
            print_fn(f"  FAILED {config}: {type(e).__name__}: {e}")
            err = float("inf")
        if err > TOL:
            print_fn(f"  TOO LARGE {err:.2e}: {config}")
        worst[config["path"]] = max(worst.get(config["path"], 0.0), err)
    return worst


def bench_shape(k, n, ms, bits_list, gen, tuned, print_fn):
    rows = []
    dense = torch.randn(n, k, generator=gen, device="cuda").half() * 0.02
    dcopies = [dense] + [dense.clone() for _ in range(copies_for(dense.numel() * 2) - 1)]
    w = make_weight(n, k, 4, 128, torch.float16, False, gen)
    q = w["qweight"], w["scales"], w["zeros"]
    w4_bytes = q[0].numel() * 4 + 2 * q[1].numel() * 2
    qcopies = [q] + [tuple(t.clone() for t in q) for _ in range(copies_for(w4_bytes) - 1)]
    weights = {bits: e8p_weight(k, n, bits, gen) for bits in bits_list}
    for m in ms:
        x = torch.randn(m, k, generator=gen, device="cuda").half()
        for bits in bits_list:
            codes, codes2 = weights[bits]
            nbytes = e8p_bytes(k, n, bits)
            row = {"K": k, "N": n, "M": m, "kernel": f"e8p{bits}", "bytes": nbytes}
            print_fn(f"\n-- K={k} N={n} M={m} e8p {bits}-bit: weight bytes {nbytes} (codes {k // 8 * n * 2}"
                     f"{f' + codes2 {k // 8 * n * codes2.element_size()}' if codes2 is not None else ''}"
                     f" + tables {table_words().numel() * 4}) --")
            try:
                row["worst_candidate_err"] = check_candidates(x, codes, codes2, bits, print_fn)
                t0 = time.time()
                y = e8p_matmul(x, codes, codes2, bits=bits)
                row["tune_s"] = round(time.time() - t0, 1)
                row["config"] = tuned.pop("last", "cached")
                row["err"] = rel_err(y, e8p_matmul_ref(x, codes, codes2, bits=bits))
                copies = [(codes, codes2)] + [(codes.clone(), codes2.clone() if codes2 is not None else None)
                                              for _ in range(copies_for(nbytes) - 1)]
                row["us"] = time_rotating([lambda c=c, x=x, b=bits: e8p_matmul(x, c[0], c[1], bits=b) for c in copies])
            except Exception as e:  # noqa: BLE001
                print_fn(f"  e8p {bits}-bit failed: {type(e).__name__}: {e}")
            rows.append(row)
            print_fn(json.dumps(row, default=str))
        ref = x.float() @ dense.float().t()
        row = {"K": k, "N": n, "M": m, "kernel": "cublas", "bytes": dense.numel() * 2,
               "err": rel_err(x @ dense.t(), ref)}
        row["us"] = time_rotating([lambda d=d, x=x: x @ d.t() for d in dcopies])
        rows.append(row)
        print_fn(json.dumps(row, default=str))
        kw = {"bits": 4, "group_size": 128, "in_features": k}
        row = {"K": k, "N": n, "M": m, "kernel": "w4a16", "bytes": w4_bytes}
        try:
            y = weight_only_matmul(x, *q, **kw)
            row["config"] = tuned.pop("last", "cached")
            row["err"] = rel_err(y, weight_only_matmul_ref(x, *q, **kw))
            row["us"] = time_rotating([lambda c=c, x=x, kw=kw: weight_only_matmul(x, *c, **kw) for c in qcopies])
        except Exception as e:  # noqa: BLE001
            print_fn(f"  w4a16 failed: {type(e).__name__}: {e}")
        rows.append(row)
        print_fn(json.dumps(row, default=str))
    return rows


def run(print_fn=print, ms=(1, 16), shapes=((4096, 14336), (14336, 4096)), bits_list=(2, 3, 4)):
    """Check and time everything; print a table and return the rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_e8p needs a CUDA GPU")
    os.environ.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    print_fn(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"autotune dir {autotune_cache.user_dir()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tuned = {}
    real = record_tuning(tuned, print_fn)
    try:
        rows = []
        for k, n in shapes:
            rows += bench_shape(k, n, ms, bits_list, gen, tuned, print_fn)
            print_fn(f"[{time.time() - t0:.0f} s]")
    finally:
        autotune_cache.benchmark = real
    print_fn(f"\nroofline: weight bytes / {HBM_BYTES_PER_S:.3g} B/s; x roof = graph time / roofline time")
    print_fn(f"{'K->N':>12} {'M':>3} {'kernel':>7} {'weight bytes':>13} {'graph us':>9} {'eager us':>9} "
             f"{'x roof':>7} {'rel err':>8}  config")
    for r in rows:
        if "us" not in r:
            print_fn(f"{r['K']:>5}->{r['N']:<5} {r['M']:>3} {r['kernel']:>7} {r['bytes']:>13}  failed")
            continue
        roof_us = r["bytes"] / HBM_BYTES_PER_S * 1e6
        config = r.get("config", "")
        print_fn(f"{r['K']:>5}->{r['N']:<5} {r['M']:>3} {r['kernel']:>7} {r['bytes']:>13} {r['us'][0]:9.2f} "
                 f"{r['us'][1]:9.2f} {r['us'][0] / roof_us:7.2f} {r.get('err', float('nan')):8.1e}  {config}")
    bad = [r for r in rows if r.get("err", float("inf")) > TOL
           or any(e > TOL for e in r.get("worst_candidate_err", {}).values())]
    print_fn(f"correctness: {'OK' if not bad else f'{len(bad)} rows over {TOL:g}'} ({time.time() - t0:.0f} s)")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--shapes", default="4096x14336,14336x4096")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    rows = run(lambda *a: print(*a, flush=True), ms=[int(m) for m in args.ms.split(",")],
               shapes=[tuple(map(int, s.split("x"))) for s in args.shapes.split(",")],
               bits_list=[int(b) for b in args.bits.split(",")])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_e8p.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "rows": rows},
            indent=1, default=str))


if __name__ == "__main__":
    main()
