"""packed_weight.check_grid, what tquant.load runs on every packed weight: a code whose grid point
(code - zero) * scale passes the scales' dtype's largest value is refused, naming the tensor and that value, and
every weight the driver hands a module (codes clamped by QuantizedWeight.within_dtype) passes.

The reference here is the dequantized weight in float64 from the codes and the scales as the module stores them
(rounded to its dtype): refused exactly when one of its values passes finfo(dtype).max."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tquant.formats.weights import QuantizedWeight
from tquant.modules import PackedEmbedding, PackedExperts, PackedLinear

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@st.composite
def outlier_weights(draw):
    """(w float32 [N, K], bits, group_size, dtype, sym): weights of size ~1 with a few outliers near the dtype's
    largest value (both signs; for bf16 / fp32 up to its max), where the grid's outer points may pass it."""
    bits = draw(st.sampled_from((2, 3, 4, 8)))
    group_size = draw(st.sampled_from((8, 16, 32)))
    n, k = draw(st.integers(1, 9)), group_size * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    big = torch.finfo(dtype).max
    torch.manual_seed(draw(st.integers(0, 2**16)))
    w = torch.randn(n, k)
    for _ in range(draw(st.integers(1, 4))):
        frac = draw(st.sampled_from((1.0, 0.999, 0.9, 0.75, 0.5)))
        w[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] = draw(st.sampled_from((-1, 1))) * frac * big
    return w.clamp(-big, big), bits, group_size, dtype, draw(st.booleans())


def _past(qw: QuantizedWeight, dtype) -> float | None:
    """The largest |grid point| of a code qw holds, in float64 with its scales in dtype, when past dtype's max."""
    s = qw.scale.to(dtype).double().repeat_interleave(qw.group_size, dim=1)
    z = qw.zero.double().repeat_interleave(qw.group_size, dim=1)
    peak = ((qw.codes.double() - z) * s).abs().max().item()
    return peak if peak > torch.finfo(dtype).max else None


@settings(max_examples=60, deadline=None)
@given(outlier_weights())
def test_check_grid_refuses_exactly_the_codes_past_the_dtype(case):
    w, bits, group_size, dtype, sym = case
    qw = QuantizedWeight.from_rtn(w, bits, group_size, sym)
    if not torch.isfinite(qw.scale.to(dtype)).all():  # a scale the dtype cannot hold: Check's finite test refuses
        return
    past = _past(qw, dtype)
    module = PackedLinear.from_quantized(qw, None, dtype)
    if past is None:
        module.validate("layer")
    else:
        with pytest.raises(ValueError, match=rf"^layer\.qweight: code \d+ names the grid point .* past {dtype}'s "
                                             rf"largest value"):
            module.validate("layer")
    fitted, moved = qw.within_dtype(dtype)
    assert moved > 0 or past is None
    PackedLinear.from_quantized(fitted, None, dtype).validate("layer")  # what the driver stores always passes
    assert _past(fitted, dtype) is None


def _fp16_group_past(bits=2):
    """A 2-bit symmetric fp16 weight of one group whose grid point -(maxq + 1) / maxq * 6e4 = -8e4 a code holds
    (the tie w = -6e4 rounds to it), and the largest value the refusal must name (computed in float64)."""
    w = torch.tensor([[-6e4, 6e4, 1.0, -1.0] * 8])
    qw = QuantizedWeight.from_rtn(w, bits, 32, sym=True)
    return qw, _past(qw, torch.float16)


def test_the_refusal_names_tensor_dtype_and_the_largest_value():
    qw, past = _fp16_group_past()
    assert past is not None
    with pytest.raises(ValueError) as err:
        PackedLinear.from_quantized(qw, None, torch.float16).validate("model.layers.3.mlp.up_proj")
    message = str(err.value)
    assert message.startswith("model.layers.3.mlp.up_proj.qweight: code "), message
    assert f"= {-past:.6g}, past torch.float16's largest value 65504 (group 0 of output 0" in message, message


def test_embedding_and_experts_are_checked_too():
    qw, past = _fp16_group_past()
    embedding = PackedEmbedding.from_quantized(qw, None, torch.float16)
    with pytest.raises(ValueError, match=rf"^embed\.qweight: code .* = {-past:.6g}, past torch\.float16"):
        embedding.validate("embed")
    fine = QuantizedWeight.from_rtn(torch.randn(32, 32), 2, 32, sym=True)  # gate_up [2I, H], down [H, I]
    down = QuantizedWeight.from_rtn(torch.randn(32, 16), 2, 16, sym=True)
    wide = QuantizedWeight(torch.cat([qw.codes] * 32), torch.cat([qw.scale] * 32), torch.cat([qw.zero] * 32), 2, 32)
    experts = PackedExperts.from_quantized([fine, wide, fine], [down] * 3, "silu", torch.float16)
    with pytest.raises(ValueError, match=rf"^experts\.gate_up_qweight\[1\]: code .* = {-past:.6g}, past"):
        experts.validate("experts")
    PackedExperts.from_quantized([fine] * 3, [down] * 3, "silu", torch.float16).validate("experts")
