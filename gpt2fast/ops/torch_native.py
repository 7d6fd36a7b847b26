"""The ``torch`` backend: plain PyTorch written for speed, same signatures as ``ops/reference.py``.

The reference is the spec and stays deliberately naive (it loops over sequences and block tables);
this module is what ``backend="torch"`` runs (on a CPU, ``auto`` too), tested against the reference
in ``tests/test_torch_native.py``. Only the ops where the naive spec costs real time differ:

* fp32 linears and the LM head as ``W @ x.T`` (weight as the left operand): BLAS then streams the
  ``(N, K)`` weight as it lies instead of repacking it as a transposed right operand. Measured on our
  CPU over GPT-2 124M's 48 projections (weights out of cache), 8 rows: 75 ms vs 112 ms for
  ``F.linear``; equal at 1 row and at 300 (a prefill); the LM head at 8 rows ~1.7x faster.

Everything else is the reference's function. Its decode attention (a loop over sequences) stays: a
batched version (one page gather, one ``scaled_dot_product_attention``, or page-wise ``matmul``s)
measured 5-10% slower per decode step at batch 1 and 8, contexts 16-250, on our 2-core CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.ops import reference
from gpt2fast.sampling import GREEDY_BELOW, argmax_rows, gumbel_from_uniform, philox_uniform


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``reference.linear`` (``x @ weight.T + bias``, tanh-GELU, ``+ residual``), weight-major in fp32.

    Example:
        >>> x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        >>> torch.allclose(linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True), atol=1e-6)
        True
    """
    if weight.dtype != torch.float32 or x.dtype != torch.float32:
        return reference.linear(x, weight, bias, gelu=gelu, residual=residual)
    y = weight @ x.t() if bias is None else torch.addmm(bias[:, None], weight, x.t())  # (N, T)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        return residual.float() + y.t()  # (T, N), contiguous like residual
    return y.t().contiguous()  # (T, N)


def lm_head(x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
    """``reference.lm_head``: fp32 logits ``(N, V)``, computed weight-major (``W @ x.T``) for fp32 weights.

    Example:
        >>> x, wte = torch.randn(3, 4), torch.randn(10, 4)
        >>> torch.allclose(lm_head(x, wte), reference.lm_head(x, wte), atol=1e-5)
        True
    """
    if wte.dtype != torch.float32:
        return reference.lm_head(x, wte)
    # Weight-major GEMM (faster at few rows here); the copy to row-major is N*V floats, samplers want rows.
    return (wte @ x.float().t()).t().contiguous()  # (V, N) -> (N, V)


def lm_head_argmax(x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
    """``reference.lm_head_argmax`` (ties to the lowest id) over ``lm_head``'s logits.

    Example:
        >>> x, wte = torch.randn(3, 4), torch.randn(10, 4)
        >>> torch.equal(lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
        True
    """
    return argmax_rows(lm_head(x, wte)).to(x.device)


def lm_head_gumbel(x: torch.Tensor, wte: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """``reference.lm_head_gumbel`` with the logits computed once (the spec recomputes them for greedy rows).

    Example:
        >>> x, wte = torch.randn(2, 4), torch.randn(9, 4)
        >>> t, s = torch.tensor([0.0, 0.7]), torch.tensor([11, 12])
        >>> torch.equal(lm_head_gumbel(x, wte, t, s), reference.lm_head_gumbel(x, wte, t, s))
        True
    """
    logits = lm_head(x, wte)  # (N, V)
    chosen = argmax_rows(logits).to(x.device)  # (N,): the greedy rows' answer
    sampled = (temperature >= GREEDY_BELOW).nonzero().flatten()  # (S,)
    if sampled.numel():  # Philox noise over the vocabulary costs ~3 ms a row on a CPU: only rows that draw
        rows = logits.index_select(0, sampled) / temperature.index_select(0, sampled)[:, None]  # (S, V)
        noise = gumbel_from_uniform(philox_uniform(seeds.index_select(0, sampled), logits.shape[-1]))  # (S, V)
        chosen = chosen.index_copy(0, sampled, argmax_rows(noise.add_(rows)).to(x.device))
    return chosen
