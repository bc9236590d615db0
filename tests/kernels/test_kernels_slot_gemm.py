"""slot_gemm (one tl.dot per code slot) against the torch reference weight_only_matmul_ref: random codes, scales and
zeros at odd shapes (M 1..40: one or more row tiles, N not a multiple of the tile, K of one to several K steps),
bits 2 / 4 / 8, per-channel, groups spanning a K step and groups smaller than one, split-K, x strided or slot-major,
bias, fp16 / bf16 / fp32, activation outliers; the dispatcher's path; the input refusals; and, compiled for sm_90 at
M = 16, 64 and 1024, the property the kernel exists for: the dequantized weights reach wgmma from registers.

Runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, conftest.py) and with TRITON_INTERPRET=0 on a GPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.formats.packing import pack_codes
from tquant.kernels import slot_gemm
from tquant.kernels import weight_only_matmul as wom
from tquant.kernels.weight_only_matmul import weight_only_matmul_ref
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)
from tests.kernel_device import assert_close

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_inputs(m, n, k, bits, group_size, dtype, bias, seed, outlier=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    groups = k // group_size
    x = torch.randn(m, k, generator=g)
    if outlier:  # one huge activation among ordinary ones
        x[0, torch.randint(0, k, (1,), generator=g)] = 2e3 if dtype == torch.float16 else 1e5
    t = dict(x=x.to(dtype), qweight=pack_codes(codes, bits),
             scales=(torch.rand(groups, n, generator=g) * 0.05 + 0.005).to(dtype),
             zeros=torch.randint(0, 2**bits, (groups, n), generator=g).to(dtype),
             bias=torch.randn(n, generator=g).to(dtype) if bias else None)
    return {name: v.to(DEVICE) if v is not None else None for name, v in t.items()}


def both(t, bits, group_size, config):
    k = t["x"].shape[1]
    y = slot_gemm.gemm(t["x"], t["qweight"], t["scales"], t["zeros"], t["bias"], bits=bits, group_size=group_size,
                       config=config)
    ref = weight_only_matmul_ref(t["x"], t["qweight"], t["scales"], t["zeros"], bits=bits, group_size=group_size,
                                 in_features=k, bias=t["bias"])
    return y, ref


def magnitude(t, bits, group_size):
    """|x| @ |w| (+ |bias|): the scale of the rounding of sums that may cancel."""
    k = t["x"].shape[1]
    w = weight_only_matmul_ref(torch.eye(k, dtype=torch.float32, device=t["x"].device), t["qweight"],
                               t["scales"].float(), t["zeros"].float(), bits=bits, group_size=group_size, in_features=k)
    mag = t["x"].float().abs() @ w.abs()
    return mag if t["bias"] is None else mag + t["bias"].float().abs()


def configs_under_test(m, n, kw):
    if DEVICE == "cpu":
        c = slot_gemm.INTERPRETER_CONFIG
        return [c, dict(c, SPLIT_K=1, BLOCK_KW=32, BLOCK_M=32, x="slot-major"), dict(c, SPLIT_K=3, BLOCK_N=16)]
    gpu = slot_gemm.configs(min(64, 1 << (m - 1).bit_length()), n, kw)
    return [gpu[0], dict(gpu[0], SPLIT_K=3, BLOCK_M=16, x="slot-major"),
            dict(gpu[0], BLOCK_N=128, BLOCK_KW=32, num_warps=8, num_stages=3)]


@st.composite
def cases(draw):
    """(m, n, k, bits, group_size): per-channel, groups spanning whole K steps, or groups of 1-2 words (smaller than
    a K step of 16 words), K of one to several steps."""
    bits = draw(st.sampled_from(slot_gemm.BITS))
    epw = 32 // bits
    m, n = draw(st.integers(1, 40)), draw(st.integers(1, 80))
    kind = draw(st.sampled_from(["channel", "steps", "words"]))
    if kind == "channel":
        k = epw * draw(st.integers(1, 48))
        return m, n, k, bits, k
    group_size = epw * (16 * draw(st.sampled_from([1, 2])) if kind == "steps" else draw(st.sampled_from([1, 2])))
    return m, n, group_size * draw(st.integers(1, max(1, 640 // group_size // epw))), bits, group_size


@needs_backend
@SLOW
@given(case=cases(), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), bias=st.booleans(),
       which=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_kernels_slot_gemm_matches_reference(case, dtype, bias, which, seed):
    m, n, k, bits, group_size = case
    t = make_inputs(m, n, k, bits, group_size, dtype, bias, seed)
    config = configs_under_test(m, n, k * bits // 32)[which]
    y, ref = both(t, bits, group_size, config)
    assert_close(y, ref.to(dtype), dtype, TOL[dtype], magnitude(t, bits, group_size))


@needs_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_slot_gemm_outlier_activation(dtype):
    """One activation far above the rest: every output finite and within the reference's rounding."""
    t = make_inputs(5, 40, 256, 4, 64, dtype, True, seed=3, outlier=True)
    y, ref = both(t, 4, 64, configs_under_test(5, 40, 32)[0])
    assert_close(y, ref.to(dtype), dtype, TOL[dtype], magnitude(t, 4, 64))


@needs_backend
def test_kernels_dispatcher_runs_the_slot_path():
    """weight_only_matmul's path "slots" (perm gathered first) gives the reference's y."""
    t = make_inputs(3, 24, 128, 4, 32, torch.float32, True, seed=5)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1)).to(torch.int32).to(DEVICE)
    args = dict(bits=4, group_size=32, in_features=128)
    config = dict(configs_under_test(3, 24, 16)[0], gather=True)
    y = wom.run_path(config, t["x"], t["qweight"], t["scales"], t["zeros"], perm, t["bias"], **args)
    ref = weight_only_matmul_ref(t["x"], t["qweight"], t["scales"], t["zeros"], perm=perm, bias=t["bias"], **args)
    assert_close(y, ref, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("m, bits, k, group_size", [(2, 3, 60, 60), (2, 4, 60, 60), (2, 4, 64, 4)])
def test_slot_gemm_refuses_what_it_does_not_take(m, bits, k, group_size):
    """3-bit codes (10 a word), K not whole words, groups splitting a word: refused by name."""
    x = torch.zeros(m, k)
    assert not slot_gemm.supports(x, bits, group_size, k)
    with pytest.raises(ValueError, match="slot_gemm takes bits"):
        slot_gemm.gemm(x, torch.zeros(-(-k * bits // 32), 8, dtype=torch.int32), torch.ones(k // group_size, 8),
                       torch.zeros(k // group_size, 8), None, bits=bits, group_size=group_size,
                       config=slot_gemm.INTERPRETER_CONFIG)


def _compiled_ttgir():
    """The GPU default configs at M = 16, 64 and 1024, compiled for sm_90 (run in a subprocess with the interpreter off)."""
    from tquant.kernels.cross_compile import compiling_for

    q = torch.zeros(512, 14336, dtype=torch.int32)
    s = torch.ones(32, 14336, dtype=torch.float16)
    with compiling_for() as done:
        for m in (16, 64, 1024):
            slot_gemm.gemm(torch.zeros(m, 4096, dtype=torch.float16), q, s, s, None, bits=4, group_size=128,
                           config=slot_gemm.configs(m, 14336, 512)[0])
    return done


def test_kernels_slot_gemm_compiles_for_hopper_without_converting_weight_tiles():
    """For sm_90, at M = 16, 64 and 1024: wgmma takes each dequantized [BLOCK_N, BLOCK_KW] = [64, 16] tile from registers,
    computed there, not read back from shared memory after a convert_layout (dequant_gemm's M <= 16 path has one: the
    round trip this kernel avoids) or a local_alloc + local_load; no spills."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for one in out:
        lines = one["ttgir"].splitlines()
        defs = {line.split("=")[0].strip(): line for line in lines if line.strip().startswith("%") and " = " in line}
        dots = [line for line in lines if "ttng.warp_group_dot " in line]
        assert dots and all("tensor<64x16xf16, #ttg.dot_op<{opIdx = 0" in line for line in dots), dots[:2]
        for dot in dots:  # the weight operand: computed in registers, not read back from shared memory
            operand = dot.split("ttng.warp_group_dot ")[1].split(",")[0].strip()
            made = defs[operand]
            assert "ttg.local_load" not in made and "ttg.convert_layout" not in made, made
        assert one["spill"] == 0


if __name__ == "__main__":  # the subprocess of the compile test
    print(json.dumps([{"ttgir": c.ttgir, "spill": c.spill_bytes, "registers": c.registers} for c in _compiled_ttgir()]))
