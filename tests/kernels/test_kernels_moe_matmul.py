"""The grouped MoE matmul (tquant.kernels.moe_matmul) against its per-expert torch reference: random routings (experts
with no tokens, every token on one expert, repeated and dropped slots), x a row a token or a row a slot, 2/3/4/8-bit
codes, groups and per-channel, act-order perm, the three float dtypes, both interpreter tiles (split-K and not),
outputs poisoned with NaN; moe_align's block tables; bad inputs named in the error.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) on tiny shapes."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.formats.packing import pack_codes
from tquant.kernels import dequant_gemm
from tquant.kernels import moe_matmul as moe_matmul_module
from tquant.kernels.weight_only_matmul import weight_only_matmul_ref
from tquant.kernels.moe_matmul import (grouped_weight_only_matmul, grouped_weight_only_matmul_ref, max_blocks,
                                       moe_align)
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)
from tests.kernel_device import assert_close

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CONFIGS = dequant_gemm.INTERPRETER_CONFIGS  # BLOCK_M 16 with split-K 2 (y^T = w^T x^T), BLOCK_M 32 without


def routing(t, e, k, mode, g):
    """expert ids [T, k]: "topk" distinct experts a token (repeats where k > E), "one" every slot on expert E - 1,
    "skewed" experts 0 and 1 only (the others get no tokens), each with some slots dropped (id E) in "drop"."""
    if mode == "topk":
        ids = torch.stack([torch.randperm(max(e, k), generator=g)[:k] % e for _ in range(t)])
    elif mode == "one":
        ids = torch.full((t, k), e - 1)
    else:
        ids = torch.randint(0, min(e, 2), (t, k), generator=g)
    if mode == "drop":
        ids[torch.rand(t, k, generator=g) < 0.3] = e
    return ids


def make_inputs(t, e, k, n, kdim, bits, group_size, dtype, perm, per_slot, mode, seed):
    g = torch.Generator().manual_seed(seed)
    groups = kdim // group_size
    codes = torch.randint(0, 2**bits, (e, n, kdim), generator=g)
    x = torch.randn(t, k, kdim, generator=g) if per_slot else torch.randn(t, kdim, generator=g)
    tensors = dict(
        x=x.to(dtype), qweight=torch.stack([pack_codes(c, bits) for c in codes]),
        scales=(torch.rand(e, groups, n, generator=g) * 0.05 + 0.005).to(dtype),
        zeros=torch.randint(0, 2**bits, (e, groups, n), generator=g).to(dtype),
        expert_ids=routing(t, e, k, mode, g).to(torch.int32 if seed % 2 else torch.int64),
        perm=torch.stack([torch.randperm(kdim, generator=g) for _ in range(e)]).to(torch.int32) if perm else None,
    )
    return {name: v.to(DEVICE) if v is not None else None for name, v in tensors.items()}


def call(fn, t, bits, group_size, **kw):
    return fn(t["x"], t["qweight"], t["scales"], t["zeros"], t["expert_ids"], bits=bits, group_size=group_size,
              in_features=t["x"].shape[-1], perm=t["perm"], **kw)


def magnitude(t, bits, group_size):
    """|x| @ |W_e|^T per slot in fp32 (W_e each expert's dequantized weight, read back through the reference as
    I @ W_e^T): float rounding scales with it, not with y, whose short sums (K down to 1) may cancel."""
    x, ids = t["x"].float().cpu(), t["expert_ids"].cpu().long()
    kdim, experts = x.shape[-1], t["qweight"].shape[0]
    xs = (x if x.dim() == 3 else x[:, None].expand(*ids.shape, kdim)).abs()
    eye = torch.eye(kdim, dtype=t["x"].dtype, device=t["x"].device)
    out = torch.zeros(*ids.shape, t["qweight"].shape[2])
    for e in range(experts):
        slots = ids == e
        if slots.any():
            w_t = weight_only_matmul_ref(eye, t["qweight"][e], t["scales"][e], t["zeros"][e], bits=bits,
                                         group_size=group_size, in_features=kdim,
                                         perm=None if t["perm"] is None else t["perm"][e])
            out[slots] = xs[slots] @ w_t.float().cpu().abs()
    return out


def check(t, bits, group_size, dtype, **kw):
    y = call(grouped_weight_only_matmul, t, bits, group_size, **kw)
    ref = call(grouped_weight_only_matmul_ref, t, bits, group_size).to(y.device)
    assert y.shape == (*t["expert_ids"].shape, t["qweight"].shape[2])
    assert_close(y, ref, dtype, TOL[dtype], magnitude(t, bits, group_size).to(y.device))
    dropped = (t["expert_ids"] < 0) | (t["expert_ids"] >= t["qweight"].shape[0])
    assert not y[dropped].any(), "a dropped slot's output must be zero"


@st.composite
def k_and_group(draw):
    """(K, group_size): per-channel at any K (often not a multiple of epw), or 1-3 groups of a size."""
    if draw(st.booleans()):
        k = draw(st.integers(1, 80))
        return k, k
    group_size = draw(st.sampled_from([8, 16, 24, 32]))
    return group_size * draw(st.integers(1, 3)), group_size


@needs_backend
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(1, 20), e=st.integers(1, 8), k=st.integers(1, 3), n=st.integers(1, 70), shape=k_and_group(),
       bits=st.sampled_from([2, 3, 4, 4, 8]), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       perm=st.booleans(), per_slot=st.booleans(), mode=st.sampled_from(["topk", "one", "skewed", "drop"]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_moe_matches_reference(t, e, k, n, shape, bits, dtype, perm, per_slot, mode, seed):
    kdim, group_size = shape
    check(make_inputs(t, e, k, n, kdim, bits, group_size, dtype, perm, per_slot, mode, seed), bits, group_size, dtype)


@needs_backend
@pytest.mark.parametrize("config", CONFIGS, ids=["bm16_split2", "bm32"])
@pytest.mark.parametrize("mode", ["one", "skewed", "drop"])
def test_kernels_moe_every_tile(config, mode):
    """Both interpreter tiles on a routing that fills several row blocks of one expert (T * k = 51 pairs), 4-bit
    groups of 32 with perm, fp16; the split-K counters are left at zero."""
    t = make_inputs(17, 5, 3, 45, 96, 4, 32, torch.float16, True, False, mode, seed=7)
    check(t, 4, 32, torch.float16, config=config)
    assert not dequant_gemm.split_k_buffers(2, 1, 1, 1, t["x"].device)[1].any()


@needs_backend
def test_kernels_moe_no_tokens():
    t = make_inputs(1, 3, 2, 8, 16, 4, 16, torch.float16, False, False, "topk", seed=1)
    t["x"], t["expert_ids"] = t["x"][:0], t["expert_ids"][:0]
    assert call(grouped_weight_only_matmul, t, 4, 16).shape == (0, 2, 8)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_moe_align_covers_every_pair_once(block_m):
    g = torch.Generator().manual_seed(block_m)
    ids = torch.randint(-1, 7, (13, 3), generator=g)  # experts 0..5; -1 and 6 are dropped
    pairs, expert, start, end = moe_align(ids, 6, block_m)
    assert expert.numel() == max_blocks(39, 6, block_m)
    flat = ids.reshape(-1)
    seen = []
    for b in range(expert.numel()):
        rows = pairs[start[b]:end[b]].long()
        assert end[b] - start[b] <= block_m
        if expert[b] == 6:
            assert end[b] == start[b]
        else:
            assert (flat[rows] == expert[b]).all() and len(rows) > 0
        seen += rows.tolist()
    assert sorted(seen) == [p for p in range(39) if 0 <= flat[p] < 6]


def test_bad_inputs_name_the_tensor():
    t = make_inputs(3, 4, 2, 16, 32, 4, 16, torch.float16, True, False, "topk", seed=2)
    bad = {
        "qweight": dict(qweight=t["qweight"].float()),
        "scales": dict(scales=t["scales"][:, :1]),
        "zeros": dict(zeros=t["zeros"].float()),
        "perm": dict(perm=t["perm"][:3]),
        "expert_ids": dict(expert_ids=t["expert_ids"][:2]),
        "x": dict(x=t["x"][None, None]),
    }
    for name, change in bad.items():
        for fn in (grouped_weight_only_matmul, grouped_weight_only_matmul_ref):
            with pytest.raises(ValueError, match=name):
                call(fn, t | change, 4, 16)
    with pytest.raises(ValueError, match="qweight"):
        call(grouped_weight_only_matmul, t | dict(qweight=t["qweight"][0]), 4, 16)


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="the GPU tiles run on a CUDA GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("tokens,bits,dtype,per_slot", [(1, 4, torch.float16, False), (3, 8, torch.float16, True),
                                                        (9, 4, torch.bfloat16, False), (40, 3, torch.float16, False),
                                                        (150, 2, torch.bfloat16, True)])
def test_kernels_moe_every_gpu_tile(monkeypatch, tokens, bits, dtype, per_slot):
    """Every GPU candidate of the grouped launch for the pairs an expert gets (dequant_gemm's tiles: BLOCK_M 16 with
    the inline-asm dequantization at decode, fp16 2/4/8 and bf16 2/4 bits, and split-K; the larger MMA tiles from
    about 32 pairs an expert), each forced through config= where the tuner (and TQUANT_AUTOTUNE=0's first candidate)
    would pick one: top-2 of 8 experts, K 1024 in groups of 128 with act-order perm, N 200. GPU only: the
    interpreter runs its own two tiles (test_kernels_moe_every_tile)."""
    monkeypatch.setattr(moe_matmul_module, "interpreter_on", lambda: False)
    t = make_inputs(tokens, 8, 2, 200, 1024, bits, 128, dtype, True, per_slot, "topk", seed=tokens)
    pairs = tokens * 2
    rows = 1 << max(-(-pairs // min(8, pairs)) - 1, 0).bit_length()  # as grouped_weight_only_matmul's tuning key
    configs = moe_matmul_module.candidates(rows, 200, t["qweight"].shape[1])
    assert configs and all(c not in dequant_gemm.INTERPRETER_CONFIGS for c in configs)
    for config in configs:
        check(t, bits, 128, dtype, config=config)
