"""The fp16 range of a quantized static cache's scales and minima under tquant.StaticDecoder (issue 26).

A bf16 / fp32 model's KIVI or qoq_kv4 cache keeps each group's scale and minimum in fp16 (tquant.kv.uniform_format):
a key or value group past 65504 would be stored as inf and decode to NaN. An eager torch step refuses it as the
group is quantized (a host check); a captured CUDA-graph step cannot sync, so the write skips that check
(uniform_format.capturing) and the decoder's check_range of what the cache stored raises after the prefill, at the
end of generate and every CHECK_EVERY steps. On the CPU the captured step's code path is reached by making
`capturing` say yes (what it says inside torch.cuda.graph); the real capture runs on a GPU only.
"""
import pytest
import torch

import tquant
from tests.tiny_models import tiny_model, token_batch
from tquant import decode
from tquant.decode import StaticDecoder
from tquant.kv import uniform_format

HUGE = 1e7  # k_proj / v_proj of layer 1 scaled by it: keys / values ~1e6, far past fp16's 65504
KV = {"kivi": dict(kv_bits=2, group_size=4, residual=3), "qoq_kv4": dict(smooth_alpha=0)}


def overflowing(kv: str, part: str, dtype, device="cpu"):
    """A tiny Llama in dtype with the KV method kv whose layer-1 keys or values (part) pass fp16's range."""
    model = tiny_model("llama", dtype=dtype)
    tquant.quantize(model, kv, **KV[kv])
    with torch.no_grad():
        getattr(model.model.layers[1].self_attn, "k_proj" if part == "keys" else "v_proj").weight.mul_(HUGE)
    return model.to(device)


def deferred_message(kv, part, dtype):
    where = (r"tokens \d+\.\.\d+, channel \d+" if part == "keys" else r"token \d+, channels \d+\.\.\d+") \
        if kv == "kivi" else r"token \d+"
    return (rf"fp16 \(at most 65504\), and a group of the {dtype} {part} \(layer 1, sequence \d, KV head \d, "
            rf"{where}\) (has a minimum below -65504|spans \[.*, above .*\]), past it: keep this model's KV cache")


@pytest.mark.parametrize("kv", ["kivi", "qoq_kv4"])
@pytest.mark.parametrize("part", ["keys", "values"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_captured_step_path_raises_after_generate(monkeypatch, kv, part, dtype):
    """The write's host check off (as in a capture): generate stores inf parameters and raises at its end, naming
    the keys or values, the dtype, the layer and group, and the range; a prompt of 2 tokens flushes no KIVI group,
    so the groups past the range are flushed by the decode steps."""
    model = overflowing(kv, part, dtype)
    monkeypatch.setattr(uniform_format, "capturing", lambda x: True)
    dec = StaticDecoder(model, batch=2, max_len=16, graphs=False, fused=False)
    with pytest.raises(ValueError, match=deferred_message(kv, part, dtype)):
        dec.generate(token_batch(2, 2, seed=3), 12)
    stored = dec.cache.k if part == "keys" else dec.cache.v
    assert not (stored.scale[1].isfinite() & stored.mn[1].isfinite()).all()  # inf was stored, as in a graph


def test_steps_by_hand_are_checked_every_check_every_steps(monkeypatch):
    model = overflowing("kivi", "keys", torch.float32)
    monkeypatch.setattr(uniform_format, "capturing", lambda x: True)
    monkeypatch.setattr(decode, "CHECK_EVERY", 8)
    dec = StaticDecoder(model, batch=1, max_len=32, graphs=False, fused=False)
    ids = token_batch(1, 10, seed=4)
    dec.prefill(ids[:, :2])
    for t in range(2, 7):  # up to 7 tokens: flushed(7) = 4, but no check before 8 tokens
        dec.step(ids[:, t])
    with pytest.raises(ValueError, match=deferred_message("kivi", "keys", torch.float32)):
        dec.step(ids[:, 7])


@pytest.mark.parametrize("kv", ["kivi", "qoq_kv4"])
def test_an_eager_step_refuses_the_group_as_it_is_quantized(kv):
    """Outside a capture the write checks at once, with the range of the tensor it quantized."""
    model = overflowing(kv, "keys", torch.bfloat16)
    dec = StaticDecoder(model, batch=2, max_len=16, graphs=False, fused=False)
    with pytest.raises(ValueError, match=r"fp16 \(at most 65504\), and a group of the torch.bfloat16 keys spans "
                                         r"\[-\d.*e\+0\d, \d.*e\+0\d\], past it"):
        dec.prefill(token_batch(2, 2, seed=3))


def test_fp16_and_in_range_caches_pass():
    """fp16 parameters hold every fp16 group, so an fp16 cache is not checked; a bf16 cache within range passes
    every check (and decodes finite logits)."""
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_model("llama", dtype=dtype)
        tquant.quantize(model, "kivi", **KV["kivi"])
        dec = StaticDecoder(model, batch=2, max_len=16, graphs=False, fused=False)
        dec.generate(token_batch(2, 2, seed=3), 12)
        assert dec.cache.k.scale.isfinite().all() and dec.cache.v.mn.isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kv", ["kivi", "qoq_kv4"])
@pytest.mark.parametrize("part", ["keys", "values"])
def test_kernels_a_captured_bf16_step_raises(monkeypatch, kv, part):
    """On the GPU: a bf16 model's quantized cache is captured (no host sync in its write) and replayed: in range,
    generation gives the eager decoder's tokens; with the layer-1 k_proj / v_proj weight scaled in place after the
    capture (so the prefill and the capture's warm-up stay in range), the replayed steps store inf parameters and
    the step that runs check_range raises."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    tquant.quantize(model, kv, **KV[kv])
    model = model.cuda()
    ids = token_batch(2, 20, seed=9).cuda()
    outs = [StaticDecoder(model, 2, 32, graphs=g).generate(ids[:, :4], 20) for g in (False, True)]
    assert torch.equal(*outs)
    monkeypatch.setattr(decode, "CHECK_EVERY", 16)
    dec = StaticDecoder(model, 2, 32, graphs=True)
    dec.prefill(ids[:, :2])
    dec.step(ids[:, 2])
    assert dec._graph is not None
    with torch.no_grad():
        getattr(model.model.layers[1].self_attn, "k_proj" if part == "keys" else "v_proj").weight.mul_(HUGE)
    for t in range(3, 15):
        dec.step(ids[:, t])  # replays, unchecked until 16 tokens
    with pytest.raises(ValueError, match=deferred_message(kv, part, torch.bfloat16)):
        dec.step(ids[:, 15])
