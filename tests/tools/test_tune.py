"""tquant tune (tquant.tools.tune.tune_model): a CUDA-only operation; on the CPU it refuses with what to do."""
import json

import pytest
import torch

import tquant
from tquant.cli import main
from tquant.tools.tune import tune_model
from tests.tiny_models import tiny_model


def test_tune_refuses_a_cpu_model_and_bad_batches():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="autotuning times the Triton kernels on a CUDA GPU .*--device cuda"):
        tune_model(model)
    for batches, prompt_len in (((0, 4), 16), ((), 16), ((1,), 0)):
        with pytest.raises(ValueError, match="need batches >= 1 and prompt_len >= 1"):
            tune_model(model, batches=batches, prompt_len=prompt_len)


def test_cli_tune_says_what_to_do_off_cuda(tmp_path):
    model = tquant.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32, progress=False)
    tquant.save(model, str(tmp_path))
    with pytest.raises(SystemExit, match="tquant tune: the model is on cpu"):
        main(["tune", str(tmp_path), "--device", "cpu", "--batches", "1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning needs a CUDA GPU")
def test_kernels_tune_model_writes_the_user_file(tmp_path, monkeypatch):
    """On the GPU: RTN W4 g32 on a tiny fp16 Llama; its keys are in no shipped file, so they are tuned, written to
    the user file and found there; retune tunes them again."""
    from tquant.kernels import autotune_cache

    monkeypatch.setenv("TQUANT_AUTOTUNE_DIR", str(tmp_path))
    monkeypatch.delenv("TQUANT_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune_cache, "_memory", {})  # nothing this process tuned before counts as found
    monkeypatch.setattr(autotune_cache, "_chosen", {})
    model = tquant.quantize(tiny_model("llama", dtype=torch.float16).cuda(), "rtn", bits=4, group_size=32,
                            progress=False)
    r = tune_model(model, batches=(1, 4), prompt_len=16, progress=False)
    saved = json.loads(open(r["path"]).read())["entries"]
    assert r["new"] > 0 and r["path"].startswith(str(tmp_path)) and len(saved) == r["new"]
    assert tune_model(model, batches=(1, 4), prompt_len=16, progress=False)["new"] == 0  # all found
    assert tune_model(model, batches=(1,), prompt_len=16, retune=True, progress=False)["new"] > 0
