"""Generation speed and memory of a (quantized) model: prefill and decode tokens/s, time to first token, peak
memory, size in memory and on disk.

    report = speed_report(model, tok, prompt_len=128, new_tokens=64, batch=1)
    report["decode_tokens_per_s"], report["decoder"]      # e.g. 41.2, "HF generate"

Memory is measured on CUDA as torch.cuda.max_memory_allocated over the run (its peak counter reset first); on
the CPU as the process's peak resident set size during the run (getrusage ru_maxrss, its peak reset first
through /proc/self/clear_refs on Linux; where that cannot be written, the process's peak so far). Both include
the weights; the CPU figure also holds the Python runtime and its libraries.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from ..models import model_bytes


class _Clock(BaseStreamer):
    """Timestamps of generated tokens. As a generate() streamer it skips the first put (the prompt)."""

    def __init__(self, device: torch.device, total: int, progress: bool):
        self.cuda = device.type == "cuda"
        self.times = [self._now()]
        self._prompt_seen = False
        self.bar = tqdm(total=total, desc="speed", unit="tok", disable=not progress, leave=False)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def tick(self, record: bool = True) -> None:
        """One more token; record=False only counts it (no device sync: CUDA graph steps stay queued)."""
        if record:
            self.times.append(self._now())
        self.bar.update()

    def put(self, value) -> None:
        if self._prompt_seen:
            self.tick()
        self._prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def dir_bytes(path) -> int:
    """Sum of the sizes of the files under path (a saved checkpoint on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def static_decoder(model, batch: int, max_len: int, static: bool | None):
    """(StaticDecoder or None, why not): static=None: one on CUDA when the model is supported (else None and the
    reason); True: one wherever the model is (the decoder's ValueError, naming the model type, when unsupported);
    False: None."""
    from ..decode import StaticDecoder

    device = model.get_input_embeddings().weight.device
    if static is False or (static is None and device.type != "cuda"):
        return None, None
    try:
        return StaticDecoder(model, batch, max_len), None
    except ValueError as err:
        if static:
            raise
        return None, str(err)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM, ru_maxrss) of this process
    except OSError:
        pass


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _timed_generation(model, dec, ids: torch.Tensor, new_tokens: int, progress: bool) -> tuple[torch.Tensor, list]:
    """(the new tokens [batch, new_tokens], times: [start, first token ready, ..., last token ready])."""
    clock = _Clock(ids.device, new_tokens, progress)
    if dec is not None:
        out = dec.generate(ids, 1)
        clock.tick()
        nxt = out[:, -1]
        new = [nxt]
        for i in range(new_tokens - 1):
            nxt = dec.step(nxt).argmax(-1)
            clock.tick(record=i == new_tokens - 2)
            new.append(nxt)
        clock.end()
        return torch.stack(new, dim=1), clock.times
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, streamer=clock)
    return out[:, ids.shape[1]:], clock.times


@torch.no_grad()
def speed_report(model, vocab=None, *, prompt_len: int = 128, new_tokens: int = 64, batch: int = 1, device=None,
                 saved_dir=None, static: bool | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Greedy generation of new_tokens after a prompt of prompt_len random tokens, batch rows at a time.

    vocab: a tokenizer or a vocabulary size for the random prompt (default: the model config's). device: where
    the model runs (moved there; default: where it is). static: decode with tquant.StaticDecoder (CUDA graphs on
    CUDA); default: on CUDA when the model supports it, else HF generate (min_new_tokens forces the length).
    One warm-up run, then one timed run: ttft_s is the prefill plus the first token; decode_tokens_per_s counts
    the batch x (new_tokens - 1) tokens after it. saved_dir adds the checkpoint's size on disk.
    """
    if prompt_len < 1 or new_tokens < 2 or batch < 1:
        raise ValueError(f"need prompt_len >= 1, new_tokens >= 2 (one decode step) and batch >= 1; got "
                         f"{prompt_len}, {new_tokens}, {batch}")
    if device is not None:
        model.to(device)
    dev = model.get_input_embeddings().weight.device
    size = len(vocab) if hasattr(vocab, "__len__") else vocab or model.config.vocab_size
    size = min(size, model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, size, (batch, prompt_len), generator=g).to(dev)
    was_training = model.training
    model.eval()
    try:
        dec, why_not = static_decoder(model, batch, prompt_len + new_tokens, static)
        _timed_generation(model, dec, ids, 2, progress=False)  # warm-up: kernels, autotuning, the graph capture
        _reset_peak(dev)
        new, times = _timed_generation(model, dec, ids, new_tokens, progress)
        peak = _peak_bytes(dev)
    finally:
        model.train(was_training)
    ttft, decode_s = times[1] - times[0], times[-1] - times[1]
    if dec is None:
        decoder = "HF generate" + (f" (no StaticDecoder: {why_not})" if why_not else "")
    else:
        decoder = "StaticDecoder" + (" (CUDA graphs)" if dec.graphs else " (eager)")
    return {
        "decoder": decoder, "device": str(dev), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "generated_tokens": new.numel(), "ttft_s": ttft, "prefill_tokens_per_s": batch * prompt_len / ttft,
        "decode_s": decode_s, "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "peak_memory_bytes": peak,
        "memory_measure": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
        "model_bytes": model_bytes(model), "disk_bytes": None if saved_dir is None else dir_bytes(saved_dir),
    }


def speed_summary(report: dict) -> dict:
    """The report's headline numbers under table labels (MiB, ms, tokens/s)."""
    mib = lambda b: None if b is None else b / 2**20
    return {"prefill tok/s": report["prefill_tokens_per_s"], "decode tok/s": report["decode_tokens_per_s"],
            "TTFT ms": 1e3 * report["ttft_s"], "peak memory MiB": mib(report["peak_memory_bytes"]),
            "model MiB": mib(report["model_bytes"]), "disk MiB": mib(report["disk_bytes"]),
            "decoder": report["decoder"]}
