"""The BCQ matmul kernel against its torch reference on fresh random BCQ weights (tquant.formats.bcq's search, packed as
BCQLinear stores them): 1-4 planes, groups of 32 / 64 / per channel, with and without an offset, batch 1-20
(over one 16-row tile), N not a multiple of the block, fp16 / bf16 / fp32; and the input checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)

from tquant.formats import bcq
from tquant.kernels import bcq_matmul as bcq_matmul_module
from tquant.kernels.bcq_matmul import bcq_matmul, bcq_matmul_ref
from tquant.kernels.runtime import interpreter_on
from tquant.formats.packing import pack_codes

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def packed_weight(n, k, q, group, offset, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    alphas, bits, _ = bcq.search(torch.randn(n, k, generator=g), q, group, 2)
    planes = torch.stack([pack_codes(bits[i], 1) for i in range(q)]).to(DEVICE)
    off = torch.randn(k // group, n, generator=g).to(DEVICE, dtype) if offset else None
    return planes, alphas.permute(2, 1, 0).contiguous().to(DEVICE, dtype), off


def path_config(path, m, group):
    """The interpreter's config of a path (the table paths with the GPU's BLOCK_K: the largest of 128 / 64 / 32
    dividing the group, so "smem" gathers 1, 2 and 4 words a column), or on a GPU the path's first candidate with a
    BLOCK_K dividing the group (for a small batch the tuner offers "dot" only with BLOCK_K >= 64 or groups of 32: a
    group of 96 has none, so the test takes the candidate a larger batch gets; the kernel takes any M)."""
    if interpreter_on():
        config = bcq_matmul_module.INTERPRETER_CONFIGS[path]
        return config if path == "dot" else dict(config, BLOCK_K=next(b for b in (128, 64, 32) if group % b == 0))
    for rows in (m, bcq_matmul_module.LUT_MAX_M + 1):
        found = [c for c in bcq_matmul_module.configs(rows, group) if c["path"] == path]
        if found:
            return found[0]
    raise AssertionError(f"no {path} config for M={m}, group {group}")


def error_of(out, ref, x, planes, alphas, offset, perm, bias):
    """||out - ref|| relative to ||(|x| @ |W|^T + |bias|)||, the scale of rounding errors (a norm of ref itself can
    be near 0 when the terms cancel, e.g. one output of a small K)."""
    w = bcq.dequantize(alphas.float().permute(2, 1, 0), bcq_matmul_module.unpack_planes(planes, x.shape[1]),
                       None if offset is None else offset.float().t())
    xs = x.float() if perm is None else x.float()[:, perm.long()]
    scale = xs.abs() @ w.abs().t() + (0 if bias is None else bias.float().abs())
    return ((out.double() - ref.double()).norm() / scale.double().norm()).item()


@needs_backend
@settings(max_examples=60, deadline=None)
@given(path=st.sampled_from(sorted(bcq_matmul_module.INTERPRETER_CONFIGS)), m=st.integers(1, 20), n=st.integers(1, 70), kw=st.integers(1, 4),
       q=st.integers(1, 4), group=st.sampled_from([32, 64, -1]), offset=st.booleans(), perm=st.booleans(),
       bias=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       table=st.sampled_from([(256, False), (128, False), (256, True), (128, True)]), seed=st.integers(0, 2**31 - 1))
def test_kernels_bcq_matmul_matches_reference(path, m, n, kw, q, group, offset, perm, bias, dtype, table, seed):
    """Every path: in-register tl.dot, and the tables (signed partial sums of every 8 activations, batch <= 8)
    gathered from global memory or through shared memory, with act-order perm gathered in the loads, bias and split-K
    summed in the launch."""
    m = min(m, bcq_matmul_module.LUT_MAX_M) if path != "dot" else m
    k = 64 * kw if group == 64 else 32 * kw
    group = k if group == -1 else group
    planes, alphas, off = packed_weight(n, k, q, group, offset, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    p = torch.randperm(k, generator=gen).to(DEVICE, torch.int32) if perm else None
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    config = path_config(path, m, group)
    if path == "smem":  # tables of 256 or 128 (signed) entries, shared in x's dtype or fp32
        config = dict(config, entries=table[0], f32_table=table[1])
    out = bcq_matmul_module.launch(config, x, planes, alphas, off, p, b)
    ref = bcq_matmul_ref(x, planes, alphas, off, p, b)
    assert out.shape == (m, n) and out.dtype == dtype and out.isfinite().all()
    assert error_of(out, ref, x, planes, alphas, off, p, b) < TOL[dtype]


@needs_backend
def test_kernels_bcq_matmul_one_flipped_bit_moves_one_column():
    """Flipping one bit of plane 1 changes output column 5 by 2 alpha x[k] and no other column."""
    planes, alphas, _ = packed_weight(16, 64, 2, 32, False, torch.float32, 7)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    before = bcq_matmul(x, planes, alphas)
    flipped = planes.clone()
    flipped[1, 40 // 32, 5] ^= 1 << (40 % 32)
    after = bcq_matmul(x, flipped, alphas)
    was_one = (planes[1, 1, 5] >> 8) & 1
    expected = (-2 if was_one else 2) * alphas[1, 1, 5] * x[:, 40]
    torch.testing.assert_close(after[:, 5] - before[:, 5], expected, rtol=1e-4, atol=1e-5)
    others = torch.ones(16, dtype=torch.bool)
    others[5] = False
    assert torch.equal(after[:, others], before[:, others])


@needs_backend
@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(2, 60)), "multiple of 32"),
    (dict(x=torch.randn(2, 64).to(torch.int32)), "fp16 / bf16 / fp32"),
    (dict(planes=torch.zeros(5, 2, 16, dtype=torch.int32)), "1-4 binary planes"),
    (dict(alphas=torch.zeros(2, 3, 16)), "group size must divide K"),
    (dict(alphas=torch.zeros(2, 2, 16, dtype=torch.float16)), "alphas"),
    (dict(offset=torch.zeros(1, 16)), "offset"),
    (dict(perm=torch.arange(60, dtype=torch.int32)), "perm shape"),
    (dict(bias=torch.zeros(16, dtype=torch.float16)), "bias dtype"),
])
def test_kernels_bcq_matmul_bad_input_raises(change, match):
    planes, alphas, _ = packed_weight(16, 64, 2, 32, False, torch.float32, 9)
    args = dict(x=torch.randn(2, 64).to(DEVICE), planes=planes, alphas=alphas, offset=None)
    args |= {key: v.to(DEVICE) for key, v in change.items()}
    with pytest.raises(ValueError, match=match):
        bcq_matmul(**args)


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="the GPU candidates run on a CUDA GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("m,group,dtype", [(1, 128, torch.float16), (5, 64, torch.bfloat16), (16, 128, torch.float16),
                                           (37, 32, torch.bfloat16)])
def test_kernels_bcq_matmul_every_gpu_config(monkeypatch, m, group, dtype):
    """Every GPU candidate of every path (tl.dot tiles with and without split-K, BLOCK_M 16 or 64; up to batch 8 the
    tables, gathered from global memory or through shared memory in x's dtype or fp32, with their words loaded 3
    tiles ahead or not), each launched where the tuner (TQUANT_AUTOTUNE=0: the first candidate, which the hypothesis
    test takes per path) would pick one: 3 planes, K 1024 in groups, N 200, offset, perm and bias. GPU only: the
    interpreter runs its own configs."""
    monkeypatch.setattr(bcq_matmul_module, "interpreter_on", lambda: False)
    k, n = 1024, 200
    planes, alphas, off = packed_weight(n, k, 3, group, True, dtype, seed=m)
    gen = torch.Generator().manual_seed(m + 1)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    p = torch.randperm(k, generator=gen).to(DEVICE, torch.int32)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype)
    ref = bcq_matmul_ref(x, planes, alphas, off, p, b)
    configs = bcq_matmul_module.configs(m, group)
    assert {c["path"] for c in configs} == ({"dot", "lut", "smem"} if m <= bcq_matmul_module.LUT_MAX_M else {"dot"})
    for config in configs:
        out = bcq_matmul_module.launch(config, x, planes, alphas, off, p, b)
        assert out.shape == (m, n) and out.dtype == dtype and out.isfinite().all(), config
        assert error_of(out, ref, x, planes, alphas, off, p, b) < TOL[dtype], config
