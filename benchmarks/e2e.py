"""End-to-end greedy decoding of a Llama-shaped model with random weights, through tquant.StaticDecoder (static
cache, each decode step one CUDA-graph replay on the GPU), fp16 against its quantized copies and peers in the same
run.

    python benchmarks/e2e.py [--layers 32] [--batches 1,16,64] [--prompt 1024] [--new 128]
                             [--variants fp16,gptq-w4a16,...] [--json out.json] [--plot out.png] [--tiny]
    python benchmarks/e2e.py --merge run1.json run2.json ... [--plot out.png]   (runs of the same settings)

Model: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128, vocab 128256), --layers
decoder layers (32: the whole model, 16 GB in fp16), fp16, HF's random init (N(0, 0.02)); --tiny: a 2-layer
hidden-256 model on whatever device there is (the CPU runs the decoder eagerly: a smoke test of this script, not a
measurement). Each variant quantizes a copy; methods that need calibration get CALIB random token windows. A weight
method quantizes the first --method-layers decoder layers (default 1; 0: all) and the other layers get copies of
those layers' quantized linears: the same format and bytes in every layer (decode speed depends on the format, not on
the values), and an 8B variant builds in seconds instead of the many minutes GPTQ / QuIP# take on 32 layers:
    fp16              the model as is, fp16 cache (decode attention: kernels.kv_attention over the static cache)
    gptq-w4a16        gptq bits=4 group 128, its default act-order quantization with input-channel groups
                      (PackedLinear without perm: the weight-only kernels; q / k / v and gate / up fused)
    qqq-w4a8          qqq per channel, no smoothing search (ActQuantLinear: int8 activations, W4A8 GEMM)
    qoq-w4a8          qoq's data-free steps (progressive grid, group 128; rotation folded: free at run time)
    qoq-w4a8kv4       the same with its KV4 cache (per-token 4-bit codes, tquant.kv.attention)
    smoothquant-w8a8  smoothquant alpha 0.5 (ActQuantLinear, W8A8 GEMM)
    quip#-2           quip# 2-bit E8P (QuipLinear: Hadamard transforms + E8P decode-matmul)
    fp16-kv4          fp16 weights, qoq_kv4's 4-bit cache
    fp16-kivi2        fp16 weights, KIVI's 2-bit cache (group 32, the newest 128 tokens in fp16: a static ring)
    gemlite-a16w4     peer: every decoder linear replaced by gemlite's A16Wn (4-bit group 128, asymmetric RTN codes)
Per variant and batch B: the prompt (B x prompt random tokens) is prefilled, then new - 1 greedy steps. Printed:
time to first token (the prefill, ms), decode ms per step and tokens/s (B tokens a step), the ratio of tokens/s to
fp16's at the same B, weight bytes and KV-cache bytes per token. fp16 also runs its steps eagerly (no graph) at
batch 1, what launches cost, and as a graph of the unfused torch step (HF's norm / RoPE / MLP ops and a masked SDPA
over the cache), what the fused step kernels save. Every variant's prefill logits are compared with fp16's (relative
error). A variant that fails is reported and skipped; --plot draws tokens/s over fp16 per variant and batch
(matplotlib PNG); --profile prints, per variant, the CUDA kernels of one eager batch-1 decode step (torch.profiler:
time and calls by kernel name), where a step's time goes. --tune first tunes each variant's decode-step kernels at
every batch (tquant.tools.tune.tune_model with a one-token prompt: GEMMs at M = batch; keys already in the shipped or user
file are kept) and then runs with TQUANT_AUTOTUNE=0: prefill GEMMs and the attention over the long cache take
shipped entries or defaults, untimed tuning stays out of the device budget.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tquant  # noqa: E402
from tquant.decode import StaticDecoder  # noqa: E402
from tquant.models import model_bytes  # noqa: E402
from tquant.tools.tune import tune_model  # noqa: E402

NO_CALIB = dict(smooth_attention=0, smooth_xw=False, reorder=False, calib_range=False, rotate=False)
CALIB = dict(n_samples=4, seqlen=256)  # random windows for the methods that need calibration
VARIANTS = {  # name: None (fp16), (method, options) or a callable patching a copy (peers)
    "fp16": None,
    "gptq-w4a16": ("gptq", dict(bits=4, group_size=128)),
    "qqq-w4a8": ("qqq", dict(group_size=-1, smooth_grid=0)),
    "qoq-w4a8": ("qoq", dict(group_size=128, kv_bits=16, **NO_CALIB)),
    "qoq-w4a8kv4": ("qoq", dict(group_size=128, kv_bits=4, **NO_CALIB)),
    "smoothquant-w8a8": ("smoothquant", dict(alpha=0.5)),
    "quip#-2": ("quip#", dict(bits=2)),
    "fp16-kv4": ("qoq_kv4", dict(smooth_alpha=0)),
    "fp16-kivi2": ("kivi", dict(kv_bits=2)),
    "gemlite-a16w4": "gemlite",
}


def model_config(layers: int, tiny: bool) -> transformers.LlamaConfig:
    if tiny:
        return transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=8192, rope_theta=500000.0)


def build(cfg, device):
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).to(torch.float16 if device == "cuda" else torch.float32).eval()


class GemliteLinear(torch.nn.Module):
    """gemlite's A16Wn layer in place of an nn.Linear (x [..., K] -> [..., N])."""

    def __init__(self, linear: torch.nn.Linear, group_size: int = 128):
        super().__init__()
        from gemlite.helper import A16Wn

        from tquant.formats.quantizer import grouped_qparams, quantize

        w = linear.weight.detach().float()
        n, k = w.shape
        scale, zero = grouped_qparams(w, 4, group_size, sym=False)  # [N, G]
        codes = quantize(w.view(n, k // group_size, group_size), scale[..., None], zero[..., None], 4).view(n, k)
        self.layer = A16Wn(device=str(w.device), dtype=torch.float16).from_weights(
            codes.to(torch.uint8), scale.half().contiguous(), zero.half().contiguous(), W_nbits=4,
            group_size=group_size)
        self.out_features = n

    def forward(self, x):
        return self.layer(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)


def patch_gemlite(model):
    """Every nn.Linear of the decoder blocks becomes a GemliteLinear (lm_head stays fp16, as for tquant's)."""
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            model.model.layers.set_submodule(name, GemliteLinear(module))
    return model


FP16_ROWS = ("fp16", "fp16-eager", "fp16-unfused")  # the baseline's rows: no ratio bars, one run's kept in a merge
KV_METHODS = ("qoq_kv4", "kivi")  # methods of the KV cache alone: no linears, quantized in full


def copy_quantized_layers(model, method_layers: int) -> None:
    """Layer i >= method_layers gets copies of the quantized (no longer nn.Linear) linears of layer
    i % method_layers."""
    layers = model.model.layers
    for i in range(method_layers, len(layers)):
        for name, module in list(layers[i % method_layers].named_modules()):
            if name and not isinstance(module, torch.nn.Linear) and hasattr(module, "in_features"):
                layers[i].set_submodule(name, copy.deepcopy(module))


def make_variant(name: str, base, device: str, method_layers: int = 0):
    spec = VARIANTS[name]
    if spec is None:
        return base
    if spec == "gemlite":
        return patch_gemlite(copy.deepcopy(base))
    method, opts = spec
    calib = torch.randint(0, base.config.vocab_size, (CALIB["n_samples"], CALIB["seqlen"]),
                          generator=torch.Generator().manual_seed(1))
    layers = base.config.num_hidden_layers
    partial = method not in KV_METHODS and 0 < method_layers < layers
    skip = [f"model.layers.{i}.*" for i in range(method_layers, layers)] if partial else []
    model = tquant.quantize(copy.deepcopy(base), method, device=device, progress=False, calib=calib, skip=skip,
                            **CALIB, **opts)
    if partial:
        copy_quantized_layers(model, method_layers)
    return model


def profile_step(model, prompt: int, top: int = 12) -> str:
    """The CUDA kernels of one eager batch-1 decode step after a prompt of `prompt` tokens, by total time."""
    from torch.profiler import ProfilerActivity, profile

    dec = StaticDecoder(model, 1, prompt + 4, graphs=False)
    device = model.get_input_embeddings().weight.device
    nxt = dec.prefill(torch.randint(0, model.config.vocab_size, (1, prompt), device=device)).argmax(-1)
    nxt = dec.step(nxt).argmax(-1)  # warm-up: autotune lookups, first launches
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.step(nxt)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    calls = sum(e.count for e in events)
    lines = [f"  one eager step: {calls} kernels, {total / 1e3:.2f} ms of kernel time"]
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        lines.append(f"  {e.device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:100]}")
    return "\n".join(lines)


def timed(fn):
    """(result, ms) of fn(): CUDA events on the GPU, the wall clock elsewhere."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


def decode_run(model, batch: int, prompt: int, new: int, graphs: bool | None = None, fused: bool | None = None) -> dict:
    dec = StaticDecoder(model, batch, prompt + new, graphs=graphs, fused=fused)
    if fused is False:  # the torch step throughout: masked SDPA over the float cache too
        dec.cache.kernel = False
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(device)
    dec.generate(ids, 3)  # warm-up: the prefill's kernels, the graph capture, the decode kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    logits, ttft = timed(lambda: dec.prefill(ids))
    first = logits.float().clone()
    nxt = logits.argmax(-1)

    def steps():
        token = nxt
        for _ in range(new - 1):
            token = dec.step(token).argmax(-1)
        return token

    _, decode_ms = timed(steps)
    out = {"batch": batch, "ttft_ms": round(ttft, 2), "step_ms": round(decode_ms / (new - 1), 3),
           "tokens_per_s": round(batch * (new - 1) / decode_ms * 1e3, 1),
           "kv_bytes_per_token": dec.cache.bytes_per_token()}
    del dec
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, first


def fp16_rate(results: dict, row: dict) -> float | None:
    """The fp16 tokens/s a row compares with: its own run's (merged results carry it), else results' fp16 row."""
    if row.get("fp16_tokens_per_s"):
        return row["fp16_tokens_per_s"]
    ref = next((x for x in results.get("fp16", {"rows": []})["rows"] if x["batch"] == row["batch"]), None)
    return ref["tokens_per_s"] if ref else None


def merge(paths: list[str]) -> tuple[dict, dict]:
    """(results, run info) of several runs' JSON: each variant from the last run that has it, each row holding its
    own run's fp16 tokens/s at that batch (fp16_tokens_per_s), so a ratio never mixes runs."""
    results, info = {}, {}
    for path in paths:
        data = json.load(open(path))
        info = {k: v for k, v in data.items() if k != "results"}
        fp = {r["batch"]: r["tokens_per_s"] for r in data["results"].get("fp16", {"rows": []})["rows"]}
        for name, r in data["results"].items():
            for row in r["rows"]:
                row["fp16_tokens_per_s"] = fp.get(row["batch"])
            if name not in FP16_ROWS or name not in results:
                results[name] = r
    return results, info


def table(results: dict, batches: list[int]) -> str:
    """The markdown table: per variant weight GB, KV bytes a token, and per batch TTFT and tokens/s (x fp16)."""
    head = " | ".join(f"B={b} TTFT ms | B={b} tok/s" for b in batches)
    lines = [f"| variant | weights GB | KV B/token | {head} |",
             "|---|---|---|" + "---|---|" * len(batches)]
    for name, r in results.items():
        cells = []
        for b in batches:
            row = next((x for x in r["rows"] if x["batch"] == b), None)
            if row is None:
                cells += ["", ""]
                continue
            ref = fp16_rate(results, row)
            ratio = f" ({row['tokens_per_s'] / ref:.2f}x)" if ref else ""
            cells += [f"{row['ttft_ms']:.1f}", f"{row['tokens_per_s']:.0f}{ratio}"]
        kv = r["rows"][0]["kv_bytes_per_token"] if r["rows"] else ""
        gb = f"{r['weight_bytes'] / 1e9:.2f}" if "weight_bytes" in r else ""
        lines.append(f"| {name} | {gb} | {kv} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, batches: list[int], path: str, title: str) -> None:
    """Grouped bars: each variant's decode tokens/s over fp16's, per batch (1.0 = fp16)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n not in FP16_ROWS and results[n]["rows"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ratios = [next((x["tokens_per_s"] / fp16_rate(results, x) for x in results[n]["rows"] if x["batch"] == b), 0)
                  for n in names]
        ax.bar([j + i * width for j in range(len(names))], ratios, width, label=f"batch {b}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("decode tokens/s / fp16's")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()  # not torch.set_grad_enabled(False): a test calls main in its own process, which goes on
def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--tiny", action="store_true", help="a small model on any device: a smoke test, not a measurement")
    p.add_argument("--method-layers", type=int, default=1,
                   help="decoder layers a weight method quantizes; the rest get copies (0: all)")
    p.add_argument("--profile", action="store_true", help="print each variant's kernels of one eager decode step")
    p.add_argument("--tune", action="store_true", help="tune each variant's decode kernels (M = batch) first")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge earlier runs' JSON: the table, and the plot with --plot")
    a = p.parse_args(argv)
    if a.merge:
        results, info = merge(a.merge)
        batches = sorted({r["batch"] for v in results.values() for r in v["rows"]})
        title = f"{info['gpu']}: {info['layers']} layers, prompt {info['prompt']}, {info['new']} new tokens"
        print(f"{title}; torch {info['torch']}, triton {info['triton']}; tokens/s (x fp16 of the same run)\n"
              + table(results, batches))
        if a.plot:
            plot(results, batches, a.plot, title)
        return results
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(gpu, "torch", torch.__version__, "triton", __import__("triton").__version__, "transformers",
          transformers.__version__, flush=True)
    if a.tune and device == "cuda":
        os.environ["TQUANT_AUTOTUNE"] = "0"  # the runs: shipped, user-file or default configs, no timing inside them
    cfg = model_config(a.layers, a.tiny)
    base = build(cfg, device)
    batches = [int(b) for b in a.batches.split(",")]
    results, fp_logits = {}, {}
    for name in a.variants.split(","):
        t = time.time()
        try:
            model = make_variant(name, base, device, a.method_layers)
        except Exception as e:  # keep the other variants' numbers (e.g. gemlite not installed)
            print(f"{name} failed to build: {type(e).__name__}: {e}", flush=True)
            continue
        build_s = round(time.time() - t)
        if a.tune and device == "cuda":  # tune_model turns tuning on while it runs
            r = tune_model(model, batches=batches, prompt_len=1, progress=False)
            print(f"{name}: {r['new']} decode kernel configs tuned in {r['seconds']} s", flush=True)
        rows = []
        for b in batches:
            try:
                row, logits = decode_run(model, b, a.prompt, a.new)
            except Exception as e:  # keep the other rows' numbers
                print(f"{name} batch {b} failed: {type(e).__name__}: {e}", flush=True)
                continue
            if name == "fp16":
                fp_logits[b] = logits
            elif b in fp_logits:
                row["prefill_logits_rel_err"] = round(((logits - fp_logits[b]).norm() / fp_logits[b].norm()).item(), 4)
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        if name == "fp16" and 1 in batches:
            row, _ = decode_run(model, 1, a.prompt, a.new, graphs=False)
            print("fp16 eager (no graph)", json.dumps(row), flush=True)
            results["fp16-eager"] = {"rows": [row]}
            row, _ = decode_run(model, 1, a.prompt, a.new, fused=False)
            print("fp16 unfused (graph of torch ops)", json.dumps(row), flush=True)
            results["fp16-unfused"] = {"rows": [row]}
        if a.profile and device == "cuda":
            print(f"{name} profile (batch 1, eager, prompt {a.prompt}):\n" + profile_step(model, a.prompt), flush=True)
        results[name] = {"weight_bytes": model_bytes(model), "rows": rows, "build_seconds": build_s,
                         "seconds": round(time.time() - t)}
        if a.json:  # after every variant: a run cut short keeps what it measured
            json.dump({"gpu": gpu, "torch": torch.__version__, "triton": __import__("triton").__version__,
                       "layers": cfg.num_hidden_layers, "method_layers": a.method_layers, "prompt": a.prompt,
                       "new": a.new, "results": results}, open(a.json, "w"), indent=2)
        if model is not base:
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    title = (f"{gpu}: {cfg.num_hidden_layers} layers of " + ("a tiny Llama" if a.tiny else "Llama-3-8B shapes")
             + f", prompt {a.prompt}, {a.new} new tokens")
    print(f"\n{title}; tokens/s (x fp16)\n" + table(results, batches))
    if a.plot and "fp16" in results:
        plot(results, batches, a.plot, title)
    return results


if __name__ == "__main__":
    main()
