"""Where kernel tests run: the Triton interpreter on the CPU (TRITON_INTERPRET=1, the default set by
conftest.py), or the GPU with TRITON_INTERPRET=0."""
import pytest
import torch

from tquant.kernels.runtime import interpreter_on

DEVICE = "cpu" if interpreter_on() else "cuda"
needs_backend = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                   reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
