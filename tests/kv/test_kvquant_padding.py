"""KVQuant on a left-padded batch (issue 28). The cache keeps slots 0 .. sink - 1 of every row exact (the attention
sink); a left-padded row's first slots are padding, so its sink holds padding and its own first tokens are quantized
like any later token: the padded row decodes as it would alone with no sink. On the tiny Llama (decode teacher-forced,
not generate: greedy paths part and their logits stop being comparable; 1 % outliers, prompts starting with a BOS)
that costs the padded row 1-5 % more logit error than alone with sink 1 and 4-18 % with sink 4 (the sink's gain;
outliers=0: at most 14 %). Below the issue's 1.5x, and a per-row sink would need exact tokens inside the store (its
codes, the kernel's reads), so the cost is pinned here instead.
Rel. logit error vs the float model, padded / alone, pads 5 and 13:
    sink 1: 2-bit 0.322 / 0.310, 0.344 / 0.329; 3-bit 0.165 / 0.162, 0.172 / 0.166; 4-bit 0.075 / 0.074, 0.077 / 0.076
    sink 4: 2-bit 0.313 / 0.273, 0.332 / 0.281; 3-bit 0.161 / 0.145, 0.165 / 0.142; 4-bit 0.072 / 0.070, 0.073 / 0.067
The tiny model is random (no trained attention sink): a real model's first token may matter more."""
import pytest
import torch

import tquant
from tests.tiny_models import VOCAB, tiny_model, token_batch
from tquant.models import cache_kwarg

N, PREFILL = 48, 24  # tokens of the batch, of its prefill (the rest decoded one at a time, teacher-forced)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def decoded_logits(model, ids, mask, prefill, cache):
    """The decode steps' logits [B, n - prefill, V]: ids[:, :prefill] prefilled, then one token per step, with
    the mask's per-row positions (as generate gives a left-padded batch)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {cache_kwarg(model): cache, "use_cache": True}
    model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill], **kwargs)
    return torch.cat([model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                            **kwargs).logits for t in range(prefill, ids.shape[1])], dim=1)


@pytest.mark.parametrize("bits,sink,pad", [(2, 4, 5), (3, 4, 13), (4, 4, 13), (2, 1, 13)])
def test_a_left_padded_rows_sink_holds_padding(bits, sink, pad):
    """The padded row decodes as the same row alone with its sink dropped (to float32 rounding, 5e-7 measured), so
    it is worse than alone, by more than 3 % (the sink helps; measured 1.05-1.16x here: this fails if the cache
    stopped keeping the sink exact) but within 1.3x (at most 1.18x over the grid in the module docstring)."""
    model, float_model = tiny_model("llama"), tiny_model("llama")
    tquant.quantize(model, "kvquant", kv_bits=bits, sink=sink, calib=token_batch(4, 32, seed=3), progress=False)
    ids = token_batch(2, N, seed=5)
    ids[:, 0] = VOCAB - 1  # each prompt starts with <eos> as its BOS
    ids[0, pad:] = ids[0, : N - pad].clone()  # row 0: its first N - pad tokens after pad padding slots
    ids[0, :pad] = 0
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    row = ids[:1, pad:]
    no_sink = tquant.kv_cache(model)
    for layer in no_sink.layers:
        layer.sink = 0
    with torch.no_grad():
        exact = float_model(row).logits[:, PREFILL - pad :]
        padded = decoded_logits(model, ids, mask, PREFILL, tquant.kv_cache(model))[:1]
        alone = decoded_logits(model, row, torch.ones_like(row), PREFILL - pad, tquant.kv_cache(model))
        alone_no_sink = decoded_logits(model, row, torch.ones_like(row), PREFILL - pad, no_sink)
    assert rel(padded, alone_no_sink) < 1e-4
    assert 1.03 * rel(alone, exact) < rel(padded, exact) < 1.3 * rel(alone, exact)
