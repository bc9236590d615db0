"""Static-cache decoding of a Llama-style model (dense or mixture of experts), each decode step one CUDA-graph replay.

    dec = tquant.StaticDecoder(model, batch=16, max_len=1152)
    tokens = dec.generate(ids, max_new_tokens=128)           # greedy; ids [batch, t], every row t tokens
    logits = dec.prefill(ids); logits = dec.step(next_ids)   # by hand: logits [batch, vocab] of the last token

HF generate grows its cache by concatenation and launches every small op from Python, so batch-1 decoding is bound
by launches. Here the cache (StaticKVCache) is allocated once, and a decode step reads its position from a device
tensor: embedding, then per layer the model's own modules (norms, q / k / v / o projections and MLP, quantized or
not), RoPE, the cache write at position p and attention over positions 0 ... p; final norm and lm_head. Nothing in
the step reads the device from the host, so on CUDA it is captured once (after a warm-up that fills the kernels'
autotune entries) and replayed for every token. On CUDA (fused=True) the small ops between the projections are
Triton kernels: residual add + RMSNorm (kernels.rms_norm), RoPE with the keys and values written into the float
cache's rows (kernels.rope), silu(gate) * up (kernels.swiglu), and the float cache's decode attention
(kernels.kv_attention.float_decode_attention), and q / k / v and gate / up each one projection where their formats
allow (tquant.modules.fuse: the parts' tensors become views of the fused one, so the model's memory and its own
forward stay as they were): an fp16 layer is 10 launches (4 of them projections) instead of about 77 torch ops; the
cache derives its per-step index tensors once a forward (prepare). The prefill runs eagerly; it
attends to its own exact keys / values (or to them as stored, with the KV method's prefill_with_quant) and writes
them into the cache. Rows of a batch share one position: the prompts are all t tokens long (no padding).
Mixture of experts (Mixtral, Qwen3-MoE: MOE_BLOCKS, router then experts, no shared expert): the plain step runs the
model's own block; the fused step runs its router (x [T, H] -> top_k_weights, top_k_index [T, k]: softmax over the
experts' logits, top-k, renormalized where the model's own code does) and then PackedExperts.grouped, the experts'
grouped W4A16 kernel (tquant.kernels.moe_matmul): gate_up for every (token, slot) pair in one launch, act(gate) * up,
down in one launch, the weighted sum over slots; no host sync whatever the routing, so the graph holds it. Float
experts run in their own module. Qwen2-MoE's block (a gated shared expert besides) and sliding windows are refused.
The model's KV method (quantization_config["kv_cache"]) decides the cache (tquant.kv.static_cache): none -> float;
qoq_kv4 -> per-token 4 / 8-bit codes (written by kernels.kv_quant_write on CUDA); kivi -> per-channel key groups,
per-token values and a full-precision ring of the newest tokens; both read by tquant.kv.attention on CUDA;
fp8_kv -> e4m3 keys / values with a scale a layer and KV head (tquant.kv.fp8_static_cache, read by
fp8_decode_attention on CUDA of compute capability 8.9+). KVQuant's cache has no static form yet and is refused.
A bf16 / fp32 model's quantized cache keeps fp16 scales and minima: a key or value group past fp16's range raises
(tquant.kv.uniform_format), as the group is quantized on an eager torch step, else (a captured step, the write
kernel) when the cache's check_range sees what it stored: after the prefill, at the end of generate and every
CHECK_EVERY steps (one host sync each; none for fp16 or float caches).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from .kernels.rms_norm import rms_norm
from .kernels.rope import rope_qkv
from .kernels.swiglu import silu_mul
from .models import head_dim
from .modules.fuse import fuse_linears
from .modules.packed_experts import PackedExperts
from .kv.static_cache import static_cache

# embed -> [norm, attention, norm, MLP or mixture of experts] x L -> norm -> head
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
# the mixture-of-experts blocks whose forward is router -> experts and nothing else (no shared expert): x [T, H] ->
# (logits, top_k_weights [T, k], top_k_index [T, k]) = block.gate(x); out = block.experts(x, top_k_index, top_k_weights)
MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
INSTEAD = "use model.generate (transformers' own decoding), which runs the quantized modules too"
CHECK_EVERY = 64  # decode steps between the cache's range checks (check_range)


def check_model(model) -> None:
    """ValueError naming what keeps a model from the static decoder (its type, or a missing module) and what to
    use instead."""
    cfg = model.config
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"StaticDecoder runs Llama-style decoders ({', '.join(MODEL_TYPES)}); got model_type "
                         f"{cfg.model_type!r}: {INSTEAD}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        raise ValueError(f"StaticDecoder has no sliding-window attention: this {cfg.model_type} config sets "
                         f"sliding_window={cfg.sliding_window}: {INSTEAD}")
    body = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(body, name):
            raise ValueError(f"StaticDecoder needs model.model.{name}, which this {type(model).__name__} lacks")
    for part in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj"):
        try:
            body.layers[0].get_submodule(part)
        except AttributeError:
            raise ValueError(f"StaticDecoder needs {part} in every decoder layer; layer 0 has none") from None


def is_moe(mlp) -> bool:
    """Whether a decoder layer's MLP is one of the mixture-of-experts blocks the decoder runs (MOE_BLOCKS; any
    other MLP without gate / up / down projections is refused by check_fusable, and runs as it is unfused)."""
    return type(mlp).__name__ in MOE_BLOCKS


def check_fusable(model) -> None:
    """ValueError naming the first module the fused step kernels (tquant.kernels.rms_norm / rope / swiglu) do not
    compute as the model does: norms other than RMSNorm, an MLP that is not silu(gate) * up -> down."""
    body = model.model
    for i, layer in enumerate(body.layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            if "RMSNorm" not in type(norm).__name__ or not hasattr(norm, "variance_epsilon"):
                raise ValueError(f"fused decoding runs RMSNorm; layer {i}'s {name} is {type(norm).__name__} "
                                 "(use fused=False)")
        if is_moe(layer.mlp):  # router, then the experts' own act(gate) * up (PackedExperts.grouped)
            continue
        if not all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) \
                or getattr(model.config, "hidden_act", None) not in ("silu", "swish"):
            raise ValueError(f"fused decoding runs down(silu(gate(x)) * up(x)); layer {i}'s MLP is not that "
                             "(use fused=False)")
    if "RMSNorm" not in type(body.norm).__name__:
        raise ValueError(f"fused decoding runs RMSNorm; the final norm is {type(body.norm).__name__} (use fused=False)")


class StaticDecoder:
    """Greedy generation for `batch` sequences of up to max_len tokens with a static cache (module docstring).
    graphs: capture the decode step as a CUDA graph (default: on CUDA). fused: the step's small ops as Triton
    kernels (default: on CUDA; on the CPU under TRITON_INTERPRET=1 only): residual add + RMSNorm, RoPE + cache
    write, silu(gate) * up; and q / k / v, gate / up fused into one projection each (tquant.modules.fuse); a
    mixture-of-experts block as router + PackedExperts' grouped launches."""

    def __init__(self, model, batch: int, max_len: int, graphs: bool | None = None, fused: bool | None = None):
        check_model(model)
        if batch < 1 or max_len < 2:
            raise ValueError(f"batch must be >= 1 and max_len >= 2; got {batch}, {max_len}")
        self.model, self.batch = model, batch
        self.cache = static_cache(model, batch, max_len)
        device = model.get_input_embeddings().weight.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.fused = device.type == "cuda" if fused is None else fused
        if self.fused:
            check_fusable(model)
        layers = model.model.layers
        self.qkv = [fuse_linears([a.q_proj, a.k_proj, a.v_proj]) if self.fused else None
                    for a in (layer.self_attn for layer in layers)]
        self.gate_up = [fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj])
                        if self.fused and not is_moe(layer.mlp) else None for layer in layers]
        self.head_size = head_dim(model.config)
        self.sm_scale = getattr(model.model.layers[0].self_attn, "scaling", 1 / math.sqrt(self.head_size))
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the position the next step writes
        self.length = 0  # its host copy (bounds checks only)
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._graph = self._logits = None

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _qkv(self, i: int, attn, x: torch.Tensor, pos: torch.Tensor, cos, sin):
        """q [B, Hq, t, D], k, v [B, Hkv, t, D] of layer i after RoPE, k and v written into the cache at pos."""
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_size)
        fused = self.qkv[i]
        qkv = fused(x).split(fused.split_sizes, dim=-1) if fused is not None else \
            (proj(x) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k, v = (y.view(shape) for y in qkv)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        if not self.fused:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, t, D]
            cos, sin = cos[:, None], sin[:, None]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            self.cache.write(i, k, v, pos)
            return q, k, v
        q_out = torch.empty(b, q.shape[2], t, self.head_size, dtype=q.dtype, device=q.device)
        if self.cache.float_store:  # RoPE'd keys and values straight into the cache's rows
            k_cache, v_cache = self.cache.k[i], self.cache.v[i]
            rope_qkv(q, k, v, cos, sin, q_out, k_cache, v_cache, pos)
            # a prefill's k, v: rows 0 ... t - 1; a decode step's are not read (the float cache attends its store)
            return q_out, k_cache[:, :, :t], v_cache[:, :, :t]
        k_out, v_out = (torch.empty(b, k.shape[2], t, self.head_size, dtype=q.dtype, device=q.device) for _ in "kv")
        rope_qkv(q, k, v, cos, sin, q_out, k_out, v_out, torch.arange(t, device=q.device))
        self.cache.write(i, k_out, v_out, pos)
        return q_out, k_out, v_out

    def _attention(self, i: int, layer, x: torch.Tensor, pos: torch.Tensor, cos, sin) -> torch.Tensor:
        """The attention of decoder layer i for hidden states x [B, t, H] at positions pos (int64 [t]): t > 1 is
        the prefill (positions 0 ... t - 1, causal over itself), t == 1 a decode step (over the cache)."""
        attn, (b, t, _) = layer.self_attn, x.shape
        q, k, v = self._qkv(i, attn, x, pos, cos, sin)
        if t == 1:
            o = self.cache.decode_attention(i, q[:, :, 0], k, v, self.sm_scale)[:, :, None]
        else:
            if self.cache.prefill_with_quant:
                k, v = self.cache.stored(i, t)
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=self.sm_scale,
                                               enable_gqa=True)
        return attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def _add_norm(self, norm, h: torch.Tensor, delta: torch.Tensor | None):
        """(norm(h'), h') with h' = h + delta (h itself when delta is None): the residual add and the next norm."""
        if self.fused:
            return rms_norm(h, norm.weight, norm.variance_epsilon, delta)
        h = h if delta is None else h + delta
        return norm(h), h

    def _mlp(self, i: int, mlp, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return mlp(x)
        if is_moe(mlp):
            return self._moe(mlp, x)
        fused = self.gate_up[i]
        gate, up = fused(x).split(fused.split_sizes, dim=-1) if fused is not None else (mlp.gate_proj(x), mlp.up_proj(x))
        return mlp.down_proj(silu_mul(gate, up))

    @staticmethod
    def _moe(block, x: torch.Tensor) -> torch.Tensor:
        """A mixture-of-experts block on x [B, t, H] as its own forward computes it, the routing by its own router
        (softmax over the experts' logits, top-k, renormalized where the model does), then quantized experts in
        PackedExperts' two grouped launches (no host sync, whatever the routing); float experts in their module."""
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = block.gate(flat)
        experts = block.experts
        run = experts.grouped if isinstance(experts, PackedExperts) else experts
        return run(flat, index, weights).view(x.shape)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the last of the tokens ids [B, t] at positions pos (int64 [t])."""
        body = self.model.model
        h, delta = body.embed_tokens(ids), None
        self.cache.prepare(pos)
        cos, sin = body.rotary_emb(h, pos[None].expand(ids.shape[0], -1))
        for i, layer in enumerate(body.layers):
            x, h = self._add_norm(layer.input_layernorm, h, delta)
            delta = self._attention(i, layer, x, pos, cos, sin)
            x, h = self._add_norm(layer.post_attention_layernorm, h, delta)
            delta = self._mlp(i, layer.mlp, x)
        x, _ = self._add_norm(body.norm, h[:, -1], delta[:, -1])
        return self.model.lm_head(x)

    def _check_ids(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"{what} takes token ids [batch={self.batch}, t]; got {tuple(ids.shape)}")
        return ids.to(self._ids.device)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start new sequences from the prompts ids [batch, t] (t >= 1): the cache is overwritten from position
        0; returns the logits [batch, vocab] of each prompt's last token."""
        ids = self._check_ids(ids, "prefill")
        t = ids.shape[1]
        if not 1 <= t < self.max_len:
            raise ValueError(f"a prompt of {t} tokens leaves no room in a cache of max_len={self.max_len}")
        logits = self._forward(ids, torch.arange(t, device=ids.device))
        self.pos.fill_(t)
        self.length = t
        self.cache.check_range(t)
        return logits

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row, ids [batch] or [batch, 1], at the next position: its logits [batch, vocab]. The
        returned tensor is the graph's output buffer, overwritten by the next step."""
        if self.length == 0:
            raise ValueError("step() continues a sequence: call prefill(ids) first")
        if self.length >= self.max_len:
            raise ValueError(f"the cache is full: {self.max_len} tokens (max_len)")
        self._ids.copy_(self._check_ids(ids.reshape(-1, 1), "step"))
        if not self.graphs:
            logits = self._forward(self._ids, self.pos)
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._logits
        self.pos += 1
        self.length += 1
        if self.length % CHECK_EVERY == 0:
            self.cache.check_range(self.length)
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (autotuning, lazy allocations; writes only at the position the first real
        step overwrites), then record one decode step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(self._ids, self.pos)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._forward(self._ids, self.pos)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: [batch, t + max_new_tokens] token ids (prompt included)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if ids.shape[-1] + max_new_tokens > self.max_len:
            raise ValueError(f"{ids.shape[-1]} + {max_new_tokens} tokens exceed max_len={self.max_len}")
        out = [self._check_ids(ids, "generate")]
        nxt = self.prefill(ids).argmax(-1)
        for _ in range(max_new_tokens - 1):
            out.append(nxt[:, None])
            nxt = self.step(nxt).argmax(-1)
        out.append(nxt[:, None])
        self.cache.check_range(self.length)
        return torch.cat(out, dim=1)
