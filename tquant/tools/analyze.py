"""`tquant analyze`: where quantization hurts, layer by layer (weights, activations, output distance to fp).

Both models run on the same calibration tokens [B, T], `batch_size` rows at a time; forward hooks on every
linear layer of the fp model (nn.Linear or GPT-2's Conv1D) and on the quantized model's module of the same name
accumulate statistics per batch. Memory holds one batch's fp linear and block outputs, never all activations.

Definitions (x: all entries of a tensor, n of them; channel j: input channel, the last dim of an activation
[..., K] or column j of a weight W [N, K]):
    absmax         max |x|;   std = sqrt(m2);   m_p = mean((x - mean(x))^p)   (population moments)
    kurtosis       excess kurtosis m4 / m2^2 - 3 (0 for a Gaussian, -2 for +-1 signs); activations accumulate
                   float64 raw moments sum x^p, p <= 4, over batches
    c_j            channel absmax: max over rows (weights) or tokens (activations) of |x[..., j]|
    outliers       channels j with c_j > outlier_ratio * median_j c_j (torch.median: the lower median);
                   channel_ratio = max_j c_j / median_j c_j
    weight error   ||W_q - W||_F / ||W||_F; W_q is the float weight the quantized module applies, read back by
                   feeding it the identity (W_q^T = module(I) - bias) where that is exact: weight-only modules,
                   and per-token dynamic activation quantization (a one-hot row is on its grid); null where not
                   (static activation scales, fake-quantized outputs, unknown module types)
    output error   ||y_q - y_fp||_F / ||y_fp||_F over all tokens of a linear's output (or a block's output
                   hidden states), each model fed its own inputs: the error accumulated up to that layer
    cosine         mean over tokens of cos(y_q[t], y_fp[t]) along the feature dim
Methods that transform the model (QoQ's rotation, smoothing folded into norms) change weights and residual-stream
tensors as well: their weight errors and residual outputs compare different bases, the logits (lm_head) stay
comparable. The report lists what q_model's quantization_config says was folded ("folded_transforms",
folded_transforms), and the CLI prints it as a caution above its table.

JSON layout (write_json):
    {"format": "tquant-analysis-v1", "outlier_ratio": 6.0, "batches": 4, "tokens": 1024, "blocks_name": "model.layers",
     "folded_transforms": ["qoq: rotate (...)", ...] ([] when none),
     "layers": [{"name": "model.layers.0.self_attn.q_proj", "kind": "q_proj", "block": 0, "module": "PackedLinear",
                 "weight": {"fp": STATS, "quantized": STATS | null, "rel_error": float | null},
                 "input": {"fp": STATS, "quantized": STATS},
                 "output": {"rel_error": float, "cosine": float}}, ...],        (fp model order)
     "blocks": [{"name": "model.layers.0", "index": 0, "rel_error": float, "cosine": float}, ...]}
    STATS = {"absmax", "std", "kurtosis", "channel_ratio", "outliers" (count), "outlier_channels" [indices]}
    "input", "output" are null for a layer the forward pass never called; rel_error is null where ||y_fp|| = 0.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.block_io import hidden, hooked
from ..config import tquant_config
from ..models import conv1d_type, find_blocks
from ..modules import QuantizedLinear

FORMAT = "tquant-analysis-v1"
PROBE_ROWS = 1024  # identity rows per call when reading a quantized module's weight back


class Moments:
    """Float64 raw moments (n, sum x, ..., sum x^4) of all entries and the running channel absmax, over batches."""

    def __init__(self):
        self.sums = torch.zeros(5, dtype=torch.float64)
        self.channel = None

    def add(self, x: torch.Tensor) -> "Moments":
        x = x.detach().reshape(-1, x.shape[-1]).double()
        c = x.abs().amax(0).cpu()
        self.channel = c if self.channel is None else torch.maximum(self.channel, c)
        self.sums += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                                  *(x.pow(p).sum() for p in range(1, 5))]).cpu()
        return self

    def stats(self, outlier_ratio: float) -> dict | None:
        """STATS (module docstring) of everything added; None when nothing was."""
        n, s1, s2, s3, s4 = self.sums.tolist()
        if n == 0:
            return None
        mu = s1 / n
        m2 = s2 / n - mu**2
        m4 = s4 / n - 4 * mu * s3 / n + 6 * mu**2 * s2 / n - 3 * mu**4
        median = self.channel.median().item()
        outliers = torch.nonzero(self.channel > outlier_ratio * median).flatten().tolist()
        return {"absmax": self.channel.max().item(), "std": max(m2, 0.0) ** 0.5,
                "kurtosis": m4 / m2**2 - 3 if m2 > 0 else None,
                "channel_ratio": self.channel.max().item() / median if median > 0 else None,
                "outliers": len(outliers), "outlier_channels": outliers}


def tensor_stats(x: torch.Tensor, outlier_ratio: float = 6.0) -> dict:
    """STATS of one tensor [..., K] (a weight [N, K]: channels are its input columns)."""
    return Moments().add(x).stats(outlier_ratio)


class Distance:
    """Accumulates ||y - ref||^2, ||ref||^2 and per-token cosines over batches."""

    def __init__(self):
        self.err = self.ref = self.cos = self.n = 0.0

    def add(self, y: torch.Tensor, ref: torch.Tensor) -> None:
        y, ref = y.detach().double(), ref.detach().to(y.device).double()
        self.err += (y - ref).pow(2).sum().item()
        self.ref += ref.pow(2).sum().item()
        cos = nn.functional.cosine_similarity(y.reshape(-1, y.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1)
        self.cos += cos.sum().item()
        self.n += cos.numel()

    def result(self) -> dict | None:
        """{"rel_error": sqrt(err / ref), "cosine": mean cosine}; None when nothing was added."""
        if self.n == 0:
            return None
        return {"rel_error": (self.err / self.ref) ** 0.5 if self.ref > 0 else None, "cosine": self.cos / self.n}


def _probe_exact(module: nn.Module) -> bool:
    """Whether module(I) - bias is the weight it applies (weight-only, or per-token dynamic activation grids)."""
    return isinstance(module, QuantizedLinear) and module.probe_exact()


@torch.no_grad()
def float_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Float32 [N, K] weight a linear layer applies: nn.Linear's / Conv1D's own, a quantized module's read back
    from its outputs on identity rows (in `dtype`) minus its bias; None where that is not exact (see _probe_exact)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if isinstance(module, conv1d_type()):
        return module.weight.detach().t().float()
    if not _probe_exact(module):
        return None
    k, device = module.in_features, next(module.buffers()).device
    eye = torch.eye(k, dtype=dtype, device=device)
    wt = torch.cat([module(eye[i : i + PROBE_ROWS]).float() for i in range(0, k, PROBE_ROWS)])
    if module.bias is not None:
        wt = wt - module.bias.float()
    return wt.t().contiguous()


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module, None for anything else."""
    if isinstance(module, conv1d_type()):
        return module.weight.shape[0], module.nf
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    return None


def matched_layers(fp_model: nn.Module, q_model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, fp module, quantized module) of every nn.Linear / Conv1D of fp_model, in model order; ValueError
    when q_model lacks one or it has another shape."""
    fp_layers = [(n, m) for n, m in fp_model.named_modules() if isinstance(m, (nn.Linear, conv1d_type()))]
    if not fp_layers:
        raise ValueError(f"fp_model ({type(fp_model).__name__}) has no nn.Linear layers to compare")
    q_modules = dict(q_model.named_modules())
    missing = [n for n, _ in fp_layers if n not in q_modules]
    if missing:
        raise ValueError(f"q_model has no module named {missing[0]!r} ({len(missing)} of the fp model's "
                         f"{len(fp_layers)} linear layers are missing): the two models have different architectures")
    out = []
    for name, fp in fp_layers:
        q = q_modules[name]
        if _features(q) != _features(fp):
            raise ValueError(f"{name}: the fp layer is {_features(fp)} (in, out) features, the quantized one "
                             f"({type(q).__name__}) {_features(q)}: the two models have different architectures")
        out.append((name, fp, q))
    return out


def _blocks(fp_model: nn.Module, q_model: nn.Module) -> tuple[str, nn.ModuleList, nn.ModuleList]:
    name, fp_blocks = find_blocks(fp_model)
    try:
        q_blocks = q_model.get_submodule(name)
    except AttributeError:
        q_blocks = None
    if not isinstance(q_blocks, nn.ModuleList) or len(q_blocks) != len(fp_blocks):
        raise ValueError(f"the fp model has {len(fp_blocks)} decoder blocks at {name!r}, the quantized model "
                         f"{len(q_blocks) if isinstance(q_blocks, nn.ModuleList) else 'none'}")
    return name, fp_blocks, q_blocks


# (method, option) -> what a true / nonzero value of that option folds into the weights
FOLDS = {("qoq", "rotate"): "a Hadamard rotation of the residual stream (norms folded into the linears)",
         ("qoq", "smooth_attention"): "SmoothAttention scales into q_proj / k_proj",
         ("qoq", "smooth_xw"): "smoothing scales into the output modules' producers",
         ("qoq_kv4", "smooth_alpha"): "SmoothAttention scales into q_proj / k_proj",
         ("smoothquant", "alpha"): "smoothing scales into the norms and producers",
         ("qqq", "smooth_grid"): "smoothing scales into the norms and producers (where the search chose them)",
         ("abq", "let"): "LET scales and shifts into the norms and producers"}


def folded_transforms(model: nn.Module) -> list[str]:
    """What model's tquant quantization_config (weight method and KV-cache method) says was folded into its weights:
    ["method: option (what)"], [] for none or an unquantized model."""
    qc = tquant_config(model.config) if hasattr(model, "config") else None
    if qc is None:
        return []
    specs = [(qc.get("method"), qc.get("options") or {}), *([(qc["kv_cache"]["method"], qc["kv_cache"])]
                                                           if isinstance(qc.get("kv_cache"), dict) else [])]
    return [f"{method}: {option} ({what})" for method, options in specs for (m, option), what in FOLDS.items()
            if m == method and options.get(option)]


def _check_tokens(tokens) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be an integer tensor [B, T], got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 2-D [B, T], got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError("tokens are empty: give at least one row of calibration tokens")


def _block_index(name: str, blocks_name: str) -> int | None:
    prefix = blocks_name + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


@torch.no_grad()
def _run(fp_model, q_model, layers, blocks, tokens, batch_size, progress):
    """Both models over the token batches: ({name: (fp input Moments, q input Moments, output Distance)},
    [block Distance])."""
    _, fp_blocks, q_blocks = blocks
    stats = {name: (Moments(), Moments(), Distance()) for name, _, _ in layers}
    block_dist = [Distance() for _ in fp_blocks]
    ref, ref_blocks = {}, {}

    def keep(name, moments):
        def hook(m, inp, out):
            moments.add(inp[0])
            ref[name] = out
        return hook

    def compare(name, moments, dist):
        def hook(m, inp, out):
            moments.add(inp[0])
            dist.add(out, ref.pop(name))
        return hook

    fp_hooks = [fp.register_forward_hook(keep(n, stats[n][0])) for n, fp, _ in layers]
    fp_hooks += [b.register_forward_hook(lambda m, i, o, j=j: ref_blocks.__setitem__(j, hidden(o)))
                 for j, b in enumerate(fp_blocks)]
    q_hooks = [q.register_forward_hook(compare(n, stats[n][1], stats[n][2])) for n, _, q in layers]
    q_hooks += [b.register_forward_hook(lambda m, i, o, j=j: block_dist[j].add(hidden(o), ref_blocks.pop(j)))
                for j, b in enumerate(q_blocks)]
    fp_dev, q_dev = next(fp_model.parameters()).device, next(q_model.parameters()).device
    with hooked(fp_hooks + q_hooks):
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="analyze batches", disable=not progress):
            ids = tokens[start : start + batch_size]
            fp_model(input_ids=ids.to(fp_dev), use_cache=False)
            q_model(input_ids=ids.to(q_dev), use_cache=False)
    return stats, block_dist


def _weight_entry(fp: nn.Module, q: nn.Module, outlier_ratio: float) -> dict:
    w = float_weight(fp)
    wq = float_weight(q, fp.weight.dtype)
    return {"fp": tensor_stats(w, outlier_ratio),
            "quantized": None if wq is None else tensor_stats(wq, outlier_ratio),
            "rel_error": None if wq is None else ((wq.to(w.device) - w).norm() / w.norm()).item()}


def analyze(fp_model: nn.Module, q_model: nn.Module, tokens: torch.Tensor, *, outlier_ratio: float = 6.0,
            batch_size: int = 1, max_batches: int | None = None, progress: bool = True) -> dict:
    """The report (module docstring's JSON layout) of q_model against fp_model on tokens [B, T], `batch_size`
    rows per forward pass, at most `max_batches` passes (None: all rows)."""
    _check_tokens(tokens)
    if fp_model is q_model:
        raise ValueError("fp_model and q_model are the same object: quantize a copy (copy.deepcopy) to compare")
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"batch_size and max_batches must be >= 1, got {batch_size} and {max_batches}")
    if outlier_ratio <= 0:
        raise ValueError(f"outlier_ratio must be > 0, got {outlier_ratio}")
    if max_batches is not None:
        tokens = tokens[: max_batches * batch_size]
    layers = matched_layers(fp_model, q_model)
    blocks = _blocks(fp_model, q_model)
    stats, block_dist = _run(fp_model, q_model, layers, blocks, tokens, batch_size, progress)
    entries = []
    for name, fp, q in tqdm(layers, desc="analyze layers", disable=not progress):
        fp_in, q_in, dist = stats[name]
        inputs = {"fp": fp_in.stats(outlier_ratio), "quantized": q_in.stats(outlier_ratio)}
        entries.append({"name": name, "kind": name.rpartition(".")[2], "block": _block_index(name, blocks[0]),
                        "module": type(q).__name__, "weight": _weight_entry(fp, q, outlier_ratio),
                        "input": None if inputs["fp"] is None else inputs, "output": dist.result()})
    return {"format": FORMAT, "outlier_ratio": outlier_ratio, "batches": -(-tokens.shape[0] // batch_size),
            "tokens": tokens.numel(), "blocks_name": blocks[0], "folded_transforms": folded_transforms(q_model),
            "layers": entries,
            "blocks": [{"name": f"{blocks[0]}.{i}", "index": i, **(d.result() or {"rel_error": None, "cosine": None})}
                       for i, d in enumerate(block_dist)]}


def write_json(report: dict, path) -> Path:
    """Write the report as indented JSON (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def _get(entry: dict, *keys):
    """entry[k1][k2]...; NaN where any level is null (matplotlib leaves NaN out)."""
    for k in keys:
        entry = entry.get(k) if isinstance(entry, dict) else None
    return float("nan") if entry is None else entry


def _block_ticks(ax, layers: list[dict]) -> None:
    """x ticks at each decoder block's first layer (at most about 16 labels)."""
    firsts = {}
    for i, e in enumerate(layers):
        if e["block"] is not None:
            firsts.setdefault(e["block"], i)
    step = max(1, len(firsts) // 16)
    shown = {b: i for b, i in firsts.items() if b % step == 0}
    ax.set_xticks(list(shown.values()), [str(b) for b in shown])
    ax.set_xlabel("decoder block (its linear layers in model order; layers outside blocks at the ends)")


def _layer_bars(ax, layers: list[dict], values: list[float], ylabel: str, title: str) -> None:
    """Bars over the layers in model order, one color per layer kind (q_proj, down_proj, ...)."""
    kinds = list(dict.fromkeys(e["kind"] for e in layers))
    for c, kind in enumerate(kinds):
        idx = [i for i, e in enumerate(layers) if e["kind"] == kind]
        ax.bar(idx, [values[i] for i in idx], color=f"C{c % 10}", label=kind, width=0.9)
    _block_ticks(ax, layers)
    ax.set(ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _figure(rows: int):
    from matplotlib.figure import Figure  # no pyplot: draws with the Agg canvas, leaves global state alone

    fig = Figure(figsize=(11, 3.8 * rows), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def plot(report: dict, out_dir) -> list[Path]:
    """PNGs of the report in out_dir: layer output errors, block output error and cosine over depth, weight
    kurtosis and error, input activation absmax and outlier counts. Returns their paths."""
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, blocks = report["layers"], report["blocks"]
    paths = []

    fig, (ax,) = _figure(1)
    _layer_bars(ax, layers, [_get(e, "output", "rel_error") for e in layers], "||y_q - y_fp|| / ||y_fp||",
                "Relative output error of each linear layer (quantized vs fp model, accumulated)")
    paths.append(out_dir / "layer_output_error.png")
    fig.savefig(paths[-1], dpi=110)

    fig, (err, cos) = _figure(2)
    idx = [b["index"] for b in blocks]
    err.plot(idx, [_get(b, "rel_error") for b in blocks], marker="o")
    err.set(title="Block output hidden states: relative error to the fp model", xlabel="decoder block",
            ylabel="||h_q - h_fp|| / ||h_fp||")
    cos.plot(idx, [_get(b, "cosine") for b in blocks], marker="o", color="C1")
    cos.set(title="Block output hidden states: mean per-token cosine similarity to the fp model",
            xlabel="decoder block", ylabel="cosine")
    for ax in (err, cos):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    paths.append(out_dir / "block_error.png")
    fig.savefig(paths[-1], dpi=110)

    fig, (kurt, werr) = _figure(2)
    x = range(len(layers))
    kurt.plot(x, [_get(e, "weight", "fp", "kurtosis") for e in layers], marker=".", label="fp weight")
    kurt.plot(x, [_get(e, "weight", "quantized", "kurtosis") for e in layers], marker=".", label="quantized weight")
    kurt.set(title="Weight excess kurtosis per linear layer, before and after quantization", ylabel="excess kurtosis")
    _block_ticks(kurt, layers)
    kurt.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _layer_bars(werr, layers, [_get(e, "weight", "rel_error") for e in layers], "||W_q - W|| / ||W||",
                "Relative weight error per linear layer")
    paths.append(out_dir / "weights.png")
    fig.savefig(paths[-1], dpi=110)

    fig, (amax, outl) = _figure(2)
    _layer_bars(amax, layers, [_get(e, "input", "fp", "absmax") for e in layers], "max |x|",
                "Input activation absmax of each linear layer (fp model)")
    _layer_bars(outl, layers, [_get(e, "input", "fp", "outliers") for e in layers], "outlier input channels",
                f"Outlier input channels (channel absmax > {report['outlier_ratio']:g} x median, fp model)")
    paths.append(out_dir / "activations.png")
    fig.savefig(paths[-1], dpi=110)
    return paths


def worst_layers(report: dict, n: int = 10) -> str:
    """A text table of the n layers with the largest relative output error."""
    known = [e for e in report["layers"] if _get(e, "output", "rel_error") >= 0]  # NaN (unknown) compares False
    ranked = sorted(known, key=lambda e: -e["output"]["rel_error"])[:n]
    columns = {"out err": ("output", "rel_error"), "cosine": ("output", "cosine"), "W err": ("weight", "rel_error"),
               "x kurt": ("input", "fp", "kurtosis"), "x outl": ("input", "fp", "outliers")}
    rows = [f"{'layer':44} {'module':15}" + "".join(f" {c:>8}" for c in columns)]
    for e in ranked:
        rows.append(f"{e['name']:44} {e['module']:15}" + "".join(f" {_get(e, *k):>8.4g}" for k in columns.values()))
    return "\n".join(rows)


def cmd_analyze(a) -> None:
    """tquant analyze: load both models and the calibration tokens, write analysis.json and the PNGs."""
    import transformers

    from .. import load
    from ..calib.data import calibration_data
    from ..models import load_model

    q_model = load(a.dir, device=a.device)
    base = a.model or tquant_config(q_model.config).get("base_model")
    if base is None:
        raise ValueError(f"{a.dir} does not record the fp model it came from (saved by tquant.save, not `tquant "
                         "quantize`): give it with --model (an HF path or id, or 'default')")
    tokenizer = transformers.AutoTokenizer.from_pretrained(a.dir)
    fp_model, _ = load_model(base, dtype=a.dtype or q_model.dtype, device=a.device)
    tokens = calibration_data(a.calib, tokenizer, n_samples=a.n_samples, seqlen=a.seqlen)
    report = analyze(fp_model, q_model, tokens, outlier_ratio=a.outlier_ratio, batch_size=a.batch_size)
    out = Path(a.out or os.path.join(a.dir, "analysis"))
    written = [write_json(report, out / "analysis.json"), *plot(report, out)]
    if report["folded_transforms"]:
        print("caution: this model's method folded transforms into its weights, so its weight errors and residual-"
              "stream outputs (o_proj, down_proj, blocks) compare different bases; the other linears' outputs and the "
              "lm_head compare like with like:\n  " + "\n  ".join(report["folded_transforms"]))
    print(worst_layers(report, 10))
    print("wrote " + ", ".join(str(p) for p in written))
