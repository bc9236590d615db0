"""w4a16_gemv.gemv_h2 (the half2 W4A16 GEMV) against the torch reference weight_only_matmul_ref.

Runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, conftest.py; the portable fp32 branch) and with
TRITON_INTERPRET=0 on a GPU (the inline-asm half2 branch, several launch configs, and asm against portable).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels import w4a16_gemv
from tquant.kernels import weight_only_matmul as weight_only_matmul_module
from tquant.kernels.weight_only_matmul import weight_only_matmul, weight_only_matmul_ref
from tquant.formats.packing import pack_codes
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)
from tests.kernel_device import assert_close

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GPU = DEVICE == "cuda"


def make_inputs(n, k, group_size, dtype, perm, bias, x_scale, seed, outlier=False, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    groups = k // group_size
    x = torch.randn(1, k, generator=g) * x_scale
    if outlier:  # one huge activation among ordinary ones (LLMs' "massive activations")
        x[0, torch.randint(0, k, (1,), generator=g)] = 2e4 if dtype == torch.float16 else 1e6
    t = dict(x=x.to(dtype), qweight=pack_codes(codes, 4),
             scales=(torch.rand(groups, n, generator=g) * 0.05 + 0.005).to(dtype),
             zeros=torch.randint(0, 16, (groups, n), generator=g).to(dtype),
             perm=torch.randperm(k, generator=g).to(torch.int32) if perm else None,
             bias=torch.randn(n, generator=g).to(dtype) if bias else None)
    return {name: v.to(device) if v is not None else None for name, v in t.items()}


def run(t, group_size, config):
    return w4a16_gemv.gemv_h2(t["x"], t["qweight"], t["scales"], t["zeros"], t["perm"], t["bias"], bits=4,
                              group_size=group_size, config=config)


def reference(t, group_size):
    k = t["x"].shape[1]
    return weight_only_matmul_ref(t["x"], t["qweight"], t["scales"], t["zeros"], bits=4, group_size=group_size,
                                  in_features=k, perm=t["perm"], bias=t["bias"])


def magnitude(t, group_size):
    """|x| @ |w| (+ |bias|): the scale of the rounding of sums that may cancel."""
    absd = {**t, "x": t["x"].abs(), "scales": t["scales"].abs(), "bias": None if t["bias"] is None else t["bias"].abs()}
    k = t["x"].shape[1]
    w = weight_only_matmul_ref(torch.eye(k, dtype=torch.float32, device=t["x"].device), t["qweight"],
                               t["scales"].float(), t["zeros"].float(), bits=4, group_size=group_size, in_features=k)
    xs = t["x"].float().abs() if t["perm"] is None else t["x"].float().abs()[:, t["perm"].long()]
    mag = xs @ w.abs()
    if absd["bias"] is not None:
        mag += absd["bias"].float()
    return mag


def configs_under_test(n, kw):
    if not GPU:
        return [w4a16_gemv.INTERPRETER_CONFIG, dict(w4a16_gemv.INTERPRETER_CONFIG, BLOCK_KW=4, SPLIT_K=1)]
    gpu = w4a16_gemv.configs(n, kw)
    return [gpu[0], dict(gpu[0], BLOCK_KW=2, SPLIT_K=3, num_stages=1), dict(gpu[0], pair=False, BLOCK_N=512)]


@st.composite
def shapes(draw):
    """(K, group_size): per-channel with any K (often not a multiple of 8), or G groups of 32, 64 or 128."""
    if draw(st.booleans()):
        k = draw(st.integers(1, 300))
        return k, k
    group_size = draw(st.sampled_from([32, 64, 128]))
    return group_size * draw(st.integers(1, 320 // group_size)), group_size


@needs_backend
@SLOW
@given(n=st.integers(1, 300), shape=shapes(), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       perm=st.booleans(), bias=st.booleans(), x_scale=st.sampled_from([1e-4, 1.0, 30.0, 1e3]),
       outlier=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_w4a16_gemv_h2_matches_reference(n, shape, dtype, perm, bias, x_scale, outlier, seed):
    k, group_size = shape
    t = make_inputs(n, k, group_size, dtype, perm, bias, x_scale, seed, outlier)
    ref = reference(t, group_size)
    mag = magnitude(t, group_size)
    for config in configs_under_test(n, t["qweight"].shape[0]):
        assert_close(run(t, group_size, config), ref.to(t["x"].device), dtype, TOL[dtype], mag)


@needs_backend
@pytest.mark.parametrize("k,group_size", [(96, 32), (256, 64), (93, 93), (512, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_gemv_h2_groups(k, group_size, dtype):
    t = make_inputs(77, k, group_size, dtype, True, True, 1.0, seed=k + group_size)
    for config in configs_under_test(77, t["qweight"].shape[0]):
        assert_close(run(t, group_size, config), reference(t, group_size), dtype, TOL[dtype])


@pytest.mark.skipif(not GPU or not torch.cuda.is_available(), reason="the half2 asm branch needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("perm", [False, True])
def test_w4a16_gemv_h2_asm_close_to_portable(monkeypatch, dtype, perm):
    """The half2 branch against the fp32 branch of the same kernel on the same inputs, and both against the
    reference, at a Llama-like size (K=4096, N=1000)."""
    t = make_inputs(1000, 4096, 128, dtype, perm, True, 1.0, seed=5)
    config = w4a16_gemv.configs(1000, 512)[0]
    asm = run(t, 128, config)
    monkeypatch.setattr(w4a16_gemv, "interpreter_on", lambda: True)
    portable = run(t, 128, config)
    mag = magnitude(t, 128)
    assert_close(asm, portable.to(dtype), dtype, TOL[dtype], mag)
    assert_close(asm, reference(t, 128), dtype, TOL[dtype], mag)


@pytest.mark.skipif(not GPU or not torch.cuda.is_available(), reason="dispatcher tuning needs a CUDA GPU")
def test_w4a16_gemv_h2_dispatcher_offers_it(monkeypatch):
    """With USE_H2 on, weight_only_matmul at M=1, 4-bit fp16 tunes over gemv_h2 and gemv, and its output matches the
    reference."""
    seen = []
    real = w4a16_gemv.gemv_h2
    monkeypatch.setattr(w4a16_gemv, "gemv_h2", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    monkeypatch.setenv("TQUANT_AUTOTUNE", "0")
    monkeypatch.setattr(weight_only_matmul_module, "USE_H2", True)
    t = make_inputs(300, 512, 128, torch.float16, False, False, 1.0, seed=9)
    y = weight_only_matmul(t["x"], t["qweight"], t["scales"], t["zeros"], bits=4, group_size=128, in_features=512)
    assert seen, "gemv_h2 is the default candidate at M=1"
    assert_close(y, reference(t, 128), torch.float16, TOL[torch.float16])


BAD = {
    "x rows": (lambda t: dict(t, x=t["x"].expand(2, -1)), "x must be"),
    "x dtype": (lambda t: dict(t, x=t["x"].float()), "x dtype"),
    "qweight shape": (lambda t: dict(t, qweight=t["qweight"][:-1]), "qweight"),
    "scales dtype": (lambda t: dict(t, scales=t["scales"].float()), "scales"),
    "zeros shape": (lambda t: dict(t, zeros=t["zeros"][:, :-1]), "zeros"),
    "perm shape": (lambda t: dict(t, perm=t["perm"][:-1]), "perm"),
    "bias dtype": (lambda t: dict(t, bias=t["bias"].float()), "bias"),
}


@pytest.mark.parametrize("case", BAD)
def test_w4a16_gemv_h2_bad_input_raises(case):
    t = make_inputs(24, 64, 32, torch.float16, True, True, 1.0, seed=1, device="cpu")
    make, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        run(make(t), 32, w4a16_gemv.INTERPRETER_CONFIG)


def test_w4a16_gemv_h2_bad_bits_and_group_raise():
    t = make_inputs(24, 64, 32, torch.float16, False, False, 1.0, seed=1, device="cpu")
    with pytest.raises(ValueError, match="bits"):
        w4a16_gemv.gemv_h2(t["x"], t["qweight"], t["scales"], t["zeros"], None, None, bits=3, group_size=32,
                           config=w4a16_gemv.INTERPRETER_CONFIG)
    with pytest.raises(ValueError, match="group_size"):
        w4a16_gemv.group_mode(2, 12, 96)


def test_w4a16_gemv_h2_supports():
    x = torch.randn(1, 256).half()
    assert w4a16_gemv.supports(x, 4, 128, 256)
    assert not w4a16_gemv.supports(x, 3, 128, 256)
    assert not w4a16_gemv.supports(x.float(), 4, 128, 256)
    assert not w4a16_gemv.supports(x.expand(2, -1), 4, 128, 256)
    assert not w4a16_gemv.supports(x, 4, 12, 252)


# ---- the kernel compiles for Hopper (sm_90) on a machine without a GPU (tquant.kernels.cross_compile) ----

HOPPER_CASES = [  # (n, k, group_size, dtype, perm, config changes)
    (14336, 4096, 128, "float16", False, {}),  # the default config: PAIR, a tile in one group
    (4096, 14336, 14336, "bfloat16", True, dict(BLOCK_KW=2, BLOCK_N=1024)),  # per-channel, perm gathered
    (4096, 4096, 32, "float16", True, dict(BLOCK_KW=8, BLOCK_N=512))]  # groups of 32 under 8-word tiles: GROUPS 1


def compile_cases():
    """[(kernel name, registers, spilled bytes)] of HOPPER_CASES compiled for sm_90."""
    from unittest import mock

    from tquant.kernels.cross_compile import compiling_for

    out = []
    for n, k, gs, dtype, perm, change in HOPPER_CASES:
        dt = getattr(torch, dtype)
        config = dict(w4a16_gemv.configs(n, k // 8)[0], **change)
        args = [torch.randn(1, k).to(dt), torch.zeros(k // 8, n, dtype=torch.int32), torch.ones(k // gs, n).to(dt),
                torch.ones(k // gs, n).to(dt), torch.arange(k, dtype=torch.int32) if perm else None, None]
        with mock.patch.object(w4a16_gemv, "interpreter_on", lambda: False), compiling_for() as done:
            w4a16_gemv.gemv_h2(*args, bits=4, group_size=gs, config=config)
        out += [(c.name, c.registers, c.spill_bytes) for c in done]
    return out


def test_w4a16_gemv_h2_compiles_for_hopper():
    from tests.kernels.bitplane_cases import compiled_in_subprocess

    compiled = compiled_in_subprocess(__file__)
    assert [name for name, _, _ in compiled] == ["_w4a16_gemv_kernel"] * len(HOPPER_CASES), compiled
    assert all(spill == 0 for _, _, spill in compiled), compiled


if __name__ == "__main__":
    import json

    print(json.dumps(compile_cases()))
