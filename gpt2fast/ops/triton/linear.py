"""Linear ``y = x @ weight.T (+ bias) (-> tanh-GELU) (+ residual)`` with the epilogue fused.

Same signature and semantics as ``ops.reference.linear``: ``x`` (T, K), ``weight`` (N, K) (out, in, like
``nn.Linear``), result (T, N) in ``x.dtype``, fp32 accumulation, GPT-2's tanh-GELU, then ``+ residual``.

Two shapes of work, chosen by the number of rows ``T``:

- **prefill** (``T > DECODE_MAX_ROWS``): ``_linear_kernel``, ``tl.dot`` tiles of
  ``BLOCK_M x BLOCK_N`` over the output, a K loop of ``BLOCK_K``, the epilogue applied to the fp32
  accumulator before the single store. The tile is chosen per shape by :func:`prefill_tile`: the
  largest of ``PREFILL_TILES[dtype]`` (fp16/bf16: 128x128, 64x128, 64x64, K step 64) that still
  gives ``TARGET_PROGRAMS / 2`` (132, one per H100 SM) output tiles, else the smallest. A 128x128
  tile is the efficient one for a long prompt (1024 x 3072: 192 tiles), but a 100-token prompt at
  N = 768 would get only 6 programs of it; 64x64 gives it 24. A rule on shapes rather than
  ``triton.autotune``: the same tile everywhere (interpreter, every GPU), so results are
  reproducible bit for bit, and no timing run on the first call of each shape; measured
  autotuning waits for a GPU to measure it on. fp32 (the CPU/test dtype) keeps one 64x64x32 tile.
- **decode** (``T <= DECODE_MAX_ROWS`` = 64): memory-bound, the weight is the traffic. A split-K GEMV
  in one launch, ``_linear_decode_kernel``, grid ``(cdiv(N, 32), S)``: each program takes a
  ``BLOCK_N_DECODE`` (32) slice of the outputs times one K chunk and streams that weight slice once
  (32 rows x 128 contiguous elements = 8 KB fp16 per step) against all T rows (one ``tl.dot`` with
  M padded to 16, or 64 when T > 16). With S > 1 it stores its fp32 partial to a workspace
  ``(S, T, N)`` and draws a ticket: ``tl.atomic_add`` (acq_rel, gpu scope) on its N slice's int32
  counter (:mod:`gpt2fast.ops.triton.counters`). The program that draws ticket S - 1 -- whichever
  split it is -- loads the S partials of its slice in the fixed order 0..S-1 (so the sum has the same
  bits every run, unlike atomic float adds), applies the epilogue, casts, stores, and puts the counter
  back to 0 for the next launch or graph replay. The other S - 1 programs end after their ticket. Every
  program loads the epilogue's bias and residual before its ticket, so their round trip to memory overlaps
  the ticket's instead of following it (the later splits read them from L2).
  With S = 1 (a short K, or N so wide that its slices alone fill the GPU) the one program applies the
  epilogue to its own tile: no workspace, no ticket. The kernel's comments give the memory-ordering
  argument (no test can: the interpreter runs programs one at a time). The split S is the smallest
  that gives ~``TARGET_PROGRAMS`` (2 x 132 H100 SMs) programs, in whole ``BLOCK_K`` steps: 768->768
  runs 24 N-slices x 6 splits = 144 programs, 768->2304 72 x 3 = 216, 768->3072 96 x 3 = 288,
  3072->768 24 x 8 = 192 -- every SM gets a program, where one program per 32-wide N slice would leave
  108 of 132 SMs idle at N=768. The partials are S x T x N x 4 bytes (<= 0.6 MB at T=16, 1.2-2.4 MB at
  T=64), written and read back within the launch: they stay in the 50 MB L2, so DRAM still moves
  about the weight alone (at T=64 the L2 traffic of the partials is ~half the weight's bytes: a split
  rule that also weighs T is for a GPU to measure). One launch instead of a GEMV launch plus an
  epilogue launch: a launch costs a few microseconds, more than a 124M decode linear needs at the
  bandwidth floor (fp16 at 3.35 TB/s: 0.35 us for 768->768, 1.4 us for 768->3072). The prefill
  tiles would give a 64-row decode batch only cdiv(768, 128) = 6 programs at N=768; split-K gives
  144. The split rule does not depend on the device, so results are the same bits everywhere.

``ln_linear(x, ln_weight, ln_bias, eps, weight, bias, gelu=)`` is ``linear(layer_norm(x))``, the way a pre-LN
GPT-2 layer enters both sub-blocks: ``ln_linear(residual, ln_1, c_attn)`` and ``ln_linear(residual, ln_2, c_fc,
gelu)``, while ``c_proj`` and ``mlp.c_proj`` add themselves to the residual stream in their epilogue
(``residual=``). On the decode path it is the same single launch with the constexpr ``LN`` prologue (each
program computes its rows' fp32 mean/rstd over the full K, then normalises every x chunk before the dot; see
:func:`ln_linear` for the cost of recomputing the stats per program), so a decode layer is 5 launches:
4 projections and attention (which stores the step's k/v itself: ``write_kv_attention``). A prefill
runs the LayerNorm kernel, then the tiles.

``tl.dot`` precision: fp32 inputs use ``input_precision="ieee"`` (the GPU default is TF32, whose
10-bit mantissa would break the ~1e-5 agreement with the fp32 reference that CPU-dtype models rely on);
fp16/bf16 inputs take the default tensor-core path (fp32 accumulation). The interpreter gets bf16
``tl.dot`` wrong, so under ``TRITON_INTERPRET`` bf16 tiles are upcast to fp32 first (exact there).

``weight`` may be an ``Int8Weight`` (``quantization="int8"``, W8A16): both kernels then load int8 tiles (half
the bytes), widen them to x's dtype in registers for the same ``tl.dot`` (exact: |q| <= 127), and multiply each
output channel's fp32 scale into the fp32 sum once, in the epilogue (after the split-K merge, before bias, GELU
and residual). The ``W_INT8`` constexpr selects it; fp32 prefill takes ``PREFILL_TILES_W8``.

``x`` may have strided rows (``x[::2]``); ``weight``, ``bias`` and ``residual`` must have a contiguous
last dim, and all tensors one dtype (fp32, fp16 or bf16). ``bias=None`` and ``residual=None`` are
runtime flags (the epilogue is a few ops per output, so no compiled variant is spent on them); GELU is
a ``tl.constexpr``. Those flags and the row count are ``do_not_specialize``: the JIT would otherwise turn
an argument equal to 1 into a constant (and a multiple of 16 into an alignment hint), compiling other
kernels per batch size than the ``COMPILE_VARIANTS`` checked ahead of time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from gpt2fast.ops.triton import FLOAT_TYPES, element_type, interpreting, pdl_enabled, weight_operands
from gpt2fast.ops.triton.counters import ticket_counters

DECODE_MAX_ROWS = 64  # at most this many rows: the split-K GEMV path (row tile 16, or 64 above 16 rows)
TARGET_PROGRAMS = 2 * 132  # split-K aims for two programs per H100 SM
BLOCK_N_DECODE = 32
# K step of the decode GEMV: 128 contiguous fp16/bf16 (256 B per weight row); fp32 runs the FMA path of
# an ieee tl.dot, which holds its operands in registers, so 32 (128 B) keeps it from spilling
BLOCK_K_DECODE = {"fp32": 32, "fp16": 128, "bf16": 128}


def decode_warps(block_m: int, ln: bool) -> int:
    """Warps of a decode program: 4, or 8 for the LayerNorm prologue at row tile 64, whose (64, BLOCK_K) fp32
    normalisation needs the registers of 8 warps (4 warps: sm_80 spills the fp32 variant; fp16 needs ~170
    registers a thread, 8 warps ~110-140).

    Example:
        >>> decode_warps(16, True), decode_warps(64, False), decode_warps(64, True)
        (4, 4, 8)
    """
    return 8 if ln and block_m == 64 else 4


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the prefill tiles per element type, largest first
_HALF_TILES = ((128, 128, 64, 8), (64, 128, 64, 4), (64, 64, 64, 4))
PREFILL_TILES = {"fp32": ((64, 64, 32, 4),), "fp16": _HALF_TILES, "bf16": _HALF_TILES}
# With int8 weights: fp32's FMA path also holds the widened (BK, BN) tile, so K steps of 16 over 8 warps (~128
# registers; 64x64x32 on 4 warps spills ~0.6 KB on sm_80 and sm_90); fp16/bf16 keep their tiles
PREFILL_TILES_W8 = {**PREFILL_TILES, "fp32": ((64, 64, 16, 8),)}


@triton.jit
def _tanh_gelu(y):
    """GPT-2's gelu_new on fp32: 0.5 y (1 + tanh(z)), z = sqrt(2/pi) (y + 0.044715 y^3).

    With tanh(z) = 2 sigmoid(2z) - 1 (no libdevice in the interpreter) that is ``y * sigmoid(2z)``, which
    also avoids the cancellation in ``1 + tanh(z)`` for large negative ``y``.
    """
    z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return y * tl.sigmoid(2.0 * z)


@triton.jit
def _w_tile(w_ptr, cols, col_ok, K, k0, BLOCK_K: tl.constexpr):
    """The (BK, BN) tile ``w[cols, k0:k0 + BK].T`` in w's dtype, float or int8 (zeros past K and N)."""
    ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
    return tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None], mask=(ks < K)[:, None] & col_ok[None, :],
                   other=0)


@triton.jit
def _dot_tile(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32 (``IEEE``: exact fp32 products; ``UPCAST``: the interpreter's bf16 dot is wrong).

    An int8 weight tile ``b`` is widened to ``a``'s dtype first: exact (|q| <= 127 fits fp16's and bf16's 8-bit
    significands), so the dot sums ``x * q`` as the fp16/bf16 tensor-core path would sum ``x * w``, and the
    per-channel scale waits for the epilogue (one multiply per output instead of one per weight)."""
    if UPCAST:
        a = a.to(tl.float32)
    b = b.to(a.dtype)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def x_times_w_t(
    acc,  # (BM, BN) fp32 to add to (zeros, or the tiles before k_begin)
    x_ptr,  # (M, K) input rows, row stride x_row_stride, last dim contiguous
    w_ptr,  # (N, K) weight, contiguous
    rows,  # (BM,) row ids of this tile
    cols,  # (BN,) output columns (weight rows) of this tile
    row_ok,  # (BM,) rows < M
    col_ok,  # (BN,) cols < N
    x_row_stride,
    K,
    k_begin,  # first k of this tile's range (a multiple of BLOCK_K)
    k_end,  # end of the range; k >= K is masked
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products instead of TF32
    UPCAST: tl.constexpr,  # interpreter + bf16: dot in fp32 (the interpreter's bf16 dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc`` plus the fp32 tile ``x[rows, k_begin:k_end] @ w[cols, k_begin:k_end].T`` (BM, BN), shared by every
    projection kernel (linear prefill, linear split-K, the LM head)."""
    ks = tl.arange(0, BLOCK_K)  # (BK,)
    x_tile = x_ptr + rows[:, None].to(tl.int64) * x_row_stride + ks[None, :]  # (BM, BK)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(x_tile + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        acc = _dot_tile(acc, a, _w_tile(w_ptr, cols, col_ok, K, k0, BLOCK_K), IEEE, UPCAST)
    return acc


@triton.jit
def _row_stats(
    x_ptr,  # (M, K) input rows, row stride x_row_stride, last dim contiguous
    rows,  # (BM,) row ids of the tile
    row_ok,  # (BM,) rows < M
    x_row_stride,
    K,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 ``(mean, rstd)`` (BM,) of each row over all K, two passes like ``reference.layer_norm``: the mean,
    then the biased variance around it (a large mean cannot cancel it away), ``rstd = 1 / sqrt(var + eps)``."""
    ks = tl.arange(0, BLOCK_K)  # (BK,)
    x_tile = x_ptr + rows[:, None].to(tl.int64) * x_row_stride + ks[None, :]  # (BM, BK)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)  # per-chunk row sums: a (BM,) carry, not a (BM, BK) one
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & ((k0 + ks) < K)[None, :]
        total += tl.sum(tl.load(x_tile + k0, mask=mask, other=0.0).to(tl.float32), axis=1)
    mean = total / K  # (BM,)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & ((k0 + ks) < K)[None, :]
        v = tl.load(x_tile + k0, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - mean[:, None], 0.0)
        total += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(total / K + eps)  # (BM,)
    return mean, rstd


@triton.jit
def _ln_x_tile(x_ptr, ln_w_ptr, ln_b_ptr, mean, rstd, rows, row_ok, x_row_stride, K, k0, BLOCK_K: tl.constexpr):
    """The (BM, BK) tile of ``LayerNorm(x)[rows, k0:k0 + BK]``, normalised in fp32 and cast to x's dtype: the value
    ``reference.layer_norm`` would have stored (zeros past K and M)."""
    ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
    k_ok = ks < K
    x_mask = row_ok[:, None] & k_ok[None, :]
    v = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_row_stride + ks[None, :], mask=x_mask,
                other=0.0).to(tl.float32)  # (BM, BK)
    g = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
    h = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
    normed = (v - mean[:, None]) * rstd[:, None] * g[None, :] + h[None, :]
    return tl.where(x_mask, normed, 0.0).to(x_ptr.dtype.element_ty)


@triton.jit
def _ln_x_times_w_t(
    acc,  # (BM, BN) fp32 to add to (zeros, or the tiles before k_begin)
    x_ptr,  # (M, K) input rows, row stride x_row_stride, last dim contiguous
    w_ptr,  # (N, K) weight, contiguous
    ln_w_ptr,  # (K,) LayerNorm weight
    ln_b_ptr,  # (K,) LayerNorm bias
    mean,  # (BM,) fp32 row means (_row_stats)
    rstd,  # (BM,) fp32 row 1/std (_row_stats)
    rows,
    cols,
    row_ok,
    col_ok,
    x_row_stride,
    K,
    k_begin,
    k_end,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``x_times_w_t`` of ``LayerNorm(x)``: each x chunk is normalised in fp32 (``_ln_x_tile``) before the
    ``tl.dot``."""
    for k0 in range(k_begin, k_end, BLOCK_K):
        a = _ln_x_tile(x_ptr, ln_w_ptr, ln_b_ptr, mean, rstd, rows, row_ok, x_row_stride, K, k0, BLOCK_K)
        acc = _dot_tile(acc, a, _w_tile(w_ptr, cols, col_ok, K, k0, BLOCK_K), IEEE, UPCAST)
    return acc


@triton.jit
def _epilogue_loads(
    b_ptr,  # (N,) bias (HAS_BIAS; else unread)
    res_ptr,  # (M, N) residual, row stride res_row_stride (HAS_RESIDUAL; else unread)
    scale_ptr,  # (N,) fp32 per-channel scale of an int8 weight (W_INT8; else unread)
    rows,  # (BM,) row ids of the tile
    cols,  # (BN,) output columns of the tile
    row_ok,  # (BM,) rows < M
    col_ok,  # (BN,) cols < N
    res_row_stride,
    HAS_BIAS,
    HAS_RESIDUAL,
    W_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The epilogue's inputs of one tile, fp32: the weight's scales ``(BN,)`` (ones for a float weight), the bias
    ``(BN,)`` and the residual ``(BM, BN)`` (zeros when absent)."""
    scale = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if W_INT8:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    res = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + rows[:, None].to(tl.int64) * res_row_stride + cols[None, :]
        res = tl.load(res_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return scale, bias, res


@triton.jit
def _epilogue_apply_store(
    acc,  # (BM, BN) fp32 tile of x @ w.T (int8: x @ q.T)
    scale,  # (BN,) fp32 (_epilogue_loads; W_INT8)
    bias,  # (BN,) fp32 (_epilogue_loads)
    res,  # (BM, BN) fp32 (_epilogue_loads)
    y_ptr,  # (M, N) output, contiguous
    rows,  # (BM,) row ids of the tile
    cols,  # (BN,) output columns of the tile
    row_ok,  # (BM,) rows < M
    col_ok,  # (BN,) cols < N
    N,
    HAS_BIAS,
    HAS_RESIDUAL,
    GELU: tl.constexpr,
    W_INT8: tl.constexpr,
):
    """The int8 weight's scales, bias, tanh-GELU, residual on the fp32 tile, then the one cast at the store (prefill
    and decode)."""
    if W_INT8:
        acc *= scale[None, :]
    if HAS_BIAS:
        acc += bias[None, :]
    if GELU:
        acc = _tanh_gelu(acc)
    if HAS_RESIDUAL:
        acc += res
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["M", "HAS_BIAS", "HAS_RESIDUAL"])
def _linear_kernel(
    x_ptr,  # (M, K) input rows, row stride x_row_stride, last dim contiguous
    w_ptr,  # (N, K) weight, contiguous: x's dtype, or int8 (W_INT8)
    scale_ptr,  # (N,) fp32 per-channel scale of an int8 weight (W_INT8; else unread)
    b_ptr,  # (N,) bias (HAS_BIAS; else any valid pointer, unread)
    res_ptr,  # (M, N) residual, row stride res_row_stride (HAS_RESIDUAL; else unread)
    y_ptr,  # (M, N) output, contiguous
    M,
    N,
    K,
    x_row_stride,
    res_row_stride,
    HAS_BIAS,  # i32 0/1
    HAS_RESIDUAL,  # i32 0/1
    GELU: tl.constexpr,
    W_INT8: tl.constexpr,  # w is int8 (N, K) with per-channel scales: W8A16, dequantized in registers
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products instead of TF32
    UPCAST: tl.constexpr,  # interpreter + bf16: dot in fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok = rows < M
    col_ok = cols < N
    acc = x_times_w_t(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_ptr, w_ptr, rows, cols, row_ok, col_ok,
                      x_row_stride, K, 0, K, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)  # (BM, BN) fp32
    scale, bias, res = _epilogue_loads(b_ptr, res_ptr, scale_ptr, rows, cols, row_ok, col_ok, res_row_stride,
                                       HAS_BIAS, HAS_RESIDUAL, W_INT8, BLOCK_M, BLOCK_N)  # (BN,) x 2, (BM, BN) fp32
    _epilogue_apply_store(acc, scale, bias, res, y_ptr, rows, cols, row_ok, col_ok, N, HAS_BIAS, HAS_RESIDUAL, GELU,
                          W_INT8)


PDL_PREFETCH_ONLY: tl.constexpr = tl.constexpr(2)  # _linear_decode_kernel's PDL without griddepcontrol (tests)


@triton.jit(do_not_specialize=["M", "HAS_BIAS", "HAS_RESIDUAL"])
def _linear_decode_kernel(
    x_ptr,  # (M, K) input rows, M <= BLOCK_M, row stride x_row_stride, last dim contiguous
    w_ptr,  # (N, K) weight, contiguous: x's dtype, or int8 (W_INT8)
    scale_ptr,  # (N,) fp32 per-channel scale of an int8 weight (W_INT8; else unread)
    b_ptr,  # (N,) bias (HAS_BIAS; else unread)
    res_ptr,  # (M, N) residual, row stride res_row_stride (HAS_RESIDUAL; else unread)
    y_ptr,  # (M, N) output, contiguous
    part_ptr,  # (S, M, N) fp32 workspace: split s's partial sums (S > 1; else unread)
    counter_ptr,  # (>= cdiv(N, BLOCK_N),) int32 ticket per N tile, 0 on entry, left 0 (S > 1; else unread)
    ln_w_ptr,  # (K,) LayerNorm weight applied to x first (LN; else unread)
    ln_b_ptr,  # (K,) LayerNorm bias (LN; else unread)
    M,
    N,
    K,
    x_row_stride,
    res_row_stride,
    k_per_split,  # K elements per split, a multiple of BLOCK_K
    HAS_BIAS,  # i32 0/1
    HAS_RESIDUAL,  # i32 0/1
    eps,  # fp32 LayerNorm epsilon (LN; else unused)
    LN: tl.constexpr,  # y = LayerNorm(x) @ w.T ...: every program computes its rows' stats over the full K
    GELU: tl.constexpr,
    W_INT8: tl.constexpr,  # w is int8 (N, K) with per-channel scales, applied after the merge
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 16 (tl.dot's smallest M) or 64; rows >= M are masked
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    # launched with programmatic dependent launch (sm_90, pdl_enabled); PDL_PREFETCH_ONLY (2): the same weight
    # prefetch and order without griddepcontrol, which the interpreter cannot run (the tests' check of the order)
    PDL: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok = rows < M
    col_ok = cols < N
    k_start = split * k_per_split
    k_end = k_start + k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PDL:
        # This program may start before the previous kernel has finished: x, the residual and the counters are
        # earlier kernels' to write, so none of them is read before griddepcontrol.wait, which returns once the
        # previous grid has completed and its memory is visible. The weights are no kernel's output: the first
        # (BK, BN) tile of this program's slice is loaded before the wait, so its DRAM round trip overlaps the
        # previous kernel's tail (evict_first: weights are read once a step; it also marks these loads for
        # tests/test_triton_compile.py, which checks that nothing else is loaded before the wait).
        ks = k_start + tl.arange(0, BLOCK_K)  # (BK,)
        w_first = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None],
                          mask=(ks < K)[:, None] & col_ok[None, :], other=0, eviction_policy="evict_first")
        if PDL != PDL_PREFETCH_ONLY:
            gdc_wait()
    if LN:
        # Every split program of every N slice recomputes the same (M,) stats: reads of x that hit L2,
        # instead of a stats launch (or a cross-program hand-off) before the GEMV. See ln_linear.
        mean, rstd = _row_stats(x_ptr, rows, row_ok, x_row_stride, K, eps, BLOCK_M, BLOCK_K)  # (BM,) x 2 fp32
    if PDL:  # the first tile with the weights loaded before the wait: the same dot, in the same order
        if LN:
            a = _ln_x_tile(x_ptr, ln_w_ptr, ln_b_ptr, mean, rstd, rows, row_ok, x_row_stride, K, k_start, BLOCK_K)
        else:
            ks = k_start + tl.arange(0, BLOCK_K)  # (BK,)
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_row_stride + ks[None, :],
                        mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)  # (BM, BK)
        acc = _dot_tile(acc, a, w_first, IEEE, UPCAST)
        k_start += BLOCK_K
    if LN:
        acc = _ln_x_times_w_t(acc, x_ptr, w_ptr, ln_w_ptr, ln_b_ptr, mean, rstd, rows, cols, row_ok, col_ok,
                              x_row_stride, K, k_start, k_end, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = x_times_w_t(acc, x_ptr, w_ptr, rows, cols, row_ok, col_ok, x_row_stride, K, k_start, k_end, IEEE,
                          UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)  # (BM, BN) fp32
    if PDL and PDL != PDL_PREFETCH_ONLY:  # this program's weights are read: the next kernel may run up to its wait
        gdc_launch_dependents()
    # The epilogue's bias and residual, loaded before the ticket (by every split, the later ones from L2): their
    # memory round trip overlaps the partial's store and the ticket's, instead of following the last ticket.
    scale, bias, res = _epilogue_loads(b_ptr, res_ptr, scale_ptr, rows, cols, row_ok, col_ok, res_row_stride,
                                       HAS_BIAS, HAS_RESIDUAL, W_INT8, BLOCK_M, BLOCK_N)  # (BN,) x 2, (BM, BN) fp32
    if num_splits > 1:
        tile = rows[:, None].to(tl.int64) * N + cols[None, :]  # (BM, BN) offsets in one split's (M, N) slab
        tile_mask = row_ok[:, None] & col_ok[None, :]
        split_stride = M.to(tl.int64) * N
        tl.store(part_ptr + split * split_stride + tile, acc, mask=tile_mask)
        # Memory ordering (the interpreter runs programs one at a time, so no test can check this). Every
        # thread of this program stored part of the tile; the barrier (bar.sync) orders those stores before
        # the ticket, which one thread draws with an acq_rel, gpu-scope atomic (Triton 3.9's PTX: thread 0's
        # atom.global.gpu.acq_rel.add): its release half publishes everything the barrier ordered before it
        # (release is cumulative), and the counter's chain of read-modify-writes carries all S - 1 earlier
        # releases to the acquire half of the last ticket. Triton hands the scalar result to the other
        # threads through shared memory and a barrier, so every thread of the last program loads after that
        # acquire. Its loads go through L2 (".cg"): the SM's L1 is not coherent, and a line of this workspace
        # cached there before (another program on this SM, or an earlier kernel that used the same memory)
        # must not be read instead. No program waits on another, so no grid size can deadlock.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket != num_splits - 1:
            return
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(0, num_splits):  # fixed order: the same bits whichever program drew the last ticket
            acc += tl.load(part_ptr + s * split_stride + tile, mask=tile_mask, other=0.0, cache_modifier=".cg")
        # Every ticket of this tile is drawn, so nothing else touches the counter in this launch: a plain
        # store leaves it 0 for the next launch (or graph replay), which kernel order on the stream publishes.
        tl.store(counter_ptr + pid_n, 0)
    _epilogue_apply_store(acc, scale, bias, res, y_ptr, rows, cols, row_ok, col_ok, N, HAS_BIAS, HAS_RESIDUAL, GELU,
                          W_INT8)


def pdl_launch(device: torch.device, etype: str) -> dict:
    """The decode kernel's launch arguments for programmatic dependent launch: ``PDL`` (its waits) and Triton's
    ``launch_pdl`` for fp16 and bf16 where ``pdl_enabled(device)`` (the ``_pdl`` compile variants: fp32 has none);
    none elsewhere (the interpreter takes no ``launch_pdl``).

    Example:
        >>> pdl_launch(torch.device("cpu"), "fp16")
        {}
    """
    return dict(PDL=True, launch_pdl=True) if etype != "fp32" and pdl_enabled(device) else {}


def prefill_tile(etype: str, t: int, n: int, w_int8: bool = False) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)`` for a ``(t, n)`` prefill output: the largest tile of
    ``PREFILL_TILES[etype]`` (int8 weights: ``PREFILL_TILES_W8``) giving at least one program per H100 SM, else the
    smallest.

    Example:
        >>> prefill_tile("fp16", 1024, 3072), prefill_tile("fp16", 512, 2304), prefill_tile("fp16", 100, 768)
        ((128, 128, 64, 8), (64, 128, 64, 4), (64, 64, 64, 4))
    """
    tiles = (PREFILL_TILES_W8 if w_int8 else PREFILL_TILES)[etype]
    for bm, bn, bk, warps in tiles:
        if triton.cdiv(t, bm) * triton.cdiv(n, bn) >= TARGET_PROGRAMS // 2:
            return bm, bn, bk, warps
    return tiles[-1]


def decode_split(n: int, k: int, block_k: int = 128) -> tuple[int, int]:
    """``(num_splits, k_per_split)`` of the decode path for an ``(n, k)`` weight, K stepped by ``block_k``.

    The fewest splits that reach ``TARGET_PROGRAMS`` programs over ``cdiv(n, 32)`` N slices, each split a
    whole number of ``block_k`` steps (fp16/bf16: 128).

    Example:
        >>> [decode_split(n, k)[0] for n, k in ((768, 768), (2304, 768), (3072, 768), (768, 3072))]
        [6, 3, 3, 8]
    """
    k_steps = triton.cdiv(k, block_k)
    wanted = max(1, min(k_steps, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, BLOCK_N_DECODE))))
    steps_per_split = triton.cdiv(k_steps, wanted)
    return triton.cdiv(k_steps, steps_per_split), steps_per_split * block_k


def _check(x, weight, bias, residual) -> tuple[str, torch.Tensor, torch.Tensor, bool]:
    """``(etype, w, scale, w_int8)``: x's element type and the weight's kernel operands (``weight_operands``)."""
    if x.dim() != 2 or len(weight.shape) != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: x must be (T, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    etype = element_type(x.dtype, FLOAT_TYPES, "linear: x")
    t, n = x.shape[0], weight.shape[0]
    w, scale, w_int8 = weight_operands(weight, x, x.shape[1])
    named = {"weight": None if w_int8 else w, "bias": bias, "residual": residual}
    for name, tensor in named.items():
        if tensor is not None and tensor.dtype != x.dtype:
            raise ValueError(f"linear: {name} has dtype {tensor.dtype}, x has {x.dtype}; they must match")
    if x.stride(1) != 1 or w.stride(1) != 1 or w.stride(0) != w.shape[1]:
        raise ValueError("linear: x needs a contiguous last dim and weight must be contiguous")
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"linear: bias must be a contiguous ({n},), got {tuple(bias.shape)}")
    if residual is not None and (residual.shape != (t, n) or residual.stride(1) != 1):
        raise ValueError(f"linear: residual must be ({t}, {n}) with a contiguous last dim, got {tuple(residual.shape)}")
    return etype, w, scale, w_int8


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``, then optionally tanh-GELU, then optionally ``+ residual`` (as ``reference.linear``).

    ``x``: (T, K) (rows may be strided); ``weight``: (N, K); ``bias``: (N,) or None; ``residual``:
    (T, N) or None. Returns a new (T, N) tensor in ``x.dtype``.

    Example (runs where ``available()``: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops import reference
        >>> from gpt2fast.ops.triton import available, default_device
        >>> if available():
        ...     x, w, b = (torch.randn(*s, device=default_device()) for s in ((3, 8), (5, 8), (5,)))
        ...     assert torch.allclose(linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True), atol=1e-5)
    """
    operands = _check(x, weight, bias, residual)
    if x.shape[0] > DECODE_MAX_ROWS:
        return _prefill(x, operands, bias, gelu, residual)
    return _decode(x, operands, bias, gelu, residual, None)


def ln_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gelu: bool = False,
) -> torch.Tensor:
    """``linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu=gelu)`` (as ``reference.ln_linear``).

    ``x``: (T, K) (rows may be strided); ``ln_weight``, ``ln_bias``: (K,); ``weight``: (N, K); ``bias``: (N,)
    or None. Returns a new (T, N) tensor in ``x.dtype``.

    A prefill (``T > DECODE_MAX_ROWS``) runs the LayerNorm kernel, then the ``tl.dot`` tiles: two launches,
    the (T, K) LayerNorm output written and read back once, which is small next to a prefill GEMM. A decode
    step is ONE launch: ``_linear_decode_kernel`` with ``LN``, whose every program first computes its T rows'
    mean and rstd over the full K in fp32 (two passes over the rows, as ``reference.layer_norm``: biased
    variance, eps inside the sqrt), then normalises each x chunk it loads, ``(x - mean) * rstd * ln_w + ln_b``,
    cast to x's dtype as the LayerNorm's output would be, before the dot. The trade: all
    ``cdiv(N, 32) x S`` programs recompute the same stats, each reading the T x K rows twice from L2
    (x is tiny and hot: T x 768 fp16 = 1.5 KB per row). At T <= 16 that is <= 48 KB per program, on the
    order of its 8 KB-per-K-step weight slice, and saves a launch (a few microseconds, more than the 0.35-1.4
    us a 124M decode linear needs at the bandwidth floor) and the (T, K) LayerNorm output's write and read.
    At T = 64 the re-reads are ~200 KB per program (~30 MB of L2 traffic per 768-wide linear, several times the
    weight): still L2, not DRAM, but a GPU should measure whether a one-pass (Welford/Chan) prologue or a stats
    hand-off wins there. The stats could not be computed once by the previous linear's epilogue for free: its
    N slices are spread over programs, so a row's sum would need another cross-program merge.

    Example (runs where ``available()``: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops import reference
        >>> from gpt2fast.ops.triton import available, default_device
        >>> if available():
        ...     x, g, h, w, b = (torch.randn(*s, device=default_device()) for s in ((3, 8), (8,), (8,), (5, 8), (5,)))
        ...     y = ln_linear(x, g, h, 1e-5, w, b, gelu=True)
        ...     assert torch.allclose(y, reference.ln_linear(x, g, h, 1e-5, w, b, gelu=True), atol=1e-5)
    """
    from gpt2fast.ops.triton.layer_norm import layer_norm

    operands = _check(x, weight, bias, None)
    k = x.shape[1]
    for name, tensor in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tensor.shape != (k,) or tensor.stride(0) != 1 or tensor.dtype != x.dtype:
            raise ValueError(f"ln_linear: {name} must be a contiguous ({k},) of x's dtype {x.dtype}, "
                             f"got {tuple(tensor.shape)} {tensor.dtype}")
    if x.shape[0] > DECODE_MAX_ROWS:
        return _prefill(layer_norm(x, ln_weight, ln_bias, eps), operands, bias, gelu, None)
    return _decode(x, operands, bias, gelu, None, (ln_weight, ln_bias, eps))


def _prefill(x, operands, bias, gelu, residual) -> torch.Tensor:
    """The ``tl.dot`` tile kernel for ``T > DECODE_MAX_ROWS`` rows (arguments checked by the caller: ``_check``'s
    ``operands``)."""
    etype, weight, scale, w_int8 = operands
    t, k = x.shape
    n = weight.shape[0]
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)  # (T, N)
    if n == 0:
        return y
    bm, bn, bk, warps = prefill_tile(etype, t, n, w_int8)
    _linear_kernel[(triton.cdiv(t, bm), triton.cdiv(n, bn))](
        x, weight, scale, y if bias is None else bias, y if residual is None else residual, y, t, n, k, x.stride(0),
        0 if residual is None else residual.stride(0), int(bias is not None), int(residual is not None), GELU=gelu,
        W_INT8=w_int8, IEEE=etype == "fp32", UPCAST=etype == "bf16" and interpreting(), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, num_warps=warps,
    )
    return y


def _decode(x, operands, bias, gelu, residual, ln) -> torch.Tensor:
    """The one-launch split-K GEMV for ``T <= DECODE_MAX_ROWS`` rows; ``ln = (ln_weight, ln_bias, eps)`` normalises
    x in the kernel (``LN``), ``None`` takes x as it is."""
    etype, weight, scale, w_int8 = operands
    t, k = x.shape
    n = weight.shape[0]
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)  # (T, N)
    if t == 0 or n == 0:
        return y
    splits, k_per_split = decode_split(n, k, BLOCK_K_DECODE[etype])
    n_tiles = triton.cdiv(n, BLOCK_N_DECODE)
    # (S, T, N) fp32 workspace when K is split; one split applies the epilogue to its own tile (no workspace)
    partials = torch.empty((splits, t, n) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    ln_w, ln_b, eps = (y, y, 0.0) if ln is None else ln  # unread without LN
    block_m = 16 if t <= 16 else 64
    _linear_decode_kernel[(n_tiles, splits)](
        x, weight, scale, y if bias is None else bias, y if residual is None else residual, y, partials,
        ticket_counters(x.device, n_tiles if splits > 1 else 1), ln_w, ln_b, t, n, k, x.stride(0),
        0 if residual is None else residual.stride(0), k_per_split, int(bias is not None), int(residual is not None),
        float(eps), LN=ln is not None, GELU=gelu, W_INT8=w_int8, IEEE=etype == "fp32",
        UPCAST=etype == "bf16" and interpreting(), BLOCK_M=block_m, BLOCK_N=BLOCK_N_DECODE,
        BLOCK_K=BLOCK_K_DECODE[etype], num_warps=decode_warps(block_m, ln is not None), **pdl_launch(x.device, etype),
    )
    return y


def _variants() -> list[dict]:
    out = []
    for etype, w8 in ((etype, w8) for w8 in (False, True) for etype in ("fp32", "fp16", "bf16")):
        ptr = "*" + etype
        ieee = etype == "fp32"
        # an int8 weight: *i8 values and *fp32 scales; a float one: the weight again in the unread scale slot
        weights = dict(x_ptr=ptr, w_ptr="*i8" if w8 else ptr, scale_ptr="*fp32" if w8 else ptr, b_ptr=ptr,
                       res_ptr=ptr, y_ptr=ptr)
        for gelu in (False, True):
            suffix = f"{etype}{'_w8' if w8 else ''}_{'gelu' if gelu else 'plain'}"
            for bm, bn, bk, warps in (PREFILL_TILES_W8 if w8 else PREFILL_TILES)[etype]:
                out.append(dict(
                    name=f"linear_{suffix}_{bm}x{bn}", fn=_linear_kernel,
                    signature=dict(**weights, M="i32", N="i32", K="i32", x_row_stride="i64", res_row_stride="i64",
                                   HAS_BIAS="i32", HAS_RESIDUAL="i32", GELU="constexpr", W_INT8="constexpr",
                                   IEEE="constexpr", UPCAST="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                                   BLOCK_K="constexpr"),
                    constexprs=dict(GELU=gelu, W_INT8=w8, IEEE=ieee, UPCAST=False, BLOCK_M=bm, BLOCK_N=bn,
                                    BLOCK_K=bk),
                    num_warps=warps, divisible_by_16=("N", "K", "x_row_stride", "res_row_stride"),
                ))
            for ln in (False, True):
                for block_m in (16, 64):
                    # PDL: fp16 and bf16 only (what a Hopper decodes in), sm_90 only (griddepcontrol)
                    for pdl in (False, True) if etype != "fp32" else (False,):
                        out.append(dict(
                            name=f"linear_decode_{'ln_' if ln else ''}{suffix}_m{block_m}{'_pdl' if pdl else ''}",
                            fn=_linear_decode_kernel,
                            signature=dict(**weights, part_ptr="*fp32", counter_ptr="*i32", ln_w_ptr=ptr,
                                           ln_b_ptr=ptr, M="i32", N="i32", K="i32", x_row_stride="i64",
                                           res_row_stride="i64", k_per_split="i32", HAS_BIAS="i32",
                                           HAS_RESIDUAL="i32", eps="fp32", LN="constexpr", GELU="constexpr",
                                           W_INT8="constexpr", IEEE="constexpr", UPCAST="constexpr",
                                           BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr",
                                           PDL="constexpr"),
                            constexprs=dict(LN=ln, GELU=gelu, W_INT8=w8, IEEE=ieee, UPCAST=False, BLOCK_M=block_m,
                                            BLOCK_N=BLOCK_N_DECODE, BLOCK_K=BLOCK_K_DECODE[etype], PDL=pdl),
                            num_warps=decode_warps(block_m, ln),
                            divisible_by_16=("N", "K", "x_row_stride", "res_row_stride", "k_per_split"),
                            **(dict(arches=(90,)) if pdl else {}),
                        ))
    return out


# Every configuration linear() and ln_linear() can launch: per dtype, with float or int8 weights (_w8), with and
# without GELU, each prefill tile and the decode kernel, plain and with the LayerNorm prologue (LN), at row tiles 16
# and 64, and for fp16 and bf16 on sm_90 with programmatic dependent launch too (PDL). GPT-2's
# widths (768, 2304, 3072, ... 6400) and strides are multiples of 16, as the JIT will see them on the GPU.
COMPILE_VARIANTS: list[dict] = _variants()
