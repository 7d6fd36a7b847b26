"""The ``torch`` backend: plain PyTorch written for speed, same signatures as ``ops/reference.py``.

The reference is the spec and stays deliberately naive (it loops over sequences and block tables);
this module is what ``backend="torch"`` runs (on a CPU, ``auto`` too), tested against the reference
in ``tests/test_torch_native.py``. Only the ops where the naive spec costs real time differ:

* fp32 linears and the LM head as ``W @ x.T`` (weight as the left operand): BLAS then streams the
  ``(N, K)`` weight as it lies instead of repacking it as a transposed right operand. Measured on our
  CPU over GPT-2 124M's 48 projections (weights out of cache), 8 rows: 75 ms vs 112 ms for
  ``F.linear``; equal at 1 row and at 300 (a prefill); the LM head at 8 rows ~1.7x faster.

* decode attention (every sequence adds one token) over groups of sequences of similar length: one
  page gather and two batched matmuls per group instead of ~12 small ops per sequence. A group holds
  at most ``DECODE_GROUP_BYTES`` of gathered keys. Measured against the loop, one thread: 2 heads of
  16, batch 8 / 64, contexts 16-64: 4.7x / 11x faster; GPT-2's 12 heads of 64, batch 8 / 64,
  contexts 16-1000: 1.1-1.4x; batch 1 at 2x16 heads: 0.8x (20 us more). Bigger groups lose at
  GPT-2's widths (a 1.5 MB gather: 0.5x): fresh pages cost more than the saved calls.

* int8 weights (``Int8Weight``, linears and the LM head): ``int8_matmul`` converts 1 MB of weight rows at a
  time to fp32 in one reused buffer, multiplies weight-major, then scales the output rows. Median us at
  1 / 8 / 64 rows, 1 thread (``python benchmarks/bench_int8_linear.py``; the other GPT-2 shapes alike):

      (N, K)     fp32 weight (before)   int8_matmul            x @ dequantized.T        _weight_int8pack_mm
      2304x768   509 / 911 / 2631       365 / 765 / 2000       1136 / 1614 / 2595       1370 / 8711 / -
      768x3072   570 / 1115 / 2723      565 / 1200 / 3401      1492 / 2141 / 3590       1767 / 10834 / -
      50257x768  10973 / 27740 / 58867  9867 / 19270 / 40165   125787 / 163280 / 159184 30071 / 195114 / -

  Dequantizing per call makes a full fp32 copy (154 MB for the LM head: page faults each call, and RSS);
  ``_weight_int8pack_mm`` (fp32 works in torch 2.13) is a GEMV per row. 768x768 at 1 row: 154 vs fp32 94.

Everything else is the reference's function, prefill attention included (the loop over sequences).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import reference
from gpt2fast.quant import PANEL, Int8Weight, from_panels
from gpt2fast.sampling import GREEDY_BELOW, argmax_rows, gumbel_from_uniform, philox_uniform

# Rows of an int8 weight converted to fp32 at a time in ``int8_matmul``: 1 MB measured best (256 KB and 4 MB slower).
INT8_CHUNK_BYTES = 1 << 20


def int8_matmul(weight: Int8Weight, x: torch.Tensor) -> torch.Tensor:
    """``weight.dequantize() @ x.T`` as ``(q @ x.T) * scale[:, None]``: fp32 ``(N, T)`` for fp32 ``x`` ``(T, K)``.

    The int8 rows become fp32 ``INT8_CHUNK_BYTES`` at a time in one buffer that stays in cache, so no
    ``(N, K)`` fp32 copy of the weight is ever made.

    Example:
        >>> from gpt2fast.quant import quantize_int8
        >>> w, x = quantize_int8(torch.randn(5, 4)), torch.randn(3, 4)
        >>> torch.allclose(int8_matmul(w, x), w.dequantize() @ x.T, atol=1e-5)
        True
    """
    n, k = weight.shape
    rows = max(1, INT8_CHUNK_BYTES // (4 * k))
    if weight.panels:  # (the cpu backend's layout, met here by fp16 activations): whole panels per chunk
        rows = -(-rows // PANEL) * PANEL
    out = torch.empty(n, x.shape[0], device=x.device)  # (N, T)
    chunk = torch.empty(min(rows, n), k, device=x.device)  # (rows, K) fp32, reused
    for start in range(0, n, rows):
        w = chunk[: min(rows, n - start)]
        if weight.panels:
            w.copy_(from_panels(weight.data[start // PANEL : -(-(start + len(w)) // PANEL)], len(w)))
        else:
            w.copy_(weight.q[start : start + rows])
        torch.mm(w, x.t(), out=out[start : start + rows])
    return out.mul_(weight.scale[:, None])


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | Int8Weight,
    bias: torch.Tensor | None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``reference.linear`` (``x @ weight.T + bias``, tanh-GELU, ``+ residual``), weight-major in fp32 (or int8).

    Example:
        >>> x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        >>> torch.allclose(linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True), atol=1e-6)
        True
    """
    quantized = isinstance(weight, Int8Weight)
    if x.dtype != torch.float32 or (weight.dtype != torch.float32 and not quantized):
        return reference.linear(x, weight, bias, gelu=gelu, residual=residual)
    if quantized:
        y = int8_matmul(weight, x) if bias is None else int8_matmul(weight, x).add_(bias[:, None])  # (N, T)
    else:
        y = weight @ x.t() if bias is None else torch.addmm(bias[:, None], weight, x.t())  # (N, T)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        return residual.float() + y.t()  # (T, N), contiguous like residual
    return y.t().contiguous()  # (T, N)


def ln_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor | Int8Weight,
    bias: torch.Tensor | None,
    *,
    gelu: bool = False,
) -> torch.Tensor:
    """``reference.ln_linear``: the reference LayerNorm, then this module's ``linear``.

    Example:
        >>> x, g, h, w, b = torch.randn(3, 4), torch.rand(4), torch.randn(4), torch.randn(5, 4), torch.randn(5)
        >>> torch.allclose(ln_linear(x, g, h, 1e-5, w, b), reference.ln_linear(x, g, h, 1e-5, w, b), atol=1e-5)
        True
    """
    return linear(reference.layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu=gelu)


def lm_head(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``reference.lm_head``: fp32 logits ``(N, V)``, computed weight-major (``W @ x.T``) for fp32 weights.

    Example:
        >>> x, wte = torch.randn(3, 4), torch.randn(10, 4)
        >>> torch.allclose(lm_head(x, wte), reference.lm_head(x, wte), atol=1e-5)
        True
    """
    if isinstance(wte, Int8Weight):
        return int8_matmul(wte, x.float()).t().contiguous()  # (V, N) -> (N, V)
    if wte.dtype != torch.float32:
        return reference.lm_head(x, wte)
    # Weight-major GEMM (faster at few rows here); the copy to row-major is N*V floats, samplers want rows.
    return (wte @ x.float().t()).t().contiguous()  # (V, N) -> (N, V)


def lm_head_argmax(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``reference.lm_head_argmax`` (ties to the lowest id) over ``lm_head``'s logits.

    Example:
        >>> x, wte = torch.randn(3, 4), torch.randn(10, 4)
        >>> torch.equal(lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
        True
    """
    return argmax_rows(lm_head(x, wte)).to(x.device)


def lm_head_gumbel(
    x: torch.Tensor, wte: torch.Tensor | Int8Weight, temperature: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
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


def sample_top_k_top_p(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """``reference.sample_top_k_top_p`` (the same token, bit for bit) with no host sync: every row's settings stay
    tensors and every row is filtered, drawn or not, so a CUDA graph can hold it (the Triton backend's sampler).

    One descending sort per row gives the top-k floor (the k-th value) and the top-p floor of the top-k
    survivors (masking below a floor keeps the sorted order); min-p's floor is ``max + log(min_p)``, ``-inf``
    when off. Costs a full sort of every row, so on a CPU, where a sync is free, the reference is faster.

    Example:
        >>> logits, seeds = torch.randn(3, 50), torch.tensor([5, 6, 7])
        >>> t, k = torch.tensor([0.0, 0.8, 1.2]), torch.tensor([0, 10, 0], dtype=torch.int32)
        >>> p, m = torch.tensor([1.0, 0.9, 0.5]), torch.tensor([0.0, 0.0, 0.1])
        >>> args = (logits, t, k, p, seeds, m)
        >>> torch.equal(sample_top_k_top_p(*args), reference.sample_top_k_top_p(*args))
        True
    """
    vocab = logits.shape[-1]
    greedy = (temperature < GREEDY_BELOW) | (top_k == 1)  # (B,)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # (B, V)
    ranked = torch.sort(scaled, dim=-1, descending=True).values  # (B, V)
    kth = ranked.gather(1, (top_k.long() - 1).clamp(0, vocab - 1)[:, None])  # (B, 1)
    floor = kth.masked_fill(((top_k <= 0) | (top_k >= vocab))[:, None], -math.inf)  # (B, 1)
    survivors = ranked.masked_fill(ranked < floor, -math.inf)  # (B, V), still sorted
    probs = torch.softmax(survivors, dim=-1)  # (B, V)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V)
    num_kept = (mass_before < top_p[:, None]).sum(dim=-1, keepdim=True).clamp_min_(1)  # (B, 1)
    nucleus = (top_p < 1)[:, None]  # (B, 1)
    floor = torch.where(nucleus, torch.maximum(floor, survivors.gather(1, num_kept - 1)), floor)
    if min_p is not None:  # log(0) = -inf: rows without min-p keep their floor
        floor = torch.maximum(floor, scaled.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None])
    filtered = scaled.masked_fill_(scaled < floor, -math.inf)  # (B, V)
    noise = gumbel_from_uniform(philox_uniform(seeds, vocab))  # (B, V)
    drawn = argmax_rows(noise.add_(filtered)).to(logits.device)  # (B,)
    return torch.where(greedy, argmax_rows(logits).to(logits.device), drawn)


# Gathered keys per decode-attention group (values as many again): 64 KB-256 KB measured best here.
DECODE_GROUP_BYTES = 256 << 10


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float) -> torch.Tensor:
    """``reference.attention``; decode-only steps go through ``decode_groups`` batched by length.

    Example:
        >>> kc = torch.randn(6, 2, 4, 8); vc = torch.randn_like(kc)
        >>> meta = AttentionMetadata.build([[0, 1], [2], [3, 4, 5]], [7, 3, 10], [1, 1, 1], block_size=4)
        >>> q = torch.randn(3, 2, 8)
        >>> torch.allclose(attention(q, kc, vc, meta, 0.3), reference.attention(q, kc, vc, meta, 0.3), atol=1e-6)
        True
    """
    if meta.max_query_len != 1 or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return reference.attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)  # (T, H, D); rows no sequence owns (the static runner's padding) stay unset
    first_rows = meta.cu_seqlens_q.tolist()
    lens = meta.seq_lens.tolist()
    seqs = [b for b in range(len(lens)) if first_rows[b + 1] > first_rows[b] and lens[b] > 0]
    for group in decode_groups(seqs, lens, bytes_per_token=k_cache[0, :, 0].numel() * 4):
        rows = torch.tensor([first_rows[b] for b in group], device=q.device)  # (G,)
        out.index_copy_(0, rows, _decode_group(q.index_select(0, rows), k_cache, v_cache,
                                               meta.block_tables[group], [lens[b] for b in group], scale))
    return out


def write_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """``reference.write_kv`` then :func:`attention`: the composition (``reference.write_kv_attention``).

    Example:
        >>> kc = torch.randn(3, 2, 4, 8); vc = torch.randn_like(kc); kc2, vc2 = kc.clone(), vc.clone()
        >>> meta = AttentionMetadata.build([[0, 1], [2]], [6, 3], [1, 1], block_size=4)
        >>> q, k, v = torch.randn(3, 2, 2, 8).unbind(0)
        >>> out = write_kv_attention(q, k, v, kc, vc, meta, 0.3)
        >>> expected = reference.write_kv_attention(q, k, v, kc2, vc2, meta, 0.3)
        >>> torch.allclose(out, expected, atol=1e-6), torch.equal(kc, kc2)
        (True, True)
    """
    reference.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attention(q, k_cache, v_cache, meta, scale)


def decode_groups(seqs: list[int], lens: list[int], bytes_per_token: int) -> list[list[int]]:
    """``seqs`` sorted by context length and cut into runs whose padded keys fit ``DECODE_GROUP_BYTES``.

    Example:
        >>> decode_groups([0, 1, 2, 3], [30, 20, 25, 500], bytes_per_token=3072)
        [[1, 2], [0], [3]]
    """
    groups: list[list[int]] = []
    for b in sorted(seqs, key=lens.__getitem__):
        # Sorted, so b is the longest of its group: the group pads to lens[b].
        if groups and (len(groups[-1]) + 1) * lens[b] * bytes_per_token <= DECODE_GROUP_BYTES:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                  lens: list[int], scale: float) -> torch.Tensor:
    """One query per sequence, ``q`` (G, H, D), over keys padded to the group's longest context."""
    num_seqs, (n_head, block_size, head_dim) = len(lens), k_cache.shape[1:]
    num_blocks = -(-max(lens) // block_size)
    blocks = tables[:, :num_blocks].long().clamp_min(0).flatten()  # (G * nb,); -1 padding reads block 0, masked
    shape = (num_seqs, num_blocks, n_head, block_size, head_dim)
    k = k_cache.index_select(0, blocks).view(shape).transpose(1, 2).reshape(num_seqs, n_head, -1, head_dim)
    v = v_cache.index_select(0, blocks).view(shape).transpose(1, 2).reshape(num_seqs, n_head, -1, head_dim)
    scores = torch.matmul(q[:, :, None, :], k.transpose(-1, -2)).mul_(scale)  # (G, H, 1, L)
    positions = torch.arange(k.shape[2], device=q.device)  # (L,)
    beyond = positions[None, :] >= torch.tensor(lens, device=q.device)[:, None]  # (G, L)
    probs = torch.softmax(scores.masked_fill_(beyond[:, None, None, :], float("-inf")), dim=-1)
    v.masked_fill_(beyond[:, None, :, None], 0.0)  # slots past a context may hold anything: 0 * NaN is NaN
    return torch.matmul(probs, v).view(num_seqs, n_head, head_dim)  # (G, H, D)

