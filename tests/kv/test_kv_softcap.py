"""Attention-logit soft-capping (Gemma-2) with a quantized KV cache: softcap_attention is transformers' eager
Gemma-2 attention, and a KV-quantized Gemma-2 generates with its soft-capping applied (logits near the float
model's eager ones at 8 bits, far from what the same cache gives with the cap dropped)."""
import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

import tquant
from tquant.kv.cache import softcap_attention
from tests.kv.test_kv_cache import decoded_logits, rel
from tests.tiny_models import tiny_model, token_batch


@pytest.mark.parametrize("q_len, mask_kind", [(1, "none"), (5, "none"), (5, "bool"), (5, "additive")])
def test_softcap_attention_is_gemma2s_eager_attention(q_len, mask_kind):
    g = torch.Generator().manual_seed(q_len)
    b, hq, hkv, t, d = 2, 4, 2, 9, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) * 3 for h, n in ((hq, q_len), (hkv, t), (hkv, t)))
    causal = torch.ones(q_len, t, dtype=torch.bool).tril(t - q_len)
    allowed = causal.clone()
    allowed[:, :2] = False  # as a left-padded row would
    additive = torch.zeros(b, 1, q_len, t).masked_fill(~allowed, float("-inf"))
    mask = {"none": None, "bool": allowed.expand(b, 1, q_len, t), "additive": additive}[mask_kind]

    class Attn(torch.nn.Module):
        num_key_value_groups = hq // hkv

    ours, _ = softcap_attention(Attn().eval(), q, k, v, mask, scaling=0.25, softcap=5.0)
    ref_mask = {"none": torch.zeros(q_len, t).masked_fill(~causal, float("-inf")), "bool": additive,
                "additive": additive}[mask_kind]
    ref, _ = eager_attention_forward(Attn().eval(), q, k, v, ref_mask, scaling=0.25, softcap=5.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    plain, _ = softcap_attention(Attn().eval(), q, k, v, mask, scaling=0.25, softcap=1e9)
    assert (plain - ours).abs().max() > 1e-2  # the cap changes the result on these scores


@pytest.mark.parametrize("method, options", [("kivi", dict(kv_bits=8, group_size=8, residual=4)),
                                             ("qoq_kv4", dict(kv_bits=8))])
def test_kv_quantized_gemma2_keeps_its_softcapping(method, options):
    """Token-by-token decoding through the quantized cache (prefill 8, then 16 steps) stays near the float model's
    eager logits, and dropping the cap from the attention modules moves them far off: the cap is applied."""
    model = tiny_model("gemma2")
    cap = 2.0  # small enough to bind on the tiny model's scores
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = cap
    ids = token_batch(1, 24, seed=2)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        exact = model(ids).logits
    tquant.quantize(model, method, calib=token_batch(4, 32) if method == "qoq_kv4" else None, progress=False,
                    **options)
    assert model.generate(ids[:, :16], max_new_tokens=8, min_new_tokens=8, do_sample=False).shape == (1, 24)
    with torch.no_grad():
        capped = decoded_logits(model, ids, 8, tquant.kv_cache(model))
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = decoded_logits(model, ids, 8, tquant.kv_cache(model))
    assert rel(capped, exact) < 2e-2
    assert rel(uncapped, exact) > 5 * rel(capped, exact)
