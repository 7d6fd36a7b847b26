"""CUDA C++ paged KV cache kernels (csrc/kernels/write_kv.cuh, attention.cuh) vs ``gpt2fast.ops.reference``.

``reference.attention`` loops over each sequence's block table naively (gather the pages, one softmax), so it
checks the split-K flash-decoding kernels independently; ``reference.write_kv`` is fancy indexing. On CPU the
kernels run emulated in thread orders 0 and 1 with every tensor the wrappers allocate (outputs and the fp32
split workspace) poisoned; CI reruns this file under ASan+UBSan. ``gpu`` tests repeat the comparison with
``gpt2fast._C`` at GPT-2 124M decode shapes.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import cuda, cuda_build, reference
from gpt2fast.ops.triton.attention import decode_splits

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

D = 64  # the kernel's head_dim (every GPT-2 size)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# dtype -> attention tolerance vs the fp32-upcast reference. fp32: the same math, another order of the sums
# (online softmax over splits vs one softmax). fp16/bf16: K, V, q upcast exactly on both sides, so the two
# fp32 results differ by ~1e-6 and the outputs (|out| < 4) by at most one rounding: fp16 ulp <= 2**-9 at 4,
# bf16 ulp <= 2**-6 at 4 (rtol: one ulp relative, 2**-10 / 2**-7, with margin).
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}
SCALE = D**-0.5
CANARY = 4096  # elements after each output: more than a row of H * D at every H here


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every ``out`` and workspace the wrappers allocate starts as NaN, so a skipped element cannot pass."""


@pytest.fixture
def canaries(monkeypatch) -> list[torch.Tensor]:
    """Like the poisoned outputs (NaN), and each tensor from ``cuda._empty`` is the head of a buffer whose tail
    (returned in this list) holds -7 and must keep it: a write to row T (one past the output) lands there."""
    tails = []

    def guarded(shape, dtype, device):
        n = math.prod(shape)
        buf = torch.full((n + CANARY,), -7, dtype=dtype, device=device)
        buf[:n] = float("nan") if dtype.is_floating_point else -1
        tails.append(buf[n:])
        return buf[:n].view(shape)

    monkeypatch.setattr(cuda, "_empty", guarded)
    return tails


# ---- cases -----------------------------------------------------------------------------------------

# (context length, has a query this step). Length 0 never has one; a length > 0 without a query is a sequence
# idle this step (it must read nothing and write nothing). Page boundaries at 16 and 32 on both sides.
BATCHES = {
    1: [(300, True)],
    3: [(0, False), (17, True), (1, True)],
    17: [(1, True), (0, False), (15, True), (16, True), (17, True), (100, True), (300, True), (31, True),
         (32, True), (33, True), (40, False), (64, True), (2, True), (47, True), (0, False), (200, True),
         (5, False)],
}  # fmt: skip
HEADS = {1: 3, 3: 5, 17: 2}  # small head counts keep the emulated runtime down
MAX_CONTEXT = 320  # tables padded to MAX_CONTEXT / block_size pages, like the engine pads to n_positions


def _random(shape, dtype: torch.dtype, gen: torch.Generator, device="cpu", std: float = 1.0) -> torch.Tensor:
    return (std * torch.randn(shape, generator=gen)).to(device, dtype)


def _decode_case(seqs, n_head: int, block_size: int, dtype: torch.dtype, seed: int, device="cpu",
                 max_context: int = MAX_CONTEXT):
    """q (a strided view of a fused qkv), caches with shuffled, non-contiguous pages, and the step's metadata."""
    gen = torch.Generator().manual_seed(seed)
    pages_each = [-(-length // block_size) for length, _ in seqs]
    num_blocks = sum(pages_each) + 5  # a few pages nobody owns
    page_ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in pages_each:
        tables.append(page_ids[start : start + n])
        start += n
    meta = AttentionMetadata.build(tables, [length for length, _ in seqs], [int(q) for _, q in seqs],
                                   block_size=block_size, max_blocks=max_context // block_size,
                                   device=device)  # fmt: skip
    k_cache = _random((num_blocks, n_head, block_size, D), dtype, gen, device)  # (NB, H, BS, D)
    v_cache = _random((num_blocks, n_head, block_size, D), dtype, gen, device)  # (NB, H, BS, D)
    num_q = sum(q for _, q in seqs)
    qkv = _random((num_q, 3, n_head, D), dtype, gen, device, std=2.0)  # (T, 3, H, D): peaky softmax rows
    return qkv[:, 0], k_cache, v_cache, meta


def _check_attention(q, k_cache, v_cache, meta, dtype):
    out = cuda.attention(q, k_cache, v_cache, meta, SCALE)  # (T, H, D)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, reference.attention(q, k_cache, v_cache, meta, SCALE), **TOLERANCE[dtype])


# ---- attention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_decode_attention_matches_reference(batch, block_size, dtype, order):
    seqs, n_head = BATCHES[batch], HEADS[batch]
    assert decode_splits(batch, n_head, MAX_CONTEXT // block_size)[0] > 1  # split-K + merge
    q, k_cache, v_cache, meta = _decode_case(seqs, n_head, block_size, dtype, seed=batch * 100 + block_size)
    _check_attention(q, k_cache, v_cache, meta, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_split_writes_the_output_directly_at_gpt2_heads(dtype, order, canaries):
    """23 sequences x GPT-2's 12 heads fill two waves of an H100 alone: one split, no workspace, no merge.
    Idle sequences in the middle and at the end (its row would be T: the canary)."""
    seqs = [(length, length % 7 != 3) for length in (1, 16, 17, 33, 50, 64, 65, 3, 100, 2, 31, 32, 48, 9, 10,
                                                     80, 15, 47, 20, 5, 64, 1, 96)]  # fmt: skip
    seqs[5], seqs[-1] = (0, False), (96, False)
    assert decode_splits(len(seqs), 12, MAX_CONTEXT // 16) == (1, MAX_CONTEXT // 16)
    q, k_cache, v_cache, meta = _decode_case(seqs, 12, 16, dtype, seed=23)
    _check_attention(q, k_cache, v_cache, meta, dtype)
    assert all((tail == -7).all() for tail in canaries)


@pytest.mark.parametrize("block_size", [8, 48])
def test_other_block_sizes_take_the_runtime_page_arithmetic(block_size, order):
    seqs = [(1, True), (0, False), (47, True), (49, True), (150, True)]
    q, k_cache, v_cache, meta = _decode_case(seqs, 3, block_size, torch.float32, seed=block_size)
    _check_attention(q, k_cache, v_cache, meta, torch.float32)


def test_zero_query_sequences_leave_other_rows_alone(order, canaries):
    """Idle sequences at the start, in the middle and at the end (split-K path): cu[b] of the last ones is T,
    one past the output, so a stray write lands in the canary or clobbers a neighbour's row."""
    seqs = [(20, False), (0, False), (33, True), (9, False), (70, True), (64, False), (0, False)]
    assert decode_splits(len(seqs), 4, MAX_CONTEXT // 16)[0] > 1
    q, k_cache, v_cache, meta = _decode_case(seqs, 4, 16, torch.float32, seed=7)
    _check_attention(q, k_cache, v_cache, meta, torch.float32)
    assert all((tail == -7).all() for tail in canaries)


def test_empty_steps(emu):
    q, k_cache, v_cache, meta = _decode_case([(0, False), (5, False)], 2, 16, torch.float16, seed=1)
    assert q.shape[0] == 0 and cuda.attention(q, k_cache, v_cache, meta, SCALE).shape == (0, 2, D)
    empty = AttentionMetadata.build([], [], [], block_size=16)
    assert cuda.attention(q, k_cache, v_cache, empty, SCALE).shape == (0, 2, D)
    assert emu.ATTENTION_HEAD_DIM == cuda.ATTENTION_HEAD_DIM == D


def _bad_attention_calls():
    q, k_cache, v_cache, meta = _decode_case([(20, True), (3, True)], 2, 16, torch.float32, seed=0)
    wide = torch.randn(k_cache.shape[:3] + (2 * D,))[..., :D]  # (NB, H, BS, D) with rows 2 * D apart
    small = torch.randn(4, 2, 16, 32)
    meta64 = AttentionMetadata(meta.cu_seqlens_q, meta.seq_lens, meta.block_tables.long(), meta.slot_mapping,
                               meta.logits_indices, meta.max_query_len, meta.max_seq_len)  # fmt: skip
    return {
        "share one dtype": lambda: cuda.attention(q.half(), k_cache, v_cache, meta, SCALE),
        "float32, float16 or bfloat16": lambda: cuda.attention(q.double(), k_cache.double(), v_cache.double(),
                                                               meta, SCALE),
        "head_dim 32": lambda: cuda.attention(torch.randn(2, 2, 32), small, small, meta, SCALE),
        "k_cache must be contiguous": lambda: cuda.attention(q, wide, v_cache, meta, SCALE),
        "different devices": lambda: cuda.attention(q.to("meta"), k_cache, v_cache, meta, SCALE),
        "meta.block_tables must be a contiguous int32": lambda: cuda.attention(q, k_cache, v_cache, meta64, SCALE),
        "q must be (T, 2, 64)": lambda: cuda.attention(q[:, :1], k_cache, v_cache, meta, SCALE),
        "q must be contiguous in its last dim": lambda: cuda.attention(
            torch.randn(2, D, 2).transpose(1, 2), k_cache, v_cache, meta, SCALE),
        "16-byte aligned": lambda: cuda.attention(
            q, torch.randn(k_cache.numel() + 1)[1:].view(k_cache.shape), v_cache, meta, SCALE),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_attention_calls()))
def test_bad_attention_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_attention_calls()[message]()


# ---- write_kv_attention: the K/V store and the attention in one launch --------------------------------


def _step_kv(q: torch.Tensor, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's k and v, strided views of a fused (T, 3, H, D) qkv like the model's."""
    qkv = _random((q.shape[0], 3, *q.shape[1:]), dtype, torch.Generator().manual_seed(seed))
    return qkv[:, 1], qkv[:, 2]


def _check_write_kv_attention(q, k, v, k_cache, v_cache, meta, dtype):
    """Output as the reference's (write, then attend), and the caches equal the reference's bit for bit."""
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference.write_kv_attention(q, k, v, want_k, want_v, meta, SCALE)
    out = cuda.write_kv_attention(q, k, v, k_cache, v_cache, meta, SCALE)  # (T, H, D)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_write_kv_attention_matches_reference(batch, block_size, dtype, order):
    """Split-K (the newest position in the last split with content, at page boundaries 15/16/17, 31/32/33),
    idle sequences, and the merge by the last split, all in one launch."""
    seqs, n_head = BATCHES[batch], HEADS[batch]
    q, k_cache, v_cache, meta = _decode_case(seqs, n_head, block_size, dtype, seed=batch * 10 + block_size)
    k, v = _step_kv(q, dtype, seed=batch)
    _check_write_kv_attention(q, k, v, k_cache, v_cache, meta, dtype)


@pytest.mark.parametrize("block_size", [8, 16, 48])
def test_write_kv_attention_one_split_and_runtime_page_arithmetic(block_size, order, canaries):
    seqs = [(length, length % 5 != 2) for length in (1, 16, 17, 33, 50, 64, 65, 3, 100, 2, 31, 32, 48, 9, 10, 80, 15,
                                                     47, 20, 5, 64, 1, 96)]  # fmt: skip
    assert decode_splits(len(seqs), 12, MAX_CONTEXT // block_size)[0] == 1
    q, k_cache, v_cache, meta = _decode_case(seqs, 12, block_size, torch.float32, seed=block_size)
    k, v = _step_kv(q, torch.float32, seed=block_size)
    _check_write_kv_attention(q, k, v, k_cache, v_cache, meta, torch.float32)
    assert all((tail == -7).all() for tail in canaries)


def test_write_kv_attention_is_one_launch_and_skips_slot_minus_one(emu):
    """Split-K with a merge, still one launch; a row whose slot is -1 stores nothing and attends to the cache as
    it is, as write_kv then attention do."""
    seqs = [(40, True), (17, True), (300, True)]
    q, k_cache, v_cache, meta = _decode_case(seqs, 3, 16, torch.float32, seed=5)
    assert decode_splits(len(seqs), 3, MAX_CONTEXT // 16)[0] > 1
    k, v = _step_kv(q, torch.float32, seed=6)
    meta.slot_mapping[1] = -1
    before, kept = emu.launch_count(), k_cache.clone()
    _check_write_kv_attention(q, k, v, k_cache, v_cache, meta, torch.float32)
    assert emu.launch_count() - before == 1
    changed = (k_cache != kept).any(dim=(1, 3))  # (NB, BS) slots written in any head
    assert changed.sum() == 2  # rows 0 and 2 only


def _bad_write_kv_attention_calls():
    q, k_cache, v_cache, meta = _decode_case([(20, True), (3, True)], 2, 16, torch.float32, seed=0)
    k, v = _step_kv(q, torch.float32, seed=1)
    odd = torch.randn(2 * 2 * D + 1)[1:].view(2, 2, D)  # rows one element off 16 bytes
    return {
        "must have q's shape": lambda: cuda.write_kv_attention(q, k[:1], v, k_cache, v_cache, meta, SCALE),
        "must have the caches' dtype": lambda: cuda.write_kv_attention(q, k.half(), v.half(), k_cache, v_cache, meta,
                                                                       SCALE),
        "need one layout": lambda: cuda.write_kv_attention(q, k, v.contiguous(), k_cache, v_cache, meta, SCALE),
        "16-byte aligned": lambda: cuda.write_kv_attention(q, odd, odd.clone(), k_cache, v_cache, meta, SCALE),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_write_kv_attention_calls()))
def test_bad_write_kv_attention_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_write_kv_attention_calls()[message]()


# ---- write_kv ----------------------------------------------------------------------------------------

WRITE_KV_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                  (torch.float32, torch.float16), (torch.float32, torch.bfloat16)]  # fmt: skip


def _poisoned_caches(num_blocks: int, n_head: int, block_size: int, head_dim: int, dtype: torch.dtype):
    k_cache = torch.full((num_blocks, n_head, block_size, head_dim), float("nan"), dtype=dtype)  # (NB, H, BS, D)
    return k_cache, k_cache.clone()


def _slots(tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct random slots, every third token padding (-1)."""
    slots = torch.randperm(num_slots, generator=gen)[:tokens]  # (T,)
    slots[::3] = -1
    return slots


def _check_write_kv(k, v, k_cache, v_cache, slots):
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(k, v, expected_k, expected_v, slots)
    cuda.write_kv(k, v, k_cache, v_cache, slots)
    # exact: a copy, or one round-to-nearest-even from fp32; slots never written stay NaN on both sides
    torch.testing.assert_close(k_cache, expected_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("src,cache_dtype", WRITE_KV_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n_head,head_dim", [(3, 64), (12, 64), (5, 7)])  # head_dim 7: the scalar path
def test_write_kv_from_fused_qkv_views(n_head, head_dim, src, cache_dtype, order):
    gen = torch.Generator().manual_seed(n_head * head_dim)
    tokens, block_size, num_blocks = 17, 16, 4
    qkv = _random((tokens, 3, n_head, head_dim), src, gen)  # (T, 3, H, D); k, v: token stride 3 * H * D
    k_cache, v_cache = _poisoned_caches(num_blocks, n_head, block_size, head_dim, cache_dtype)
    slots = _slots(tokens, num_blocks * block_size, gen)
    assert (slots == -1).any() and k_cache.isnan().all()
    _check_write_kv(qkv[:, 1], qkv[:, 2], k_cache, v_cache, slots)
    assert k_cache.isnan().any()  # slots nobody wrote are still poisoned


@pytest.mark.parametrize("src,cache_dtype", WRITE_KV_PAIRS[:2] + WRITE_KV_PAIRS[3:4],
                         ids=lambda d: str(d).removeprefix("torch."))  # fmt: skip
def test_write_kv_misaligned_and_strided(src, cache_dtype, order):
    """k one element past a 16-byte boundary (scalar path), v head-strided, the caches a view of a wider pool;
    25 heads x 64 fp32 scalars (1600 per token) make each thread loop over several elements."""
    gen = torch.Generator().manual_seed(5)
    tokens, n_head, block_size, num_blocks = 9, 25, 32, 2
    flat = _random(tokens * n_head * D + 1, src, gen)
    k = flat[1:].view(tokens, n_head, D)  # (T, H, D) misaligned by one element
    assert k.data_ptr() % 16
    v = _random((tokens, 2 * n_head, D), src, gen)[:, ::2]  # (T, H, D), head stride 2 * D
    pool = torch.full((num_blocks, n_head, block_size + 3, D), float("nan"), dtype=cache_dtype)
    k_cache, v_cache = pool[:, :, :block_size], pool.clone()[:, :, 1 : block_size + 1]  # (NB, H, BS, D) views
    _check_write_kv(k, v, k_cache, v_cache, _slots(tokens, num_blocks * block_size, gen))
    assert pool[:, :, block_size:].isnan().all()  # the pool's rows past the view untouched


def test_write_kv_empty_and_all_padding(order):
    k_cache, v_cache = _poisoned_caches(2, 2, 16, D, torch.float16)
    cuda.write_kv(torch.randn(0, 2, D).half(), torch.randn(0, 2, D).half(), k_cache, v_cache,
                  torch.zeros(0, dtype=torch.int64))  # fmt: skip
    kv = torch.randn(3, 2, D).half()
    cuda.write_kv(kv, kv, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int64))
    assert k_cache.isnan().all() and v_cache.isnan().all()


def _bad_write_kv_calls():
    kv = torch.randn(4, 2, D)
    kc, vc = _poisoned_caches(2, 2, 16, D, torch.float32)
    slots = torch.arange(4)
    return {
        "takes one dtype, or float32": lambda: cuda.write_kv(kv.half(), kv.half(), kc, vc, slots),
        "slot_mapping must be int64": lambda: cuda.write_kv(kv, kv, kc, vc, slots.int()),
        "k and v must be (T, H, D)": lambda: cuda.write_kv(kv, kv[:3], kc, vc, slots),
        "do not match k": lambda: cuda.write_kv(torch.randn(4, 3, D), torch.randn(4, 3, D), kc, vc, slots),
        "k must be contiguous in its last dim": lambda: cuda.write_kv(torch.randn(4, D, 2).transpose(1, 2), kv,
                                                                      kc, vc, slots),
        "k_cache must be contiguous in its last dim": lambda: cuda.write_kv(
            kv, kv, torch.randn(2, 2, D, 16).transpose(2, 3), torch.randn(2, 2, D, 16).transpose(2, 3), slots),
        "different devices": lambda: cuda.write_kv(kv, kv, kc, vc, slots.to("meta")),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_write_kv_calls()))
def test_bad_write_kv_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_write_kv_calls()[message]()


# ---- on a GPU: gpt2fast._C at GPT-2 124M decode shapes ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_decode_at_gpt2_124m_shapes(batch, dtype):
    gen = torch.Generator().manual_seed(batch)
    lengths = [1024] if batch == 1 else torch.randint(1, 1025, (batch,), generator=gen).tolist()
    lengths[-1] = 1024
    # tables padded to the engine's width, n_positions / block_size = 64 pages
    q, k_cache, v_cache, meta = _decode_case([(n, True) for n in lengths], 12, 16, dtype, seed=batch,
                                             device="cuda", max_context=1024)  # fmt: skip
    _check_attention(q, k_cache, v_cache, meta, dtype)
    qkv = _random((batch, 3, 12, D), dtype, gen, "cuda")  # (B, 3, H, D): this step's k and v
    k_pool, v_pool = k_cache.clone(), v_cache.clone()
    _check_write_kv(qkv[:, 1], qkv[:, 2], k_pool, v_pool, meta.slot_mapping)
