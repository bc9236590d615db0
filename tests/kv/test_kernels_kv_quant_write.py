"""The per-token KV write kernel (tquant.kv.write) against its torch reference (quantize_values then
index_copy_): identical codes, scales and minima at the given rows, every other row untouched; bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.kernel_device import DEVICE, needs_backend

from tquant.kv.uniform_format import PackedKV
from tquant.kv.write import kv_quant_write, kv_quant_write_ref


def stores(b, h, tokens, d, bits, seed):
    """Two stores filled with random garbage (so untouched rows show), and identical copies for the reference."""
    g = torch.Generator().manual_seed(seed)

    def store():
        return PackedKV(torch.randint(-2**31, 2**31 - 1, (b, h, tokens, d * bits // 32), generator=g,
                                      dtype=torch.int32).to(DEVICE),
                        torch.rand(b, h, tokens, 1, generator=g).half().to(DEVICE),
                        torch.rand(b, h, tokens, 1, generator=g).half().to(DEVICE))
    mine = (store(), store())
    return mine, tuple(PackedKV(*(p.clone() for p in s)) for s in mine)


@needs_backend
@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 5), extra=st.integers(0, 6),
       d=st.sampled_from([16, 64, 128]), bits=st.sampled_from([4, 8]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       special=st.sampled_from([None, "constant", "tiny"]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_kv_quant_write_matches_reference(b, h, t, extra, d, bits, dtype, special, seed):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, b, t, h, d, generator=g) * 2 + torch.randn(d, generator=g) * 3  # per-channel offsets
    if special == "constant":  # one token's keys all equal: scale 0 -> 1, codes 0
        kv[0, 0, 0, 0] = 1.5
    if special == "tiny":  # a range of 2^-24: its step rounds to 0 in fp16, so scale 1 and codes 0 as well
        kv[0, 0, 0, 0] = torch.arange(d) % 2 * 2.0**-24
    k, v = (x.transpose(1, 2).to(DEVICE, dtype) for x in kv)  # [B, H, t, D] views, as the decoder passes them
    rows = torch.randperm(t + extra, generator=g)[:t].to(DEVICE)
    (k_store, v_store), (k_ref, v_ref) = stores(b, h, t + extra, d, bits, seed)
    kv_quant_write(k, v, k_store, v_store, rows, bits)
    kv_quant_write_ref(k, v, k_ref, v_ref, rows, bits)
    for mine, ref in zip((*k_store, *v_store), (*k_ref, *v_ref)):
        assert torch.equal(mine, ref)
    assert (v_store.codes[:, :, rows] != 0).any()  # codes were written, not left zero (values: never constant)


@needs_backend
def test_kernels_kv_quant_write_bad_input():
    k = torch.randn(1, 2, 3, 16).to(DEVICE)
    (ks, vs), _ = stores(1, 2, 8, 16, 4, 0)
    rows = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="bits=2"):
        kv_quant_write(k, k, ks, vs, rows, 2)
    with pytest.raises(ValueError, match="one shape"):
        kv_quant_write(k, k[:, :1], ks, vs, rows, 4)
    with pytest.raises(ValueError, match="k_store must be"):
        kv_quant_write(k, k, PackedKV(ks.codes[..., :1], ks.scale, ks.mn), vs, rows, 4)
    with pytest.raises(ValueError, match="rows must be int64"):
        kv_quant_write(k, k, ks, vs, rows.int(), 4)
