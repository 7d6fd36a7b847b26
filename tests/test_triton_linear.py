"""Triton linear (prefill tiles and the one-launch decode split-K GEMV, each epilogue) vs
``gpt2fast.ops.reference.linear``, and the split-K ticket counters it shares with the decode attention.

On CPU these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); shapes stay
small. The interpreter runs programs one at a time, so no test here can see a race between the split
programs: the memory ordering is argued in the kernel's comments. What the tests do pin down: every
split's partial is merged exactly once (bit-identical results across forced split counts on inputs
whose sums are exact), every workspace slot is written before it is read (NaN-poisoned buffers), and
the counters are back to zero after every call. ``gpu``-marked tests repeat the checks on CUDA at
GPT-2 124M / 1.5B shapes in fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast.ops import reference
from gpt2fast.ops.triton import available, unavailable_reason
from tests.triton_programs import needs_interpreter, run_programs_in

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton import counters
    from gpt2fast.ops.triton import linear as linear_module
    from gpt2fast.ops.triton.linear import (
        BLOCK_K_DECODE,
        BLOCK_N_DECODE,
        DECODE_MAX_ROWS,
        PREFILL_TILES,
        decode_split,
        linear,
        prefill_tile,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rows, K, N): rows <= 64 take the split-K decode path (row tile 16, or 64 above 16 rows), more rows the
# tl.dot tiles. Odd and GPT-2-like widths; (2, 768, 96) and (16, 300, 200) split K several ways.
SHAPES = [(1, 96, 96), (3, 97, 131), (16, 300, 200), (2, 768, 96), (17, 96, 131), (64, 300, 70), (65, 200, 70),
          (111, 97, 131)]
ROWS_ONLY = [1, 3, 17, 111]
EPILOGUES = {
    "bias": dict(bias=True),
    "bias_gelu": dict(bias=True, gelu=True),
    "bias_residual": dict(bias=True, residual=True),
    "no_bias": dict(),
    "gelu_residual": dict(bias=True, gelu=True, residual=True),
}
# dtype -> tolerance relative to the largest |reference| (used as atol scale) and rtol. fp32: ~1e-5
# (summation order only). fp16: one rounding of the output (2**-10) plus the reference's own rounding.
# bf16: the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), so up to 2 bf16 ulps (2**-7 each).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3.2e-2}
ETYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _inputs(rows, k, n, dtype, seed=0, strided=False):
    """x (T, K) with rows of stride 2K when ``strided``; weight ~ N(0, 1/K) so outputs are O(1); bias, residual."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows * (2 if strided else 1), k, generator=g).to(DEVICE, dtype)  # (T or 2T, K)
    x = x[::2] if strided else x  # sliced after the cast, which would copy it contiguous
    w = torch.randn(n, k, generator=g) / k**0.5  # (N, K)
    b = torch.randn(n, generator=g)  # (N,)
    r = torch.randn(rows, n, generator=g)  # (T, N)
    return [x] + [t.to(DEVICE, dtype) for t in (w, b, r)]


def _check(x, w, b, r, dtype, spec):
    bias = b if spec.get("bias") else None
    residual = r if spec.get("residual") else None
    gelu = spec.get("gelu", False)
    got = linear(x, w, bias, gelu=gelu, residual=residual)
    want = reference.linear(x, w, bias, gelu=gelu, residual=residual)
    assert got.dtype == dtype and got.shape == want.shape
    tol = TOLERANCE[dtype]
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_fp32_matches_reference(shape, epilogue):
    x, w, b, r = _inputs(*shape, torch.float32)
    _check(x, w, b, r, torch.float32, EPILOGUES[epilogue])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epilogue", ["bias_gelu", "bias_residual", "no_bias"])
@pytest.mark.parametrize("rows", ROWS_ONLY)
def test_linear_half_matches_reference(rows, epilogue, dtype):
    x, w, b, r = _inputs(rows, 97, 131, dtype, seed=rows)
    _check(x, w, b, r, dtype, EPILOGUES[epilogue])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [3, 17, 111])  # decode with row tiles 16 and 64, prefill
def test_linear_strided_rows(rows, dtype):
    x, w, b, r = _inputs(rows, 96, 131, dtype, seed=7, strided=True)
    assert x.stride(0) == 2 * 96
    r = torch.randn(rows, 2 * 131, device=DEVICE).to(dtype)[:, :131]  # residual rows of stride 2N too
    _check(x, w, b, r, dtype, EPILOGUES["gelu_residual"])


@pytest.mark.parametrize("tile", sorted(set(PREFILL_TILES["fp16"])) if available() else [], ids=str)
def test_every_half_prefill_tile_matches_reference(tile, monkeypatch):
    """Each tile the shape rule can pick, forced on a 111-row prefill with bias + GELU + residual."""
    monkeypatch.setattr(linear_module, "prefill_tile", lambda etype, t, n, w_int8=False: tile)
    x, w, b, r = _inputs(111, 97, 131, torch.float16, seed=11)
    _check(x, w, b, r, torch.float16, EPILOGUES["gelu_residual"])


@pytest.mark.parametrize(
    "t, n, tile",
    [(2048, 3072, (128, 128)), (2048, 768, (64, 128)), (512, 2304, (64, 128)), (512, 768, (64, 64)),
     (1024, 1600, (64, 128)), (100, 6400, (64, 64)), (4096, 1600, (128, 128))],
)
def test_prefill_tile_is_the_largest_that_gives_an_h100_one_program_per_sm(t, n, tile):
    bm, bn, _, _ = prefill_tile("fp16", t, n)
    assert (bm, bn) == tile
    if tile != PREFILL_TILES["fp16"][-1][:2]:
        assert -(-t // bm) * -(-n // bn) >= 132


def test_prefill_tile_falls_back_to_the_smallest():
    assert prefill_tile("bf16", 20, 96) == PREFILL_TILES["bf16"][-1]  # too small to fill: the smallest tile
    assert prefill_tile("fp32", 4096, 4096) == PREFILL_TILES["fp32"][0]


def test_decode_split_fills_an_h100():
    """The split rule: every GPT-2 124M decode linear gets >= 132 programs (one per H100 SM)."""
    for n, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072)):
        splits, k_per_split = decode_split(n, k)
        assert -(-n // 32) * splits >= 132
        assert k_per_split * splits >= k > k_per_split * (splits - 1)  # no empty split
    assert decode_split(96, 96) == (1, 128)
    assert decode_split(768, 768, block_k=32) == (8, 96)  # fp32 steps K by 32


def test_linear_is_deterministic_and_empty_rows_work():
    x, w, b, r = _inputs(DECODE_MAX_ROWS, 300, 200, torch.float32, seed=3)
    first = linear(x, w, b, gelu=True)
    assert torch.equal(first, linear(x, w, b, gelu=True))  # split-K partials are summed in a fixed order
    assert linear(x[:0], w, b).shape == (0, 200)


def test_linear_rejects_mixed_dtypes_and_shapes():
    x, w, b, _ = _inputs(3, 96, 96, torch.float32)
    with pytest.raises(ValueError, match="bias has dtype"):
        linear(x, w, b.half())
    with pytest.raises(ValueError, match="x must be"):
        linear(x, w[:, :95], b)
    with pytest.raises(ValueError, match="residual must be"):
        linear(x, w, b, residual=torch.zeros(3, 95, device=DEVICE))


# ---- GPU: GPT-2 124M and 1.5B shapes -------------------------------------------------------------------

GPT2_LINEARS = {  # (K, N) of c_attn, attn c_proj, c_fc, mlp c_proj
    "124M": [(768, 2304), (768, 768), (768, 3072), (3072, 768)],
    "1.5B": [(1600, 4800), (1600, 1600), (1600, 6400), (6400, 1600)],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 8, 16, 64, 512])
@pytest.mark.parametrize("model", GPT2_LINEARS)
def test_linear_gpt2_shapes_gpu(model, rows, dtype):
    for k, n in GPT2_LINEARS[model]:
        x, w, b, r = _inputs(rows, k, n, dtype, seed=k + n)
        for spec in EPILOGUES.values():
            _check(x, w, b, r, dtype, spec)


def _poisoned_empty(real_empty):
    """``torch.empty`` that fills floats with NaN and ints with -7: an element a kernel forgets to write shows."""

    def empty(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    return empty


@pytest.mark.parametrize("shape", [(3, 300, 200), (17, 97, 131), (65, 97, 131)], ids=str)
def test_linear_writes_every_output_and_partial(shape, monkeypatch):
    """Outputs and the split-K workspace start as NaN: a partial or output left unwritten would survive."""
    x, w, b, r = _inputs(*shape, torch.float32, seed=11)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    _check(x, w, b, r, torch.float32, EPILOGUES["gelu_residual"])


# ---- the one-launch split-K merge: tickets, fixed-order sums, counters -----------------------------------


def _counters_are_zero() -> bool:
    return int(counters.ticket_counters(DEVICE, 1).abs().sum()) == 0


def _force_splits(monkeypatch, splits: int):
    """Make linear() split K into ``splits`` chunks of whole BLOCK_K steps (the split rule picks its own S)."""

    def forced(n, k, block_k=128):
        steps = -(-k // block_k)
        assert steps % splits == 0, "choose a split count that divides the K steps: no empty split"
        return splits, steps // splits * block_k

    monkeypatch.setattr(linear_module, "decode_split", forced)


@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 300, 200), (17, 97, 131), (64, 300, 70)], ids=str)
def test_counters_are_zero_after_every_decode_call(shape):
    """The last program of each N slice puts its counter back to 0, so the next launch (or graph replay) starts
    from zeros; (1, 96, 96) has one split and draws no ticket at all."""
    x, w, b, r = _inputs(*shape, torch.float32, seed=5)
    splits = decode_split(shape[2], shape[1], BLOCK_K_DECODE["fp32"])[0]
    assert (splits > 1) == (shape[1] > 32)
    for _ in range(2):
        _check(x, w, b, r, torch.float32, EPILOGUES["gelu_residual"])
        assert _counters_are_zero()


def _integer_inputs(rows, k, n, dtype, seed):
    """Small integers: every product and partial sum is exact (|y| <= 4 K + 4 < 2**11, exact in fp16 too), so any
    order of summing the splits gives the same bits, and a split merged twice or never changes the result."""
    g = torch.Generator().manual_seed(seed)
    ints = lambda *shape: torch.randint(-2, 3, shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    return ints(rows, k), ints(n, k), ints(n), ints(rows, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [3, 17])  # row tiles 16 and 64
def test_results_are_bit_identical_across_split_counts(rows, dtype, monkeypatch):
    """Forced split counts, each called twice, all give the reference's exact integers (bias + residual, no
    GELU, so the outputs stay integers)."""
    k, n = 320, 70  # fp32: 10 K steps of 32 (S = 1, 2, 5, 10); fp16: 3 steps of 128 (S = 1, 3)
    x, w, b, r = _integer_inputs(rows, k, n, dtype, seed=rows)
    want = reference.linear(x, w, b, residual=r)
    assert want.abs().max() > 20  # not a degenerate case
    steps = -(-k // BLOCK_K_DECODE[ETYPE[dtype]])
    tried = [s for s in (1, 2, 3, 5, 10) if steps % s == 0]
    assert len(tried) >= 2
    for splits in tried:
        _force_splits(monkeypatch, splits)
        for _ in range(2):  # a second call: the same bits
            assert torch.equal(linear(x, w, b, residual=r), want), f"S={splits}"
        assert _counters_are_zero()


@needs_interpreter
@pytest.mark.parametrize("rows", [3, 17])
def test_the_same_bits_whichever_split_draws_the_last_ticket(rows, monkeypatch):
    """Random inputs, S = 10 (fp32) and 3 (fp16): programs run forward, in reverse and shuffled give identical
    results, because the last program sums the partials in split order, not arrival order."""
    for dtype in (torch.float32, torch.float16):
        x, w, b, r = _inputs(rows, 320, 131, dtype, seed=rows)
        assert decode_split(131, 320, BLOCK_K_DECODE[ETYPE[dtype]])[0] > 1
        outs = []
        for order in ("forward", "reverse", "shuffle"):
            run_programs_in(order, monkeypatch)
            outs.append(linear(x, w, b, gelu=True, residual=r))
            assert _counters_are_zero()
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        _check(x, w, b, r, dtype, EPILOGUES["gelu_residual"])


@pytest.mark.parametrize("splits", [2, 5, 10])
def test_forced_splits_write_every_partial_before_reading_it(splits, monkeypatch):
    """NaN-poisoned workspace and output at every forced split count: a partial the merge read before its
    program wrote it (or an output tile no program stored) would come out NaN."""
    _force_splits(monkeypatch, splits)
    x, w, b, r = _inputs(17, 320, 131, torch.float32, seed=splits)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    _check(x, w, b, r, torch.float32, EPILOGUES["gelu_residual"])
    assert _counters_are_zero()


def test_decode_linear_draws_tickets_only_when_it_splits(monkeypatch):
    """S > 1 asks for one counter per 32-wide N slice; with S = 1 the kernel never touches the counters: a
    buffer of nonzero counters stays as it was and the (NaN-poisoned) output is still written in full."""
    x, w, b, r = _inputs(3, 96, 131, torch.float32, seed=1)
    asked = []
    real = counters.ticket_counters
    monkeypatch.setattr(linear_module, "ticket_counters", lambda dev, slots: asked.append(slots) or real(dev, slots))
    _check(x, w, b, r, torch.float32, EPILOGUES["bias"])
    assert asked == [-(-131 // BLOCK_N_DECODE)]
    nonzero = torch.full((8,), 5, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(linear_module, "ticket_counters", lambda dev, slots: asked.append(slots) or nonzero)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    _force_splits(monkeypatch, 1)
    _check(x, w, b, r, torch.float32, EPILOGUES["bias"])
    assert torch.equal(nonzero, torch.full((8,), 5, dtype=torch.int32, device=DEVICE))
    assert asked[-1] == 1  # one split asks for no counters of its own (a graph capture never needs them to grow)


def test_ticket_counters_grow_keep_old_buffers_and_refuse_to_grow_in_capture(monkeypatch):
    monkeypatch.setattr(counters, "_BUFFERS", {})
    monkeypatch.setattr(counters, "_RETIRED", [])
    first = counters.ticket_counters(DEVICE, 3)
    assert first.numel() == counters.MIN_SLOTS and first.dtype == torch.int32 and not first.any()
    assert counters.ticket_counters(DEVICE, counters.MIN_SLOTS) is first  # large enough: the same buffer
    bigger = counters.ticket_counters(DEVICE, counters.MIN_SLOTS + 1)
    assert bigger.numel() >= counters.MIN_SLOTS + 1 and not bigger.any()
    assert counters._RETIRED == [first]  # a graph captured with the old address must stay valid
    monkeypatch.setattr(counters, "_capturing", lambda device: True)
    assert counters.ticket_counters(DEVICE, 5) is bigger  # no allocation needed: fine during capture
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        counters.ticket_counters(DEVICE, 10 * bigger.numel())
    monkeypatch.setattr(counters, "_BUFFERS", {})
    with pytest.raises(RuntimeError, match="warm-up"):
        counters.ticket_counters(DEVICE, 1)  # creating it in capture would record a fill into the graph


@pytest.mark.parametrize("n_embd", [768, 1024, 1280, 1600, 60, 96])
def test_split_rule_never_asks_for_more_counters_than_the_first_buffer(n_embd):
    """Only linears with fewer than 2 x 132 N slices split, so MIN_SLOTS counters always suffice: the buffer
    made on the first decode step never grows, before or during CUDA graph capture."""
    for k, n in ((n_embd, 3 * n_embd), (n_embd, n_embd), (n_embd, 4 * n_embd), (4 * n_embd, n_embd),
                 (n_embd, 50257), (n_embd, 9000)):
        for etype in ("fp32", "fp16"):
            if decode_split(n, k, BLOCK_K_DECODE[etype])[0] > 1:
                assert -(-n // BLOCK_N_DECODE) < counters.MIN_SLOTS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
def test_pdl_weight_prefetch_keeps_the_bits(ln, dtype, monkeypatch):
    """The PDL decode kernel loads its first weight tile before griddepcontrol.wait and takes it as its own first
    step: the same dots in the same order, so the same bits as without PDL. The interpreter cannot run griddepcontrol:
    PDL_PREFETCH_ONLY runs the prefetch and the order alone. Split K (6 splits of K = 768) and one split (K = 96)."""
    gen = torch.Generator().manual_seed(int(ln))
    for k, n in ((768, 72), (96, 40)):
        x = torch.randn(5, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
        b, res = torch.randn(n, generator=gen).to(dtype), torch.randn(5, n, generator=gen).to(dtype)
        g, h = (1 + 0.2 * torch.randn(k, generator=gen)).to(dtype), torch.randn(k, generator=gen).to(dtype)
        run = (lambda: linear_module.ln_linear(x, g, h, 1e-5, w, b, gelu=True)) if ln else (
            lambda: linear(x, w, b, residual=res))
        plain = run()
        monkeypatch.setattr(linear_module, "pdl_launch",
                            lambda device, etype: dict(PDL=linear_module.PDL_PREFETCH_ONLY.value))
        prefetched = run()
        monkeypatch.undo()
        assert torch.equal(prefetched, plain)
        if ln:
            torch.testing.assert_close(plain, reference.ln_linear(x, g, h, 1e-5, w, b, gelu=True), atol=3e-2, rtol=2e-2)
