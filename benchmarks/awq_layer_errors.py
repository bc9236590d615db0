"""Where AWQ loses to GPTQ, one layer and one block at a time, on the offline SmolLM2-135M (issue 29).

    python benchmarks/awq_layer_errors.py [--blocks 0,15,29] [--n-samples 48] [--held 16] [--threads 1] [--fast]
                                          [--config 3,64 --config 4,-1 ...] [--json FILE]

Same calibration source as benchmarks/quality_methods.py (random 512-token pydoc windows of the first 70 %, seed 0;
float32, CPU); each block's inputs are the float model's (blocks before it float). For every linear, on the Gram
matrix H = X^T X / T of its float input, the relative output error
    e = tr(D H D^T) / tr(W H W^T),   D = W - W_q   (W_q in the original coordinates: Q(W s) / s for AWQ)
of each way of quantizing it, all on the same grid (asymmetric min-max, per group or per channel):
    rtn         round to nearest
    awq_s       AWQ's searched scales (search_loss="linear", duo scaling), no clip
    awq_sc      AWQ's scales + its clip search (symmetric shrink of max|w|, 20 steps to 0.5; q/k not clipped)
    awq_sc_all  the same with q/k clipped too
    awq_mm      AWQ's scales + clip_range="minmax" (tquant's default since issue 29; q/k not clipped)
    awq_sca     AWQ's scales + an asymmetric clip search (min and max of each group shrunk separately)
    gptq        GPTQ (act order, percdamp 0.01) on the same H, no scaling
    awq_gptq    GPTQ on the AWQ-scaled weight and H (for reference)
    joint_sc(a) the scale search scored with each candidate's clipped weights (absmax / coordinate minmax clip)
    o_tied_*    o_proj scaled through v_proj under GQA, the scale tied over the query heads of a KV head
--fast: only rtn, awq_s, awq_sc, awq_sc_all, awq_mm, gptq. Every search and GPTQ run on the first n-samples - held
sequences, every error is measured on the last `held` sequences (held out: GPTQ's in-sample error on a few thousand
tokens is optimistic). And, per input group, the relative MSE of the block output with only that group quantized
(the rest float), and of the block with every linear quantized (non-sequential: every H from the float block).
o_proj under GQA is unscaled by AWQ (no exact absorber); the "o_tied" rows scale it through v_proj with the scale tied
over the query heads of a KV head (find_absorber(tied=True)), searched the same way.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from tquant import driver
from tquant.api import make_method
from tquant.calib.block_io import hidden, rows
from tquant.calib.data import calibration_data
from tquant.calib.smoothing import find_absorber
from tquant.formats.quantizer import qparams
from tquant.methods.awq import awq_scales, clip_bounds, clip_values, output_errors, weight_mean
from tquant.methods.gptq import HessianState
from tquant.models import load_model


def grid(w, bits, gs):
    n, k = w.shape
    wg = w.reshape(n, k // gs, gs)
    scale, zero = qparams(wg, bits, False)
    return (wg / scale[..., None]).round().add(zero[..., None]).clamp(0, 2**bits - 1).sub(zero[..., None]) \
        .mul(scale[..., None]).reshape(n, k)


def asym_clip(w, h, bits, gs, steps=20, max_shrink=0.5):
    """Per row and group: lo = min * (1 - i/steps), hi = max * (1 - j/steps), i, j < max_shrink * steps, the pair of
    least (w_g - q_g) H_gg (w_g - q_g)^T; returns the clamped weight."""
    n, k = w.shape
    g = k // gs
    wg = w.reshape(n, g, gs)
    blocks = torch.stack([h[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(g)])
    lo0, hi0 = wg.amin(-1), wg.amax(-1)
    best = wg.clone()
    best_err = torch.full((n, g), float("inf"))
    m = int(max_shrink * steps)
    for i in range(m):
        for j in range(m):
            lo, hi = lo0 * (1 - i / steps), hi0 * (1 - j / steps)
            c = torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None])
            d = grid(c.reshape(n, k), bits, gs).reshape(n, g, gs) - wg
            err = (torch.bmm(d.transpose(0, 1), blocks) * d.transpose(0, 1)).sum(-1).t()
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], c, best)
    return best.reshape(n, k)


def asym_clip_cd(w, h, bits, gs, steps=20, max_shrink=0.5, sweeps=2):
    """asym_clip by coordinate descent: hi with lo at the group min, then lo, ... (2 * sweeps scans of
    max_shrink * steps values each instead of their product)."""
    n, k = w.shape
    g = k // gs
    wg = w.reshape(n, g, gs)
    blocks = torch.stack([h[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(g)])
    lo0, hi0 = wg.amin(-1), wg.amax(-1)
    lo, hi = lo0.clone(), hi0.clone()
    m = int(max_shrink * steps)

    def err_of(lo, hi):
        c = torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None])
        d = grid(c.reshape(n, k), bits, gs).reshape(n, g, gs) - wg
        return (torch.bmm(d.transpose(0, 1), blocks) * d.transpose(0, 1)).sum(-1).t()
    for _ in range(sweeps):
        for side in ("hi", "lo"):
            best_err = torch.full((n, g), float("inf"))
            best = (hi if side == "hi" else lo).clone()
            for i in range(m):
                v = (hi0 if side == "hi" else lo0) * (1 - i / steps)
                e = err_of(lo, v) if side == "hi" else err_of(v, hi)
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best = torch.where(better, v, best)
            if side == "hi":
                hi = best
            else:
                lo = best
    return torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None]).reshape(n, k)


def joint_search(weights, names, x_mean, h, bits, gs, clip, n_grid=20):
    """The scale search scored with each candidate's clipped weights (clip(w, h, bits, gs) -> clamped w; q/k not
    clipped): the alpha of least summed tr(D H D^T)."""
    w_mean = weight_mean(weights, gs)
    alphas = [None] + [i / n_grid for i in range(n_grid)]
    best, best_err = None, float("inf")
    for a in alphas:
        s = None if a is None else awq_scales(x_mean, w_mean, a)
        hs = h if s is None else h / s[:, None] / s[None, :]
        err, qs = 0.0, []
        for n, w in zip(names, weights):
            sw = w if s is None else w * s
            c = sw if n.endswith(("q_proj", "k_proj")) else clip(sw, hs, bits, gs)
            q = grid(c, bits, gs)
            q = q if s is None else q / s
            d = w - q
            err += ((d @ h) * d).sum().item()
            qs.append(q)
        if err < best_err:
            best, best_err = (a, qs), err
    return best


def sym_clip(w, h, bits, gs, clip=True):
    if not clip:
        return w
    m = clip_values(w, h, gs, bits, False, 20, 0.5).repeat_interleave(gs, dim=1)
    return torch.maximum(torch.minimum(w, m), -m)


def minmax_clip(w, h, bits, gs):
    """tquant's clip_range='minmax' (AWQ's default since issue 29): clip_bounds' [lo, hi] per row and group."""
    lo, hi = clip_bounds(w, h, gs, bits, False, 20, 0.5, "minmax")
    return torch.maximum(torch.minimum(w, hi.repeat_interleave(gs, dim=1)), lo.repeat_interleave(gs, dim=1))


def gptq(w, h, bits, gs):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    st = HessianState("x", lin)
    st.hessian, st.tokens = 2 * h.clone(), 1
    method = make_method("gptq", bits=bits, group_size=gs, sym=False)
    return method.quantize(st, lin, "x").dequantize().float()


def rel(w, wq, h):
    d = w - wq
    return ((d @ h) * d).sum().item() / ((w @ h) * w).sum().item()


def stats(block, lins, inputs):
    out = {n: [0, 0, 0] for n in lins}

    def hook(n):
        def f(m, a):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            out[n][0] = out[n][0] + x.abs().sum(0)
            out[n][1] += x.shape[0]
            out[n][2] = out[n][2] + x.t() @ x
        return f
    hs = [lins[n].register_forward_pre_hook(hook(n)) for n in lins]
    for a, k in inputs:
        block(*a, **k)
    for h in hs:
        h.remove()
    return {n: (v[0] / v[1], v[2] / v[1]) for n, v in out.items()}


def block_err(block, lins, weights, inputs, teacher):
    b = copy.deepcopy(block)
    bl = driver._linears(b)
    for n, w in weights.items():
        bl[n].weight.data = w.to(bl[n].weight.dtype)
    outs = [hidden(b(*a, **k)).float() for a, k in inputs]
    return sum(((o - t) ** 2).sum().item() for o, t in zip(outs, teacher)) / sum((t ** 2).sum().item() for t in teacher)


def search(weights, x_mean, h, bits, gs, index=None, n_grid=20):
    w_mean = weight_mean(weights, gs)
    if index is not None:  # tie over the channels sharing a v_proj channel: means over them
        def tie(v):
            m = int(index.max()) + 1
            s = v.new_zeros(m).scatter_add_(0, index, v) / torch.bincount(index, minlength=m).to(v)
            return s[index]
        x_mean, w_mean = tie(x_mean), tie(w_mean)
    alphas = [None] + [i / n_grid for i in range(n_grid)]
    cands = [None] + [awq_scales(x_mean, w_mean, a) for a in alphas[1:]]
    errs = output_errors(weights, h, cands, bits, gs, False)
    best = min(range(len(errs)), key=errs.__getitem__)
    return alphas[best], cands[best]


def analyse(block, inputs, held, groups, bits, gs_opt, fast=False):
    """Fit (scale / clip search, GPTQ) on `inputs`, measure on `held` (other sequences)."""
    lins = driver._linears(block)
    st = stats(block, lins, inputs)
    st_held = stats(block, lins, held)
    teacher = [hidden(block(*a, **k)).float() for a, k in held]
    probe = make_method("awq", bits=bits, group_size=gs_opt, sym=False)
    scaled = {}  # head -> s or None
    for g in groups:
        absorber = find_absorber(block, [lins[n] for n in g], inputs)
        tied = None
        if absorber is None:
            tied = find_absorber(block, [lins[n] for n in g], inputs, tied=True)
        scaled[g[0]] = (absorber, tied)
    rows, methods = {}, {}
    for g in groups:
        gs = probe.layer_group_size(lins[g[0]], g[0])
        x_mean, h = st[g[0]]
        ws = [lins[n].weight.detach().float() for n in g]
        absorber, tied = scaled[g[0]]
        alpha, s = (None, None)
        if absorber is not None:
            alpha, s = search(ws, x_mean, h, bits, gs)
        alpha_t, s_t = (None, None)
        if tied is not None:
            alpha_t, s_t = search(ws, x_mean, h, bits, gs, index=tied.index)
        if absorber is not None and not fast:
            joint = [joint_search(ws, g, x_mean, h, bits, gs, lambda w, h, b, gs: sym_clip(w, h, b, gs)),
                     joint_search(ws, g, x_mean, h, bits, gs, asym_clip_cd)]
        for n, w in zip(g, ws):
            qk = n.endswith(("q_proj", "k_proj"))
            hs = h if s is None else h / s[:, None] / s[None, :]
            sw = w if s is None else w * s
            inv = (lambda q: q) if s is None else (lambda q, s=s: q / s)
            cand = {
                "rtn": grid(w, bits, gs),
                "awq_s": inv(grid(sw, bits, gs)),
                "awq_sc": inv(grid(sym_clip(sw, hs, bits, gs, clip=not qk), bits, gs)),
                "awq_sc_all": inv(grid(sym_clip(sw, hs, bits, gs), bits, gs)),
                "awq_mm": inv(grid(sw if qk else minmax_clip(sw, hs, bits, gs), bits, gs)),
                "gptq": gptq(w, h, bits, gs),
            }
            if not fast:
                cand["awq_sca"] = inv(grid(asym_clip(sw, hs, bits, gs), bits, gs))
                cand["awq_sca_cd"] = inv(grid(asym_clip_cd(sw, hs, bits, gs), bits, gs))
                cand["awq_gptq"] = inv(gptq(sw, hs, bits, gs))
            if s_t is not None and not fast:
                ht = h / s_t[:, None] / s_t[None, :]
                cand["o_tied_s"] = grid(w * s_t, bits, gs) / s_t
                cand["o_tied_sc"] = grid(sym_clip(w * s_t, ht, bits, gs), bits, gs) / s_t
                cand["o_tied_sca"] = grid(asym_clip(w * s_t, ht, bits, gs), bits, gs) / s_t
            if absorber is not None and not fast:
                cand["joint_sc"] = joint[0][1][g.index(n)]
                cand["joint_sca"] = joint[1][1][g.index(n)]
            rows[n] = {"alpha": alpha if s_t is None else alpha_t,
                       "alpha_joint": None if absorber is None or fast else joint[1][0],
                       **{k: round(rel(w, q, st_held[g[0]][1]), 6) for k, q in cand.items()}}
            for k, q in cand.items():
                methods.setdefault(k, {})[n] = q
    group_rows = {}
    for g in groups:
        group_rows[",".join(g)] = {k: block_err(block, lins, {n: methods[k][n] for n in g if n in methods[k]}, held,
                                                teacher)
                                   for k in methods if all(n in methods[k] for n in g)}
    whole = {}
    for k in methods:
        fill = {"o_tied_sc": "awq_sc", "o_tied_sca": "awq_sca", "o_tied_s": "awq_s", "joint_sc": "awq_sc",
                "joint_sca": "awq_sca_cd"}
        ws = {n: methods[k].get(n, methods[fill[k]][n] if k in fill else None) for n in lins}
        if any(v is None for v in ws.values()):
            continue
        whole[k] = block_err(block, lins, ws, held, teacher)
    return {"layers": rows, "groups": group_rows, "block": whole}


def split(inputs, n):
    """(the first n sequences of inputs, the rest), as lists of (args, kwargs) batches."""
    fit, held, seen = [], [], 0
    for args, kwargs in inputs:
        b = args[0].shape[0]
        take = max(0, min(b, n - seen))
        if take:
            fit.append(rows(args, kwargs, slice(0, take)))
        if take < b:
            held.append(rows(args, kwargs, slice(take, b)))
        seen += b
    return fit, held


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", default="0,15,29")
    p.add_argument("--n-samples", type=int, default=48)
    p.add_argument("--held", type=int, default=16, help="of the n-samples sequences, the last HELD measure only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", action="append", default=None, help="BITS,GROUP (-1: per channel)")
    p.add_argument("--json")
    p.add_argument("--fast", action="store_true", help="only rtn, awq_s, awq_sc(_all), awq_mm, gptq")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    configs = [tuple(int(v) for v in c.split(",")) for c in (a.config or ["3,64", "4,-1"])]
    model, tok = load_model("default")
    ids = calibration_data("pydoc", tok, n_samples=a.n_samples, seqlen=512, seed=0)
    name, blocks = driver.find_blocks(model)
    inputs = driver.capture_block_inputs(model, name, blocks, ids, "cpu", 8)
    want = [int(b) for b in a.blocks.split(",")]
    result = {}
    for i in range(max(want) + 1):
        if i in want:
            block = blocks[i]
            lins = driver._linears(block)
            groups = driver._input_groups(block, lins, *inputs[0])
            for bits, gs in configs:
                key = f"block{i} W{bits} {'pc' if gs == -1 else f'g{gs}'}"
                fit, held = split(inputs, a.n_samples - a.held)
                result[key] = r = analyse(block, fit, held, groups, bits, gs, a.fast)
                cols = list(next(iter(r["layers"].values())).keys())
                print(f"== {key}: relative linear-output error tr(D H D^T)/tr(W H W^T)")
                print("layer".ljust(24) + "".join(c.rjust(11) for c in cols))
                for n, row in r["layers"].items():
                    print(n.ljust(24) + "".join((f"{row[c]:.4g}" if row.get(c) is not None else "-").rjust(11)
                                                for c in cols))
                print("group only quantized: block output relative MSE")
                for gname, row in r["groups"].items():
                    print("  " + gname.ljust(40) + "  ".join(f"{k}={v:.3e}" for k, v in row.items()))
                print("whole block: " + "  ".join(f"{k}={v:.3e}" for k, v in r["block"].items()), flush=True)
        if i < max(want):
            inputs = [((hidden(blocks[i](*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
