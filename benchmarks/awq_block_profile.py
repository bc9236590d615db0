"""Where AWQ's time goes on one block of the offline SmolLM2-135M, and what each setting costs in quality there.

    python benchmarks/awq_block_profile.py [--block 0] [--n-samples 128] [--threads 1] [--profile]
                                           --run LABEL:KEY=VALUE,KEY=VALUE ... [--run ...]

Same calibration as benchmarks/quality_methods.py (128 random 512-token pydoc windows of the first 70 %, seed 0;
float32, CPU). The block's inputs are the float model's (blocks before it float). Each --run quantizes a fresh copy
of the block with AWQ (W4 g64 asym unless its options say otherwise), in the same process, in the driver's order:
    prepare    AWQ.prepare_block: statistics pass, scale search per input group, fold   (timed; --profile: cProfile)
    quantize   AWQ.quantize per linear: the clip search and round-to-nearest             (timed)
    forward    the quantized block over every calibration sequence (the driver's output pass; timed)
and prints, per scaled group, the chosen alpha and its search objective measured here from block forwards: the
MSE of the group's module output (self_attn for q/k/v, mlp for gate/up, down_proj) with the group's folded weights
rounded to nearest (no clip), the rest of the folded block float, against the float block; then the relative MSE
of the block output with every weight quantized (clip included): sum (y_q - y)^2 / sum y^2.
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import io
import json
import pstats
import time

import torch

from tquant import driver
from tquant.api import make_method
from tquant.calib.block_io import hidden
from tquant.calib.data import calibration_data
from tquant.methods.awq import _inspected, fake_quantized
from tquant.methods.base import LayerState
from tquant.models import load_model


def module_outputs(block, module, inputs) -> list[torch.Tensor]:
    outs = []
    handle = module.register_forward_hook(lambda m, i, o: outs.append(hidden(o).float()))
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        handle.remove()
    return outs


def mse(outs, teacher) -> float:
    return sum(((o - t) ** 2).sum().item() for o, t in zip(outs, teacher)) / sum(t.numel() for t in teacher)


def run(block, inputs, groups, teachers, block_teacher, options: dict, profile: bool) -> dict:
    block = copy.deepcopy(block)
    linears = driver._linears(block)
    method = make_method("awq", **{"bits": 4, "group_size": 64, "sym": False, **options})
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    method.prepare_block(block, linears, groups, inputs, "")
    if prof:
        prof.disable()
    prepare_s = time.perf_counter() - t
    result = {"options": options, "prepare_s": round(prepare_s, 2), "groups": {}}
    for g in groups:
        if method.alpha.get(g[0], "unscaled") == "unscaled":
            continue
        group = [linears[n] for n in g]
        module = _inspected(block, g)
        saved = [lin.weight.data for lin in group]
        for lin in group:
            lin.weight.data = fake_quantized(lin.weight, None, 4 if "bits" not in options else options["bits"],
                                             options.get("group_size", 64), options.get("sym", False))
        result["groups"][",".join(g)] = {"alpha": method.alpha[g[0]],
                                         "module_mse": mse(module_outputs(block, module, inputs), teachers[g[0]])}
        for lin, w in zip(group, saved):
            lin.weight.data = w
    t = time.perf_counter()
    for n, lin in linears.items():
        lin.weight.data = method.quantize(LayerState(n, lin), lin, n).dequantize().to(lin.weight.dtype)
    result["quantize_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    outs = [hidden(block(*a, **k)).float() for a, k in inputs]
    result["forward_s"] = round(time.perf_counter() - t, 2)
    result["block_rel_mse"] = sum(((o - y) ** 2).sum().item() for o, y in zip(outs, block_teacher)) / \
        sum((y ** 2).sum().item() for y in block_teacher)
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
        result["profile"] = text.getvalue()
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--block", type=int, default=0)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--run", action="append", required=True, metavar="LABEL:KEY=VALUE,...",
                   help="a setting to time (values JSON: n_grid=10, search_loss=\"module\")")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    model, tok = load_model("default")
    ids = calibration_data("pydoc", tok, n_samples=a.n_samples, seqlen=512, seed=0)
    name, blocks = driver.find_blocks(model)
    inputs = driver.capture_block_inputs(model, name, blocks, ids, "cpu", 8)
    for i in range(a.block):
        inputs = [((hidden(blocks[i](*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
    block = blocks[a.block]
    linears = driver._linears(block)
    groups = driver._input_groups(block, linears, *inputs[0])
    teachers = {g[0]: module_outputs(block, _inspected(block, g), inputs) for g in groups}
    block_teacher = [hidden(block(*args, **kwargs)).float() for args, kwargs in inputs]
    for spec in a.run:
        label, _, opts = spec.partition(":")
        options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in opts.split(",") if o)}
        result = run(block, inputs, groups, teachers, block_teacher, options, a.profile)
        profile = result.pop("profile", None)
        print(label, json.dumps(result), flush=True)
        if profile:
            print(profile, flush=True)


if __name__ == "__main__":
    main()
