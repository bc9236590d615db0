"""PackedExperts: a mixture-of-experts experts module (transformers 5's fused MixtralExperts, Qwen3MoeExperts, ...)
with each expert's two projections packed in tquant.formats.packing's layout, stacked on a leading expert dimension.

Buffers (E experts, H = hidden_dim, I = intermediate_dim, epw = 32 // bits):
    gate_up_qweight int32 [E, ceil(H / epw), 2I]    gate_up_scales, gate_up_zeros [E, H // gate_up_group_size, 2I]
    down_qweight    int32 [E, ceil(I / epw), H]     down_scales, down_zeros       [E, I // down_group_size, H]
    gate_up_perm int32 [E, H], down_perm int32 [E, I]   only with act-order storage (has_perm)
Expert e's slices are exactly a PackedLinear's qweight / scales / zeros / perm of that projection: W_gu[e] [2I, H]
(gate rows, then up rows) and W_down[e] [H, I], w[k, n] = (code(k, n) - zeros[k // group, n]) * scales[k // group, n].

forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], transformers' experts contract:
    for each expert e some token picked:  x = hidden_states[its tokens];  g, u = (x W_gu[e]^T).chunk(2)
                                           out[its tokens] += ((act(g) * u) W_down[e]^T) * top_k_weights[token, slot]
    an index equal to num_experts (transformers' mark of a dropped slot) is skipped, as transformers skips it.
Paths: the torch reference (weight_only_matmul_ref: de-quantize the hit expert's projection, matmul in fp32, one
expert at a time), or the Triton path (on CUDA inputs, or under TRITON_INTERPRET=1 with backend="triton"):
tquant.kernels.moe_matmul.grouped_weight_only_matmul runs gate_up for every (token, slot) pair of the step in one
launch, then act(gate) * up, then down in one launch, then the weighted sum over slots: two launches a step whatever
the routing, with no host sync (the torch path's torch.unique is one).

The router stays in the float module next to this one (transformers' TopKRouter); `calibration` is what the driver
measured while quantizing (routed tokens per expert, those calibrated on all tokens), kept in the saved layer spec.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.packing import pack_codes, values_per_word
from ..formats.quantizer import check_bits
from ..formats.weights import QuantizedWeight
from .backend import BACKENDS
from .base import DAMAGED, Check, build_checked, check_spec, register
from .packed_weight import check_grid

PROJECTIONS = ("gate_up", "down")


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    if not isinstance(name, str) or name not in ACT2FN:
        raise ValueError(f"hidden_act={name!r} is not an activation transformers' ACT2FN names")
    return ACT2FN[name]


@register("packed_experts")  # rebuilt by tquant.load; the driver builds it (not a linear)
class PackedExperts(nn.Module):
    spec_fields = ("num_experts", "hidden_dim", "intermediate_dim", "bits", "gate_up_group_size", "down_group_size",
                   "has_perm")

    def __init__(self, num_experts, hidden_dim, intermediate_dim, *, bits, gate_up_group_size, down_group_size,
                 has_perm=False, hidden_act="silu", dtype=torch.float16, device=None):
        super().__init__()
        check_bits(bits)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.bits, self.gate_up_group_size, self.down_group_size = bits, gate_up_group_size, down_group_size
        self.hidden_act, self.act_fn = hidden_act, _activation(hidden_act)
        self.backend = "auto"
        self.calibration = None  # the driver's per-expert token counts (saved in the spec), None when loaded without
        for proj, k, n, group in self._shapes():
            if group < 1 or k % group:
                raise ValueError(f"{proj}_group_size={group} does not divide the {proj} input width {k}")
            self.register_buffer(f"{proj}_qweight", torch.zeros(num_experts, -(-k // values_per_word(bits)), n,
                                                                dtype=torch.int32, device=device))
            self.register_buffer(f"{proj}_scales", torch.zeros(num_experts, k // group, n, dtype=dtype, device=device))
            self.register_buffer(f"{proj}_zeros", torch.zeros(num_experts, k // group, n, dtype=dtype, device=device))
            perm = torch.arange(k, dtype=torch.int32, device=device).repeat(num_experts, 1) if has_perm else None
            self.register_buffer(f"{proj}_perm", perm)

    def _shapes(self):
        """(projection, K = its input width, N = its output width, group size) of both projections."""
        h, i = self.hidden_dim, self.intermediate_dim
        return (("gate_up", h, 2 * i, self.gate_up_group_size), ("down", i, h, self.down_group_size))

    @property
    def has_perm(self) -> bool:
        return self.gate_up_perm is not None

    @classmethod
    def from_quantized(cls, gate_up: list[QuantizedWeight], down: list[QuantizedWeight], hidden_act: str,
                       dtype: torch.dtype, calibration: dict | None = None) -> "PackedExperts":
        """The module of every expert's quantized gate_up ([2I, H] codes) and down ([H, I]) weights, in expert
        order; all of one bit width, each projection of one group size, weight-only."""
        qws = list(gate_up) + list(down)
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError(f"{len(gate_up)} gate_up and {len(down)} down weights: one of each per expert")
        bad = [type(q).__name__ for q in qws if type(q) is not QuantizedWeight or q.act_bits is not None
               or q.smooth is not None]
        if bad:
            raise TypeError(f"PackedExperts stores weight-only QuantizedWeights, got {bad[0]} (or activation bits)")
        for what, values in (("bits", {q.bits for q in qws}), ("gate_up group sizes", {q.group_size for q in gate_up}),
                             ("down group sizes", {q.group_size for q in down})):
            if len(values) != 1:
                raise ValueError(f"the experts' weights differ in {what}: {sorted(values)}")
        two_i, h = gate_up[0].codes.shape
        mod = cls(len(gate_up), h, two_i // 2, bits=gate_up[0].bits, gate_up_group_size=gate_up[0].group_size,
                  down_group_size=down[0].group_size, has_perm=any(q.perm is not None for q in qws),
                  hidden_act=hidden_act, dtype=dtype, device=gate_up[0].codes.device)
        for proj, weights in (("gate_up", gate_up), ("down", down)):
            for e, qw in enumerate(weights):
                getattr(mod, f"{proj}_qweight")[e].copy_(pack_codes(qw.codes, qw.bits))
                getattr(mod, f"{proj}_scales")[e].copy_(qw.scale.t())
                getattr(mod, f"{proj}_zeros")[e].copy_(qw.zero.t())
                if qw.perm is not None:
                    getattr(mod, f"{proj}_perm")[e].copy_(qw.perm)
        mod.calibration = calibration
        return mod

    def layer_spec(self) -> dict:
        spec = {"type": self.spec_type, **{key: getattr(self, key) for key in self.spec_fields},
                "hidden_act": self.hidden_act}
        return spec | ({"calibration": self.calibration} if self.calibration is not None else {})

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "PackedExperts":
        mod = cls(spec["num_experts"], spec["hidden_dim"], spec["intermediate_dim"], bits=spec["bits"],
                  gate_up_group_size=spec["gate_up_group_size"], down_group_size=spec["down_group_size"],
                  has_perm=spec["has_perm"], hidden_act=spec["hidden_act"], dtype=dtype, device="meta")
        mod.calibration = spec.get("calibration")
        return mod

    @classmethod
    def check_spec(cls, name: str, spec: dict, dtype: torch.dtype) -> "PackedExperts":
        """from_spec of a saved spec, checked first (tquant.load; QuantizedLinear.check_spec's rules): the integer
        fields and the flag, hidden_act a string, calibration (optional) an object."""
        if not isinstance(spec, dict):
            raise ValueError(f"{name}: layer spec is a {type(spec).__name__}, not an object: {DAMAGED}")
        check_spec(name, {k: v for k, v in spec.items() if k not in ("hidden_act", "calibration")}, cls.spec_fields,
                   {}, ("has_perm",))
        if not isinstance(spec.get("hidden_act"), str):
            raise ValueError(f"{name}: layer spec hidden_act={spec.get('hidden_act')!r}: expected an activation name: "
                             f"{DAMAGED}")
        if not isinstance(spec.get("calibration", {}), dict):
            raise ValueError(f"{name}: layer spec calibration={spec['calibration']!r}: expected an object: {DAMAGED}")
        small = [key for key in ("num_experts", "hidden_dim", "intermediate_dim") if spec[key] < 1]
        if small:
            raise ValueError(f"{name}: layer spec {small[0]}={spec[small[0]]}: expected >= 1: {DAMAGED}")
        return build_checked(cls, name, spec, dtype)

    def validate(self, name: str) -> None:
        """The saved tensors (tquant.load): int32 codes, finite scales and zeros in one float dtype, every code's
        grid point finite in it (packed_weight.check_grid), each expert's perm a permutation; ValueError
        "name.tensor: problem: what to do" on the first failure."""
        check = Check(name)
        for proj, k, _, group in self._shapes():
            qweight = check(f"{proj}_qweight", getattr(self, f"{proj}_qweight"), torch.int32)  # any bits: a code
            scales = check(f"{proj}_scales", getattr(self, f"{proj}_scales"), "model")
            zeros = check(f"{proj}_zeros", getattr(self, f"{proj}_zeros"), "model")
            check_grid(check, f"{proj}_qweight", qweight, scales, zeros, self.bits, group)
            perm = getattr(self, f"{proj}_perm")
            for e in range(self.num_experts if perm is not None else 0):
                check.permutation(f"{proj}_perm[{e}]", perm[e], k)

    def _project(self, x: torch.Tensor, e: int, proj: str, kernel: bool) -> torch.Tensor:
        """x [M, K] through expert e's projection `proj`: y [M, N] in x's dtype."""
        from ..kernels.weight_only_matmul import weight_only_matmul, weight_only_matmul_ref

        scales = getattr(self, f"{proj}_scales")
        perm = getattr(self, f"{proj}_perm")
        fn = weight_only_matmul if kernel else weight_only_matmul_ref
        y = fn(x.to(scales.dtype), getattr(self, f"{proj}_qweight")[e], scales[e], getattr(self, f"{proj}_zeros")[e],
               bits=self.bits, group_size=getattr(self, f"{proj}_group_size"), in_features=x.shape[-1],
               perm=None if perm is None else perm[e])
        return y.to(x.dtype)

    def expert(self, x: torch.Tensor, e: int, kernel: bool = False) -> torch.Tensor:
        """Expert e's MLP of x [M, H]: down(act(gate) * up), [M, H] in x's dtype."""
        gate, up = self._project(x, e, "gate_up", kernel).chunk(2, dim=-1)
        return self._project(self.act_fn(gate) * up, e, "down", kernel)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(f"PackedExperts expects last dim {self.hidden_dim}, got {tuple(hidden_states.shape)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        kernel = self.backend == "triton" or (self.backend == "auto" and hidden_states.is_cuda)
        if kernel:
            return self.grouped(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():  # the hit experts, in order (one host sync, as transformers')
            if not 0 <= e < self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            y = self.expert(hidden_states[token], e, kernel) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def grouped(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """forward's Triton path, whatever the backend: x [T, H], index [T, k], weights [T, k] -> [T, H]; both
        projections of every selected expert, one grouped launch each, no host sync (so a CUDA graph can hold it;
        tquant.StaticDecoder's fused MoE step calls it)."""
        from ..kernels.moe_matmul import grouped_weight_only_matmul

        def project(inp, proj):  # [T, K] (a row a token) or [T, k, K] (a row a slot) -> [T, k, N]
            scales = getattr(self, f"{proj}_scales")
            return grouped_weight_only_matmul(inp.to(scales.dtype), getattr(self, f"{proj}_qweight"), scales,
                                              getattr(self, f"{proj}_zeros"), index, bits=self.bits,
                                              group_size=getattr(self, f"{proj}_group_size"),
                                              in_features=inp.shape[-1], perm=getattr(self, f"{proj}_perm"))

        gate, up = project(x, "gate_up").chunk(2, dim=-1)
        y = project(self.act_fn(gate) * up, "down")  # dropped slots (index not in [0, E)) come back as zeros
        return (y.float() * weights.float()[..., None]).sum(dim=1).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim="
                f"{self.intermediate_dim}, bits={self.bits}, gate_up_group_size={self.gate_up_group_size}, "
                f"down_group_size={self.down_group_size}, has_perm={self.has_perm}, hidden_act={self.hidden_act}")
