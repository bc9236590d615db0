"""E8P (QuIP# lattice codebook) kernels against the torch reference, and the decode kernel bit for bit.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) with fixed small
launch configs; with TRITON_INTERPRET=0 and TQUANT_AUTOTUNE=0 on a GPU it runs the same checks there.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)
from tests.kernel_device import assert_close as kernel_close

from tquant.formats.e8p_codebook import E81B_GRID, e8p_decode, e81b_decode
from tquant.kernels import dequant_gemm
from tquant.kernels import e8p_matmul as e8p_module
from tquant.kernels.e8p_matmul import (
    DECODERS,
    DENSE,
    INTERPRETER_CONFIGS,
    decode_weight,
    e8p_decode_weight,
    e8p_decode_weight_ref,
    e8p_matmul,
    e8p_matmul_ref,
    run_path,
)

TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_codes(kb, n, bits, g):
    """(codes int16 over all 2^16 indices, negative ones included; codes2 for bits or None)."""
    codes = torch.randint(-2**15, 2**15, (kb, n), generator=g, dtype=torch.int32).to(torch.int16)
    if bits == 2:
        return codes, None
    if bits == 3:
        return codes, torch.randint(0, 256, (kb, n), generator=g, dtype=torch.int32).to(torch.uint8)
    return codes, torch.randint(-2**15, 2**15, (kb, n), generator=g, dtype=torch.int32).to(torch.int16)


def make_inputs(m, n, kb, bits, dtype, bias, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    codes, codes2 = random_codes(kb, n, bits, g)
    tensors = {"x": torch.randn(m, 8 * kb, generator=g).to(dtype), "codes": codes, "codes2": codes2,
               "bias": torch.randn(n, generator=g).to(dtype) if bias else None}
    return {name: t.to(device) if t is not None else None for name, t in tensors.items()}


def call(fn, t, bits):
    return fn(t["x"], t["codes"], t["codes2"], bits=bits, bias=t["bias"])


def assert_close(y, ref, dtype, magnitude=None):
    kernel_close(y, ref, dtype, TOL[dtype], magnitude)


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 1, 2, 3, 16, 17, 33]), n=st.integers(1, 80), kb=st.integers(1, 40),
       bits=st.sampled_from([2, 3, 4]), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_e8p_matches_reference(m, n, kb, bits, dtype, bias, seed):
    """Against the reference, the error over |x| @ |W|^T + |bias|: a few outputs (n = 1) may cancel, and float
    rounding scales with the summands (fp32, m = n = kb = 1, bits 4, with bias reached 5.3e-5 over |y|)."""
    t = make_inputs(m, n, kb, bits, dtype, bias, seed)
    y = call(e8p_matmul, t, bits)
    w_t = e8p_decode_weight_ref(t["codes"], t["codes2"], bits=bits, dtype=torch.float32)  # [K, N]
    magnitude = t["x"].float().abs() @ w_t.abs()
    if bias:
        magnitude += t["bias"].float().abs()
    assert_close(y, call(e8p_matmul_ref, t, bits), dtype, magnitude=magnitude)


PATHS = {  # name: (M, config)
    "gemv": (1, INTERPRETER_CONFIGS["gemv"]),
    "gemm_split_k": (5, INTERPRETER_CONFIGS["gemm"]),
    "gemm": (20, INTERPRETER_CONFIGS["gemm_large"]),
    "gemm_at_batch_1": (1, INTERPRETER_CONFIGS["gemm"]),
    "dense": (20, DENSE),
}


@needs_backend
@pytest.mark.parametrize("path,decoder", [(p, d) for p in PATHS for d in (DECODERS if p != "dense" else DECODERS[:1])])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernels_e8p_every_path(path, decoder, bits):
    """Each path with each (SIGNS, GATHER) decoder, on odd N and K/8 (several tiles, splits and masks)."""
    m, config = PATHS[path]
    config = config if path == "dense" else dict(config, SIGNS=decoder[0], GATHER=decoder[1])
    t = make_inputs(m, 45, 13, bits, torch.float16, True, seed=bits * 100 + m)
    y = run_path(config, t["x"], t["codes"], t["codes2"], t["bias"], bits=bits)
    assert_close(y, call(e8p_matmul_ref, t, bits), torch.float16)


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_e8p_paths_per_dtype(dtype):
    """fp32 x goes through fp32 dots ("ieee"), bf16 through bf16 (fp32 under the interpreter)."""
    for m, config in PATHS.values():
        t = make_inputs(m, 37, 11, 3, dtype, False, seed=m)
        y = run_path(config, t["x"], t["codes"], t["codes2"], t["bias"], bits=3)
        assert_close(y, call(e8p_matmul_ref, t, 3), dtype)


@needs_backend
@pytest.mark.parametrize("config", [
    pytest.param(c, id=f"{name}-{'-'.join(f'{k}{v}' for k, v in c.items() if k != 'path')}")
    for name, c in (("gemv", e8p_module.gemv_configs(300, 40)[0]), ("gemm16", e8p_module.gemm_configs(16, 300, 40)[0]),
                    ("gemm64", e8p_module.gemm_configs(64, 300, 40)[0]),
                    ("gemm128", e8p_module.gemm_configs(256, 300, 40)[0]))])
def test_kernels_e8p_gpu_configs(config):
    """The first GPU candidate of each batch bucket (large blocks) on a small odd shape."""
    m = {"gemv": 1}.get(config["path"], min(config.get("BLOCK_M", 16), 40) - 3)
    t = make_inputs(m, 300, 40, 4, torch.float16, True, seed=5)
    y = run_path(config, t["x"], t["codes"], t["codes2"], t["bias"], bits=4)
    assert_close(y, call(e8p_matmul_ref, t, 4), torch.float16)


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="the GPU candidates run on a CUDA GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("m,bits,dtype", [(1, 2, torch.float16), (1, 4, torch.bfloat16), (13, 3, torch.float16),
                                          (50, 2, torch.bfloat16), (200, 4, torch.float16)])
def test_kernels_e8p_every_gpu_candidate(monkeypatch, m, bits, dtype):
    """Every distinct GPU tile of e8p_matmul's candidates for m's bucket (GEMV, GEMM with every decoder the list
    holds, split-K or not, the dense path), forced through run_path where the tuner (TQUANT_AUTOTUNE=0: the first
    candidate) would pick one; N 300, K 320 (40 code rows), bias. GPU only: the interpreter runs its own configs."""
    monkeypatch.setattr(e8p_module, "interpreter_on", lambda: False)
    t = make_inputs(m, 300, 40, bits, dtype, True, seed=m * 10 + bits)
    ref = call(e8p_matmul_ref, t, bits)
    configs = e8p_module.candidates.__wrapped__(1 << (m - 1).bit_length(), 300, 40)
    tiles = {tuple((key, v) for key, v in c.items() if key != "num_stages"): c for c in configs}
    assert len(tiles) > 2
    for config in tiles.values():
        assert_close(run_path(config, t["x"], t["codes"], t["codes2"], t["bias"], bits=bits), ref, dtype)


@needs_backend
@pytest.mark.parametrize("path", ["gemv", "gemm_split_k"])
def test_kernels_e8p_split_k_leaves_counters_at_zero(path):
    """The one-launch split-K reduction resets its arrival counters, so repeated calls agree."""
    m, config = PATHS[path]
    t = make_inputs(m, 70, 24, 2, torch.float16, True, seed=3)
    first, second = (run_path(config, t["x"], t["codes"], None, t["bias"], bits=2) for _ in range(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not dequant_gemm.split_k_buffers(2, 1, 1, 1, t["x"].device)[1].any()


def all_codes(bits, g):
    """Every E8P index once (and every second-stage index at least once), as [K/8, N] = [128, 512]."""
    codes = torch.arange(-2**15, 2**15, dtype=torch.int32)[torch.randperm(2**16, generator=g)]
    codes = codes.to(torch.int16).reshape(128, 512)
    if bits == 2:
        return codes, None
    if bits == 3:
        return codes, torch.arange(2**16, dtype=torch.int32)[torch.randperm(2**16, generator=g)].to(
            torch.uint8).reshape(128, 512)
    return codes, codes.flatten()[torch.randperm(2**16, generator=g)].reshape(128, 512)


@needs_backend
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("decoder", DECODERS)
def test_kernels_e8p_decode_is_bit_exact(bits, decoder):
    """Every index through the decode kernel equals the codebook's decoders (computed on the CPU) bit for bit
    in fp32 (large blocks: few programs for the interpreter), and the public launcher's fp16 the rounded
    reference (on a slice, with its own blocks)."""
    codes, codes2 = all_codes(bits, torch.Generator().manual_seed(bits))
    ref = e8p_decode_weight_ref(codes, codes2, bits=bits, dtype=torch.float32)
    dev = [c.to(DEVICE) if c is not None else None for c in (codes, codes2)]
    w = decode_weight(*dev, bits=bits, dtype=torch.float32, signs=decoder[0], gather=decoder[1], block=(32, 256))
    assert torch.equal(w.cpu(), ref)
    if decoder == DECODERS[0]:
        part = [c[:21, :77] if c is not None else None for c in dev]
        assert torch.equal(e8p_decode_weight(*part, bits=bits, dtype=torch.float16).cpu(), ref[:168, :77].half())


def test_kernels_e8p_reference_layout():
    """W^T[8b + j, n] is coordinate j of code (b, n): the reference against e8p_codebook's decoders."""
    g = torch.Generator().manual_seed(0)
    codes, codes2 = random_codes(3, 5, 3, g)
    wt = e8p_decode_weight_ref(codes, codes2, bits=3, dtype=torch.float32)
    for b, n, j in ((0, 0, 0), (2, 4, 7), (1, 3, 5)):
        expected = e8p_decode(codes[b, n])[j] + E81B_GRID[codes2[b, n].long(), j] / 2.04
        assert wt[8 * b + j, n] == expected
    assert torch.equal(e81b_decode(codes2), E81B_GRID[codes2.long()])


@needs_backend
def test_kernels_e8p_empty_shapes():
    t = make_inputs(1, 8, 2, 2, torch.float16, True, seed=0)
    assert call(e8p_matmul, dict(t, x=t["x"][:0]), 2).shape == (0, 8)
    assert call(e8p_matmul, dict(t, codes=t["codes"][:, :0], bias=t["bias"][:0]), 2).shape == (1, 0)
    y = call(e8p_matmul, dict(t, x=t["x"][:, :0], codes=t["codes"][:0]), 2)  # K = 0: y = bias
    assert torch.equal(y, call(e8p_matmul_ref, dict(t, x=t["x"][:, :0], codes=t["codes"][:0]), 2))
    assert e8p_decode_weight(t["codes"][:0], bits=2).shape == (0, 8)


def _bad(t, **change):
    args = {"x": t["x"], "codes": t["codes"], "codes2": t["codes2"], "bits": 3, "bias": t["bias"]}
    args.update(change)
    return args


BAD_INPUTS = {
    "bits": (lambda t: _bad(t, bits=5), "not 5"),
    "codes dtype": (lambda t: _bad(t, codes=t["codes"].int()), "codes dtype"),
    "codes not 2-D": (lambda t: _bad(t, codes=t["codes"][None]), "2-D"),
    "codes2 with 2 bits": (lambda t: _bad(t, bits=2), "no codes2"),
    "codes2 missing": (lambda t: _bad(t, codes2=None), "needs codes2"),
    "codes2 dtype": (lambda t: _bad(t, codes2=t["codes2"].to(torch.int16)), "codes2 dtype"),
    "codes2 dtype 4 bits": (lambda t: _bad(t, bits=4), "codes2 dtype"),
    "codes2 shape": (lambda t: _bad(t, codes2=t["codes2"][:, :-1]), "codes2 shape"),
    "K not a multiple of 8": (lambda t: _bad(t, x=t["x"][:, :-3]), "multiple of 8"),
    "K mismatch": (lambda t: _bad(t, x=t["x"][:, :-8]), "K=24"),
    "x not 2-D": (lambda t: _bad(t, x=t["x"][None]), "2-D"),
    "x dtype": (lambda t: _bad(t, x=t["x"].double()), "not supported"),
    "bias shape": (lambda t: _bad(t, bias=t["bias"][:-1]), "bias shape"),
    "bias dtype": (lambda t: _bad(t, bias=t["bias"].float()), "bias dtype"),
}


@pytest.mark.parametrize("fn", [e8p_matmul, e8p_matmul_ref])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_kernels_e8p_bad_input_raises(fn, case):
    t = make_inputs(3, 24, 4, 3, torch.float16, True, seed=1, device="cpu")
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        fn(**make(t))


@pytest.mark.parametrize("fn", [e8p_decode_weight, e8p_decode_weight_ref])
def test_kernels_e8p_decode_bad_input_raises(fn):
    t = make_inputs(1, 24, 4, 4, torch.float16, False, seed=1, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        fn(t["codes"], t["codes2"], bits=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not 5"):
        fn(t["codes"], t["codes2"], bits=5)
    with pytest.raises(ValueError, match="needs codes2"):
        fn(t["codes"], bits=4)


def test_kernels_e8p_mixed_devices_raise():
    t = make_inputs(3, 24, 4, 3, torch.float16, True, seed=1, device="cpu")
    with pytest.raises(ValueError, match="one device"):
        e8p_matmul(t["x"], t["codes"].to("meta"), t["codes2"], bits=3, bias=t["bias"])


def test_kernels_e8p_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = make_inputs(3, 24, 4, 2, torch.float16, False, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        call(e8p_matmul, t, 2)


def test_kernels_e8p_gpu_candidates(monkeypatch):
    """GPU candidates: the default first, only known paths, BLOCK_KB x 8 >= 16 for tl.dot, splits that fit."""
    monkeypatch.setattr(e8p_module, "interpreter_on", lambda: False)
    e8p_module.candidates.cache_clear()
    try:
        for m in (1, 2, 16, 32, 64, 256, 4096):
            for n, kb in ((14336, 512), (4096, 1792), (40, 3)):
                configs = e8p_module.candidates(m, n, kb)
                assert configs and configs[0]["path"] == ("gemv" if m == 1 else "gemm")
                assert len(configs) == len({tuple(sorted(c.items())) for c in configs}) <= 64
                assert (DENSE in configs) == (m >= 64)
                for c in configs:
                    assert c["path"] in ("gemv", "gemm", "dense")
                    if c["path"] != "dense":
                        assert c["SPLIT_K"] == 1 or kb >= 2 * c["SPLIT_K"] * c["BLOCK_KB"]
                        assert (c["SIGNS"], c["GATHER"]) in DECODERS
    finally:
        e8p_module.candidates.cache_clear()
