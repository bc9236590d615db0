"""Every GPU launch config of the split-KV decode attention (tquant.kv.split_kv.configs: BLOCK_T 64 / 128, 4 / 8
warps, 1 / 2 pipeline stages, 1 to 8 splits of the store and the combine kernel merging them) on each store the kernel
reads: KIVI keys per channel and per token, KVQuant's (pre-RoPE keys rotated in the kernel through sin.approx /
cos.approx, or post-RoPE), a static float cache and the fp8 store (static length, or left padding); each against the
torch reference of the interpreter tests, at head size 128, 6 query heads a KV head, about 1000 stored tokens (not
a multiple of any BLOCK_T or split) and a few window tokens.

On a GPU the tuner picks one of these per shape, and TQUANT_AUTOTUNE=0 (the GPU test runs) takes the first: one
split below 512 tokens, BLOCK_T 64, 4 warps, 1 stage. The other tiles and the multi-split merge run only here: each
config is forced by patching the launcher's `tune`. GPU only (TRITON_INTERPRET=0): under the interpreter the 32
configs of these shapes would take many minutes; there the interpreter's one config runs (the other tests of
tests/kv)."""
import pytest
import torch
from triton.runtime.errors import OutOfResources

from tests.kernel_device import DEVICE
from tests.kv.test_kernels_fp8_kv_attention import fp8_cache
from tests.kv.test_kernels_kv_attention import TOL
from tests.kv.test_kernels_kv_attention import random_cache as kivi_cache
from tests.kv.test_kernels_kvquant_attention import random_cache as kvquant_cache

from tquant.kernels.runtime import next_power_of_2
from tquant.kv import attention, kvquant_attention, split_kv
from tquant.kv.attention import (float_decode_attention, fp8_decode_attention, fp8_decode_attention_ref,
                                 kivi_decode_attention, kivi_decode_attention_ref)
from tquant.kv.kvquant_attention import kvquant_decode_attention, kvquant_decode_attention_ref
from tquant.kv.split_kv import reference_attention

pytestmark = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                                reason="the GPU launch configs run on a CUDA GPU (TRITON_INTERPRET=0)")

B, HKV, REP, D, TR = 2, 2, 6, 128, 3


def gpu_configs(monkeypatch, tokens):
    """split_kv.configs' GPU candidates for a store of `tokens` (the interpreter's single config is not among them)."""
    monkeypatch.setattr(split_kv, "interpreter_on", lambda: False)
    configs = split_kv.configs(next_power_of_2(tokens))
    assert len({c["SPLITS"] for c in configs}) > 2 and {c["BLOCK_T"] for c in configs} == {64, 128}
    return configs


def each_config(monkeypatch, module, tokens, run):
    """(config, run()) with each GPU config forced as the one module's tune returns. A config that needs more shared
    memory than the GPU has (e.g. BLOCK_T 128, 2 stages at 3 bits in bf16 on an H100) is passed over, as the tuner
    passes over it (tquant.kernels.autotune_cache: a config the GPU cannot run is not timed), but never the default
    (first) config, which TQUANT_AUTOTUNE=0 and untuned shapes launch, and never most of them."""
    configs, skipped = gpu_configs(monkeypatch, tokens), []
    for i, config in enumerate(configs):
        monkeypatch.setattr(module, "tune", lambda *args, config=config: config)
        try:
            out = run()
        except OutOfResources:
            if i == 0:
                raise
            skipped.append(config)
            continue
        yield config, out
    assert len(skipped) <= len(configs) // 4, skipped


def check(out, ref, dtype, config):
    assert out.shape == ref.shape and out.dtype == dtype and out.isfinite().all(), config
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], (config, err)


def query(dtype, seed):
    return torch.randn(B, HKV * REP, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def left_padding(tokens, seed):
    return torch.randint(0, tokens // 3, (B,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("key_axis,bits,group,tq,dtype", [("channel", 4, 32, 992, torch.float16),
                                                          ("channel", 3, 32, 1024, torch.bfloat16),
                                                          ("token", 2, 32, 1001, torch.float16),
                                                          ("token", 4, D, 1001, torch.float16),
                                                          ("channel", 8, D, 1024, torch.bfloat16)])
def test_kivi_attention_every_gpu_config(monkeypatch, key_axis, bits, group, tq, dtype):
    """group == D: the parameters folded out of the element loop (QoQ's KV4 in fp16 through the inline-asm pair
    decode; KIVI's values in bf16 beside unfolded per-channel keys)."""
    pk, pv, rk, rv = kivi_cache(B, HKV, D, tq, TR, bits, group, dtype, seed=bits, key_axis=key_axis)
    q, start = query(dtype, bits + 1), left_padding(tq, bits + 2)
    args = dict(bits=bits, group=group, start=start, key_axis=key_axis)
    ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, sm_scale=D**-0.5, **args)
    for config, out in each_config(monkeypatch, attention, tq,
                                   lambda: kivi_decode_attention(q, pk, pv, rk, rv, **args)):
        check(out, ref, dtype, config)


def test_qoq_attention_padded_rows_every_gpu_config(monkeypatch):
    """QoQ's KV4 in fp16 with v5 forced (the softmax on 16 padded rows; the launcher picks v6, the real rows, at
    rep <= 8, which the test above runs at rep 6): the path that rep 9 ... 16 takes, under every config."""
    pk, pv, rk, rv = kivi_cache(B, HKV, D, 1001, TR, 4, D, torch.float16, seed=4, key_axis="token")
    q, start = query(torch.float16, 5), left_padding(1001, 6)
    args = dict(bits=4, group=D, start=start, key_axis="token")
    ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, sm_scale=D**-0.5, **args)
    launch = attention.launch
    monkeypatch.setattr(attention, "launch", lambda config, *rest: launch(dict(config, REAL_ROWS=False), *rest))
    for config, out in each_config(monkeypatch, attention, 1001,
                                   lambda: kivi_decode_attention(q, pk, pv, rk, rv, **args)):
        check(out, ref, torch.float16, config)


@pytest.mark.parametrize("pre_rope,bits,dtype,jump", [(True, 3, torch.float16, 0), (False, 4, torch.bfloat16, 0),
                                                      (True, 4, torch.float16, 777), (True, 2, torch.bfloat16, 777),
                                                      (False, 2, torch.float16, 0)])
def test_kvquant_attention_every_gpu_config(monkeypatch, pre_rope, bits, dtype, jump):
    """pre_rope: keys rotated in the kernel by the fast sin / cos (the GPU's branch: the cos / sin tables of t w and
    q rotated by each tile's first position; jump: positions jump by that much after token 500, so the tile
    holding it takes each token's own angle); a sink of 2 tokens, key and value outliers (fp16: written in by
    predicated prmt on half2 registers, whose two elements may lie in different tokens: 2 bits on the H100),
    codebooks looked up by prmt (2 and 4 bits: from whole words; 3: gathered)."""
    t = 1003
    cache = kvquant_cache(B, HKV, D, t, 2, bits, dtype, True, pre_rope, seed=bits, tr=1)
    if jump:
        cache["positions"] = cache["positions"] + (torch.arange(t, device=DEVICE) >= 500).int() * jump
    q, start = query(dtype, bits + 1), left_padding(t, bits + 2)
    ref = kvquant_decode_attention_ref(q, **cache, sm_scale=D**-0.5, start=start)
    for config, out in each_config(monkeypatch, kvquant_attention, t,
                                   lambda: kvquant_decode_attention(q, **cache, start=start)):
        check(out, ref, dtype, config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_attention_every_gpu_config(monkeypatch, dtype):
    """A static float cache of 1100 rows filled up to length[b] (large values past it, which would show)."""
    t = 1100
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(B, HKV, t, D, generator=g) * 2).to(DEVICE, dtype)
    v = torch.randn(B, HKV, t, D, generator=g).to(DEVICE, dtype)
    length = torch.tensor([700, 1100], dtype=torch.int32, device=DEVICE)
    unread = torch.arange(t, device=DEVICE)[None, :] >= length[:, None]
    k, v = (x.masked_fill(unread[:, None, :, None], 1e3) for x in (k, v))
    q = query(dtype, 4)
    ref = reference_attention(q, k.float(), v.float(), 0.3, unread=unread)
    for config, out in each_config(monkeypatch, attention, t,
                                   lambda: float_decode_attention(q, k, v, length=length, sm_scale=0.3)):
        check(out, ref, dtype, config)


@pytest.mark.parametrize("static,dtype", [(False, torch.float16), (True, torch.bfloat16), (True, torch.float32)])
def test_fp8_attention_every_gpu_config(monkeypatch, static, dtype):
    """The FP8 store (e4m3 keys and values times their KV head's scale, heads about 10^-2 and 10^2): left padding,
    or a static store read up to length[b] (the rows past it reversed: garbage that would show)."""
    tq = 1005
    k8, v8, ks, vs, rk, rv = fp8_cache(B, HKV, D, tq, TR, dtype, [-2, 2], seed=5)
    q = query(dtype, 6)
    args = dict(length=torch.tensor([600, tq], dtype=torch.int32, device=DEVICE)) if static else \
        dict(start=left_padding(tq, 7))
    ref = fp8_decode_attention_ref(q, k8, v8, ks, vs, rk, rv, sm_scale=D**-0.5, **args)
    if static:
        unread = torch.arange(tq, device=DEVICE)[None, :] >= args["length"][:, None].long()
        k8, v8 = (torch.where(unread[:, None, :, None], x.view(torch.uint8).flip(2), x.view(torch.uint8))
                  .view(x.dtype) for x in (k8, v8))
    for config, out in each_config(monkeypatch, attention, tq,
                                   lambda: fp8_decode_attention(q, k8, v8, ks, vs, rk, rv, **args)):
        check(out, ref, dtype, config)
