"""Tile helpers shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid in grouped order: GROUP_M row blocks in a row walk the same column
    blocks, so each weight tile is reused from L2 by GROUP_M programs."""
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * grid_n)) % size_m, (pid % (GROUP_M * grid_n)) // size_m


@triton.jit
def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(offs_m [BLOCK_M], offs_n [BLOCK_N], m_ok, n_ok) of program pid's output tile in grouped order."""
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def unpack_words(w, BITS: tl.constexpr):
    """int32 codes [M, N * 32 / BITS] of words w [M, N] (BITS 1, 2, 4, 8, 16: code j of word i at bits j * BITS ->
    column i * 32 / BITS + j). Each step splits every field in two halves and tl.interleave's them, so both
    halves stay in one thread's registers (a reshape of shifted copies spreads the codes over lanes, and a
    tl.dot operand made from them then goes through shared memory one 16-bit element at a time). Along rows:
    tl.trans(unpack_words(tl.trans(w), BITS))."""
    x = w
    if BITS <= 16:
        x = tl.interleave(x & 0xFFFF, (x >> 16) & 0xFFFF)
    if BITS <= 8:
        x = tl.interleave(x & 0xFF, (x >> 8) & 0xFF)
    if BITS <= 4:
        x = tl.interleave(x & 0xF, (x >> 4) & 0xF)
    if BITS <= 2:
        x = tl.interleave(x & 0x3, (x >> 2) & 0x3)
    if BITS <= 1:
        x = tl.interleave(x & 0x1, (x >> 1) & 0x1)
    return x


@triton.jit
def store_output(y, bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, HAS_BIAS: tl.constexpr):
    """A GEMM tile's epilogue: y [BLOCK_M, BLOCK_N] fp32 (+ bias[n], loaded in fp32) stored in y's dtype."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
