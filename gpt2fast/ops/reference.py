"""The executable spec of every op: plain PyTorch, math in fp32, one cast when storing.

Every backend (``ops/triton``, ``ops/cuda.py``) implements these functions with the same
signatures and is tested against them. Shapes use T = tokens in the flat batch, C = n_embd,
H = heads, D = head_dim, V = vocab, NB = cache blocks, BS = block size.

Weights of linear layers are stored ``(out_features, in_features)`` like ``torch.nn.Linear``, so the
LM head (the token embedding, ``(V, C)``) is just another linear without bias.

Int8 weights (``gpt2fast.quant``): wherever an op takes a weight (``linear``/``ln_linear``'s ``weight``,
``embed``'s and the LM heads' ``wte``) it also takes an ``Int8Weight``, and the op on it is defined as
"dequantize to fp32, then the same op": ``op(..., w) == op(..., w.dequantize())``, except that ``embed``
returns ``wpe``'s dtype (the model dtype; an ``Int8Weight`` has no float dtype of its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.quant import Int8Weight
from gpt2fast.sampling import (
    GREEDY_BELOW,
    argmax_rows,
    filter_logits_by,
    gumbel_from_uniform,
    gumbel_max_draw_seeded,
    philox_uniform,
)


def dense(weight: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``weight`` itself, or an ``Int8Weight`` dequantized to fp32: what every op on an int8 weight computes with.

    Example:
        >>> from gpt2fast.quant import quantize_int8
        >>> dense(quantize_int8(torch.tensor([[127.0, -2.0]]))).tolist()  # scale 1
        [[127.0, -2.0]]
    """
    return weight.dequantize() if isinstance(weight, Int8Weight) else weight


def embed(input_ids: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor | Int8Weight,
          wpe: torch.Tensor) -> torch.Tensor:
    """Token plus position embedding: ``wte[input_ids] + wpe[positions]``, in ``wte``'s dtype (int8: ``wpe``'s).

    Example:
        >>> wte, wpe = torch.randn(10, 4), torch.randn(8, 4)
        >>> embed(torch.tensor([3, 1]), torch.tensor([0, 1]), wte, wpe).shape
        torch.Size([2, 4])
    """
    if isinstance(wte, Int8Weight):  # dequantize the rows it reads: the same values as dense(wte)[input_ids]
        return (wte.rows(input_ids) + wpe[positions].float()).to(wpe.dtype)  # (T, C)
    out = wte[input_ids].float() + wpe[positions].float()  # (T, C)
    return out.to(wte.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 statistics.

    Example:
        >>> y = layer_norm(torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-5)
        >>> bool(y.mean(-1).abs().max() < 1e-6)
        True
    """
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` (in place), then return ``LayerNorm(residual)``.

    This is the pre-LN block boundary: the sub-block's output joins the residual stream and the
    next sub-block reads its normalised value.

    Example:
        >>> res = torch.randn(2, 6); x = torch.randn(2, 6); expected = res + x
        >>> y = add_layer_norm(x, res, torch.ones(6), torch.zeros(6), 1e-5)
        >>> torch.equal(res, expected)
        True
    """
    summed = residual.float() + x.float()  # (T, C)
    residual.copy_(summed)
    y = F.layer_norm(residual.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | Int8Weight,
    bias: torch.Tensor | None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``, then optionally tanh-GELU, then optionally ``+ residual``.

    ``weight`` is ``(N, K)`` (an ``Int8Weight`` is dequantized first); ``x`` is ``(T, K)``; the result is
    ``(T, N)`` in ``x.dtype``.

    Example:
        >>> x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        >>> torch.allclose(linear(x, w, b), x @ w.T + b, atol=1e-6)
        True
    """
    y = F.linear(x.float(), dense(weight).float(), None if bias is None else bias.float())  # (T, N)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


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
    """``linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu=gelu)``: a pre-LN sub-block's input.

    The composition is the definition: LayerNorm statistics in fp32, the normalised row cast to
    ``x.dtype`` (as ``layer_norm`` returns it), then the GEMM with fp32 accumulation. ``x``: ``(T, K)``;
    ``ln_weight``, ``ln_bias``: ``(K,)``; ``weight``: ``(N, K)``; returns ``(T, N)`` in ``x.dtype``.

    Example:
        >>> x, g, h, w, b = torch.randn(3, 4), torch.rand(4), torch.randn(4), torch.randn(5, 4), torch.randn(5)
        >>> torch.equal(ln_linear(x, g, h, 1e-5, w, b), linear(layer_norm(x, g, h, 1e-5), w, b))
        True
    """
    return linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu=gelu)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's key and value into its cache slot; slot ``-1`` marks padding, skipped.

    ``k``, ``v``: ``(T, H, D)``; caches: ``(NB, H, BS, D)``; ``slot = block * BS + offset``.

    Example:
        >>> kc = torch.zeros(2, 1, 4, 2); vc = torch.zeros_like(kc)
        >>> write_kv(torch.ones(2, 1, 2), torch.ones(2, 1, 2), kc, vc, torch.tensor([5, -1]))
        >>> kc[1, 0, 1].tolist(), float(kc.sum())
        ([1.0, 1.0], 2.0)
    """
    block_size = k_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = k[valid].to(k_cache.dtype)  # (n, H, D)
    v_cache[blocks, :, offsets] = v[valid].to(v_cache.dtype)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of every query in the flat batch over its sequence's paged cache.

    Sequence ``b`` owns queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, the last ones of its
    ``seq_lens[b]`` context tokens, whose keys/values are already in the cache (``write_kv``
    runs first). Query ``i`` of ``n`` sits at context position ``seq_lens[b] - n + i`` and sees
    positions ``0..`` that one. Deliberately naive: one sequence at a time, gathering its blocks
    through the block table.

    ``q``: ``(T, H, D)``; returns ``(T, H, D)`` in ``q.dtype``.

    Example:
        >>> kc = torch.randn(4, 2, 16, 8); vc = torch.randn_like(kc)
        >>> meta = AttentionMetadata.build([[0, 1]], [16], [3], block_size=16)
        >>> attention(torch.randn(3, 2, 8), kc, vc, meta, 8**-0.5).shape
        torch.Size([3, 2, 8])
    """
    n_head, block_size, head_dim = k_cache.shape[1:]
    out = torch.empty_like(q)
    cu_seqlens = meta.cu_seqlens_q.tolist()
    for b, context_len in enumerate(meta.seq_lens.tolist()):
        start, end = cu_seqlens[b], cu_seqlens[b + 1]
        num_q = end - start
        if num_q == 0:
            continue
        num_blocks = -(-context_len // block_size)
        blocks = meta.block_tables[b, :num_blocks].long()
        k = k_cache[blocks].transpose(0, 1).reshape(n_head, -1, head_dim)[:, :context_len].float()  # (H, L, D)
        v = v_cache[blocks].transpose(0, 1).reshape(n_head, -1, head_dim)[:, :context_len].float()  # (H, L, D)
        qb = q[start:end].float().transpose(0, 1)  # (H, n, D)
        scores = (qb @ k.transpose(1, 2)) * scale  # (H, n, L)
        q_pos = torch.arange(context_len - num_q, context_len, device=q.device)
        future = torch.arange(context_len, device=q.device)[None, :] > q_pos[:, None]  # (n, L)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        out[start:end] = (probs @ v).transpose(0, 1).to(q.dtype)  # (n, H, D)
    return out


def write_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """:func:`write_kv` of this step's ``k``, ``v`` at ``meta.slot_mapping``, then :func:`attention`: the definition.

    One op so a backend may do both in one launch (Triton's decode kernel stores each sequence's new k/v
    and attends with them). ``q``, ``k``, ``v``: ``(T, H, D)``; caches ``(NB, H, BS, D)``, updated in
    place; returns ``(T, H, D)`` in ``q.dtype``.

    Example:
        >>> kc = torch.randn(4, 2, 16, 8); vc = torch.randn_like(kc)
        >>> meta = AttentionMetadata.build([[0, 1]], [17], [1], block_size=16)
        >>> q, k, v = torch.randn(3, 1, 2, 8).unbind(0)
        >>> out = write_kv_attention(q, k, v, kc, vc, meta, 8**-0.5)
        >>> out.shape, torch.equal(kc[1, :, 0], k[0])
        (torch.Size([1, 2, 8]), True)
    """
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attention(q, k_cache, v_cache, meta, scale)


def attention_with_probs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` that also returns the softmax probabilities, for inspection.

    Returns ``(out, probs)``: ``out`` ``(T, H, D)`` in ``q.dtype`` as :func:`attention` computes it;
    ``probs`` a padded fp32 tensor ``(B, H, meta.max_query_len, meta.max_seq_len)`` where
    ``probs[b, h, i, j]`` is the weight query ``i`` of sequence ``b`` gives context position ``j``;
    zero above the causal diagonal, for ``i >= query_len[b]`` and for ``j >= seq_lens[b]``.

    Example:
        >>> kc = torch.randn(2, 1, 16, 8); vc = torch.randn_like(kc)
        >>> meta = AttentionMetadata.build([[1]], [4], [2], block_size=16)
        >>> out, probs = attention_with_probs(torch.randn(2, 1, 8), kc, vc, meta, 8**-0.5)
        >>> tuple(probs.shape), probs.sum(-1).round(decimals=4).tolist(), float(probs[0, 0, 0, 3])
        ((1, 1, 2, 4), [[[1.0, 1.0]]], 0.0)
    """
    n_head, block_size, head_dim = k_cache.shape[1:]
    out = torch.empty_like(q)  # (T, H, D)
    probs = torch.zeros(meta.num_seqs, n_head, meta.max_query_len, meta.max_seq_len, dtype=torch.float32,
                        device=q.device)  # (B, H, max_q, max_L)
    cu_seqlens = meta.cu_seqlens_q.tolist()
    for b, context_len in enumerate(meta.seq_lens.tolist()):
        start, end = cu_seqlens[b], cu_seqlens[b + 1]
        num_q = end - start
        if num_q == 0:
            continue
        num_blocks = -(-context_len // block_size)
        blocks = meta.block_tables[b, :num_blocks].long()
        k = k_cache[blocks].transpose(0, 1).reshape(n_head, -1, head_dim)[:, :context_len].float()  # (H, L, D)
        v = v_cache[blocks].transpose(0, 1).reshape(n_head, -1, head_dim)[:, :context_len].float()  # (H, L, D)
        qb = q[start:end].float().transpose(0, 1)  # (H, n, D)
        scores = (qb @ k.transpose(1, 2)) * scale  # (H, n, L)
        q_pos = torch.arange(context_len - num_q, context_len, device=q.device)
        future = torch.arange(context_len, device=q.device)[None, :] > q_pos[:, None]  # (n, L)
        p = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # (H, n, L), exactly 0 where masked
        probs[b, :, :num_q, :context_len] = p
        out[start:end] = (p @ v).transpose(0, 1).to(q.dtype)  # (n, H, D)
    return out, probs


def lm_head(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """Vocabulary projection with the tied token embedding (an ``Int8Weight`` dequantized); fp32 logits ``(N, V)``.

    Example:
        >>> lm_head(torch.randn(2, 4), torch.randn(10, 4)).shape
        torch.Size([2, 10])
    """
    return F.linear(x.float(), dense(wte).float())


def lm_head_argmax(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """Greedy token ids ``argmax(lm_head(x, wte), -1)``: (N,) int64, ties to the lowest id.

    Backends fuse this into the LM head so the (N, V) logits are never written.

    Example:
        >>> wte = torch.eye(3)[[0, 1, 1]]  # ids 1 and 2 tie
        >>> lm_head_argmax(torch.tensor([[0.0, 1.0, 0.0]]), wte).tolist()
        [1]
    """
    return argmax_rows(lm_head(x, wte)).to(x.device)


def lm_head_gumbel(
    x: torch.Tensor, wte: torch.Tensor | Int8Weight, temperature: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """One token per row from ``softmax(lm_head(x, wte) / T)`` by Gumbel-max: (N,) int64.

    ``temperature``: (N,) fp32, rows below ``sampling.GREEDY_BELOW`` take the argmax; ``seeds``: (N,)
    int64 Philox row seeds (``sampling.row_seed``). The noise of token ``v`` is
    ``-log(-log(tl.rand(seed, v)))`` (``sampling.philox_uniform``), so a row draws what
    ``sampling.sample_batch`` draws for a temperature-only row with that seed.

    Example:
        >>> x, wte = torch.randn(2, 4), torch.randn(9, 4)
        >>> ids = lm_head_gumbel(x, wte, torch.tensor([0.0, 0.7]), torch.tensor([11, 12]))
        >>> ids[0] == lm_head_argmax(x[:1], wte)[0]
        tensor(True)
    """
    logits = lm_head(x, wte)  # (N, V)
    greedy = temperature < GREEDY_BELOW  # (N,)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # (N, V)
    noise = gumbel_from_uniform(philox_uniform(seeds, logits.shape[-1]))  # (N, V)
    drawn = argmax_rows(noise.add_(scaled)).to(x.device)  # (N,)
    return torch.where(greedy, lm_head_argmax(x, wte), drawn)


def sample_top_k_top_p(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of fp32 ``logits`` (B, V): temperature, top-k, top-p (of the top-k survivors),
    min-p, then a Gumbel-max draw with the Philox noise of ``seeds`` (``sampling.row_seed``): (B,) int64.

    Per row (B,): ``temperature`` fp32 (below ``GREEDY_BELOW``, or ``top_k == 1``: the argmax),
    ``top_k`` int32 (<= 0: off), ``top_p`` fp32 (1: off), ``min_p`` fp32 or None (0: off). What
    ``sampling.sample_batch`` draws for rows without penalties or logprobs.

    Example:
        >>> logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
        >>> sample_top_k_top_p(logits, torch.tensor([1.0]), torch.tensor([2], dtype=torch.int32),
        ...                    torch.tensor([1.0]), torch.tensor([42])).item() in (1, 2)
        True
    """
    temps, ks, ps = temperature.tolist(), top_k.tolist(), top_p.tolist()
    mins = min_p.tolist() if min_p is not None else [0.0] * len(temps)
    token_ids = argmax_rows(logits).to(logits.device)  # (B,)
    drawn = [b for b, (t, k) in enumerate(zip(temps, ks)) if t >= GREEDY_BELOW and k != 1]
    if drawn:
        idx = torch.tensor(drawn, device=logits.device)
        filtered = filter_logits_by(logits[idx].float(), [temps[b] for b in drawn], [ks[b] for b in drawn],
                                    [ps[b] for b in drawn], [mins[b] for b in drawn])  # (R, V)
        token_ids[idx] = gumbel_max_draw_seeded(filtered, seeds[idx]).to(logits.device)
    return token_ids
