"""Token plus position embedding: ``out[t] = wte[input_ids[t]] + wpe[positions[t]]``, added in fp32.

Grid ``(T, cdiv(C, BLOCK))``: each program gathers one 256-wide chunk of one token's two rows and
adds them (a pure gather: one read of each row chunk, one write). A fixed chunk keeps one variant
per dtype; at C = 1600 the last of 7 chunks is a quarter full, which costs lanes, not bytes.
``input_ids`` and ``positions`` share one index dtype (int64 or int32) and may be strided (views
of one packed ``(2, T)`` tensor); ``wte`` and ``wpe`` share one float dtype, the output's, or ``wte``
is an ``Int8Weight`` (``quantization="int8"``) whose rows are dequantized on lookup (``q * scale`` in
fp32, bit for bit ``reference.embed``) and the output takes ``wpe``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops.triton import FLOAT_TYPES, INDEX_TYPES, element_type, weight_operands
from gpt2fast.quant import Int8Weight

BLOCK = 256
NUM_WARPS = 2


@triton.jit
def _embed_kernel(
    ids_ptr,  # (T,) token ids, stride ids_stride
    pos_ptr,  # (T,) positions, stride pos_stride
    wte_ptr,  # (V, C) token embedding, rows of wte_row_stride, last dim contiguous: wpe's dtype, or int8 (W_INT8)
    scale_ptr,  # (V,) fp32 per-row scale of an int8 wte (W_INT8; else unread)
    wpe_ptr,  # (P, C) position embedding, rows of wpe_row_stride, last dim contiguous
    out_ptr,  # (T, C) output, contiguous
    ids_stride,
    pos_stride,
    wte_row_stride,
    wpe_row_stride,
    n_cols,
    W_INT8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    token_id = tl.load(ids_ptr + token * ids_stride).to(tl.int64)
    position = tl.load(pos_ptr + token * pos_stride).to(tl.int64)
    tok = tl.load(wte_ptr + token_id * wte_row_stride + cols, mask=mask, other=0).to(tl.float32)
    if W_INT8:
        tok *= tl.load(scale_ptr + token_id)
    pos = tl.load(wpe_ptr + position * wpe_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * n_cols + cols, (tok + pos).to(out_ptr.dtype.element_ty), mask=mask)


def embed(input_ids: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor | Int8Weight,
          wpe: torch.Tensor) -> torch.Tensor:
    """Token plus position embedding (see ``reference.embed``): ``(T,)`` ids -> ``(T, C)`` in ``wpe.dtype`` (that is
    ``wte``'s; an ``Int8Weight`` ``wte`` has its rows dequantized on lookup).

    Ids are not bounds-checked on the device (like an index_select in a CUDA graph): out-of-range
    ids read out of bounds.

    Example (runs where the kernels can: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops import reference
        >>> from gpt2fast.ops.triton import available, default_device
        >>> wte, wpe = torch.randn(10, 4, device=default_device()), torch.randn(8, 4, device=default_device())
        >>> ids, pos = torch.tensor([3, 1, 3], device=wte.device), torch.tensor([0, 1, 2], device=wte.device)
        >>> not available() or torch.equal(embed(ids, pos, wte, wpe), reference.embed(ids, pos, wte, wpe))
        True
    """
    if input_ids.dim() != 1 or positions.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and positions must be (T,), got {tuple(input_ids.shape)}, {tuple(positions.shape)}"
        )
    if len(wte.shape) != 2 or wpe.dim() != 2 or wte.shape[1] != wpe.shape[1]:
        raise ValueError(f"wte (V, C) and wpe (P, C) disagree: {tuple(wte.shape)}, {tuple(wpe.shape)}")
    element_type(input_ids.dtype, INDEX_TYPES, "input_ids")
    if positions.dtype != input_ids.dtype:
        raise ValueError(f"positions has dtype {positions.dtype}, input_ids {input_ids.dtype}: use one index dtype")
    element_type(wpe.dtype, FLOAT_TYPES, "wpe")
    wte, scale, w_int8 = weight_operands(wte, wpe, wpe.shape[1])
    if not w_int8 and wpe.dtype != wte.dtype:
        raise ValueError(f"wpe has dtype {wpe.dtype}, wte {wte.dtype}: use one float dtype")
    for name, t in (("wte", wte), ("wpe", wpe)):
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    num_tokens, width = input_ids.shape[0], wte.shape[1]
    out = torch.empty((num_tokens, width), dtype=wpe.dtype, device=wpe.device)  # (T, C)
    if num_tokens == 0:
        return out
    grid = (num_tokens, triton.cdiv(width, BLOCK))
    _embed_kernel[grid](
        input_ids, positions, wte, scale, wpe, out,
        input_ids.stride(0), positions.stride(0), wte.stride(0), wpe.stride(0), width,
        W_INT8=w_int8, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _variant(index: str, dtype: str, unit_stride: bool, w8: bool) -> dict:
    signature = dict(
        ids_ptr=f"*{index}", pos_ptr=f"*{index}", wte_ptr="*i8" if w8 else f"*{dtype}",
        scale_ptr="*fp32" if w8 else f"*{dtype}", wpe_ptr=f"*{dtype}", out_ptr=f"*{dtype}", ids_stride="i32",
        pos_stride="i32", wte_row_stride="i32", wpe_row_stride="i32", n_cols="i32", W_INT8="constexpr",
        BLOCK="constexpr",
    )  # fmt: skip
    constexprs = dict(W_INT8=w8, BLOCK=BLOCK)
    if unit_stride:  # the JIT turns an int argument equal to 1 into a constant
        signature.update(ids_stride="constexpr", pos_stride="constexpr")
        constexprs.update(ids_stride=1, pos_stride=1)
    return dict(
        name=f"embed_{index}_{dtype}{'_w8' if w8 else ''}{'' if unit_stride else '_strided_ids'}",
        fn=_embed_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=NUM_WARPS,
        divisible_by_16=("wte_row_stride", "wpe_row_stride", "n_cols"),  # GPT-2 widths are multiples of 16
    )


# every (index dtype, float dtype, float or int8 wte) the launcher accepts, with contiguous ids (the engine's case)
# or strided
COMPILE_VARIANTS: list[dict] = [
    _variant(index, dtype, unit_stride, w8)
    for w8 in (False, True)
    for unit_stride in (True, False)
    for index in INDEX_TYPES.values()
    for dtype in FLOAT_TYPES.values()
]
