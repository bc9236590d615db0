"""KIVI on a left-padded batch. The cache flushes key groups (per channel, `group_size` tokens) for the whole batch at
once, so a padded row's groups start inside its padding and its groups differ from the row's alone: its logits are
not the alone row's (a few % at 4 bits on the tiny model), but they must be as close to the float model's as the
alone row's are, i.e. the padding tokens in its first group must not widen that group's range into a worse grid."""
import pytest
import torch

import tquant
from tests.tiny_models import tiny_model, token_batch


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bits,pad", [(4, 5), (4, 13), (8, 5)])
def test_a_left_padded_row_is_as_close_to_float_as_alone(bits, pad):
    model, float_model = tiny_model("llama"), tiny_model("llama")
    tquant.quantize(model, "kivi", kv_bits=bits, group_size=8, residual=8, progress=False)
    ids = token_batch(2, 40, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batch = torch.stack(model.generate(ids, attention_mask=mask, **kwargs).logits)[:, 0]
        alone = torch.stack(model.generate(ids[:1, pad:], **kwargs).logits)[:, 0]
        exact = torch.stack(float_model.generate(ids[:1, pad:], **kwargs).logits)[:, 0]
    assert rel(batch, exact) < 1.25 * rel(alone, exact)
    assert rel(batch, alone) < 2 * rel(alone, exact)  # different groups, the same grid quality
