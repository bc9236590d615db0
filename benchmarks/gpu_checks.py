"""Model-level checks on the GPU: the driver with device="cuda", the quantized modules' kernel
path (PackedLinear, ActQuantLinear, QuipLinear) against their torch reference inside a real forward pass, generate(),
and a save/load round trip.

    python benchmarks/gpu_checks.py [--hidden 2048 --layers 4 --inter 5632] [--method gptq --options '{...}']

A random Llama-shaped model (fp16, kept on the CPU) is quantized by --method (default GPTQ W4 g128
act_order) on the GPU;
the driver must hold one block at a time there, so peak GPU memory is compared with one block's size.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tquant  # noqa: E402
from tquant.modules import ActQuantLinear, PackedLinear, QuipLinear  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--method", default="gptq")
    p.add_argument("--options", default='{"bits": 4, "group_size": 128, "act_order": true}')
    a = p.parse_args()
    options = json.loads(a.options)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.inter,
                                   num_hidden_layers=a.layers, num_attention_heads=a.hidden // 128,
                                   num_key_value_heads=a.hidden // 512, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()
    ids = torch.randint(0, 32000, (32, 512))
    with torch.no_grad():
        fp = model.cuda()(ids[:4].cuda()).logits.float()
    model.cpu()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    block_bytes = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    rest_bytes = sum(t.numel() * t.element_size() for t in model.parameters()) - a.layers * block_bytes
    blocks_on_gpu = []  # at every block call during quantization: how many blocks hold CUDA tensors
    count = lambda *_: blocks_on_gpu.append(sum(any(t.is_cuda for t in b.state_dict().values()) for b in model.model.layers))
    hooks = [b.register_forward_pre_hook(count) for b in model.model.layers]
    t = time.time()
    tquant.quantize(model, a.method, calib=ids, device="cuda", progress=False, **options)
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    print(f"blocks on the GPU during quantization: at most {max(blocks_on_gpu)} (over {len(blocks_on_gpu)} block calls)")
    print(f"{a.method} {options} on {a.layers} blocks ({a.hidden}/{a.inter}), 32 x 512 calib: {time.time() - t:.1f} s")
    report = model.config.quantization_config.get("report")
    if report:
        print("report:", json.dumps(report)[:600])
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; one block {block_bytes / 2**20:.0f} MiB, "
          f"all blocks {a.layers * block_bytes / 2**20:.0f} MiB, non-block modules {rest_bytes / 2**20:.0f} MiB")
    print("model back on", next(model.model.layers[0].parameters()).device)

    model.cuda()
    packed = [m for m in model.modules() if isinstance(m, (PackedLinear, ActQuantLinear, QuipLinear))]
    with torch.no_grad():
        out_kernel = model(ids[:4].cuda()).logits.float()
        for m in packed:
            m.backend = "torch"
        out_ref = model(ids[:4].cuda()).logits.float()
        for m in packed:
            m.backend = "auto"
        print(f"logits, Triton kernels vs torch reference: rel err {rel(out_kernel, out_ref):.2e}")
        print(f"logits, quantized vs fp16: rel err {rel(out_kernel, fp):.3f}")
        gen = model.generate(ids[:1, :16].cuda(), max_new_tokens=8, do_sample=False)
        print("generate ok:", gen.shape)
        with tempfile.TemporaryDirectory() as d:
            tquant.save(model, d)
            loaded = tquant.load(d, device="cuda")
            print("save/load bit-identical on cuda:", torch.equal(loaded(ids[:4].cuda()).logits.float(), out_kernel))
    for m_ in (1, 16):
        x = torch.randn(m_, a.hidden, device="cuda", dtype=torch.float16)
        lin = model.model.layers[0].mlp.gate_proj
        lin.backend = "auto"
        y = lin(x)
        lin.backend = "torch"
        print(f"gate_proj M={m_}: kernel vs reference rel err {rel(y, lin(x)):.2e}")
        lin.backend = "auto"


if __name__ == "__main__":
    main()
