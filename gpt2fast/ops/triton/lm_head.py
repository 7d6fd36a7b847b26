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
- MODE 1/2 reduce the tile to one ``(max, lowest id of the max)`` per row, stored as partials
  ``(N, num_v_tiles)``; ``_argmax_merge_kernel`` (one program per row) takes the max over tiles
  and, among equal maxima, the lowest id: tiles ascend in id, so that is the global lowest id. Only
  ``8 x N x num_v_tiles`` bytes leave the first kernel instead of ``4 x N x V`` of logits.

Row and tile counts are ``do_not_specialize`` (the JIT would make a 1 a constant: another kernel per
batch size than the ``COMPILE_VARIANTS`` compiled ahead of time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops.triton import FLOAT_TYPES, element_type, interpreting
from gpt2fast.ops.triton.linear import x_times_w_t
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
MERGE_BLOCK = 512
FLT_MIN = 1.1754943508222875e-38  # the smallest normal fp32: where an exact-zero uniform is lifted to


def _tiles(etype: str, n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_V, BLOCK_K, num_warps)`` for ``n`` rows."""
    block_m = 16 if n <= SMALL_BATCH else 64
    return (block_m, *TILES[etype, block_m])


@triton.jit(do_not_specialize=["N", "num_v_tiles", "num_m_tiles"])
def _lm_head_kernel(
    x_ptr,  # (N, C) hidden rows, row stride x_row_stride, last dim contiguous
    w_ptr,  # (V, C) tied token embedding, contiguous
    out_ptr,  # (N, V) fp32 logits (MODE 0; else unused)
    val_ptr,  # (N, num_v_tiles) fp32 best score of each vocab tile (MODE 1, 2)
    idx_ptr,  # (N, num_v_tiles) i32 lowest token id with that score (MODE 1, 2)
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
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % num_m_tiles
    pid_v = pid // num_m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # (BV,) token ids
    row_ok = rows < N
    col_ok = cols < V
    acc = x_times_w_t(x_ptr, w_ptr, rows, cols, row_ok, col_ok, x_row_stride, C, 0, C,
                      IEEE, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)  # (BM, BV) fp32 logits
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
        part = rows.to(tl.int64) * num_v_tiles + pid_v
        tl.store(val_ptr + part, best, mask=row_ok)
        tl.store(idx_ptr + part, best_id, mask=row_ok)


@triton.jit(do_not_specialize=["num_tiles"])
def _argmax_merge_kernel(
    val_ptr,  # (N, num_tiles) fp32 best score per vocab tile
    idx_ptr,  # (N, num_tiles) i32 its lowest token id; tiles ascend in id
    out_ptr,  # (N,) i64 chosen token id
    num_tiles,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    best = float("-inf")
    best_id = 0
    for start in range(0, num_tiles, BLOCK):
        ok = start + offs < num_tiles
        vals = tl.load(val_ptr + row * num_tiles + start + offs, mask=ok, other=float("-inf"))  # (BLOCK,)
        ids = tl.load(idx_ptr + row * num_tiles + start + offs, mask=ok, other=2147483647)  # (BLOCK,)
        chunk_best = tl.max(vals, axis=0)
        chunk_id = tl.min(tl.where(vals == chunk_best, ids, 2147483647), axis=0)
        # strictly greater: on a tie the earlier chunk (lower ids) keeps it
        best_id = tl.where(chunk_best > best, chunk_id, best_id)
        best = tl.maximum(best, chunk_best)
    tl.store(out_ptr + row, best_id.to(tl.int64))


def _check(x: torch.Tensor, wte: torch.Tensor) -> str:
    if x.dim() != 2 or wte.dim() != 2 or x.shape[1] != wte.shape[1]:
        raise ValueError(f"lm_head: x must be (N, C) and wte (V, C), got {tuple(x.shape)} and {tuple(wte.shape)}")
    if x.dtype != wte.dtype:
        raise ValueError(f"lm_head: x has dtype {x.dtype} and wte {wte.dtype}; they must match")
    if x.stride(1) != 1 or not wte.is_contiguous():
        raise ValueError("lm_head: x needs a contiguous last dim and wte must be contiguous")
    return element_type(x.dtype, FLOAT_TYPES, "lm_head: x")


def _launch(x, wte, mode, out=None, vals=None, ids=None, temperature=None, seeds=None):
    """Run ``_lm_head_kernel``; returns the number of vocab tiles."""
    etype = _check(x, wte)
    n, c = x.shape
    v = wte.shape[0]
    block_m, block_v, block_k, warps = _tiles(etype, n)
    num_v_tiles, num_m_tiles = triton.cdiv(v, block_v), triton.cdiv(n, block_m)
    if n == 0:
        return num_v_tiles
    # pointers a mode does not use still need valid tensors: any of this launch's own
    unused = out if out is not None else vals
    _lm_head_kernel[(num_v_tiles * num_m_tiles,)](
        x, wte, unused if out is None else out, unused if vals is None else vals, unused if ids is None else ids,
        unused if temperature is None else temperature, unused if seeds is None else seeds,
        n, v, c, x.stride(0), num_v_tiles, num_m_tiles,
        MODE=mode, GREEDY_T=GREEDY_BELOW, TINY=FLT_MIN, IEEE=etype == "fp32",
        UPCAST=etype == "bf16" and interpreting(), BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
        num_warps=warps,
    )
    return num_v_tiles


def lm_head(x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
    """Logits ``x @ wte.T`` as fp32 ``(N, V)``, like ``reference.lm_head``.

    ``x``: (N, C) (rows may be strided); ``wte``: (V, C) in the same dtype.

    Example (runs where ``available()``: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops import reference
        >>> from gpt2fast.ops.triton import available, default_device
        >>> if available():
        ...     x, wte = torch.randn(2, 8, device=default_device()), torch.randn(37, 8, device=default_device())
        ...     assert torch.allclose(lm_head(x, wte), reference.lm_head(x, wte), atol=1e-5)
    """
    _check(x, wte)
    out = torch.empty((x.shape[0], wte.shape[0]), dtype=torch.float32, device=x.device)  # (N, V)
    _launch(x, wte, MODE_LOGITS, out=out)
    return out


def _choose(x, wte, mode, temperature=None, seeds=None) -> torch.Tensor:
    etype = _check(x, wte)
    n, v = x.shape[0], wte.shape[0]
    num_v_tiles = triton.cdiv(v, _tiles(etype, n)[1])
    vals = torch.empty((n, num_v_tiles), dtype=torch.float32, device=x.device)  # (N, tiles) partial maxima
    ids = torch.empty((n, num_v_tiles), dtype=torch.int32, device=x.device)  # (N, tiles) their lowest ids
    token_ids = torch.empty((n,), dtype=torch.int64, device=x.device)  # (N,)
    if n == 0:
        return token_ids
    _launch(x, wte, mode, vals=vals, ids=ids, temperature=temperature, seeds=seeds)
    _argmax_merge_kernel[(n,)](vals, ids, token_ids, num_v_tiles, BLOCK=MERGE_BLOCK, num_warps=4)
    return token_ids


def lm_head_argmax(x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
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


def lm_head_gumbel(x: torch.Tensor, wte: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
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
    for etype in ("fp32", "fp16", "bf16"):
        for mode, mode_name in ((MODE_LOGITS, "logits"), (MODE_ARGMAX, "argmax"), (MODE_GUMBEL, "gumbel")):
            for block_m in (16, 64):
                block_v, block_k, warps = TILES[etype, block_m]
                out.append(dict(
                    name=f"lm_head_{mode_name}_{etype}_m{block_m}", fn=_lm_head_kernel,
                    signature=dict(x_ptr="*" + etype, w_ptr="*" + etype, out_ptr="*fp32", val_ptr="*fp32",
                                   idx_ptr="*i32", temp_ptr="*fp32", seed_ptr="*i64", N="i32", V="i32", C="i32",
                                   x_row_stride="i64", num_v_tiles="i32", num_m_tiles="i32", MODE="constexpr",
                                   GREEDY_T="constexpr", TINY="constexpr", IEEE="constexpr", UPCAST="constexpr",
                                   BLOCK_M="constexpr", BLOCK_V="constexpr", BLOCK_K="constexpr"),
                    constexprs=dict(MODE=mode, GREEDY_T=GREEDY_BELOW, TINY=FLT_MIN, IEEE=etype == "fp32",
                                    UPCAST=False, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k),
                    num_warps=warps, divisible_by_16=("C", "x_row_stride"),  # V = 50257 is not
                ))
    out.append(dict(
        name="lm_head_argmax_merge", fn=_argmax_merge_kernel,
        signature=dict(val_ptr="*fp32", idx_ptr="*i32", out_ptr="*i64", num_tiles="i32", BLOCK="constexpr"),
        constexprs=dict(BLOCK=MERGE_BLOCK), num_warps=4,
    ))
    return out


# Every configuration the three launchers can launch: mode x dtype x row tile, and the merge.
COMPILE_VARIANTS: list[dict] = _variants()
