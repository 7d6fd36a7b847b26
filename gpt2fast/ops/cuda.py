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

from gpt2fast.ops import cuda_build

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
