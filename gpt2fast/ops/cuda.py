"""CUDA C++ backend: typed wrappers over the compiled kernels, same signatures as ``ops/reference.py``.

Each wrapper checks its tensors (device, dtype, shape, strides, alignment) and raises ValueError
naming the problem before any pointer reaches C++, allocates ``out``, then calls the module:

* CUDA tensors -> ``gpt2fast._C``, built by setup.py with nvcc (sm_80/sm_90), on the current stream;
* CPU tensors  -> the same ``csrc/`` sources built with g++ against the CUDA emulator
  (``cuda_build.emulated_module()``, compiled on first use and cached): correct, slow, for tests.

Rows may be strided (``x[::2]``), but the last dim must be contiguous: a silent copy would hide a
full extra read and write of the activations.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import torch

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import cuda_build
from gpt2fast.quant import Int8Weight, check_int8_weight

FLOAT_DTYPES = {torch.float32: "DTYPE_FLOAT32", torch.float16: "DTYPE_FLOAT16", torch.bfloat16: "DTYPE_BFLOAT16"}
MAX_WIDTH = 8192  # csrc/kernels/layer_norm.cuh kLayerNormMaxWidth (the modules export it: LAYER_NORM_MAX_WIDTH)


def compiled_module() -> ModuleType:
    """``gpt2fast._C``, the nvcc build (ImportError with the way to build it when it is missing).

    Example:
        >>> try:
        ...     emulated = compiled_module().EMULATED
        ... except ImportError:
        ...     emulated = False
        >>> emulated
        False
    """
    try:
        return importlib.import_module("gpt2fast._C")
    except ImportError as err:
        raise ImportError(
            "gpt2fast._C is not built: install on a machine with nvcc (GPT2FAST_BUILD_CUDA=1 pip install -e .) "
            f"({err})"
        ) from err


SANITIZE_ENV = "GPT2FAST_EMU_SANITIZE"


def emulated_module(sanitize: bool | None = None) -> ModuleType:
    """The CPU-emulated module (see ``cuda_build.emulated_module``); ``set_order(k)`` picks its thread order.

    ``sanitize=None`` reads ``$GPT2FAST_EMU_SANITIZE``: ``1`` gives the ASan+UBSan build, so the whole
    CUDA test suite can run sanitized in a process started with ``cuda_build.sanitizer_env()``.

    Example:
        >>> emulated_module().EMULATED  # doctest: +SKIP
        True
    """
    if sanitize is None:
        sanitize = os.environ.get(SANITIZE_ENV, "0") == "1"
    return cuda_build.emulated_module(sanitize)


def module_for(device: torch.device) -> ModuleType:
    """The module whose kernels run on ``device``: ``gpt2fast._C`` for CUDA, the emulated one for CPU.

    Example:
        >>> module_for(torch.device("cpu")).EMULATED  # doctest: +SKIP
        True
    """
    if device.type == "cuda":
        return compiled_module()
    if device.type == "cpu":
        return emulated_module()
    raise ValueError(f"the CUDA kernels take CUDA tensors (or CPU tensors, emulated), not {device.type}")


def available() -> bool:
    """True when the kernels can run here: CUDA with ``gpt2fast._C`` built, or the emulated module can be built.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return unavailable_reason() == ""


def unavailable_reason() -> str:
    """Why ``available()`` is False (empty when it is True), for the error an explicit ``backend='cuda'`` raises.

    Example:
        >>> available() or "cuda" in unavailable_reason().lower()
        True
    """
    if torch.cuda.is_available():
        try:
            compiled_module()
        except ImportError as err:
            return f"backend 'cuda': {err}"
        return ""
    reason = cuda_build.emulator_unavailable_reason()
    return f"backend 'cuda' on CPU runs the kernels emulated, which cannot be built here: {reason}" if reason else ""


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current while launching: the CUDA runtime launches on the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dtype_code(module: ModuleType, dtype: torch.dtype) -> int:
    return getattr(module, FLOAT_DTYPES[dtype])


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every tensor a wrapper allocates for a kernel to fill (a seam: tests poison them with NaN / -1)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _alloc_out(x: torch.Tensor) -> torch.Tensor:
    """The output of a row op: like ``x``, contiguous."""
    return _empty(tuple(x.shape), x.dtype, x.device)  # (T, C)


def _row_stride(t: torch.Tensor) -> int:
    """Elements between rows; a single row's stride is meaningless (it may be 0 or 1), so it is its width."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a_end = a.data_ptr() + (a.shape[0] - 1) * a.stride(0) * a.element_size() + a.shape[1] * a.element_size()
    b_end = b.data_ptr() + (b.shape[0] - 1) * b.stride(0) * b.element_size() + b.shape[1] * b.element_size()
    return a.data_ptr() < b_end and b.data_ptr() < a_end


def _check_rows(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """``t`` is a (T, C) tensor like ``x``: same dtype and device, contiguous rows, aligned elements."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be (T, C), got shape {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, x has {x.dtype}: the CUDA LayerNorm takes one dtype")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(1)}); rows may be strided")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(f"{name} has row stride {t.stride(0)} < width {t.shape[1]}: its rows overlap")
    if t.data_ptr() % t.element_size():
        raise ValueError(f"{name}'s data pointer {t.data_ptr():#x} is not aligned to its {t.element_size()}-byte dtype")


def _check_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be (T, C), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; the CUDA kernels take float32, float16 or bfloat16")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x is on {x.device}: the CUDA kernels take CUDA tensors (or CPU tensors, emulated)")
    width = x.shape[1]
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"x has width {width}; the CUDA LayerNorm takes widths 1..{MAX_WIDTH}")
    if x.shape[0] >= 2**31:
        raise ValueError(f"x has {x.shape[0]} rows; the CUDA LayerNorm takes fewer than 2**31")
    _check_rows("x", x, x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (width,):
            raise ValueError(f"{name} must be ({width},), got {tuple(t.shape)}")
        _check_rows(name, t.view(1, width), x)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        _check_rows("residual", residual, x)
        if _overlap(x, residual):
            raise ValueError("x and residual overlap in memory: residual is updated in place while x is read")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 statistics (see ``reference.layer_norm``).

    ``x``: ``(T, C)`` with ``C <= 8192``, rows may be strided; returns a contiguous ``(T, C)`` in ``x.dtype``.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> x, w, b = torch.randn(3, 5), torch.rand(5), torch.randn(5)
        >>> torch.allclose(layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5), atol=1e-5)  # doctest: +SKIP
        True
    """
    _check_layer_norm(x, weight, bias, None)
    rows, width = x.shape
    out = _alloc_out(x)  # (T, C)
    if rows == 0:
        return out
    module = module_for(x.device)
    with _on(x.device):
        module.layer_norm(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), rows, width,
                          _row_stride(x), float(eps), _dtype_code(module, x.dtype), _stream(x.device))  # fmt: skip
    return out


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` (in place, rounded to its dtype), then return ``LayerNorm(residual)`` (see
    ``reference.add_layer_norm``).

    ``x``, ``residual``: ``(T, C)``, rows may be strided, not overlapping; returns a contiguous ``(T, C)``.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> res = torch.randn(2, 6); x = torch.randn(2, 6); expected = res + x
        >>> y = add_layer_norm(x, res, torch.ones(6), torch.zeros(6), 1e-5)  # doctest: +SKIP
        >>> torch.equal(res, expected)  # doctest: +SKIP
        True
    """
    _check_layer_norm(x, weight, bias, residual)
    rows, width = x.shape
    out = _alloc_out(x)  # (T, C)
    if rows == 0:
        return out
    module = module_for(x.device)
    with _on(x.device):
        module.add_layer_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                              rows, width, _row_stride(x), _row_stride(residual), float(eps),
                              _dtype_code(module, x.dtype), _stream(x.device))  # fmt: skip
    return out


# ---- write_kv ----

# (k/v dtype, cache dtype) pairs csrc/kernels/write_kv.cuh takes: the same dtype, or fp32 into a 16-bit cache
WRITE_KV_DTYPE_PAIRS = (
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
)  # fmt: skip


def _stride(t: torch.Tensor, dim: int) -> int:
    """``t.stride(dim)``, or 0 where the dim has one element (its stride is arbitrary and would only
    keep a kernel off its vector path)."""
    return t.stride(dim) if t.shape[dim] > 1 else 0


def _check_same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"tensors on different devices: {', '.join(f'{n} on {d}' for n, d in devices.items())}")
    if first.type not in ("cuda", "cpu"):
        raise ValueError(f"tensors are on {first}: the CUDA kernels take CUDA tensors (or CPU tensors, emulated)")
    return first


def _check_elements_aligned(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.data_ptr() % t.element_size():
            raise ValueError(f"{name}'s data pointer {t.data_ptr():#x} is not aligned to its "
                             f"{t.element_size()}-byte dtype")  # fmt: skip


def _check_write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must be (T, H, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be (NB, H, BS, D), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if (k_cache.shape[1], k_cache.shape[3]) != tuple(k.shape[1:]):
        raise ValueError(f"cache heads/head_dim {tuple(k_cache.shape)} do not match k {tuple(k.shape)}")
    _check_same_device(dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping))
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 (T,) = ({k.shape[0]},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")  # fmt: skip
    if k.shape[0] > 1 and slot_mapping.stride(0) != 1:
        raise ValueError("slot_mapping must be contiguous")
    if v.dtype != k.dtype or v_cache.dtype != k_cache.dtype or (k.dtype, k_cache.dtype) not in WRITE_KV_DTYPE_PAIRS:
        raise ValueError(f"k/v {k.dtype}/{v.dtype} into caches {k_cache.dtype}/{v_cache.dtype}: the CUDA write_kv "
                         "takes one dtype, or float32 into a float16/bfloat16 cache")  # fmt: skip
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (head_dim), stride {t.stride(-1)}")
    if k.shape[0] >= 2**31 or k.shape[1] * k.shape[2] >= 2**31:
        raise ValueError(f"k has shape {tuple(k.shape)}: the CUDA write_kv takes fewer than 2**31 tokens and H * D")
    _check_elements_aligned(dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping))


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's key and value into its cache slot; slot ``-1`` is skipped (see ``reference.write_kv``).

    ``k``, ``v``: ``(T, H, D)``, token/head strides free (views of the fused ``(T, 3, H, D)`` qkv), last dim
    contiguous; caches ``(NB, H, BS, D)`` with a contiguous last dim, the dtype of ``k`` or fp16/bf16 from fp32;
    ``slot_mapping``: ``(T,)`` int64. Slots are not bounds-checked on the device. 16-byte vectors when every
    pointer and stride allows, else scalar.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> kc = torch.zeros(2, 1, 4, 2); vc = torch.zeros_like(kc)
        >>> write_kv(torch.ones(2, 1, 2), torch.ones(2, 1, 2), kc, vc, torch.tensor([5, -1]))  # doctest: +SKIP
        >>> kc[1, 0, 1].tolist(), float(kc.sum())  # doctest: +SKIP
        ([1.0, 1.0], 2.0)
    """
    _check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    tokens, n_head, head_dim = k.shape
    if tokens == 0 or k_cache.numel() == 0:
        return
    module = module_for(k.device)
    with _on(k.device):
        module.write_kv(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
                        tokens, n_head, head_dim, k_cache.shape[2], _stride(k, 0), _stride(k, 1), _stride(v, 0),
                        _stride(v, 1), _stride(k_cache, 0), _stride(k_cache, 1), _stride(k_cache, 2),
                        _dtype_code(module, k.dtype), _dtype_code(module, k_cache.dtype),
                        _stream(k.device))  # fmt: skip


# ---- attention ----

ATTENTION_HEAD_DIM = 64  # csrc/kernels/attention.cuh kAttentionHeadDim (the modules export ATTENTION_HEAD_DIM)


def _check_attention(q, k_cache, v_cache, meta: AttentionMetadata) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
                         f"{v_cache.dtype} must be (NB, H, BS, D) of one shape and dtype")  # fmt: skip
    n_head, _, head_dim = k_cache.shape[1:]
    if head_dim != ATTENTION_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim}: the CUDA attention kernel takes head_dim {ATTENTION_HEAD_DIM} only")
    if q.dim() != 3 or q.shape[1:] != (n_head, head_dim):
        raise ValueError(f"q must be (T, {n_head}, {head_dim}), got {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES or q.dtype != k_cache.dtype:
        raise ValueError(f"q ({q.dtype}) and the caches ({k_cache.dtype}) must share one dtype of float32, "
                         "float16 or bfloat16")  # fmt: skip
    tables = dict(cu_seqlens_q=meta.cu_seqlens_q, seq_lens=meta.seq_lens, block_tables=meta.block_tables)
    _check_same_device(dict(q=q, k_cache=k_cache, v_cache=v_cache, **tables))
    num_seqs = meta.num_seqs
    width = meta.block_tables.shape[-1] if meta.block_tables.dim() else 0
    shapes = dict(cu_seqlens_q=[num_seqs + 1], seq_lens=[num_seqs], block_tables=[num_seqs, width])
    for name, t in tables.items():
        if t.dtype != torch.int32 or list(t.shape) != shapes[name] or not t.is_contiguous():
            raise ValueError(f"meta.{name} must be a contiguous int32 tensor of shape {tuple(shapes[name])}, got "
                             f"{t.dtype} {tuple(t.shape)} with strides {t.stride()}")  # fmt: skip
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (NB, H, BS, D), got strides {t.stride()}")
        if t.data_ptr() % 16:
            raise ValueError(f"{name}'s data pointer {t.data_ptr():#x} is not 16-byte aligned (the kernel reads "
                             "16-byte vectors)")  # fmt: skip
    if q.stride(2) != 1:
        raise ValueError(f"q must be contiguous in its last dim (head_dim), stride {q.stride(2)}")
    if q.shape[0] >= 2**31 or num_seqs >= 2**31 or n_head > 65535:
        raise ValueError(f"q {tuple(q.shape)} with {num_seqs} sequences is too large for the CUDA attention grid")
    _check_elements_aligned(dict(q=q))


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal paged attention of a step (``reference.attention``), decode or prefill.

    ``q``: ``(T, H, 64)``, token/head strides free, last dim contiguous; caches ``(NB, H, BS, 64)`` contiguous
    in ``q.dtype``. Returns a new ``(T, H, 64)``; rows of sequences without a query are not written.
    A decode step (every sequence has at most one query): split-K over the block table with the Triton backend's
    split rule (``decode_splits``: shapes only, so CUDA graphs replay), fp32 partials in a workspace from
    ``_empty``, merged in the same launch by the split that finishes last (ticket counters, ``triton.counters``).
    A prefill (``meta.max_query_len > 1``; chunks with earlier context in the pages, mixed with decode rows):
    fp16/bf16 run the flash kernel on tensor cores (csrc/kernels/attention_prefill.cuh); fp32 runs the decode
    kernel once per query row (exact fp32 FMAs, the fp32 model's 1e-4 contract).

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> kc = torch.randn(4, 2, 16, 64); vc = torch.randn_like(kc)
        >>> meta = AttentionMetadata.build([[3, 1], [2]], [20, 5], [1, 1], block_size=16)
        >>> q = torch.randn(2, 2, 64)
        >>> torch.allclose(attention(q, kc, vc, meta, 0.125), reference.attention(q, kc, vc, meta, 0.125),
        ...                atol=1e-5)  # doctest: +SKIP
        True
    """
    if meta.max_query_len > 1:
        return _attention_prefill(q, None, None, k_cache, v_cache, meta, scale)
    return _attention_decode(q, None, None, k_cache, v_cache, meta, scale)


def write_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """``reference.write_kv_attention`` in one launch: each row's key and value go to its slot
    (``meta.slot_mapping``, -1 not stored) and are attended at their positions, read from ``k``/``v`` (the cache
    is never read where this launch writes). A decode step runs the split-K kernel, a prefill of fp16/bf16 the
    flash kernel; fp32 prefill is ``write_kv`` then ``attention`` (two launches).

    ``k``, ``v``: ``(T, H, 64)`` in the caches' dtype, one token/head stride for both (views of the fused qkv
    output), rows 16-byte aligned (ValueError otherwise: use ``write_kv`` then ``attention``). Else as
    ``attention``.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> kc = torch.randn(4, 2, 16, 64); vc = torch.randn_like(kc)
        >>> meta = AttentionMetadata.build([[3, 1], [2]], [20, 5], [1, 1], block_size=16)
        >>> q, k, v = torch.randn(3, 2, 2, 64).unbind(0)
        >>> out = write_kv_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.125)  # doctest: +SKIP
        >>> torch.allclose(out, reference.write_kv_attention(q, k, v, kc, vc, meta, 0.125), atol=1e-5)  # doctest: +SKIP
        True
    """
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have q's shape {tuple(q.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"k ({k.dtype}) and v ({v.dtype}) must have the caches' dtype {k_cache.dtype}")
    if k.stride() != v.stride() or k.stride(2) != 1:
        raise ValueError(f"k and v need one layout, last dim contiguous (strides {k.stride()}, {v.stride()})")
    vec = 16 // k.element_size()
    if k.data_ptr() % 16 or v.data_ptr() % 16 or k.stride(0) % vec or k.stride(1) % vec:
        raise ValueError("k and v rows must be 16-byte aligned (data pointers and token/head strides): the "
                         "kernel reads them in 16-byte vectors")  # fmt: skip
    slots = meta.slot_mapping
    if slots.dtype != torch.int64 or slots.shape != (q.shape[0],) or (q.shape[0] > 1 and slots.stride(0) != 1):
        raise ValueError(f"meta.slot_mapping must be a contiguous int64 ({q.shape[0]},), got {slots.dtype} "
                         f"{tuple(slots.shape)}")  # fmt: skip
    _check_same_device(dict(q=q, k=k, v=v, slot_mapping=slots))
    if meta.max_query_len > 1:
        return _attention_prefill(q, k, v, k_cache, v_cache, meta, scale)
    return _attention_decode(q, k, v, k_cache, v_cache, meta, scale)


def fuses_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether ``write_kv_attention`` takes these ``k``/``v`` (dtype, one layout, 16-byte aligned rows).

    Example:
        >>> qkv = torch.randn(3, 3, 2, 64)  # (T, 3, H, D), as the model's qkv projection lays it out
        >>> fuses_write_kv(qkv[:, 1], qkv[:, 2], torch.empty(4, 2, 16, 64)), fuses_write_kv(qkv[:, 1].half(),
        ...     qkv[:, 2].half(), torch.empty(4, 2, 16, 64))
        (True, False)
    """
    vec = 16 // k.element_size()
    return (k.dtype == v.dtype == k_cache.dtype and k.stride() == v.stride() and k.dim() == 3 and k.stride(2) == 1
            and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0 and k.stride(0) % vec == 0
            and k.stride(1) % vec == 0)


def _per_query(meta: AttentionMetadata, num_tokens: int) -> AttentionMetadata:
    """``meta`` with every query row as its own sequence of context ``position + 1`` (device ops, no sync): what
    the decode kernel attends once per query for an fp32 prefill."""
    device = meta.seq_lens.device
    cu = meta.cu_seqlens_q.long()  # (B + 1,)
    q_lens = cu[1:] - cu[:-1]  # (B,)
    seq = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), q_lens, output_size=num_tokens)  # (T,)
    local = torch.arange(num_tokens, device=device) - cu[seq]  # (T,) the row's index in its sequence
    lens = meta.seq_lens.long()[seq] - q_lens[seq] + local + 1  # (T,) context of each query
    return AttentionMetadata(
        cu_seqlens_q=torch.arange(num_tokens + 1, dtype=torch.int32, device=device), seq_lens=lens.int(),
        block_tables=meta.block_tables.index_select(0, seq).contiguous(), slot_mapping=meta.slot_mapping,
        logits_indices=meta.logits_indices, max_query_len=1, max_seq_len=meta.max_seq_len,
    )  # fmt: skip


def _attention_prefill(q, k, v, k_cache, v_cache, meta, scale) -> torch.Tensor:
    _check_attention(q, k_cache, v_cache, meta)
    if q.dtype == torch.float32:
        if k is not None:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return _attention_decode(q, None, None, k_cache, v_cache, _per_query(meta, q.shape[0]), scale)
    n_head, block_size, head_dim = k_cache.shape[1:]
    out = _empty(tuple(q.shape), q.dtype, q.device)  # (T, H, D)
    if q.shape[0] == 0 or meta.num_seqs == 0:
        return out
    module = module_for(q.device)
    new = k is not None
    with _on(q.device):
        module.attention_prefill(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr() if new else 0,
                                 v.data_ptr() if new else 0, meta.slot_mapping.data_ptr() if new else 0,
                                 meta.cu_seqlens_q.data_ptr(), meta.seq_lens.data_ptr(), meta.block_tables.data_ptr(),
                                 out.data_ptr(), meta.num_seqs, meta.max_query_len, n_head, head_dim, block_size,
                                 meta.block_tables.shape[1], _stride(q, 0), _stride(q, 1), _stride(k, 0) if new else 0,
                                 _stride(k, 1) if new else 0, float(scale), _dtype_code(module, q.dtype),
                                 _stream(q.device))  # fmt: skip
    return out


def _attention_decode(q, k, v, k_cache, v_cache, meta, scale) -> torch.Tensor:
    from gpt2fast.ops.triton.attention import decode_splits  # the one split rule (imports triton)
    from gpt2fast.ops.triton.counters import ticket_counters

    _check_attention(q, k_cache, v_cache, meta)
    if meta.max_query_len > 1:
        raise ValueError(f"meta.max_query_len is {meta.max_query_len}: the CUDA attention kernel covers decode steps "
                         "only (at most one query per sequence); run prefill on another backend")  # fmt: skip
    n_head, block_size, head_dim = k_cache.shape[1:]
    num_seqs, max_blocks = meta.num_seqs, meta.block_tables.shape[1]
    out = _empty(tuple(q.shape), q.dtype, q.device)  # (T, H, D)
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    num_splits, pages_per_split = decode_splits(num_seqs, n_head, max_blocks)
    split = num_splits > 1
    parts = num_seqs * n_head * num_splits if split else 1  # 1: a valid pointer the kernel never uses
    part_ml = _empty((parts, 2), torch.float32, q.device)  # (B * H * splits, 2) max (log2 domain), sum
    part_acc = _empty((parts, head_dim), torch.float32, q.device)  # (B * H * splits, D) unnormalised out
    counters = ticket_counters(q.device, num_seqs * n_head if split else 1)  # (B * H,) tickets, zero
    module = module_for(q.device)
    new = k is not None
    with _on(q.device):
        module.attention_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr() if new else 0,
                                v.data_ptr() if new else 0, meta.slot_mapping.data_ptr() if new else 0,
                                meta.cu_seqlens_q.data_ptr(), meta.seq_lens.data_ptr(), meta.block_tables.data_ptr(),
                                part_ml.data_ptr(), part_acc.data_ptr(), counters.data_ptr(), out.data_ptr(), num_seqs,
                                n_head, head_dim, block_size, max_blocks, num_splits, pages_per_split, _stride(q, 0),
                                _stride(q, 1), _stride(k, 0) if new else 0, _stride(k, 1) if new else 0, float(scale),
                                _dtype_code(module, q.dtype), _stream(q.device))  # fmt: skip
    return out


# ---- sample_top_k_top_p ----


def _check_sampling(logits: torch.Tensor, settings: dict[str, tuple[torch.Tensor | None, torch.dtype]]) -> None:
    """``logits`` (B, V) fp32 contiguous; each setting (B,) of its dtype, contiguous, on the same device."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits has dtype {logits.dtype}; the CUDA sampler takes float32 logits")
    if logits.device.type not in ("cuda", "cpu"):
        raise ValueError(f"logits is on {logits.device}: the CUDA kernels take CUDA tensors (or CPU tensors, emulated)")
    rows, vocab = logits.shape
    if not 1 <= vocab < 2**31 or rows >= 2**31:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; the CUDA sampler takes 1 <= V < 2**31, B < 2**31")
    if not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous (strides {logits.stride()})")
    for name, (t, dtype) in settings.items():
        if t is None:
            continue
        if t.shape != (rows,):
            raise ValueError(f"{name} must be ({rows},), one per row of logits, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, must be {dtype}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
        if rows > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous (stride {t.stride(0)})")
        if t.data_ptr() % t.element_size():
            raise ValueError(f"{name}'s data pointer {t.data_ptr():#x} is not aligned to its dtype")


def sample_top_k_top_p(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row, the one ``sampling.sample_batch`` picks for rows without penalties or logprobs.

    ``logits``: (B, V) float32, contiguous. Per row, (B,) each: ``temperature`` float32 (``< 1e-5``:
    argmax, ties to the lowest id, also when ``top_k == 1``), ``top_k`` int32 (``<= 0`` or ``>= V``: off),
    ``top_p`` float32 in (0, 1] (1: off), ``seeds`` int64 = ``sampling.row_seed(seed, sample_index, step)``,
    ``min_p`` float32 (``<= 0`` or None: off). Returns (B,) int64 token ids. Temperature -> top-k ->
    top-p (of the top-k survivors) -> min-p -> Gumbel-max with the runtime's Philox noise, as
    ``sampling.filter_logits`` + ``gumbel_max_draw``; the top-p mass is fp32 in another order than torch's,
    so a row whose nucleus boundary lies within ~1e-6 of ``top_p`` may keep one token more or less
    (csrc/kernels/sampling.cuh). Logits may hold ``-inf`` (never drawn), not NaN or ``+inf``. Settings are
    not range-checked here (that would cost a device sync): ``SamplingParams`` validates them.

    Example (on CPU this builds the emulated module with g++ on first use):
        >>> from gpt2fast.sampling import SampleRow, SamplingParams, row_seed, sample_batch
        >>> logits = torch.randn(2, 50)
        >>> params = [SamplingParams(temperature=0.8, top_k=10), SamplingParams(top_p=0.5)]
        >>> rows = [SampleRow(p, seed=7, sample_index=0, step=3) for p in params]
        >>> ids = sample_top_k_top_p(logits, torch.tensor([0.8, 1.0]), torch.tensor([10, 0], dtype=torch.int32),
        ...                          torch.tensor([1.0, 0.5]), torch.tensor([row_seed(7, 0, 3)] * 2))  # doctest: +SKIP
        >>> ids.tolist() == [t.token_id for t in sample_batch(logits, rows)]  # doctest: +SKIP
        True
    """
    _check_sampling(logits, {"temperature": (temperature, torch.float32), "top_k": (top_k, torch.int32),
                             "top_p": (top_p, torch.float32), "seeds": (seeds, torch.int64),
                             "min_p": (min_p, torch.float32)})  # fmt: skip
    rows, vocab = logits.shape
    out = _empty((rows,), torch.int64, logits.device)  # (B,)
    if rows == 0:
        return out
    module = module_for(logits.device)
    with _on(logits.device):
        module.sample_top_k_top_p(logits.data_ptr(), temperature.data_ptr(), top_k.data_ptr(), top_p.data_ptr(),
                                  0 if min_p is None else min_p.data_ptr(), seeds.data_ptr(), out.data_ptr(),
                                  rows, vocab, _stream(logits.device))  # fmt: skip
    return out


# ---- linear ----

LINEAR_MAX_ROWS = 16  # csrc/kernels/linear.cuh kGemvMaxRows (the modules export it: LINEAR_MAX_ROWS)
GEMM_MAX_ROWS = 65535 * 64  # csrc/kernels/gemm.cuh: a grid of at most 65535 row tiles


def _check_operand(name: str, t: torch.Tensor, x: torch.Tensor, shape: tuple[int, ...], op: str) -> None:
    """``t`` has ``shape``, ``x``'s dtype and device, a contiguous last dim and an element-aligned pointer."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {shape}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, x has {x.dtype}: the CUDA {op} takes one dtype")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")
    if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(f"{name} has row stride {t.stride(0)} < width {t.shape[1]}: its rows overlap")
    if t.data_ptr() % t.element_size():
        raise ValueError(f"{name}'s data pointer {t.data_ptr():#x} is not aligned to its {t.element_size()}-byte dtype")


def _weight_pointers(weight: torch.Tensor | Int8Weight) -> tuple[int, int]:
    """(values, per-row scales) pointers of a weight: the scales' 0 for a plain tensor."""
    if isinstance(weight, Int8Weight):
        return weight.data.data_ptr(), weight.scale.data_ptr()
    return weight.data_ptr(), 0


def _check_linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, max_rows: int = 2**62) -> None:  # fmt: skip
    if x.dim() != 2:
        raise ValueError(f"x must be (T, K), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; the CUDA kernels take float32, float16 or bfloat16")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x is on {x.device}: the CUDA kernels take CUDA tensors (or CPU tensors, emulated)")
    rows, k_in = x.shape
    if rows > max_rows:
        raise ValueError(f"x has {rows} rows: the CUDA GEMV covers decode batches of at most {max_rows} rows")
    if rows > GEMM_MAX_ROWS:
        raise ValueError(f"x has {rows} rows: the CUDA GEMM takes at most {GEMM_MAX_ROWS} (65535 tiles of 64 rows)")
    if len(weight.shape) != 2 or weight.shape[1] != k_in:
        raise ValueError(f"weight must be (N, {k_in}) (nn.Linear's (out, in)), got {tuple(weight.shape)}")
    n_out = weight.shape[0]
    if n_out >= 2**31 or k_in >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)}: the CUDA linear takes N and K below 2**31")
    _check_operand("x", x, x, (rows, k_in), "linear")
    if isinstance(weight, Int8Weight):
        check_int8_weight(weight, x, k_in, "the CUDA kernels")
    else:
        _check_operand("weight", weight, x, (n_out, k_in), "linear")
        if n_out > 1 and weight.stride(0) != k_in:
            raise ValueError(f"weight must be contiguous (row stride {weight.stride(0)}, K = {k_in})")
    if bias is not None:
        _check_operand("bias", bias, x, (n_out,), "linear")
    if residual is not None:
        _check_operand("residual", residual, x, (rows, n_out), "linear")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``, then optionally tanh-GELU, then optionally ``+ residual`` (see
    ``reference.linear``), in one launch: the decode GEMV for ``T <= 16`` rows (csrc/kernels/linear.cuh), the
    GEMM above that (csrc/kernels/gemm.cuh: tensor cores for fp16/bf16, fp32 FMAs for fp32).

    ``x``: ``(T, K)``, rows may be strided; ``weight``: ``(N, K)`` contiguous; ``bias``: ``(N,)`` or None;
    ``residual``: ``(T, N)`` or None. Returns a contiguous ``(T, N)`` in ``x.dtype``; fp32 accumulation,
    deterministic (no atomics).

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        >>> y = linear(x, w, b, gelu=True)  # doctest: +SKIP
        >>> torch.allclose(y, reference.linear(x, w, b, gelu=True), atol=1e-5)  # doctest: +SKIP
        True
    """
    _check_linear(x, weight, bias, residual)
    rows, k_in = x.shape
    n_out = weight.shape[0]
    out = _empty((rows, n_out), x.dtype, x.device)  # (T, N)
    if rows == 0 or n_out == 0:
        return out
    module = module_for(x.device)
    res_stride = n_out if residual is None else _row_stride(residual)
    values, scales = _weight_pointers(weight)
    args = (x.data_ptr(), values, 0 if bias is None else bias.data_ptr(),
            0 if residual is None else residual.data_ptr(), out.data_ptr(), rows, n_out, k_in, _row_stride(x),
            res_stride, bool(gelu))  # fmt: skip
    with _on(x.device):
        if rows <= LINEAR_MAX_ROWS:
            module.linear(*args, _dtype_code(module, x.dtype), _stream(x.device), w_scale=scales)
        else:
            module.gemm(*args, False, _dtype_code(module, x.dtype), _stream(x.device), w_scale=scales)
    return out


def lm_head(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``reference.lm_head``: fp32 logits ``x @ wte.T`` ``(T, V)`` through the GEMM of ``linear`` (tensor cores
    for fp16/bf16, fp32 products summed in fp32), any number of rows.

    ``x``: ``(T, C)``, rows may be strided; ``wte``: ``(V, C)`` contiguous in x's dtype, or an ``Int8Weight``
    ``(V, C)`` (each row's scale applied to its fp32 sum).

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> x, wte = torch.randn(3, 8), torch.randn(50, 8)
        >>> torch.allclose(lm_head(x, wte), reference.lm_head(x, wte), atol=1e-5)  # doctest: +SKIP
        True
    """
    if not isinstance(wte, torch.Tensor | Int8Weight):
        raise ValueError(f"wte must be a tensor or an Int8Weight, got {type(wte).__name__}")
    _check_linear(x, wte, None, None)
    rows, width = x.shape
    vocab = wte.shape[0]
    out = _empty((rows, vocab), torch.float32, x.device)  # (T, V)
    if rows == 0 or vocab == 0:
        return out
    module = module_for(x.device)
    values, scales = _weight_pointers(wte)
    with _on(x.device):
        module.gemm(x.data_ptr(), values, 0, 0, out.data_ptr(), rows, vocab, width, _row_stride(x), vocab,
                    False, True, _dtype_code(module, x.dtype), _stream(x.device), w_scale=scales)  # fmt: skip
    return out
    module = module_for(x.device)
    with _on(x.device):
        module.gemm(x.data_ptr(), wte.data_ptr(), 0, 0, out.data_ptr(), rows, vocab, width, _row_stride(x), vocab,
                    False, True, _dtype_code(module, x.dtype), _stream(x.device))  # fmt: skip
    return out


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
    """``linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu=gelu)`` (``reference.ln_linear``) as
    one GEMV launch: every block computes its rows' LayerNorm statistics, then normalises x as it reads it,
    rounded to x's dtype as the LayerNorm kernel would store it (csrc/kernels/linear.cuh).

    ``x``: ``(T, K)``, ``T <= 16``, rows may be strided; ``ln_weight``/``ln_bias``: ``(K,)``; ``weight``:
    ``(N, K)`` contiguous; ``bias``: ``(N,)`` or None. Returns a contiguous ``(T, N)`` in ``x.dtype``.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> x, g, h, w, b = torch.randn(3, 8), torch.rand(8), torch.randn(8), torch.randn(5, 8), torch.randn(5)
        >>> y = ln_linear(x, g, h, 1e-5, w, b)  # doctest: +SKIP
        >>> torch.allclose(y, reference.ln_linear(x, g, h, 1e-5, w, b), atol=1e-5)  # doctest: +SKIP
        True
    """
    if x.dim() == 2 and x.shape[1] == 0:
        raise ValueError("x has no columns: LayerNorm needs K >= 1")
    _check_linear(x, weight, bias, None, LINEAR_MAX_ROWS)
    rows, k_in = x.shape
    _check_operand("ln_weight", ln_weight, x, (k_in,), "ln_linear")
    _check_operand("ln_bias", ln_bias, x, (k_in,), "ln_linear")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if k_in > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous (stride {t.stride(0)})")
    n_out = weight.shape[0]
    out = _empty((rows, n_out), x.dtype, x.device)  # (T, N)
    if rows == 0 or n_out == 0:
        return out
    module = module_for(x.device)
    with _on(x.device):
        values, scales = _weight_pointers(weight)
        module.ln_linear(x.data_ptr(), ln_weight.data_ptr(), ln_bias.data_ptr(), float(eps), values,
                         0 if bias is None else bias.data_ptr(), out.data_ptr(), rows, n_out, k_in, _row_stride(x),
                         bool(gelu), _dtype_code(module, x.dtype), _stream(x.device), w_scale=scales)  # fmt: skip
    return out


# ---- lm_head_argmax / lm_head_gumbel ----


def lm_head_argmax(x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
    """``reference.lm_head_argmax``: the token of the largest logit of each row (ties to the lowest id), in one
    launch that never writes the logits: a decode batch (``T <= 16`` rows) through the GEMV
    (csrc/kernels/lm_head.cuh), more rows through ``lm_head``'s GEMM with the choice as its epilogue
    (csrc/kernels/gemm.cuh).

    ``x``: ``(T, C)``, rows may be strided; ``wte``: ``(V, C)`` contiguous, x's dtype. Returns ``(T,)`` int64. The
    logits are fp32 sums in another order than the reference's, so two logits within a few ulps may swap.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> x, wte = torch.randn(3, 8), torch.randn(50, 8)
        >>> torch.equal(lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))  # doctest: +SKIP
        True
    """
    return _lm_head_choice(x, wte, None, None)


def lm_head_gumbel(x: torch.Tensor, wte: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor
                   ) -> torch.Tensor:
    """``reference.lm_head_gumbel``: row ``t``'s token is ``argmax(logits / temperature[t] + g)``, ``g`` the Gumbel
    noise of ``sampling.philox_uniform`` at ``seeds[t]`` (the argmax where ``temperature[t] <
    sampling.GREEDY_BELOW``). One launch that never writes the logits: the GEMV for a decode batch (``T <= 16``
    rows), the GEMM with the choice as its epilogue for more.

    ``temperature``: ``(T,)`` float32; ``seeds``: ``(T,)`` int64 Philox row seeds (``sampling.row_seed``). Else as
    ``lm_head_argmax``; near-ties (a few fp32 ulps apart, logits or noise) may pick the other token.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> x, wte, t, s = torch.randn(2, 8), torch.randn(50, 8), torch.tensor([0.0, 0.7]), torch.tensor([3, 4])
        >>> torch.equal(lm_head_gumbel(x, wte, t, s), reference.lm_head_gumbel(x, wte, t, s))  # doctest: +SKIP
        True
    """
    if not isinstance(temperature, torch.Tensor) or not isinstance(seeds, torch.Tensor):
        raise ValueError("temperature and seeds must be (T,) tensors (lm_head_argmax takes neither)")
    return _lm_head_choice(x, wte, temperature, seeds)


def _lm_head_choice(x, wte, temperature, seeds) -> torch.Tensor:
    """The one launch behind both: ``temperature`` and ``seeds`` None for the argmax of every row."""
    from gpt2fast.ops.triton.counters import ticket_counters

    if not isinstance(wte, torch.Tensor | Int8Weight):
        raise ValueError(f"wte must be a tensor or an Int8Weight, got {type(wte).__name__}")
    if x.dim() != 2 or len(wte.shape) != 2 or x.shape[1] != wte.shape[1]:
        raise ValueError(f"x (T, C) and wte (V, C) disagree: {tuple(x.shape)}, {tuple(wte.shape)}")
    if x.shape[1] == 0 or wte.shape[0] == 0:
        raise ValueError(f"wte {tuple(wte.shape)} must have a vocabulary and a width")
    _check_linear(x, wte, None, None)
    rows, width = x.shape
    vocab = wte.shape[0]
    if vocab > 0x7FFF0000:
        raise ValueError(f"wte has {vocab} rows: the CUDA LM head takes vocabularies below 2**31 - 2**16")
    if temperature is not None:
        _check_sampling(torch.empty((rows, 1), device=x.device),
                        {"temperature": (temperature, torch.float32), "seeds": (seeds, torch.int64)})
    out = _empty((rows,), torch.int64, x.device)  # (T,)
    if rows == 0:
        return out
    module = module_for(x.device)
    values, scales = _weight_pointers(wte)
    dtype = _dtype_code(module, x.dtype)
    if rows > LINEAR_MAX_ROWS:  # the GEMM with the choice as its epilogue: one launch, no logits
        tiles, row_tiles = module.gemm_grid(rows, vocab, dtype)  # a candidate per row per column tile
        choose, counters = module.gemm_choice, ticket_counters(x.device, row_tiles)
    else:  # the decode GEMV's fused choice: a candidate per row per block
        tiles = module.lm_head_blocks(vocab)
        choose, counters = module.lm_head_choice, ticket_counters(x.device, 1)
    part_score = _empty((tiles, rows), torch.float32, x.device)  # (tiles, T) each tile's best score per row
    part_token = _empty((tiles, rows), torch.int32, x.device)  # (tiles, T) and its token
    with _on(x.device):
        choose(x.data_ptr(), values, 0 if temperature is None else temperature.data_ptr(),
               0 if seeds is None else seeds.data_ptr(), part_score.data_ptr(), part_token.data_ptr(),
               counters.data_ptr(), out.data_ptr(), rows, vocab, width, _row_stride(x), dtype, _stream(x.device),
               w_scale=scales)  # fmt: skip
    return out


# ---- embed ----

INDEX_BYTES = {torch.int64: 8, torch.int32: 4}


def _check_embed(input_ids: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> None:
    if input_ids.dim() != 1 or positions.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and positions must be (T,), got {tuple(input_ids.shape)}, {tuple(positions.shape)}"
        )
    if input_ids.dtype not in INDEX_BYTES:
        raise ValueError(f"input_ids has dtype {input_ids.dtype}; the CUDA embed takes int64 or int32")
    if positions.dtype != input_ids.dtype:
        raise ValueError(f"positions has dtype {positions.dtype}, input_ids {input_ids.dtype}: use one index dtype")
    if wte.dim() != 2 or wpe.dim() != 2 or wte.shape[1] != wpe.shape[1]:
        raise ValueError(f"wte (V, C) and wpe (P, C) disagree: {tuple(wte.shape)}, {tuple(wpe.shape)}")
    if wte.dtype not in FLOAT_DTYPES:
        raise ValueError(f"wte has dtype {wte.dtype}; the CUDA kernels take float32, float16 or bfloat16")
    if wte.device.type not in ("cuda", "cpu"):
        raise ValueError(f"wte is on {wte.device}: the CUDA kernels take CUDA tensors (or CPU tensors, emulated)")
    if wte.shape[1] >= 2**31:
        raise ValueError(f"wte has width {wte.shape[1]}; the CUDA embed takes widths below 2**31")
    _check_operand("wpe", wpe, wte, tuple(wpe.shape), "embed")
    _check_operand("wte", wte, wte, tuple(wte.shape), "embed")
    for name, t in (("input_ids", input_ids), ("positions", positions)):
        if t.device != wte.device:
            raise ValueError(f"{name} is on {t.device}, wte on {wte.device}")
        if t.data_ptr() % t.element_size():
            raise ValueError(f"{name}'s data pointer {t.data_ptr():#x} is not aligned to its dtype")


def embed(input_ids: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor | Int8Weight,
          wpe: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Token plus position embedding ``wte[input_ids] + wpe[positions]``, added in fp32 (see ``reference.embed``).
    An ``Int8Weight`` wte's rows are dequantized on lookup (``q[id] * scale[id]``) and the sum is in wpe's dtype.

    ``input_ids``, ``positions``: ``(T,)`` int64 (or both int32), may be strided; ``wte`` ``(V, C)`` and ``wpe``
    ``(P, C)``: one float dtype, contiguous last dim. Returns a contiguous ``(T, C)`` in ``wte.dtype``. Ids are
    not checked on the host (that would sync with the GPU every step; the engine checks prompts): a token
    whose id or position is out of range gets a row of NaN, and nothing out of bounds is read.

    Example (on CPU this builds the emulated module with g++ on first use, ~20 s):
        >>> from gpt2fast.ops import reference
        >>> wte, wpe = torch.randn(10, 4), torch.randn(8, 4)
        >>> ids, pos = torch.tensor([3, 1, 3]), torch.tensor([0, 1, 2])
        >>> torch.equal(embed(ids, pos, wte, wpe), reference.embed(ids, pos, wte, wpe))  # doctest: +SKIP
        True
    """
    if isinstance(wte, Int8Weight):  # rows dequantized on lookup; the sum in wpe's dtype
        _check_embed(input_ids, positions, wpe, wpe)
        if len(wte.shape) != 2 or wte.shape[1] != wpe.shape[1]:
            raise ValueError(f"wte (V, C) and wpe (P, C) disagree: {tuple(wte.shape)}, {tuple(wpe.shape)}")
        check_int8_weight(wte, wpe, wpe.shape[1], "the CUDA kernels")
    else:
        _check_embed(input_ids, positions, wte, wpe)
    tokens, width, vocab = input_ids.shape[0], wpe.shape[1], wte.shape[0]
    out = _empty((tokens, width), wpe.dtype, wpe.device)  # (T, C)
    if tokens == 0 or width == 0:
        return out
    module = module_for(wpe.device)
    values, scales = _weight_pointers(wte)
    wte_stride = width if isinstance(wte, Int8Weight) else _row_stride(wte)
    with _on(wpe.device):
        module.embed(input_ids.data_ptr(), positions.data_ptr(), values, wpe.data_ptr(), out.data_ptr(),
                     tokens, input_ids.stride(0), positions.stride(0), INDEX_BYTES[input_ids.dtype], vocab,
                     wpe.shape[0], width, wte_stride, _row_stride(wpe), _dtype_code(module, wpe.dtype),
                     _stream(wpe.device), w_scale=scales)  # fmt: skip
    return out
