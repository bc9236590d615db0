"""How far PackedLinear's opt-in bf16 CPU modes move a quantized model's outputs from the default fp32 path (issue 28).

    PYTHONPATH=. python benchmarks/cpu_precision_check.py

The offline SmolLM2-135M in float32 and an RTN W4 g64 copy; one 512-token window of pydoc text (str's help), one
prefill: negative log-likelihood / perplexity of each path, the logits' distance to the default path's (fp32, the
reference maths) and to the float model's, next-token argmax agreement; then 32 greedy decode steps (batch 1, KV cache,
16-token prompt) with cpu_precision="bfloat16" against the default path. One thread.
"""
from __future__ import annotations

import copy
import pydoc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def set_mode(model, mode):
    from tquant.modules import PackedLinear

    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.cpu_precision = "bfloat16" if mode == "bf16 compute" else "float32"
            m.cache_weights = "bfloat16" if mode == "bf16 cache" else False


@torch.inference_mode()
def nll(model, ids):
    logits = model(ids, use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item(), logits


@torch.inference_mode()
def greedy(model, prompt, steps):
    out = model(prompt, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    toks = [tok.item()]
    for _ in range(steps - 1):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks.append(tok.item())
    return toks


def main():
    import tquant
    from tquant.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model("default", dtype=torch.float32)
    model.eval()
    q = copy.deepcopy(model)
    tquant.quantize(q, "rtn", bits=4, group_size=64, progress=False)
    q.eval()
    ids = tok(pydoc.render_doc(str, renderer=pydoc.plaintext)[:6000], return_tensors="pt").input_ids[:, :512]
    nll_float, logits_float = nll(model, ids)
    print(f"{ids.shape[1]} tokens; float32: nll {nll_float:.4f}, perplexity {torch.tensor(nll_float).exp():.3f}")
    res = {}
    for mode in ("fp32 (default)", "bf16 compute", "bf16 cache"):
        set_mode(q, mode)
        res[mode] = nll(q, ids)
    ref = res["fp32 (default)"][1]
    for mode, (loss, logits) in res.items():
        print(f"rtn w4 g64 {mode:<15} nll {loss:.4f}, perplexity {torch.tensor(loss).exp():.3f}; logits - default: "
              f"max {(logits - ref).abs().max():.4f}, rms {(logits - ref).pow(2).mean().sqrt():.4f}; logits - float: "
              f"rms {(logits - logits_float).pow(2).mean().sqrt():.4f}; argmax = default's "
              f"{(logits.argmax(-1) == ref.argmax(-1)).float().mean():.4f}")
    set_mode(q, "fp32 (default)")
    a = greedy(q, ids[:, :16], 32)
    set_mode(q, "bf16 compute")
    b = greedy(q, ids[:, :16], 32)
    print(f"greedy decode, 32 steps: bf16 compute = default at {sum(x == y for x, y in zip(a, b))} of 32")


if __name__ == "__main__":
    main()
