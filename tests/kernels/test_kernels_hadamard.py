"""Walsh-Hadamard transform: the kernel against the dense transform x @ H^T / x @ H (fp64), in place and out of
place, every launch plan, the torch reference, and the input checks.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) with one fixed small config;
with TRITON_INTERPRET=0 and TQUANT_AUTOTUNE=0 on a GPU it runs the same checks there.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.kernel_device import DEVICE, needs_backend

from tquant.formats.hadamard import hadamard_dense, hadamard_factors, hadamard_matrix
from tquant.kernels import hadamard as hadamard_kernels
from tquant.kernels.hadamard import hadamard_transform, hadamard_transform_ref

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# constructible sizes: powers of two, m * 2^k for every known m, a three-stage plan (12 * 256)
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 12, 24, 20 * 2, 28 * 4, 36 * 16, 40, 40 * 4, 52,
         60 * 2, 108, 140, 156, 172, 172 * 2, 12 * 128, 12 * 256]
SLOW = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rows_of(shape, dtype, seed, device=DEVICE):
    """Random x: normal entries times a per-row scale in [1e-2, 1e2] and a few x30 outlier columns (never zeros;
    finite in fp16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x *= 10 ** (torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64) * 4 - 2)
    x[..., torch.randperm(shape[-1], generator=g)[: max(1, shape[-1] // 32)]] *= 30
    return x.to(dtype).to(device)


def dense(x, transpose):
    """The exact transform of x (as given, in fp64): x @ H^T, or x @ H with transpose. Past n = 4096 (where H
    would take gigabytes) the same product through H = (H_m ⊗ H_a ⊗ H_b) / sqrt(n), p = a b."""
    n = x.shape[-1]
    if n <= 4096:
        h = hadamard_dense(n, torch.float64).to(x.device)
        return x.double() @ (h if transpose else h.T)
    m, p = hadamard_factors(n)
    a = 2 ** (p.bit_length() // 2)
    hm, ha, hb = (hadamard_matrix(k).double().to(x.device) for k in (m, a, p // a))
    y = x.double().reshape(-1, m, a, p // a) @ hb.T
    y = torch.einsum("ak,rjkb->rjab", ha, y)
    y = torch.einsum("ij,rjab->riab", hm.T if transpose else hm, y)
    return y.reshape(x.shape) / n**0.5


def rel_err(y, expected):
    return ((y.double() - expected).norm() / expected.norm()).item()


def assert_transform(y, x, transpose):
    """y is the exact transform rounded once to x's dtype: fp32 to ~1e-7, 16-bit no worse than rounding the
    exact result (relative norm error)."""
    assert y.dtype == x.dtype and y.shape == x.shape and y.isfinite().all()
    expected = dense(x, transpose)
    err = rel_err(y, expected)
    if x.dtype == torch.float32:
        assert err < 1e-6, f"relative error {err:.2e}"
    else:
        rounded = rel_err(expected.to(x.dtype), expected)
        assert err <= 1.1 * rounded + 1e-6, f"relative error {err:.2e}, rounding alone {rounded:.2e}"


def fused_vectors(n, dtype, seed, device=DEVICE):
    """Random in_scale, out_scale (real values of both signs, as after QuIP#'s fine-tuning) and bias (x's dtype)."""
    g = torch.Generator().manual_seed(seed)
    in_scale = torch.randn(n, generator=g) + 0.5 * torch.randn(n, generator=g).sign()
    out_scale = torch.randn(n, generator=g) * 0.1
    return in_scale.to(device), out_scale.to(device), torch.randn(n, generator=g).to(device, dtype)


def assert_fused(y, x, transpose, in_scale, out_scale, bias):
    """y = ((x * in_scale rounded to x's dtype) @ H^T) * out_scale + bias, exact up to y's one rounding."""
    xs = (x.float() * in_scale).to(x.dtype)
    expected = dense(xs, transpose) * out_scale.double() + bias.double()
    assert y.dtype == x.dtype and y.shape == x.shape and y.isfinite().all()
    err = rel_err(y, expected)
    bound = 1e-6 if x.dtype == torch.float32 else 1.1 * rel_err(expected.to(x.dtype), expected) + 1e-6
    assert err <= bound, f"relative error {err:.2e}, bound {bound:.2e}"


@needs_backend
@SLOW
@given(n=st.sampled_from(SIZES), rows=st.integers(1, 9), dtype=st.sampled_from(DTYPES), transpose=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_hadamard_kernel_fused_scales_and_bias_match_dense(n, rows, dtype, transpose, seed):
    x = rows_of((rows, n), dtype, seed)
    vectors = fused_vectors(n, dtype, seed)
    y = torch.full_like(x, float("nan"))
    hadamard_transform(x, transpose=transpose, out=y, in_scale=vectors[0], out_scale=vectors[1], bias=vectors[2])
    assert_fused(y, x, transpose, *vectors)
    ref = hadamard_transform_ref(x.cpu(), transpose, *(v.cpu() for v in vectors))
    assert_fused(ref, x.cpu(), transpose, *(v.cpu() for v in vectors))


@needs_backend
@SLOW
@given(n=st.sampled_from(SIZES), rows=st.integers(1, 9), dtype=st.sampled_from(DTYPES), transpose=st.booleans(),
       in_place=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_hadamard_kernel_matches_dense(n, rows, dtype, transpose, in_place, seed):
    x = rows_of((rows, n), dtype, seed)
    x0 = x.clone()
    y = hadamard_transform(x, transpose=transpose, out=x if in_place else None)
    assert (y is x) == in_place
    if not in_place:
        torch.testing.assert_close(x, x0, rtol=0, atol=0)  # x untouched
    assert_transform(y, x0, transpose)


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [4096, 576 * 2])
def test_hadamard_kernel_leading_dims_and_inverse(n, dtype):
    """x [2, 3, n]: transform, then transform with transpose=True gives x back (up to two roundings)."""
    x = rows_of((2, 3, n), dtype, seed=n)
    y = hadamard_transform(x)
    assert_transform(y, x, transpose=False)
    back = hadamard_transform(y, transpose=True)
    assert back.shape == x.shape
    assert rel_err(back, x.double()) < (4e-6 if dtype == torch.float32 else 4 * rel_err(x.float().to(dtype), x.double())
                                        + 2 * torch.finfo(dtype).eps)


@needs_backend
def test_hadamard_kernel_in_place_on_a_strided_view():
    """out=x on rows of a wider buffer: the view is transformed, the columns beside it are not touched."""
    buffer = rows_of((5, 200), torch.float16, seed=3)
    before = buffer.clone()
    view = buffer[:, 20:180]  # n = 160 = 40 * 4, row stride 200
    assert hadamard_transform(view, out=view) is view
    assert_transform(view, before[:, 20:180], transpose=False)
    torch.testing.assert_close(buffer[:, :20], before[:, :20], rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, 180:], before[:, 180:], rtol=0, atol=0)


@needs_backend
def test_hadamard_kernel_given_out_and_empty():
    x = rows_of((3, 52), torch.bfloat16, seed=4)
    out = torch.full_like(x, float("nan"))
    assert hadamard_transform(x, transpose=True, out=out) is out
    assert_transform(out, x, transpose=True)
    assert hadamard_transform(x[:0]).shape == (0, 52)
    one = rows_of((1024,), torch.float32, seed=5)  # a single row, 1-D
    assert_transform(hadamard_transform(one), one, transpose=False)


@needs_backend
@pytest.mark.parametrize("n,rows", [(4096, 3), (14336, 2), (11008, 2), (32768, 1), (576, 40), (1536, 3), (64, 20),
                                    (24, 5)])
def test_hadamard_every_gpu_config_is_correct(monkeypatch, n, rows):
    """Each CUDA candidate (plans with two and three stages, padded axes, BLOCK_R, GROUPS), run through launch."""
    monkeypatch.setattr(hadamard_kernels, "interpreter_on", lambda: False)
    gpu_configs = hadamard_kernels.configs(n, rows) + hadamard_kernels.configs(n, 4096)
    monkeypatch.undo()
    assert gpu_configs
    seen = set()
    for config in gpu_configs:
        if DEVICE == "cpu":  # the interpreter ignores warps and stages: one run per plan, rows and groups
            shape = tuple(v for k, v in config.items() if k not in ("num_warps", "num_stages"))
            if shape in seen:
                continue
            seen.add(shape)
        f0, f1, f2 = hadamard_kernels.padded((config["N0"], config["N1"], config["N2"]))
        assert config["BLOCK_R"] * f1 * f2 >= 16 and f0 >= 16 and config["BLOCK_K"] >= 16
        dtype, transpose = DTYPES[len(seen) % 3], bool(len(seen) % 2)
        x = rows_of((rows, n), dtype, seed=len(seen))
        y = torch.empty_like(x)
        hadamard_kernels.launch(config, x, y, transpose)
        assert_transform(y, x, transpose)


@needs_backend
@pytest.mark.parametrize("n", [2, 24, 128, 160, 1536, 3072, 4096, 11008, 14336])
def test_hadamard_every_plan_is_correct(n):
    """Every factorization plans(n) offers (axis 0 = H_m ⊗ H_a, padded axes, two and three stages), launched
    with the fewest rows per tile and two row groups per program, unpipelined (num_stages=1: a pipelined group
    loop over a 256-wide axis 0 needs more shared memory than a GPU has, so configs() offers it only for small
    tiles; test_hadamard_every_gpu_config_is_correct runs those)."""
    candidates = hadamard_kernels.plans(n)
    assert candidates and all(t[0] * t[1] * t[2] == n for t in candidates)
    costs = [hadamard_kernels.plan_cost(t, n) for t in candidates]
    assert costs == sorted(costs)
    for i, plan in enumerate(candidates):
        _, f1, f2 = hadamard_kernels.padded(plan)
        config = hadamard_kernels._config(plan, max(1, 16 // (f1 * f2)), 4, groups=2, num_stages=1)
        dtype, transpose = DTYPES[i % 3], bool(i % 2)
        x = rows_of((3, n), dtype, seed=i)
        y = torch.empty_like(x)
        hadamard_kernels.launch(config, x, y, transpose)
        assert_transform(y, x, transpose)
        vectors = fused_vectors(n, dtype, seed=i)  # the fused vectors in this plan's layout of the output
        hadamard_kernels.launch(config, x, y, transpose, *vectors)
        assert_fused(y, x, transpose, *vectors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 12, 64, 576, 1536, 172 * 4])
def test_hadamard_reference_matches_dense(n, dtype):
    x = rows_of((2, 3, n), dtype, seed=n, device="cpu")
    for transpose in (False, True):
        assert_transform(hadamard_transform_ref(x, transpose), x, transpose)


BAD_INPUTS = {
    "int dtype": (lambda: torch.ones(2, 64, dtype=torch.int32), {}, "x dtype torch.int32 is not supported"),
    "fp64": (lambda: torch.ones(2, 64, dtype=torch.float64), {}, "x dtype torch.float64 is not supported"),
    "n=100": (lambda: torch.ones(2, 100), {}, "no Hadamard matrix construction for n=100"),
    "n=7": (lambda: torch.ones(7), {}, "no Hadamard matrix construction for n=7"),
    "n=0": (lambda: torch.ones(3, 0), {}, "no Hadamard matrix construction for n=0"),
    "0-dim": (lambda: torch.tensor(1.0), {}, "at least one dimension"),
    "out dtype": (lambda: torch.ones(2, 64), {"out": torch.ones(2, 64, dtype=torch.float16)}, "out .* does not match"),
    "out shape": (lambda: torch.ones(2, 64), {"out": torch.ones(4, 32)}, "out .* does not match"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_hadamard_bad_input_raises(case):
    make, kwargs, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        hadamard_transform(make(), **kwargs)
    if "out" not in kwargs:
        with pytest.raises(ValueError, match=message):
            hadamard_transform_ref(make())


@needs_backend
def test_hadamard_too_long_or_bad_out_raises():
    with pytest.raises(ValueError, match="n=35840 is too large"):
        hadamard_transform(torch.ones(1, 140 * 256, device=DEVICE))
    x = torch.ones(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="out must be viewable"):
        hadamard_transform(x, out=torch.ones(64, 4, device=DEVICE).T)
    for name in ("in_scale", "out_scale", "bias"):
        with pytest.raises(ValueError, match=rf"{name} must be a float tensor of shape \(64,\)"):
            hadamard_transform(x, **{name: torch.ones(32, device=DEVICE)})
        with pytest.raises(ValueError, match=rf"{name} must be a float tensor"):
            hadamard_transform_ref(x, **{name: torch.ones(64, dtype=torch.int32)})


def test_hadamard_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        hadamard_transform(torch.ones(2, 64))
