"""Decode attention over a quantized cache: the Triton kernel against its torch reference (fp32 through the
format's decoders) on fresh random caches: keys per channel (KIVI) or per token (QoQ's KV4), GQA, ragged
(left-padded) batches, empty packed store or residual, every bit width, several group sizes and splits; and the
input checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.kernel_device import DEVICE, decode_both_paths, needs_backend

from tquant.kv import attention
from tquant.kv import uniform_format as kv_quant
from tquant.kv.attention import kivi_decode_attention, kivi_decode_attention_ref
from tquant.kv.split_kv import INTERPRETER_CONFIG

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_cache(b, hkv, d, tq, tr, bits, group, dtype, seed, key_axis="channel"):
    """A packed store of tq tokens quantized from K/V-like data (per-channel offsets) and a residual of tr."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, tq + tr, d, generator=g) * 2 + torch.randn(d, generator=g) * 3
    v = torch.randn(b, hkv, tq + tr, d, generator=g)
    pk = kv_quant.key_format(key_axis)[0](k[..., :tq, :], bits, group)
    pv = kv_quant.quantize_values(v[..., :tq, :], bits, group)
    move = lambda p: kv_quant.PackedKV(*(t.to(DEVICE) for t in p))  # noqa: E731
    return move(pk), move(pv), k[..., tq:, :].to(DEVICE, dtype), v[..., tq:, :].to(DEVICE, dtype)


def grown(t: torch.Tensor, spare: int) -> torch.Tensor:
    """t as the kernel sees a growing store's part (tquant.kv.growing): the view of the first rows of a buffer
    [B, H, rows + spare, W] whose spare rows hold garbage (NaN or random codes) that must not be read."""
    b, h, rows, w = t.shape
    buf = (torch.full((b, h, rows + spare, w), float("nan"), dtype=t.dtype, device=t.device) if t.is_floating_point()
           else torch.randint(-2**31, 2**31 - 1, (b, h, rows + spare, w), dtype=t.dtype, device=t.device))
    buf[:, :, :rows] = t
    return buf.narrow(2, 0, rows)


@needs_backend
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), rep=st.sampled_from([1, 3, 4]), d=st.sampled_from([16, 32, 64]),
       bits=st.sampled_from(kv_quant.KV_BITS), group=st.sampled_from([8, 16]), groups=st.integers(0, 4),
       tr=st.integers(0, 21), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       ragged=st.booleans(), key_axis=st.sampled_from(["channel", "token"]), extra=st.integers(0, 7),
       spare=st.sampled_from([0, 0, 5]), seed=st.integers(0, 2**31 - 1))
def test_kernels_kivi_attention_matches_reference(b, hkv, rep, d, bits, group, groups, tr, dtype, ragged, key_axis,
                                                  extra, spare, seed):
    """spare > 0: every part is a view of a larger buffer (a growing store's), read in place."""
    tq = groups * group + (extra if key_axis == "token" else 0)  # per-token stores hold any number of tokens
    if tq + tr == 0:
        tr = 1
    pk, pv, rk, rv = random_cache(b, hkv, d, tq, tr, bits, group, dtype, seed, key_axis)
    q = torch.randn(b, hkv * rep, d, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    start = None
    if ragged:  # left padding: sequence i starts at start[i] (at least one token left)
        start = torch.randint(0, tq + tr, (b,), generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, bits=bits, group=group, sm_scale=d**-0.5, start=start,
                                    key_axis=key_axis)
    if spare:
        pk, pv = (kv_quant.PackedKV(*(grown(t, spare) for t in p)) for p in (pk, pv))
        rk, rv = grown(rk, spare), grown(rv, spare)
    out = kivi_decode_attention(q, pk, pv, rk, rv, bits=bits, group=group, start=start, key_axis=key_axis)
    assert out.shape == q.shape and out.dtype == dtype and out.isfinite().all()
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], err


@needs_backend
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), rep=st.sampled_from([1, 4]), d=st.sampled_from([16, 64]), bits=st.sampled_from([4, 8]),
       tq=st.integers(1, 70), tr=st.integers(0, 5), ragged=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_kivi_attention_static_length(b, rep, d, bits, tq, tr, ragged, seed):
    """A static per-token store (QoQ's KV4, tquant.decode) allocated for tq tokens and filled up to length[b]:
    the kernel matches the reference with the unread tokens masked, and garbage past length changes nothing."""
    pk, pv, rk, rv = random_cache(b, 2, d, tq, tr, bits, d, torch.float16, seed, key_axis="token")
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(b, 2 * rep, d, generator=g).to(DEVICE, torch.float16)
    length = torch.randint(1, tq + 1, (b,), generator=g, dtype=torch.int32).to(DEVICE)
    start = torch.randint(0, 2, (b,), generator=g).to(DEVICE) * (length.long() - 1) if ragged else None
    args = dict(bits=bits, group=d, key_axis="token", start=start, length=length)
    out = kivi_decode_attention(q, pk, pv, rk, rv, **args)
    ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, sm_scale=d**-0.5, **args)
    assert out.isfinite().all()
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < TOL[torch.float16]
    unread = torch.arange(tq, device=DEVICE)[None, :] >= length[:, None].long()  # [B, tq]
    noisy = kv_quant.PackedKV(*(torch.where(unread[:, None, :, None], t.flip(2), t) for t in pk))
    torch.testing.assert_close(kivi_decode_attention(q, noisy, pv, rk, rv, **args), out, rtol=0, atol=0)
    one = dict(args, length=length[:1].expand(b))  # one length for every row, as a stride-0 view, and starts below
    if start is not None:  # it (a start past the length masks the whole row: no attention to compare)
        one["start"] = torch.minimum(start, length[:1].long() - 1)
    torch.testing.assert_close(kivi_decode_attention(q, pk, pv, rk, rv, **one),
                               kivi_decode_attention(q, pk, pv, rk, rv, **dict(one, length=one["length"].clone())),
                               rtol=0, atol=0)


@needs_backend
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), rep=st.sampled_from([1, 4]), d=st.sampled_from([16, 32]), bits=st.sampled_from([2, 4]),
       groups=st.integers(0, 4), tr=st.integers(1, 12), ragged=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_kivi_attention_ring_window(b, rep, d, bits, groups, tr, ragged, seed):
    """A static KIVI cache (tquant.decode): per-channel key groups filled up to length[b] and a ring window of tr
    slots holding positions length[b] ... newest[b] at slot p % tr. Kernel and reference equal attention over
    [the store's first length[b] tokens ; those window positions in order], and the unread slots change nothing."""
    group = 8
    tq = (groups + 1) * group  # one spare group, as the static cache allocates
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(0, groups + 1, (b,), generator=g, dtype=torch.int32) * group
    newest = length + torch.randint(0, tr, (b,), generator=g, dtype=torch.int32)  # 1 ... tr window tokens
    k = torch.randn(b, 2, tq + tr + 8, d, generator=g) * 2 + torch.randn(d, generator=g) * 3
    v = torch.randn(b, 2, tq + tr + 8, d, generator=g)
    pk, pv = kv_quant.quantize_keys(k[..., :tq, :], bits, group), kv_quant.quantize_values(v[..., :tq, :], bits, group)
    ring_k, ring_v = torch.randn(b, 2, tr, d, generator=g), torch.randn(b, 2, tr, d, generator=g)  # garbage
    for i in range(b):
        for p in range(int(length[i]), int(newest[i]) + 1):
            ring_k[i, :, p % tr], ring_v[i, :, p % tr] = k[i, :, p], v[i, :, p]
    q = torch.randn(b, 2 * rep, d, generator=g)
    start = (torch.randint(0, 2, (b,), generator=g) * newest).to(torch.int32) if ragged else None  # 0 or newest
    move = lambda t: t.to(DEVICE)  # noqa: E731
    args = dict(bits=bits, group=group, key_axis="channel", length=move(length), newest=move(newest),
                start=None if start is None else move(start))
    cache = (kv_quant.PackedKV(*map(move, pk)), kv_quant.PackedKV(*map(move, pv)), move(ring_k), move(ring_v))
    out = kivi_decode_attention(move(q), *cache, **args)
    ref = kivi_decode_attention_ref(move(q), *cache, sm_scale=d**-0.5, **args)
    assert out.isfinite().all()
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < TOL[torch.float32]
    for i in range(b):  # the same attention written out: store tokens < length, then the window in order
        n = int(length[i])
        keys = torch.cat([kv_quant.dequantize_keys(pk, bits, group)[i, :, :n], k[i, :, n:int(newest[i]) + 1]], 1)
        vals = torch.cat([kv_quant.dequantize_values(pv, bits, group)[i, :, :n], v[i, :, n:int(newest[i]) + 1]], 1)
        if start is not None:  # start is a position (0 or newest): positions before it are masked
            keys, vals = keys[:, int(start[i]):], vals[:, int(start[i]):]
        scores = torch.einsum("hrd,htd->hrt", q[i].view(2, rep, d), keys) * d**-0.5
        expected = torch.einsum("hrt,htd->hrd", scores.softmax(-1), vals).reshape(2 * rep, d)
        torch.testing.assert_close(ref[i].cpu(), expected, rtol=1e-4, atol=1e-5)


@needs_backend
def test_kernels_kivi_attention_masked_tokens_do_not_count():
    """Tokens before start[b] change nothing: the output equals that of the cache without them."""
    pk, pv, rk, rv = random_cache(1, 1, 32, 32, 5, 4, 16, torch.float32, seed=7)
    q = torch.randn(1, 2, 32).to(DEVICE)
    start = torch.tensor([16], device=DEVICE)
    out = kivi_decode_attention(q, pk, pv, rk, rv, bits=4, group=16, start=start)
    wpg = kv_quant.words_per_group(4, 16)  # the first key group: its code words and its parameter row
    pk2 = kv_quant.PackedKV(pk.codes[:, :, wpg:], pk.scale[:, :, 1:], pk.mn[:, :, 1:])
    pv2 = kv_quant.PackedKV(*(t[:, :, 16:, :] for t in pv))
    ref = kivi_decode_attention(q, pk2, pv2, rk, rv, bits=4, group=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@needs_backend
def test_kernels_kivi_attention_bad_input_raises():
    pk, pv, rk, rv = random_cache(1, 2, 32, 16, 3, 2, 16, torch.float16, seed=1)
    q = torch.randn(1, 4, 32).to(DEVICE, torch.float16)
    cases = {
        "query heads are not a multiple": dict(q=torch.randn(1, 3, 32).to(DEVICE, torch.float16)),
        "res_v must be in q's dtype|res_v shape": dict(res_v=rv.float()),
        "keys.codes shape": dict(packed_k=kv_quant.PackedKV(pk.codes[..., :16], pk.scale, pk.mn)),
        "kv_bits=5": dict(bits=5),
        "key_axis must be": dict(key_axis="head"),
        "keys.codes shape .* keys per token": dict(key_axis="token"),  # per-channel keys read as per-token ones
        "start must be an integer tensor": dict(start=torch.zeros(2, dtype=torch.int32, device=DEVICE)),
        "newest .a ring window. needs length": dict(newest=torch.zeros(1, dtype=torch.int32, device=DEVICE)),
    }
    for message, change in cases.items():
        args = dict(q=q, packed_k=pk, packed_v=pv, res_k=rk, res_v=rv, bits=2, group=16) | change
        with pytest.raises(ValueError, match=message):
            kivi_decode_attention(args.pop("q"), args.pop("packed_k"), args.pop("packed_v"), args.pop("res_k"),
                                  args.pop("res_v"), **args)


@needs_backend
@pytest.mark.parametrize("method, options", [
    ("kivi", dict(kv_bits=4, group_size=8, residual=8)),
    pytest.param("qoq_kv4", dict(smooth_alpha=0), marks=pytest.mark.slow),  # no window: each step's exact token
    # beside its skipped stored copy
    pytest.param("qoq_kv4", dict(smooth_alpha=0, prefill_with_quant=True), marks=pytest.mark.slow),  # no window:
    # every token read as stored
])
def test_kernels_kivi_decode_inside_the_model(monkeypatch, method, options):
    """A GQA Llama decoding through the kernel path (one-token steps read the packed cache in the kernel) gives
    the torch path's logits, with and without left padding."""
    import tquant
    from tests.tiny_models import tiny_model
    from tquant.kv import attention as kv_attention

    calls = []
    monkeypatch.setattr(kv_attention, "kivi_decode_attention",
                        lambda *a, **k: calls.append(1) or kivi_decode_attention(*a, **k))

    model = tiny_model("llama").to(DEVICE)  # head size 16, 6 query heads on 2 KV heads
    tquant.quantize(model, method, **options)
    ids = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for kernel_logits, torch_logits, cache, _ in decode_both_paths(model, ids, 20, calls):
        assert cache.layers[0].quantized_length() > 0
        # fp32 summation order, and the rare code it flips in a later layer's cache; a token missed or counted
        # twice costs about 1e-2
        err = ((kernel_logits - torch_logits).norm() / torch_logits.norm()).item()
        assert err < 1e-4, err


def test_kernels_kivi_attention_reads_growing_views_in_place():
    """by_heads hands the kernel a growing store's view itself (no per-step copy of the store) with its heads'
    stride, and copies only a part whose rows are not contiguous."""
    from tquant.kv.attention import by_heads

    part = grown(torch.randn(2, 3, 5, 4), spare=11)
    same, stride = by_heads(part)
    assert same is part and stride == 16 * 4
    one_head = grown(torch.randn(3, 1, 5, 4), spare=2)
    assert by_heads(one_head) == (one_head, 7 * 4)
    transposed = torch.randn(2, 3, 4, 5).transpose(2, 3)
    copy, stride = by_heads(transposed)
    assert copy is not transposed and copy.is_contiguous() and stride == 20 and torch.equal(copy, transposed)


@needs_backend
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), rep=st.sampled_from([1, 2, 3, 4, 8]),
       d=st.sampled_from([16, 32, 64]), bits=st.sampled_from([2, 4, 8]),
       key_axis=st.sampled_from(["token", "token", "channel"]), real_rows=st.sampled_from([True, True, False]),
       tq=st.integers(1, 75), tr=st.integers(0, 6), mode=st.sampled_from(["plain", "start", "length", "ring"]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), key_exp=st.integers(-3, 3),
       value_exp=st.sampled_from([-3, 0, 3, None]), seed=st.integers(0, 2**31 - 1))
def test_kernels_folded_attention_matches_reference(b, hkv, rep, d, bits, key_axis, real_rows, tq, tr, mode, dtype,
                                                    key_exp, value_exp, seed):
    """Stores with one (scale, mn) a token and head (group == D: QoQ's KV4 keys and values, KIVI's values), which the
    kernel reads with the parameters folded out of the element loop (FOLD_K / FOLD_V), against the fp32 reference:
    odd lengths (keys per channel: whole groups), left padding, a static store read up to length[b], a ring window,
    every dtype and 2 / 4 / 8 bits; keys scaled by 10^key_exp (q by its inverse, so the scores stay moderate) and
    values by 10^value_exp, or (None) each token's values by its own 10^U(-3, 3), so that the value scales of one
    tile span 6 decades (fp16's weights are normalized by the share's largest scale). Keys per token at rep 1 / 2 /
    3 / 4 / 8 take v6's softmax on the real rows (REAL_ROWS = 1 / 2 / 4 / 4 / 8), or (real_rows False) v5's on 16
    padded rows, forced through the launcher's config."""
    if key_axis == "channel":
        tq = -(-tq // d) * d
    if mode == "ring":
        tr = max(tr, 1)
    if mode in ("plain", "start") and tq + tr == 0:
        tr = 1
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, hkv, tq + tr, d, generator=g) * 2 + torch.randn(d, generator=g) * 3) * 10.0**key_exp
    v = torch.randn(b, hkv, tq + tr, d, generator=g)
    v = v * (10.0**value_exp if value_exp is not None else
             10.0 ** (torch.rand(b, hkv, tq + tr, 1, generator=g) * 6 - 3))
    pk = kv_quant.key_format(key_axis)[0](k[..., :tq, :], bits, d)
    pv = kv_quant.quantize_values(v[..., :tq, :], bits, d)
    q = torch.randn(b, hkv * rep, d, generator=g) * 10.0**-key_exp
    move = lambda p: kv_quant.PackedKV(*(t.to(DEVICE) for t in p))  # noqa: E731
    cache = (move(pk), move(pv), k[..., tq:, :].to(DEVICE, dtype), v[..., tq:, :].to(DEVICE, dtype))
    args = dict(bits=bits, group=d, key_axis=key_axis)
    if mode == "start":  # left padding: at least one token left
        args["start"] = torch.randint(0, tq + tr, (b,), generator=g).to(DEVICE)
    elif mode in ("length", "ring"):
        step = d if key_axis == "channel" else 1  # a per-channel store is filled a group at a time
        lo = 0 if tr else 1
        length = torch.randint(lo, tq // step + 1, (b,), generator=g, dtype=torch.int32) * step
        args["length"] = length.to(DEVICE)
        if mode == "ring":  # window slots hold positions length ... newest
            args["newest"] = (length + torch.randint(0, tr, (b,), generator=g, dtype=torch.int32)).to(DEVICE)
        elif tr == 0:  # a ragged start below length
            args["start"] = (torch.rand(b, generator=g) * length).long().to(DEVICE)
    q = q.to(DEVICE, dtype)
    ref = kivi_decode_attention_ref(q, *cache, sm_scale=d**-0.5, **args)
    if real_rows:
        out = kivi_decode_attention(q, *cache, **args)
    else:  # v5 forced (the interpreter's config, REAL_ROWS off)
        out = attention.launch(dict(INTERPRETER_CONFIG, REAL_ROWS=False), q, *cache, bits, d, d**-0.5,
                               args.get("start"), key_axis, args.get("length"), args.get("newest"))
    assert out.shape == q.shape and out.dtype == dtype and out.isfinite().all()
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("rep", [1, 2, 3, 4, 8])
def test_kernels_real_rows_match_padded_rows(rep):
    """v6 (the online softmax on the real rows, transposed dots) and v5 (16 padded rows) on one QoQ KV4 store in
    fp16, left-padded, with a window: the same attention up to fp32 rounding (the same fp16 operands; only the
    order of the fp32 sums differs), both at the reference."""
    d, tq = 32, 41
    pk, pv, rk, rv = random_cache(2, 2, d, tq, 3, 4, d, torch.float16, seed=rep, key_axis="token")
    q = torch.randn(2, 2 * rep, d, generator=torch.Generator().manual_seed(rep)).to(DEVICE, torch.float16)
    start = torch.tensor([0, 7], device=DEVICE)
    outs = [attention.launch(dict(INTERPRETER_CONFIG, REAL_ROWS=real), q, pk, pv, rk, rv, 4, d, d**-0.5, start,
                             "token").float() for real in (True, False)]
    ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, bits=4, group=d, sm_scale=d**-0.5, start=start,
                                    key_axis="token").float()
    assert (outs[0] - outs[1]).abs().max() <= 2e-3 * ref.abs().max()
    for out in outs:
        assert ((out - ref).norm() / ref.norm()).item() < TOL[torch.float16]


def test_kernels_kivi_attention_folds_exactly_where_the_layout_allows(monkeypatch):
    """The launcher folds a part's parameters out of the element loop (FOLD_K / FOLD_V) exactly where they are one
    (scale, mn) a token and head and the codes fill whole words: group == D at 2 / 4 / 8 bits, keys per token
    (values always); never at 3 bits (gathered words), group < D, keys per channel, float or fp8 stores."""
    from tquant.kv import attention

    seen, rows = [], []

    class Recorder:
        def __init__(self, record):
            self.record = record

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.record and (seen.append((kwargs["FOLD_K"], kwargs["FOLD_V"])),
                                                            rows.append(kwargs["REAL_ROWS"]))

    monkeypatch.setattr(attention, "_kv_attention_kernel", Recorder(True))
    monkeypatch.setattr(attention, "combine_kernel", Recorder(False))
    monkeypatch.setattr(attention, "tune", lambda name, key, configs, run, device: configs[0])
    d = 32
    for key_axis in ("token", "channel"):
        for bits in (2, 3, 4, 8):
            for group in (8, 16, d):
                pk, pv, rk, rv = random_cache(1, 2, d, 2 * d, 1, bits, group, torch.float16, 0, key_axis)
                kivi_decode_attention(torch.randn(1, 4, d).to(DEVICE, torch.float16), pk, pv, rk, rv, bits=bits,
                                      group=group, key_axis=key_axis)
                whole = group == d and bits != 3
                assert seen.pop() == (whole and key_axis == "token", whole), (key_axis, bits, group)
                assert rows.pop() == (2 if whole and key_axis == "token" else 0)  # v6 where both parts fold
    q, kv = torch.randn(1, 4, d).to(DEVICE), torch.randn(1, 2, 8, d).to(DEVICE)
    attention.float_decode_attention(q, kv, kv, length=torch.tensor([8], device=DEVICE))
    e4m3 = kv.to(torch.float8_e4m3fn)
    one = torch.ones(2, device=DEVICE)
    attention.fp8_decode_attention(q, e4m3, e4m3, one, one, kv[:, :, :1], kv[:, :, :1])
    assert seen == [(False, False), (False, False)]
    assert attention.folded("token", 4, 128, 128) == (True, True)  # QoQ's KV4 at Llama's head size
    # v6's real rows: rep rounded up to a power of two, both parts folded, at most 8 of the 16 columns
    assert [attention.real_rows(True, rep) for rep in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 0, 0]
    assert attention.real_rows(False, 4) == 0
