"""The one layer-by-layer driver every method runs through.

    blocks = the decoder layers (found generically: the nn.ModuleList holding the most parameters)
    X_0    = inputs of block 0 on the calibration set, and each block's own other inputs (masks, rotary tables:
             they differ between attention kinds), captured in one pass through stand-ins for the blocks
    for block i (moved alone to `device`):
        input groups = linears reading the same tensor (q/k/v, gate/up), in the block's call order
        method.prepare_block(...)               # block-level transforms first (smoothing, LKD)
        for each stage (true-sequential: one input group; else all of them):
            run the block on X_i, stopping once the stage's last linear has run, with hooks that
            collect one statistics state per input group -> method.quantize each linear
            write the de-quantized weight back so later stages see the quantization error (and, for
            weight-activation methods, fake-quantize the layer's input by method.input_transform)
        method.finish_block(...)                # block-level tuning of the results (QuIP# fine-tuning)
        X_{i+1} = block(X_i)                    # with quantized weights
        swap every quantized nn.Linear for its module (PackedLinear, ActQuantLinear); move the block back
Data-free methods (RTN) skip the forward passes.

Mixture of experts (transformers 5 keeps Mixtral's, Qwen3-MoE's, ... experts as fused 3-D weights, not nn.Linear):
an experts module is a stage of its own, at the place the block calls it. Its pass captures what the block hands it
(hidden states and the router's top-k choice, tquant.calib.experts); then expert by expert, gate_up and down are each
quantized by the method through new_state / add_batch / quantize on a stand-in nn.Linear of that expert's weight,
from the tokens the router sent it (moe_calibration="routed") or from all tokens ("all"), down from act(gate) * up of
those tokens through the already-quantized gate_up (true-sequential). An expert below moe_min_tokens routed tokens
is calibrated on all tokens, logged per layer. The module becomes a PackedExperts. Routers (the MoE block's gate,
Qwen2-MoE's shared_expert_gate) stay in float; shared experts are ordinary linears. Methods with block-level steps or
other weight types are refused on experts (Method.experts_refusal) unless skip= leaves the experts in float.

Where the blocks' weights live: a BlockStore. The default keeps the model in memory (nothing to load or write, every
run starts at block 0). tquant.streaming's store reads each block from the float checkpoint's safetensors shards just
before it is quantized (the blocks wait on the meta device), writes it to the output shards and frees it just after,
and resumes a stopped run at its first block not written. One log line per block says how long it took, the time
so far and an estimate of the time left (progress=True).

Faults: calibration activations entering block 0 that are not finite (NaN / inf) are refused before any layer
changes; non-finite states entering a later block, and any error while quantizing block i (a singular Hessian, out
of memory, a method's own refusal), stop the run with an error of the same type naming the block (and the layer,
where one was being quantized) and saying what state the model is left in (partly_quantized).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .calib import experts as moe
from .calib.block_io import hidden, hooked
from .methods.base import Method
from .modules import PackedEmbedding, PackedExperts, linear_module
from .formats.weights import QuantizedWeight
from .formats.quantizer import resolve_group_size
from .models import activation_name, check_weights_supported, conv1d_type, find_blocks, find_experts, model_type

log = logging.getLogger("tquant")


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


class _StageDone(Exception):
    pass


def _stop(module, inputs, output):
    raise _StageDone


class _StandIn(nn.Module):
    """Takes the place of the whole block list: answers each call with fn(args, kwargs)."""

    def __init__(self, block: nn.Module, fn):
        super().__init__()
        self.block, self.fn = block, fn

    def __getattr__(self, name):  # models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, *args, **kwargs):
        return self.fn(args, kwargs)


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linears by name, after turning GPT-2 style Conv1D (y = x W + b, W [K, N]) into nn.Linear."""
    Conv1D = conv1d_type()
    for name, mod in list(block.named_modules()):
        if isinstance(mod, Conv1D):
            k, n = mod.weight.shape
            lin = nn.Linear(k, n, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
            lin.weight.data = mod.weight.data.t().contiguous()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data
            block.set_submodule(name, lin)
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _routers(block: nn.Module, experts: dict[str, nn.Module]) -> list[str]:
    """Names of the routers and gates beside each experts module (children of its parent holding a 2-D weight of
    num_experts or 1 rows: Mixtral's TopKRouter, Qwen2-MoE's shared_expert_gate nn.Linear), which stay in float."""
    found = []
    for name, mod in experts.items():
        parent_name = name.rpartition(".")[0]
        parent = block.get_submodule(parent_name) if parent_name else block
        for child_name, child in parent.named_children():
            w = getattr(child, "weight", None)
            if child is not mod and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] in (1, mod.gate_up_proj.shape[0]):
                found.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return found


def _expert_linear(param: torch.Tensor, e: int) -> nn.Linear:
    """A stand-in nn.Linear whose weight is expert e's slice of a fused [E, N, K] parameter (shared, not copied)."""
    w = param.data[e]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


@contextlib.contextmanager
def _without_blocks(model, blocks_name: str, stand_in, device):
    """The model with its block list replaced by stand_in (one module or a list of them) and every other module
    moved to `device`."""
    parent_name, _, attr = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    home = next(model.parameters()).device
    model.to(device)
    setattr(parent, attr, nn.ModuleList(stand_in if isinstance(stand_in, list) else [stand_in]))
    try:
        yield
    finally:
        setattr(parent, attr, nn.ModuleList())
        model.to(home)
        setattr(parent, attr, blocks)


def _batches(calib: torch.Tensor, batch_size: int, device):
    for start in range(0, calib.shape[0], batch_size):
        yield calib[start : start + batch_size].to(device)


@torch.no_grad()
def capture_block_inputs(model, blocks_name, blocks, calib: torch.Tensor, device, batch_size: int):
    """[(args, kwargs)] of block 0, one entry per calibration batch; only non-block modules go to device."""
    return capture_all_block_inputs(model, blocks_name, blocks, calib, device, batch_size)[0]


@torch.no_grad()
def capture_all_block_inputs(model, blocks_name, blocks, calib: torch.Tensor, device, batch_size: int):
    """(block 0's [(args, kwargs)] per calibration batch, and for every block i its own [(args[1:], kwargs)] per
    batch). Each block gets what the model hands that block: models with several attention kinds (Gemma-2/3's
    alternating sliding / full layers, Qwen's layer_types) pass each layer the mask and rotary table of its
    kind. One forward per batch through stand-ins that record their call and pass the hidden states on unchanged
    (the masks and position tables are computed before the first layer, from the ids alone); the last one stops
    the pass."""
    calls = [[] for _ in blocks]

    def record(i):
        def fn(args, kwargs):
            calls[i].append((args, kwargs))
            if i == len(blocks) - 1:
                raise _Captured(args, kwargs)
            return args[0]
        return fn

    stand_ins = [_StandIn(b, record(i)) for i, b in enumerate(blocks)]
    with _without_blocks(model, blocks_name, stand_ins, device):
        for ids in _batches(calib, batch_size, device):
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
            if any(len(c) != len(calls[0]) for c in calls):
                raise RuntimeError(f"model type {model_type(model)!r}: the model did not call each of its {len(blocks)} decoder "
                                   "blocks once per forward; tquant cannot capture the blocks' inputs")
    return calls[0], [[(args[1:], kwargs) for args, kwargs in c] for c in calls]


def _run_passes(passes) -> None:
    """Call each pass; a hook raising _StageDone ends that pass early."""
    for run in passes:
        try:
            run()
        except _StageDone:
            pass


@torch.no_grad()
def _input_groups(block, linears: dict[str, nn.Linear], args, kwargs, experts=None) -> list[list[str]]:
    """Linears grouped by the input tensor they read, in the order the block calls them; each experts module a
    group of its own, at its place in that order."""
    calls = []
    experts = experts or {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: calls.append((n, i[0]))) for n, m in linears.items()]
    hooks += [m.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, None))) for n, m in experts.items()]
    with hooked(hooks):
        block(*args, **kwargs)
    groups, prev = [], None
    for name, inp in calls:
        if any(name in g for g in groups):
            continue
        if groups and inp is not None and inp is prev:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = inp
    return groups + [[n] for n in [*linears, *experts] if not any(n in g for g in groups)]


def _with_message(e: BaseException, message: str) -> BaseException:
    """An exception of e's type (RuntimeError where that type takes other arguments) carrying message."""
    try:
        return type(e)(message)
    except TypeError:
        return RuntimeError(message)


def _within_dtype(qw, dtype: torch.dtype, name: str):
    """qw with no code naming a grid point past dtype's largest value (QuantizedWeight.within_dtype; other weight
    types as they are), said on the "tquant" logger when codes move: such a point would be inf in the dequantized
    weight written back here and in the module's kernels that dequantize into dtype."""
    if not isinstance(qw, QuantizedWeight):
        return qw
    qw, moved = qw.within_dtype(dtype)
    if moved:
        log.warning(f"{name}: {moved} codes named grid points past {dtype}'s largest value "
                    f"{torch.finfo(dtype).max:.6g} ({qw.bits}-bit grid of a group with weights near it); each moved to "
                    "the nearest point inside (QuantizedWeight.within_dtype)")
    return qw


@contextlib.contextmanager
def _naming(layer: str):
    """Errors inside name `layer` (unless their message already does)."""
    try:
        yield
    except Exception as e:
        if layer in str(e):
            raise
        raise _with_message(e, f"layer {layer}: {e}") from e


def partly_quantized(i: int, blocks_name: str) -> str:
    """What a failure while quantizing block i leaves behind."""
    done = "no block was swapped for quantized modules" if i == 0 else \
        f"blocks {blocks_name}.0 .. {blocks_name}.{i - 1} hold quantized modules"
    return (f"the model is left partly quantized ({done}; block {i}'s float weights may hold de-quantized values): "
            "load it again before another try")


def check_finite(states: list[torch.Tensor], where: str) -> None:
    """ValueError naming the first calibration batch whose hidden states `where` hold NaN or inf."""
    for b, h in enumerate(states):
        if not torch.isfinite(h).all():
            bad = int((~torch.isfinite(h)).sum())
            raise ValueError(f"calibration batch {b}: {bad} non-finite (NaN / inf) activations {where}")


@torch.no_grad()
def _quantize_block(block, linears, inputs, method: Method, prefix: str, true_sequential: bool, dtype,
                    experts=None, moe_options=("routed", None)):
    """Quantize one block's linears and experts modules in place (swapping in their modules). Returns
    ({name: spec}, the block's outputs on `inputs` with the quantized weights, or None without inputs).
    moe_options: (moe_calibration, moe_min_tokens)."""
    experts = experts or {}
    groups = [[n] for n in [*linears, *experts]] if inputs is None else _input_groups(block, linears, *inputs[0],
                                                                                       experts=experts)
    if inputs is not None:
        method.prepare_block(block, linears, groups, inputs, prefix)
    results, expert_results = {}, {}
    for stage in [[g] for g in groups] if true_sequential else [groups]:
        linear_groups = [g for g in stage if g[0] not in experts]
        states = {g[0]: method.new_state(prefix + g[0], linears[g[0]]) for g in linear_groups}
        captured = {g[0]: [] for g in stage if g[0] in experts}
        if inputs is not None and method.needs_layer_stats:
            last = stage[-1][-1]
            stats = [linears[g[0]].register_forward_hook(lambda m, i, o, s=states[g[0]]: s.add_batch(i[0]))
                     for g in linear_groups]
            stats += [experts[n].register_forward_pre_hook(_capture(store, stop=n == last), with_kwargs=True)
                      for n, store in captured.items()]
            if last in linears:
                stats.append(linears[last].register_forward_hook(_stop))
            with hooked(stats):
                _run_passes(lambda a=a, k=k: block(*a, **k) for a, k in inputs)
        for g in linear_groups:
            for n in g:
                with _naming(prefix + n):
                    qw = _within_dtype(method.quantize(states[g[0]], linears[n], prefix + n), dtype, prefix + n)
                linears[n].weight.data = qw.dequantize().to(linears[n].weight.dtype)
                transform = method.input_transform(prefix + n)
                if transform is not None:
                    linears[n].register_forward_pre_hook(lambda m, a, t=transform: (t(a[0]),) + tuple(a[1:]))
                results[n] = qw
        for n, store in captured.items():
            expert_results[n] = _quantize_experts(experts[n], store if inputs is not None and method.needs_layer_stats
                                                  else None, method, prefix + n, true_sequential, *moe_options)
    if inputs is not None:
        method.finish_block(block, linears, results, inputs, prefix)
    outputs = None if inputs is None else [block(*args, **kwargs) for args, kwargs in inputs]
    specs = {}
    for n, qw in results.items():
        block.set_submodule(n, linear_module(qw, linears[n].bias, dtype))
        specs[prefix + n] = block.get_submodule(n).layer_spec()
    for n, (gate_up, down, calibration) in expert_results.items():
        packed = PackedExperts.from_quantized(gate_up, down, activation_name(experts[n]), dtype, calibration)
        block.set_submodule(n, packed)
        specs[prefix + n] = packed.layer_spec()
    return specs, outputs


def _capture(store: list, stop: bool):
    """A forward pre-hook (with kwargs) of an experts module appending (hidden states [T, H], top-k index [T, k]) of
    each call to store; stop: then end the pass (the stage's last member)."""
    def hook(module, args, kwargs):
        store.append(moe.experts_call(args, kwargs))
        if stop:
            raise _StageDone
    return hook


def _check_expert_weight(qw, method: Method, name: str) -> None:
    if type(qw) is not QuantizedWeight or qw.act_bits is not None or qw.smooth is not None:
        raise ValueError(f"method {method.name!r} made a {type(qw).__name__} for expert projection {name} "
                         f"(act_bits={getattr(qw, 'act_bits', None)}): tquant's experts module (PackedExperts) stores "
                         "weight-only QuantizedWeights only; quantize the experts with rtn or gptq, or skip them")


def _quantize_expert_part(method: Method, name: str, linear: nn.Linear, inputs: list[torch.Tensor]):
    """One expert projection (a stand-in nn.Linear sharing the expert's weight) quantized by the method from its
    inputs; the de-quantized weight is written back into the experts' tensor. Returns the method's weight."""
    with _naming(name):
        state = method.new_state(name, linear)
        for x in inputs:
            state.add_batch(x)
        qw = method.quantize(state, linear, name)
        _check_expert_weight(qw, method, name)
        qw = _within_dtype(qw, linear.weight.dtype, name)
    linear.weight.data.copy_(qw.dequantize().to(linear.weight.dtype))
    return qw


@torch.no_grad()
def _quantize_experts(experts: nn.Module, captured, method: Method, name: str, true_sequential: bool, mode: str,
                      min_tokens: int | None):
    """Quantize every expert of a fused experts module, writing each de-quantized weight back into the float module
    (so the block's later stages and outputs see the quantization error). captured: [(hidden [T, H], top-k index
    [T, k])] per calibration batch, None for a data-free method. Returns (gate_up weights, down weights, calibration
    facts for the layer spec or None)."""
    n_exp, two_i, h = experts.gate_up_proj.shape
    i = two_i // 2
    calibration, fallback = None, set()
    if captured is not None:
        counts = moe.routed_counts(captured, n_exp)
        least = min_tokens or moe.default_min_tokens(h, i)
        fallback = set(moe.on_all_tokens(counts, mode, least))
        log.info(moe.summary(name, counts, mode, least, sorted(fallback)))
        calibration = {"mode": mode, "min_tokens": least, "routed_tokens": counts,
                       "on_all_tokens": sorted(fallback)}
    gate_ups, downs = [], []
    for e in range(n_exp):
        gu, dn = _expert_linear(experts.gate_up_proj, e), _expert_linear(experts.down_proj, e)
        gu_name, dn_name = f"{name}.{e}.gate_up_proj", f"{name}.{e}.down_proj"
        xs = [] if captured is None else moe.expert_tokens(captured, e, e in fallback)
        # the down projection's inputs: through the float gate_up unless true-sequential (then the quantized one)
        hs = None if true_sequential else [moe.gated(experts, x, gu.weight) for x in xs]
        gate_ups.append(_quantize_expert_part(method, gu_name, gu, xs))  # writes into experts.gate_up_proj[e]
        if hs is None:
            hs = [moe.gated(experts, x, gu.weight) for x in xs]
        downs.append(_quantize_expert_part(method, dn_name, dn, hs))
    return gate_ups, downs, calibration


class BlockStore:
    """Where the driver finds each block's weights and leaves its results. This one is the model in memory: nothing
    to load or write, and every run starts at block 0. tquant.streaming.ShardStore reads a block from safetensors
    shards in load(), writes and frees it in done(), and resumes a stopped run from what begin() finds on disk."""

    def begin(self, method: Method, calib: torch.Tensor | None, n_blocks: int, device: torch.device):
        """Before block 0 (after every check): (first block to quantize, the hidden states entering it, on `device`
        where the blocks run, or None to capture them, {layer name: spec} of the blocks before it, whether blocks
        return tuples)."""
        return 0, None, {}, False

    def load(self, block: nn.Module, prefix: str) -> None:
        """Put block `prefix`'s float weights in place before it is quantized."""

    def done(self, i: int, block: nn.Module, prefix: str, specs: dict, states, tuple_out: bool,
             method: Method) -> None:
        """Block i is quantized (specs: its layer specs; states: the hidden states entering block i + 1)."""


def _block_targets(block: nn.Module, prefix: str, skip: Callable[[str], bool]):
    """({name: nn.Linear} to quantize, {name: experts module} to quantize, [full names of the routers and gates
    that stay in float]) of one block; GPT-2 style Conv1D become nn.Linear on the way (_linears)."""
    experts = find_experts(block)
    kept = _routers(block, experts)
    linears = {n: m for n, m in _linears(block).items() if not skip(prefix + n) and n not in kept}
    return linears, {n: m for n, m in experts.items() if not skip(prefix + n)}, [prefix + n for n in kept]


def _planned(block: nn.Module) -> nn.Module:
    """The block the up-front checks look at: itself, or a copy while its weights are not loaded yet (on the meta
    device, a streaming run): turning a Conv1D into nn.Linear transposes a weight, which must wait for the weight."""
    return copy.deepcopy(block) if any(p.is_meta for p in block.parameters()) else block


def _duration(seconds: float) -> str:
    """'4.2 s', '42 s', '3 min 05 s', '2 h 07 min'."""
    s = round(seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _progress_line(name: str, i: int, n: int, first: int, started: float, block_started: float) -> str:
    """The log line after block i of n: its time, the time since block `first` (where this run began: a resumed
    run counts from its own first block) and the time left at this run's mean pace."""
    now = time.monotonic()
    done, elapsed = i + 1 - first, now - started
    left = elapsed / done * (n - i - 1)
    return (f"block {i + 1}/{n} ({name}) done in {_duration(now - block_started)}; elapsed {_duration(elapsed)}, "
            f"ETA {_duration(left)}" + ("" if i + 1 < n else " (all blocks done)"))


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    method: Method,
    calib: torch.Tensor | None,
    *,
    device=None,
    true_sequential: bool = True,
    batch_size: int = 8,
    skip: Callable[[str], bool] = lambda name: False,
    lm_head: bool = False,
    embeddings: bool = False,
    progress: bool = True,
    fit_group_size: bool = False,
    moe_calibration: str = "routed",
    moe_min_tokens: int | None = None,
    store: BlockStore | None = None,
) -> dict[str, dict]:
    """Quantize every nn.Linear inside the decoder blocks, and every mixture-of-experts experts module (fused 3-D
    weights -> PackedExperts; routers stay in float), and the lm_head / input embedding if asked, in place.
    Returns {layer name: module spec}. fit_group_size=True (the caller gave no group_size): the method's default
    group size becomes the largest of 128 / 64 / 32 dividing every quantized layer's in_features
    (Method.fit_group_size), said in one line on the "tquant" logger. moe_calibration "routed" (each expert on the
    tokens its router sends it) or "all" (every token to every expert); moe_min_tokens: under "routed", an expert
    with fewer routed calibration tokens is calibrated on all tokens (None: 2 x its widest input; tquant.calib.experts).
    store: where the blocks' weights come from and go (BlockStore; None: the model in memory)."""
    moe.check_options(moe_calibration, moe_min_tokens)
    store = store or BlockStore()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks_name, blocks = find_blocks(model)
    check_weights_supported(model, blocks_name, blocks, method.name, method.experts_refusal(), skip)
    dtype = next(model.parameters()).dtype
    targets, expert_targets, routers = [], [], []
    for i, block in enumerate(blocks):
        linears, experts, kept = _block_targets(_planned(block), f"{blocks_name}.{i}.", skip)
        targets.append(linears)
        expert_targets.append(experts)
        routers += kept
    if not any(targets) and not any(expert_targets):
        raise ValueError("no nn.Linear layer is left to quantize (all were skipped)")
    if any(expert_targets):
        n_exp = next(m for e in expert_targets for m in e.values()).gate_up_proj.shape[0]
        log.info(f"mixture of experts: {sum(map(len, expert_targets))} experts modules of {n_exp} experts, each "
                 f"expert quantized by {method.name} (moe_calibration={moe_calibration!r}); routers and gates stay "
                 f"in float ({', '.join(routers[:2])}{', ...' if len(routers) > 2 else ''})")
    head = emb = None
    if lm_head:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"lm_head=True needs an nn.Linear output embedding, found {type(head).__name__}")
    if embeddings:
        emb = model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"embeddings=True needs an nn.Embedding input embedding, found {type(emb).__name__}")
    if fit_group_size:  # the caller gave no group_size: the method's default, fitted to every layer quantized
        widths = [m.in_features for lin in targets for m in lin.values()]
        widths += [w for ex in expert_targets for m in ex.values() for w in (m.gate_up_proj.shape[2],
                                                                            m.down_proj.shape[2])]
        widths += [head.in_features] if head is not None else []
        widths += [emb.embedding_dim] if emb is not None else []
        line = method.fit_group_size(widths)
        if line:
            log.info(line)
    for i, lin in enumerate(targets):
        for n, m in lin.items():
            method.check_layer(m, f"{blocks_name}.{i}.{n}")
        for n, m in expert_targets[i].items():
            for proj in ("gate_up_proj", "down_proj"):
                method.check_layer(_expert_linear(getattr(m, proj), 0), f"{blocks_name}.{i}.{n}.0.{proj}")
    if head is not None:
        method.check_layer(head, "lm_head")
    if emb is not None:
        resolve_group_size(method.group_size, emb.embedding_dim, "embeddings")
    del targets, expert_targets  # the planned layers: each block's own are found again once its weights are in

    if method.needs_calibration and (calib is None or calib.numel() == 0):
        raise ValueError(f"method {method.name!r} needs calibration data (calib=)")
    first, states, specs, tuple_out = store.begin(method, calib if method.needs_calibration else None, len(blocks),
                                                   device)
    per_block = None  # each block's own other inputs (masks, rotary tables: they differ between attention kinds)
    if method.needs_calibration:
        captured, per_block = capture_all_block_inputs(model, blocks_name, blocks, calib, device, batch_size)
        if states is None:  # the hidden states entering block `first` (0 here; a resumed run's come from begin)
            states = [args[0] for args, _ in captured]
            check_finite(states, f"entering {blocks_name}.0 (the float model's embeddings): no layer was changed; "
                         "check the calibration ids and the model's weights (a half dtype that overflows: load it in "
                         "float32)")
        del captured

    started = time.monotonic()
    for i in tqdm(range(first, len(blocks)), desc=f"{method.name} blocks", initial=first, total=len(blocks),
                  disable=not progress):
        block_started, prefix = time.monotonic(), f"{blocks_name}.{i}."
        store.load(blocks[i], prefix)
        inputs = None
        if states is not None:  # block i's own mask / rotary table
            inputs = [((h,) + tuple(rest), kwargs) for h, (rest, kwargs) in zip(states, per_block[i])]
            per_block[i] = None
        block_specs, outputs = _run_block(blocks[i], i, len(blocks), blocks_name, inputs, method, skip,
                                          true_sequential, dtype, device, (moe_calibration, moe_min_tokens))
        specs.update(block_specs)
        if outputs is not None:
            tuple_out = isinstance(outputs[0], (tuple, list))
            states = [hidden(o) for o in outputs]
        del inputs, outputs
        store.done(i, blocks[i], prefix, block_specs, states, tuple_out, method)
        if progress:
            with logging_redirect_tqdm([log]):  # the line above the bar, not through it
                log.info(f"{method.name}: " + _progress_line(prefix.rstrip("."), i, len(blocks), first, started,
                                                             block_started))
    if embeddings:
        specs.update(_quantize_embedding(model, method, dtype))
    if lm_head:
        specs.update(_quantize_head(model, blocks_name, blocks, method, calib, states, tuple_out, device, batch_size,
                                    dtype))
    return specs


def _run_block(block, i: int, n: int, blocks_name: str, inputs, method: Method, skip, true_sequential: bool, dtype,
               device, moe_options):
    """Quantize block i (its weights in place) on `device` and move it back: (its specs, its outputs on inputs or
    None). Every float layer it held is let go on return. A failure names the block and the state it leaves."""
    prefix = f"{blocks_name}.{i}."
    linears, experts, _ = _block_targets(block, prefix, skip)
    home = next(block.parameters()).device
    block.to(device)
    try:
        if i > 0 and inputs is not None:
            check_finite([args[0] for args, _ in inputs], f"entering {blocks_name}.{i} (the outputs of the blocks "
                         "quantized before it)")
        result = _quantize_block(block, linears, inputs, method, prefix, true_sequential, dtype, experts, moe_options)
    except Exception as e:
        block.to(home)
        hint = " (out of memory: lower batch_size, or quantize with device='cpu')" \
            if isinstance(e, torch.OutOfMemoryError) else ""
        raise _with_message(e, f"block {i} of {n}: {e}{hint}; {partly_quantized(i, blocks_name)}") from e
    block.to(home)
    return result


@torch.no_grad()
def _quantize_embedding(model, method, dtype):
    """Round-to-nearest of the input embedding, one scale per group of each token's row (a lookup
    table has no input statistics for a calibrated method to use)."""
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    qw = QuantizedWeight.from_rtn(emb.weight, method.bits, resolve_group_size(method.group_size, emb.embedding_dim, name),
                                  method.sym)
    qw = _within_dtype(qw, dtype, name)
    packed = PackedEmbedding.from_quantized(qw, emb.padding_idx, dtype)
    model.set_submodule(name, packed)
    model.config.tie_word_embeddings = False  # a tied lm_head keeps the float table as its weight
    return {name: packed.layer_spec()}


@torch.no_grad()
def _quantize_head(model, blocks_name, blocks, method, calib, final_hidden, tuple_out, device, batch_size, dtype):
    """Quantize the output embedding (lm_head) from its inputs: the last block's outputs are replayed
    through the model's final modules (norm), and each pass stops at the head before the vocab matmul."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    replay = iter(final_hidden or [])
    stand_in = _StandIn(blocks[0], lambda args, kwargs: (next(replay),) if tuple_out else next(replay))
    with _without_blocks(model, blocks_name, stand_in, device):
        state = method.new_state(name, head)
        if final_hidden is not None:
            with hooked([head.register_forward_hook(lambda m, i, o: state.add_batch(i[0])),
                          head.register_forward_hook(_stop)]):
                _run_passes(lambda ids=ids: model(input_ids=ids, use_cache=False)
                            for ids in _batches(calib, batch_size, device))
        packed = linear_module(_within_dtype(method.quantize(state, head, name), dtype, name), head.bias, dtype)
    model.set_submodule(name, packed.to(head.weight.device))
    model.config.tie_word_embeddings = False  # the embedding keeps its float weight
    return {name: packed.layer_spec()}
