"""CPU forward of a quantized model (the torch reference path) against the float one.

    python benchmarks/cpu_forward.py                        # float32, RTN W4 g64 and W8 g64; 5 rounds
    python benchmarks/cpu_forward.py --rounds 9 --decode 32 --profile

The offline SmolLM2-135M (tquant.models.load_model("default"), float32) and copies quantized with RTN (fast to
make; GPTQ writes the same format). Two regimes, timed per variant, the variants interleaved round by round and
the median kept (the CPU may be shared: medians of interleaved rounds compare like with like):
    prefill   one forward of 1 x --tokens tokens (no cache)
    decode    --decode greedy steps at batch 1 after a 16-token prompt, with the KV cache: ms per token
--profile prints torch.profiler's top operators of one prefill and one decode step of each quantized variant.
--cache-weights also times each quantized variant with its dequantized-weight cache on (tquant.modules.
PackedLinear.cache_weights: float memory again, opt-in); --bf16-cache with cache_weights="bfloat16" (2 bytes a
weight, bf16 matmul); --bf16-compute with cpu_precision="bfloat16" (bf16 maths, no dequantized weight kept);
--reference also times it on weight_only_matmul_ref (the CPU path before tquant.kernels.cpu_matmul), --previous on
the byte-unpack dequantization + one matmul (cpu_matmul's default before issue 28), so before and after share one
process and its rounds. --threads 1 --cpu-time (CPU seconds) is the fairer measure on a shared CPU.
--layers times single layers instead (the model's shapes, M = 1 and --tokens, 4 and 8 bits g64): float matmul,
the previous default, packed_matmul (the default now), its whole-weight form at M = 1, design (b) (grouped_matmul,
M = 1 only), the bf16 cache's matmul, cpu_precision="bfloat16"'s bf16_packed_matmul.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
clock = time.perf_counter  # --cpu-time: time.process_time (CPU seconds: fairer on a shared CPU at --threads 1)


def build(args):
    import tquant
    from tquant.models import load_model

    model, _ = load_model("default", dtype=torch.float32)
    model.eval()
    variants = {"float32": model}
    for spec in args.quant:
        bits, group = (int(v) for v in spec.split("g"))
        q = copy.deepcopy(model)
        tquant.quantize(q, "rtn", bits=bits, group_size=group, progress=False)
        q.eval()
        variants[f"rtn w{bits} g{group}"] = q
    return variants


@torch.inference_mode()
def prefill(model, ids):
    model(ids, use_cache=False)


@torch.inference_mode()
def decode(model, prompt, steps):
    """Seconds per greedy step (median of the steps) after a prompt forward."""
    out = model(prompt, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t = clock()
        out = model(tok, past_key_values=past, use_cache=True)
        times.append(clock() - t)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def timed(fn, *a):
    t = clock()
    fn(*a)
    return clock() - t


def profile(name, model, ids, prompt):
    from torch.profiler import ProfilerActivity, profile as prof

    set_cache(model, name)
    for label, run in (("prefill", lambda: prefill(model, ids)), ("decode step", lambda: decode(model, prompt, 4))):
        run()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            run()
        print(f"\n== {name}: {label}")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def set_cache(model, name: str):
    from tquant.modules import PackedLinear

    on = "bfloat16" if name.endswith("bf16 cache") else name.endswith("cached")
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.cache_weights = on
            m.cpu_precision = "bfloat16" if name.endswith("bf16 compute") else "float32"


def use_reference(model):
    """model with every PackedLinear's CPU path replaced by weight_only_matmul_ref (dequantize_packed + matmul)."""
    from tquant.kernels.weight_only_matmul import weight_only_matmul_ref
    from tquant.modules import PackedLinear

    for m in model.modules():
        if isinstance(m, PackedLinear):
            m._cpu_matmul = lambda x2, m=m: weight_only_matmul_ref(
                x2.to(m.scales.dtype), m.qweight, m.scales, m.zeros, bits=m.bits, group_size=m.group_size,
                in_features=m.in_features, perm=m.perm, bias=m.bias).to(x2.dtype)
    return model


def previous_dequantize(qweight, scales, zeros, bits, group_size, k):
    """cpu_matmul.dequantize_fast before issue 28: codes unpacked on bytes (a strided byte copy), converted, then
    subtract and multiply in place."""
    from tquant.kernels.cpu_matmul import unpack_codes_u8

    n = qweight.shape[1]
    w = unpack_codes_u8(qweight, bits, k).to(torch.float32)
    w.view(k // group_size, group_size, n).sub_(zeros.float().unsqueeze(1)).mul_(scales.float().unsqueeze(1))
    return w


def use_previous(model):
    """model with every PackedLinear's CPU path replaced by the previous default (previous_dequantize + matmul)."""
    from tquant.kernels.cpu_matmul import dense_matmul
    from tquant.modules import PackedLinear

    for m in model.modules():
        if isinstance(m, PackedLinear):
            m._cpu_matmul = lambda x2, m=m: dense_matmul(
                x2.to(m.scales.dtype), previous_dequantize(m.qweight, m.scales, m.zeros, m.bits, m.group_size,
                                                           m.in_features), perm=m.perm, bias=m.bias).to(x2.dtype)
    return model


def grouped_matmul(x, q, s, z, bits, group_size, k):
    """Design (b), not kept: y = sum_g s_g * (x_g @ codes_g) - (sum_k in g x) @ (z * s): the codes only converted
    (shift, and, int-to-float: 3 passes over [K, N]), no subtract / multiply over [K, N]; a bmm over the groups, then
    an [G, M, N] scale-and-sum (so small M only)."""
    from tquant.kernels.cpu_matmul import unpack_codes_i32

    n, g, m = q.shape[1], k // group_size, x.shape[0]
    xg = x.view(m, g, group_size).transpose(0, 1)
    p = torch.bmm(xg, unpack_codes_i32(q, bits, k).to(torch.float32).view(g, group_size, n))
    return torch.einsum("gmn,gn->mn", p, s).sub_(xg.sum(-1).t() @ (z * s))


def layers(args):
    """Per-layer medians (ms) of interleaved rounds at the offline model's shapes."""
    from tquant.formats.packing import pack_codes
    from tquant.kernels import cpu_matmul as cpu

    shapes = {"gate/up 576x1536": (576, 1536), "down 1536x576": (1536, 576), "q/o 576x576": (576, 576),
              "k/v 576x192": (576, 192)}
    print(f"{'layer':<18}{'bits':>5}{'M':>5}" + "".join(f"{v:>14}" for v in
          ("float", "previous", "packed_matmul", "whole", "grouped (b)", "bf16 cache", "bf16 compute")))
    g = torch.Generator().manual_seed(0)
    for label, (k, n) in shapes.items():
        for bits in (4, 8):
            codes = torch.randint(0, 2**bits, (n, k), generator=g)
            q, s = pack_codes(codes, bits), torch.rand(k // 64, n, generator=g) * 0.1 + 0.01
            z = torch.randint(0, 2**bits, (k // 64, n), generator=g).float()
            w = cpu.dequantize_fast(q, s, z, bits, 64, k)
            wb = w.bfloat16()
            int4 = (64, cpu.pack_int4(q, k), cpu.scale_zeros(s, z, 64, 64).bfloat16()) if bits == 4 else None
            for m in (1, args.tokens):
                x = torch.randn(m, k, generator=g)
                fns = {"float": lambda: x @ w,
                       "previous": lambda: x @ previous_dequantize(q, s, z, bits, 64, k),
                       "packed": lambda: cpu.packed_matmul(x, q, s, z, bits=bits, group_size=64, k=k),
                       "whole": lambda: x @ cpu.dequantize_fast(q, s, z, bits, 64, k),
                       "grouped": lambda: grouped_matmul(x, q, s, z, bits, 64, k) if m == 1 else None,
                       "bf16": lambda: cpu.bf16_matmul(x, wb),
                       "bf16 compute": lambda: cpu.bf16_packed_matmul(x, q, s, z, bits=bits, group_size=64, k=k,
                                                                      int4=int4)}
                times = {name: [] for name in fns}
                for f in fns.values():
                    f()
                for _ in range(args.rounds):
                    for name, f in fns.items():
                        t = clock()
                        f()
                        times[name].append(clock() - t)
                print(f"{label:<18}{bits:>5}{m:>5}" + "".join(
                    f"{1e3 * statistics.median(v):>14.3f}" if name != "grouped" or m == 1 else f"{'-':>14}"
                    for name, v in times.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", nargs="*", default=["4g64", "8g64"], help="BITSgGROUP specs to quantize with rtn")
    ap.add_argument("--tokens", type=int, default=512, help="prefill length (batch 1)")
    ap.add_argument("--decode", type=int, default=32, help="greedy decode steps (batch 1) per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cache-weights", action="store_true")
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--previous", action="store_true")
    ap.add_argument("--bf16-cache", action="store_true")
    ap.add_argument("--bf16-compute", action="store_true")
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--cpu-time", action="store_true", help="time with time.process_time (use with --threads 1)")
    args = ap.parse_args()
    if args.cpu_time:
        global clock
        clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"CPU {torch.backends.cpu.get_cpu_capability()}; medians of {args.rounds} interleaved rounds, ms")
        return layers(args)
    variants = build(args)
    quantized = [n for n in variants if n != "float32"]
    for name in quantized if args.reference else ():
        variants[name + " reference"] = use_reference(copy.deepcopy(variants[name]))
    for name in quantized if args.previous else ():
        variants[name + " previous"] = use_previous(copy.deepcopy(variants[name]))
    for name in quantized if args.cache_weights else ():
        variants[name + " cached"] = copy.deepcopy(variants[name])
    for name in quantized if args.bf16_cache else ():
        variants[name + " bf16 cache"] = copy.deepcopy(variants[name])
    for name in quantized if args.bf16_compute else ():
        variants[name + " bf16 compute"] = copy.deepcopy(variants[name])
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(variants.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, args.tokens), generator=g)
    prompt = ids[:, :16]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}")
    if args.profile:
        for name, model in variants.items():
            profile(name, model, ids, prompt)
    times = {name: ([], []) for name in variants}
    for name, model in variants.items():  # warm-up
        set_cache(model, name)
        prefill(model, ids[:, :32]), decode(model, prompt, 2)
    for r in range(args.rounds):
        for name, model in variants.items():
            set_cache(model, name)
            times[name][0].append(timed(prefill, model, ids))
            times[name][1].append(decode(model, prompt, args.decode))
    print(f"\nmedians of {args.rounds} interleaved rounds; prefill 1 x {args.tokens}, decode batch 1 "
          f"({args.decode} steps a round); {'CPU' if args.cpu_time else 'wall'} time")
    print(f"{'model':<28}{'prefill s':>10}{'decode ms/token':>17}")
    for name, (pre, dec) in times.items():
        print(f"{name:<28}{statistics.median(pre):>10.3f}{1000 * statistics.median(dec):>17.1f}")


if __name__ == "__main__":
    main()
