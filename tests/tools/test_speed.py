"""tquant.tools.speed on tiny random models, on the CPU (HF generate, and the StaticDecoder run eagerly)."""
import os
import time

import pytest
import torch

from tquant.models import model_bytes
from tquant.tools.speed import dir_bytes, speed_report, speed_summary
from tests.tiny_models import VOCAB, byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def eos_loving(arch="llama"):
    """A tiny model whose greedy choice is always <eos>: generate stops at once unless told to go on."""
    m = tiny_model(arch)
    bias = torch.zeros(VOCAB)
    bias[m.config.eos_token_id] = 1e4
    m.lm_head.bias = torch.nn.Parameter(bias)
    return m


def test_counts_and_times_are_consistent(model):
    start = time.perf_counter()
    r = speed_report(model, byte_tokenizer(), prompt_len=12, new_tokens=6, batch=3, progress=False)
    wall = time.perf_counter() - start
    assert r["decoder"] == "HF generate" and r["device"] == "cpu"
    assert r["generated_tokens"] == 3 * 6
    assert r["prefill_tokens_per_s"] * r["ttft_s"] == pytest.approx(3 * 12)
    assert r["decode_tokens_per_s"] * r["decode_s"] == pytest.approx(3 * 5)  # the tokens after the first
    assert 0 < r["ttft_s"] and 0 < r["decode_s"] and r["ttft_s"] + r["decode_s"] < wall
    assert r["model_bytes"] == model_bytes(model) and r["disk_bytes"] is None
    assert r["peak_memory_bytes"] > r["model_bytes"] and r["memory_measure"] == "process peak RSS"
    summary = speed_summary(r)
    assert summary["TTFT ms"] == pytest.approx(1e3 * r["ttft_s"]) and summary["decoder"] == "HF generate"


def test_length_is_forced_past_eos():
    r = speed_report(eos_loving(), prompt_len=4, new_tokens=5, batch=2, progress=False)
    assert r["generated_tokens"] == 2 * 5


def test_static_decoder_when_asked_and_refusal(model):
    r = speed_report(model, VOCAB, prompt_len=8, new_tokens=4, batch=2, static=True, progress=False)
    assert r["decoder"] == "StaticDecoder (eager)" and r["generated_tokens"] == 8 and r["decode_tokens_per_s"] > 0
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="Llama-style"):
        speed_report(gpt2, prompt_len=4, new_tokens=2, static=True, progress=False)
    assert speed_report(gpt2, prompt_len=4, new_tokens=2, progress=False)["decoder"] == "HF generate"


def test_disk_size_of_a_saved_dir(model, tmp_path):
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path) for f in names]
    assert dir_bytes(tmp_path) == sum(os.path.getsize(f) for f in files) > model_bytes(model)
    r = speed_report(model, prompt_len=4, new_tokens=2, saved_dir=tmp_path, progress=False)
    assert r["disk_bytes"] == dir_bytes(tmp_path)


def test_bad_lengths(model):
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        speed_report(model, new_tokens=1, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a GPU")
@pytest.mark.parametrize("method", [None, "rtn"])
def test_kernels_speed_report_on_cuda(method):
    """On the GPU (fp16, float and RTN W4 g32 on the Triton kernels): by default the StaticDecoder with CUDA graphs,
    HF generate when asked; tokens counted as on the CPU, memory from torch.cuda's peak counter (at least the
    weights, and at most what the process holds)."""
    import tquant

    model = tiny_model("llama", dtype=torch.float16).cuda()
    if method:
        tquant.quantize(model, method, bits=4, group_size=32)
    for static, decoder in ((None, "StaticDecoder (CUDA graphs)"), (False, "HF generate")):
        r = speed_report(model, VOCAB, prompt_len=16, new_tokens=8, batch=2, static=static, progress=False)
        assert r["decoder"] == decoder and r["device"].startswith("cuda") and r["generated_tokens"] == 2 * 8
        assert r["decode_tokens_per_s"] * r["decode_s"] == pytest.approx(2 * 7)
        assert r["memory_measure"] == "torch.cuda.max_memory_allocated"
        assert r["model_bytes"] <= r["peak_memory_bytes"] <= torch.cuda.memory_reserved()
