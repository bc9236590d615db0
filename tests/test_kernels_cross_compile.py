"""Kernels compile for Hopper (sm_90) on a machine without a GPU (tquant.kernels.cross_compile): a kernel that the
interpreter runs but the CUDA compiler rejects fails here, not on a user's first launch. The launches (a default
config each, in a subprocess with the interpreter off) are the decode-attention kernels at the shapes of issue 5
(32 query heads on 8 KV heads, head size 128) and the BCQ matmul at batch 1 and 32; each must compile with no more
than 255 registers."""
import json
import os
import subprocess
import sys

import pytest

CASES = [("kivi", 4, "channel", "float16"), ("kivi", 2, "channel", "bfloat16"), ("kivi", 4, "token", "float16"),
         ("kivi", 3, "channel", "float32"), ("kvquant", 4, True, "float16"), ("kvquant", 3, False, "bfloat16"),
         ("bcq", 4, 1, "float16"), ("bcq", 3, 32, "bfloat16")]
KERNELS = {"kivi": ["_kv_attention_kernel", "_combine_kernel"],
           "kvquant": ["_kvquant_attention_kernel", "_combine_kernel"], "bcq": ["_bcq_matmul_kernel"]}


def compile_case(kind, bits, option, dtype):
    """[(kernel name, registers, spilled bytes)] of one launcher call compiled for sm_90."""
    import torch

    from tquant import kv_quant
    from tquant import kvquant_format as fmt
    from tquant.kernels import bcq_matmul, kv_attention, kvquant_attention
    from tquant.kernels.cross_compile import compiling_for

    dtype = getattr(torch, dtype)
    b, hkv, hq, d, t = 1, 8, 32, 128, 512
    q = torch.randn(b, hq, d).to(dtype)
    config = kv_attention.configs(4096)[0]
    with compiling_for() as done:
        if kind == "bcq":  # option: the batch
            alphas = torch.rand(bits, 4, 256).to(dtype)
            planes = torch.zeros(bits, 512 // 32, 256, dtype=torch.int32)
            bcq_matmul.launch(bcq_matmul.configs(option, 128)[0], torch.randn(option, 512).to(dtype), planes, alphas,
                              torch.zeros(4, 256).to(dtype))
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernels_compile_for_hopper(case):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tquant importable without an install
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    assert [name for name, _, _ in compiled] == KERNELS[case[0]], compiled
    assert all(0 < regs <= 255 for _, regs, _ in compiled), compiled


if __name__ == "__main__":
    print(json.dumps(compile_case(*json.loads(sys.argv[1]))))
