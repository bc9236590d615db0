"""The CPU weight-only paths (tquant.kernels.cpu_matmul, what PackedLinear runs on CPU tensors) against
weight_only_matmul_ref: random codes, scales and zeros (never all zero), bits, groups, shapes, perm, bias, fp32 / bf16."""
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
    qweight, scales, zeros, g = grid(seed, bits, n, k, group, dtype)
    module = PackedLinear(k, n, bits=bits, group_size=group, bias=bias, has_perm=perm, dtype=dtype)
    module.qweight.copy_(qweight), module.scales.copy_(scales), module.zeros.copy_(zeros)
    module.copy_optional(perm=torch.randperm(k, generator=g).int() if perm else None,
                         bias=torch.randn(n, generator=g).to(dtype) if bias else None)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = weight_only_matmul_ref(x, qweight, scales, zeros, bits=bits, group_size=group, in_features=k,
                                 perm=module.perm, bias=module.bias)
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
