"""benchmarks/bench_fp8.py's CPU pieces (the GPU run is the measurement): --help, the argument parsing, the weight
copies and the table; without CUDA it stops with a message."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fp8.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_fp8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_names_the_peers():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--ms" in out.stdout and "torch._scaled_mm" in out.stdout and "cuBLAS fp16" in out.stdout


def test_shapes_copies_and_table():
    b = bench()
    assert b.shapes("4096x14336,14336x4096") == [(4096, 14336), (14336, 4096)]
    with pytest.raises(ValueError, match="KxN"):
        b.shapes("4096,14336")
    assert b.copies_for(4096 * 14336, 50 * 2**20) == 3  # 56 MiB of e4m3 weights against a 50 MiB L2: 3 x 50 / 56
    assert b.copies_for(1 << 30, 50 * 2**20) == 2
    rows = [{"shape": "4096->14336", "M": 4096, "tquant fp8": 500.0, "scaled_mm": 550.0, "scaled_mm exact": None,
             "cublas fp16": 1000.0, "tquant int8": 450.0},
            {"shape": "4096->14336", "M": 1, "tquant fp8": 26.7, "fused": 25.0, "scaled_mm": 25.0}]
    text = b.table(rows)
    assert "| 4096->14336 | 4096 | 500.0 | - | - | - | 550.0 | - | 1000.0 | 450.0 |" in text
    assert "| 4096->14336 | 4096 | 1.10 | - | - | 0.50 | 0.90 |" in text
    assert "| 4096->14336 | 1 | 26.7 | 25.0 | - | - | 25.0 | - | - | - |" in text
    assert "| 4096->14336 | 1 | 0.94 | 1.00 | - | - | - |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_cuda_it_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench().main(["--ms", "1"])
