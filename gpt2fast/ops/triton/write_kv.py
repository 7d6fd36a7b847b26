"""Store each token's key and value into its paged-cache slot; slot ``-1`` (a padding token) is skipped.

Grid ``(T, H)``: each program copies one head's ``D`` values of K and of V (64 for every GPT-2
size: one 128-byte fp16 row each) to ``cache[slot // BS, h, slot % BS, :]``, cast to the cache
dtype at the store. ``k``/``v`` may be strided views of the fused ``(T, 3, H, D)`` qkv output
(token and head strides are arguments; the last dim must be contiguous). A padding token's
program masks every load and store off, so its slots are never touched.

Accepted dtypes: ``k``/``v`` one of fp32/fp16/bf16 stored into a cache of the same dtype, or fp32
into an fp16/bf16 cache; ``slot_mapping`` int64 (``AttentionMetadata``'s dtype). Both caches
share one layout ``(NB, H, BS, D)`` with contiguous ``D``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops.triton import FLOAT_TYPES, element_type

BLOCK_D = 64  # head_dim chunk: all of GPT-2's D = 64 in one go
NUM_WARPS = 1
# (k/v dtype, cache dtype) pairs the launcher accepts
DTYPE_PAIRS = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16"), ("fp32", "bf16"))


@triton.jit
def _write_kv_kernel(
    k_ptr,  # (T, H, D) keys, strides (k_tok_stride, k_head_stride, 1)
    v_ptr,  # (T, H, D) values, strides (v_tok_stride, v_head_stride, 1)
    k_cache_ptr,  # (NB, H, BS, D) key cache, strides (cache_block_stride, cache_head_stride, cache_slot_stride, 1)
    v_cache_ptr,  # (NB, H, BS, D) value cache, same strides as the key cache
    slot_ptr,  # (T,) int64 slot = block * BS + offset, -1 = skip
    k_tok_stride,
    k_head_stride,
    v_tok_stride,
    v_head_stride,
    cache_block_stride,
    cache_head_stride,
    cache_slot_stride,
    block_size,
    head_dim,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    # a padding token (slot -1) copies nothing: every lane masked off
    n_valid = tl.where(slot >= 0, head_dim, 0)
    block = slot // block_size
    offset = slot % block_size
    k_src = k_ptr + token * k_tok_stride + head * k_head_stride
    v_src = v_ptr + token * v_tok_stride + head * v_head_stride
    dst = block * cache_block_stride + head * cache_head_stride + offset * cache_slot_stride
    for start in range(0, head_dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = d < n_valid
        k = tl.load(k_src + d, mask=mask, other=0.0)
        v = tl.load(v_src + d, mask=mask, other=0.0)
        tl.store(k_cache_ptr + dst + d, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst + d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must be (T, H, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be (NB, H, BS, D), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if (k_cache.shape[1], k_cache.shape[3]) != tuple(k.shape[1:]):
        raise ValueError(f"cache heads/head_dim {tuple(k_cache.shape)} do not match k {tuple(k.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 (T,) = ({k.shape[0]},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    pair = (element_type(k.dtype, FLOAT_TYPES, "k"), element_type(k_cache.dtype, FLOAT_TYPES, "k_cache"))
    if v.dtype != k.dtype or v_cache.dtype != k_cache.dtype or pair not in DTYPE_PAIRS:
        raise ValueError(f"k/v {k.dtype}/{v.dtype} into caches {k_cache.dtype}/{v_cache.dtype}: "
                         f"the triton write_kv takes one of {DTYPE_PAIRS}")
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dim (head_dim)")


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's key and value into its cache slot; slot ``-1`` is skipped (see ``reference.write_kv``).

    ``k``, ``v``: ``(T, H, D)``; caches: ``(NB, H, BS, D)``; ``slot_mapping``: ``(T,)`` int64. Slots are not
    bounds-checked on the device.

    Example (runs where the kernels can: a GPU, or ``TRITON_INTERPRET=1``):
        >>> from gpt2fast.ops.triton import available, default_device
        >>> kc = torch.zeros(2, 1, 4, 2, device=default_device()); vc = torch.zeros_like(kc)
        >>> kv = torch.ones(2, 1, 2, device=kc.device)
        >>> write_kv(kv, kv, kc, vc, torch.tensor([5, -1], device=kc.device)) if available() else None
        >>> not available() or (kc[1, 0, 1].tolist(), float(kc.sum())) == ([1.0, 1.0], 2.0)
        True
    """
    _check(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, num_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[2], head_dim,
        BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )  # fmt: skip


def _variant(src: str, dst: str) -> dict:
    return dict(
        name=f"write_kv_{src}_to_{dst}",
        fn=_write_kv_kernel,
        signature=dict(
            k_ptr=f"*{src}", v_ptr=f"*{src}", k_cache_ptr=f"*{dst}", v_cache_ptr=f"*{dst}", slot_ptr="*i64",
            k_tok_stride="i32", k_head_stride="i32", v_tok_stride="i32", v_head_stride="i32",
            cache_block_stride="i32", cache_head_stride="i32", cache_slot_stride="i32",
            block_size="i32", head_dim="i32", BLOCK_D="constexpr",
        ),  # fmt: skip
        constexprs=dict(BLOCK_D=BLOCK_D),
        num_warps=NUM_WARPS,
        # GPT-2: D = 64, BS = 16, strides multiples of 64
        divisible_by_16=(
            "k_tok_stride", "k_head_stride", "v_tok_stride", "v_head_stride",
            "cache_block_stride", "cache_head_stride", "cache_slot_stride", "block_size", "head_dim",
        ),  # fmt: skip
    )


COMPILE_VARIANTS: list[dict] = [_variant(src, dst) for src, dst in DTYPE_PAIRS]
