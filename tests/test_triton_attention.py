"""Triton paged attention (prefill, one-launch split-K decode, probs) vs ``gpt2fast.ops.reference.attention``.

On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set before the kernel
module is imported). Caches are poisoned with NaN outside the written slots, so any read of a wrong
slot, page or position shows up as NaN in the output. The decode merge (the split that draws the last
ticket merges all partials) is checked with NaN-poisoned workspaces, forced split counts, programs run
in other orders, and the ticket counters read back as zeros; races between splits cannot show in the
interpreter (it runs programs one at a time) and are argued in the kernel's comments.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from gpt2fast.metadata import AttentionMetadata  # noqa: E402
from gpt2fast.ops import reference  # noqa: E402
from gpt2fast.ops.triton import attention as attention_module  # noqa: E402
from gpt2fast.ops.triton.attention import (  # noqa: E402
    COMPILE_VARIANTS,
    attention,
    attention_with_probs,
    decode_splits,
)
from gpt2fast.ops.triton.counters import MIN_SLOTS, ticket_counters  # noqa: E402
from tests.triton_programs import needs_interpreter, run_programs_in

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> tolerance vs the fp32 reference (which upcasts). fp16: P is cast to fp16 for the PV dot
# (2^-11 relative) and the output is rounded to fp16; bf16: the output rounding alone is 2^-8.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = list(TOLERANCES)
DTYPE_IDS = ["fp32", "fp16", "bf16"]
BLOCK_SIZES = [16, 32]
PREFILL_LENS = [1, 15, 16, 17, 100]  # one batch: shorter than, equal to and just past a page, and several pages


def make_case(seq_lens, query_lens, *, block_size, n_head=2, head_dim=16, dtype=torch.float32, extra_blocks=7,
              seed=0, table_width=None, q_view=False):
    """Random paged caches holding every context token, NaN elsewhere; scattered, non-monotonic block tables.

    Returns ``(q, k_cache, v_cache, meta)``; ``q`` is a view into a fused ``(T, 3*H*D)`` qkv tensor when
    ``q_view``.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()  # pages handed out in random order
    width = table_width or max(need, default=1)
    tables, taken = [], 0
    for n in need:
        tables.append(order[taken: taken + n] + [-1] * (width - n))
        taken += n
    # AttentionMetadata.build wants tables without padding; it pads to the widest itself.
    meta = AttentionMetadata.build([t[: n] for t, n in zip(tables, need)], seq_lens, query_lens,
                                   block_size=block_size, device=DEVICE)
    if table_width is not None:  # a fixed width, like a CUDA graph bucket's
        bt = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
        bt[:, : meta.block_tables.shape[1]] = meta.block_tables.cpu()
        meta.block_tables = bt.to(DEVICE)

    shape = (num_blocks, n_head, block_size, head_dim)
    written = torch.zeros(num_blocks, 1, block_size, 1, dtype=torch.bool)
    for table, n in zip(tables, seq_lens):
        pos = torch.arange(n)
        written[torch.tensor(table, dtype=torch.long)[pos // block_size], 0, pos % block_size] = True
    nan = torch.tensor(float("nan"))
    k_cache = torch.where(written, torch.randn(shape, generator=gen), nan).to(dtype)  # (NB, H, BS, D)
    v_cache = torch.where(written, torch.randn(shape, generator=gen), nan).to(dtype)
    num_tokens = sum(query_lens)
    if q_view:
        qkv = torch.randn(num_tokens, 3 * n_head * head_dim, generator=gen).to(dtype)  # (T, 3*H*D)
        q = qkv.to(DEVICE)[:, n_head * head_dim: 2 * n_head * head_dim].view(num_tokens, n_head, head_dim)
        assert not q.is_contiguous()
    else:
        q = torch.randn(num_tokens, n_head, head_dim, generator=gen).to(dtype).to(DEVICE)  # (T, H, D)
    return q, k_cache.to(DEVICE), v_cache.to(DEVICE), meta


def check(q, k_cache, v_cache, meta, dtype, scale=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = attention(q, k_cache, v_cache, meta, scale)
    expected = reference.attention(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prefill_mixed_lengths(block_size, dtype):
    case = make_case(PREFILL_LENS, PREFILL_LENS, block_size=block_size, dtype=dtype, seed=block_size)
    check(*case, dtype)


@pytest.mark.parametrize("head_dim", [12, 64])
def test_prefill_head_dims(head_dim):
    """12: padded to a 16-wide tile (the ODD test config has 60 / 5 heads); 64: every GPT-2 size."""
    check(*make_case([17, 40], [17, 40], block_size=16, n_head=3, head_dim=head_dim), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_chunked_prefill_and_prefix_hits(block_size, dtype):
    """Queries are only the newest tokens of a longer cached context; a decode row and an idle sequence ride along."""
    seq_lens = [40, 100, 33, 17, 20, 70]
    query_lens = [8, 1, 33, 5, 0, 65]
    check(*make_case(seq_lens, query_lens, block_size=block_size, dtype=dtype, seed=3), dtype)


DECODE_LENS = [1, 2, 300, 15, 16, 17, 33, 64, 65, 129, 200, 255, 31, 1, 97, 288, 5, 150]


# Every dtype and block size at least once; the full cross product costs the interpreter ~10 s more.
DECODE_CASES = [(16, torch.float32), (32, torch.float32), (16, torch.float16), (32, torch.bfloat16)]


@pytest.mark.parametrize("block_size, dtype", DECODE_CASES, ids=["bs16-fp32", "bs32-fp32", "bs16-fp16", "bs32-bf16"])
def test_decode_split_k(block_size, dtype):
    width = -(-300 // block_size) + 2  # a graph bucket's fixed table width, wider than any sequence needs
    case = make_case(DECODE_LENS, [1] * len(DECODE_LENS), block_size=block_size, dtype=dtype, seed=5,
                     table_width=width)
    meta = case[3]
    num_splits, pages_per_split = decode_splits(meta.num_seqs, 2, width)
    assert num_splits > 1
    # Some short sequence has splits that lie entirely past its end (they must write a neutral partial).
    assert min(DECODE_LENS) <= (num_splits - 1) * pages_per_split * block_size
    check(*case, dtype)


def test_decode_with_idle_sequence():
    """max_query_len == 1 with a sequence that has no query this step (its splits must read nothing)."""
    check(*make_case([50, 7, 130], [1, 0, 1], block_size=16, seed=9), torch.float32)


@pytest.mark.parametrize("seq_lens, n_head, width",
                         [([1, 5, 16, 9, 3], 2, 1), ([33, 1, 7, 20, 2, 17, 9, 40] * 3, 12, 3)],
                         ids=["one-page-table", "batch-fills-gpu"])
def test_decode_one_split_writes_output_directly(seq_lens, n_head, width):
    """One split (table of one page, or batch x heads >= 2 x 132): each program stores its output, no ticket."""
    query_lens = [1] * len(seq_lens)
    query_lens[1] = 0  # an idle sequence: its row belongs to the next sequence and must stay untouched
    case = make_case(seq_lens, query_lens, block_size=16, n_head=n_head, seed=19, table_width=width)
    assert decode_splits(len(seq_lens), n_head, width)[0] == 1
    check(*case, torch.float32)


def test_decode_single_sequence_many_splits():
    q, kc, vc, meta = make_case([1000], [1], block_size=16, n_head=1, seed=11)
    assert decode_splits(1, 1, meta.block_tables.shape[1])[0] == meta.block_tables.shape[1]  # one page per split
    check(q, kc, vc, meta, torch.float32)


@pytest.mark.parametrize("num_seqs, n_head, max_blocks", [(1, 12, 64), (1, 25, 64), (7, 12, 3), (64, 12, 64),
                                                          (3, 1, 1), (1, 1, 1000), (22, 12, 64), (23, 25, 17)])
def test_decode_split_rule(num_seqs, n_head, max_blocks):
    """Splits come from shapes alone, fill two waves of 132 SMs when the table allows, and none is empty."""
    num_splits, pages = decode_splits(num_seqs, n_head, max_blocks)
    assert 1 <= num_splits <= max_blocks
    assert num_splits * pages >= max_blocks > (num_splits - 1) * pages  # covers the table, no split left empty
    # Rounding to whole pages may drop splits, never below half of what two waves of 132 SMs ask for.
    assert 2 * num_seqs * n_head * num_splits >= min(2 * 132, num_seqs * n_head * max_blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 1, 30]], ids=["decode", "prefill"])
def test_non_contiguous_q(query_lens, dtype):
    """q as the middle third of a fused qkv projection (row stride 3*H*D)."""
    case = make_case([60, 17, 30], query_lens, block_size=16, dtype=dtype, seed=13, q_view=True)
    check(*case, dtype)


def test_q_strided_along_head_dim():
    """A q whose last dim is not unit-stride is copied first (the kernels assume unit stride along D)."""
    q, kc, vc, meta = make_case([20, 9], [4, 9], block_size=16, seed=15)
    wide = torch.randn(q.shape[0], q.shape[1], 2 * q.shape[2], device=DEVICE)  # (T, H, 2*D)
    wide[..., ::2] = q
    check(wide[..., ::2], kc, vc, meta, torch.float32)


def _counters_are_zero() -> bool:
    return int(ticket_counters(DEVICE, 1).abs().sum()) == 0


def _force_splits(monkeypatch, num_splits: int):
    """Make the decode split the block table into ``num_splits`` equal runs of pages (the rule picks its own)."""

    def forced(num_seqs, n_head, max_blocks):
        assert max_blocks % num_splits == 0, "choose a split count that divides the table width"
        return num_splits, max_blocks // num_splits

    monkeypatch.setattr(attention_module, "decode_splits", forced)


def _poisoned_empty(real_empty):
    """``torch.empty`` filled with NaN: a workspace slot or output row the decode forgets to write shows."""

    def empty(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    return empty


# Decode steps whose splits all take tickets: a table of 12 pages, sequences that end in the first, a middle
# and the last split, and an idle sequence (no query: no partial, no ticket, no output row).
MERGE_LENS, MERGE_QUERIES = [1, 40, 190, 16, 100], [1, 1, 1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_counters_are_zero_after_every_call(dtype):
    case = make_case(MERGE_LENS, MERGE_QUERIES, block_size=16, dtype=dtype, seed=21, table_width=12)
    assert decode_splits(len(MERGE_LENS), 2, 12)[0] > 1
    first = check(*case, dtype)
    assert _counters_are_zero()
    assert torch.equal(check(*case, dtype), first)  # a second call: the same bits
    assert _counters_are_zero()


@pytest.mark.parametrize("num_splits", [1, 2, 3, 4, 12])
def test_decode_forced_split_counts(num_splits, monkeypatch):
    """Every split count a 12-page table allows, down to one page per split: matches the reference with a NaN-
    poisoned workspace and output (a partial read before it was written, or a row never stored, shows as NaN)."""
    _force_splits(monkeypatch, num_splits)
    case = make_case(MERGE_LENS, MERGE_QUERIES, block_size=16, seed=22, table_width=12)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    check(*case, torch.float32)
    assert _counters_are_zero()


def test_decode_is_bit_identical_across_split_counts_when_every_sum_is_exact(monkeypatch):
    """Each head's key is the same at every position, so every score is the same number, every softmax weight is
    exp2(0) = 1 and every rescale factor is 1 (or 0 for a split past the end); V holds small integers. Then
    each split's sum is exact and the output is (sum of V) / length whatever the split count: a split merged
    twice, or never, would change it."""
    q, kc, vc, meta = make_case(MERGE_LENS, MERGE_QUERIES, block_size=16, seed=23, table_width=12)
    gen = torch.Generator().manual_seed(24)
    keys = torch.randn(1, kc.shape[1], 1, kc.shape[3], generator=gen).to(DEVICE)  # (1, H, 1, D): one per head
    kc = torch.where(kc.isnan(), kc, keys)
    vc = torch.where(vc.isnan(), vc, torch.randint(-8, 9, vc.shape, generator=gen).float().to(DEVICE))
    want = reference.attention(q, kc, vc, meta, 0.25)
    outs = []
    for num_splits in (1, 2, 3, 4, 6, 12):
        _force_splits(monkeypatch, num_splits)
        outs.append(attention(q, kc, vc, meta, 0.25))
        assert _counters_are_zero()
    for num_splits, out in zip((2, 3, 4, 6, 12), outs[1:]):
        assert torch.equal(out, outs[0]), f"{num_splits} splits differ from one"
    torch.testing.assert_close(outs[0], want, **TOLERANCES[torch.float32])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_the_same_bits_whichever_split_draws_the_last_ticket(dtype, monkeypatch):
    """Programs run forward, in reverse and shuffled: the last split merges in split order, so the bits agree."""
    case = make_case(MERGE_LENS, MERGE_QUERIES, block_size=16, dtype=dtype, seed=25, table_width=12)
    outs = []
    for order in ("forward", "reverse", "shuffle"):
        run_programs_in(order, monkeypatch)
        outs.append(check(*case, dtype))
        assert _counters_are_zero()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("n_head", [12, 16, 20, 25, 2])
def test_decode_split_rule_never_asks_for_more_counters_than_the_first_buffer(n_head):
    """Only batches of fewer than 2 x 132 (sequence, head) pairs split, so MIN_SLOTS counters always suffice:
    the buffer made on the first decode step never grows, before or during CUDA graph capture."""
    for num_seqs in (1, 2, 4, 8, 16, 21, 22, 32, 64, 128, 256, 512):
        if decode_splits(num_seqs, n_head, 64)[0] > 1:
            assert num_seqs * n_head < MIN_SLOTS


def reference_probs(q, k_cache, v_cache, meta, scale):
    """(B, H, max_q, max_L) fp32: softmax of the masked, scaled QK^T, gathered naively through the block tables."""
    n_head, block_size, head_dim = k_cache.shape[1:]
    probs = torch.zeros(meta.num_seqs, n_head, meta.max_query_len, meta.max_seq_len)
    cu = meta.cu_seqlens_q.tolist()
    for b, length in enumerate(meta.seq_lens.tolist()):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        blocks = meta.block_tables[b, : -(-length // block_size)].long()
        k = k_cache[blocks].transpose(0, 1).reshape(n_head, -1, head_dim)[:, :length].float().cpu()  # (H, L, D)
        scores = q[cu[b]: cu[b + 1]].float().cpu().transpose(0, 1) @ k.transpose(1, 2) * scale  # (H, n, L)
        future = torch.arange(length)[None, :] > torch.arange(length - n, length)[:, None]  # (n, L)
        probs[b, :, :n, :length] = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return probs


@pytest.mark.parametrize("dtype, block_size", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 32)],
                         ids=["fp32-bs16", "bf16-bs16", "fp32-bs32"])
def test_attention_with_probs(dtype, block_size):
    """Probs sum to 1, vanish above the diagonal and in the padding, equal softmax(masked QK^T * scale)."""
    seq_lens, query_lens = [17, 40, 5, 33], [17, 9, 1, 0]
    q, kc, vc, meta = make_case(seq_lens, query_lens, block_size=block_size, dtype=dtype, seed=17)
    scale = 0.3
    out, probs = attention_with_probs(q, kc, vc, meta, scale)
    assert probs.shape == (4, 2, meta.max_query_len, meta.max_seq_len) and probs.dtype == torch.float32
    probs = probs.cpu()
    torch.testing.assert_close(probs, reference_probs(q, kc, vc, meta, scale), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.float(), reference.attention(q, kc, vc, meta, scale).float(), **TOLERANCES[dtype])
    for b, (length, n) in enumerate(zip(seq_lens, query_lens)):
        torch.testing.assert_close(probs[b, :, :n].sum(-1), torch.ones(2, n))
        assert probs[b, :, n:].abs().sum() == 0 and probs[b, :, :, length:].abs().sum() == 0
        above = torch.arange(meta.max_seq_len)[None, :] > torch.arange(length - n, length)[:, None]  # (n, max_L)
        assert probs[b, :, :n][:, above].abs().sum() == 0  # nothing above the causal diagonal


def test_rejects_mismatched_dtypes():
    q, kc, vc, meta = make_case([3], [3], block_size=16)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q.half(), kc, vc, meta, 0.25)
    with pytest.raises(ValueError, match=r"q must be \(T, 2, 16\)"):
        attention(q[:, :1], kc, vc, meta, 0.25)


def test_compile_variants_match_kernels():
    """Each variant names every kernel argument once, constexprs agree, and names are unique (the AOT harness
    compiles exactly these)."""
    assert len({v["name"] for v in COMPILE_VARIANTS}) == len(COMPILE_VARIANTS)
    kernels = {v["fn"].fn.__name__ if hasattr(v["fn"], "fn") else v["fn"].__name__ for v in COMPILE_VARIANTS}
    assert kernels == {"_attention_prefill_kernel", "_attention_decode_kernel", "_attention_probs_kernel"}
    for v in COMPILE_VARIANTS:
        assert list(v["signature"]) == list(v["fn"].arg_names), v["name"]
        assert {k for k, t in v["signature"].items() if t == "constexpr"} == set(v["constexprs"]), v["name"]
        assert v["num_warps"] in (1, 2, 4, 8)
        for dtype in ("fp32", "fp16", "bf16"):
            if f"_{dtype}_" in v["name"]:
                assert v["signature"].get("q_ptr", v["signature"].get("out_ptr")) == f"*{dtype}"


# GPT-2 124M (12 heads) and 1.5B (25 heads) shapes, head_dim 64, on a real GPU.
GPU_SHAPES = [(12, 64), (25, 64)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n_head, head_dim", GPU_SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_gpu_prefill_and_chunked(block_size, n_head, head_dim, dtype):
    seq_lens = [1, 15, 16, 17, 100, 1024, 700, 333]
    query_lens = [1, 15, 16, 17, 100, 1024, 64, 1]
    case = make_case(seq_lens, query_lens, block_size=block_size, n_head=n_head, head_dim=head_dim, dtype=dtype)
    check(*case, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n_head, head_dim", GPU_SHAPES)
@pytest.mark.parametrize("num_seqs", [1, 5, 64])
def test_gpu_decode(num_seqs, n_head, head_dim, dtype):
    lens = torch.randint(1, 1025, (num_seqs,), generator=torch.Generator().manual_seed(num_seqs)).tolist()
    case = make_case(lens, [1] * num_seqs, block_size=16, n_head=n_head, head_dim=head_dim, dtype=dtype,
                     table_width=64, q_view=True)
    check(*case, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n_head, head_dim", GPU_SHAPES)
def test_gpu_probs(n_head, head_dim, dtype):
    q, kc, vc, meta = make_case([300, 64], [20, 1], block_size=16, n_head=n_head, head_dim=head_dim, dtype=dtype)
    out, probs = attention_with_probs(q, kc, vc, meta, 0.125)
    torch.testing.assert_close(probs.cpu(), reference_probs(q, kc, vc, meta, 0.125), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.float(), reference.attention(q, kc, vc, meta, 0.125).float(), **TOLERANCES[dtype])
