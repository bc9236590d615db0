"""Fast Walsh-Hadamard transform along the last dim (QuIP#-style incoherence): Triton kernel and torch reference.

    y = x @ H_n^T   (transpose=False: each row v -> H_n v)      y = x @ H_n   (transpose=True: v -> H_n^T v)
    optionally fused (QuIP#'s sign vectors around the transform, QuipLinear's bias):
    y = ((x * in_scale) @ H_n^T) * out_scale + bias,   in_scale, out_scale, bias [n]; x * in_scale is rounded to
    x's dtype before the transform (as an unfused multiply in x's dtype would), the rest stays fp32 to one rounding
    H_n = (H_m ⊗ H_p) / sqrt(n), n = m * p, p = 2^k, m in tquant.formats.hadamard.KNOWN_ORDERS (orthonormal, so
    transpose=True inverts transpose=False; only H_m differs between the two, H_p is symmetric)
    x, y  [..., n] fp16 / bf16 / fp32 (leading dims flattened to rows; y has x's dtype and shape)

Kernel (`hadamard_transform`): each row is viewed as a tensor [N0, N1, N2] (n = N0 N1 N2, memory index
i0 N1 N2 + i1 N2 + i2) and H_n = H0 ⊗ H1 ⊗ H2 with H0 = H_m ⊗ H_a (a dense ±1 matrix of order N0 = m a, a a
power of two) and H1, H2 Sylvester. Each axis is padded to a power of two F >= 16 (masked loads, zero-padded
matrices), so every factor is one tensor-core tl.dot with fp32 accumulation on a tile of R = BLOCK_R rows:
    stage 0   acc[i0, (r, i1, i2)]  = H0 @ X       X [F0, R F1 F2] read from memory in BLOCK_K slices of i0
    stage 2   z[i2, (i0, r, i1)]    = H2 @ acc^T   acc viewed [(i0, r, i1), i2]  (F1 = 1: acc @ H2^T instead)
    stage 1   y[(i2, i0, r), i1]    = z @ H1^T     z viewed [(i2, i0, r), i1]
then y / sqrt(n), cast, and (three stages) transposed back to [(i0, r, i1), i2] so that stores run along the
contiguous i2. A program runs GROUPS such tiles one after the other (the next tile's loads are issued while one
computes) and reads H1, H2 (and H0 when it is one BLOCK_K slice; small zero-padded matrices, L2-resident) once.
The plan (N0, N1, N2) (plans: ranked by a flop and padding estimate), BLOCK_R, GROUPS and num_warps are tuned
per GPU and key by autotune_cache; the interpreter runs the cheapest plan with one fixed small config.
Precision: ±1 entries are exact in 16-bit. 16-bit x enters stage 0 as is (exact products, fp32 sums); the fp32
intermediates enter later stages as hi + lo bf16 pieces (16 significant bits, far below fp16 rounding), and
fp32 x enters every stage as three bf16 pieces (24 bits): fp32 results are ~1e-7 accurate, 16-bit results
are the fp32 transform rounded once (to ~2^-17 of it).
In place: out=x writes y over x (a program reads all of a tile's rows before it writes them; tiles are
disjoint).

`hadamard_transform_ref` is plain torch in fp32: log2(p) butterflies for H_p, a matmul with H_m.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..formats.hadamard import hadamard_factors, hadamard_matrix, transform
from .autotune_cache import tune
from .runtime import DTYPES, check_device, interpreter_on, next_power_of_2

MIN_DOT = 16  # tl.dot needs M, N, K >= 16: every axis is padded to at least this
MAX_AXIS = 128  # largest Sylvester factor of stages 1 and 2 (its matrix, and the dot's K)
MAX_AXIS0 = 256  # largest padded axis 0 (H0 = H_m ⊗ H_a is read in BLOCK_K column slices)
THREE_STAGE_COST = 320  # plan_cost's charge for the transposes of a three-stage plan
MAX_PADDED = 32768  # largest padded row F0 F1 F2 a program holds in registers


def check_inputs(x, out=None) -> None:
    """Raise ValueError naming the problem: x's dtype, its last dim without a construction, or a bad out."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transform runs along the last)")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {DTYPES}")
    hadamard_factors(x.shape[-1])
    if out is not None and (out.dtype != x.dtype or tuple(out.shape) != tuple(x.shape)):
        raise ValueError(f"out ({out.dtype}, {tuple(out.shape)}) does not match x ({x.dtype}, {tuple(x.shape)})")


def check_vectors(x, **vectors) -> None:
    """Raise ValueError unless each given vector (in_scale, out_scale, bias) is a float tensor [n]."""
    n = x.shape[-1]
    for name, v in vectors.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,) or not v.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape ({n},); got "
                             f"{getattr(v, 'dtype', type(v))} {tuple(getattr(v, 'shape', ()))}")


def hadamard_transform_ref(x, transpose=False, in_scale=None, out_scale=None, bias=None):
    """((x * in_scale) @ H_n^T) * out_scale + bias (H_n with transpose=True; each extra optional) along the last
    dim, computed in fp32, in x's dtype."""
    check_inputs(x)
    check_vectors(x, in_scale=in_scale, out_scale=out_scale, bias=bias)
    if in_scale is not None:
        x = (x.float() * in_scale.float()).to(x.dtype)
    y = transform(x.float(), transpose)
    if out_scale is not None:
        y = y * out_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _mul(z, h, acc, PARTS: tl.constexpr, Z_LEFT: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + z @ h (Z_LEFT) or acc + h @ z. z enters the tensor cores in h's dtype as PARTS pieces whose sum
    is z: one piece is z itself (already 16-bit), two or three bf16 pieces carry 16 or 24 significant bits.
    INTERPRETER: triton's interpreter multiplies bf16 bit patterns as integers in tl.dot, so it gets fp32 copies
    of the same 16-bit values (the same exact products)."""
    piece = h.dtype
    if INTERPRETER:
        h = h.to(tl.float32)
    rest = z
    for i in tl.static_range(PARTS):
        part = rest.to(piece)
        if i + 1 < PARTS:  # exact; an infinite z (an inf input, as the reference's) leaves 0, not inf - inf = NaN
            rest = tl.where(rest == part.to(tl.float32), 0.0, rest - part.to(tl.float32))
        if INTERPRETER:
            part = part.to(tl.float32)
        if Z_LEFT:
            acc = tl.dot(part, h, acc)
        else:
            acc = tl.dot(h, part, acc)
    return acc


@triton.jit
def _round_to_bf16(v):
    """fp32 v rounded to the nearest bf16 value, ties to even (still fp32: a truncating cast is then exact)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_square(h_ptr, F: tl.constexpr):
    i = tl.arange(0, F)
    return tl.load(h_ptr + i[:, None] * F + i[None, :])


@triton.jit
def _transform_rows(x_ptr, y_ptr, h0_ptr, in_ptr, os_ptr, b_ptr, h0, h1, h2, row0, rows, stride_x, stride_y, scale,
                    N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                    F2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, X_PARTS: tl.constexpr,
                    Z_PARTS: tl.constexpr, HAS_IN_SCALE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
                    HAS_BIAS: tl.constexpr, INTERPRETER: tl.constexpr):
    """y = x @ H^T / sqrt(n) for rows row0 .. row0 + BLOCK_R - 1 (h0: H0 if it is one BLOCK_K slice, else read
    here). All tiles are 2-D; a tile index splits into (row, i0, i1, i2) digits by constexpr powers of two."""
    Q: tl.constexpr = N1 * N2  # memory step of axis 0
    NB: tl.constexpr = BLOCK_R * F1 * F2  # columns of stage 0: (r, i1, i2)

    # stage 0: acc[F0, NB] = H0 @ X, X[i0, (r, i1, i2)] read in BLOCK_K slices of i0 (past N0: skipped / zero)
    c = tl.arange(0, NB)
    c_row = row0 + c // (F1 * F2)
    c_i1 = (c // F2) % F1
    c_i2 = c % F2
    col = c_row.to(tl.int64) * stride_x + c_i1 * N2 + c_i2
    col_ok = (c_row < rows) & (c_i1 < N1) & (c_i2 < N2)
    acc = tl.zeros([F0, NB], dtype=tl.float32)
    for k0 in tl.static_range(0, N0, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk_ok = (k < N0)[:, None] & col_ok[None, :]
        xk = tl.load(x_ptr + (k * Q)[:, None] + col[None, :], mask=xk_ok, other=0.0)
        if HAS_IN_SCALE:  # x * in_scale, rounded to x's dtype
            s = tl.load(in_ptr + (k * Q)[:, None] + (c_i1 * N2 + c_i2)[None, :], mask=xk_ok, other=0.0)
            xk = _cast(xk.to(tl.float32) * s, xk.dtype, INTERPRETER)
        if BLOCK_K < F0:
            h0 = tl.load(h0_ptr + tl.arange(0, F0)[:, None] * F0 + k[None, :])
        acc = _mul(xk, h0, acc, X_PARTS, False, INTERPRETER)

    if F1 > 1:
        # stage 2 on the last axis, transposed: z[i2, (i0, r, i1)] = H2 @ (acc viewed [(i0, r, i1), i2])^T
        z = tl.zeros([F2, F0 * BLOCK_R * F1], dtype=tl.float32)
        z = _mul(tl.trans(tl.reshape(acc, [F0 * BLOCK_R * F1, F2])), h2, z, Z_PARTS, False, INTERPRETER)
        # stage 1: y[(i2, i0, r), i1] = (z viewed [(i2, i0, r), i1]) @ H1^T (H1 symmetric)
        out = tl.zeros([F2 * F0 * BLOCK_R, F1], dtype=tl.float32)
        out = _mul(tl.reshape(z, [F2 * F0 * BLOCK_R, F1]), h1, out, Z_PARTS, True, INTERPRETER)
        # back to memory order, in y's dtype: [(i0, r, i1), i2], i2 (contiguous in memory) the fastest axis
        # (the fused vectors are applied before the transpose, in this layout: element [(i2, i0, r), i1])
        u = tl.arange(0, F2 * F0 * BLOCK_R)
        u_i0 = (u // BLOCK_R) % F0
        u_i2 = u // (BLOCK_R * F0)
        i1 = tl.arange(0, F1)
        v_col = (u_i0 * Q + u_i2)[:, None] + (i1 * N2)[None, :]
        v_ok = ((u_i0 < N0) & (u_i2 < N2))[:, None] & (i1 < N1)[None, :]
        out = _scaled(out, scale, y_ptr, os_ptr, b_ptr, v_col, v_ok, HAS_OUT_SCALE, HAS_BIAS, INTERPRETER)
        out = tl.trans(tl.reshape(out, [F2, F0 * BLOCK_R * F1]))
        t = tl.arange(0, F0 * BLOCK_R * F1)
        t_i1 = t % F1
        t_row = row0 + (t // F1) % BLOCK_R
        t_i0 = t // (F1 * BLOCK_R)
        i2 = tl.arange(0, F2)
        offs = (t_row.to(tl.int64) * stride_y + t_i0 * Q + t_i1 * N2)[:, None] + i2[None, :]
        ok = ((t_row < rows) & (t_i0 < N0) & (t_i1 < N1))[:, None] & (i2 < N2)[None, :]
    elif F2 > 1:
        # stage 2 on the last axis: y[(i0, r), i2] = (acc viewed [(i0, r), i2]) @ H2^T (H2 symmetric)
        out = tl.zeros([F0 * BLOCK_R, F2], dtype=tl.float32)
        out = _mul(tl.reshape(acc, [F0 * BLOCK_R, F2]), h2, out, Z_PARTS, True, INTERPRETER)
        t = tl.arange(0, F0 * BLOCK_R)
        t_i0 = t // BLOCK_R
        t_row = row0 + t % BLOCK_R
        i2 = tl.arange(0, F2)
        out = _scaled(out, scale, y_ptr, os_ptr, b_ptr, (t_i0 * Q)[:, None] + i2[None, :],
                      (t_i0 < N0)[:, None] & (i2 < N2)[None, :], HAS_OUT_SCALE, HAS_BIAS, INTERPRETER)
        offs = (t_row.to(tl.int64) * stride_y + t_i0 * Q)[:, None] + i2[None, :]
        ok = ((t_row < rows) & (t_i0 < N0))[:, None] & (i2 < N2)[None, :]
    else:
        i0 = tl.arange(0, F0)  # acc is y[i0, r]
        r = row0 + tl.arange(0, BLOCK_R)
        out = _scaled(acc, scale, y_ptr, os_ptr, b_ptr, (i0 * Q)[:, None] + 0 * r[None, :],
                      (i0 < N0)[:, None] & (r >= 0)[None, :], HAS_OUT_SCALE, HAS_BIAS, INTERPRETER)
        offs = (i0 * Q)[:, None] + (r.to(tl.int64) * stride_y)[None, :]
        ok = (i0 < N0)[:, None] & (r < rows)[None, :]
    tl.store(y_ptr + offs, out, mask=ok)


@triton.jit
def _scaled(out, scale, y_ptr, os_ptr, b_ptr, col, ok, HAS_OUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
            INTERPRETER: tl.constexpr):
    """out * scale (* out_scale[col]) (+ bias[col]) in y's dtype; col: each element's column in the row."""
    out = out * scale
    if HAS_OUT_SCALE:
        out = out * tl.load(os_ptr + col, mask=ok, other=0.0)
    if HAS_BIAS:
        out = out + tl.load(b_ptr + col, mask=ok, other=0.0).to(tl.float32)
    return _cast(out, y_ptr.dtype.element_ty, INTERPRETER)


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 v in dtype, rounded to nearest even (the interpreter truncates fp32 -> bf16: rounded first here)."""
    if INTERPRETER and dtype == tl.bfloat16:
        v = _round_to_bf16(v)
    return v.to(dtype)


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, h0_ptr, h1_ptr, h2_ptr, in_ptr, os_ptr, b_ptr, rows, stride_x, stride_y, scale,
                     N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                     F2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
                     X_PARTS: tl.constexpr, Z_PARTS: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
                     HAS_OUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETER: tl.constexpr):
    """Program pid transforms GROUPS groups of BLOCK_R rows, one after the other (the next group's loads can be
    issued while this one computes); the H matrices are read once per program."""
    h0 = tl.zeros([1], dtype=tl.float32)  # placeholders for matrices read elsewhere or not needed
    h1 = h0
    h2 = h0
    if BLOCK_K == F0:
        h0 = _load_square(h0_ptr, F0)
    if F1 > 1:
        h1 = _load_square(h1_ptr, F1)
    if F2 > 1:
        h2 = _load_square(h2_ptr, F2)
    for g in range(GROUPS):
        row0 = (tl.program_id(0) * GROUPS + g) * BLOCK_R
        _transform_rows(x_ptr, y_ptr, h0_ptr, in_ptr, os_ptr, b_ptr, h0, h1, h2, row0, rows, stride_x, stride_y,
                        scale, N0, N1, N2, F0, F1, F2, BLOCK_R, BLOCK_K, X_PARTS, Z_PARTS, HAS_IN_SCALE,
                        HAS_OUT_SCALE, HAS_BIAS, INTERPRETER)


def padded(plan: tuple[int, int, int]) -> tuple[int, int, int]:
    """(F0, F1, F2): the axes (N0, N1, N2) as the kernel holds them, powers of two >= 16 (axis 0 always; a
    size-1 axis 1 or 2 stays 1: no stage)."""
    return tuple(1 if (size == 1 and axis) else max(MIN_DOT, next_power_of_2(size)) for axis, size in enumerate(plan))


def plan_cost(plan: tuple[int, int, int], n: int) -> float:
    """A rough cost per element of a plan, to rank them: padded tile / n times the multiply-adds per padded
    element (stage 0 on 16-bit input, later stages on hi + lo pieces), plus a fixed charge for the transposes
    a third stage brings."""
    f0, f1, f2 = padded(plan)
    flops = 2 * f0 + (4 * f2 if f2 > 1 else 0) + (4 * f1 if f1 > 1 else 0)
    return math.prod(padded(plan)) / n * flops + (THREE_STAGE_COST if f1 > 1 else 0)


def plans(n: int) -> list[tuple[int, int, int]]:
    """Candidate (N0, N1, N2) with n = N0 N1 N2 for the kernel, cheapest first (plan_cost; ties: fewer stages,
    smaller N0). N0 = m a for a power of two a (H0 = H_m ⊗ H_a, padded to at most MAX_AXIS0); the rest
    q = p / a is one last axis N2 = q when q <= 128 (padded to 16 when smaller; N1 = 1), else N1 N2 with both
    in [16, 128]."""
    m, p = hadamard_factors(n)
    axes = (16, 32, 64, 128)
    out = []
    a = 1
    while a <= p and max(MIN_DOT, next_power_of_2(m * a)) <= MAX_AXIS0:
        q = p // a
        if m * a == 1 and p > 1:
            pass  # an axis 0 of size 1 would be padded to 16 for nothing
        elif q <= MAX_AXIS:
            out.append((m * a, 1, q))
        else:
            out += [(m * a, b, q // b) for b in axes if q // b in axes]
        a *= 2
    out = [t for t in out if math.prod(padded(t)) <= MAX_PADDED]
    if not out:
        raise ValueError(f"n={n} is too large for the Hadamard kernel: a row padded to powers of two must fit "
                         f"in {MAX_PADDED} elements (n = {m} * {p}); use hadamard_transform_ref")
    return sorted(out, key=lambda t: (plan_cost(t, n), t[1] > 1, t[0]))


def _config(plan, block_r, num_warps, groups=1, num_stages=2, block_k=64):
    n0, n1, n2 = plan
    return {"N0": n0, "N1": n1, "N2": n2, "BLOCK_R": block_r, "BLOCK_K": min(block_k, padded(plan)[0]),
            "GROUPS": groups, "num_warps": num_warps, "num_stages": num_stages}


def configs(n: int, rows: int) -> list[dict]:
    """Launch candidates for `rows` rows of length n (pass rows rounded up to a power of two); the first is the
    untuned default. Plans: the three cheapest of plans(n), and the cheapest with a stage count they lack. Per plan: BLOCK_R the
    fewest rows stage 0 allows (BLOCK_R F1 F2 >= 16: small tiles, more programs per SM) or a tile of ~8k
    elements; 1 warp per 1k or 2k tile elements (4..16); GROUPS 1, or 4 row groups per program when there are
    rows for 512 programs, H0 is one BLOCK_K slice and the tile has at most 16k elements (else the pipelined
    loads overflow shared memory)."""
    candidates = plans(n)
    if interpreter_on():
        f0, f1, f2 = padded(candidates[0])
        return [_config(candidates[0], max(2, MIN_DOT // (f1 * f2)), 4, groups=2, num_stages=1, block_k=32)]
    chosen = candidates[:3]  # the three cheapest, and the cheapest with a stage count they lack
    three_stage = {t[1] > 1 for t in chosen}
    chosen += [t for t in candidates[3:] if (t[1] > 1) not in three_stage][:1]
    rows = next_power_of_2(rows)
    out = []
    for plan in chosen:
        f0, f1, f2 = padded(plan)
        r_min = max(1, MIN_DOT // (f1 * f2))
        for block_r in (r_min, max(r_min, min(8192 // (f0 * f1 * f2), rows))):
            tile = block_r * f0 * f1 * f2
            for warps in (min(16, max(4, tile // 1024)), min(16, max(4, tile // 2048))):
                pipelined = rows >= 512 * 4 * block_r and f0 <= 64 and tile <= 16384
                for groups in (4, 1) if pipelined else (1,):
                    config = _config(plan, block_r, warps, groups)
                    if config not in out:
                        out.append(config)
    return out


@functools.lru_cache(maxsize=64)
def _operand(m: int, a: int, pad: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_m ⊗ H_a (or its transpose) zero-padded to [pad, pad], in dtype on device. Not hadamard_matrix(m a):
    that is another matrix where m a is itself a known order (40 = H_2 ⊗ H_20, not H_20 ⊗ H_2)."""
    h = torch.kron(hadamard_matrix(m), hadamard_matrix(a))
    out = torch.zeros(pad, pad, dtype=dtype)
    out[: m * a, : m * a] = h.T if transpose else h
    return out.to(device)


def launch(config, x, y, transpose, in_scale=None, out_scale=None, bias=None) -> None:
    """One launch with config: x, y [rows, n] with unit column stride; in_scale, out_scale fp32 [n] and bias [n]
    contiguous, or None."""
    n0, n1, n2 = config["N0"], config["N1"], config["N2"]
    f0, f1, f2 = padded((n0, n1, n2))
    rows, n = x.shape
    # 16-bit x feeds stage 0 in its own dtype; fp32 data goes to the tensor cores as bf16 pieces
    x_op = x.dtype if x.dtype != torch.float32 else torch.bfloat16
    m = hadamard_factors(n)[0]  # axis 0 is H_m ⊗ H_a, a = N0 / m
    h0 = _operand(m, n0 // m, f0, transpose, x_op, x.device)
    h1 = _operand(1, n1, f1, False, torch.bfloat16, x.device) if f1 > 1 else h0
    h2 = _operand(1, n2, f2, False, torch.bfloat16, x.device) if f2 > 1 else h0
    grid = (triton.cdiv(rows, config["BLOCK_R"] * config["GROUPS"]),)
    _hadamard_kernel[grid](
        x, y, h0, h1, h2, x if in_scale is None else in_scale, x if out_scale is None else out_scale,
        x if bias is None else bias, rows, x.stride(0), y.stride(0), 1.0 / math.sqrt(n), N0=n0, N1=n1, N2=n2,
        F0=f0, F1=f1, F2=f2, BLOCK_R=config["BLOCK_R"], BLOCK_K=config["BLOCK_K"], GROUPS=config["GROUPS"],
        X_PARTS=3 if x.dtype == torch.float32 else 1, Z_PARTS=3 if x.dtype == torch.float32 else 2,
        HAS_IN_SCALE=in_scale is not None, HAS_OUT_SCALE=out_scale is not None, HAS_BIAS=bias is not None,
        INTERPRETER=interpreter_on(), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def _rows_view(t, name):
    """t as [rows, n] without a copy (what a kernel writing t needs)."""
    try:
        view = t.view(-1, t.shape[-1])
    except RuntimeError:
        view = None
    if view is None or (t.shape[-1] > 1 and t.stride(-1) != 1):
        raise ValueError(f"{name} must be viewable as [rows, n] with a contiguous last dim; got shape "
                         f"{tuple(t.shape)} with strides {tuple(t.stride())}")
    return view


def hadamard_transform(x, transpose=False, out=None, in_scale=None, out_scale=None, bias=None):
    """y = ((x * in_scale) @ H_n^T) * out_scale + bias (transpose=True: H_n; each extra optional) along the last
    dim of x [..., n], in x's dtype and shape. out: where to write y (x's shape and dtype, last dim contiguous);
    out=x transforms x in place (any other out must not overlap x). Returns out, or a new tensor when out is None."""
    check_inputs(x, out)
    check_vectors(x, in_scale=in_scale, out_scale=out_scale, bias=bias)
    check_device({"x": x, "out": out, "in_scale": in_scale, "out_scale": out_scale, "bias": bias})
    n = x.shape[-1]
    plans(n)  # raises for rows too long for the kernel
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = _rows_view(out, "out")
    xr = x.reshape(-1, n)
    if n > 1 and xr.stride(1) != 1:
        xr = xr.contiguous()
    if xr.shape[0] == 0:
        return out
    vectors = [None if v is None else v.to(torch.float32).contiguous() for v in (in_scale, out_scale)]
    vectors.append(None if bias is None else bias.contiguous())
    launch(tuned_config(xr, vectors), xr, y, transpose, *vectors)
    return out


def tuned_config(x, vectors=(None, None, None)) -> dict:
    """The launch config for rows x [rows, n] (checked, unit column stride) and the fused vectors (in_scale,
    out_scale, bias; None where absent): tuned once per GPU and key, with the same vectors fused (they cost
    registers and shared memory, so a plain transform's best config need not even launch with them)."""
    rows, n = x.shape
    key = {"N": n, "M": min(next_power_of_2(rows), 8192), "dtype": str(x.dtype).removeprefix("torch.")}
    fused = "+".join(name for name, v in zip(("in_scale", "out_scale", "bias"), vectors) if v is not None)
    if fused:
        key["fused"] = fused
    scratch = []

    def run(config):  # tuning writes to a scratch tensor, so that out=x is not transformed repeatedly
        if not scratch:
            scratch.append(torch.empty_like(x))
        launch(config, x, scratch[0], False, *vectors)

    return tune("hadamard_transform", key, configs(n, key["M"]), run, x.device)
