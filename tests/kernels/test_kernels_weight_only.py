"""Weight-only matmul kernels against the torch reference, and the reference against a dense weight.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) with fixed small
launch configs; with TRITON_INTERPRET=0 and TQUANT_AUTOTUNE=0 on a GPU it runs the same checks there.
"""
import contextlib
import json


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels import autotune_cache, dequant_gemm, dequant_gemv
from tquant.kernels import weight_only_matmul as weight_only_matmul_module
from tquant.kernels.runtime import device_name
from tquant.kernels.weight_only_matmul import DENSE, run_path, weight_only_matmul, weight_only_matmul_ref
from tquant.formats.packing import pack_codes
from tquant.formats.quantizer import grouped_qparams, quantize
from tquant.formats.weights import QuantizedWeight
from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)
from tests.kernel_device import assert_close as kernel_close

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_inputs(m, n, k, bits, group_size, dtype, perm, bias, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    groups = k // group_size
    scales = torch.rand(groups, n, generator=g) * 0.05 + 0.005
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).float()
    x = torch.randn(m, k, generator=g)
    tensors = dict(
        x=x.to(dtype), qweight=pack_codes(codes, bits), scales=scales.to(dtype), zeros=zeros.to(dtype),
        perm=torch.randperm(k, generator=g).to(torch.int32) if perm else None,
        bias=torch.randn(n, generator=g).to(dtype) if bias else None,
    )
    return {name: t.to(device) if t is not None else None for name, t in tensors.items()}


def call(fn, t, bits, group_size):
    k = t["x"].shape[1]
    return fn(t["x"], t["qweight"], t["scales"], t["zeros"], bits=bits, group_size=group_size, in_features=k,
              perm=t["perm"], bias=t["bias"])


def assert_close(y, ref, dtype, magnitude=None):
    kernel_close(y, ref, dtype, TOL[dtype], magnitude)


@st.composite
def shapes(draw):
    """(K, group_size): per-channel with any K (often not a multiple of epw), or G groups of a size."""
    if draw(st.booleans()):
        k = draw(st.integers(1, 300))
        return k, k
    group_size = draw(st.sampled_from([8, 12, 16, 32, 40, 64, 128]))
    return group_size * draw(st.integers(1, 300 // group_size)), group_size


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 1, 2, 5, 16, 17, 40]), n=st.integers(1, 300), shape=shapes(),
       bits=st.sampled_from([2, 3, 4, 8]), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       perm=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_match_reference(m, n, shape, bits, dtype, perm, bias, seed):
    k, group_size = shape
    t = make_inputs(m, n, k, bits, group_size, dtype, perm, bias, seed)
    y = call(weight_only_matmul, t, bits, group_size)
    assert_close(y, call(weight_only_matmul_ref, t, bits, group_size).to(y.device), dtype)


PATHS = {
    "gemv": (1, dequant_gemv.INTERPRETER_CONFIG),
    "gemm_split_k": (5, dequant_gemm.INTERPRETER_CONFIGS[0]),
    "gemm": (20, dequant_gemm.INTERPRETER_CONFIGS[1]),
    "gemm_split_k_gather": (5, dict(dequant_gemm.INTERPRETER_CONFIGS[0], gather=True)),  # x[:, perm] first
    "gemm_gather": (20, dict(dequant_gemm.INTERPRETER_CONFIGS[1], gather=True)),
    "dense": (20, DENSE),
}


@needs_backend
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,group_size", [(96, 32), (96, 8), (93, 93)])
def test_kernels_every_path(path, bits, k, group_size):
    m, config = PATHS[path]
    t = make_inputs(m, 40, k, bits, group_size, torch.float16, True, True, seed=bits * 1000 + k)
    y = run_path(config, t["x"], t["qweight"], t["scales"], t["zeros"], t["perm"], t["bias"], bits=bits,
                 group_size=group_size, in_features=k)
    assert_close(y, call(weight_only_matmul_ref, t, bits, group_size), torch.float16)


def test_gpu_candidates_gather_only_with_perm(monkeypatch):
    """With perm, every GEMM config at M > 1 is also a candidate with x gathered first; never at M = 1 or
    without perm."""
    monkeypatch.setattr(weight_only_matmul_module, "interpreter_on", lambda: False)
    plain = weight_only_matmul_module.candidates.__wrapped__(16, 4096, 512)
    gathered = weight_only_matmul_module.candidates.__wrapped__(16, 4096, 512, True)
    assert gathered == plain + [dict(c, gather=True) for c in plain]
    assert not any(c.get("gather") for c in weight_only_matmul_module.candidates.__wrapped__(1, 4096, 512, True))


@needs_backend
@pytest.mark.parametrize("path", ["gemv", "gemm_split_k"])
def test_kernels_split_k_leaves_counters_at_zero(path):
    """The one-launch split-K reduction resets its arrival counters, so repeated calls agree."""
    m, config = PATHS[path]
    t = make_inputs(m, 70, 96, 4, 32, torch.float16, False, True, seed=3)
    args = (t["x"], t["qweight"], t["scales"], t["zeros"], None, t["bias"])
    first, second = (run_path(config, *args, bits=4, group_size=32, in_features=96) for _ in range(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not dequant_gemm.split_k_buffers(2, 1, 1, 1, t["x"].device)[1].any()


def test_kernels_split_k_counters_per_stream_and_never_freed(monkeypatch):
    """Each (device, stream) has its own counters, and a buffer a launch outgrows stays alive (a captured graph may
    point at it) while the next launch gets a larger, zeroed one."""
    monkeypatch.setattr(dequant_gemm, "_counters", {})
    monkeypatch.setattr(dequant_gemm, "_retired", [])
    stream = [1]
    monkeypatch.setattr(dequant_gemm, "_stream_id", lambda device: stream[0])
    first = dequant_gemm.split_k_counters(10, "cpu")
    assert dequant_gemm.split_k_counters(10, "cpu") is first
    stream[0] = 2
    other = dequant_gemm.split_k_counters(10, "cpu")
    assert other is not first and other.data_ptr() != first.data_ptr()
    grown = dequant_gemm.split_k_counters(first.numel() + 1, "cpu")
    assert grown.numel() > first.numel() and not grown.any() and any(t is other for t in dequant_gemm._retired)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_kernels_split_k_graph_survives_counter_growth():
    """A split-K GEMV captured in a CUDA graph still gives the reference after a later launch outgrew the counter
    buffer the graph captured (the old buffer is kept, not freed and reused)."""
    m, config = PATHS["gemv"]
    t = make_inputs(m, 70, 96, 4, 32, torch.float16, False, True, seed=5)
    args = (t["x"], t["qweight"], t["scales"], t["zeros"], None, t["bias"])
    kw = dict(bits=4, group_size=32, in_features=96)
    ref = weight_only_matmul_ref(*args[:4], perm=None, bias=t["bias"], **kw)
    run_path(config, *args, **kw)  # compile, allocate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run_path(config, *args, **kw)
    dequant_gemm.split_k_counters(max(c.numel() for c in dequant_gemm._counters.values()) * 4, t["x"].device)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, ref, torch.float16)


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="inline asm needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("perm", [False, True])
def test_kernels_asm_dequant_matches_portable(monkeypatch, dtype, bits, perm):
    """dequant_pair_asm rounds (code - zero) * scale once, as the fp32 path does: identical outputs."""
    t = make_inputs(16, 200, 512, bits, 128, dtype, perm, True, seed=bits)
    config = dequant_gemm.configs(16, 200, t["qweight"].shape[0])[0]
    args = (t["x"], t["qweight"], t["scales"], t["zeros"], t["perm"], t["bias"])
    asm = run_path(config, *args, bits=bits, group_size=128, in_features=512)
    monkeypatch.setattr(dequant_gemm, "use_asm", lambda dtype, bits: False)
    portable = run_path(config, *args, bits=bits, group_size=128, in_features=512)
    torch.testing.assert_close(asm, portable, rtol=0, atol=0)
    assert_close(asm, call(weight_only_matmul_ref, t, bits, 128), dtype)



@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="the GPU candidates run on a CUDA GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("m,bits,dtype", [(1, 4, torch.float16), (1, 3, torch.bfloat16), (7, 4, torch.bfloat16),
                                          (16, 8, torch.float16), (50, 2, torch.float16), (200, 4, torch.bfloat16)])
def test_kernels_every_gpu_candidate(monkeypatch, m, bits, dtype):
    """Each distinct GPU tile of the weight-only candidates (GEMV, GEMM at BLOCK_M 16 with the inline-asm
    dequantization, the larger MMA tiles, with and without split-K, x gathered first with perm, the dense path from
    M 128), forced through run_path where the tuner (TQUANT_AUTOTUNE=0: the first candidate) would pick one; K 1000
    in groups of 40 (not a multiple of a word or BLOCK_K), N 300, act-order perm and bias. GPU only: the interpreter
    runs its own configs (test_kernels_every_path)."""
    monkeypatch.setattr(weight_only_matmul_module, "interpreter_on", lambda: False)
    t = make_inputs(m, 300, 1000, bits, 40, dtype, True, True, seed=m * 10 + bits)
    ref = call(weight_only_matmul_ref, t, bits, 40)
    configs = weight_only_matmul_module.candidates.__wrapped__(1 << (m - 1).bit_length(), 300,
                                                                t["qweight"].shape[0], True)
    tiles = {tuple((key, v) for key, v in c.items() if key != "num_stages"): c for c in configs}
    assert len(tiles) > 2
    for config in tiles.values():
        y = run_path(config, t["x"], t["qweight"], t["scales"], t["zeros"], t["perm"], t["bias"], bits=bits,
                     group_size=40, in_features=1000)
        assert_close(y, ref, dtype)

@needs_backend
def test_kernels_dequantize_writes_permuted_rows():
    t = make_inputs(1, 33, 90, 3, 30, torch.float32, True, False, seed=7)
    w = dequant_gemm.dequantize(t["qweight"], t["scales"], t["zeros"], t["perm"], bits=3, group_size=30, in_features=90,
                                dtype=torch.float32)
    eye = torch.eye(90, device=DEVICE)
    ref = weight_only_matmul_ref(eye, t["qweight"], t["scales"], t["zeros"], bits=3, group_size=30, in_features=90,
                                 perm=t["perm"])  # row i = w[i] in input-channel order
    torch.testing.assert_close(w, ref)


@needs_backend
def test_kernels_empty_batch():
    t = make_inputs(1, 8, 16, 4, 16, torch.float16, False, False, seed=0)
    t["x"] = t["x"][:0]
    assert call(weight_only_matmul, t, 4, 16).shape == (0, 8)


@SLOW
@given(n=st.integers(1, 40), shape=shapes(), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(),
       perm=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_reference_matches_dense_quantized_weight(n, shape, bits, sym, perm, seed):
    """The reference (unpack + dequantize + matmul) against tquant.formats.quantizer's own dequantization."""
    k, group_size = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    order = torch.randperm(k, generator=g) if perm else None
    stored = w[:, order] if perm else w  # storage column j holds input channel order[j]
    scale, zero = grouped_qparams(stored, bits, group_size, sym)
    codes = quantize(stored.reshape(n, k // group_size, group_size), scale[..., None], zero[..., None], bits)
    qw = QuantizedWeight(codes.reshape(n, k), scale, zero, bits, group_size, order)
    x, bias = torch.randn(5, k, generator=g), torch.randn(n, generator=g)
    expected = x.double() @ qw.dequantize().double().T + bias.double()
    y = weight_only_matmul_ref(x, pack_codes(qw.codes, bits), scale.T.contiguous(), zero.T.contiguous(), bits=bits,
                               group_size=group_size, in_features=k, perm=order, bias=bias)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def _bad(t, **change):
    args = dict(x=t["x"], qweight=t["qweight"], scales=t["scales"], zeros=t["zeros"], bits=4, group_size=16,
                in_features=32, perm=t["perm"], bias=t["bias"])
    args.update(change)
    return args


BAD_INPUTS = {
    "bits": (lambda t: _bad(t, bits=5), "bits=5"),
    "scales dtype": (lambda t: _bad(t, scales=t["scales"].float()), "scales dtype"),
    "zeros dtype": (lambda t: _bad(t, zeros=t["zeros"].bfloat16()), "zeros dtype"),
    "K mismatch": (lambda t: _bad(t, in_features=40), "in_features=40"),
    "group not dividing K": (lambda t: _bad(t, group_size=12), "does not divide"),
    "x not 2-D": (lambda t: _bad(t, x=t["x"][None]), "2-D"),
    "x dtype": (lambda t: _bad(t, x=t["x"].double()), "not supported"),
    "qweight shape": (lambda t: _bad(t, qweight=t["qweight"][:-1]), "qweight shape"),
    "qweight dtype": (lambda t: _bad(t, qweight=t["qweight"].long()), "qweight dtype"),
    "perm shape": (lambda t: _bad(t, perm=t["perm"][:-1]), "perm shape"),
    "bias shape": (lambda t: _bad(t, bias=t["bias"][:-1]), "bias shape"),
}


@pytest.mark.parametrize("fn", [weight_only_matmul, weight_only_matmul_ref])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_kernels_bad_input_raises(fn, case):
    t = make_inputs(3, 24, 32, 4, 16, torch.float16, True, True, seed=1, device="cpu")
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        fn(**make(t))


def test_kernels_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = make_inputs(3, 24, 32, 4, 16, torch.float16, False, False, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        call(weight_only_matmul, t, 4, 16)


# ---- autotune cache: pure Python, runs without a GPU ----

CONFIGS = [dict(BLOCK=16), dict(BLOCK=32), dict(BLOCK=64)]
KEY = dict(M=1, N=8)
CPU = torch.device("cpu")


@pytest.fixture
def cache_dirs(tmp_path, monkeypatch):
    """Empty user and shipped cache dirs, a cleared memory cache, and a fake benchmark (BLOCK=32 wins)."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    monkeypatch.setenv("TQUANT_AUTOTUNE_DIR", str(user))
    monkeypatch.delenv("TQUANT_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune_cache, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(autotune_cache, "_memory", {})
    monkeypatch.setattr(autotune_cache, "_chosen", {})
    calls = []

    def fake_benchmark(configs, run, desc):
        assert desc.startswith("autotune kern|M=1,N=8")  # the progress bar names the key being tuned
        calls.append(configs)
        return sorted(((abs(c["BLOCK"] - 32) + 1.0, c) for c in configs), key=lambda t: t[0])

    monkeypatch.setattr(autotune_cache, "benchmark", fake_benchmark)
    return user / "interpreter.json", shipped / "interpreter.json", calls


def tune():
    return autotune_cache.tune("kern", KEY, CONFIGS, lambda c: None, CPU)


def test_kernels_autotune_saves_then_loads(cache_dirs, monkeypatch):
    user_file, _, calls = cache_dirs
    assert tune() == dict(BLOCK=32) and len(calls) == 1
    saved = json.loads(user_file.read_text())
    assert saved["gpu"] == "interpreter" and saved["entries"]["kern|M=1,N=8"]["config"] == dict(BLOCK=32)
    monkeypatch.setattr(autotune_cache, "_memory", {})  # a new process
    monkeypatch.setattr(autotune_cache, "_chosen", {})
    assert tune() == dict(BLOCK=32) and len(calls) == 1  # loaded, not benchmarked


def test_kernels_autotune_uses_shipped_file(cache_dirs):
    _, shipped_file, calls = cache_dirs
    autotune_cache.write_entry(shipped_file, "interpreter", "kern|M=1,N=8", dict(config=dict(BLOCK=64), us=1.0))
    assert tune() == dict(BLOCK=64) and not calls


def test_kernels_autotune_retune_skips_the_files(cache_dirs, monkeypatch):
    user_file, shipped_file, calls = cache_dirs
    autotune_cache.write_entry(shipped_file, "interpreter", "kern|M=1,N=8", dict(config=dict(BLOCK=64), us=1.0))
    monkeypatch.setenv("TQUANT_AUTOTUNE", "retune")
    assert tune() == dict(BLOCK=32) and len(calls) == 1
    assert tune() == dict(BLOCK=32) and len(calls) == 1  # once a process
    assert json.loads(user_file.read_text())["entries"]["kern|M=1,N=8"]["config"] == dict(BLOCK=32)


def test_kernels_autotune_log_prints_every_candidate(cache_dirs, monkeypatch, capsys):
    monkeypatch.setenv("TQUANT_AUTOTUNE_LOG", "1")
    assert tune() == dict(BLOCK=32)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"autotune kern|M=1,N=8: {us:.2f} us {{'BLOCK': {b}}}" for us, b in ((1.0, 32), (17.0, 16),
                                                                                        (33.0, 64))]
    monkeypatch.delenv("TQUANT_AUTOTUNE_LOG")
    monkeypatch.setattr(autotune_cache, "_chosen", {})
    monkeypatch.setenv("TQUANT_AUTOTUNE", "retune")
    assert tune() == dict(BLOCK=32) and capsys.readouterr().err == ""  # silent unless asked


def _cache_file(gpu="interpreter", fmt=1, config=None, entry=None):
    entry = entry if entry is not None else {"config": config or {"BLOCK": 64}}
    return json.dumps({"format": fmt, "gpu": gpu, "entries": {"kern|M=1,N=8": entry}})


@pytest.mark.parametrize("content,warns", [
    ("{not json", True),
    (json.dumps([1, 2, 3]), True),
    (_cache_file(gpu="Some_Other_GPU"), True),  # foreign
    (_cache_file(fmt=99), True),
    (_cache_file(config={"BLOCK": 128}), False),  # stale: no longer a candidate
    (_cache_file(entry="garbage"), False),
])
def test_kernels_autotune_ignores_bad_entries(cache_dirs, content, warns):
    user_file, _, calls = cache_dirs
    user_file.parent.mkdir(parents=True)
    user_file.write_text(content)
    with pytest.warns(UserWarning) if warns else contextlib.nullcontext():
        assert tune() == dict(BLOCK=32)
    assert len(calls) == 1  # re-tuned, and the file rewritten in good form
    assert json.loads(user_file.read_text())["entries"]["kern|M=1,N=8"]["config"] == dict(BLOCK=32)


def test_autotune_rank_falls_back_to_warm_times_below_the_noise():
    """Flushed times rank the candidates; when the fastest is <= 0 (a kernel shorter than the flush's noise) the
    warm-L2 times rank them all instead."""
    a, b, c = dict(BLOCK=1), dict(BLOCK=2), dict(BLOCK=3)
    assert autotune_cache.rank([(5.0, a), (3.0, b), (4.0, c)], lambda cfg: 1 / 0) == [(3.0, b), (4.0, c), (5.0, a)]
    warm = {1: 2.0, 2: 9.0, 3: 1.5}
    assert autotune_cache.rank([(5.0, a), (-2.5, b), (0.4, c)], lambda cfg: warm[cfg["BLOCK"]]) == \
        [(1.5, c), (2.0, a), (9.0, b)]


def test_kernels_autotune_off_uses_first_config(cache_dirs, monkeypatch):
    _, _, calls = cache_dirs
    monkeypatch.setenv("TQUANT_AUTOTUNE", "0")
    assert tune() == CONFIGS[0] and not calls


def test_kernels_shipped_configs_are_current(monkeypatch):
    """Every shipped entry names a config that is still a GPU candidate for its key (else it is dead weight)."""
    from tquant.kernels import (bcq_matmul, bitplane_gemm, bitplane_gemv, bitplane_matmul, e8p_matmul, fp8_gemm,
                                hadamard, spqr_matmul, w4a8_gemm, w8a8_gemm)
    from tquant.kv import split_kv

    for module in (weight_only_matmul_module, w8a8_gemm, w4a8_gemm, e8p_matmul, hadamard, split_kv, bcq_matmul,
                   spqr_matmul, bitplane_gemm, bitplane_gemv, bitplane_matmul, fp8_gemm):
        monkeypatch.setattr(module, "interpreter_on", lambda: False)  # the GPU candidate lists

    def weight_only(key):
        kw = -(-int(key["K"]) // (32 // int(key["bits"])))
        return weight_only_matmul_module.candidates.__wrapped__(int(key["M"]), int(key["N"]), kw, key["perm"] == "1")

    candidates_of = {"w8a8_matmul": lambda key: w8a8_gemm.configs(int(key["M"])),
                     "w4a8_matmul": lambda key: w4a8_gemm.configs(int(key["M"])),
                     "fp8_matmul": lambda key: w8a8_gemm.configs(int(key["M"])),  # fp8_gemm takes the int8 tiles
                     "fp8_linear": lambda key: fp8_gemm.linear_configs(int(key["M"]), key["static"] == "1"),
                     "w4a4_matmul": lambda key: w4a8_gemm.configs(int(key["M"]), act_bits=4),
                     "e8p_matmul": lambda key: e8p_matmul.candidates.__wrapped__(int(key["M"]), int(key["N"]),
                                                                                 int(key["K"]) // 8),
                     "hadamard_transform": lambda key: hadamard.configs(int(key["N"]), int(key["M"])),
                     "kv_decode_attention": lambda key: split_kv.configs(int(key["T"])),
                     "kvquant_decode_attention": lambda key: split_kv.configs(int(key["T"])),
                     "bcq_matmul": lambda key: bcq_matmul.configs(int(key["M"]), int(key["group"])),
                     "spqr_outliers": lambda key: spqr_matmul.outlier_configs(int(key["M"])),
                     "bitplane_matmul": lambda key: bitplane_matmul.wpaq_candidates(
                         *(int(key[c]) for c in ("M", "N", "K", "g", "p", "q"))),
                     "bitplane_matmul_a16": lambda key: bitplane_gemm.a16_configs(int(key["M"]), int(key["K"]),
                                                                                  int(key["g"])),
                     "bitplane_gemv": lambda key: bitplane_gemv.configs(
                         *(int(key[c]) for c in ("M", "N", "K", "g", "p", "q")))}
    shipped = list(autotune_cache.SHIPPED_DIR.glob("*.json"))
    assert any(p.stem == "NVIDIA_H100_80GB_HBM3" for p in shipped)
    for path in shipped:
        for name, entry in autotune_cache.read_entries(path, path.stem).items():
            kernel, key = name.split("|")
            key = dict(item.split("=") for item in key.split(","))
            assert entry["config"] in candidates_of.get(kernel, weight_only)(key), name


def test_kernels_gpu_name_is_file_safe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_name(torch.device("cuda", 99)) == "NVIDIA_H100_80GB_HBM3"
