"""Triton backend: one op per module (``_<op>_kernel`` then its launcher), same signatures as ``ops/reference.py``.

The kernels run on a CUDA GPU, or on CPU tensors under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before triton was first imported (Triton reads it when
``@triton.jit`` decorates a kernel). Importing this package imports nothing heavy: the op modules
import triton themselves, and ``available()`` imports it only when asked.

Every kernel module also lists ``COMPILE_VARIANTS``: each configuration its launcher can launch, so
``aot.py`` compiles for sm_80/sm_90 exactly what runs. Two modules hold no kernels: ``aot`` and
``counters`` (the zeroed int32 ticket counters with which the decode linear and the decode attention
merge their split-K partials inside the same launch).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

UNAVAILABLE = (
    "backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported "
    "to run its kernels on CPU"
)


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the CPU interpreter.

    Example:
        >>> isinstance(interpreting(), bool)
        True
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch: a CUDA GPU of compute capability
    9.0 or newer (Hopper), not the interpreter, and ``GPT2FAST_PDL`` not ``0``. A PDL kernel's programs start while
    the previous kernel finishes and wait (``gdc_wait``) before they read anything an earlier kernel wrote.

    Example:
        >>> import torch
        >>> pdl_enabled(torch.device("cpu"))
        False
    """
    if device.type != "cuda" or interpreting() or os.environ.get("GPT2FAST_PDL", "1") == "0":
        return False
    return _capability(device.index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    """The compute capability of CUDA device ``index`` (None: the current one), asked once per device."""
    import torch

    return torch.cuda.get_device_capability(index)


def available() -> bool:
    """True when the Triton kernels can run here: CUDA is present, or the interpreter is on and triton imports.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    if torch.cuda.is_available():
        return True
    if not interpreting():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason() -> str:
    """Why ``available()`` is False (empty when it is True), for the error an explicit ``backend='triton'`` raises.

    Example:
        >>> available() or "CUDA GPU" in unavailable_reason()
        True
    """
    if available():
        return ""
    if importlib.util.find_spec("triton") is None:
        return UNAVAILABLE + " (and triton is not installed: pip install triton)"
    return UNAVAILABLE


def default_device() -> str:
    """Where the kernels run: ``"cuda"`` with a GPU, else ``"cpu"`` (the interpreter takes CPU tensors).

    Example:
        >>> default_device() in ("cuda", "cpu")
        True
    """
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def weight_operands(weight, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(values, scales, w_int8)`` a kernel takes for ``weight``: an ``Int8Weight``'s int8 ``(N, k)`` values and fp32
    scales (checked: ``quant.check_int8_weight``), or a float weight and itself again (a valid pointer, unread).

    Example:
        >>> import torch
        >>> from gpt2fast.quant import quantize_int8
        >>> w = quantize_int8(torch.randn(3, 4))
        >>> q, scale, w_int8 = weight_operands(w, torch.randn(2, 4), 4)
        >>> q.dtype, scale.dtype, w_int8
        (torch.int8, torch.float32, True)
    """
    from gpt2fast.quant import Int8Weight, check_int8_weight

    if isinstance(weight, Int8Weight):
        check_int8_weight(weight, x, k, "the Triton kernels")
        return weight.data, weight.scale, True
    return weight, weight, False


# torch dtype name -> Triton signature element type; the dtypes our kernels are compiled for.
FLOAT_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
INDEX_TYPES = {"int32": "i32", "int64": "i64"}


def element_type(dtype, allowed: dict[str, str], what: str) -> str:
    """The Triton element type of a torch dtype (``torch.float16`` -> ``"fp16"``); ValueError if not ``allowed``.

    Example:
        >>> import torch
        >>> element_type(torch.bfloat16, FLOAT_TYPES, "x")
        'bf16'
    """
    name = str(dtype).removeprefix("torch.")
    if name not in allowed:
        raise ValueError(f"{what} has dtype {name}; the triton kernels take {', '.join(allowed)}")
    return allowed[name]


def block_for_width(width: int) -> int:
    """Chunk size of a row loop: the largest of 1024/512/256/128 that pads ``width`` by at most 1/8.

    GPT-2 widths run unpadded or nearly (768 -> 3 x 256, 1024 -> 1 x 1024, 1280 -> 5 x 256,
    1600 -> 7 x 256 = 12% pad) instead of the next power of two (2048 for 1600: 28% idle lanes).

    Example:
        >>> [block_for_width(w) for w in (3, 96, 768, 1024, 1280, 1600)]
        [128, 128, 256, 1024, 256, 256]
    """
    for block in ROW_BLOCKS[::-1]:
        if -(-width // block) * block - width <= width // 8:
            return block
    return ROW_BLOCKS[0]


ROW_BLOCKS = (128, 256, 512, 1024)  # every chunk size block_for_width can choose


def warps_for_block(block: int) -> int:
    """Warps per row program: 4 elements per thread (one 8-byte fp16 / 16-byte fp32 vector).

    Example:
        >>> [warps_for_block(b) for b in ROW_BLOCKS]
        [1, 2, 4, 8]
    """
    return max(1, block // 128)
