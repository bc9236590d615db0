"""Kernels compile for Hopper (sm_90) on a machine without a GPU (tquant.kernels.cross_compile): a kernel that the
interpreter runs but the CUDA compiler rejects fails here, not on a user's first launch. The launches (a default
config each, in a subprocess with the interpreter off) are the decode-attention kernels at Llama-3-8B shapes
(32 query heads on 8 KV heads, head size 128), the BCQ matmul at batch 1 and 32 (and its table paths at batch 1), and SpQR's (the weight-only GEMV /
GEMM decoding bilevel stats, then the outlier kernel) at batch 1 and 16, and the static decoder's fused step kernels
(RMSNorm, RoPE + cache write, silu * up, float-cache attention, the per-token KV write) at batch 1 and 16, KIVI's
static-cache decode and prefill writes (groups of 32 and 128 tokens, a bf16 ring of fp32 tokens), and the grouped MoE matmul's
decode launches (gate_up, then down, of one token's top-2 of 8 Mixtral-like experts); and, each
through the branches the GPU takes (the first GPU candidate, and other candidates or forced configs for the
constexpr branches that candidate misses: split-K, kernel variants, decoders): the FP8 kernels (activation
quantization, the fp8 tl.dot GEMM, the weight-only GEMM, the GEMM quantizing x itself) and the FP8 store of the
decode attention, the activation quantization, the W8A8 / W4A8 GEMMs (W4A8's dense path), the weight-only GEMV / GEMM
(inline-asm dequantization, split-K) and dequantize kernels, the bit-plane GEMV (hardware popcount) and WpAq / A16
GEMMs, QuIP#'s E8P kernels and the fused Hadamard transform (the *_step functions say which launches). Each must
compile with no more than 255 registers. docs/testing.md lists the GPU-only branches, the GPU test reaching each and its case here."""
import json
import os
import subprocess
import sys

import pytest

CASES = [("kivi", 4, "channel", "float16"), ("kivi", 2, "channel", "bfloat16"), ("kivi", 4, "token", "float16"),
         ("kivi", 8, "token", "bfloat16"), ("kivi", 3, "channel", "float32"), ("kvquant", 4, True, "float16"), ("kvquant", 3, False, "bfloat16"),
         ("kvquant", 2, True, "bfloat16"),
         ("bcq", 4, 1, "float16"), ("bcq", 3, 32, "bfloat16"), ("spqr", 3, 1, "float16"), ("spqr", 4, 16, "float16"),
         ("bcq_lut", 3, 1, "float16"), ("bcq_smem", 3, 1, "float16"), ("bcq_smem", 4, 1, "bfloat16"),
         ("decode", 4, 1, "float16"), ("decode", 8, 16, "bfloat16"),
         ("moe", 4, 1, "float16"), ("fp8", 8, 1, "float16"), ("fp8", 8, 64, "bfloat16"),
         ("fp8_kv", 8, False, "float16"), ("fp8_kv", 8, True, "bfloat16"), ("act_quant", 8, 1, "float16"),
         ("act_quant", 4, 16, "bfloat16"), ("int8_gemms", 8, 16, "float16"), ("int8_gemms", 8, 256, "bfloat16"),
         ("weight_only", 4, 1, "float16"), ("weight_only", 4, 16, "bfloat16"), ("weight_only", 8, 64, "float16"),
         ("bitplane", 4, 1, "float16"), ("bitplane", 2, 64, "bfloat16"), ("e8p", 2, 1, "float16"),
         ("e8p", 4, 16, "bfloat16"), ("hadamard", 16, 1, "float16"), ("hadamard", 16, 64, "bfloat16"),
         ("kivi_write", 2, 32, "float16"), ("kivi_write", 4, 128, "bfloat16"), ("kivi_write", 3, 32, "float32")]
KERNELS = {"kivi": ["_kv_attention_kernel", "combine_kernel"],
           "kvquant": ["_kvquant_attention_kernel", "combine_kernel"], "bcq": ["_bcq_matmul_kernel"],
           "bcq_lut": ["_bcq_table_kernel", "_bcq_lut_kernel"], "bcq_smem": ["_bcq_table_kernel", "_bcq_smem_kernel"],
           "decode": ["_rms_norm_kernel", "_rope_qkv_kernel", "_silu_mul_kernel", "_kv_attention_kernel",
                      "combine_kernel", "_kv_quant_write_kernel"],
           "moe": ["_grouped_gemm_kernel", "_grouped_gemm_kernel"],
           "fp8": ["_fp8_quant_kernel", "_fp8_quant_kernel", "_fp8_kernel", "_fp8_kernel"],
           "fp8_kv": ["_kv_attention_kernel", "combine_kernel"],
           "act_quant": ["_act_quant_kernel", "_act_quant_kernel", "_act_quant_kernel"],
           "int8_gemms": ["_w8a8_kernel", "_w4a8_kernel", "_w4a8_kernel"],
           "hadamard": ["_hadamard_kernel", "_hadamard_kernel"],
           "kivi_write": ["_kivi_write_kernel", "_kivi_prefill_kernel"]}
# families whose launches follow their candidate lists: the set of kernels compiled (at least one launch each)
KERNEL_SETS = {"bitplane": {"_bitplane_kernel", "_decode_kernel", "_bitplane_a16_kernel"},
               "e8p": {"_e8p_gemm_kernel", "_e8p_decode_kernel"}}
SMALL_BATCH_KERNELS = {"bitplane": {"_pack_activations_kernel", "_bitplane_gemv_kernel"}, "e8p": {"_e8p_gemv_kernel"}}
SPQR_KERNELS = {1: "_dequant_gemv_kernel", 16: "_dequant_gemm_kernel"}


def expected_kernels(kind, bits, option, dtype):
    """The kernels a case launches, in order (option: the batch where it names one)."""
    if kind == "spqr":
        return [SPQR_KERNELS[option], "_outlier_add_kernel"]
    if kind == "weight_only":
        return [SPQR_KERNELS[min(option, 16)]] * 2 + ["_dequantize_kernel"]
    if kind in KERNEL_SETS:  # the GEMV at batch 1 (bitplane: up to 8)
        return KERNEL_SETS[kind] | (SMALL_BATCH_KERNELS[kind] if option <= (8 if kind == "bitplane" else 1) else set())
    if kind == "fp8":  # up to 16 fp8_linear's fused path (the GEMM quantizing x itself), to 64 split-K W8A8, W8A16
        return KERNELS[kind] + ["_fp8_kernel"] * ((option <= 16) + 2 * (option <= 64))
    if kind == "int8_gemms" and option >= 256:  # the W4A8 dense path: unpack to int8, then the W8A8 GEMM
        return KERNELS[kind] + ["_unpack_kernel", "_w8a8_kernel"]
    if kind == "int8_gemms" and option <= 64:  # split-K W8A8 and W4A8
        return KERNELS[kind] + ["_w8a8_kernel", "_w4a8_kernel"]
    return KERNELS[kind]


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
        if kind in STEPS:  # option: the batch, or (fp8_kv) whether the store is static (length)
            STEPS[kind](option, bits, dtype)
        elif kind == "moe":  # option: the tokens; 8 experts, top-2, hidden 1024, intermediate 512, groups of 128
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
            path = {"bcq": "dot", "bcq_lut": "lut", "bcq_smem": "smem"}[kind]
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


def gpu_defaults(*modules):
    """Launchers on CPU tensors with the interpreter off: their device checks off, TQUANT_AUTOTUNE=0 (the first
    candidate of the GPU list, as an untuned GPU runs)."""
    for module in modules:
        module.check_device = lambda tensors: None
    os.environ["TQUANT_AUTOTUNE"] = "0"


def fp8_step(batch, bits, dtype):
    """tquant.kernels.fp8_gemm at Llama-3-8B widths: the activation quantization per token at K 4096 (one row a
    program in 8 warps) and static at K 14336 (16 warps), the W8A8 GEMM (the fp8 tl.dot: Hopper's fp8 wgmma, bias in
    dtype) and the weight-only GEMM (e4m3 tiles converted to dtype for a fp16 / bf16 tl.dot), N 1024; up to
    FUSED_MAX_M also fp8_linear's first fused candidate (x quantized per token inside the GEMM); up to batch 64 the
    first split-K candidate of the W8A8 and weight-only GEMMs (int32 / fp32 partials and the atomic counters)."""
    import torch

    from tquant.kernels import fp8_gemm

    gpu_defaults(fp8_gemm)
    x = torch.randn(batch, 4096).to(dtype)
    xq, x_scale = fp8_gemm.quantize_fp8(x)
    fp8_gemm.quantize_fp8(torch.randn(batch, 14336).to(dtype), scale=torch.ones(1))
    wq, w_scale = torch.zeros(1024, 4096, dtype=fp8_gemm.FP8), torch.ones(1024)
    fp8_gemm.fp8_matmul(xq, x_scale, wq, w_scale, bias=torch.zeros(1024).to(dtype), out_dtype=dtype)
    fp8_gemm.fp8_weight_only_matmul(x, wq, w_scale)
    fused = [c for c in fp8_gemm.linear_configs(batch, static=False) if c["path"] == "fused"]
    if fused:
        fp8_gemm.run_path(fused[0], x, None, wq, w_scale, None)
    split = [c for c in fp8_gemm.configs(batch, n=1024, k=4096) if "SPLIT_K" in c]
    if split:
        fp8_gemm.launch(split[0], "w8a8", xq, x_scale, wq, w_scale, None, dtype)
        fp8_gemm.launch(split[0], "w8a16", x, None, wq, w_scale, None, dtype)


def fp8_kv_step(static, bits, dtype):
    """fp8_decode_attention (the FP8 branch of the decode-attention kernel: e4m3 keys and values times their KV
    head's scale) at Llama-3-8B shapes over 1152 stored tokens and the step's own token; static: a static store read
    up to length[b] (else left padding, start)."""
    import torch

    from tquant.kv import attention as kv_attention

    gpu_defaults(kv_attention)
    b, hkv, hq, d, t = 2, 8, 32, 128, 1152
    k8, v8 = torch.zeros(2, b, hkv, t, d, dtype=torch.float8_e4m3fn)
    res = torch.randn(b, hkv, 1, d).to(dtype)
    lengths = dict(length=torch.full((b,), t // 2, dtype=torch.int32)) if static else dict(start=torch.zeros(b, dtype=torch.int32))
    kv_attention.fp8_decode_attention(torch.randn(b, hq, d).to(dtype), k8, v8, torch.ones(hkv), torch.ones(hkv), res,
                                      res, **lengths)


def act_quant_step(batch, bits, dtype):
    """quantize_activations (tquant.kernels.act_quant) at K 4096 (one block of 4096, 8 warps) with smoothing, at K
    14336 (blocks of 4096 in a loop), and the asymmetric per-token grid (zero_point) at K 1000."""
    import torch

    from tquant.kernels import act_quant

    gpu_defaults(act_quant)
    act_quant.quantize_activations(torch.randn(batch, 4096).to(dtype), bits=bits, smooth=torch.ones(4096).to(dtype))
    act_quant.quantize_activations(torch.randn(batch, 14336).to(dtype), bits=bits)
    act_quant.quantize_activations(torch.randn(batch, 1000).to(dtype), bits=bits, zero_point=True)


def int8_gemms_step(batch, bits, dtype):
    """The W8A8 GEMM (int8 tl.dot) and the W4A8 GEMM (tquant.kernels.w4a8_gemm: per-channel, then groups of 128 with
    QoQ's zero points) at K 4096, N 1024; from batch 256 also the W4A8 dense path (the int8 unpack kernel, then the
    W8A8 GEMM), which the tuner offers only there; up to batch 64 the first split-K candidate of each (int32
    partials and the atomic counters), W4A8's with groups and zeros."""
    import torch

    from tquant.kernels import w4a8_gemm, w8a8_gemm

    gpu_defaults(w8a8_gemm, w4a8_gemm)
    k, n, group = 4096, 1024, 128
    xq, x_scale = torch.zeros(batch, k, dtype=torch.int8), torch.ones(batch)
    w_scale, bias = torch.ones(n), torch.zeros(n).to(dtype)
    w8a8_gemm.w8a8_matmul(xq, x_scale, torch.zeros(n, k, dtype=torch.int8), w_scale, bias=bias, out_dtype=dtype)
    qweight, sg = torch.zeros(k // 8, n, dtype=torch.int32), torch.ones(k // group, n, dtype=torch.int8)
    w4a8_gemm.w4a8_matmul(xq, x_scale, qweight, w_scale, out_dtype=dtype)
    args = (xq, x_scale, qweight, w_scale, sg, group, bias, dtype, 8, k, torch.zeros_like(sg))
    w4a8_gemm.launch(w4a8_gemm.configs(batch)[0], *args)
    if batch >= w4a8_gemm.DENSE_FROM_M:
        w4a8_gemm.launch(w4a8_gemm.DENSE, *args)
    if batch <= w8a8_gemm.SPLIT_MAX_M:
        w8a8_gemm.launch(next(c for c in w8a8_gemm.configs(batch, n=n, k=k) if "SPLIT_K" in c), xq, x_scale,
                         torch.zeros(n, k, dtype=torch.int8), w_scale, bias, dtype)
        w4a8_gemm.launch(next(c for c in w4a8_gemm.configs(batch, n=n, k=k) if "SPLIT_K" in c), *args)


def weight_only_step(batch, bits, dtype):
    """The weight-only matmul's GPU paths (tquant.kernels.weight_only_matmul) at K 4096, N 1024, groups of 128, with
    act-order perm from batch 2: the default candidate (batch 1: the GEMV; batch 2..16: the GEMM with the inline-asm
    dequantization where dequant_gemm.ASM_BITS has the dtype's bits; larger batches the MMA's GEMM), the same config
    with split-K turned the other way (SPLIT_K 1 where the default splits, else 4: the atomic_add tile counters), then the dequantize kernel (the dense path)."""
    import torch

    from tquant.kernels import dequant_gemm, weight_only_matmul

    gpu_defaults(weight_only_matmul)
    k, n, group = 4096, 1024, 128
    x = torch.randn(batch, k).to(dtype)
    weight = (torch.zeros(k * bits // 32, n, dtype=torch.int32), torch.ones(k // group, n).to(dtype),
              torch.zeros(k // group, n).to(dtype))
    perm = torch.randperm(k).int() if batch > 1 else None
    configs = weight_only_matmul.candidates(batch, n, weight[0].shape[0], perm is not None)
    for config in (configs[0], dict(configs[0], SPLIT_K=1 if configs[0]["SPLIT_K"] > 1 else 4)):
        weight_only_matmul.run_path(config, x, *weight, perm, None, bits=bits, group_size=group, in_features=k)
    dequant_gemm.dequantize(*weight, perm, bits=bits, group_size=group, in_features=k, dtype=dtype)


def distinct(configs, key):
    """The first config of each key(config), in order: one launch per distinct set of constexpr branches."""
    seen = {}
    for config in configs:
        seen.setdefault(key(config), config)
    return list(seen.values())


def bitplane_step(batch, bits, dtype):
    """The bit-plane kernels (tquant.kernels.bitplane_gemm / bitplane_gemv) at K 4096, N 1024, groups of 128, 8-bit
    activations: up to batch 8 the popcount GEMV (libdevice.popc: HW_POPC) after the activation packing kernel, then
    the first GPU candidate of each WpAq variant (rebuild, rebuild split over K, planes, dense: the decode kernel
    first) and the A16 kernel (its tl.dot in dtype)."""
    import torch

    from tquant.kernels import bitplane_gemm, bitplane_gemv

    k, n, group, act_bits = 4096, 1024, 128, 8
    args = (torch.zeros(batch, k, dtype=torch.int8), torch.ones(batch), torch.zeros(batch, dtype=torch.int32),
            torch.zeros(bits, k // 32, n, dtype=torch.int32), torch.ones(k // group, n),
            torch.zeros(k // group, n, dtype=torch.uint8), torch.zeros(k // group, n, dtype=torch.int32), bits,
            act_bits, group, torch.zeros(n).to(dtype), dtype)
    if batch <= 8:
        bitplane_gemv.launch(bitplane_gemv.configs(batch, n, k, group, bits, act_bits)[0], *args)
    gpu = bitplane_gemm.configs(batch, k, group) + bitplane_gemm.configs(bitplane_gemm.DENSE_MIN_M, k, group)
    for config in distinct(gpu, lambda c: (c["variant"], c.get("SPLIT_K", 1) > 1)):
        bitplane_gemm.launch(config, *args)
    bitplane_gemm.launch_a16(bitplane_gemm.a16_configs(batch, k, group)[0], torch.randn(batch, k).to(dtype), *args[3:6],
                             bits, group, None)


def e8p_step(batch, bits, dtype):
    """QuIP#'s E8P kernels (tquant.kernels.e8p_matmul) at K 4096, N 1024: the first GPU candidate of each path and
    decoder (SIGNS, GATHER) with and without split-K (batch 1: the GEMV, and the GEMM the tuner also offers there),
    then the decode kernel (the dense path)."""
    import torch

    from tquant.kernels import e8p_matmul

    k, n = 4096, 1024
    codes = torch.zeros(k // 8, n, dtype=torch.int16)
    codes2 = torch.zeros(k // 8, n, dtype=e8p_matmul.CODES2_DTYPE[bits]) if bits > 2 else None
    x = torch.randn(batch, k).to(dtype)
    configs = [c for c in e8p_matmul.candidates(batch, n, k // 8) if c["path"] != "dense"]
    for config in distinct(configs, lambda c: (c["path"], c["SIGNS"], c["GATHER"], c["SPLIT_K"] > 1)):
        e8p_matmul.run_path(config, x, codes, codes2, None, bits=bits)
    e8p_matmul.decode_weight(codes, codes2, bits=bits, dtype=dtype)


def hadamard_step(rows, bits, dtype):
    """The fused Hadamard transform (tquant.kernels.hadamard) with its default GPU config: along 4096 (a power of
    two) with in_scale, out_scale and bias, and along 14336 = 7 * 2048 (Llama-3-8B's down projection input: a
    factor of 28 besides the powers of two) transposed."""
    import torch

    from tquant.kernels import hadamard

    gpu_defaults(hadamard)
    v = torch.ones(4096).to(dtype)
    hadamard.hadamard_transform(torch.randn(rows, 4096).to(dtype), in_scale=v, out_scale=v, bias=v)
    hadamard.hadamard_transform(torch.randn(rows, 14336).to(dtype), transpose=True)


def kivi_write_step(group, bits, dtype):
    """kivi_write (tquant.kv.kivi_write): one decode token of batch 2 at Llama-3-8B's KV heads (8 of 128) into a
    ring of residual 16 + group slots and the stores of 1024 tokens; dtype: the tokens', the ring's too but bf16 for
    fp32 tokens (the kernel's rounding of them to bf16); then kivi_prefill_write of a 1024-token prefill's complete
    groups into the same stores, its keys a [B, T, H, D] projection's transposed view."""
    import torch

    from tquant.kv import kivi_write
    from tquant.kv.uniform_format import PackedKV, words_per_group

    gpu_defaults(kivi_write)
    b, h, d, groups, wpg = 2, 8, 128, 1024 // group + 1, words_per_group(bits, group)
    k = torch.randn(b, h, 1, d).to(dtype)
    ring = torch.zeros(b, h, 16 + group, d).to(torch.bfloat16 if dtype == torch.float32 else dtype)

    def store(codes, params):
        return PackedKV(torch.zeros(b, h, *codes, dtype=torch.int32), *torch.zeros(2, b, h, *params).half())
    kivi_write.kivi_write(k, k, ring, ring, store((groups * wpg, d), (groups, d)),
                          store((groups * group, d // group * wpg), (groups * group, d // group)), torch.tensor([5]),
                          torch.tensor([group]), bits, group)
    n = (1024 - 16) // group * group
    x = torch.randn(b, 1024, h, d).to(dtype).transpose(1, 2)[:, :, :n]
    kivi_write.kivi_prefill_write(x, x.contiguous(), store((groups * wpg, d), (groups, d)),
                                  store((groups * group, d // group * wpg), (groups * group, d // group)), bits, group)


STEPS = {"fp8": fp8_step, "fp8_kv": fp8_kv_step, "act_quant": act_quant_step, "int8_gemms": int8_gemms_step,
         "weight_only": weight_only_step, "bitplane": bitplane_step, "e8p": e8p_step, "hadamard": hadamard_step,
         "kivi_write": kivi_write_step}


FULL_TIER_FAMILIES = {"act_quant", "int8_gemms", "weight_only", "bitplane", "e8p", "hadamard"}


def tiered(cases):
    """The first case of each kernel family in the default tier; its other variants (bits, dtypes, batch) in the full
    tier (slow), which CI runs, with every case of FULL_TIER_FAMILIES (15 s a case on a 2-core machine: the default
    tier stays near 2.5 minutes)."""
    seen = set()
    for case in cases:
        slow = case[0] in seen or case[0] in FULL_TIER_FAMILIES
        yield pytest.param(case, marks=pytest.mark.slow) if slow else case
        seen.add(case[0])


def bcq_smem_opcodes(bits, entries):
    """{SASS opcode: count} of the BCQ "smem" kernel compiled for sm_90 at batch 1, fp16, groups of 128, no offset,
    its first candidate with tables of `entries` whose words are not pipelined and whose tables stay fp16."""
    import re
    from collections import Counter

    import torch

    from tquant.kernels import bcq_matmul
    from tquant.kernels.cross_compile import compiling_for

    bcq_matmul.interpreter_on = lambda: False  # the GPU candidates
    config = next(c for c in bcq_matmul.configs(1, 128)
                  if c["path"] == "smem" and c["entries"] == entries and c["num_stages"] == 1 and not c["f32_table"])
    with compiling_for() as done:
        bcq_matmul.launch(config, torch.randn(1, 512).half(), torch.zeros(bits, 16, 256, dtype=torch.int32),
                          torch.rand(bits, 4, 256).half())
    return Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", done[-1].sass()))


def kv_tile_loops(bits, dtype, rep):
    """{"v5" / "v6": (SASS instructions in the store loop, registers, spilled bytes)} of the KV decode attention over a
    QoQ store (keys and values per token, group 128 = D, both folded) compiled for sm_90: B = 1, 8 KV heads of `rep`
    query heads, BLOCK_T 64, 4 warps, 1 stage; v5 forced by the config's REAL_ROWS False, v6 the launcher's default.
    The store loop: the instructions from the label of the backward branch whose loop holds the tensor-core ops and the
    code decode's LOP3s (the residual window's loop has none) up to that branch."""
    import re

    import torch

    from tquant.kv import attention
    from tquant.kv import uniform_format as kv_quant
    from tquant.kernels.cross_compile import compiling_for

    dtype, hkv, d, t = getattr(torch, dtype), 8, 128, 512
    k, v = torch.randn(2, 1, hkv, t, d).to(dtype)
    window = torch.randn(1, hkv, 16, d).to(dtype)
    out = {}
    for name, real in (("v5", False), ("v6", True)):
        config = {"BLOCK_T": 64, "SPLITS": 1, "num_warps": 4, "num_stages": 1, "REAL_ROWS": real}
        keys, values = kv_quant.key_format("token")[0](k, bits, d), kv_quant.quantize_values(v, bits, d)
        with compiling_for() as done:
            attention.launch(config, torch.randn(1, hkv * rep, d).to(dtype), keys, values, window, window, bits, d,
                             d**-0.5, None, "token")
        ops, labels, loops = [], {}, []
        for line in done[0].sass().splitlines():
            label = re.match(r"\s*(\.L_x_\d+):", line)
            if label:
                labels[label.group(1)] = len(ops)
            op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*)", line)
            if op:
                ops.append(op.groups())
        for j, (op, rest) in enumerate(ops):
            target = re.search(r"\.L_x_\d+", rest) if op.startswith("BRA") else None
            if target and labels.get(target.group(0), j + 1) <= j:
                body = [o for o, _ in ops[labels[target.group(0)]:j + 1]]
                if any(o.startswith(("HMMA", "HGMMA")) for o in body):
                    loops.append((sum(o.startswith("LOP3") for o in body), len(body)))
        out[name] = (max(loops)[1], done[0].registers, done[0].spill_bytes)
    return out


def compile_in_subprocess(call):
    """The JSON printed by this file run as a script on `call` (interpreter off, as on a GPU)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: tquant and tests importable without an install
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, __file__, json.dumps(call)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(tiered(CASES)), ids=lambda c: "-".join(map(str, c)))
def test_kernels_compile_for_hopper(case):
    compiled = compile_in_subprocess(case)
    expected = expected_kernels(*case)
    names = [name for name, _, _ in compiled]
    assert (set(names) if isinstance(expected, set) else names) == expected, compiled
    assert all(0 < regs <= 255 for _, regs, _ in compiled), compiled


@pytest.mark.parametrize("bits,entries", [(3, 256), (4, 128)])
def test_kernels_bcq_smem_gathers_through_shared_memory(bits, entries):
    """The BCQ "smem" path's tl.gather (its K step's tables, [BLOCK_K / 8 * 128] spread over all warps) compiles for
    sm_90 to one shared-memory load per plane byte of a K step of 128 (16 q LDS.U16 in the kernel), no warp shuffle
    (the lowering of a table held within one warp) and no global gather (its only 2-byte global loads: the q alphas)."""
    ops = compile_in_subprocess(["bcq_smem_opcodes", bits, entries])
    assert ops.get("LDS.U16") == 16 * bits, ops
    assert not [op for op in ops if op.startswith("SHFL")], ops
    assert ops.get("LDG.E.U16") == bits, ops


@pytest.mark.parametrize("bits,dtype,rep,ratio", [(4, "float16", 4, 0.75),
                                                 pytest.param(8, "bfloat16", 8, 1.0, marks=pytest.mark.slow),
                                                 pytest.param(2, "float16", 1, 1.0, marks=pytest.mark.slow)])
def test_kernels_kv_attention_real_rows_compile_for_hopper(bits, dtype, rep, ratio):
    """The KV decode attention's v6 path (tquant.kv.attention: the online softmax on the R real query rows, the two
    dots transposed) compiles for sm_90 over QoQ stores (fp16: the inline-asm pair decode; bf16: the plain one) at
    rep 4 (Llama-3-8B, R = 4), 8 (R = 8) and 1 (R = 1, a lane-held split), within 255 registers and without spills,
    and its store loop has fewer instructions than v5's (16 padded rows) on the same launch: at most `ratio` of
    them (v6 434 against v5 618 at rep 4 in fp16 with Triton 3.9; benchmarks/RESULTS.md)."""
    loops = compile_in_subprocess(["kv_tile_loops", bits, dtype, rep])
    (v5, _, _), (v6, regs, spills) = loops["v5"], loops["v6"]
    assert 0 < regs <= 255 and spills == 0, loops
    assert v6 < v5 and v6 <= ratio * v5, loops


if __name__ == "__main__":
    call = json.loads(sys.argv[1])
    helpers = {"bcq_smem_opcodes": bcq_smem_opcodes, "kv_tile_loops": kv_tile_loops}
    print(json.dumps(helpers[call[0]](*call[1:]) if call[0] in helpers else compile_case(*call)))
