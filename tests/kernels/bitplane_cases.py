"""Inputs and checks shared by the bit-plane kernel tests (test_kernels_bitplane_gemm.py, ..._gemv.py): random
float layers with outliers and asymmetric ranges, quantized on the WpAq grid, and the normwise comparison."""
import torch

from tquant.kernels.act_quant import quantize_activations_ref
from tquant.kernels.bitplane_gemm import quantize_weight_ref
from tests.kernel_device import DEVICE
from tests.kernel_device import assert_close as kernel_close

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# normwise relative; bf16: two roundings of up to 2^-7 each (the interpreter truncates fp32 to bf16, torch rounds)
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
PAPER_COMBINATIONS = [(8, 8), (4, 8), (6, 6), (4, 6), (4, 4), (3, 8), (3, 6), (2, 8), (2, 6)]  # (bits, act_bits) ABQ-LLM reports


def float_inputs(m, n, k, seed):
    """Random x [M, K] with outlier channels and all-positive rows (zero point 0), w [N, K] with outlier rows and
    shifted rows (asymmetric ranges), bias [N]."""
    g = torch.Generator().manual_seed(seed)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    x[:, ::5] *= 10
    x[1::2] = x[1::2].abs()
    w[::7] *= 20
    w[1::3] += 0.1
    return x, w, bias


def quantized_inputs(m, n, k, group_size, bits, act_bits, seed, device=DEVICE):
    """[xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bias] on device (tquant's quantizers), then the float
    x and w."""
    x, w, bias = float_inputs(m, n, k, seed)
    xq, x_scale, x_zero = quantize_activations_ref(x, bits=act_bits, zero_point=True)
    weight = quantize_weight_ref(w, bits, group_size)
    return [t.to(device) for t in (xq, x_scale, x_zero, *weight, bias)] + [x, w]


def random_codes(m, n, k, gs, bits, act_bits, seed):
    """xq [M, K] (a' extremes -2^(q-1) and 2^(q-1) - 1 included), codes [N, K] (0 and 2^p - 1 included), x_zero [M]
    and w_zero [G, N] over their whole ranges (both ends included)."""
    g = torch.Generator().manual_seed(seed)
    half = 2 ** (act_bits - 1)
    xq = torch.randint(-half, half, (m, k), generator=g, dtype=torch.int8)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    x_zero = torch.randint(0, 2**act_bits, (m,), generator=g, dtype=torch.int32)
    w_zero = torch.randint(0, 2**bits, (k // gs, n), generator=g, dtype=torch.int32).to(torch.uint8)
    xq[0, 0], xq[-1, -1], codes[0, 0], codes[-1, -1] = -half, half - 1, 0, 2**bits - 1
    x_zero[0], x_zero[-1], w_zero[0, 0], w_zero[-1, -1] = 2**act_bits - 1, 0, 2**bits - 1, 0
    return xq, codes, x_zero, w_zero


def assert_close(y, ref, dtype, tol=None, magnitude=None):
    """kernel_device.assert_close at this file's TOL (or tol)."""
    kernel_close(y, ref, dtype, tol or TOL[dtype], magnitude)


def compiled_in_subprocess(path: str) -> list:
    """Run the test file at `path` as a script with the interpreter off (it cross-compiles its cases for sm_90 and
    prints them as JSON on its last line) and return what it printed; tquant importable without an install."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))  # the repo
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
