"""The op interface: the model calls ops only through an ``Ops`` table chosen once.

Every backend provides the same functions with the signatures of ``ops/reference.py``.
``get_ops("auto" | "cpu" | "torch" | "triton" | "cuda" | "reference", device)`` picks one; an explicit
request that cannot be met raises, ``"auto"`` picks the fastest that runs: Triton on CUDA, the native
CPU kernels (``cpu``: ``ops/cpu.py`` over ``csrc/cpu``) on a CPU, else the ``torch`` backend (plain
PyTorch written for speed, ``ops/torch_native.py``). ``"reference"`` runs
the naive spec itself (what the accuracy checks compare against). ``"cuda"`` is the hand-written
CUDA C++ kernels where they apply (``cuda_ops``); on a CPU they run emulated (tests), which is
correct but slow. The env var ``GPT2FAST_BACKEND`` supplies the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt2fast.ops import reference, torch_native
from gpt2fast.quant import QUANTIZATIONS

BACKENDS = ("auto", "cpu", "torch", "triton", "cuda", "reference")


@dataclass(frozen=True)
class Ops:
    """One backend's implementation of every op (see ``ops/reference.py`` for the contracts).

    Example:
        >>> get_ops("torch", torch.device("cpu")).name
        'torch'
    """

    name: str
    embed: Callable[..., torch.Tensor]
    layer_norm: Callable[..., torch.Tensor]
    add_layer_norm: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]
    ln_linear: Callable[..., torch.Tensor]  # linear(layer_norm(x)): the decode kernels fuse the LN into the GEMV
    write_kv: Callable[..., None]
    attention: Callable[..., torch.Tensor]
    write_kv_attention: Callable[..., torch.Tensor]  # write_kv then attention: Triton's decode does both in a launch
    attention_with_probs: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # inspection only, never the hot path
    lm_head: Callable[..., torch.Tensor]
    lm_head_argmax: Callable[..., torch.Tensor]
    lm_head_gumbel: Callable[..., torch.Tensor]
    sample_top_k_top_p: Callable[..., torch.Tensor]
    # Optional: builds an object running every layer of a decode step in one call (``cpu.DecodeLayers``), or None
    decode_layers: Callable[..., Callable[..., None]] | None = None
    decode_rows: int = 0  # the most tokens a step may have for decode_layers (more: op by op)
    # Weight quantizations whose Int8Weight (gpt2fast.quant) every weight-taking op accepts; the engine refuses others.
    quantizations: tuple[str, ...] = ()
    # Optional: whether a model of this dtype should hold its int8 weights in panels (gpt2fast.quant.to_panels),
    # the layout this backend's int8 kernels stream fastest; None: always (N, K)
    int8_panels: Callable[[torch.dtype], bool] | None = None


REFERENCE = Ops(
    name="reference",
    embed=reference.embed,
    layer_norm=reference.layer_norm,
    add_layer_norm=reference.add_layer_norm,
    linear=reference.linear,
    ln_linear=reference.ln_linear,
    write_kv=reference.write_kv,
    attention=reference.attention,
    write_kv_attention=reference.write_kv_attention,
    attention_with_probs=reference.attention_with_probs,
    lm_head=reference.lm_head,
    lm_head_argmax=reference.lm_head_argmax,
    lm_head_gumbel=reference.lm_head_gumbel,
    sample_top_k_top_p=reference.sample_top_k_top_p,
    quantizations=QUANTIZATIONS,
)


# The torch backend: the reference's functions except where torch_native has a faster one.
TORCH = Ops(
    name="torch",
    embed=reference.embed,
    layer_norm=reference.layer_norm,
    add_layer_norm=reference.add_layer_norm,
    linear=torch_native.linear,
    ln_linear=torch_native.ln_linear,
    write_kv=reference.write_kv,
    attention=torch_native.attention,
    write_kv_attention=torch_native.write_kv_attention,
    attention_with_probs=reference.attention_with_probs,
    lm_head=torch_native.lm_head,
    lm_head_argmax=torch_native.lm_head_argmax,
    lm_head_gumbel=torch_native.lm_head_gumbel,
    sample_top_k_top_p=reference.sample_top_k_top_p,
    quantizations=QUANTIZATIONS,
)


def _cpu_table() -> Ops:
    from gpt2fast.ops import cpu

    return Ops(
        name="cpu",
        embed=reference.embed,
        layer_norm=reference.layer_norm,
        add_layer_norm=reference.add_layer_norm,
        linear=cpu.linear,
        ln_linear=cpu.ln_linear,
        write_kv=reference.write_kv,
        attention=torch_native.attention,
        write_kv_attention=cpu.write_kv_attention,
        attention_with_probs=reference.attention_with_probs,
        lm_head=cpu.lm_head,
        lm_head_argmax=cpu.lm_head_argmax,
        lm_head_gumbel=cpu.lm_head_gumbel,
        sample_top_k_top_p=reference.sample_top_k_top_p,
        decode_layers=cpu.decode_layers,
        decode_rows=cpu.LIBRARY_ROWS,  # larger batches: torch's GEMMs win (ops/cpu.py)
        quantizations=QUANTIZATIONS,
        int8_panels=cpu.int8_panels,
    )


# The native CPU kernels (gpt2fast/ops/cpu.py): linears, decode attention and the LM head; the rest is torch's.
CPU = _cpu_table()


def check_quantization_support(ops: Ops, quantization: str | None) -> None:
    """Raise ``ValueError`` when ``ops`` has no kernels for ``quantization`` (None: always fine).

    Example:
        >>> check_quantization_support(TORCH, "int8")
        >>> check_quantization_support(TORCH, "int4")
        Traceback (most recent call last):
        ...
        ValueError: backend 'torch' has no int4 kernels (it takes float weights or int8)
    """
    if quantization is not None and quantization not in ops.quantizations:
        takes = " or ".join(("float weights", *ops.quantizations))
        raise ValueError(f"backend {ops.name!r} has no {quantization} kernels (it takes {takes})")


def default_backend() -> str:
    """The backend named by ``GPT2FAST_BACKEND``, else ``"auto"``.

    Example:
        >>> default_backend() in BACKENDS
        True
    """
    name = os.environ.get("GPT2FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"GPT2FAST_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def get_ops(backend: str, device: torch.device) -> Ops:
    """Resolve a backend name for ``device`` to its op table.

    Example:
        >>> get_ops("torch", torch.device("cpu")).name
        'torch'
    """
    from gpt2fast.ops import cpu
    from gpt2fast.ops import triton as triton_backend

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return REFERENCE
    if backend == "cpu" or (backend == "auto" and device.type == "cpu" and cpu.available()):
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on the CPU, not {device}")
        if not cpu.available():
            raise ValueError(cpu.unavailable_reason())
        return CPU
    if backend == "torch" or (backend == "auto" and not (device.type == "cuda" and triton_backend.available())):
        return TORCH
    if backend in ("auto", "triton"):
        if not triton_backend.available():
            raise ValueError(triton_backend.unavailable_reason())
        return triton_ops()
    from gpt2fast.ops import cuda

    if device.type not in ("cuda", "cpu") or not cuda.available():
        raise ValueError(cuda.unavailable_reason() or f"backend 'cuda' runs on CUDA (or emulated on CPU), not {device}")
    return cuda_ops(device)


def triton_ops() -> Ops:
    """The Triton kernels' op table (imports triton; see ``gpt2fast.ops.triton``).

    Example:
        >>> from gpt2fast.ops import triton as t
        >>> triton_ops().name if t.available() else "triton"
        'triton'
    """
    from gpt2fast.ops.triton import attention, embed, layer_norm, linear, lm_head, write_kv

    return Ops(
        name="triton",
        embed=embed.embed,
        layer_norm=layer_norm.layer_norm,
        add_layer_norm=layer_norm.add_layer_norm,
        linear=linear.linear,
        ln_linear=linear.ln_linear,
        write_kv=write_kv.write_kv,
        attention=attention.attention,
        write_kv_attention=attention.write_kv_attention,
        attention_with_probs=attention.attention_with_probs,
        lm_head=lm_head.lm_head,
        lm_head_argmax=lm_head.lm_head_argmax,
        lm_head_gumbel=lm_head.lm_head_gumbel,
        sample_top_k_top_p=torch_native.sample_top_k_top_p,  # no Triton sampler; torch's without a sync (graphs)
        quantizations=("int8",),  # W8A16: the linears, the LM head and the embedding read int8 (N, K) + scales
        int8_panels=lambda dtype: False,
    )


def cuda_ops(device: torch.device) -> Ops:
    """The CUDA C++ kernels' op table (``gpt2fast.ops.cuda``): every op of a prefill and a decode step.

    embed, layer_norm, add_layer_norm, write_kv; linear (the decode GEMV up to ``cuda.LINEAR_MAX_ROWS`` rows,
    the tensor-core GEMM above: fp16/bf16 mma.sync, fp32 on CUDA cores); ln_linear (the GEMV with its LayerNorm
    prologue; a prefill: the LayerNorm kernel, then the GEMM); attention and write_kv_attention (decode: split-K
    over the pages, merged in the launch; prefill: flash attention on tensor cores, fp32 through the decode
    kernel per query); the LM head's logits (the GEMM, fp32 out) and token choice (a decode batch: argmax /
    Gumbel-max fused into the GEMV; more rows: into the GEMM's epilogue, the logits never stored); the
    top-k/top-p/min-p sampler. ``quantization="int8"``: the GEMV, the GEMM, the LM head and the embedding read
    int8 weights with per-channel scales (W8A16). Only ``attention_with_probs`` (inspection) is the fallback's:
    Triton on a GPU, the PyTorch ``torch`` backend on the CPU, where the CUDA kernels run emulated (tests).

    Example:
        >>> from gpt2fast.ops import cuda
        >>> cuda_ops(torch.device("cpu")).name if cuda.available() else "cuda"
        'cuda'
    """
    from gpt2fast.ops import cuda
    from gpt2fast.ops import triton as triton_backend

    fallback = triton_ops() if device.type == "cuda" and triton_backend.available() else TORCH

    def ln_linear(x, ln_weight, ln_bias, eps, weight, bias, *, gelu=False):
        if x.shape[0] <= cuda.LINEAR_MAX_ROWS:  # one launch: the GEMV with its LayerNorm prologue
            return cuda.ln_linear(x, ln_weight, ln_bias, eps, weight, bias, gelu=gelu)
        # a prefill: the LayerNorm kernel, then the GEMM
        return cuda.linear(cuda.layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu=gelu)

    def write_kv_attention(q, k, v, k_cache, v_cache, meta, scale):
        if cuda.fuses_write_kv(k, v, k_cache):  # one launch, decode or prefill
            return cuda.write_kv_attention(q, k, v, k_cache, v_cache, meta, scale)
        cuda.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return cuda.attention(q, k_cache, v_cache, meta, scale)

    return Ops(
        name="cuda",
        embed=cuda.embed,
        layer_norm=cuda.layer_norm,
        add_layer_norm=cuda.add_layer_norm,
        linear=cuda.linear,
        ln_linear=ln_linear,
        write_kv=cuda.write_kv,
        attention=cuda.attention,
        write_kv_attention=write_kv_attention,
        attention_with_probs=fallback.attention_with_probs,  # inspection: no CUDA C++ variant
        lm_head=cuda.lm_head,
        lm_head_argmax=cuda.lm_head_argmax,
        lm_head_gumbel=cuda.lm_head_gumbel,
        sample_top_k_top_p=cuda.sample_top_k_top_p,
        quantizations=("int8",),  # W8A16: every weight-taking kernel reads int8 (N, K) with per-row scales
        int8_panels=lambda dtype: False,
    )
