"""The CPU weight-only paths (tquant.kernels.cpu_matmul, what PackedLinear runs on CPU tensors) against
weight_only_matmul_ref: random codes, scales and zeros (never all zero), bits, groups, shapes, perm, bias, fp32 / bf16."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.formats.packing import dequantize_packed, pack_codes, unpack_codes
from tquant.kernels import cpu_matmul as cpu
from tquant.kernels.weight_only_matmul import weight_only_matmul_ref
from tquant.modules import PackedLinear

needs_int4 = pytest.mark.skipif(not cpu.has_int4(), reason="this torch has no CPU int4 kernel")


def grid(seed, bits, n, k, group, dtype):
    """qweight, scales, zeros of random codes, positive scales and integer zeros in [0, 2^bits)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    groups = k // group
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 0.01).to(dtype)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).to(dtype)
    return pack_codes(codes, bits), scales, zeros, g


def random_module(seed, bits, k, group, n, m, perm, bias, dtype):
    """(PackedLinear of grid()'s codes with a random perm / bias, x [m, k], weight_only_matmul_ref's output)."""
    qweight, scales, zeros, g = grid(seed, bits, n, k, group, dtype)
    module = PackedLinear(k, n, bits=bits, group_size=group, bias=bias, has_perm=perm, dtype=dtype)
    module.qweight.copy_(qweight), module.scales.copy_(scales), module.zeros.copy_(zeros)
    module.copy_optional(perm=torch.randperm(k, generator=g).int() if perm else None,
                         bias=torch.randn(n, generator=g).to(dtype) if bias else None)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = weight_only_matmul_ref(x, qweight, scales, zeros, bits=bits, group_size=group, in_features=k,
                                 perm=module.perm, bias=module.bias)
    return module, x, ref


def close(y, ref):
    tol = 2e-5 if y.dtype == torch.float32 else 2**-7
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * max(ref.abs().max().item(), 1.0))


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), k_group=st.sampled_from([(64, 32), (128, 64), (256, 128), (96, 48),
                                                                    (80, 16), (192, 192), (576, 64), (512, 256)]),
       n=st.sampled_from([1, 8, 40, 64, 96, 130]), m=st.sampled_from([1, 3, 17]), perm=st.booleans(),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_kernels_cpu_matmul_module_matches_reference(bits, k_group, n, m, perm, bias, dtype, seed):
    k, group = k_group
    module, x, ref = random_module(seed, bits, k, group, n, m, perm, bias, dtype)
    for cached in (True, False):
        module.cache_weights = cached
        y = module(x)
        assert y.dtype == dtype and y.shape == (m, n)
        close(y, ref)
    uses_int4 = cpu.int4_group(bits, group, k, n) is not None and cpu.USE_INT4
    assert (module._cpu_cache is not None and module._cpu_cache[1] == "int4") == uses_int4


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), k=st.sampled_from([16, 48, 96, 100]), n=st.sampled_from([1, 5, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_cpu_matmul_unpack_and_dequantize_exact(bits, k, n, seed):
    group = 4 if k == 100 else 16
    qweight, scales, zeros, _ = grid(seed, bits, n, k, group, torch.float32)
    assert torch.equal(cpu.unpack_codes_u8(qweight, bits, k), unpack_codes(qweight, bits, k).to(torch.uint8))
    assert torch.equal(cpu.dequantize_fast(qweight, scales, zeros, bits, group, k),
                       dequantize_packed(qweight, scales, zeros, bits, group, k))
    view = torch.cat([qweight, qweight], dim=1)[:, n:]  # a column view (fuse's parts): row stride 2 N
    assert torch.equal(cpu.unpack_codes_u8(view, bits, k), unpack_codes(qweight, bits, k).to(torch.uint8))


@needs_int4
@settings(max_examples=20, deadline=None)
@given(k_group_kernel=st.sampled_from([(64, 32, 32), (128, 64, 64), (256, 256, 256), (384, 128, 128),
                                       (192, 192, 64), (576, 576, 64), (512, 512, 256)]),
       n=st.sampled_from([16, 48, 64, 208]), m=st.sampled_from([1, 2, 33]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_kernels_cpu_matmul_int4_matches_reference(k_group_kernel, n, m, dtype, seed):
    k, group, kernel_group = k_group_kernel
    assert cpu.int4_group(4, group, k, n) == kernel_group
    qweight, scales, zeros, g = grid(seed, 4, n, k, group, dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    packed = cpu.pack_int4(qweight, k)
    assert packed.dtype == torch.uint8 and packed.numel() == qweight.numel() * 4  # as many bytes as qweight
    y = cpu.int4_matmul(x, packed, scales, zeros, group_size=group, kernel_group=kernel_group)
    close(y, weight_only_matmul_ref(x, qweight, scales, zeros, bits=4, group_size=group, in_features=k))


def test_kernels_cpu_matmul_int4_group_choice():
    assert cpu.int4_group(4, 16, 64, 64) is None and cpu.int4_group(4, 48, 96, 64) is None  # no divisor it takes
    assert cpu.int4_group(8, 64, 128, 64) is None and cpu.int4_group(3, 64, 128, 64) is None
    assert cpu.int4_group(4, 64, 128, 64, bilevel=(3, 16)) is None and cpu.int4_group(4, 64, 128, 40) is None
    if cpu.has_int4():
        assert [cpu.int4_group(4, gs, 1536, 576) for gs in (32, 64, 128, 256, 512, 1536, 96)] == [32, 64, 128, 256, 256,
                                                                                          256, 32]


def test_kernels_cpu_matmul_cache_follows_weight_changes():
    k, n = 128, 64
    qweight, scales, zeros, g = grid(1, 4, n, k, 64, torch.float32)
    module = PackedLinear(k, n, bits=4, group_size=64, dtype=torch.float32)
    module.qweight.copy_(qweight), module.scales.copy_(scales), module.zeros.copy_(zeros)
    x = torch.randn(3, k, generator=g)

    def ref():
        return weight_only_matmul_ref(x, module.qweight, module.scales, module.zeros, bits=4, group_size=64,
                                      in_features=k)
    for cached in (False, True):
        module.cache_weights = cached
        close(module(x), ref())
        other, _, _, _ = grid(2, 4, n, k, 64, torch.float32)
        module.qweight.copy_(other)  # in place: a new version of the same storage
        close(module(x), ref())
        module.zeros.add_(1)
        close(module(x), ref())
        module.qweight = qweight.clone()  # another tensor (as tquant.load assigns)
        close(module(x), ref())
    with torch.inference_mode():
        close(module(x), ref())
        assert module(torch.zeros(0, k)).shape == (0, n)


# ---- packed_matmul (the default CPU path: exact fp32 weight, K chunks at small M) and the bf16 cache (issue 28) ----

def _packed_layer(seed, bits, n, k, group, dtype, scale_range=(0.01, 0.11), zero_kind="int"):
    """qweight, scales, zeros, generator; zero_kind "int" (in [0, 2^bits)), "edge" (0 or 2^bits - 1), "negative",
    "fraction" (not integers: the exponent trick's fallback), "huge" (>= 2^22: also the fallback)."""
    qweight, scales, zeros, g = grid(seed, bits, n, k, group, torch.float32)
    lo, hi = scale_range
    scales = (torch.rand(scales.shape, generator=g) * (hi - lo) + lo).to(dtype)
    if zero_kind == "edge":
        zeros = torch.randint(0, 2, zeros.shape, generator=g).float() * (2**bits - 1)
    elif zero_kind == "negative":
        zeros = -torch.randint(0, 2**bits, zeros.shape, generator=g).float()
    elif zero_kind == "fraction":
        zeros = zeros + torch.rand(zeros.shape, generator=g)
    elif zero_kind == "huge":
        zeros = zeros + 2.0**22
    return qweight, scales, zeros.to(dtype), g


@pytest.fixture
def small_chunks(monkeypatch):
    """K chunks of a few groups even for the tests' small N (the default aims at ~0.5 MB of int32)."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 64 * 8)
    monkeypatch.setattr(cpu, "WHOLE_BYTES", 0)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]),
       k_group=st.sampled_from([(64, 32), (128, 64), (256, 128), (96, 48), (80, 16), (192, 192), (576, 64),
                                (512, 256), (100, 4), (100, 20), (100, 100), (90, 10), (640, 64), (37, 37)]),
       n=st.sampled_from([1, 7, 40, 64, 130]), m=st.sampled_from([1, 2, 5, 32, 33, 70]), perm=st.booleans(),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       zero_kind=st.sampled_from(["int", "edge", "negative", "fraction", "huge"]),
       scale_range=st.sampled_from([(0.01, 0.11), (1e-30, 2e-30), (1e20, 3e20), (0.0, 0.0)]),
       chunk_bytes=st.sampled_from([256, 2048, 1 << 20]), seed=st.integers(0, 2**31 - 1))
def test_kernels_cpu_matmul_packed_matmul_matches_reference(bits, k_group, n, m, perm, bias, dtype, zero_kind,
                                                           scale_range, chunk_bytes, seed):
    k, group = k_group
    qweight, scales, zeros, g = _packed_layer(seed, bits, n, k, group, dtype, scale_range, zero_kind)
    x = (torch.randn(m, k, generator=g) * 10 ** torch.randint(-3, 4, (m, 1), generator=g)).to(dtype)
    p = torch.randperm(k, generator=g).int() if perm else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref = weight_only_matmul_ref(x, qweight, scales, zeros, bits=bits, group_size=group, in_features=k, perm=p, bias=b)
    with pytest.MonkeyPatch.context() as mp:  # small chunks: several even for the tests' small N
        mp.setattr(cpu, "CHUNK_BYTES", chunk_bytes)
        mp.setattr(cpu, "WHOLE_BYTES", 0)
        y = cpu.packed_matmul(x, qweight, scales, zeros, bits=bits, group_size=group, k=k, perm=p, bias=b)
    assert y.dtype == dtype and y.shape == (m, n)
    close(y, ref)
    assert torch.equal(cpu.dequantize_fast(qweight, scales, zeros, bits, group, k),
                       dequantize_packed(qweight, scales, zeros, bits, group, k))


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), k=st.sampled_from([16, 40, 96, 100]), n=st.sampled_from([1, 5, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_cpu_matmul_unpack_i32_exact(bits, k, n, seed):
    qweight, _, _, _ = grid(seed, bits, n, k, 4, torch.float32)
    ref = unpack_codes(qweight, bits, k)
    assert torch.equal(cpu.unpack_codes_i32(qweight, bits, k).long(), ref.long())
    view = torch.cat([qweight, qweight], dim=1)[:, n:]  # a column view: row stride 2 N
    assert torch.equal(cpu.unpack_codes_i32(view, bits, k).long(), ref.long())
    all_ones = torch.full_like(qweight, -1)  # every bit set: the sign-extended top code is masked too
    assert int(cpu.unpack_codes_i32(all_ones, bits, k).max()) == 2**bits - 1


def test_kernels_cpu_matmul_chunks():
    """At the offline model's shapes and M = 1 the small-M path goes in whole groups and words, ~CHUNK_BYTES each;
    per channel, K off whole words or one group a layer: one chunk (the whole weight)."""
    for bits, group, k, n in ((4, 64, 576, 1536), (4, 64, 1536, 576), (8, 64, 1536, 576), (2, 32, 1536, 576),
                              (3, 64, 640, 1536), (4, 128, 4096, 4096)):
        kc = cpu.chunk_rows(bits, group, k, n)
        assert kc < k and kc % group == 0 and kc % (32 // bits) == 0
        assert 4 * kc * n <= 2 * cpu.CHUNK_BYTES or kc == math.lcm(32 // bits, group)  # equal chunks, rounded up
    assert cpu.chunk_rows(8, 64, 576, 192) == 576 and cpu.chunk_rows(4, 64, 576, 576) == 576  # fit in WHOLE_BYTES
    assert cpu.chunk_rows(4, 576, 576, 1536) == 576  # per channel
    assert cpu.chunk_rows(3, 64, 576, 1536) == 576  # 576 is not a multiple of lcm(10, 64)


def test_kernels_cpu_matmul_packed_matmul_chunked_equals_whole(monkeypatch):
    """The chunked sum and the one matmul agree to fp32 rounding (the model's shape, 4 bits, M = 1 vs M = 33)."""
    k, n = 576, 1536
    qweight, scales, zeros, g = grid(3, 4, n, k, 64, torch.float32)
    x = torch.randn(1, k, generator=g)
    ref = weight_only_matmul_ref(x, qweight, scales, zeros, bits=4, group_size=64, in_features=k)
    y = cpu.packed_matmul(x, qweight, scales, zeros, bits=4, group_size=64, k=k)
    monkeypatch.setattr(cpu, "SMALL_M", 0)
    whole = cpu.packed_matmul(x, qweight, scales, zeros, bits=4, group_size=64, k=k)
    close(y, ref), close(whole, ref)


def test_kernels_cpu_matmul_packed_matmul_threads(small_chunks):
    """The scratch is per thread: concurrent forwards of different layers give each its own result."""
    import threading

    layers = [grid(s, 4, 64, 256, 32, torch.float32) for s in range(4)]
    xs = [torch.randn(3, 256, generator=layer[3]) for layer in layers]
    refs = [weight_only_matmul_ref(x, q, s, z, bits=4, group_size=32, in_features=256)
            for x, (q, s, z, _) in zip(xs, layers)]
    bad = []

    def work(i):
        q, s, z, _ = layers[i]
        for _ in range(30):
            y = cpu.packed_matmul(xs[i], q, s, z, bits=4, group_size=32, k=256)
            if not torch.allclose(y, refs[i], rtol=2e-5, atol=2e-5 * refs[i].abs().max().item()):
                bad.append(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert not bad


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), k_group=st.sampled_from([(128, 64), (96, 48), (100, 100)]),
       n=st.sampled_from([1, 40, 64]), m=st.sampled_from([1, 17]), perm=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_kernels_cpu_matmul_bf16_cache(bits, k_group, n, m, perm, bias, dtype, seed):
    """cache_weights="bfloat16": a bf16 weight kept (2 bytes a weight), results to bf16 accuracy."""
    k, group = k_group
    module, x, ref = random_module(seed, bits, k, group, n, m, perm, bias, dtype)
    qweight, scales, zeros = module.qweight, module.scales, module.zeros
    module.cache_weights = "bfloat16"
    y = module(x)
    assert y.dtype == dtype and module._cpu_cache[1] == "bf16" and module._cpu_cache[2].dtype == torch.bfloat16
    xs = x.float() if not perm else x.float()[:, module.perm.long()]
    bound = xs.abs() @ dequantize_packed(qweight, scales, zeros, bits, group, k).abs()  # sum |x w|: bf16 errors scale
    assert ((y.float() - ref.float()).abs() <= 2**-7 * bound + 2**-7 * ref.float().abs() + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]),
       k_group=st.sampled_from([(128, 64), (96, 48), (100, 100), (256, 256), (192, 192), (512, 128)]),
       n=st.sampled_from([1, 16, 48, 64]), m=st.sampled_from([1, 3, 33]), perm=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_kernels_cpu_matmul_bf16_precision(bits, k_group, n, m, perm, bias, dtype, seed):
    """cpu_precision="bfloat16": bf16 accuracy (bounded by sum |x| (|w| + 16 scale), the int4 kernel's zero term
    rounded to bf16 too); the int4 kernel's layout kept only for 4-bit layers it takes, at small M."""
    k, group = k_group
    module, x, ref = random_module(seed, bits, k, group, n, m, perm, bias, dtype)
    qweight, scales, zeros = module.qweight, module.scales, module.zeros
    module.cpu_precision = "bfloat16"
    y = module(x)
    assert y.dtype == dtype and y.shape == (m, n)
    xs = x.float() if not perm else x.float()[:, module.perm.long()]
    s = scales.float().repeat_interleave(group, dim=0)
    bound = xs.abs() @ (dequantize_packed(qweight, scales, zeros, bits, group, k).abs() + 16 * s)
    assert ((y.float() - ref.float()).abs() <= 2**-7 * bound + 2**-7 * ref.float().abs() + 1e-6).all()
    uses_int4 = cpu.int4_group(bits, group, k, n) is not None and m <= cpu.SMALL_M
    assert (module._cpu_cache is not None and module._cpu_cache[1] == "int4bf16") == uses_int4
