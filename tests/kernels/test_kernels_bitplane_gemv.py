"""Bit-plane popcount GEMV (ABQ-LLM's binary WpAq GEMV for decode): bitplane_gemv against bitplane_gemm's torch
reference on fresh quantized inputs (M 1..8 and beyond, every p, q in 2..8, per channel and groups of 32 / 64, K and
N not multiples of 32 or of the block, splits of K), the int32 sums and zero-point corrections exact (spans, splits,
bits past K), the activation packer against its pack_planes reference, the popcount and carry-save helpers, every
GPU candidate config, the input checks, and the kernels compiling for Hopper without spills.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py; the SWAR popcount there); with
TRITON_INTERPRET=0 on a GPU it runs the same checks there (libdevice popc).
"""
import json

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels import bitplane_gemv as bg
from tquant.kernels.bitplane_gemm import bitplane_matmul_ref, code_sums
from tquant.kernels.bitplane_gemv import bitplane_gemv, pack_activations, pack_activations_ref
from tquant.kernels.runtime import interpreter_on
from tquant.formats.packing import PLANE_K, pack_planes
from tests.kernels.bitplane_cases import (DTYPES, PAPER_COMBINATIONS, TOL, assert_close, compiled_in_subprocess, float_inputs,  # noqa: F401
                            quantized_inputs, random_codes)
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401 (autouse: NaN-filled outputs)

SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes(draw):
    """(m, n, k, group_size): M 1..8, N 1..100, per channel (any K in 1..150) or groups of 32 / 64 (1-3 groups)."""
    m, n = draw(st.integers(1, 8)), draw(st.integers(1, 100))
    group = draw(st.sampled_from(["channel", 32, 64]))
    k = draw(st.integers(1, 150)) if group == "channel" else group * draw(st.integers(1, 3))
    return m, n, k, (k if group == "channel" else group)


def both(args, bias=None, **kw):
    """(bitplane_gemv, bitplane_matmul_ref) of args = [xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum]."""
    return bitplane_gemv(*args, bias=bias, **kw), bitplane_matmul_ref(*args, bias=bias, **kw)


@needs_backend
@SLOW
@given(shape=shapes(), bits=st.integers(2, 8), act_bits=st.integers(2, 8), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_gemv_matches_reference(shape, bits, act_bits, dtype, bias, seed):
    m, n, k, gs = shape
    *args, b, _, _ = quantized_inputs(m, n, k, gs, bits, act_bits, seed)
    y, ref = both(args, b.to(dtype) if bias else None, bits=bits, act_bits=act_bits, group_size=gs, out_dtype=dtype)
    assert_close(y, ref, dtype)


@needs_backend
@pytest.mark.parametrize("act_bits", range(2, 9))
def test_kernels_bitplane_gemv_every_bit_width(act_bits):
    """Every p in 2..8 with this q, at one small shape (M=1, N=20, K=30 per channel: one partial word)."""
    for bits in range(2, 9):
        *args, b, _, _ = quantized_inputs(1, 20, 30, 30, bits, act_bits, seed=bits * 10 + act_bits)
        y, ref = both(args, b, bits=bits, act_bits=act_bits, group_size=30, out_dtype=torch.float32)
        assert_close(y, ref, torch.float32)


@needs_backend
@pytest.mark.parametrize("bits,act_bits", PAPER_COMBINATIONS, ids=[f"W{p}A{q}" for p, q in PAPER_COMBINATIONS])
def test_kernels_bitplane_gemv_paper_combinations(bits, act_bits):
    """ABQ-LLM's combinations at batch 1 and 3, per channel (K=100: a partial last word, split K) and groups of 32:
    the reference in fp32, and the quantized layer near the float one (x @ w^T + bias), closer with more bits."""
    for m, k, gs in ((1, 100, 100), (3, 96, 32)):
        *args, b, x, w = quantized_inputs(m, 40, k, gs, bits, act_bits, seed=bits * 10 + act_bits + m)
        y, ref = both(args, b, bits=bits, act_bits=act_bits, group_size=gs, out_dtype=torch.float32)
        assert_close(y, ref, torch.float32)
        expected = x.double() @ w.double().T + b.cpu().double()
        err = ((ref.cpu().double() - expected).norm() / expected.norm()).item()
        assert err < 2.0 ** (3 - min(bits, act_bits)), f"relative error {err:.2e} to the float layer"


@needs_backend
@pytest.mark.parametrize("m,bits,act_bits,blocks", [(13, 4, 4, (7, 2)), (9, 8, 8, (3, 3))])
def test_kernels_bitplane_gemv_row_blocks(m, bits, act_bits, blocks):
    """M > 8, or more than MAX_TERMS rows * p * q, runs in balanced row blocks (13 rows of W4A4: 7 + 6, the last
    row of the second block masked; W8A8: at most 3 rows a block, 9 rows as 3 + 3 + 3)."""
    assert bg.row_blocks(m, bits, act_bits) == blocks
    *args, b, _, _ = quantized_inputs(m, 24, 64, 32, bits, act_bits, seed=m)
    y, ref = both(args, b, bits=bits, act_bits=act_bits, group_size=32, out_dtype=torch.float32)
    assert_close(y, ref, torch.float32)


def exact_inputs(m, n, k, gs, bits, act_bits, seed):
    """(args with unit scales on DEVICE, the exact integer y = sum_k (a - x_zero)(c - w_zero) [M, N] in int64)."""
    xq, codes, x_zero, w_zero = random_codes(m, n, k, gs, bits, act_bits, seed)
    a = xq.long() + 2 ** (act_bits - 1) - x_zero.long()[:, None]
    exact = a @ (codes.long() - w_zero.long().t().repeat_interleave(gs, dim=1)).t()
    planes = pack_planes(codes, bits)
    args = [xq, torch.ones(m), x_zero, planes, torch.ones(k // gs, n), w_zero, code_sums(planes, k, gs)]
    return [t.to(DEVICE) for t in args], exact


def run_config(config, args, *, bits, act_bits, group_size, bias=None, out_dtype=torch.float32):
    return bg.launch(config, *args, bits, act_bits, group_size, bias, out_dtype)


EXACT = [  # (m, n, k, group_size, bits, act_bits, BLOCK_KW, SPLIT_K): K % 32 != 0 with CODE_SUMS, spans, rows
    (1, 1, 1, 1, 8, 8, 1, 1), (4, 33, 70, 70, 8, 8, 2, 2), (8, 40, 300, 300, 2, 8, 8, 3), (3, 20, 192, 64, 7, 2, 2, 2),
    (2, 9, 45, 45, 2, 8, 4, 1), (7, 17, 256, 128, 5, 3, 4, 3), (4, 12, 96, 32, 3, 5, 1, 2)]


@needs_backend
@pytest.mark.parametrize("m,n,k,gs,bits,act_bits,bkw,split", EXACT)
def test_kernels_bitplane_gemv_int32_sums_are_exact(m, n, k, gs, bits, act_bits, bkw, split):
    """Unit scales and fp32 out: y is the integer sum of (a - x_zero)(c - w_zero) (|y| < 2^24 here), through
    BLOCK_KW 1 / 2 / 4 / 8 (plain popcounts and both carry-save trees) and splits that cut a per-channel group
    (CODE_SUMS, bits past K masked) or hold whole groups (w_sum); the reference too."""
    args, exact = exact_inputs(m, n, k, gs, bits, act_bits, seed=m * n * k + bits)
    kw = dict(bits=bits, act_bits=act_bits, group_size=gs)
    y = run_config(dict(BLOCK_N=32, BLOCK_KW=bkw, SPLIT_K=split, num_warps=1), args, **kw)
    torch.testing.assert_close(y.cpu(), exact.float(), rtol=0, atol=0)
    torch.testing.assert_close(bitplane_matmul_ref(*args, out_dtype=torch.float32, **kw).cpu(), exact.float(),
                               rtol=0, atol=0)


@needs_backend
@pytest.mark.parametrize("k,gs,split", [(150, 150, 1), (256, 128, 1), (256, 128, 2)])
def test_kernels_bitplane_gemv_long_groups_walk_spans(monkeypatch, k, gs, split):
    """A group longer than MAX_SPAN (16384 k, the int32 bound) is summed in spans, each converted on its own (with
    the code sums counted in the kernel): with MAX_SPAN 64, K=150 per channel takes spans of 2, 2, 1 words and
    groups of 128 two spans each, still exact."""
    monkeypatch.setattr(bg, "MAX_SPAN", 64)
    args, exact = exact_inputs(2, 20, k, gs, 6, 5, seed=k)
    y = run_config(dict(BLOCK_N=32, BLOCK_KW=2, SPLIT_K=split, num_warps=1), args, bits=6, act_bits=5, group_size=gs)
    torch.testing.assert_close(y.cpu(), exact.float(), rtol=0, atol=0)


@needs_backend
@pytest.mark.parametrize("split", [1, 2])
def test_kernels_bitplane_gemv_padding_bits_past_k_are_ignored(split):
    """Set bits past K (45: 19 in each plane's last word, in byte-SWAR order) change nothing, with w_sum (one split)
    or the code sums counted in the kernel (two splits: bits past K masked by valid_bits)."""
    *args, _, _, _ = quantized_inputs(3, 20, 45, 45, 4, 6, seed=5)
    past_k = sum(1 << j for j in range(32) if PLANE_K[j] >= 45 % 32)  # bit j holds k = 32 w + PLANE_K[j]
    dirty = args[3].clone()
    dirty[:, -1] |= past_k - (1 << 32 if past_k >= 1 << 31 else 0)  # as an int32
    config = dict(BLOCK_N=16, BLOCK_KW=1, SPLIT_K=split, num_warps=1)
    kw = dict(bits=4, act_bits=6, group_size=45)
    outs = [run_config(config, args[:3] + [p] + args[4:], **kw) for p in (args[3], dirty)]
    assert torch.equal(outs[0], outs[1])


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 8), k=st.integers(1, 150), act_bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_gemv_pack_activations_ref(m, k, act_bits, seed):
    """xp[j, m, w] bit b = bit j of a[m, 32 w + PLANE_K[b]] (0 past K), xsum[m, w] the sum of a over the word."""
    half = 2 ** (act_bits - 1)
    xq = torch.randint(-half, half, (m, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    xq[0, -1] = half - 1
    xp, xsum = pack_activations_ref(xq, act_bits)
    kw = -(-k // 32)
    assert xp.dtype == xsum.dtype == torch.int32 and xp.shape == (act_bits, m, kw) and xsum.shape == (m, kw)
    a = torch.zeros(m, 32 * kw, dtype=torch.int64)
    a[:, :k] = xq.long() + half
    bits = (xp.long()[..., None] >> torch.arange(32)) & 1  # [q, M, KW, 32]
    ka = a.view(m, kw, 32)[:, :, PLANE_K]  # [M, KW, 32]: a of bit b's k
    assert torch.equal(bits, (ka[None] >> torch.arange(act_bits)[:, None, None, None]) & 1)
    assert torch.equal(xsum.long(), a.view(m, kw, 32).sum(-1))


@needs_backend
@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 200), act_bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_gemv_pack_activations_kernel(m, k, act_bits, seed):
    """The Triton packer writes exactly pack_activations_ref (every word, both ends of the code range)."""
    half = 2 ** (act_bits - 1)
    xq = torch.randint(-half, half, (m, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    xq[0, 0], xq[-1, -1] = -half, half - 1
    xp, xsum = pack_activations(xq.to(DEVICE), act_bits)
    ref_xp, ref_xsum = pack_activations_ref(xq, act_bits)
    assert torch.equal(xp.cpu(), ref_xp) and torch.equal(xsum.cpu(), ref_xsum)


@triton.jit
def _helpers_kernel(x_ptr, popc_ptr, csa_ptr, mask_ptr, K, HW: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o)
    tl.store(popc_ptr + o, bg.popcount(x, HW))
    words = ()
    for t in tl.static_range(8):
        words += (tl.load(x_ptr + BLOCK * t + o),)
    tl.store(csa_ptr + o, bg.popc_sum(o * 0 + 1, words, 2, HW))
    tl.store(csa_ptr + BLOCK + o, bg.popc_sum(o * 0, (words[0], words[1], words[2], words[3]), 0, HW))
    tl.store(mask_ptr + o, bg.valid_bits(o, K))


@needs_backend
@pytest.mark.parametrize("hw", [False] if interpreter_on() else [False, True], ids=lambda hw: f"hw={hw}")
def test_kernels_bitplane_gemv_popcount_helpers(hw):
    """popcount (SWAR, and libdevice.popc on a GPU) on words with bit 31 set, popc_sum's carry-save trees (8 and 4
    words) against plain popcounts, and valid_bits (the bits of k < K of each word in byte-SWAR order)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31, (8, 64), generator=g, dtype=torch.int64).to(torch.int32)
    x[0, :4] = torch.tensor([0, -1, -2**31, 2**31 - 1])
    popc, csa, mask = torch.empty(64, dtype=torch.int32), torch.empty(2, 64, dtype=torch.int32), torch.empty(
        64, dtype=torch.int32)
    tensors = [t.to(DEVICE) for t in (x, popc, csa, mask)]
    _helpers_kernel[(1,)](*tensors, 1000, HW=hw, BLOCK=64)
    x, popc, csa, mask = (t.cpu() for t in tensors)
    counts = ((x.long()[..., None] >> torch.arange(32)) & 1).sum(-1)  # [8, 64]
    assert torch.equal(popc.long(), counts[0])
    assert torch.equal(csa[0].long(), 1 + 4 * counts.sum(0)) and torch.equal(csa[1].long(), counts[:4].sum(0))
    for w in range(64):  # K = 1000: word 31 holds k 992..1023, 8 of them valid; later words none
        expected = sum(1 << j for j in range(32) if 32 * w + PLANE_K[j] < 1000)
        assert mask[w].item() & 0xFFFFFFFF == expected


@pytest.mark.slow
@needs_backend
def test_kernels_bitplane_gemv_every_gpu_config_is_correct(monkeypatch):
    """Each CUDA candidate (tiles, splits, warps), launched at shapes with M, N, K not multiples of the blocks
    (per channel: a partial word, CODE_SUMS splits; groups of 32 and 64), W2A8 / W4A4 / W3A6. At most 8 a key,
    BLOCK_N = 32 * warps * elements, BLOCK_KW dividing the group's words, the default first."""
    cases = ((1, 300, 300, 2, 8), (5, 128, 64, 4, 4), (3, 96, 32, 3, 6))
    candidates = []
    with monkeypatch.context() as patch:
        patch.setattr(bg, "interpreter_on", lambda: False)
        for m, k, gs, bits, act_bits in cases:
            gpu = bg.configs(m, 4096, k, gs, bits, act_bits)
            assert 1 < len(gpu) <= 8 and gpu[0] == bg.configs(m, 4096, k, gs, bits, act_bits)[0]
            assert all(c["BLOCK_N"] % (32 * c["num_warps"]) == 0 and (gs == k or (gs // 32) % c["BLOCK_KW"] == 0)
                       for c in gpu)
            candidates.append(gpu)
    for (m, k, gs, bits, act_bits), gpu in zip(cases, candidates):
        *args, b, _, _ = quantized_inputs(m, 40, k, gs, bits, act_bits, seed=m + k)
        kw = dict(bits=bits, act_bits=act_bits, group_size=gs, bias=b)
        ref = bitplane_matmul_ref(*args, out_dtype=torch.float32, **kw)
        seen = set()
        for config in gpu:
            if interpreter_on():  # warps do not matter there: each distinct (BLOCK_N, BLOCK_KW, split) once
                config = dict(config, num_warps=1)
                if tuple(config.values()) in seen:
                    continue
                seen.add(tuple(config.values()))
            assert_close(run_config(config, args, **kw), ref, torch.float32)


@needs_backend
def test_kernels_bitplane_gemv_empty():
    *args, _, _, _ = quantized_inputs(1, 8, 32, 32, 4, 8, seed=0)
    kw = dict(bits=4, act_bits=8, group_size=32)
    assert bitplane_gemv(args[0][:0], args[1][:0], args[2][:0], *args[3:], **kw).shape == (0, 8)
    empty_n = [args[3][..., :0], args[4][:, :0], args[5][:, :0], args[6][:, :0]]
    assert bitplane_gemv(*args[:3], *empty_n, **kw).shape == (1, 0)


def test_kernels_bitplane_gemv_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    *args, _, _, _ = quantized_inputs(3, 8, 32, 32, 4, 8, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        bitplane_gemv(*args, bits=4, act_bits=8, group_size=32)


def test_kernels_bitplane_gemv_helpers_bad_input_raises():
    with pytest.raises(ValueError, match="act_bits=9 is not supported"):
        pack_activations_ref(torch.zeros(2, 5, dtype=torch.int8), 9)
    with pytest.raises(ValueError, match="BLOCK_KW=4 must divide group_size / 32 = 2"):
        bg.check_config(dict(BLOCK_N=16, BLOCK_KW=4, SPLIT_K=1, num_warps=1), 128, 64)


# ---- the kernels compile for Hopper (sm_90) on a machine without a GPU (tquant.kernels.cross_compile) ----

HOPPER_CASES = [  # (m, n, k, group_size, bits, act_bits): the default config of each
    (1, 4096, 4096, 4096, 2, 8),  # W2A8 at batch 1: BLOCK_KW 8 (carry-save), a split per channel
    (8, 4096, 4100, 4100, 8, 8),  # the most terms a row: 3 rows a program, CODE_SUMS, a partial last word
    (3, 4096, 4096, 32, 3, 6),  # groups of 32: BLOCK_KW 1, a span a word
    (8, 4096, 4096, 128, 6, 4)]  # 8 rows and MAX_TERMS = 192 terms a word: about 255 registers


def compile_default_configs():
    """[(kernel name, registers, spilled bytes)] of pack_activations and the GEMV at HOPPER_CASES' defaults."""
    from unittest import mock

    from tquant.kernels.cross_compile import compiling_for

    out = []
    for m, n, k, gs, bits, act_bits in HOPPER_CASES:
        with mock.patch.object(bg, "interpreter_on", lambda: False):
            config = bg.configs(m, n, k, gs, bits, act_bits)[0]
        g, kw = k // gs, -(-k // 32)
        args = [torch.zeros(m, k, dtype=torch.int8), torch.ones(m), torch.zeros(m, dtype=torch.int32),
                torch.zeros(bits, kw, n, dtype=torch.int32), torch.ones(g, n), torch.zeros(g, n, dtype=torch.uint8),
                torch.zeros(g, n, dtype=torch.int32)]
        with compiling_for() as done:
            bg.launch(config, *args, bits, act_bits, gs, None, torch.float16)
        out += [(c.name, c.registers, c.spill_bytes) for c in done]
    return out


def test_kernels_bitplane_gemv_compile_for_hopper():
    compiled = compiled_in_subprocess(__file__)
    assert [name for name, _, _ in compiled] == ["_pack_activations_kernel", "_bitplane_gemv_kernel"] * len(
        HOPPER_CASES), compiled
    assert all(0 < regs <= 255 and spills == 0 for _, regs, spills in compiled), compiled


if __name__ == "__main__":
    print(json.dumps(compile_default_configs()))
