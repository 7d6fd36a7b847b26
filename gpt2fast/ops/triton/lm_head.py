"""The vocabulary projection (tied ``wte``), alone or fused with the choice of the next token.

- ``lm_head(x, wte)`` -> (N, V) fp32 logits, as ``ops.reference.lm_head``; the sampler takes them when
  a row needs a logits processor (top-k/top-p/min-p, penalties, logprobs).
- ``lm_head_argmax(x, wte)`` -> (N,) int64: greedy, ties to the lowest token id like ``torch.argmax``.
- ``lm_head_gumbel(x, wte, temperature, seeds)`` -> (N,) int64: ``argmax(logits / T + g)`` with
  ``g = -log(-log(max(u, FLT_MIN)))``, ``u = tl.rand(seed_row, token_id)``: the same Philox noise
  ``gpt2fast.sampling`` draws for that row seed (``row_seed(seed, sample_index, step)``), so it picks
  the token ``sample_batch`` picks for a temperature-only row; rows with ``T < GREEDY_BELOW`` take the
  plain argmax, as the sampler does. Only valid when no logits processor is active for any of the
  rows it serves: the fused paths never see the whole row of logits, so they cannot filter,
  penalise or normalise it. The noise uses ``tl.log`` (an approximate ``lg2`` on the GPU), so a
  near-tie within ~1e-6 of the winning score may resolve differently from torch's ``log``; on the
  interpreter the two agree bit for bit.

One kernel, ``_lm_head_kernel``, three ``MODE``s. Grid: one program per (BLOCK_M rows) x (BLOCK_V
vocab tile), the row tile varying fastest so the programs that read one ``wte`` tile run together
and share it through L2. A decode batch of N <= 16 rows uses BLOCK_M = 16 (``tl.dot``'s smallest):
V = 50257 is 393 tiles of 128, three programs per H100 SM, each streaming 128 x 768 fp16 (192 KB) of
``wte`` once; N > 16 uses BLOCK_M = 64 so a 64-row batch still reads ``wte`` once. Tiles per dtype
in ``TILES`` (fp16/bf16: BLOCK_V 128, BLOCK_K 64, 8 warps). ``tl.dot`` over
C in BLOCK_K steps, fp32 accumulation; fp32 inputs use ``input_precision="ieee"`` (TF32 would cost the
~1e-5 agreement with the fp32 reference), fp16/bf16 the tensor-core default; under the interpreter
bf16 tiles are upcast first (its bf16 ``tl.dot`` is wrong). The vocab tail (V odd: 50257) is masked:
masked columns are never stored and score ``-inf``.

- MODE 0 stores the logits tile.
- MODE 1/2 reduce the tile to one ``(max, lowest id of the max)`` per row and merge them in the same
  launch: each program stores its rows' pair to a workspace ``(N, num_v_tiles)`` (fp32 score, i32 id),
  then draws a ticket: ``tl.atomic_add`` (acq_rel, gpu scope) on its row tile's int32 counter
  (:mod:`gpt2fast.ops.triton.counters`, one per row tile: ``cdiv(N, BLOCK_M)``, 4 for a 256-row batch,
  far below ``MIN_SLOTS``). The program that draws ticket ``num_v_tiles - 1`` -- whichever vocab tile it
  is -- loads its BLOCK_M rows' pairs over every vocab tile, ``_merge_tiles`` tiles a step in
  ascending tile order, keeps the max and, among equal maxima, the lowest id (tiles ascend in id, so that
  is the global lowest id, as ``torch.argmax``; the result does not depend on which program merges nor
  on the step size), stores the ``(N,)`` int64 ids and puts the counter back to 0 for the next launch or
  graph replay. Only ``8 x N x num_v_tiles`` bytes of workspace (written and read back within the
  launch, in L2) instead of ``4 x N x V`` of logits, and one launch instead of a partials kernel plus a
  merge kernel. The kernel's comments give the memory-ordering argument (the interpreter runs programs
  one at a time, so no test can check it).

Row and tile counts are ``do_not_specialize`` (the JIT would make a 1 a constant: another kernel per
batch size than the ``COMPILE_VARIANTS`` compiled ahead of time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops.triton import FLOAT_TYPES, element_type, interpreting, weight_operands
from gpt2fast.ops.triton.counters import ticket_counters
from gpt2fast.ops.triton.linear import x_times_w_t
from gpt2fast.quant import Int8Weight
from gpt2fast.sampling import GREEDY_BELOW

MODE_LOGITS, MODE_ARGMAX, MODE_GUMBEL = 0, 1, 2
SMALL_BATCH = 16  # rows at most for BLOCK_M = 16
# (BLOCK_V, BLOCK_K, num_warps) per (element type, BLOCK_M): the largest tiles that compile without a
# spill on sm_80 and sm_90 (fp32 runs the FMA path of an ieee tl.dot, which holds more in registers)
TILES = {
    ("fp32", 16): (64, 32, 4),
    ("fp32", 64): (32, 32, 8),
    ("fp16", 16): (128, 64, 8),
    ("fp16", 64): (128, 64, 8),
    ("bf16", 16): (128, 64, 8),
    ("bf16", 64): (128, 64, 8),
}
# MODE 1/2: partial pairs each thread loads per step of the in-kernel merge, per (element type, BLOCK_M): as
# many as fit in the registers the tl.dot phase needs anyway (see _merge_tiles)
MERGE_PER_THREAD = {("fp32", 16): 8, ("fp32", 64): 8, ("fp16", 16): 4, ("fp16", 64): 16, ("bf16", 16): 4,
                    ("bf16", 64): 16}
FLT_MIN = 1.1754943508222875e-38  # the smallest normal fp32: where an exact-zero uniform is lifted to


# With int8 embeddings, fp16/bf16 at BLOCK_M 16 widen each weight tile in registers the merge used: 2 pairs a thread
# (4 spills 8 B on sm_80 in bf16), V = 50257 in 13 steps
MERGE_PER_THREAD_W8 = {**MERGE_PER_THREAD, ("fp16", 16): 2, ("bf16", 16): 2}


def _merge_tiles(etype: str, block_m: int, warps: int, w_int8: bool = False) -> int:
    """Vocab tiles per step of the in-kernel merge (``BLOCK_T``): ``MERGE_PER_THREAD`` pairs per thread
    (``MERGE_PER_THREAD_W8`` for an int8 embedding).

    A pair costs a thread two loaded values and two 64-bit addresses; more pairs a step mean fewer serial
    L2 round trips, but a merge that needs more registers than the ``tl.dot`` phase lowers the blocks
    resident per SM for the whole kernel. fp16 at BLOCK_M 16 stays at 62 registers on sm_80 (as without
    the merge): 393 programs of 8 warps are one wave only at 3 blocks per H100 SM and 4 per A100 SM, which
    64 registers allow. At BLOCK_M 64 the fp16 ``tl.dot`` phase already holds more than 16 pairs a thread
    take. fp16: 16 x 64 or 64 x 64 pairs a step, V = 50257's 393 tiles in 7 steps.
    """
    per_thread = (MERGE_PER_THREAD_W8 if w_int8 else MERGE_PER_THREAD)[etype, block_m]
    return max(1, per_thread * 32 * warps // block_m)


def _tiles(etype: str, n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_V, BLOCK_K, num_warps)`` for ``n`` rows."""
    block_m = 16 if n <= SMALL_BATCH else 64
    return (block_m, *TILES[etype, block_m])


@triton.jit(do_not_specialize=["N", "num_v_tiles", "num_m_tiles"])
def _lm_head_kernel(
    x_ptr,  # (N, C) hidden rows, row stride x_row_stride, last dim contiguous
    w_ptr,  # (V, C) tied token embedding, contiguous: x's dtype, or int8 (W_INT8)
    scale_ptr,  # (V,) fp32 per-token scale of an int8 embedding (W_INT8; else unread)
    out_ptr,  # (N, V) fp32 logits (MODE 0; else unused)
    val_ptr,  # (N, num_v_tiles) fp32 workspace: best score of each vocab tile (MODE 1, 2)
    idx_ptr,  # (N, num_v_tiles) i32 workspace: lowest token id with that score (MODE 1, 2)
    counter_ptr,  # (>= num_m_tiles,) i32 ticket per row tile, 0 on entry, left 0 (MODE 1, 2)
    token_ptr,  # (N,) i64 chosen token id per row (MODE 1, 2)
    temp_ptr,  # (N,) fp32 temperature per row (MODE 2)
    seed_ptr,  # (N,) i64 Philox row seed per row (MODE 2)
    N,
    V,
    C,
    x_row_stride,
    num_v_tiles,
    num_m_tiles,
    MODE: tl.constexpr,
    GREEDY_T: tl.constexpr,  # temperatures below this are greedy (sampling.GREEDY_BELOW)
    TINY: tl.constexpr,  # FLT_MIN
    W_INT8: tl.constexpr,  # w is int8 with per-row scales, applied to each logit before anything reads it
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,  # vocab tiles per step of the merge (MODE 1, 2)
):
    pid = tl.program_id(0)
    pid_m = pid % num_m_tiles
    pid_v = pid // num_m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # (BV,) token ids
    row_ok = rows < N
    col_ok = cols < V
    acc = x_times_w_t(tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32), x_ptr, w_ptr, rows, cols, row_ok, col_ok,
                      x_row_stride, C, 0, C, IEEE, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)  # (BM, BV) fp32 logits
    if W_INT8:  # x . q[v] * scale[v]: the logits of the dequantized embedding
        acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if MODE == 0:
        out = out_ptr + rows[:, None].to(tl.int64) * V + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        scores = acc
        if MODE == 2:
            temp = tl.load(temp_ptr + rows, mask=row_ok, other=1.0)  # (BM,)
            seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)  # (BM,)
            u = tl.rand(seed[:, None], cols[None, :])  # (BM, BV), as sampling.philox_uniform
            g = -tl.log(-tl.log(tl.maximum(u, TINY)))
            greedy = temp < GREEDY_T  # (BM,)
            safe_t = tl.where(greedy, 1.0, temp)  # no 0 / 0 for greedy rows (their draw ignores it)
            # logits / T then + g, in the sampler's order (the same fp32 roundings)
            scores = tl.where(greedy[:, None], acc, acc / safe_t[:, None] + g)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        best = tl.max(scores, axis=1)  # (BM,)
        best_id = tl.min(tl.where(scores == best[:, None], cols[None, :], V), axis=1)  # (BM,) lowest id
        part_row = rows.to(tl.int64) * num_v_tiles  # (BM,) this row's first partial
        tl.store(val_ptr + part_row + pid_v, best, mask=row_ok)
        tl.store(idx_ptr + part_row + pid_v, best_id, mask=row_ok)
        # Memory ordering, as in linear.py's decode kernel (no test can check it: the interpreter runs
        # programs one at a time). Every thread stored part of this tile's pairs; the barrier (bar.sync)
        # orders those stores before the ticket, which one thread draws with an acq_rel, gpu-scope atomic:
        # its release half publishes everything the barrier ordered before it (release is cumulative), and
        # the counter's chain of read-modify-writes carries the other vocab tiles' releases to the acquire
        # half of the last ticket. Triton hands the scalar result to every thread through shared memory and
        # a barrier, so all of the last program's loads come after that acquire; they go through L2 (".cg")
        # because the SM's L1 is not coherent and a line of this workspace cached there earlier must not
        # stand in for a partial. No program waits on another, so no grid size can deadlock.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr + pid_m, 1, sem="acq_rel", scope="gpu")
        if ticket != num_v_tiles - 1:
            return
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_id = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start in range(0, num_v_tiles, BLOCK_T):  # ascending tiles: ascending ids
            tiles = start + tl.arange(0, BLOCK_T)  # (BT,)
            ok = row_ok[:, None] & (tiles < num_v_tiles)[None, :]  # (BM, BT)
            offs = part_row[:, None] + tiles[None, :]
            vals = tl.load(val_ptr + offs, mask=ok, other=float("-inf"), cache_modifier=".cg")  # (BM, BT)
            ids = tl.load(idx_ptr + offs, mask=ok, other=2147483647, cache_modifier=".cg")  # (BM, BT)
            step_best = tl.max(vals, axis=1)  # (BM,)
            step_id = tl.min(tl.where(vals == step_best[:, None], ids, 2147483647), axis=1)  # (BM,)
            # strictly greater: on a tie the earlier step (lower ids) keeps it
            best_id = tl.where(step_best > best, step_id, best_id)
            best = tl.maximum(best, step_best)
        tl.store(token_ptr + rows, best_id.to(tl.int64), mask=row_ok)
        # Every ticket of this row tile is drawn, so nothing else touches the counter in this launch: a plain
        # store leaves it 0 for the next launch (or graph replay), which kernel order on the stream publishes.
        tl.store(counter_ptr + pid_m, 0)


def _check(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> tuple[str, torch.Tensor, torch.Tensor, bool]:
    """``(etype, w, scale, w_int8)``: x's element type and the embedding's kernel operands (``weight_operands``)."""
    if x.dim() != 2 or len(wte.shape) != 2 or x.shape[1] != wte.shape[1]:
        raise ValueError(f"lm_head: x must be (N, C) and wte (V, C), got {tuple(x.shape)} and {tuple(wte.shape)}")
    w, scale, w_int8 = weight_operands(wte, x, x.shape[1])
    if not w_int8 and x.dtype != w.dtype:
        raise ValueError(f"lm_head: x has dtype {x.dtype} and wte {w.dtype}; they must match")
    if x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("lm_head: x needs a contiguous last dim and wte must be contiguous")
    return element_type(x.dtype, FLOAT_TYPES, "lm_head: x"), w, scale, w_int8


def _launch(x, operands, mode, out=None, vals=None, ids=None, token_ids=None, temperature=None, seeds=None):
    """Run ``_lm_head_kernel`` once on ``_check``'s ``operands`` (MODE 1, 2: partials and their merge, ``token_ids``
    written)."""
    etype, w, scale, w_int8 = operands
    n, c = x.shape
    v = w.shape[0]
    block_m, block_v, block_k, warps = _tiles(etype, n)
    num_v_tiles, num_m_tiles = triton.cdiv(v, block_v), triton.cdiv(n, block_m)
    if n == 0:
        return
    # pointers a mode does not use still need valid tensors: this launch's own, of the pointer's type if it has one
    f32 = out if out is not None else vals
    i32 = ids if ids is not None else f32
    i64 = token_ids if token_ids is not None else f32
    counters = ticket_counters(x.device, num_m_tiles) if mode != MODE_LOGITS else i32
    _lm_head_kernel[(num_v_tiles * num_m_tiles,)](
        x, w, scale, f32 if out is None else out, f32, i32, counters, i64,
        f32 if temperature is None else temperature, i64 if seeds is None else seeds,
        n, v, c, x.stride(0), num_v_tiles, num_m_tiles,
        MODE=mode, GREEDY_T=GREEDY_BELOW, TINY=FLT_MIN, W_INT8=w_int8, IEEE=etype == "fp32",
        UPCAST=etype == "bf16" and interpreting(), BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
        BLOCK_T=_merge_tiles(etype, block_m, warps, w_int8), num_warps=warps,
    )


def lm_head(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """Logits ``x @ wte.T`` as fp32 ``(N, V)``, like ``reference.lm_head``.

    ``x``: (N, C) (rows may be strided); ``wte``: (V, C) in the same dtype, or an ``Int8Weight`` (its int8 rows
    widened in registers, each logit scaled once).

    Example (runs where ``available()``: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops import reference
        >>> from gpt2fast.ops.triton import available, default_device
        >>> if available():
        ...     x, wte = torch.randn(2, 8, device=default_device()), torch.randn(37, 8, device=default_device())
        ...     assert torch.allclose(lm_head(x, wte), reference.lm_head(x, wte), atol=1e-5)
    """
    operands = _check(x, wte)
    out = torch.empty((x.shape[0], wte.shape[0]), dtype=torch.float32, device=x.device)  # (N, V)
    _launch(x, operands, MODE_LOGITS, out=out)
    return out


def _choose(x, wte, mode, temperature=None, seeds=None) -> torch.Tensor:
    operands = _check(x, wte)
    n, v = x.shape[0], wte.shape[0]
    num_v_tiles = triton.cdiv(v, _tiles(operands[0], n)[1])
    vals = torch.empty((n, num_v_tiles), dtype=torch.float32, device=x.device)  # (N, tiles) partial maxima
    ids = torch.empty((n, num_v_tiles), dtype=torch.int32, device=x.device)  # (N, tiles) their lowest ids
    token_ids = torch.empty((n,), dtype=torch.int64, device=x.device)  # (N,)
    _launch(x, operands, mode, vals=vals, ids=ids, token_ids=token_ids, temperature=temperature, seeds=seeds)
    return token_ids


def lm_head_argmax(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """Greedy token ids ``argmax(x @ wte.T, -1)`` ((N,) int64), ties to the lowest id, without the logits.

    Only for rows with no logits processor (penalties, logprobs...): those need ``lm_head``'s logits.

    Example (runs where ``available()``):
        >>> from gpt2fast.ops.triton import available, default_device
        >>> if available():
        ...     wte = torch.eye(5, device=default_device())[[0, 1, 2, 2, 4]]  # ids 2 and 3 tie
        ...     x = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]], device=default_device())
        ...     assert lm_head_argmax(x, wte).tolist() == [2]
    """
    return _choose(x, wte, MODE_ARGMAX)


def lm_head_gumbel(
    x: torch.Tensor, wte: torch.Tensor | Int8Weight, temperature: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """One token per row drawn from ``softmax(x @ wte.T / T)`` by Gumbel-max, without the logits: (N,) int64.

    ``temperature``: (N,) fp32 (rows below ``sampling.GREEDY_BELOW`` are greedy); ``seeds``: (N,) int64
    Philox row seeds, ``sampling.row_seed(seed, sample_index, step)``. A row's draw equals
    ``sample_batch``'s for a temperature-only ``SampleRow`` with that seed. Only for rows with no
    logits processor (top-k/top-p/min-p, penalties, logprobs): those go through ``lm_head`` + the sampler.

    Example (runs where ``available()``):
        >>> from gpt2fast.ops.triton import available, default_device
        >>> from gpt2fast.sampling import row_seed
        >>> if available():
        ...     dev = default_device()
        ...     x, wte = torch.randn(2, 8, device=dev), torch.randn(50, 8, device=dev)
        ...     seeds = torch.tensor([row_seed(7, 0, 0), row_seed(7, 1, 0)], device=dev)
        ...     ids = lm_head_gumbel(x, wte, torch.tensor([0.8, 0.0], device=dev), seeds)
        ...     assert ids[1] == lm_head_argmax(x[1:], wte)[0]  # temperature 0 is greedy
    """
    n = x.shape[0]
    if temperature.shape != (n,) or temperature.dtype != torch.float32:
        raise ValueError(f"lm_head_gumbel: temperature must be ({n},) float32, got {tuple(temperature.shape)} "
                         f"{temperature.dtype}")
    if seeds.shape != (n,) or seeds.dtype != torch.int64:
        raise ValueError(f"lm_head_gumbel: seeds must be ({n},) int64, got {tuple(seeds.shape)} {seeds.dtype}")
    return _choose(x, wte, MODE_GUMBEL, temperature=temperature.contiguous(), seeds=seeds.contiguous())


def _variants() -> list[dict]:
    out = []
    for etype, w8 in ((etype, w8) for w8 in (False, True) for etype in ("fp32", "fp16", "bf16")):
        for mode, mode_name in ((MODE_LOGITS, "logits"), (MODE_ARGMAX, "argmax"), (MODE_GUMBEL, "gumbel")):
            for block_m in (16, 64):
                block_v, block_k, warps = TILES[etype, block_m]
                out.append(dict(
                    name=f"lm_head_{mode_name}_{etype}{'_w8' if w8 else ''}_m{block_m}", fn=_lm_head_kernel,
                    signature=dict(x_ptr="*" + etype, w_ptr="*i8" if w8 else "*" + etype,
                                   scale_ptr="*fp32" if w8 else "*" + etype, out_ptr="*fp32", val_ptr="*fp32",
                                   idx_ptr="*i32", counter_ptr="*i32", token_ptr="*i64", temp_ptr="*fp32",
                                   seed_ptr="*i64", N="i32", V="i32", C="i32", x_row_stride="i64",
                                   num_v_tiles="i32", num_m_tiles="i32", MODE="constexpr", GREEDY_T="constexpr",
                                   TINY="constexpr", W_INT8="constexpr", IEEE="constexpr", UPCAST="constexpr",
                                   BLOCK_M="constexpr", BLOCK_V="constexpr", BLOCK_K="constexpr",
                                   BLOCK_T="constexpr"),
                    constexprs=dict(MODE=mode, GREEDY_T=GREEDY_BELOW, TINY=FLT_MIN, W_INT8=w8, IEEE=etype == "fp32",
                                    UPCAST=False, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
                                    BLOCK_T=_merge_tiles(etype, block_m, warps, w8)),
                    num_warps=warps, divisible_by_16=("C", "x_row_stride"),  # V = 50257 is not
                ))
    return out


# Every configuration the three launchers can launch: mode x dtype x float or int8 (_w8) embedding x row tile
# (MODE 1/2 merge in-kernel).
COMPILE_VARIANTS: list[dict] = _variants()
