"""Kernels compile for Hopper (sm_90) on a machine without a GPU (tquant.kernels.cross_compile): a kernel that the
interpreter runs but the CUDA compiler rejects fails here, not on a user's first launch. The launches (a default
config each, in a subprocess with the interpreter off) are the decode-attention kernels at Llama-3-8B shapes
(32 query heads on 8 KV heads, head size 128), the BCQ matmul at batch 1 and 32 (and its table path at batch 1), and SpQR's (the weight-only GEMV /
GEMM decoding bilevel stats, then the outlier kernel) at batch 1 and 16, and the static decoder's fused step kernels
(RMSNorm, RoPE + cache write, silu * up, float-cache attention, the per-token KV write) at batch 1 and 16, and the
grouped MoE matmul's decode launches (gate_up, then down, of one token's top-2 of 8 Mixtral-like experts); each must
compile with no more than 255 registers."""
import json
import os
import subprocess
import sys

import pytest

CASES = [("kivi", 4, "channel", "float16"), ("kivi", 2, "channel", "bfloat16"), ("kivi", 4, "token", "float16"),
         ("kivi", 3, "channel", "float32"), ("kvquant", 4, True, "float16"), ("kvquant", 3, False, "bfloat16"),
         ("bcq", 4, 1, "float16"), ("bcq", 3, 32, "bfloat16"), ("spqr", 3, 1, "float16"), ("spqr", 4, 16, "float16"),
         ("bcq_lut", 3, 1, "float16"), ("decode", 4, 1, "float16"), ("decode", 8, 16, "bfloat16"),
         ("moe", 4, 1, "float16")]
KERNELS = {"kivi": ["_kv_attention_kernel", "combine_kernel"],
           "kvquant": ["_kvquant_attention_kernel", "combine_kernel"], "bcq": ["_bcq_matmul_kernel"],
           "bcq_lut": ["_bcq_table_kernel", "_bcq_lut_kernel"],
           "decode": ["_rms_norm_kernel", "_rope_qkv_kernel", "_silu_mul_kernel", "_kv_attention_kernel",
                      "combine_kernel", "_kv_quant_write_kernel"],
           "moe": ["_grouped_gemm_kernel", "_grouped_gemm_kernel"]}
SPQR_KERNELS = {1: "_dequant_gemv_kernel", 16: "_dequant_gemm_kernel"}


def compile_case(kind, bits, option, dtype):
    """[(kernel name, registers, spilled bytes)] of one launcher call compiled for sm_90."""
    import torch

    from tquant.kv import uniform_format as kv_quant
    from tquant.kv import kvquant_format as fmt
    from tquant.kernels import bcq_matmul, spqr_matmul, weight_only_matmul
    from tquant.kv import attention as kv_attention
    from tquant.kv import kvquant_attention
    from tquant.kernels.cross_compile import compiling_for

    dtype = getattr(torch, dtype)
    b, hkv, hq, d, t = 1, 8, 32, 128, 512
    q = torch.randn(b, hq, d).to(dtype)
    config = kv_attention.configs(4096)[0]
    with compiling_for() as done:
        if kind == "moe":  # option: the tokens; 8 experts, top-2, hidden 1024, intermediate 512, groups of 128
            moe_step(option, bits, dtype)
        elif kind == "decode":  # the static decoder's step kernels at Llama-3-8B shapes; option: the batch
            decode_step(option, bits, dtype)
        elif kind == "spqr":  # option: the batch; beta1 16 (3-bit words span groups), 64 (4-bit)
            group, n, k = (16 if bits == 3 else 64), 256, 512
            x = torch.randn(option, k).to(dtype)
            stats, meta = torch.zeros(k // group, n, dtype=torch.uint8), torch.ones(2, k // group, n // 16).half()
            config = weight_only_matmul.candidates(option, n, k // 10 + 1)[0]
            weight_only_matmul.run_path(config, x, torch.zeros(-(-k // (32 // bits)), n, dtype=torch.int32), stats,
                                        meta, torch.arange(k, dtype=torch.int32), None, bits=bits,
                                        group_size=group, in_features=k, bilevel=(8 - bits, 16))
            spqr_matmul.outlier_launch(spqr_matmul.outlier_configs(option)[0], torch.zeros(option, n).to(dtype), x,
                                       torch.arange(n + 1, dtype=torch.int32), torch.zeros(n, dtype=torch.int16),
                                       torch.ones(n).half())
        elif kind.startswith("bcq"):  # option: the batch
            alphas = torch.rand(bits, 4, 256).to(dtype)
            planes = torch.zeros(bits, 512 // 32, 256, dtype=torch.int32)
            path = "lut" if kind == "bcq_lut" else "dot"
            config = next(c for c in bcq_matmul.configs(option, 128) if c["path"] == path)
            bcq_matmul.launch(config, torch.randn(option, 512).to(dtype), planes, alphas, torch.zeros(4, 256).to(dtype))
        elif kind == "kivi":
            group = 32 if option == "channel" else d
            k, v = torch.randn(2, b, hkv, t, d).to(dtype)
            pk = kv_quant.key_format(option)[0](k, bits, group)
            res = torch.randn(b, hkv, 16, d).to(dtype)
            kv_attention.launch(config, q, pk, kv_quant.quantize_values(v, bits, group), res, res, bits, group,
                                d**-0.5, torch.zeros(b, dtype=torch.int32), option)
        else:
            params = fmt.LayerParams(torch.zeros(hkv, d), torch.ones(hkv, d), fmt.uniform_codebook(bits),
                                     fmt.uniform_codebook(bits))
            k, v = torch.randn(2, b, hkv, t, d)
            keys = fmt.quantize_keys(k, params, bits, True)
            values = fmt.quantize_values(v, params.value_codebook, bits, fmt.value_outliers(0.01, d))
            rope = (torch.ones(d // 2), 1.0) if option else None
            positions = torch.arange(t, dtype=torch.int32)[None] if option else None
            exact = torch.randn(b, hkv, 1, d).to(dtype)
            kvquant_attention.launch(config, q, keys, values, params, exact, exact, exact, exact, bits, d**-0.5, rope,
                                     positions, None)
    return [(c.name, c.registers, c.spill_bytes) for c in done]


def decode_step(batch, kv_bits, dtype):
    """One launch of each fused decode-step kernel (tquant.decode) at hidden 4096, 32 / 8 heads of 128, a cache of
    1152 tokens; their launchers' device checks are off (CPU tensors) and TQUANT_AUTOTUNE=0 takes default configs."""
    import torch

    from tquant.kernels import rms_norm, rope, swiglu

    from tquant.kv import attention as kv_attention

    from tquant.kv import write as kv_quant_write
    from tquant.kv.uniform_format import PackedKV

    for module in (kv_attention, kv_quant_write, rms_norm, rope, swiglu):
        module.check_device = lambda tensors: None
    os.environ["TQUANT_AUTOTUNE"] = "0"
    hq, hkv, d, t = 32, 8, 128, 1152
    x = torch.randn(batch, 1, 4096).to(dtype)
    rms_norm.rms_norm(x, torch.ones(4096).to(dtype), 1e-5, x)
    qkv = torch.randn(batch, 1, (hq + 2 * hkv) * d).to(dtype)
    heads = ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv))
    q, k, v = (qkv[..., a * d:b * d].view(batch, 1, -1, d) for a, b in heads)
    cos = torch.randn(batch, 1, d).to(dtype)
    cache = torch.zeros(2, batch, hkv, t, d).to(dtype)
    q_out = torch.empty(batch, hq, 1, d).to(dtype)
    rope.rope_qkv(q, k, v, cos, cos, q_out, cache[0], cache[1], torch.tensor([7]))
    swiglu.silu_mul(*torch.randn(2, batch, 1, 14336).to(dtype))
    kv_attention.float_decode_attention(q_out[:, :, 0], cache[0], cache[1], length=torch.full((batch,), 8,
                                        dtype=torch.int32))
    codes = torch.zeros(batch, hkv, t, d * kv_bits // 32, dtype=torch.int32)
    store = PackedKV(codes, torch.ones(batch, hkv, t, 1).half(), torch.zeros(batch, hkv, t, 1).half())
    kv_quant_write.kv_quant_write(cache[0][:, :, :1], cache[1][:, :, :1], store, store, torch.tensor([7]), kv_bits)


def moe_step(tokens, bits, dtype):
    """The grouped MoE matmul's two launches of a decode step, default configs (TQUANT_AUTOTUNE=0, device check off)."""
    import torch

    from tquant.kernels import moe_matmul

    moe_matmul.check_device = lambda tensors: None
    os.environ["TQUANT_AUTOTUNE"] = "0"
    e, h, i, group = 8, 1024, 512, 128
    ids = torch.randint(0, e, (tokens, 2))
    for k, n, x in ((h, 2 * i, torch.randn(tokens, h)), (i, h, torch.randn(tokens, 2, i))):
        moe_matmul.grouped_weight_only_matmul(
            x.to(dtype), torch.zeros(e, k * bits // 32, n, dtype=torch.int32), torch.ones(e, k // group, n).to(dtype),
            torch.zeros(e, k // group, n).to(dtype), ids, bits=bits, group_size=group, in_features=k)


def tiered(cases):
    """The first case of each kernel family in the default tier; its other variants (bits, dtypes, batch) in the full
    tier (slow), which CI runs."""
    seen = set()
    for case in cases:
        yield case if case[0] not in seen else pytest.param(case, marks=pytest.mark.slow)
        seen.add(case[0])


@pytest.mark.parametrize("case", list(tiered(CASES)), ids=lambda c: "-".join(map(str, c)))
def test_kernels_compile_for_hopper(case):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: tquant and tests importable without an install
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    expected = KERNELS[case[0]] if case[0] != "spqr" else [SPQR_KERNELS[case[2]], "_outlier_add_kernel"]
    assert [name for name, _, _ in compiled] == expected, compiled
    assert all(0 < regs <= 255 for _, regs, _ in compiled), compiled


if __name__ == "__main__":
    print(json.dumps(compile_case(*json.loads(sys.argv[1]))))
