"""FP8 quality checks on the offline SmolLM2-135M (issue 29; benchmarks/RESULTS.md "FP8 on the offline model").

    python benchmarks/fp8_checks.py layers         per-layer output error on float inputs (two tables, below)
    python benchmarks/fp8_checks.py groups [ROWS]  perplexity with e4m3 weight scales per group of 64 input channels
                                                   (row w16a8: float weights, e4m3 per-token inputs only)
    python benchmarks/fp8_checks.py gptq-groups    ... with GPTQ's error feedback on that grouped grid (W8A8)
    python benchmarks/fp8_checks.py act-aware      per-layer W8A8 error of gptq=True with and without act_aware (below)

layers, table 1 (4 x 512 pydoc calibration windows; blocks 0, 10, 20, 29): relative output error ||X W'^T - X W^T|| /
||X W^T|| on the block's float inputs X for W' = e4m3 per channel (fp8), int8 round to nearest per channel (int8),
e4m3 per group of 64 (fp8_g64), e4m3 per channel with the scale searched over 0.5-1.0 x max / 448 for the least weight
MSE (fp8_search); the weights' own relative error (w_fp8, w_int8); the float weights on e4m3 per-token inputs (act_fp8);
both (w8a8). Table 2 (8 windows): W8A8 with SmoothQuant's s (alpha 0.5, from these inputs' max) applied to X and W
(w8a8_smooth); weight-only error on the held-out second half of the tokens for round to nearest (wo_heldout) and for
GPTQ's error feedback on the e4m3 grid (H of the first half; gptq_wo_heldout), and that GPTQ weight with e4m3 inputs
(gptq_w8a8, all tokens).
act-aware [WINDOWS] (default 40, the table-2 layers): each layer's float inputs X (float32) split into the first
WINDOWS - 8 windows for calibration (32: the method's calibration size in the FP8 section) and the last 8 held out; the
fp8 method's own gptq_weight (FP8(gptq=True[, act_aware=True]), state fed the calibration windows) and the relative
error ||X W^T - X~ Wq^T|| / ||X W^T|| with X~ = fake_quantize_fp8(X), on both parts: act_only (Wq = W), act_floor
(Wq = act_aware's unrounded target W'), rtn, gptq, gptq_aq.
groups / gptq-groups: torch simulations, since FP8Linear and tquant.kernels.fp8_gemm hold one scale per output channel:
each block linear keeps an nn.Linear of its de-quantized weight and, for W8A8, fake-quantizes its input per token
(fake_quantize_fp8: what the fp8 method's driver simulates). gptq-groups runs the fp8 method's driver (gptq=True, calib
pydoc 32 x 512) with its quantize replaced by a grouped one (static group scales from the original weights) and the
module swap by that nn.Linear. Evaluated as the FP8 section: perplexity(model, "pydoc", seqlen=512, n_windows=40),
float32, one thread.
"""
from __future__ import annotations

import copy
import importlib
import json
import sys
import time

import torch
from torch import nn

import tquant
from tquant.calib.data import calibration_data
from tquant.kernels.fp8_gemm import E4M3_MAX, fake_quantize_fp8, quantize_fp8_ref
from tquant.methods.gptq import GPTQ, HessianState, error_feedback
from tquant.models import load_model
from tquant.tools.eval import perplexity

GROUP = 64  # divides SmolLM2's 576 and 1536 (128 does not divide 576)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def fp8_rows(w, group=None):
    """e4m3 round trip of w [N, K] (float64 out) with one scale per row, or per group of `group` input channels."""
    n, k = w.shape
    g = k if group is None else group
    q, s = quantize_fp8_ref(w.float().reshape(n * k // g, g))
    return (q.double() * s.double()[:, None]).reshape(n, k)


def int8_rows(w):
    s = w.abs().amax(1, keepdim=True) / 127
    return (w / s).round().clamp(-127, 127) * s


def fp8_search(w):
    best = None
    for c in torch.linspace(0.5, 1.0, 21):
        s = (w.abs().amax(1) / E4M3_MAX * c).clamp_min(1e-30)
        q = (w / s[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double() * s[:, None]
        e = (q - w).pow(2).sum(1)
        best = (e, q) if best is None else (torch.minimum(best[0], e), torch.where((e < best[0])[:, None], q, best[1]))
    return best[1]


def gptq_fp8(lin, x, name):
    """GPTQ on the e4m3 grid (per-channel scales from the original rows), H from x: float64 [N, K] in input order."""
    state = HessianState(name, lin)
    state.add_batch(x.float())
    w, perm, u = GPTQ(bits=8, group_size=-1).prepared(state, lin, name)
    s = (lin.weight.float().abs().amax(1) / E4M3_MAX).clamp_min(1e-30)
    out = torch.empty_like(w)

    def column(col, current, upcoming):
        q = (current / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
        out[:, col] = q
        return q

    error_feedback(w, u, 128, column)
    return out[:, torch.argsort(perm)].double()


def block_inputs(model, tok, names, n_samples, dtype=torch.float64):
    ids = calibration_data("pydoc", tok, n_samples=n_samples, seqlen=512)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).to(dtype) for n, v in seen.items()}


def layers(model, tok):
    names = [f"model.layers.{i}.{p}" for i in (0, 10, 20, 29) for p in PROJ]
    inputs = block_inputs(model, tok, names, 4)
    print("table 1")
    for n in names:
        x, w = inputs[n], model.get_submodule(n).weight.double()
        ref = x @ w.T
        err = lambda wq, xq=x: ((xq @ wq.T - ref).norm() / ref.norm()).item()  # noqa: E731
        werr = lambda wq: ((wq - w).norm() / w.norm()).item()  # noqa: E731
        xq = fake_quantize_fp8(x.float()).double()
        r = dict(fp8=err(fp8_rows(w)), int8=err(int8_rows(w)), fp8_g64=err(fp8_rows(w, GROUP)),
                 fp8_search=err(fp8_search(w)), w_fp8=werr(fp8_rows(w)), w_int8=werr(int8_rows(w)), act_fp8=err(w, xq),
                 w8a8=err(fp8_rows(w), xq))
        print(n, " ".join(f"{k}={v:.4f}" for k, v in r.items()), flush=True)
    names = [f"model.layers.{i}.{p}" for i in (0, 10, 20, 29)
             for p in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    inputs = block_inputs(model, tok, names, 8)
    print("table 2")
    for n in names:
        lin = model.get_submodule(n)
        x, w = inputs[n], lin.weight.double()
        ref = x @ w.T
        xq = fake_quantize_fp8(x.float()).double()
        sm = (x.abs().amax(0).clamp_min(1e-5) ** 0.5 / w.abs().amax(0).clamp_min(1e-5) ** 0.5).clamp_min(1e-5)
        xsq = fake_quantize_fp8((x / sm).float()).double()
        wg = gptq_fp8(lin, x[: len(x) // 2], n)
        held = x[len(x) // 2:]
        refh = held @ w.T
        errh = lambda wq: ((held @ wq.T - refh).norm() / refh.norm()).item()  # noqa: E731
        r = dict(w8a8=((xq @ fp8_rows(w).T - ref).norm() / ref.norm()).item(),
                 w8a8_smooth=((xsq @ fp8_rows(w * sm).T - ref).norm() / ref.norm()).item(),
                 wo_heldout=errh(fp8_rows(w)), gptq_wo_heldout=errh(wg),
                 gptq_w8a8=((xq @ wg.T - ref).norm() / ref.norm()).item())
        print(n, " ".join(f"{k}={v:.4f}" for k, v in r.items()), flush=True)


def act_aware(model, tok, windows):
    fp8m = importlib.import_module("tquant.methods.fp8")  # `tquant.methods` the attribute is tquant's function
    names = [f"model.layers.{i}.{p}" for i in (0, 10, 20, 29)
             for p in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    inputs = block_inputs(model, tok, names, windows, torch.float32)
    split = (windows - 8) * 512
    for n in names:
        lin = model.get_submodule(n)
        x, w = inputs.pop(n), lin.weight.detach()
        calib = x[:split]
        weights = dict(act_only=w, rtn=fp8_rows(w))
        for key, options in (("gptq", {}), ("gptq_aq", dict(act_aware=True))):
            method = fp8m.FP8(gptq=True, **options)
            state = method.new_state(n, lin)
            state.add_batch(calib)
            if options:
                target, perm, _ = method.gptq_target(state, lin, n)
                weights["act_floor"] = target[:, torch.argsort(perm)]
            q, scale = method.gptq_weight(state, lin, n)
            weights[key] = q.double() * scale.double()[:, None]
        r = {}
        for half, xs in (("calib", calib), ("heldout", x[split:])):
            ref, xq = xs.double() @ w.double().T, fake_quantize_fp8(xs).double()
            for key, wq in weights.items():
                r[f"{key}_{half}"] = ((xq @ wq.double().T - ref).norm() / ref.norm()).item()
        print(n, " ".join(f"{k}={v:.4f}" for k, v in r.items()), flush=True)


def fake_act(mod, args):
    return (fake_quantize_fp8(args[0]).to(args[0].dtype),) + tuple(args[1:])


def groups(base, tok, rows):
    out = {}
    for row in rows.split(","):  # w8a16-g-1, w8a16-g64, w8a8-g-1, w8a8-g64 (g-1: per channel, the method's grid); w16a8
        mode, _, g = row.partition("-g")  # w16a8: float weights, e4m3 per-token inputs (what activations alone cost)
        model = copy.deepcopy(base)
        for name, lin in model.named_modules():
            if isinstance(lin, nn.Linear) and ".layers." in name:
                if mode != "w16a8":
                    lin.weight.data = fp8_rows(lin.weight.data, None if g == "-1" else int(g)).to(lin.weight.dtype)
                if mode in ("w8a8", "w16a8"):
                    lin.register_forward_pre_hook(fake_act)
        t = time.time()
        ppl = perplexity(model, "pydoc", tokenizer=tok, seqlen=512, n_windows=40, progress=False)
        out[row] = dict(ppl=ppl, eval_s=round(time.time() - t, 1))
        print(row, json.dumps(out[row]), flush=True)


def gptq_groups(base, tok, rows):
    drv = importlib.import_module("tquant.driver")
    fp8m = importlib.import_module("tquant.methods.fp8")  # `tquant.methods` the attribute is tquant's function

    class Grouped:
        def __init__(self, w, act_bits):
            self.w, self.act_bits = w, act_bits

        def dequantize(self):
            return self.w

    def quantize(self, state, linear, name):
        w, perm, u = GPTQ(bits=8, group_size=-1, percdamp=self.percdamp).prepared(state.hessian, linear, name)
        n, k = w.shape
        gscale = (linear.weight.detach().float().reshape(n, k // GROUP, GROUP).abs().amax(-1) / E4M3_MAX)
        scale_cols = gscale.clamp_min(1e-30).repeat_interleave(GROUP, dim=1)[:, perm]  # per processing position
        out = torch.empty_like(w)

        def column(col, current, upcoming):
            s = scale_cols[:, col]
            q = (current / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
            out[:, col] = q
            return q

        error_feedback(w, u, 128, column)
        return Grouped(out[:, torch.argsort(perm)], None if self.weight_only else 8)

    class SimLinear(nn.Linear):
        def layer_spec(self):
            return {"type": "simulated"}

    def linear_module(qw, bias, dtype):
        m = SimLinear(qw.w.shape[1], qw.w.shape[0], bias=bias is not None)
        m.weight.data = qw.w.to(dtype)
        if bias is not None:
            m.bias.data = bias.data
        if qw.act_bits == 8:
            m.register_forward_pre_hook(fake_act)
        return m

    fp8m.FP8.quantize = quantize
    drv.linear_module = linear_module
    drv._within_dtype = lambda qw, dtype, name: qw
    for row in rows.split(","):  # w8a8, w8a16
        model = copy.deepcopy(base)
        t = time.time()
        tquant.quantize(model, "fp8", calib="pydoc", tokenizer=tok, n_samples=32, seqlen=512, device="cpu",
                        progress=False, weight_only=row == "w8a16", gptq=True)
        quantize_s = time.time() - t
        ppl = perplexity(model, "pydoc", tokenizer=tok, seqlen=512, n_windows=40, progress=False)
        print(row, json.dumps(dict(ppl=ppl, group_size=GROUP, quantize_s=round(quantize_s),
                                   seconds=round(time.time() - t))), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    what = sys.argv[1]
    model, tok = load_model("default")
    if what == "layers":
        layers(model, tok)
    elif what == "act-aware":
        act_aware(model, tok, int(sys.argv[2]) if len(sys.argv) > 2 else 40)
    elif what == "groups":
        groups(model, tok, sys.argv[2] if len(sys.argv) > 2 else "w8a16-g-1,w8a16-g64,w8a8-g-1,w8a8-g64")
    elif what == "gptq-groups":
        gptq_groups(model, tok, sys.argv[2] if len(sys.argv) > 2 else "w8a8")
    else:
        raise SystemExit(__doc__)
