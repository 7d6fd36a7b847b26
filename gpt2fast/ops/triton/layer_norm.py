"""LayerNorm, and LayerNorm fused with the residual add (``residual += x; y = LN(residual)``).

One program per row. The row is walked in ``BLOCK``-sized chunks (``block_for_width``: 768 ->
3 x 256, 1600 -> 7 x 256) three times: the mean, then the variance around it (two-pass, like the
reference, so a large mean cannot cancel the variance away), then normalise and store. Only the
first walk reads DRAM; a row (<= 6.4 KB in fp32) stays in L1/L2 for the other two. Statistics are
fp32; each output is cast once, at its store. With ``HAS_RESIDUAL`` the first walk writes
``residual + x`` back to ``residual`` (rounded to its dtype) and the later walks normalise that
stored value, exactly as the reference normalises the updated residual.

Rows may be strided (``x[::2]``); the last dim must be contiguous (a ValueError says so: making a
copy would hide a full extra read and write of the activations). ``x``, ``residual``, ``weight``
and ``bias`` must share one dtype (fp32, fp16 or bf16), which is the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops.triton import FLOAT_TYPES, ROW_BLOCKS, block_for_width, element_type, warps_for_block


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # (T, C) input rows, row stride x_row_stride, last dim contiguous
    res_ptr,  # (T, C) residual, read and overwritten with residual + x (HAS_RESIDUAL; else unused)
    w_ptr,  # (C,) LayerNorm weight
    b_ptr,  # (C,) LayerNorm bias
    out_ptr,  # (T, C) output, contiguous rows of out_row_stride
    x_row_stride,
    res_row_stride,
    out_row_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    res_row = res_ptr + row * res_row_stride
    out_row = out_ptr + row * out_row_stride
    # the row to normalise: residual (after the add) or x
    if HAS_RESIDUAL:
        src_row = res_row
    else:
        src_row = x_row
    offs = tl.arange(0, BLOCK)

    # walk 1: mean (and the residual add)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            summed = v + tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
            rounded = summed.to(res_ptr.dtype.element_ty)
            tl.store(res_row + cols, rounded, mask=mask)
            v = rounded.to(tl.float32)
        acc += v
    mean = tl.sum(acc, axis=0) / n_cols
    if HAS_RESIDUAL:
        # walk 2 re-reads what walk 1 stored; the same offsets map to the same threads, and the
        # barrier makes that independent of the layout Triton picks.
        tl.debug_barrier()

    # walk 2: variance around the mean
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        v = tl.load(src_row + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)

    # walk 3: normalise, scale, shift, one cast at the store
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        v = tl.load(src_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (v - mean) * rstd * w + b
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be (T, C), got shape {tuple(x.shape)}")
    width = x.shape[1]
    if weight.shape != (width,) or bias.shape != (width,):
        raise ValueError(f"weight and bias must be ({width},), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight, "bias": bias}
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        tensors["residual"] = residual
    element_type(x.dtype, FLOAT_TYPES, "x")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, x has {x.dtype}: the triton LayerNorm takes one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)}); rows may be strided")


def _launch(x, residual, weight, bias, eps: float) -> torch.Tensor:
    num_rows, width = x.shape
    out = torch.empty((num_rows, width), dtype=x.dtype, device=x.device)  # (T, C)
    if num_rows == 0:
        return out
    block = block_for_width(width)
    has_residual = residual is not None
    res = residual if has_residual else x  # any valid pointer; unused without HAS_RESIDUAL
    _layer_norm_kernel[(num_rows,)](
        x, res, weight, bias, out,
        x.stride(0), res.stride(0), out.stride(0),
        width, eps,
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=warps_for_block(block),
    )  # fmt: skip
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 statistics (see ``reference.layer_norm``).

    ``x``: ``(T, C)``, rows may be strided; returns ``(T, C)`` in ``x.dtype``.

    Example (runs where the kernels can: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops import reference
        >>> from gpt2fast.ops.triton import available, default_device
        >>> x = torch.randn(3, 5, device=default_device())
        >>> w, b = torch.rand(5, device=x.device), torch.randn(5, device=x.device)
        >>> not available() or torch.allclose(layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5), atol=1e-5)
        True
    """
    _check(x, weight, bias, None)
    return _launch(x, None, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` (in place), then return ``LayerNorm(residual)`` (see ``reference.add_layer_norm``).

    ``x``, ``residual``: ``(T, C)``, rows may be strided; returns ``(T, C)`` in ``x.dtype``.

    Example (runs where the kernels can: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops.triton import available, default_device
        >>> res = torch.randn(2, 6, device=default_device()); x = torch.randn_like(res); expected = res + x
        >>> w, b = torch.rand(6, device=x.device), torch.randn(6, device=x.device)
        >>> if available():
        ...     y = add_layer_norm(x, res, w, b, 1e-5)
        >>> not available() or torch.equal(res, expected)
        True
    """
    _check(x, weight, bias, residual)
    return _launch(x, residual, weight, bias, eps)


def _variant(dtype: str, has_residual: bool, block: int) -> dict:
    ptr = f"*{dtype}"
    return dict(
        name=f"{'add_' if has_residual else ''}layer_norm_{dtype}_b{block}",
        fn=_layer_norm_kernel,
        signature=dict(
            x_ptr=ptr, res_ptr=ptr, w_ptr=ptr, b_ptr=ptr, out_ptr=ptr,
            x_row_stride="i32", res_row_stride="i32", out_row_stride="i32", n_cols="i32", eps="fp32",
            HAS_RESIDUAL="constexpr", BLOCK="constexpr",
        ),  # fmt: skip
        constexprs=dict(HAS_RESIDUAL=has_residual, BLOCK=block),
        num_warps=warps_for_block(block),
        # GPT-2 widths are multiples of 16: the JIT specialises strides and widths on that
        divisible_by_16=("x_row_stride", "res_row_stride", "out_row_stride", "n_cols"),
    )


# every (dtype, residual add, chunk size) the launchers can choose
COMPILE_VARIANTS: list[dict] = [
    _variant(dtype, has_residual, block)
    for has_residual in (False, True)
    for dtype in FLOAT_TYPES.values()
    for block in ROW_BLOCKS
]
