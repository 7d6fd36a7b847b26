"""Triton ``write_kv_attention`` vs ``gpt2fast.ops.reference.write_kv_attention`` (``write_kv`` then ``attention``).

A decode step is one launch: the split-K decode kernel stores each sequence's new k/v from the program whose split
holds the newest position and attends to them from registers. The caches start NaN everywhere except the positions
before each sequence's newest one, so a slot stored in the wrong place, a stale read of the newest slot or a read of
a foreign slot shows up (as NaN in the output, or in the exact cache comparison: every slot, NaNs included, must
equal the reference's after the call). Outputs and workspaces are NaN-poisoned. On CPU the kernels run under the
Triton interpreter, which runs programs one at a time: the no-race argument is in the kernel's comments.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from gpt2fast.launches import count_launches  # noqa: E402
from gpt2fast.metadata import AttentionMetadata  # noqa: E402
from gpt2fast.ops import reference  # noqa: E402
from gpt2fast.ops.triton import attention as attention_module  # noqa: E402
from gpt2fast.ops.triton.attention import decode_splits, write_kv_attention  # noqa: E402
from gpt2fast.ops.triton.counters import ticket_counters  # noqa: E402
from tests.triton_programs import run_programs_in

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# vs the fp32-upcasting reference: fp32 summation order only; fp16 / bf16 the output's rounding (and P in prefill)
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
CONTEXTS = [1, 2, 15, 16, 17, 100, 300]  # inside, at and just past a page boundary; several pages
N_HEAD = 3


def make_case(seq_lens, query_lens, *, block_size, head_dim, dtype=torch.float32, kv_dtype=None, seed=0,
              table_width=None, extra_blocks=5):
    """Caches holding each sequence's context before its queries (NaN elsewhere: the queries' slots are written by
    the op), scattered pages; q, k, v views of one fused ``(T, 3, H, D)`` qkv, as the model passes them.

    Returns ``(q, k, v, k_cache, v_cache, meta)``.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, taken = [], 0
    for n in need:
        tables.append(order[taken: taken + n])
        taken += n
    meta = AttentionMetadata.build(tables, seq_lens, query_lens, block_size=block_size, device=DEVICE,
                                   max_blocks=table_width)
    shape = (num_blocks, N_HEAD, block_size, head_dim)
    cached = torch.zeros(num_blocks, 1, block_size, 1, dtype=torch.bool)
    for table, n, n_q in zip(tables, seq_lens, query_lens):
        pos = torch.arange(n - n_q)
        cached[torch.tensor(table, dtype=torch.long)[pos // block_size], 0, pos % block_size] = True
    nan = torch.tensor(float("nan"))
    k_cache = torch.where(cached, torch.randn(shape, generator=gen), nan).to(dtype).to(DEVICE)  # (NB, H, BS, D)
    v_cache = torch.where(cached, torch.randn(shape, generator=gen), nan).to(dtype).to(DEVICE)
    qkv = torch.randn(sum(query_lens), 3, N_HEAD, head_dim, generator=gen).to(DEVICE)  # (T, 3, H, D)
    q, k, v = qkv.to(dtype).unbind(1)
    k, v = qkv.to(kv_dtype or dtype).unbind(1)[1:]
    return q, k, v, k_cache, v_cache, meta


def check(q, k, v, k_cache, v_cache, meta, monkeypatch=None, rows=None):
    """Run both on copies of the caches: outputs within the dtype's tolerance (``rows``: only those), caches equal
    bit for bit (NaN where NaN). With ``monkeypatch`` the op's ``torch.empty`` (output, workspaces) is NaN."""
    scale = q.shape[-1] ** -0.5
    want_k, want_v = k_cache.clone(), v_cache.clone()
    expected = reference.write_kv_attention(q, k, v, want_k, want_v, meta, scale)
    if monkeypatch is not None:
        monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    out = write_kv_attention(q, k, v, k_cache, v_cache, meta, scale)
    if monkeypatch is not None:
        monkeypatch.undo()
    assert out.shape == q.shape and out.dtype == q.dtype
    rows = slice(None) if rows is None else rows
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), **TOLERANCES[q.dtype])
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)
    assert int(ticket_counters(DEVICE, 1).abs().sum()) == 0
    return out


def _poisoned_empty(real_empty):
    def empty(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    return empty


def _force_splits(monkeypatch, num_splits: int):
    def forced(num_seqs, n_head, max_blocks):
        assert max_blocks % num_splits == 0, "choose a split count that divides the table width"
        return num_splits, max_blocks // num_splits

    monkeypatch.setattr(attention_module, "decode_splits", forced)


DECODE_CASES = [  # (block_size, head_dim, dtype)
    (16, 5, torch.float32), (32, 5, torch.float32), (16, 16, torch.float32), (32, 16, torch.float32),
    (16, 64, torch.float32), (32, 64, torch.float16), (16, 16, torch.float16), (32, 16, torch.bfloat16),
]


@pytest.mark.parametrize("block_size, head_dim, dtype", DECODE_CASES,
                         ids=[f"bs{b}-d{d}-{str(t)[6:]}" for b, d, t in DECODE_CASES])
def test_decode_matches_reference(block_size, head_dim, dtype, monkeypatch):
    """Seven sequences, one query each, at every context length of CONTEXTS: the rule splits them (several pages
    per split at block 16), so the newest position falls at the start, middle and end of some split."""
    case = make_case(CONTEXTS, [1] * len(CONTEXTS), block_size=block_size, head_dim=head_dim, dtype=dtype,
                     seed=block_size + head_dim)
    assert decode_splits(len(CONTEXTS), N_HEAD, case[-1].block_tables.shape[1])[0] > 1
    check(*case, monkeypatch=monkeypatch)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 4, 6, 12])
def test_decode_forced_split_counts(num_splits, monkeypatch):
    """A 12-page table cut into every split count down to one page per split; contexts ending on the first
    position of a split (17, 49: a writer whose cache loop is empty), on its last (16, 48, 192), in the middle,
    and an idle sequence (no query: stores nothing, its pages stay as they are)."""
    _force_splits(monkeypatch, num_splits)
    asked = []
    real = attention_module.ticket_counters
    monkeypatch.setattr(attention_module, "ticket_counters", lambda dev, slots: asked.append(slots) or real(dev, slots))
    lens, queries = [1, 16, 17, 48, 49, 100, 192, 33], [1, 1, 1, 1, 1, 1, 1, 0]
    case = make_case(lens, queries, block_size=16, head_dim=16, seed=30 + num_splits, table_width=12)
    check(*case, monkeypatch=monkeypatch)
    assert asked == [8 * N_HEAD if num_splits > 1 else 1]  # one counter per (sequence, head), only when split


def test_a_second_call_gives_the_same_bits_and_programs_in_reverse_too(monkeypatch):
    """The writer folds the newest position in after its cache loop, whichever split it is; run again (the newest
    slots now hold what the first call stored) and with the interpreter's programs reversed: the same bits."""
    q, k, v, kc, vc, meta = make_case(CONTEXTS, [1] * len(CONTEXTS), block_size=16, head_dim=16, seed=40)
    first = write_kv_attention(q, k, v, kc, vc, meta, 0.25)
    assert torch.equal(write_kv_attention(q, k, v, kc, vc, meta, 0.25), first)
    if DEVICE == "cpu":
        run_programs_in("reverse", monkeypatch)
        assert torch.equal(write_kv_attention(q, k, v, kc, vc, meta, 0.25), first)


def _pad_like_the_decode_runner(q, k, v, meta, pad):
    """``pad`` rows owned by no sequence (slot -1, random q/k/v) and ``pad`` empty sequences, as the CUDA-graph
    decode runner pads a batch up to its bucket."""
    b, t = meta.num_seqs, q.shape[0]
    extra = lambda x: torch.cat([x, torch.randn(pad, *x.shape[1:], device=DEVICE).to(x.dtype)])  # noqa: E731
    cu = torch.cat([meta.cu_seqlens_q, meta.cu_seqlens_q[-1:].repeat(pad)])
    padded = AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=torch.cat([meta.seq_lens, meta.seq_lens.new_zeros(pad)]),
        block_tables=torch.cat([meta.block_tables, meta.block_tables.new_full((pad, meta.block_tables.shape[1]), -1)]),
        slot_mapping=torch.cat([meta.slot_mapping, meta.slot_mapping.new_full((pad,), -1)]),
        logits_indices=meta.logits_indices, max_query_len=1, max_seq_len=meta.max_seq_len)
    assert padded.num_seqs == b + pad
    return extra(q), extra(k), extra(v), padded, t


def test_padding_rows_store_nothing(monkeypatch):
    q, k, v, kc, vc, meta = make_case([5, 40, 17], [1, 1, 1], block_size=16, head_dim=16, seed=50, extra_blocks=3)
    q, k, v, meta, real_rows = _pad_like_the_decode_runner(q, k, v, meta, pad=5)
    check(q, k, v, kc, vc, meta, monkeypatch=monkeypatch, rows=slice(0, real_rows))


def test_an_owned_row_with_slot_minus_one_stores_nothing_and_attends_to_the_cache():
    """The reference skips slot -1 and then attends to whatever the cache holds at the newest position; so does
    the fused kernel (here that slot holds a finite old value)."""
    q, k, v, kc, vc, meta = make_case([20, 33], [1, 1], block_size=16, head_dim=16, seed=60)
    old = meta.slot_mapping[1].item()
    kc[old // 16, :, old % 16] = torch.randn(N_HEAD, 16, device=DEVICE)
    vc[old // 16, :, old % 16] = torch.randn(N_HEAD, 16, device=DEVICE)
    meta.slot_mapping[1] = -1
    check(q, k, v, kc, vc, meta)


def test_fp32_keys_into_an_fp16_cache_attend_as_stored():
    """k/v in fp32, cache fp16 (a pair write_kv takes): stored rounded to fp16 bit for bit as the reference
    stores them, and the output within fp16 tolerance."""
    case = make_case([7, 70], [1, 1], block_size=16, head_dim=16, dtype=torch.float16, kv_dtype=torch.float32, seed=70)
    check(*case)


PREFILL_CASES = [([5, 100, 17, 1], [5, 30, 1, 1]), ([16, 300], [16, 2])]  # prefill + decode mixed; chunked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens, queries", PREFILL_CASES, ids=["mixed", "chunked"])
def test_prefill_is_write_kv_then_attention(lens, queries, dtype):
    check(*make_case(lens, queries, block_size=16, head_dim=16, dtype=dtype, seed=80))


@pytest.mark.parametrize("queries, launches", [([1, 1, 1], 1), ([4, 1, 2], 2)], ids=["decode", "prefill"])
def test_launches(queries, launches):
    """Decode: the attention launch stores the k/v itself; prefill: write_kv, then the flash kernel."""
    q, k, v, kc, vc, meta = make_case([9, 40, 3], queries, block_size=16, head_dim=16, seed=90)
    with count_launches("cpu" if DEVICE == "cpu" else DEVICE) as seen:
        write_kv_attention(q, k, v, kc, vc, meta, 0.25)
    assert seen.count == launches


def test_rejects_mismatched_shapes():
    q, k, v, kc, vc, meta = make_case([9, 3], [1, 1], block_size=16, head_dim=16, seed=91)
    with pytest.raises(ValueError, match="share a dtype"):
        write_kv_attention(q.half(), k, v, kc, vc, meta, 0.25)
    with pytest.raises(ValueError, match="must be"):
        write_kv_attention(q, k[:1], v[:1], kc, vc, meta, 0.25)
