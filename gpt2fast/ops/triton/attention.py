"""Causal attention over the paged KV cache in Triton: varlen flash prefill, split-K decode, probs.

Same contract as :func:`gpt2fast.ops.reference.attention`: the keys/values of this step's tokens
are already in the cache (``write_kv`` ran first); query ``i`` of ``n`` of sequence ``b`` sits at
context position ``seq_lens[b] - n + i`` and sees positions ``0..`` that one.

Three kernels, picked by :func:`attention` from the host-side ``meta.max_query_len``:

* ``_attention_prefill_kernel`` (any step with a sequence of more than one query: prefill,
  chunked prefill, prefix-cache hits, mixed prefill+decode). Grid
  ``(num_seqs * cdiv(max_query_len, BLOCK_M), H)``: program ``(s * tiles + t, h)`` owns query
  rows ``[t * BLOCK_M, (t + 1) * BLOCK_M)`` of sequence ``s`` and returns at once when the
  sequence has fewer rows. It walks the context in key tiles of ``BLOCK_N`` positions, gathering
  each position's page id from the block table (a tile may span several pages), stopping at the
  tile's last causal position. ``tl.dot`` for QK^T and PV, online softmax in fp32 (exp2 with
  ``scale * log2(e)`` folded in), one cast at the store.
* ``_attention_decode_kernel`` (every sequence has at most one query: ``max_query_len == 1``).
  Flash-decoding in one launch: grid ``(num_seqs, H, num_splits)``; split ``s`` covers context
  positions ``[s * split_len, (s + 1) * split_len)`` with ``split_len = pages_per_split *
  block_size``. With more than one split each program writes its partial (max, sum, acc) to an
  fp32 workspace -- a split past the sequence's end writes the neutral partial (-inf, 0, 0) -- and
  draws a ticket (``tl.atomic_add``, acq_rel, gpu scope) on its (sequence, head)'s int32 counter
  (:mod:`gpt2fast.ops.triton.counters`). The split that draws the last ticket, whichever it is,
  rescales and sums the partials in the fixed order 0..S-1 (16 per loop step; the same bits every
  run), stores the output and puts the counter back to 0; the kernel's comments give the
  memory-ordering argument. With one split it normalises and stores its own output: no workspace,
  no ticket. A sequence without a query this step returns at once. With one query the scores are
  a GEMV, so it uses broadcast-multiply-reduce in fp32 rather than ``tl.dot`` (no M >= 16 tile).
  With ``WRITE_KV`` (:func:`write_kv_attention`, the model's decode path) it is also ``write_kv``: the one
  program of each (sequence, head) whose split holds the sequence's newest position stores this step's k/v
  there and folds that position in from registers; every split's cache loop stops short of it, so no program
  reads a slot this launch writes (the kernel's comments give the argument). A decode layer is then 5 launches.
* ``_attention_probs_kernel`` (:func:`attention_with_probs`, for inspection, not speed): the
  prefill tiling done twice, a first pass for the row max and sum, a second that writes the
  normalised probabilities and accumulates the output.

**Split rule (graph-safe).** ``num_splits = clamp(cdiv(2 * 132, num_seqs * H), 1, max_blocks)``
and ``pages_per_split = cdiv(max_blocks, num_splits)`` (then ``num_splits`` is recomputed as
``cdiv(max_blocks, pages_per_split)`` so no split is empty for every sequence), where
``max_blocks`` is the width of ``block_tables``. Both depend only on tensor shapes (batch size,
heads, table width), never on this step's lengths, so a CUDA graph captured for a batch-size
bucket replays with any lengths: the engine pads every ``block_tables`` to the fixed width
``n_positions / block_size`` (64 for GPT-2 at block 16; ``AttentionMetadata.build(max_blocks=)``).
``2 * 132`` asks for two waves of programs on an H100's 132 SMs, so one sequence at GPT-2 124M
(12 heads, 64-page tables) runs 22 splits of 3 pages; from 22 sequences up the batch alone fills
the GPU, there is one split and no merge step.

**Napkin math (decode, GPT-2 124M: 12 heads x 64, fp16, 64-page tables at block 16; one layer).**
Bytes = K and V of every context token (``2 * B * L * 12 * 64 * 2``) + q and out + tables + fp32
partials written and read back (``2 * B * 12 * splits * 66 * 4``, only when splits > 1). At the
H100's 3.35 TB/s:

==========  =======  ==========  ==========  ========  ==========
batch       context  splits      KV bytes    total     roofline
==========  =======  ==========  ==========  ========  ==========
1           128      22 (3 pg)   0.39 MB     0.54 MB   0.16 us
1           1024     22 (3 pg)   3.15 MB     3.29 MB   0.98 us
64          128      1           25.2 MB     25.4 MB   7.6 us
64          1024     1           201.3 MB    201.5 MB  60.2 us
==========  =======  ==========  ==========  ========  ==========

At batch 1 the floor is far below one launch's latency (a few us): splits there buy parallelism,
not bandwidth, and the 139 KB of partials (written and read back within the launch, in L2) is the
price of a grid fixed by shapes. The merge runs inside the same launch (in the last split of each
sequence and head), so splitting costs no second launch.

**tl.dot precision.** For fp16/bf16 the prefill operands stay in their storage dtype and the
dot accumulates in fp32 (tensor cores, exact products); P is cast to the value dtype for PV, as
in every flash attention (relative error 2^-11 (fp16) / 2^-8 (bf16) on P, inside the stated
tolerances). For fp32 caches the tiles go through ``input_precision="ieee"``: the GPU default
TF32 rounds operands to 10 mantissa bits (~1e-3 relative), which would break the fp32 ~1e-5
contract; fp32 is the CPU/test dtype, not the GPU serving dtype, so accuracy wins over speed.
(``input_precision`` is ignored for 16-bit operands.) The interpreter's bf16 ``tl.dot`` is wrong,
so under ``TRITON_INTERPRET=1`` bf16 prefill tiles are upcast to fp32 (the ``DOT_FP32`` switch);
the bf16 tensor-core path is therefore proven only by compiling it and by the ``gpu`` tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops.triton.counters import ticket_counters

_NUM_SMS = 132  # H100 SXM; the split rule aims at two waves of programs on it
# Prefill query rows per program; fp32 tiles (FMA dots, no tensor cores) spill at 64 on sm_80/sm_90.
_BLOCK_M = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
_BLOCK_N = 32  # key positions per inner-loop tile, gathered through the block table (max(_BLOCK_N, block_size))
_NUM_WARPS = 4
# The two-pass fp32 probs kernel: 16 x 16 tiles over 8 warps are the shape seen spill-free for every
# dtype on sm_80 and sm_90 (32-wide key tiles spilled a few bytes for some dtype/arch pairs).
_PROBS_NUM_WARPS = 8
_PROBS_BLOCK_N = 16
_MERGE_BLOCK_S = 16  # splits per step of the decode merge loop: 16 x 64 fp32 partials, no spills


@triton.jit
def _attention_prefill_kernel(
    q_ptr,  # (T, H, D) queries, unit stride along D (a view of the fused qkv is fine)
    k_cache_ptr,  # (num_blocks, H, block_size, D) keys, last dim contiguous
    v_cache_ptr,  # (num_blocks, H, block_size, D) values, same strides as k_cache
    out_ptr,  # (T, H, D) output, unit stride along D
    cu_seqlens_ptr,  # (B + 1,) int32 query row offsets
    seq_lens_ptr,  # (B,) int32 context length including this step's queries
    block_tables_ptr,  # (B, max_blocks) int32 page ids, -1 padded
    scale,  # softmax scale (1 / sqrt(D) for GPT-2)
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_ot, stride_oh,
    stride_bt,
    tiles_per_seq,  # cdiv(max_query_len, BLOCK_M)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= max(HEAD_DIM, 16)
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,  # dot in fp32 with input_precision="ieee" (fp32 caches; bf16 under the interpreter)
):
    seq = tl.program_id(0) // tiles_per_seq
    tile = tl.program_id(0) % tiles_per_seq
    head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_ptr + seq)
    num_q = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= num_q:
        return
    context_len = tl.load(seq_lens_ptr + seq)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query index within the sequence
    row_ok = rows < num_q
    q_pos = context_len - num_q + rows  # context position of each query (padding rows see everything)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptrs = q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp2 domain

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Last key any valid row of this tile may see, +1; never past the context.
    kv_end = tl.minimum(context_len - num_q + tl.minimum((tile + 1) * BLOCK_M, num_q), context_len)
    table = block_tables_ptr + seq * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) context positions
        pos_ok = pos < kv_end
        page = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0)  # (BLOCK_N,)
        kv_off = page.to(tl.int64) * stride_kb + head * stride_kh + (pos % BLOCK_SIZE) * stride_kt
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N); "ieee": see top
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: position 0 is in the first tile of every row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_decode_kernel(
    q_ptr,  # (T, H, D) queries, at most one per sequence, unit stride along D
    k_cache_ptr,  # (num_blocks, H, block_size, D) keys, last dim contiguous
    v_cache_ptr,  # (num_blocks, H, block_size, D) values, same strides as k_cache
    k_ptr,  # (T, H, D) this step's keys, unit stride along D (WRITE_KV; else unread)
    v_ptr,  # (T, H, D) this step's values, unit stride along D (WRITE_KV; else unread)
    slot_ptr,  # (T,) int64 cache slot of each row, -1 = not stored (WRITE_KV; else unread)
    part_ml_ptr,  # (B * H * num_splits, 2) fp32 workspace: running max (log2 domain) and sum per split (S > 1)
    part_acc_ptr,  # (B * H * num_splits, BLOCK_D) fp32 workspace: unnormalised output per split (S > 1)
    counter_ptr,  # (>= B * H,) int32 ticket per (sequence, head), 0 on entry, left 0 (S > 1; else unread)
    out_ptr,  # (T, H, D) output, unit stride along D
    cu_seqlens_ptr,  # (B + 1,) int32 query row offsets
    seq_lens_ptr,  # (B,) int32 context lengths
    block_tables_ptr,  # (B, max_blocks) int32 page ids, -1 padded
    scale,  # softmax scale
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_ot, stride_oh,
    stride_bt,
    stride_knt, stride_knh, stride_vnt, stride_vnh,  # k_ptr / v_ptr row and head strides (WRITE_KV)
    split_len,  # context positions per split: pages_per_split * BLOCK_SIZE
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits merged per loop step (any num_splits works: registers stay bounded)
    WRITE_KV: tl.constexpr,  # write_kv fused in: this step's k/v stored into the cache by this launch
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    q_row = tl.load(cu_seqlens_ptr + seq)
    if tl.load(cu_seqlens_ptr + seq + 1) == q_row:
        return  # no query this step (idle or padding sequence; row q_row is the next one's): no partial, no ticket
    context_len = tl.load(seq_lens_ptr + seq)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + q_row * stride_qt + head * stride_qh + d, mask=d_ok, other=0.0)
    q = q.to(tl.float32) * (scale * 1.4426950408889634)  # (BLOCK_D,), exp2 domain

    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros((BLOCK_D,), tl.float32)
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, context_len)
    table = block_tables_ptr + seq * stride_bt
    newest = context_len - 1  # the query's own position: its k/v are this step's
    # WRITE_KV: the splits' ranges [split_start, split_end) are disjoint, so exactly one program of this
    # (sequence, head) -- the split with split_start <= newest < split_end -- covers the newest position. That
    # program alone stores this head's k/v into the slot and is its only reader in this launch: the cache loop
    # below stops short of it in every split (no other split reaches it anyway), and the writer folds it in
    # from the k/v it loaded itself, in registers -- so no program ever loads a cache slot this launch stores
    # (no store -> load ordering to get right, within or across programs). Other (sequence, head) programs
    # touch other heads' rows or other sequences' pages; the slot of a sequence's newest position is in a page
    # only that sequence writes (the cache copies a shared page before a sequence writes into it).
    loop_end = tl.minimum(split_end, newest) if WRITE_KV else split_end
    for start in range(split_start, loop_end, BLOCK_N):  # a split past the end leaves (-inf, 0, 0)
        pos = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        pos_ok = pos < loop_end
        page = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kb + head * stride_kh + (pos % BLOCK_SIZE) * stride_kt
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1)  # (BLOCK_N,)
        s = tl.where(pos_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: every tile holds a position < loop_end
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    if WRITE_KV:
        if (split_start <= newest) & (newest < split_end):  # the writer (see above); context_len >= 1
            kv_slot = tl.load(slot_ptr + q_row)
            k_row = tl.load(k_ptr + q_row * stride_knt + head * stride_knh + d, mask=d_ok, other=0.0)
            v_row = tl.load(v_ptr + q_row * stride_vnt + head * stride_vnh + d, mask=d_ok, other=0.0)
            k_row = k_row.to(k_cache_ptr.dtype.element_ty)  # (BLOCK_D,) rounded as the cache stores it
            v_row = v_row.to(v_cache_ptr.dtype.element_ty)
            if kv_slot >= 0:
                dst = (kv_slot // BLOCK_SIZE) * stride_kb + head * stride_kh + (kv_slot % BLOCK_SIZE) * stride_kt
                tl.store(k_cache_ptr + dst + d, k_row, mask=d_ok)
                tl.store(v_cache_ptr + dst + d, v_row, mask=d_ok)
            else:  # nothing stored (the reference's write_kv skips -1): attend to what the cache holds there
                last_page = tl.load(table + newest // BLOCK_SIZE).to(tl.int64)
                src = last_page * stride_kb + head * stride_kh + (newest % BLOCK_SIZE) * stride_kt
                k_row = tl.load(k_cache_ptr + src + d, mask=d_ok, other=0.0)
                v_row = tl.load(v_cache_ptr + src + d, mask=d_ok, other=0.0)
            s_new = tl.sum(k_row.to(tl.float32) * q, 0)  # the newest position's score, exp2 domain
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)  # 0 when the loop saw nothing (m_i = -inf)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha + p_new * v_row.to(tl.float32)
            m_i = m_new
    if num_splits == 1:  # the batch alone fills the GPU: normalise and store, no workspace, no ticket
        o_ptrs = out_ptr + q_row * stride_ot + head * stride_oh + d
        tl.store(o_ptrs, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_ok)  # l_i > 0: position 0 is here
        return
    slot = seq * tl.num_programs(1) + head  # this (sequence, head)'s counter
    first = slot * num_splits  # its split 0 in the workspace
    tl.store(part_ml_ptr + (first + split) * 2, m_i)
    tl.store(part_ml_ptr + (first + split) * 2 + 1, l_i)
    tl.store(part_acc_ptr + (first + split) * BLOCK_D + d, acc)
    # Memory ordering, as in linear.py's decode kernel: the barrier orders every thread's partial stores
    # before the one thread's acq_rel, gpu-scope ticket (release is cumulative); the counter's chain of
    # read-modify-writes carries the other splits' releases to the last ticket's acquire, which Triton
    # hands to the whole program through shared memory and a barrier; the merge loads bypass the
    # non-coherent L1 (".cg") so no line cached there earlier stands in for a partial.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + slot, 1, sem="acq_rel", scope="gpu")
    if ticket != num_splits - 1:
        return
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, num_splits, BLOCK_S):  # fixed order: the same bits whichever split drew the last ticket
        sp = start + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
        sp_ok = sp < num_splits
        m = tl.load(part_ml_ptr + (first + sp) * 2, mask=sp_ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_ml_ptr + (first + sp) * 2 + 1, mask=sp_ok, other=0.0, cache_modifier=".cg")
        part = tl.load(part_acc_ptr + (first + sp)[:, None] * BLOCK_D + d[None, :], mask=sp_ok[:, None], other=0.0,
                       cache_modifier=".cg")  # (BLOCK_S, BLOCK_D)
        # Split 0 holds position 0, so m_new is finite from the first step on; empty splits weigh exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(m, 0))
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(m - m_new)  # (BLOCK_S,)
        l_i = l_i * alpha + tl.sum(w * l_s, 0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        m_i = m_new
    o_ptrs = out_ptr + q_row * stride_ot + head * stride_oh + d
    tl.store(o_ptrs, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(counter_ptr + slot, 0)  # every ticket drawn: nothing else touches it in this launch


@triton.jit
def _attention_probs_kernel(
    q_ptr,  # (T, H, D) queries, unit stride along D
    k_cache_ptr,  # (num_blocks, H, block_size, D) keys, last dim contiguous
    v_cache_ptr,  # (num_blocks, H, block_size, D) values, same strides as k_cache
    out_ptr,  # (T, H, D) output, unit stride along D
    probs_ptr,  # (B, H, max_query_len, max_seq_len) fp32 out, zero-filled by the caller
    cu_seqlens_ptr,  # (B + 1,) int32 query row offsets
    seq_lens_ptr,  # (B,) int32 context lengths
    block_tables_ptr,  # (B, max_blocks) int32 page ids, -1 padded
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_ot, stride_oh,
    stride_bt,
    stride_pb, stride_ph, stride_pq,
    tiles_per_seq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0) // tiles_per_seq
    tile = tl.program_id(0) % tiles_per_seq
    head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_ptr + seq)
    num_q = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= num_q:
        return
    context_len = tl.load(seq_lens_ptr + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < num_q
    q_pos = context_len - num_q + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptrs = q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    qk_scale = scale * 1.4426950408889634
    table = block_tables_ptr + seq * stride_bt

    # Pass 1: row max and sum. Pass 2: normalised probabilities, stored and applied to V.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, context_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < context_len
        page = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kb + head * stride_kh + (pos % BLOCK_SIZE) * stride_kt
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where((pos[None, :] <= q_pos[:, None]) & pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    p_rows = probs_ptr + seq * stride_pb + head * stride_ph + rows[:, None] * stride_pq
    for start in range(0, context_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < context_len
        page = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kb + head * stride_kh + (pos % BLOCK_SIZE) * stride_kt
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
        s = tl.where((pos[None, :] <= q_pos[:, None]) & pos_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - m_i[:, None]) / l_i[:, None]  # (BLOCK_M, BLOCK_N), 0 above the diagonal
        tl.store(p_rows + pos[None, :], p, mask=row_ok[:, None] & pos_ok[None, :])
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc += tl.dot(p, v, input_precision="ieee")
    o_ptrs = out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match in "
                         "shape, strides and dtype")
    if k_cache.dim() != 4 or k_cache.stride(3) != 1:
        raise ValueError("caches must be (num_blocks, H, block_size, D) with a contiguous last dim")
    n_head, block_size, head_dim = k_cache.shape[1:]
    if q.dtype not in _BLOCK_M:
        raise ValueError(f"q has dtype {q.dtype}; the triton attention takes float32, float16 or bfloat16")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q ({q.dtype}) and the caches ({k_cache.dtype}) must share a dtype")
    if q.dim() != 3 or q.shape[1:] != (n_head, head_dim):
        raise ValueError(f"q must be (T, {n_head}, {head_dim}), got {tuple(q.shape)}")
    return n_head, block_size, head_dim


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _block_n(block_size: int) -> int:
    # Any tile width works (each position gathers its own page id); a page per tile at least keeps
    # big pages from costing a page-id load per few positions.
    return max(_BLOCK_N, block_size)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 tl.dot is wrong (error ~1e9 seen), so there bf16 tiles are upcast first.
    interpreting = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting)


def decode_splits(num_seqs: int, n_head: int, max_blocks: int) -> tuple[int, int]:
    """``(num_splits, pages_per_split)`` for split-K decode; shapes only, so CUDA graphs replay.

    Example:
        >>> decode_splits(1, 12, 64), decode_splits(64, 12, 64), decode_splits(2, 12, 3)
        ((22, 3), (1, 64), (3, 1))
    """
    wanted = triton.cdiv(2 * _NUM_SMS, max(num_seqs * n_head, 1))
    num_splits = max(1, min(wanted, max_blocks))
    pages_per_split = triton.cdiv(max(max_blocks, 1), num_splits)
    return triton.cdiv(max(max_blocks, 1), pages_per_split), pages_per_split  # drop splits left empty by rounding


def _prefill(q, k_cache, v_cache, meta, scale, out) -> None:
    n_head, block_size, head_dim = k_cache.shape[1:]
    block_m = _BLOCK_M[q.dtype]
    tiles = triton.cdiv(meta.max_query_len, block_m)
    _attention_prefill_kernel[(meta.num_seqs * tiles, n_head)](
        q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, scale,
        *q.stride()[:2], *k_cache.stride()[:3], *out.stride()[:2], meta.block_tables.stride(0), tiles,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=_block_n(block_size), DOT_FP32=_dot_fp32(k_cache.dtype), num_warps=_NUM_WARPS,
    )


def _decode(q, k_cache, v_cache, meta, scale, out, kv=None) -> None:
    """One split-K decode launch; ``kv = (k, v)``: this step's keys/values, stored by the same launch (WRITE_KV)."""
    n_head, block_size, head_dim = k_cache.shape[1:]
    num_seqs, block_d = meta.num_seqs, _block_d(head_dim)
    num_splits, pages_per_split = decode_splits(num_seqs, n_head, meta.block_tables.shape[1])
    workspace = num_seqs * n_head * num_splits if num_splits > 1 else 1  # 1: a valid, unused pointer
    part_ml = torch.empty(workspace, 2, dtype=torch.float32, device=q.device)  # (B * H * splits, 2)
    part_acc = torch.empty(workspace, block_d, dtype=torch.float32, device=q.device)  # (B * H * splits, BLOCK_D)
    k, v = kv if kv is not None else (q, q)  # q: valid, unread pointers when nothing is written
    _attention_decode_kernel[(num_seqs, n_head, num_splits)](
        q, k_cache, v_cache, k, v, meta.slot_mapping, part_ml, part_acc,
        ticket_counters(q.device, num_seqs * n_head if num_splits > 1 else 1),  # (one split: unread)
        out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
        scale, *q.stride()[:2], *k_cache.stride()[:3], *out.stride()[:2], meta.block_tables.stride(0),
        *k.stride()[:2], *v.stride()[:2], pages_per_split * block_size,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=_block_n(block_size),
        BLOCK_S=_MERGE_BLOCK_S, WRITE_KV=kv is not None, num_warps=_NUM_WARPS,
    )


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of every query over its sequence's paged cache; see :func:`gpt2fast.ops.reference.attention`.

    ``q``: ``(T, H, D)`` with any row/head strides (a view of the fused qkv; a non-unit stride along D
    is copied first); caches ``(num_blocks, H, block_size, D)``. Returns a new ``(T, H, D)`` tensor in
    ``q.dtype``. Decode steps (``meta.max_query_len == 1``) take the split-K path (one launch; it
    allocates its fp32 partials with torch, from the graph's pool under CUDA-graph capture, and
    draws tickets from ``counters.ticket_counters``), everything else the varlen flash kernel.

    Example (runs where Triton can: on CUDA, or on CPU under ``TRITON_INTERPRET=1``):
        >>> import os
        >>> from gpt2fast.ops import reference
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        ...     kc = torch.randn(4, 2, 16, 16, device=dev); vc = torch.randn_like(kc)
        ...     meta = AttentionMetadata.build([[3, 1]], [20], [5], block_size=16, device=dev)
        ...     q = torch.randn(5, 2, 16, device=dev)
        ...     ok = torch.allclose(attention(q, kc, vc, meta, 0.25), reference.attention(q, kc, vc, meta, 0.25),
        ...                         atol=1e-4)
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    _check(q, k_cache, v_cache)
    q = q if q.stride(2) == 1 else q.contiguous()  # kernels take row/head strides, unit stride along D
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (T, H, D)
    if q.shape[0] == 0 or meta.num_seqs == 0:
        return out
    if meta.max_query_len == 1:
        _decode(q, k_cache, v_cache, meta, scale, out)
    else:
        _prefill(q, k_cache, v_cache, meta, scale, out)
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
    """``write_kv(k, v, ..., meta.slot_mapping)`` then :func:`attention`; see ``reference.write_kv_attention``.

    Decode steps (``meta.max_query_len == 1``) are ONE launch: the split-K decode kernel with ``WRITE_KV``, where
    the program of each (sequence, head) whose split holds the sequence's newest position stores that token's
    k/v (slot ``-1``: nothing stored) and takes them from registers rather than the cache (the kernel's comments
    give the no-race argument). Rows no sequence owns store nothing: every row with a slot belongs to a
    sequence (``AttentionMetadata.build``, the decode runner's padding has slot -1). Other steps run
    ``write_kv`` then :func:`attention` (two launches). ``k``, ``v``: ``(T, H, D)``, any dtype pair ``write_kv``
    takes (stored, and attended to, as the cache rounds them).

    Example (runs where Triton can: on CUDA, or on CPU under ``TRITON_INTERPRET=1``):
        >>> import os
        >>> from gpt2fast.ops import reference
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        ...     kc = torch.randn(4, 2, 16, 16, device=dev); vc = torch.randn_like(kc)
        ...     kc2, vc2 = kc.clone(), vc.clone()
        ...     meta = AttentionMetadata.build([[3, 1], [2]], [20, 7], [1, 1], block_size=16, device=dev)
        ...     q, k, v = (torch.randn(2, 2, 16, device=dev) for _ in range(3))
        ...     out = write_kv_attention(q, k, v, kc, vc, meta, 0.25)
        ...     expected = reference.write_kv_attention(q, k, v, kc2, vc2, meta, 0.25)
        ...     ok = torch.allclose(out, expected, atol=1e-4) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    from gpt2fast.ops.triton import write_kv as write_kv_module

    if meta.max_query_len != 1 or q.shape[0] == 0 or meta.num_seqs == 0:
        write_kv_module.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return attention(q, k_cache, v_cache, meta, scale)
    _check(q, k_cache, v_cache)
    write_kv_module._check(k, v, k_cache, v_cache, meta.slot_mapping)
    if k.shape != q.shape:
        raise ValueError(f"k and v must be (T, H, D) = {tuple(q.shape)} like q, got {tuple(k.shape)}")
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (T, H, D)
    _decode(q, k_cache, v_cache, meta, scale, out, kv=(k, v))
    return out


_PROBS_BLOCK_M = 16  # inspection path: small tiles keep the fp32 two-pass kernel in registers


def attention_with_probs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` that also returns the softmax probabilities, for inspection (slow: two passes, fp32 dots).

    Returns ``(out, probs)``: ``out`` ``(T, H, D)`` in ``q.dtype``; ``probs`` a padded fp32 tensor
    ``(B, H, meta.max_query_len, meta.max_seq_len)`` where ``probs[b, h, i, j]`` is the weight query
    ``i`` of sequence ``b`` gives context position ``j``; zero above the causal diagonal, for
    ``i >= query_len[b]`` and for ``j >= seq_lens[b]``.

    Example (runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``):
        >>> import os
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        ...     kc = torch.randn(2, 1, 16, 16, device=dev); vc = torch.randn_like(kc)
        ...     meta = AttentionMetadata.build([[1]], [4], [2], block_size=16, device=dev)
        ...     out, probs = attention_with_probs(torch.randn(2, 1, 16, device=dev), kc, vc, meta, 0.25)
        ...     shape, sums = tuple(probs.shape), probs.sum(-1).round(decimals=4).tolist()
        ... else:
        ...     shape, sums = (1, 1, 2, 4), [[[1.0, 1.0]]]
        >>> shape, sums
        ((1, 1, 2, 4), [[[1.0, 1.0]]])
    """
    n_head, block_size, head_dim = _check(q, k_cache, v_cache)
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (T, H, D)
    probs = torch.zeros(meta.num_seqs, n_head, meta.max_query_len, meta.max_seq_len, dtype=torch.float32,
                        device=q.device)  # (B, H, max_q, max_L)
    if q.shape[0] == 0 or meta.num_seqs == 0:
        return out, probs
    tiles = triton.cdiv(meta.max_query_len, _PROBS_BLOCK_M)
    _attention_probs_kernel[(meta.num_seqs * tiles, n_head)](
        q, k_cache, v_cache, out, probs, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, scale,
        *q.stride()[:2], *k_cache.stride()[:3], *out.stride()[:2], meta.block_tables.stride(0),
        *probs.stride()[:3], tiles,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=block_size, BLOCK_M=_PROBS_BLOCK_M,
        BLOCK_N=_PROBS_BLOCK_N, num_warps=_PROBS_NUM_WARPS,
    )
    return out, probs


def _compile_variants() -> list[dict]:
    """Every configuration the launchers above launch at GPT-2 shapes (all sizes have head_dim 64).

    Keys as ``aot.py`` reads them: ``name, fn, signature, constexprs, num_warps, divisible_by_16``.
    """
    variants = []
    head_dim = 64
    block_d = _block_d(head_dim)
    strides = lambda *names: {n: "i32" for n in names}  # noqa: E731
    # Strides the JIT sees as multiples of 16 at GPT-2 shapes (head_dim 64), so the AOT build vectorises alike.
    qkv_strides = ("stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kt")
    qkvo_strides = qkv_strides + ("stride_ot", "stride_oh")
    for torch_dtype, dtype in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        ptr = f"*{dtype}"
        tables = {"cu_seqlens_ptr": "*i32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32"}
        q_kv = {"q_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr}
        for block_size in (16, 32):
            shape = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=_block_n(block_size))
            variants.append(dict(
                name=f"attention_prefill_{dtype}_bs{block_size}", fn=_attention_prefill_kernel,
                signature={**q_kv, "out_ptr": ptr, **tables, "scale": "fp32",
                           **strides("stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kt",
                                     "stride_ot", "stride_oh", "stride_bt", "tiles_per_seq"),
                           **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_SIZE", "BLOCK_M", "BLOCK_N", "DOT_FP32"),
                                           "constexpr")},
                constexprs={**shape, "BLOCK_M": _BLOCK_M[torch_dtype], "DOT_FP32": dtype == "fp32"},
                num_warps=_NUM_WARPS, divisible_by_16=qkvo_strides,
            ))
            for write_kv in (False, True):  # plain decode attention; write_kv_attention's fused decode
                variants.append(dict(
                    name=f"attention_decode{'_write_kv' if write_kv else ''}_{dtype}_bs{block_size}",
                    fn=_attention_decode_kernel,
                    signature={**q_kv, "k_ptr": ptr, "v_ptr": ptr, "slot_ptr": "*i64", "part_ml_ptr": "*fp32",
                               "part_acc_ptr": "*fp32", "counter_ptr": "*i32", "out_ptr": ptr, **tables,
                               "scale": "fp32",
                               **strides("stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kt",
                                         "stride_ot", "stride_oh", "stride_bt", "stride_knt", "stride_knh",
                                         "stride_vnt", "stride_vnh", "split_len"),
                               **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_SIZE", "BLOCK_N", "BLOCK_S", "WRITE_KV"),
                                               "constexpr")},
                    constexprs={**shape, "BLOCK_S": _MERGE_BLOCK_S, "WRITE_KV": write_kv}, num_warps=_NUM_WARPS,
                    # k/v: views of the fused qkv, (3 * C, D) strides at GPT-2 shapes, as q's
                    divisible_by_16=qkvo_strides + ("stride_knt", "stride_knh", "stride_vnt", "stride_vnh",
                                                    "split_len"),
                ))
            variants.append(dict(
                name=f"attention_probs_{dtype}_bs{block_size}", fn=_attention_probs_kernel,
                signature={**q_kv, "out_ptr": ptr, "probs_ptr": "*fp32", **tables, "scale": "fp32",
                           **strides("stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kt",
                                     "stride_ot", "stride_oh", "stride_bt", "stride_pb", "stride_ph",
                                     "stride_pq", "tiles_per_seq"),
                           **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_SIZE", "BLOCK_M", "BLOCK_N"), "constexpr")},
                constexprs={**shape, "BLOCK_M": _PROBS_BLOCK_M, "BLOCK_N": _PROBS_BLOCK_N},
                num_warps=_PROBS_NUM_WARPS,
                divisible_by_16=qkvo_strides,
            ))
    return variants


# One entry per (kernel, dtype, block size) the launchers launch, for the AOT harness (aot.py).
COMPILE_VARIANTS: list[dict] = _compile_variants()
