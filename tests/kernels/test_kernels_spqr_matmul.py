"""SpQR's matmul (tquant.kernels.spqr_matmul): the bilevel grid on every weight-only path and the outlier kernel
against the torch reference on fresh random inputs (odd N, K, batch, groups, 2/3/4 bits, perm, bias, outliers at
columns past 32767), and the reference against the SpQRWeight it packs."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels import spqr_matmul as spqr_matmul_module
from tquant.kernels.spqr_matmul import outlier_add, spqr_matmul, spqr_matmul_ref
from tquant.kernels.weight_only_matmul import run_path
from tquant.modules import SpQRLinear
from tquant.formats.weights import SpQRWeight
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)
from tests.kernels.test_kernels_weight_only import PATHS, TOL, assert_close

SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_csr(n, k, density, g):
    mask = torch.rand(n, k, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return row_ptr, cols, (torch.randn(len(cols), generator=g) * 0.5).half()


def random_weight(n, k, bits, group_size, scale_bits, stat_group, perm, density, seed) -> SpQRWeight:
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    step = (torch.rand(n // stat_group, groups, generator=g) * 0.01 + 0.001).half()
    low = (torch.rand(n // stat_group, groups, generator=g) * 0.02 + 0.002).half()
    return SpQRWeight(torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32),
                      torch.randint(0, 2**scale_bits, (n, groups), generator=g, dtype=torch.int32),
                      torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.int32), step, low, bits,
                      group_size, scale_bits, stat_group, *random_csr(n, k, density, g),
                      torch.randperm(k, generator=g) if perm else None)


def packed(qw, bias, dtype, device=DEVICE):
    mod = SpQRLinear.from_quantized(qw, bias, dtype)
    args = [mod.qweight, mod.stats, mod.meta, mod.row_ptr, mod.cols, mod.vals]
    kw = dict(bits=mod.bits, group_size=mod.group_size, scale_bits=mod.scale_bits, stat_group=mod.stat_group,
              perm=mod.perm, bias=mod.bias)
    return [a.to(device) for a in args], {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@st.composite
def layers(draw):
    bits = draw(st.sampled_from([2, 3, 4]))
    group = draw(st.sampled_from([16, 32, 64]))
    stat_group = draw(st.sampled_from([1, 8, 16]))
    return (bits, group, draw(st.integers(1, 8 - bits)), stat_group,
            stat_group * draw(st.integers(1, 96 // stat_group)), group * draw(st.integers(1, 256 // group)))


@needs_backend
@SLOW
@given(layer=layers(), m=st.sampled_from([1, 1, 3, 16, 19]), perm=st.booleans(), bias=st.booleans(),
       density=st.sampled_from([0.0, 0.01, 0.1]), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_spqr_matmul_matches_reference(layer, m, perm, bias, density, dtype, seed):
    bits, group, scale_bits, stat_group, n, k = layer
    qw = random_weight(n, k, bits, group, scale_bits, stat_group, perm, density, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if bias else None
    args, kw = packed(qw, b, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    y = spqr_matmul(x, *args, **kw)
    ref = spqr_matmul_ref(x, *args, **kw)
    assert y.dtype == ref.dtype and y.shape == ref.shape and not y.isnan().any()
    # against |x| @ |W|^T + |bias|, the scale of rounding errors: a norm of ref alone can cancel to near 0 when the
    # outputs are few (N = 1, M = 1 gave 7.9e-3 of a near-zero output in fp16)
    scale = x.double().abs().cpu() @ qw.dequantize().double().abs().t() + (0 if b is None else b.double().abs())
    err = ((y.double() - ref.double()).norm() / scale.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@needs_backend
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernels_bilevel_grid_on_every_path(path, bits):
    """gemv, split-K gemm, gemm and the dequantize-then-cuBLAS path decode the bilevel stats alike (no outliers)."""
    m, config = PATHS[path]
    qw = random_weight(48, 160, bits, 32, 8 - bits, 16, True, 0.0, seed=bits)
    args, kw = packed(qw, torch.randn(48), torch.float16)
    x = torch.randn(m, 160).half().to(DEVICE)
    y = run_path(config, x, args[0], args[1], args[2], kw["perm"], kw["bias"], bits=bits, group_size=32,
                 in_features=160, bilevel=(8 - bits, 16))
    assert_close(y, spqr_matmul_ref(x, *args, **kw), torch.float16)


@needs_backend
def test_kernels_outliers_at_unsigned_16_bit_columns():
    """Columns >= 32768 are stored as negative int16 and read back as unsigned."""
    g = torch.Generator().manual_seed(4)
    n, k = 20, 40000
    row_ptr, cols, vals = random_csr(n, k, 0.002, g)
    assert (cols >= 32768).any()
    x = torch.randn(3, k, generator=g).half()
    y0 = torch.randn(3, n, generator=g).half()
    expected = y0.float() + x.float() @ torch.zeros(n, k).index_put_(
        (torch.repeat_interleave(torch.arange(n), row_ptr.diff()), cols), vals.float()).t()
    y = outlier_add(y0.clone().to(DEVICE), x.to(DEVICE), row_ptr.int().to(DEVICE),
                    cols.int().to(torch.int16).to(DEVICE), vals.to(DEVICE))
    torch.testing.assert_close(y.float().cpu(), expected, rtol=3e-3, atol=3e-3)


@given(layer=layers(), perm=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15, deadline=None)
def test_kernels_reference_matches_the_weight_it_packs(layer, perm, seed):
    bits, group, scale_bits, stat_group, n, k = layer
    qw = random_weight(n, k, bits, group, scale_bits, stat_group, perm, 0.05, seed)
    args, kw = packed(qw, None, torch.float32, device="cpu")
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(spqr_matmul_ref(x, *args, **kw), x @ qw.dequantize().t(), rtol=1e-4, atol=1e-4)


def test_kernels_spqr_bad_inputs_raise():
    qw = random_weight(16, 64, 3, 16, 3, 16, False, 0.05, seed=0)
    args, kw = packed(qw, None, torch.float16, device="cpu")
    x = torch.randn(2, 64).half()
    with pytest.raises(ValueError, match="cols dtype"):
        spqr_matmul_ref(x, *args[:4], args[4].int(), args[5], **kw)
    with pytest.raises(ValueError, match="vals shape"):
        spqr_matmul_ref(x, *args[:5], args[5][:-1], **kw)
    with pytest.raises(ValueError, match="scales dtype"):
        spqr_matmul_ref(x, args[0], args[1].int(), *args[2:], **kw)
    with pytest.raises(ValueError, match="zero"):
        spqr_matmul_ref(x, *args, **{**kw, "scale_bits": 6})
    with pytest.raises(ValueError, match="stat groups"):
        spqr_matmul_ref(x, *args, **{**kw, "stat_group": 5})


@needs_backend
@pytest.mark.parametrize("m", [1, 3, 19])
def test_kernels_outliers_every_gpu_config(monkeypatch, m):
    """Every GPU candidate of the outlier kernel (spqr_matmul.outlier_configs: rows a program x outliers a step, up to
    16 batch rows a program), each forced where the tuner picks one (TQUANT_AUTOTUNE=0: the first): added onto the
    reference's dense part (the reference without outliers), the whole reference comes out; 3-bit groups of 32 with
    perm and bias, about 16 outliers a row. Cheap enough for the interpreter too."""
    monkeypatch.setattr(spqr_matmul_module, "interpreter_on", lambda: False)
    configs = spqr_matmul_module.outlier_configs(m)
    assert len(configs) >= 4 and spqr_matmul_module.INTERPRETER_CONFIG not in configs
    qw = random_weight(40, 160, 3, 32, 5, 8, True, 0.1, seed=m)
    args, kw = packed(qw, torch.randn(40, generator=torch.Generator().manual_seed(m)), torch.float16)
    x = torch.randn(m, 160, generator=torch.Generator().manual_seed(m + 1)).half().to(DEVICE)
    ref = spqr_matmul_ref(x, *args, **kw)
    none = (torch.zeros_like(args[3]), args[4][:0], args[5][:0])
    dense = spqr_matmul_ref(x, *args[:3], *none, **kw)
    for config in configs:
        monkeypatch.setattr(spqr_matmul_module, "tune", lambda *a, config=config: config)
        assert_close(outlier_add(dense.clone(), x, *args[3:]), ref, torch.float16)
