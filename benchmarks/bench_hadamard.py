"""Walsh-Hadamard transform on the GPU: tquant's Triton kernel against a plain copy of the same bytes and the
dense matmul x @ H^T (cuBLAS fp16).

    python benchmarks/bench_hadamard.py [--json results.json] [--sweep]

fp16 x [rows, n]; for each shape:
    hadamard       y = hadamard_transform(x)              (out of place, y allocated per call)
    hadamard (in)  hadamard_transform(x, out=x)           (in place)
    copy           out.copy_(x) into a preallocated tensor: the bandwidth to compare with
    dense fp16     x @ Ht with Ht = H_n^T precomputed (fp16, cuBLAS)
Medians in us: "graph" = triton.testing.do_bench_cudagraph, "eager" = triton.testing.do_bench. GB/s counts the
bytes read and written (2 * rows * n * 2); "vs copy" is copy's graph time over the op's graph time (1.00 = copy
bandwidth). Each output is checked against the torch reference (and the dense product) before timing; the
kernel's launch config is tuned on first use (autotune_cache) and printed. --sweep also times every launch
candidate (plan N0xN1xN2, BLOCK_R, GROUPS, warps) of the large shapes, graph time, fastest first.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tquant.formats.hadamard import hadamard_dense
from tquant.kernels import hadamard as kernels
from tquant.kernels.hadamard import (
    hadamard_transform,
    hadamard_transform_ref,
    tuned_config,
)

SHAPES = [(1, 4096), (16, 4096), (4096, 4096), (4096, 14336), (1, 14336), (16, 576), (4096, 1536)]


def bench(fn):
    """(graph, eager) medians in us (triton.testing reports ms)."""
    return (1e3 * triton.testing.do_bench_cudagraph(fn, rep=100),
            1e3 * triton.testing.do_bench(fn, rep=100, return_mode="median"))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench_shape(rows, n):
    """{op: (graph us, eager us)} for fp16 x [rows, n], the kernel's config and its errors, after checking it."""
    g = torch.Generator(device="cuda").manual_seed(rows * n)
    x = torch.randn(rows, n, device="cuda", dtype=torch.float16, generator=g)
    ht = hadamard_dense(n, torch.float16).T.contiguous().cuda()
    y = hadamard_transform(x)
    err, err_dense = rel(y, hadamard_transform_ref(x)), rel(y, x.float() @ ht.float())
    back = rel(hadamard_transform(y, transpose=True), x)
    if not (err < 2e-3 and err_dense < 2e-3 and back < 2e-3):
        raise AssertionError(f"{rows}x{n}: relative error {err:.2e} vs reference, {err_dense:.2e} vs dense, "
                             f"{back:.2e} after the inverse")
    z, out = x.clone(), torch.empty_like(x)
    ops = {
        "hadamard": lambda: hadamard_transform(x),
        "hadamard (in)": lambda: hadamard_transform(z, out=z),
        "copy": lambda: out.copy_(x),
        "dense fp16": lambda: x @ ht,
    }
    return {name: bench(fn) for name, fn in ops.items()}, tuned_config(x), err, err_dense


def run(print_fn=print, shapes=SHAPES):
    """Time every shape; print a table and return its rows as dicts."""
    print_fn(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    header = f"{'rows x n':>14} {'op':<14} {'graph us':>9} {'eager us':>9} {'GB/s':>8} {'vs copy':>8}  note"
    print_fn(header)
    print_fn("-" * len(header))
    results = []
    for rows, n in shapes:
        times, config, err, err_dense = bench_shape(rows, n)
        nbytes = 2 * rows * n * 2
        copy_us = times["copy"][0]
        for name, (graph, eager) in times.items():
            note = ""
            if name == "hadamard":
                note = (f"err {err:.1e} (dense {err_dense:.1e}); plan {config['N0']}x{config['N1']}x{config['N2']} "
                        f"R={config['BLOCK_R']} G={config['GROUPS']} warps={config['num_warps']} "
                        f"stages={config['num_stages']}")
            row = {"rows": rows, "n": n, "op": name, "graph_us": round(graph, 2), "eager_us": round(eager, 2),
                   "gb_s": round(nbytes / graph / 1e3, 1), "vs_copy": round(copy_us / graph, 3), "note": note}
            results.append(row)
            print_fn(f"{f'{rows}x{n}':>14} {name:<14} {graph:9.2f} {eager:9.2f} {row['gb_s']:8.1f} "
                     f"{row['vs_copy']:8.2f}  {note}")
    return results


def sweep(rows, n, print_fn=print):
    """Graph time of every launch candidate for fp16 x [rows, n] (those that fail to launch are named)."""
    x = torch.randn(rows, n, device="cuda", dtype=torch.float16)
    y = torch.empty_like(x)
    ref = hadamard_transform_ref(x)
    timed = []
    for config in kernels.configs(n, rows):
        try:
            kernels.launch(config, x, y, False)
            err = rel(y, ref)
            us = 1e3 * triton.testing.do_bench_cudagraph(lambda c=config: kernels.launch(c, x, y, False), rep=50)
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run (shared memory, registers)
            print_fn(f"  {rows}x{n} {config}: failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        timed.append((us, err, config))
    for us, err, c in sorted(timed, key=lambda t: t[0]):
        print_fn(f"  {rows}x{n} {us:9.2f} us  err {err:.1e}  plan {c['N0']}x{c['N1']}x{c['N2']} R={c['BLOCK_R']} "
                 f"G={c['GROUPS']} warps={c['num_warps']} stages={c['num_stages']}")
    return timed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None, help="also write the table here")
    p.add_argument("--sweep", action="store_true", help="also time every launch candidate of the large shapes")
    a = p.parse_args()
    results = run()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    if a.sweep:
        for rows, n in SHAPES:
            if rows >= 4096:
                sweep(rows, n)


if __name__ == "__main__":
    main()
