"""The dynamic quantized KV caches grow in O(new tokens) a call: a decode step's update() costs the same at 16k cached
tokens as at 1k (no re-concatenation of the whole store), the storage stays within twice what it holds, and the
elements copied per step do not grow with the length (tquant.kv.growing's count). On the cache layers directly, with
a tiny model's KV shape scaled up (so that an O(length) copy shows next to the per-call overhead), each layer kind
on the torch path and on the kernel path (its update() only: no kernel runs in update on CPU)."""
import statistics
import time

import pytest
import torch

from tquant.kv import growing
from tquant.kv import kvquant_format as fmt
from tquant.kv.cache import KiviLayer
from tquant.kv.fp8_cache import FP8Layer
from tquant.kv.kvquant_cache import KVQuantLayer
from tests.kernel_device import DEVICE

B, H, D = 1, 4, 64
CHUNK = 32  # timed steps are summed in chunks of KIVI's group: each chunk holds one flush of a group
CHUNKS = 7


def kvquant_layer(kernel):
    g = torch.Generator().manual_seed(0)
    params = fmt.LayerParams(torch.randn(H, D, generator=g), 1 + torch.rand(H, D, generator=g),
                             fmt.uniform_codebook(2), fmt.uniform_codebook(2))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return KVQuantLayer(params, 2, sink=4, outliers=0.02, prefill_with_quant=False, rope=(inv_freq, 1.0),
                        kernel=kernel)


LAYERS = {
    "kivi": lambda kernel: KiviLayer(2, CHUNK, 32, False, kernel=kernel),
    "kivi, residual 0": lambda kernel: KiviLayer(2, CHUNK, 0, False, kernel=kernel),
    "qoq per-token keys": lambda kernel: KiviLayer(4, D, 0, False, kernel=kernel, key_axis="token"),
    "kvquant": kvquant_layer,
    "fp8": lambda kernel: FP8Layer(None, None, False, kernel=kernel),
}


@pytest.fixture
def one_thread():
    """Timings on one thread: on a shared, loaded CPU, intra-op threads waiting on each other swamp what is timed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def filled(name, kernel, length, data):
    """A layer holding `length` tokens (one multi-token update: a prefill)."""
    layer = LAYERS[name](kernel)
    layer.update(data[0, ..., :length, :], data[1, ..., :length, :])
    return layer


def check_flat(name, kernel, lengths):
    """Two layers filled to lengths[0] and lengths[1] take CHUNK one-token updates in turn, CHUNKS times (so a burst of
    load on the machine hits both alike); per layer the fastest chunk's mean update time (load only ever adds time)
    and the median chunk's elements copied per step (tquant.kv.growing's count; the one chunk that reallocates is
    not the median) must be alike, and its growing storage must hold at most twice what is filled, linear in the
    tokens held."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(2, B, H, max(lengths), D, generator=g)
    step = torch.randn(2, B, H, CHUNK * CHUNKS, D, generator=g)
    layers = [filled(name, kernel, n, data) for n in lengths]
    seconds, copied = ([[] for _ in lengths] for _ in range(2))
    for c in range(CHUNKS):
        for layer, sec, cop in zip(layers, seconds, copied):
            before, t = growing.copied_elements(), 0.0
            for i in range(c * CHUNK, (c + 1) * CHUNK):
                t0 = time.perf_counter()
                layer.update(step[0, ..., i : i + 1, :], step[1, ..., i : i + 1, :])
                t += time.perf_counter() - t0
            sec.append(t / CHUNK)
            cop.append((growing.copied_elements() - before) / CHUNK)
    report = {n: f"{min(s) * 1e6:.0f} us/token (chunks {[round(x * 1e6) for x in s]}), "
                 f"{statistics.median(c):.0f} elements copied/token" for n, s, c in zip(lengths, seconds, copied)}
    (t0, t1), (c0, c1) = (min(s) for s in seconds), (statistics.median(c) for c in copied)
    assert t1 < 2 * t0, (name, kernel, report)
    assert c1 <= 1.5 * c0 + 8, (name, kernel, report)  # outlier counts vary a little from token to token
    per_token = []
    for n, layer in zip(lengths, layers):
        assert layer.get_seq_length() == n + CHUNK * CHUNKS
        parts = layer.growing()
        held = sum(g.view.numel() * g.view.element_size() for g in parts)
        assert all(g.capacity <= 2 * g.n for g in parts), (name, kernel, [(g.n, g.capacity) for g in parts])
        assert sum(g.nbytes() for g in parts) <= 2 * held
        per_token.append(held / layer.get_seq_length())
    assert max(per_token) < 1.25 * min(per_token), (name, kernel, per_token)  # linear, plus a fixed sink / window


@pytest.mark.parametrize("kernel", [False, True], ids=["torch path", "kernel path"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_update_cost_per_token_is_flat_from_1k_to_16k(name, kernel, one_thread):
    check_flat(name, kernel, (1024, 16384))


def same(a, b):
    """Bit-identical under the interpreter (both paths run the same float ops in numpy); on a GPU the write kernel's
    compiler contracts a * b + c into one FMA where torch rounds twice, so the dequantized values agree to a few
    float32 ulps of the tensor's scale."""
    if DEVICE == "cpu":
        assert torch.equal(a, b)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=4 * torch.finfo(torch.float32).eps
                                   * b.float().abs().max().item())


def same_codes(a, b):
    """Packed codes (and their scales): bit-identical under the interpreter; on a GPU a value within an FMA's
    rounding of a code boundary may round to the neighbouring code, so at most 1 in 1000 words may differ (and the
    scales agree as in same())."""
    if DEVICE == "cpu" or a.is_floating_point():
        return same(a, b)
    assert a.shape == b.shape and (a != b).float().mean().item() <= 1e-3


@pytest.mark.parametrize("bits, residual, pwq, kernel", [(4, 0, False, True), (8, 3, False, False),
                                                       (4, 2, True, False)])
def test_the_write_kernel_appends_what_torch_appends(bits, residual, pwq, kernel):
    """Per-token keys over all D channels (QoQ's KV4 / KV8) written into the growing store by the Triton write kernel
    (on CUDA by default; forced here) give the same store, the same returns and the same stored tokens as torch's
    quantize-and-append, chunk after chunk (across the store's reallocations)."""
    g = torch.Generator().manual_seed(bits + residual)
    k_all, v_all = ((torch.randn(2, 2, 40, 16, generator=g) * 3).to(DEVICE) for _ in range(2))
    layers = [KiviLayer(bits, 16, residual, pwq, kernel=kernel, key_axis="token", write_kernel=w) for w in (False, True)]
    seen = 0
    for t in (5, 1, 1, 3, 1, 7, 1, 1, 20):
        k, v = k_all[..., seen : seen + t, :], v_all[..., seen : seen + t, :]
        outs = [layer.update(k, v) for layer in layers]
        seen += t
        for a, b in zip(*outs):
            same(a, b)
        for a, b in zip(*(layer.stored() for layer in layers)):
            same(a, b)
        for a, b in zip(*((*layer.packed_keys, *layer.packed_values) for layer in layers)):
            same_codes(a, b)
    assert layers[1].quantized_length() == 40 - residual
