"""Where kernel tests run: the Triton interpreter on the CPU (TRITON_INTERPRET=1, the default set by
conftest.py), or the GPU with TRITON_INTERPRET=0; and poisoned_outputs, an autouse fixture for the test files
that import it (kernels sharing dequant_gemm's output and split-K buffers)."""
import pytest
import torch

from tquant.kernels import dequant_gemm
from tquant.kernels.runtime import interpreter_on

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
