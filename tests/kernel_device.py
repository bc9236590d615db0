"""Where kernel tests run: the Triton interpreter on the CPU (TRITON_INTERPRET=1, the default set by
conftest.py), or the GPU with TRITON_INTERPRET=0; poisoned_outputs, an autouse fixture for the test files
that import it (kernels sharing dequant_gemm's output and split-K buffers); and assert_close, the kernels' check
against their references."""
import pytest
import torch

from tquant.kernels import dequant_gemm
from tquant.kernels.runtime import interpreter_on
from tquant.models import cache_kwarg

DEVICE = "cpu" if interpreter_on() else "cuda"
needs_backend = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                   reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs and split-K workspaces start as NaN, so unwritten elements show."""
    real_output, real_split = dequant_gemm.output_buffer, dequant_gemm.split_k_buffers

    def poisoned_split(*args):
        ws, counters = real_split(*args)
        return ws.fill_(float("nan")), counters

    monkeypatch.setattr(dequant_gemm, "output_buffer", lambda *args: real_output(*args).fill_(float("nan")))
    monkeypatch.setattr(dequant_gemm, "split_k_buffers", poisoned_split)


def assert_close(y, ref, dtype, tol, magnitude=None):
    """y against its reference: both in dtype and of one shape, every output written and finite (poisoned outputs
    start as NaN), and a relative error below tol: over ref's norm or, for sums that may cancel, over the norm of
    magnitude (the same sums of absolute values, e.g. |x| @ |w|^T: float rounding scales with it, not with y)."""
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    assert y.isfinite().all(), "unwritten (NaN) or non-finite outputs"
    scale = (magnitude if magnitude is not None else ref).double().norm().clamp_min(1e-12)
    err = ((y.double() - ref.double()).norm() / scale).item()
    assert err < tol, f"relative error {err:.2e}"


def decode_both_paths(model, ids, prefill, kernel_fn):
    """For attention masks None and left padding (row 1 padded by 5 tokens): a prefill of `prefill` tokens then one
    token a forward through tquant.kv_cache(model), on the kernel path and on the torch path. kernel_fn is a
    patched kernel's call list: every decode step of every layer must reach it on the kernel path and never on
    the torch path. Yields (kernel logits, torch logits, the kernel path's cache, the torch path's cache)."""
    import tquant

    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    steps = ids.shape[1] - prefill
    for attention_mask in (None, mask):
        upto = lambda t: None if attention_mask is None else attention_mask[:, :t]  # noqa: E731
        logits, caches = {}, {}
        for kernel in (True, False):
            cache = tquant.kv_cache(model)
            for layer in cache.layers:
                layer.kernel = kernel
            with torch.no_grad():
                out = [model(ids[:, :prefill], attention_mask=upto(prefill), **{cache_kwarg(model): cache},
                             use_cache=True).logits]
                for t in range(prefill, ids.shape[1]):
                    out.append(model(ids[:, t : t + 1], attention_mask=upto(t + 1), **{cache_kwarg(model): cache},
                                     use_cache=True).logits)
            assert len(kernel_fn) == (steps * len(cache.layers) if kernel else 0)
            kernel_fn.clear()
            logits[kernel], caches[kernel] = torch.cat(out, dim=1), cache
        yield logits[True], logits[False], caches[True], caches[False]
