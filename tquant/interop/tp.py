"""The tensor-parallel check of an export (tquant export --check-tp 2,4,8, tquant.export(..., check_tp=(2, 4, 8))):
whether each quantized layer splits over `tp` GPUs as vLLM splits it, into shards its kernels take.

How vLLM splits a decoder (vllm/model_executor/layers/linear.py):
    column-parallel  q/k/v (fused into one QKVParallelLinear), gate/up (one MergedColumnParallelLinear), fc1, c_fc,
                     Phi-3's qkv_proj / gate_up_proj: the output N is split, every GPU keeps all of K.
                     QKVParallelLinear: num_heads = divide(total_num_heads, tp); with tp >= num_kv_heads each GPU
                     holds one KV head (num_kv_head_replicas = divide(tp, num_kv_heads)), else divide(num_kv_heads,
                     tp) of them (divide() asserts the division is exact)
    row-parallel     o_proj, down_proj, out_proj, fc2, c_proj: the input K is split, every GPU keeps all of N
The rules, per shard (tp = 1 included: the kernel minimums hold unsplit too), with their source in vLLM:
    all weight-only  K_shard % group_size == 0 when grouped (row-parallel split inside a group):
                     quantization/gptq.py GPTQLinearMethod.create_weights ("The input size is not aligned with the
                     quantized weight shape. This can be caused by too large tensor parallel size")
                     K_shard * bits % 32 == 0: qweight / weight_packed hold K_shard // pack_factor int32 rows
                     N_part_shard % Fraction(32, bits).numerator == 0 (GPTQ; compressed-tensors when asymmetric: zero
                     points packed along N): gptq.py create_weights ("The output size is not aligned ..."), and
                     the fused layer's weight loader divides each part's offset and size by the pack factor
    Marlin schemes   group -1 / 32 / 64 / 128 (quantization/utils/marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES)
                     and GPTQ symmetric 4 / 8-bit (gptq_marlin.py GPTQMarlinConfig.TYPE_MAP; an asymmetric GPTQ
                     checkpoint runs vLLM's plain GPTQ kernel), compressed-tensors symmetric 4 / 8-bit or 4-bit with
                     zero points (marlin_utils.query_marlin_supported_quant_types); verify_marlin_supports_shape:
                     output_size_per_partition (the fused layer's, q+k+v or gate+up) % GPTQ_MARLIN_MIN_THREAD_N (64),
                     input_size_per_partition % GPTQ_MARLIN_MIN_THREAD_K (128), input_size_per_partition %
                     group_size when group_size < K ("Consider reducing tensor_parallel_size or running with
                     --quantization gptq")
    W8A8 int8        K_shard % 16 and N_shard % 16: vllm/_custom_ops.py cutlass_scaled_mm (cutlass_compatible_b;
                     otherwise vLLM runs its slower triton_scaled_mm)
    fused layers     q/k/v and gate/up are one layer in vLLM with one quantization method: every part the same
                     scheme (weight-only: bits, group size, sym, act-order; W8A8: bits, activation bits, static);
                     a part left float is a different scheme
Layers of other names (lm_head, ...) are not checked and are named in the report.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

MARLIN_MIN_THREAD_N = 64   # vLLM marlin_utils.GPTQ_MARLIN_MIN_THREAD_N
MARLIN_MIN_THREAD_K = 128  # vLLM marlin_utils.GPTQ_MARLIN_MIN_THREAD_K
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_BITS = (4, 8)  # uint4b8 / uint8b128 (and uint4 with zero points)
CUTLASS_ALIGN = 16  # vLLM _custom_ops.cutlass_scaled_mm: b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSED_QKV = ("qkv_proj", "c_attn")  # Phi-3, GPT-2: q / k / v already one layer
COLUMN = QKV + GATE_UP + FUSED_QKV + ("gate_up_proj", "fc1", "c_fc")
ROW = ("o_proj", "down_proj", "out_proj", "fc2", "c_proj")

log = logging.getLogger("tquant")


def parse_degrees(text) -> tuple[int, ...]:
    """"2,4,8" (or ints) -> (2, 4, 8); ValueError for anything but positive integers."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        degrees = tuple(int(str(t).strip()) for t in items if str(t).strip())
    except ValueError:
        degrees = ()
    if not degrees or any(d < 1 for d in degrees):
        raise ValueError(f"check_tp={text!r}: expected tensor-parallel degrees as positive integers, e.g. 2,4,8")
    return tuple(sorted(set(degrees)))


def _scheme(mod) -> tuple:
    """What vLLM must apply alike to the parts of a fused layer."""
    from ..modules.act_quant_linear import ActQuantLinear
    from ..modules.packed_linear import PackedLinear

    if isinstance(mod, PackedLinear):
        sym = bool((mod.zeros == 2 ** (mod.bits - 1)).all())
        group = -1 if mod.group_size == mod.in_features else mod.group_size
        return ("weight-only", f"{mod.bits}-bit", f"group {group}", "sym" if sym else "asym",
                "act-order" if mod.perm is not None else "no act-order")
    if isinstance(mod, ActQuantLinear):
        return (f"W{mod.bits}A{mod.act_bits}", "static" if mod.act_scale is not None else "dynamic")
    return ("float (not quantized)",)


def _heads(config) -> tuple[int | None, int | None]:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv


def _fused_scheme_problems(model: nn.Module, layers: dict) -> list[str]:
    problems = []
    for parent, parts in _fused_groups(model).items():
        schemes = {p: _scheme(layers.get(f"{parent}.{p}", model.get_submodule(f"{parent}.{p}"))) for p in parts}
        if len(set(schemes.values())) > 1:
            what = "; ".join(f"{parent}.{p}: {', '.join(s)}" for p, s in schemes.items())
            problems.append(f"{parent}: vLLM fuses {' / '.join(parts)} into one layer with one quantization scheme, "
                            f"these differ ({what}); quantize them alike (the same --skip for all of them)")
    return problems


def _fused_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """{parent module: the q/k/v or gate/up children it has} for parents holding more than one part."""
    names = {n for n, _ in model.named_modules()}
    groups = {}
    for name, _ in model.named_modules():
        for parts in (QKV, GATE_UP):
            found = tuple(p for p in parts if f"{name}.{p}" in names)
            if len(found) > 1:
                groups[name] = found
    return groups


class _Shards:
    """The shard sizes of every checked layer at one tp degree, and what fails."""

    def __init__(self, model: nn.Module, layers: dict, tp: int, format: str):
        self.model, self.layers, self.tp, self.format = model, layers, tp, format
        self.all_sym = all(_sym(m) for m in layers.values() if hasattr(m, "zeros"))
        self.heads, self.kv = _heads(model.config)
        self.problems: list[str] = []

    def on_marlin(self, mod) -> bool:
        """Whether vLLM runs this weight-only layer on Marlin: GPTQ checkpoints when symmetric 4 / 8-bit (gptq_marlin's
        TYPE_MAP {(4, True), (8, True)}; "sym" is the checkpoint's, so every layer's), compressed-tensors also 4-bit
        with zero points (marlin_utils.query_marlin_supported_quant_types: has_zp -> uint4 only)."""
        if self.format == "gptq":
            return mod.bits in MARLIN_BITS and self.all_sym
        return mod.bits in MARLIN_BITS if _sym(mod) else mod.bits == 4

    def fail(self, layer: str, text: str) -> None:
        self.problems.append(f"{layer}: {text}")

    def heads_problem(self) -> str | None:
        """Why vLLM's QKVParallelLinear cannot split this model's attention over tp, or None."""
        tp, heads, kv = self.tp, self.heads, self.kv
        if not heads:
            return "the config has no num_attention_heads to split attention by"
        if heads % tp:
            return (f"num_attention_heads {heads} does not split over tp {tp} (vLLM's QKVParallelLinear: "
                    "divide(total_num_heads, tp_size))")
        if (tp >= kv and tp % kv) or (tp < kv and kv % tp):
            return (f"num_key_value_heads {kv} and tp {tp}: vLLM splits KV heads over tp or replicates each over "
                    "tp / num_key_value_heads GPUs (QKVParallelLinear); neither divides")
        return None

    def column_shard(self, layer: str, leaf: str, n: int, quiet: bool = False) -> list[int] | None:
        """The output columns of each part of layer `layer` on one GPU (one part, or q / k / v of a fused qkv);
        None (with a problem unless quiet) when vLLM cannot split it over tp. Attention's head counts are checked
        once, by check()."""
        tp, heads, kv = self.tp, self.heads, self.kv
        if leaf in QKV + FUSED_QKV:
            if self.heads_problem():
                return None
            kv_here = max(kv // tp, 1)
            if leaf in FUSED_QKV:
                head_dim = n // (heads + 2 * kv)
                return [heads // tp * head_dim, kv_here * head_dim, kv_here * head_dim]
            head_dim = n // (heads if leaf == "q_proj" else kv)
            return [(heads // tp if leaf == "q_proj" else kv_here) * head_dim]
        halves = 2 if leaf == "gate_up_proj" else 1
        if (n // halves) % tp:
            if not quiet:
                self.fail(layer, f"output size {n // halves}" + (" (each half)" if halves == 2 else "") +
                                 f" does not split over tp {tp}")
            return None
        return [n // halves // tp] * halves

    def check(self) -> None:
        part_of = {f"{parent}.{p}": (parent, parts) for parent, parts in _fused_groups(self.model).items()
                   for p in parts}
        attention = [n for n in self.layers if n.rpartition(".")[2] in QKV + FUSED_QKV]
        if attention and self.heads_problem():  # once for the model, named at its first attention layer
            self.fail(attention[0], self.heads_problem())
        fused_seen = set()
        for name, mod in self.layers.items():
            leaf = name.rpartition(".")[2]
            k, n = mod.in_features, mod.out_features
            if leaf in ROW:
                if k % self.tp:
                    self.fail(name, f"input size {k} does not split over tp {self.tp}")
                else:
                    self.rules(name, mod, k_shard=k // self.tp, n_parts=[n], fused_n=n, fused=None, row=True)
                continue
            if leaf not in COLUMN:
                continue
            parts = self.column_shard(name, leaf, n)
            if parts is None:
                continue
            fused, fused_n = None, sum(parts)
            if name in part_of:  # vLLM's kernel sees the fused layer's columns: q+k+v or gate+up on this GPU
                parent, siblings = part_of[name]
                got = [self.column_shard(f"{parent}.{p}", p, self.model.get_submodule(f"{parent}.{p}").out_features,
                                         quiet=True) for p in siblings]
                if any(g is None for g in got):
                    continue  # the sibling's own problem is reported under its name
                fused, fused_n = f"{' + '.join(siblings)} of {parent}", sum(sum(g) for g in got)
                if parent in fused_seen:  # the fused layer's own sizes are checked (and named) at its first part
                    fused_n = None
                fused_seen.add(parent)
            self.rules(name, mod, k_shard=k, n_parts=parts, fused_n=fused_n, fused=fused)

    def rules(self, name, mod, *, k_shard, n_parts, fused_n, fused, row=False) -> None:
        """Layer `name`'s rules (module docstring) on its shard: K_shard inputs, n_parts output columns per part,
        fused_n the columns vLLM's kernel sees (the fused layer's; None for a fused layer's later parts)."""
        from ..modules.act_quant_linear import ActQuantLinear

        tp, k = self.tp, mod.in_features
        kind = "row-parallel" if row else "column-parallel"
        k_what = f"input shard {k_shard} = {k} / {tp}" if row else f"input size {k}"
        if row:
            n_what = f"output size {fused_n}"
        else:
            n_what = f"output shard {fused_n}" + (f" (the fused {fused} on one GPU)" if fused else "")
        if isinstance(mod, ActQuantLinear):
            for what, size in ((k_what, k_shard), (n_what, fused_n)) if fused_n is not None else ():
                if size % CUTLASS_ALIGN:
                    self.fail(name, f"{kind}: {what} is not a multiple of {CUTLASS_ALIGN}: vLLM's CUTLASS int8 "
                                    "GEMM (cutlass_scaled_mm) needs it, else it runs the slower triton_scaled_mm")
            return
        bits, group = mod.bits, mod.group_size
        grouped = group < k
        if grouped and k_shard % group:
            self.fail(name, f"{kind}: {k_what} is not a multiple of the group size {group}: the split falls "
                            "inside a group (vLLM: 'The input size is not aligned with the quantized weight shape')")
            return
        if k_shard * bits % 32:
            self.fail(name, f"{kind}: {k_what} does not fill whole int32 words at {bits} bits (qweight packs "
                            f"{Fraction(32, bits)} values a word along K)")
            return
        pack = Fraction(32, bits).numerator
        if any(part % pack for part in n_parts) and not (self.format == "compressed-tensors" and _sym(mod)):
            part = next(p for p in n_parts if p % pack)
            self.fail(name, f"{kind}: output shard {part} is not a multiple of {pack}, the zero points' "
                            f"packing along N at {bits} bits (vLLM: 'The output size is not aligned with the "
                            "quantized weight shape')")
            return
        if fused_n is None:  # a later part of a fused layer: its (shared) sizes were checked at the first part
            return
        if self.on_marlin(mod) and (-1 if not grouped else group) in MARLIN_GROUP_SIZES:
            if fused_n % MARLIN_MIN_THREAD_N:
                self.fail(name, f"{kind}: {n_what} is not a multiple of Marlin's min_thread_n "
                                f"{MARLIN_MIN_THREAD_N} (vLLM verify_marlin_supports_shape)")
            elif k_shard % MARLIN_MIN_THREAD_K:
                self.fail(name, f"{kind}: {k_what} is not a multiple of Marlin's min_thread_k "
                                f"{MARLIN_MIN_THREAD_K} (vLLM verify_marlin_supports_shape)")


def _sym(mod) -> bool:
    return bool((mod.zeros == 2 ** (mod.bits - 1)).all())


def check(model: nn.Module, layers: dict, degrees, format: str) -> dict[int, list[str]]:
    """{tp: the problems of that degree (empty: it passes)} for the exported layers of `model`."""
    fused = _fused_scheme_problems(model, layers)
    out = {}
    for tp in parse_degrees(degrees):
        shards = _Shards(model, layers, tp, format)
        shards.check()
        out[tp] = fused + shards.problems
    return out


def unchecked(layers: dict) -> list[str]:
    """The exported layers whose split the check does not know (their names are not q/k/v/o, gate/up/down, ...)."""
    return sorted(n for n in layers if n.rpartition(".")[2] not in COLUMN + ROW)


def require(model: nn.Module, layers: dict, degrees, format: str) -> dict[int, list[str]]:
    """check(), logging which degrees pass; ValueError naming, for each failing degree, its first failing layer and
    size (and how many more fail)."""
    result = check(model, layers, degrees, format)
    passing = [tp for tp, problems in result.items() if not problems]
    skipped = unchecked(layers)
    note = f" (not checked, split unknown: {', '.join(skipped)})" if skipped else ""
    if len(passing) == len(result):
        log.info("tensor-parallel check (vLLM's splits and kernels): tp %s pass%s",
                 ", ".join(map(str, passing)), note)
        return result
    lines = [f"tp {tp}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
             for tp, problems in result.items() if problems]
    ok = f"tp {', '.join(map(str, passing))} pass" if passing else "no degree passes"
    raise ValueError(f"tensor-parallel check failed ({ok}{note}):\n  " + "\n  ".join(lines))
