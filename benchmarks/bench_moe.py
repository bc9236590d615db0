"""Grouped W4A16 MoE matmul (tquant.kernels.moe_matmul) against a per-expert loop and dense fp16, at Mixtral-like shapes.

    python benchmarks/bench_moe.py [--tokens 1,4,16,64] [--experts 8] [--topk 2] [--hidden 4096] [--inter 14336]
                                   [--group 128] [--out DIR]

For each projection (gate_up: hidden -> 2 * inter on a row a token; down: inter -> hidden on a row a slot) and T tokens
routed to top-k of E experts (random, distinct per token), fp16 activations, 4-bit weights:
    grouped    grouped_weight_only_matmul: one launch (+ moe_align's small torch ops), tuned on its first call
    loop       weight_only_matmul once per hit expert on its gathered rows (routing read on the host beforehand, as a
               graph-captured loop would have it; PackedExperts' old Triton path, minus its torch.unique sync)
    fp16-loop  x_e @ w_e with dense fp16 weights of the hit experts, once per hit expert
    fp16-bmm   torch.bmm over all E experts' dense fp16 weights, rows padded to the busiest expert, gathered back
and the byte floor of the grouped read (hit experts' packed weights, scales and zeros) at the copy bandwidth measured
in the same run. Times are medians of triton.testing.do_bench_cudagraph; the experts' weights (E * K * N / 2 bytes a
projection, 470 MB for Mixtral's gate_up) are far over the L2, so they come from HBM. Each impl is checked against the
fp32 reference once. Not yet run: the numbers go to benchmarks/RESULTS.md from the next GPU session.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tquant.formats.packing import pack_codes  # noqa: E402
from tquant.kernels.moe_matmul import grouped_weight_only_matmul, grouped_weight_only_matmul_ref  # noqa: E402
from tquant.kernels.weight_only_matmul import weight_only_matmul  # noqa: E402


def graph_us(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3


def copy_gbps():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_us(lambda: b.copy_(a))
    return 2 * a.numel() / us / 1e3


def make_experts(e, k, n, group, gen):
    """4-bit packed experts and their dense fp16 weights [E, K, N], built one expert at a time (memory)."""
    g = k // group
    scales = (torch.rand(e, g, n, generator=gen, device="cuda") * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (e, g, n), generator=gen, device="cuda").half()
    qweight = torch.empty(e, k // 8, n, dtype=torch.int32, device="cuda")
    dense = torch.empty(e, k, n, dtype=torch.float16, device="cuda")
    for ex in range(e):
        codes = torch.randint(0, 16, (n, k), generator=gen, device="cuda", dtype=torch.uint8)
        qweight[ex] = pack_codes(codes, 4)
        dense[ex] = ((codes.t().float() - zeros[ex].float().repeat_interleave(group, 0))
                     * scales[ex].float().repeat_interleave(group, 0)).half()
    return dict(qweight=qweight, scales=scales, zeros=zeros, dense=dense)


def impls(w, x, ids, group, k):
    e, n = w["qweight"].shape[0], w["qweight"].shape[2]
    t, topk = ids.shape
    kw = dict(bits=4, group_size=group, in_features=k)
    xs = x if x.dim() == 3 else x[:, None].expand(t, topk, k)
    hit = sorted(set(ids.flatten().tolist()))
    where = {ex: torch.where(ids == ex) for ex in hit}
    rows = max(len(where[ex][0]) for ex in hit)

    def loop(dense):
        y = x.new_zeros(t, topk, n)
        for ex, (tok, slot) in where.items():
            xe = xs[tok, slot]
            y[tok, slot] = xe @ w["dense"][ex] if dense else weight_only_matmul(
                xe, w["qweight"][ex], w["scales"][ex], w["zeros"][ex], **kw)
        return y

    padded = x.new_zeros(e, rows, k)
    pos = torch.zeros(t, topk, dtype=torch.long, device=x.device)  # each pair's row in the padded bmm output
    for ex, (tok, slot) in where.items():
        padded[ex, :len(tok)] = xs[tok, slot]
        pos[tok, slot] = ex * rows + torch.arange(len(tok), device=x.device)
    return {
        "grouped": lambda: grouped_weight_only_matmul(x, w["qweight"], w["scales"], w["zeros"], ids, **kw),
        "loop": lambda: loop(False),
        "fp16-loop": lambda: loop(True),
        "fp16-bmm": lambda: torch.bmm(padded, w["dense"]).view(-1, n)[pos],
    }, len(hit)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s; {torch.cuda.get_device_name()}", flush=True)
    h, i, e = args.hidden, args.inter, args.experts
    results = []
    for proj, k, n in (("gate_up", h, 2 * i), ("down", i, h)):
        w = make_experts(e, k, n, args.group, gen)
        for t in map(int, args.tokens.split(",")):
            ids = torch.stack([torch.randperm(e, generator=gen, device="cuda")[:args.topk] for _ in range(t)])
            x = torch.randn(t, k, device="cuda", generator=gen).half() if proj == "gate_up" else \
                torch.randn(t, args.topk, k, device="cuda", generator=gen).half()
            ref = grouped_weight_only_matmul_ref(x, w["qweight"], w["scales"], w["zeros"], ids, bits=4,
                                                 group_size=args.group, in_features=k).float()
            fns, hit = impls(w, x, ids, args.group, k)
            floor_us = hit * (k * n // 2 + 2 * 2 * (k // args.group) * n) / bw / 1e3
            row = dict(proj=proj, T=t, K=k, N=n, hit=hit, floor_us=round(floor_us, 1))
            for name, fn in fns.items():
                err = ((fn().float().reshape(ref.shape) - ref).norm() / ref.norm()).item()
                row[name] = round(graph_us(fn), 1) if err < 1e-2 else f"wrong ({err:.1e})"
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_moe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
