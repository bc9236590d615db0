"""Dequantizing GEMM with tl.dot (batch >= 2), and the dequantize-only kernel.

    y[M, N] = x[:, perm] @ w (+ bias),   w[k, n] = (code(k, n) - zeros[k // group_size, n]) * scales[k // group_size, n]
    code(k, n) = (qweight[k // epw, n] >> ((k % epw) * bits)) & (2^bits - 1)          (tquant/packing.py)

`gemm`: program (pid, split) owns a [BLOCK_M, BLOCK_N] tile of y (GROUP_M-grouped order) and walks its
share of K in tiles of BLOCK_KW words = BLOCK_K code slots (EPW_P2 = next_power_of_2(epw) slots a word;
3-bit wastes 6 of 16, with x = 0 there). Per tile: one coalesced load of words as [BLOCK_N, BLOCK_KW];
every code is dequantized in registers with constant masks (code_minus_zero) and the codes of each word
are joined next to each other (codes_tree), giving w^T [BLOCK_N, BLOCK_K] in the order of x's columns;
then one tl.dot(x tile, w) with fp32 accumulation. For M > 16, perm is applied to x once by the launcher;
for small M it is gathered in the x loads. SPLIT_K > 1 splits K over grid axis 1 (split_args and k_range: the
split-K setup shared by every split-K launcher and kernel of tquant.kernels; store_output sums the splits in the
same launch). On CUDA, fp16/bf16 weights of 2/4/8 bits are dequantized two words at a
time in packed half2 arithmetic (dequant_pair_asm) when BLOCK_M <= 16 (larger tiles with fp16 joins
break Triton 3.6's compiler); elsewhere (interpreter, fp32, 3-bit, bf16 8-bit) in fp32 (code_minus_zero).
Both give the same values: (code - zero) * scale rounded once to x's dtype.
`dequantize`: writes w [K, N] once (rows scattered to perm), for cuBLAS at large batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import dot_args, interpreter_on
from .tiling import tile_offsets

MAGIC_BITS = 0x4B000000  # float32 2^23; (code | MAGIC_BITS) read as float32 is 2^23 + code. Passed to the
# kernels as an argument (magic): in a register it lets ptxas fuse the mask and the OR into one LOP3.
MAGIC = tl.constexpr(8388608.0)


@triton.jit
def code_minus_zero(words, J: tl.constexpr, zero, magic, BITS: tl.constexpr):
    """(code_J - zero) * 2^P exactly in fp32, for code J of every word, with 2^P = code_scale(J, BITS).

    Code J is masked in place (codes ending below bit 23 as they are, the others after one shift that
    is shared by all of them) and OR-ed into the float32 2^23, which then reads 2^23 + code * 2^P: one
    LOP3 and one FADD per code, no int->float convert. Exact while |zero| * 2^P < 2^23 (any zero in
    [0, 2^bits))."""
    LO: tl.constexpr = (23 - BITS) // BITS + 1  # codes 0..LO-1 end at or below bit 22
    HI: tl.constexpr = LO * BITS - min(BITS, 4)  # shift for the others: code LO lands at bit > 0 (no BFE)
    if J < LO:
        bits = words & (((1 << BITS) - 1) << (J * BITS))
    else:
        bits = (words.to(tl.uint32, bitcast=True) >> HI).to(tl.int32, bitcast=True)
        bits = bits & (((1 << BITS) - 1) << (J * BITS - HI))
    return (bits | magic).to(tl.float32, bitcast=True) - (zero * code_scale(J, BITS) + MAGIC)


@triton.jit
def code_scale(J: tl.constexpr, BITS: tl.constexpr):
    """2^P, the factor code_minus_zero leaves on code J."""
    LO: tl.constexpr = (23 - BITS) // BITS + 1
    HI: tl.constexpr = LO * BITS - min(BITS, 4)
    if J < LO:
        return 1.0 * (1 << (J * BITS))
    else:
        return 1.0 * (1 << (J * BITS - HI))


@triton.jit
def codes_tree(words, zero, scale, magic, J: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr,
               BITS: tl.constexpr, ASM: tl.constexpr, DTYPE: tl.constexpr):
    """(code - zero) * scale for codes J, J + STRIDE, ... (COUNT, a power of two) of every word, stacked on
    trailing dims of size 2 (tl.join, so they stay in each thread) with the lowest stride last:
    flattened, trailing index i holds code J + STRIDE * i. Codes past epw (3-bit) are garbage, finite.
    ASM: in DTYPE by dequant_pair_asm (magic = its 2^E pattern in both halves), else in fp32 by
    code_minus_zero (joining fp32 and converting after keeps Triton 3.6 compiling every GEMM tile)."""
    if COUNT == 1:
        if ASM:
            w = dequant_pair_asm(words, J, zero, scale, magic, BITS, DTYPE)
        else:
            w = code_minus_zero(words, J, zero, magic, BITS) * (scale / code_scale(J, BITS))
        return w
    else:
        return tl.join(codes_tree(words, zero, scale, magic, J, 2 * STRIDE, COUNT // 2, BITS, ASM, DTYPE),
                       codes_tree(words, zero, scale, magic, J + STRIDE, 2 * STRIDE, COUNT // 2, BITS, ASM, DTYPE))


@triton.jit
def dequant_pair_asm(words, J: tl.constexpr, zero, scale, magic, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """(code_J - zero) * scale in DTYPE (fp16 / bf16) for two words a and b per asm block, in packed
    half2 arithmetic, 2 instructions a code (bits 2, 4, 8; bf16 not 8): PRMT puts the byte holding code J
    of a in lane 0 and of b in lane 1; one LOP3 masks the code at bit O of each lane and ORs in
    magic = 2^E in both lanes (E = 10 fp16, 7 bf16: E mantissa bits), giving 2^E + code * 2^O; one FMA
    by 2^-O minus (2^(E-O) + zero) gives code - zero exactly (small integers); one MUL by scale rounds once.
    bf16 codes that would reach bit 7 (the exponent) are taken from words >> 4."""
    E: tl.constexpr = 10 if DTYPE == tl.float16 else 7
    SHIFT: tl.constexpr = 4 if (J * BITS) % 8 + BITS > E else 0
    B: tl.constexpr = J * BITS // 8
    O: tl.constexpr = (J * BITS) % 8 - SHIFT
    src = words
    if SHIFT > 0:
        src = (words.to(tl.uint32, bitcast=True) >> SHIFT).to(tl.int32, bitcast=True)
    one: tl.constexpr = (15 - O) << 10 if DTYPE == tl.float16 else (127 - O) << 7  # 2^-O, 16-bit pattern
    T: tl.constexpr = "f16x2" if DTYPE == tl.float16 else "bf16x2"
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, zz, ss; .reg .f32 z0, z1;"
        "prmt.b32 t, $1, $2, $9;"
        "lop3.b32 t, t, $11, $7, 0xEA;"  # (t & mask) | magic
        "sub.f32 z0, $13, $3; sub.f32 z1, $13, $4;"  # -(2^(E-O) + zero)
        "cvt.rn." + T + ".f32 zz, z1, z0;"
        "cvt.rn." + T + ".f32 ss, $6, $5;"
        "fma.rn." + T + " t, t, $15, zz;"
        "mul.rn." + T + " $0, t, ss; }",
        "=r" + ",r" * 16,
        [src, zero, scale, magic, B | B << 4 | (4 + B) << 8 | (4 + B) << 12,
         (((1 << BITS) - 1) << O) * 0x10001, -(1 << (E - O)) * 1.0, one | one << 16],
        dtype=DTYPE.value, is_pure=True, pack=2)


@triton.jit
def group_params(s_ptr, z_ptr, g, n, n_ok, N, K, group_size, stride_sg, SCALE_BITS: tl.constexpr,
                 STAT_GROUP: tl.constexpr):
    """scale and zero (fp32) of groups g at output columns n (broadcastable against each other).
    SCALE_BITS == 0: s_ptr, z_ptr are the scales and zeros [G, N]. Else SpQR's bilevel grid (tquant.formats.spqr):
    s_ptr holds a byte a group, scale code | zero << SCALE_BITS, [G, N]; z_ptr the fp16 second level
    [2, G, N / STAT_GROUP] (step, low): scale = code * step + low of column block n // STAT_GROUP."""
    off = g * stride_sg + n
    if SCALE_BITS == 0:
        s = tl.load(s_ptr + off, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + off, mask=n_ok, other=0.0).to(tl.float32)
    else:
        stats = tl.load(s_ptr + off, mask=n_ok, other=0).to(tl.int32)
        blocks = N // STAT_GROUP
        m = g * blocks + n // STAT_GROUP
        step = tl.load(z_ptr + m, mask=n_ok, other=0.0).to(tl.float32)
        low = tl.load(z_ptr + (K // group_size) * blocks + m, mask=n_ok, other=0.0).to(tl.float32)
        s = (stats & ((1 << SCALE_BITS) - 1)).to(tl.float32) * step + low
        z = (stats >> SCALE_BITS).to(tl.float32)
    return s, z


@triton.jit
def load_group_params(s_ptr, z_ptr, kw0, rows, offs_n, n_ok, N, K, EPW: tl.constexpr, group_size, stride_sg,
                      GROUPS: tl.constexpr, J: tl.constexpr, SCALE_BITS: tl.constexpr, STAT_GROUP: tl.constexpr):
    """scale and zero (fp32, group_params) for words kw0 + rows, shaped to broadcast over [rows, offs_n]:
    GROUPS == 0: the tile lies in one group -> [1, BLOCK_N]; 1: each word lies in one group ->
    [BLOCK_KW, BLOCK_N]; 2, 3: per code k = word * EPW + J -> [BLOCK_KW, BLOCK_N]."""
    if GROUPS == 0:
        g = kw0 * EPW // group_size
    else:
        g = (tl.minimum((kw0 + rows) * EPW + J, K - 1) // group_size)[:, None]
    return group_params(s_ptr, z_ptr, g, offs_n[None, :], n_ok[None, :], N, K, group_size, stride_sg, SCALE_BITS,
                        STAT_GROUP)


@triton.jit
def split_k_sum(acc, offs_m, offs_n, M, N, ws_ptr, count_ptr, tile, split, splits):
    """(sum, last) of a split-K tile's partial acc [BLOCK_M, BLOCK_N] (fp32 or int32, as the workspace): each split
    stores acc in the workspace [splits, M, N] and counts itself in count[tile] (atomic, acq_rel); the last to arrive
    sums all partials from zero in split order 0, 1, ..., splits - 1 and sets count[tile] back to 0, so one launch does
    the whole reduction. The others get (acc, False) and store nothing."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ws + split * M * N, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is stored before the release below
    last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == splits - 1
    if last:
        acc = tl.zeros_like(acc)
        for i in range(splits):
            acc += tl.load(ws + i * M * N, mask=mask, other=0, cache_modifier=".cg")
        tl.store(count_ptr + tile, 0)
    return acc, last


@triton.jit
def k_range(K, per_split, split, SPLIT: tl.constexpr):
    """[start, end) of K (elements, words, groups or K tiles: the unit of per_split) that split `split` (the
    program's index on the split grid axis) walks: all of K unsplit (SPLIT false), else
    [split per_split, min((split + 1) per_split, K)) (per_split a multiple of the K step: split_k_grid), so
    splits 0 .. S - 1 of S = ceil(K / per_split) cover K once, each a whole number of K steps."""
    start, end = 0, K
    if SPLIT:
        start = split * per_split
        end = tl.minimum(start + per_split, K)
    return start, end


@triton.jit
def store_output(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, bias_ptr, ws_ptr, count_ptr, tile, split, splits,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 (+ bias) -> y in y's dtype. SPLIT: the fp32 workspace [splits, M, N] sums the
    splits in the same launch (split_k_sum), and the last split to arrive writes y."""
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    last = True
    if SPLIT:
        acc, last = split_k_sum(acc, offs_m, offs_n, M, N, ws_ptr, count_ptr, tile, split, splits)
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_tile(q_ptr, s_ptr, z_ptr, kw0, rows, slot, offs_n, n_ok, N, K, KW, group_size, stride_qk, stride_sg, magic,
                 BITS: tl.constexpr, EPW: tl.constexpr, EPW_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUPS: tl.constexpr, ASM: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 SCALE_BITS: tl.constexpr, STAT_GROUP: tl.constexpr, MASK_K: tl.constexpr):
    """One K step of a GEMM: words kw0 + rows of columns offs_n dequantized, w [BLOCK_N, BLOCK_K] (slot = word *
    EPW_P2 + j holds code j of that word), with k [BLOCK_K] the input channel of each slot and k_ok its mask.
    Slots that hold no input channel (a 3-bit word's 6 padding slots; with MASK_K, the launcher's flag for a K that
    the K steps overrun, the slots past K) are 0: their code 0 dequantizes to (0 - z) s, which is -inf in fp16 where
    the group's lowest grid point passes -65504, and x's 0 there would make the dot 0 * inf = NaN."""
    # words as [BLOCK_N, BLOCK_KW] so that a word's codes end up adjacent along K in each thread
    words = tl.load(q_ptr + (kw0 + rows)[None, :] * stride_qk + offs_n[:, None],
                    mask=((kw0 + rows) < KW)[None, :] & n_ok[:, None], other=0)
    if EPW == EPW_P2:
        k = kw0 * EPW + slot
        k_ok = k < K
    else:
        k = (kw0 + slot // EPW_P2) * EPW + slot % EPW_P2
        k_ok = (slot % EPW_P2 < EPW) & (k < K)
    if GROUPS < 2:
        s, z = load_group_params(s_ptr, z_ptr, kw0, rows, offs_n, n_ok, N, K, EPW, group_size, stride_sg, GROUPS, 0,
                                 SCALE_BITS, STAT_GROUP)
        w = tl.reshape(codes_tree(words, tl.trans(z), tl.trans(s), magic, 0, 1, EPW_P2, BITS, ASM, DOT_DTYPE),
                       (BLOCK_N, BLOCK_K))
    else:  # per-code groups: codes first, then zero and scale per slot
        w = tl.reshape(codes_tree(words, 0.0, 1.0, magic, 0, 1, EPW_P2, BITS, False, tl.float32),
                       (BLOCK_N, BLOCK_K))
        s, z = group_params(s_ptr, z_ptr, (tl.minimum(k, K - 1) // group_size)[None, :], offs_n[:, None],
                            n_ok[:, None], N, K, group_size, stride_sg, SCALE_BITS, STAT_GROUP)
        w = (w - z) * s
    if EPW != EPW_P2 or MASK_K:
        w = tl.where(k_ok[None, :], w, 0.0)
    return w, k, k_ok


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr,
    ws_ptr, count_ptr, M, N, K, KW, group_size, stride_xm, stride_qk, stride_sg, stride_ym, kw_per_split, splits,
    magic, BITS: tl.constexpr, EPW: tl.constexpr, EPW_P2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUP_M: tl.constexpr, GROUPS: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, SCALE_BITS: tl.constexpr, STAT_GROUP: tl.constexpr, MASK_K: tl.constexpr,
):
    BLOCK_K: tl.constexpr = BLOCK_KW * EPW_P2
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tl.arange(0, BLOCK_KW)
    slot = tl.arange(0, BLOCK_K)  # slot = word * EPW_P2 + j holds code j of that word
    kw_start, kw_end = k_range(KW, kw_per_split, pid_k, SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        w, k, k_ok = dequant_tile(q_ptr, s_ptr, z_ptr, kw0, rows, slot, offs_n, n_ok, N, K, KW, group_size, stride_qk,
                                  stride_sg, magic, BITS, EPW, EPW_P2, BLOCK_N, BLOCK_K, GROUPS, ASM, DOT_DTYPE,
                                  SCALE_BITS, STAT_GROUP, MASK_K)
        col = k
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k_ok, other=0)
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if BLOCK_M <= 16:  # y^T = w^T x^T: BLOCK_N fills the MMA's M side, w^T is the operand from registers
            acc_t = tl.dot(w.to(DOT_DTYPE), tl.trans(xa.to(DOT_DTYPE)), acc_t, input_precision=PRECISION)
        else:
            acc = tl.dot(xa.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    if BLOCK_M <= 16:
        acc = tl.trans(acc_t)
    store_output(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, bias_ptr, ws_ptr, count_ptr, pid, pid_k, splits,
                 HAS_BIAS, SPLIT)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, z_ptr, perm_ptr, w_ptr, N, K, KW, group_size, stride_qk, stride_sg, stride_wk,
                       magic, BITS: tl.constexpr, EPW: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_PERM: tl.constexpr, SCALE_BITS: tl.constexpr, STAT_GROUP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    words = tl.load(q_ptr + rows[:, None] * stride_qk + offs_n[None, :], mask=(rows < KW)[:, None] & n_ok[None, :],
                    other=0)
    for j in tl.static_range(EPW):
        k = rows * EPW + j
        k_ok = k < K
        s, z = group_params(s_ptr, z_ptr, (tl.minimum(k, K - 1) // group_size)[:, None], offs_n[None, :],
                            n_ok[None, :], N, K, group_size, stride_sg, SCALE_BITS, STAT_GROUP)
        w = code_minus_zero(words, j, z, magic, BITS) * (s / code_scale(j, BITS))
        dst = k
        if HAS_PERM:
            dst = tl.load(perm_ptr + k, mask=k_ok, other=0)
        tl.store(w_ptr + dst[:, None] * stride_wk + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=k_ok[:, None] & n_ok[None, :])


def split_k_grid(kw_total: int, block_kw: int, split_k: int) -> tuple[int, int]:
    """(words per split, a multiple of block_kw; number of splits)."""
    per_split = triton.cdiv(triton.cdiv(kw_total, split_k), block_kw) * block_kw
    return per_split, triton.cdiv(kw_total, per_split)


def output_buffer(m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The kernels' output y (uninitialized; tests patch this to poison it)."""
    return torch.empty(m, n, dtype=dtype, device=device)


_counters: dict[tuple[torch.device, int], torch.Tensor] = {}  # per (device, stream): launches on one stream run in order
_retired: list[torch.Tensor] = []  # outgrown counter buffers: a captured CUDA graph may still point at one, so never freed


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def split_k_counters(tiles: int, device) -> torch.Tensor:
    """int32 arrival counters [>= tiles], all zero, for store_output's one-launch split-K reduction: one buffer per
    (device, current stream), so launches on concurrent streams never share a counter (each launch leaves its
    counters at zero, so launches in one stream's order can). A buffer that a launch outgrows is replaced, not freed:
    a CUDA graph captured with it keeps pointing at live, zeroed memory. A buffer first allocated during graph
    capture comes from the graph's pool and its zeros are part of the graph (reset at every replay)."""
    device = torch.device(device)
    key = (device, _stream_id(device))
    counters = _counters.get(key)
    if counters is None or counters.numel() < tiles:
        if counters is not None:
            _retired.append(counters)
        counters = _counters[key] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counters


def split_k_buffers(splits: int, m: int, n: int, tiles: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace [splits, m, n], split_k_counters(tiles)) for store_output's one-launch split-K reduction."""
    return torch.empty(splits, m, n, dtype=torch.float32, device=device), split_k_counters(tiles, device)


def split_args(config, k_total: int, block: int, m: int, n: int, tiles: int, y: torch.Tensor,
               partial_dtype: torch.dtype = torch.float32) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(per_split, splits, workspace, counters) of config's SPLIT_K (1 if absent) over k_total (elements, words,
    groups or K tiles, in K steps of block), for a launch on grid (tiles, splits) and the kernel's k_range:
    split_k_grid's P = ceil(ceil(k_total / SPLIT_K) / block) * block and S = ceil(k_total / P), split s owning
    [s P, min((s + 1) P, k_total)); for S > 1 the workspace [S, m, n] of partial_dtype (fp32, or int32 as a view of
    the same buffer) and the arrival counters of the tiles (split_k_buffers), else (k_total, 1, y, y): one split
    covering all of K, y passed twice as the unused buffers."""
    split_k = config.get("SPLIT_K", 1)
    if split_k <= 1 or k_total <= block:
        return k_total, 1, y, y
    per_split, splits = split_k_grid(k_total, block, split_k)
    if splits == 1:
        return k_total, 1, y, y
    part, counters = split_k_buffers(splits, m, n, tiles, y.device)
    return per_split, splits, part.view(partial_dtype), counters


ASM_MAGIC = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}  # 1024.0 / 128.0 in both halves
ASM_BITS = {torch.float16: (2, 4, 8), torch.bfloat16: (2, 4)}  # bf16's 7 mantissa bits hold no 8-bit code


def use_asm(dtype: torch.dtype, bits: int) -> bool:
    """Whether dequant_pair_asm applies: on CUDA (the interpreter cannot run inline asm), ASM_BITS."""
    return not interpreter_on() and bits in ASM_BITS.get(dtype, ())


def group_mode(block_kw: int, epw: int, group_size: int, k: int, bilevel: bool = False) -> int:
    """GROUPS of load_group_params: 0 if every tile of block_kw words lies in one group (tiles start at
    multiples of block_kw words), 1 if every word does, else (3-bit with a group size not a multiple of 10) 2 if a
    word spans at most two groups and the stats are bilevel, 3 otherwise. (The GEMV's loop at 3 bits on sm_90: with
    bilevel stats mode 2 takes 1173 instructions and 41 loads against mode 3's 1817 and 176, with plain fp16 stats
    796 and 11 against 932 and 26 but 238 registers against 72.)"""
    if group_size == k or group_size % (block_kw * epw) == 0:
        return 0
    if group_size % epw == 0:
        return 1
    return 2 if group_size >= epw and bilevel else 3


def stat_args(bilevel: tuple[int, int] | None) -> dict:
    """group_params' constexprs: bilevel = (scale_bits, stat_group) of SpQR's grid, or None (plain scales, zeros)."""
    scale_bits, stat_group = bilevel or (0, 1)
    return dict(SCALE_BITS=scale_bits, STAT_GROUP=stat_group)


def gemm(x, qweight, scales, zeros, perm, bias, *, bits: int, group_size: int, config: dict,
         bilevel: tuple[int, int] | None = None) -> torch.Tensor:
    """y = x[:, perm] @ dequant(qweight) (+ bias) for x [M, K] with x.stride(1) == 1 (bilevel: stat_args)."""
    m, k = x.shape
    n = qweight.shape[1]
    epw = 32 // bits
    epw_p2 = triton.next_power_of_2(epw)
    block_kw = config["BLOCK_K"] // epw_p2
    if perm is not None and m > 16:  # gather x once rather than in every program's loads
        x, perm = x[:, perm], None
    groups = group_mode(block_kw, epw, group_size, k, bilevel is not None)
    asm = use_asm(x.dtype, bits) and groups < 2 and config["BLOCK_M"] <= 16
    y = output_buffer(m, n, x.dtype, x.device)
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    per_split, splits, ws, counters = split_args(config, qweight.shape[0], block_kw, m, n, tiles, y)
    _dequant_gemm_kernel[(tiles, splits)](
        x, qweight, scales, zeros, perm if perm is not None else qweight, bias if bias is not None else y, y, ws,
        counters, m, n, k, qweight.shape[0], group_size, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        per_split, splits, ASM_MAGIC[x.dtype] if asm else MAGIC_BITS, BITS=bits, EPW=epw, EPW_P2=epw_p2,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_KW=block_kw, GROUP_M=config["GROUP_M"],
        GROUPS=groups, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, SPLIT=splits > 1, ASM=asm,
        MASK_K=k % (block_kw * epw) != 0, **dot_args(x.dtype), **stat_args(bilevel), num_warps=config["num_warps"],
        num_stages=config["num_stages"] if groups < 2 else 1,  # pipelining per-code scale loads costs too much smem
    )
    return y


def dequantize(qweight, scales, zeros, perm, *, bits: int, group_size: int, in_features: int, dtype: torch.dtype,
               bilevel: tuple[int, int] | None = None) -> torch.Tensor:
    """w [K, N] in dtype in input-channel order: w[perm[k]] = dequant row k (w[k] without perm)."""
    k, n = in_features, qweight.shape[1]
    epw = 32 // bits
    w = output_buffer(k, n, dtype, qweight.device)
    block_kw, block_n = (4, 32) if interpreter_on() else (8, 128)
    grid = (triton.cdiv(qweight.shape[0], block_kw), triton.cdiv(n, block_n))
    _dequantize_kernel[grid](
        qweight, scales, zeros, perm if perm is not None else qweight, w, n, k, qweight.shape[0], group_size,
        qweight.stride(0), scales.stride(0), w.stride(0), MAGIC_BITS,
        BITS=bits, EPW=epw, BLOCK_KW=block_kw, BLOCK_N=block_n, HAS_PERM=perm is not None, **stat_args(bilevel),
        num_warps=4,
    )
    return w


def _configs(tiles, split_k, stages, n, kw) -> list[dict]:
    """tiles: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), BLOCK_K counting code slots (BLOCK_K // EPW_P2 words).
    Split-K counts that would leave a split without K work or make over 4 waves of programs are left out."""
    out = []
    for bm, bn, bk, warps in tiles:
        for sk in split_k:
            if sk > 1 and (kw < 2 * sk * bk // 8 or -(-n // bn) * sk > 4 * 132):
                continue
            out += [dict(path="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_M=8, num_warps=warps,
                         num_stages=st) for st in stages]
    return out


INTERPRETER_CONFIGS = (  # small blocks so that tests cover several tiles, splits and masks
    dict(path="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GROUP_M=2, num_warps=4, num_stages=1),
    dict(path="gemm", BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GROUP_M=2, num_warps=4, num_stages=1),
)


def configs(m: int, n: int, kw: int) -> list[dict]:
    """Candidates for batch m >= 2, N = n, kw words along K (the first is the untuned default).
    For m <= 16, BLOCK_N is the MMA's M side (y^T = w^T x^T)."""
    if m <= 16:
        tiles = [(16, 64, 256, 4), (16, 64, 128, 4), (16, 128, 128, 4), (16, 128, 256, 4), (16, 256, 128, 8)]
        return _configs(tiles, (1, 2, 4, 8, 16), (3,), n, kw)
    if m <= 64:
        return _configs([(64, 64, 128, 4), (64, 128, 128, 4), (64, 128, 64, 4)], (1, 2, 4), (3, 4), n, kw)
    tiles = [(128, 128, 64, 8), (128, 256, 128, 8), (128, 256, 64, 8), (64, 128, 128, 4), (256, 128, 64, 16)]
    return _configs(tiles, (1,), (3, 4), n, kw)
