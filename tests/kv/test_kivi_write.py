"""KIVI's static-cache write kernels (tquant.kv.kivi_write) against their torch references (today's write path of
StaticKiviCache: ring index_copy_, the pending group's index_select, quantize_keys / quantize_values, index_copy_ into
the stores): ring and stores equal bit for bit after every step of a sequence crossing several group flushes (bits 2,
3, 4, 8, groups of 1 to 32 tokens / channels, residual 1 and more, batch and GQA heads, head sizes 16 / 64, bf16 / fp16
/ fp32 rings, an outlier, constant groups and a step below fp16's subnormals: scale 1); the prefill kernel's store of
a prefill's complete groups against quantize_keys / quantize_values (bits 2, 3, 4, 8, groups of 8 to 32, residual 1 to
G + 3, fp16 / bf16 / fp32 tokens, keys a transposed view); StaticKiviCache's kernel writes against its torch writes;
StaticDecoder's logits with the kernel writes equal the torch writes'; bad input. On a GPU:
Llama-sized heads, and the write captured in a CUDA graph replayed at successive positions."""
import pytest
import torch
from tests.kernel_device import DEVICE, needs_backend
from tests.tiny_models import tiny_model, token_batch

import tquant
from tquant.decode import StaticDecoder
from tquant.kv import kivi_write as kw
from tquant.kv.static_cache import StaticKiviCache
from tquant.kv.uniform_format import PackedKV, words_per_group

TINY = 2.0**-24  # fp16's smallest subnormal: a group spanning it has a step that rounds to 0 in fp16 (scale 1)


def garbage_state(b, h, d, bits, group, residual, tokens, dtype, seed):
    """(ring_k, ring_v, k_store, v_store) of a cache of `tokens` tokens filled with random garbage (untouched rows and
    ring slots of positions not written yet show), and an identical copy for the reference."""
    g = torch.Generator().manual_seed(seed)
    groups, wpg = -(-tokens // group) + 1, words_per_group(bits, group)

    def store(codes, params):
        return PackedKV(torch.randint(-2**31, 2**31 - 1, (b, h, *codes), generator=g, dtype=torch.int32),
                        *(torch.rand(b, h, *params, generator=g).half() for _ in "sm"))
    rings = [torch.randn(b, h, residual + group, d, generator=g).to(dtype) for _ in "kv"]
    stores = [store((groups * wpg, d), (groups, d)),
              store((groups * group, d // group * wpg), (groups * group, d // group))]
    mine = [x.to(DEVICE) for x in rings] + [PackedKV(*(p.to(DEVICE) for p in s)) for s in stores]
    return mine, [x.clone() for x in mine[:2]] + [PackedKV(*(p.clone() for p in s)) for s in mine[2:]]


def step_tokens(b, h, d, n, dtype, seed):
    """k, v [B, H, 1, D] of step n: random with per-channel offsets, and extremes: channel 0 of (0, 0) constant over
    every token (constant key groups), channel 1 of (0, 0) alternating 0 / TINY (a key step below fp16's subnormals),
    every third token of (b - 1, h - 1) constant (constant value groups), one outlier in every fifth token, values
    0 / TINY in every fourth token of (0, h - 1), and channels 2, 3 of (0, 0) halfway between two bf16 values."""
    g = torch.Generator().manual_seed(seed * 1000 + n)
    k, v = torch.randn(2, b, h, 1, d, generator=g) * 2 + torch.randn(2, 1, 1, 1, d, generator=g) * 3
    if n % 4 == 2:  # a token of values 0 / TINY: its value groups' steps round to 0 in fp16 too
        v[0, -1, 0] = 0
        v[0, -1, 0, ::2] = TINY
    for x in (k, v):
        if n % 3 == 0:
            x[-1, -1, 0] = -1.25
        if n % 5 == 1:
            x[-1, 0, 0, 2 + n % (d - 2)] = 3e4 * (-1) ** n
        x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.75, TINY * (n % 2)
        x[0, 0, 0, 2], x[0, 0, 0, 3] = 1 + 2**-8, -1 - 3 * 2**-8  # fp32 halfway between bf16 values: to even
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def flushed_after(n, group, residual):
    return max(0, n - residual) // group * group


CASES = [  # bits, group, residual, b, h, d, dtype of the tokens, dtype of the ring, steps
    (2, 4, 1, 2, 2, 16, torch.float16, torch.float16, 14),
    (4, 8, 3, 1, 3, 16, torch.bfloat16, torch.bfloat16, 22),
    (4, 4, 5, 3, 1, 16, torch.float32, torch.bfloat16, 16),  # fp32 tokens into a bf16 ring: rounded as torch's .to
    (2, 32, 2, 1, 2, 64, torch.bfloat16, torch.bfloat16, 70),
    (3, 16, 1, 2, 1, 64, torch.float16, torch.float16, 36),  # 10 codes a word: the last word of a group part filled
    (8, 16, 2, 1, 1, 16, torch.float32, torch.float32, 36),
    (4, 1, 1, 1, 2, 16, torch.float16, torch.float16, 4),  # groups of one token / one channel
]


@needs_backend
@pytest.mark.parametrize("bits, group, residual, b, h, d, dtype, ring_dtype, steps", CASES)
def test_kernels_kivi_write_matches_the_torch_path(bits, group, residual, b, h, d, dtype, ring_dtype, steps):
    mine, ref = garbage_state(b, h, d, bits, group, residual, steps, ring_dtype, seed=bits * 100 + group)
    w = residual + group
    for n in range(steps):
        k, v = step_tokens(b, h, d, n, dtype, seed=group)
        slot = torch.tensor([n % w], device=DEVICE)
        flushed = torch.tensor([flushed_after(n + 1, group, residual)], device=DEVICE)
        kw.kivi_write(k, v, *mine, slot, flushed, bits, group)
        kw.kivi_write_ref(k, v, *ref, slot, flushed, bits, group)
        for name, x, y in zip(("ring_k", "ring_v", "k_store", "v_store"), mine, ref):
            for part, (xp, yp) in zip(("codes", "scale", "mn") if isinstance(x, PackedKV) else ("",),
                                      zip(x, y) if isinstance(x, PackedKV) else ((x, y),)):
                assert torch.equal(xp, yp), f"step {n}: {name} {part} differs at {(xp != yp).nonzero()[:4].tolist()}"
    assert flushed_after(steps, group, residual) >= 2 * group  # several groups flushed during the steps
    # the extremes were reached: a stored key scale of 1 (constant / TINY channels) and an outlier's wide step
    ks = ref[2].scale[0, 0, :flushed_after(steps, group, residual) // group]
    assert (ks[:, 0] == 1).all() and (ks[:, 1] == 1).all()
    assert ref[2].scale.float().max() > 50 or group == 1


def prefill_tokens(b, h, t, d, dtype, seed):
    """k, v [B, H, t, D]: random with per-channel offsets, and extremes: channel 0 of (0, 0) constant (constant key
    groups), channel 1 of (0, 0) alternating 0 / TINY (a key step below fp16's subnormals), token 3 of (b - 1, h - 1)
    constant (constant value groups), an outlier in every seventh token."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, b, h, t, d, generator=g) * 2 + torch.randn(2, 1, 1, 1, d, generator=g) * 3
    for x in (k, v):
        x[0, 0, :, 0], x[0, 0, :, 1] = 0.75, TINY * (torch.arange(t) % 2)
        x[-1, -1, 3] = -1.25
        x[-1, 0, ::7, 5] = 3e4
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype)


PREFILL_CASES = [  # bits, group, residual, b, h, d, t, dtype, k a transposed view of [B, t, H, D]
    (2, 8, 1, 2, 2, 16, 29, torch.float16, False),
    (3, 16, 19, 1, 3, 64, 70, torch.bfloat16, True),  # residual G + 3; 10 codes a word
    (4, 32, 5, 2, 2, 64, 100, torch.float32, True),
    (8, 8, 11, 1, 2, 32, 45, torch.bfloat16, False),
    (4, 16, 16, 1, 2, 16, 50, torch.float16, True),
]


@needs_backend
@pytest.mark.parametrize("bits, group, residual, b, h, d, t, dtype, transposed", PREFILL_CASES)
def test_kernels_kivi_prefill_write_matches_the_torch_path(bits, group, residual, b, h, d, t, dtype, transposed):
    """A prefill's complete groups (n0 = G * floor((t - R) / G) of t tokens) into stores of garbage: codes, scales and
    minima equal quantize_keys / quantize_values' bit for bit, the rows past them untouched."""
    _, (_, _, k_store, v_store) = garbage_state(b, h, d, bits, group, residual, t, torch.float16, seed=bits + group)
    ref = [PackedKV(*(p.clone() for p in x)) for x in (k_store, v_store)]
    k, v = prefill_tokens(b, h, t, d, dtype, seed=group)
    if transposed:  # D contiguous, tokens H * D apart
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        assert not k.is_contiguous()
    n0 = max(0, t - residual) // group * group
    assert n0 >= 2 * group and n0 % group == 0 and t % group
    kw.kivi_prefill_write(k[:, :, :n0], v[:, :, :n0], k_store, v_store, bits, group)
    kw.kivi_prefill_write_ref(k[:, :, :n0], v[:, :, :n0], *ref, bits, group)
    for name, x, y in zip(("k_store", "v_store"), (k_store, v_store), ref):
        for part, xp, yp in zip(("codes", "scale", "mn"), x, y):
            assert torch.equal(xp, yp), f"{name} {part} differs at {(xp != yp).nonzero()[:4].tolist()}"
    ks = k_store.scale[0, 0, :n0 // group]
    assert (ks[:, 0] == 1).all() and (ks[:, 1] == 1).all()  # constant and TINY channels: scale 1
    assert (v_store.scale[-1, -1, 3] == 1).all() and k_store.scale.float().max() > 50


@needs_backend
@pytest.mark.parametrize("bits, group, residual, dtype, prefill", [(2, 4, 1, torch.float16, 7),
                                                                    (4, 8, 3, torch.bfloat16, 30)])
def test_kernels_static_kivi_cache_kernel_write_matches_its_torch_write(bits, group, residual, dtype, prefill):
    """StaticKiviCache with the write kernels forced on against them forced off: a prefill (its complete groups: 4,
    24 tokens) then decode steps at the positions prepare gives, the ring and the stores of every layer equal."""
    b, h, d, max_len = 2, 2, 16, 40
    caches = [StaticKiviCache(2, b, h, d, max_len, dtype, DEVICE, bits, group, residual) for _ in range(2)]
    for cache, kernel in zip(caches, (True, False)):
        cache.write_kernel = kernel
        g = torch.Generator().manual_seed(1)
        for pos in [torch.arange(prefill)] + [torch.tensor([p]) for p in range(prefill, max_len)]:
            cache.prepare(pos.to(DEVICE))
            for layer in range(2):
                k, v = (torch.randn(b, h, len(pos), d, generator=g).to(DEVICE, dtype) for _ in "kv")
                cache.write(layer, k, v, pos.to(DEVICE))
    mine, ref = caches
    for x, y in zip((mine.ring_k, mine.ring_v, *mine.k, *mine.v), (ref.ring_k, ref.ring_v, *ref.k, *ref.v)):
        assert torch.equal(x, y)


@needs_backend
@pytest.mark.parametrize("bits, group, residual, dtype", [(2, 4, 1, torch.float16), (4, 8, 3, torch.bfloat16)])
def test_kernels_static_decoder_logits_with_the_kernel_write(monkeypatch, bits, group, residual, dtype):
    """A tiny GQA Llama (6 query heads on 2 KV heads of 16) with KIVI's cache: the prefill of every layer runs the
    prefill kernel and the write kernel (its newest token, the pending group), every decode step the write kernel,
    and the logits are the torch write's exactly (the same codes in the same stores)."""
    model = tiny_model("llama", dtype=dtype)
    tquant.quantize(model, "kivi", kv_bits=bits, group_size=group, residual=residual)
    model, ids = model.to(DEVICE), token_batch(2, 22, seed=3).to(DEVICE)
    calls = []
    for name in ("kivi_write", "kivi_prefill_write"):
        monkeypatch.setattr(kw, name, lambda *a, kernel=getattr(kw, name), name=name: calls.append(name) or kernel(*a))
    logits = {}
    for write_kernel in (True, False):
        dec = StaticDecoder(model, batch=2, max_len=32, graphs=False, fused=False)
        dec.cache.kernel, dec.cache.write_kernel = False, write_kernel
        out = [dec.prefill(ids[:, :9])] + [dec.step(ids[:, t]).clone() for t in range(9, ids.shape[1])]
        logits[write_kernel] = torch.stack(out, dim=1)
        assert calls == ((["kivi_prefill_write", "kivi_write"] * 2 + ["kivi_write"] * 2 * (ids.shape[1] - 9))
                         if write_kernel else [])
        calls.clear()
    assert torch.equal(logits[True], logits[False])


@needs_backend
def test_kernels_kivi_write_bad_input():
    (rk, rv, ks, vs), _ = garbage_state(1, 2, 16, 4, 4, 1, 8, torch.float16, seed=0)
    k = torch.randn(1, 2, 1, 16).to(DEVICE, torch.float16)
    slot, flushed = torch.tensor([0], device=DEVICE), torch.tensor([0], device=DEVICE)
    args = dict(k=k, v=k, ring_k=rk, ring_v=rv, k_store=ks, v_store=vs, slot=slot, flushed=flushed, bits=4, group=4)
    bad = [({"bits": 5}, "bits=5"), ({"k": k.expand(1, 2, 2, 16)}, "k must be one decode token"),
           ({"v": k.int()}, "v must be one decode token"), ({"v": k[:, :1]}, "one shape"),
           ({"group": 3}, "group=3"), ({"group": 32}, "group=32"),
           ({"k": torch.randn(1, 2, 1, 24).to(DEVICE), "v": torch.randn(1, 2, 1, 24).to(DEVICE)}, "head size 24"),
           ({"ring_v": rv.float()}, "ring_v must be"), ({"ring_k": rk[:, :, :3]}, "ring_k must be"),
           ({"k_store": PackedKV(ks.codes[:, :, :-1], ks.scale, ks.mn)}, "k_store must be"),
           ({"v_store": PackedKV(vs.codes, vs.scale.float(), vs.mn)}, "v_store must be"),
           ({"k_store": vs}, "k_store must be"), ({"slot": slot.int()}, "slot must be int64"),
           ({"flushed": flushed.expand(2)}, "flushed must be int64")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            kw.kivi_write(**{**args, **change})
    prefill = dict(k=k.expand(1, 2, 8, 16), v=k.expand(1, 2, 8, 16), k_store=ks, v_store=vs, bits=4, group=4)
    for change, message in [({"k": k.expand(1, 2, 6, 16)}, "k must be complete groups"), ({"bits": 1}, "bits=1"),
                            ({"k": k.expand(1, 2, 16, 16), "v": k.expand(1, 2, 16, 16)}, "must fit the store's NG=3"),
                            ({"v_store": ks}, "v_store must be")]:
        with pytest.raises(ValueError, match=message):
            kw.kivi_prefill_write(**{**prefill, **change})


gpu_only = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu_only
@pytest.mark.parametrize("bits, group, dtype", [(2, 32, torch.float16), (3, 32, torch.bfloat16),
                                                (4, 128, torch.float16), (8, 64, torch.bfloat16)])
def test_kernels_kivi_write_on_the_gpu_in_a_cuda_graph(bits, group, dtype):
    """On the GPU at Llama-3-8B's KV heads (8 of 128, batch 2, residual 16): the write captured once in a CUDA graph
    and replayed at successive positions (slot and flushed updated in place, as the decoder's prepare does) leaves
    ring and stores equal to the torch path's, step by step past several flushes."""
    b, h, d, residual, steps = 2, 8, 128, 16, 3 * group + 20
    mine, ref = garbage_state(b, h, d, bits, group, residual, steps, dtype, seed=bits)
    k, v = (torch.empty(b, h, 1, d, device=DEVICE, dtype=dtype) for _ in "kv")
    slot, flushed = (torch.zeros(1, dtype=torch.long, device=DEVICE) for _ in range(2))
    kw.kivi_write(k, v, *[x.clone() if not isinstance(x, PackedKV) else PackedKV(*(p.clone() for p in x))
                          for x in mine], slot, flushed, bits, group)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kw.kivi_write(k, v, *mine, slot, flushed, bits, group)
    for n in range(steps):
        new_k, new_v = step_tokens(b, h, d, n, dtype, seed=7)
        k.copy_(new_k)
        v.copy_(new_v)
        slot.fill_(n % (residual + group))
        flushed.fill_(flushed_after(n + 1, group, residual))
        graph.replay()
        kw.kivi_write_ref(new_k, new_v, *ref, slot.clone(), flushed.clone(), bits, group)
        for x, y in zip((mine[0], mine[1], *mine[2], *mine[3]), (ref[0], ref[1], *ref[2], *ref[3])):
            assert torch.equal(x, y), f"step {n}"
