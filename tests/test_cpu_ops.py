"""The native CPU kernels (``gpt2fast/ops/cpu.py`` over ``csrc/cpu``) vs the spec ``gpt2fast.ops.reference``.

Every test runs on each instruction set this machine has (``ISAS``: AVX-512 with VNNI/BF16, AVX2, portable),
over odd shapes: K not a multiple of 16 or 64, rows 1..17, odd vocabularies, strided inputs. int8 weights with
the VNNI path quantize activations per row; those results are checked against the reference within the bound
that rounding implies (half a step of the row's scale times ``sum |w|``) and, tightly, against a float64
model of the same arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import CPU, cpu, get_ops, reference
from gpt2fast.quant import Int8Weight, quantize_int8, to_panels

# Every `pip install` builds the module: a missing one is a failure here, not a skip.
assert cpu.available(), cpu.unavailable_reason()

ISAS = cpu.supported_isas()
ROWS = [1, 2, 3, 4, 5, 8, 9, 17, 70]  # 70: a tile of 64 rows and a partial one
SHAPES = [(1, 1), (7, 3), (40, 17), (77, 65), (130, 9), (200, 130)]  # (K, N)


@pytest.fixture(autouse=True)
def native_at_every_size(monkeypatch):
    """The native kernels at every row count (above LIBRARY_ROWS the backend calls torch: tested on its own)."""
    monkeypatch.setattr(cpu, "LIBRARY_ROWS", 1 << 30)


@pytest.fixture(params=ISAS)
def isa(request):
    previous = cpu.isa()
    cpu.select_isa(request.param)
    yield request.param
    cpu.select_isa(previous)


def _inputs(rows: int, k: int, n: int, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2 * k + 3, generator=gen)[:, 1 : 2 * k + 1 : 2]  # strided rows and columns
    w, b = torch.randn(n, k, generator=gen) / math.sqrt(k), torch.randn(n, generator=gen)
    residual = torch.randn(rows, n, generator=gen)
    ln = (torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen) * 0.1)
    return x.to(dtype), w.to(dtype), b.to(dtype), residual.to(dtype), tuple(t.to(dtype) for t in ln)


def _vnni_model(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """float64 model of the VNNI path: rows quantized symmetrically to int8, exact integer dots, both scales."""
    x64 = x.double()
    amax = x64.abs().amax(dim=1, keepdim=True)  # (M, 1)
    scale = torch.where(amax > 0, (amax.float() / 127).double(), torch.ones_like(amax))
    xq = torch.clamp(torch.round(x64 / scale), -127, 127)  # (M, K)
    return (xq @ w.q.double().T) * scale * w.scale.double()[None, :]  # (M, N)


def _int8_bound(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """|VNNI result - fp32 result| <= half a quantization step of each row times sum_k |w[n, k]| (+ fp32 slack)."""
    step = x.double().abs().amax(dim=1, keepdim=True) / 127  # (M, 1)
    return 0.5 * step * w.dequantize().double().abs().sum(dim=1)[None, :] + 1e-4  # (M, N)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("epilogue", ["none", "bias", "gelu", "residual", "ln+gelu", "ln+bias"])
def test_linear_fp32_matches_reference(isa, rows, k, n, epilogue):
    x, w, b, residual, ln = _inputs(rows, k, n, seed=rows * 1000 + k * 7 + n)
    bias = None if epilogue == "none" else b
    if epilogue.startswith("ln"):
        y = cpu.ln_linear(x, *ln, 1e-5, w, bias, gelu="gelu" in epilogue)
        expected = reference.ln_linear(x, *ln, 1e-5, w, bias, gelu="gelu" in epilogue)
    else:
        kwargs = dict(gelu="gelu" in epilogue, residual=residual if epilogue == "residual" else None)
        y, expected = cpu.linear(x, w, bias, **kwargs), reference.linear(x, w, bias, **kwargs)
    assert y.shape == (rows, n) and y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
@pytest.mark.parametrize("k, n", SHAPES)
def test_linear_bf16_matches_reference(isa, rows, k, n):
    x, w, b, residual, ln = _inputs(rows, k, n, seed=rows + k + n, dtype=torch.bfloat16)
    y = cpu.ln_linear(x, *ln, 1e-5, w, b, gelu=True)
    expected = reference.ln_linear(x, *ln, 1e-5, w, b, gelu=True)
    assert y.dtype == torch.bfloat16
    # fp32 sums in another order, one rounding to bf16 each: at most a bf16 step apart (2**-8 relative)
    torch.testing.assert_close(y.float(), expected.float(), atol=1e-3, rtol=2**-7)
    y = cpu.linear(x, w, b, residual=residual)
    torch.testing.assert_close(y.float(), reference.linear(x, w, b, residual=residual).float(), atol=1e-3, rtol=2**-7)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k, n", SHAPES)
def test_linear_int8_matches_reference(isa, rows, k, n):
    x, w, b, residual, _ = _inputs(rows, k, n, seed=3 * rows + k + n)
    q = quantize_int8(w)
    y = cpu.linear(x, q, b, residual=residual)
    expected = reference.linear(x, q.dequantize(), b, residual=residual)
    if cpu.int8_method() == "vnni":
        products = y - b - residual
        assert bool(((products.double() - (expected - b - residual).double()).abs() <= _int8_bound(x, q)).all())
        torch.testing.assert_close(products.double(), _vnni_model(x, q), atol=2e-5, rtol=1e-5)
    else:  # weights widened in registers: the reference's arithmetic
        torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-5)


PANEL_SHAPES = [(4, 1), (12, 17), (40, 16), (68, 97), (200, 130), (772, 33)]  # (K, N): K a multiple of 4 only


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k, n", PANEL_SHAPES)
def test_linear_int8_panels(isa, rows, k, n):
    """int8 weights in panels (quant.to_panels): VNNI's sums are exactly those of the (N, K) rows; the other
    instruction sets read the panels with plain loops, the reference's arithmetic."""
    x, w, b, residual, ln = _inputs(rows, k, n, seed=5 * rows + k + n)
    rows_q = quantize_int8(w)
    panels = Int8Weight(to_panels(rows_q.q), rows_q.scale)
    y = cpu.linear(x, panels, b, residual=residual)
    if cpu.int8_method() == "vnni":
        assert torch.equal(y, cpu.linear(x, rows_q, b, residual=residual))
        torch.testing.assert_close((y - b - residual).double(), _vnni_model(x, rows_q), atol=2e-5, rtol=1e-5)
        normed = reference.layer_norm(x, *ln, 1e-5)
        assert torch.equal(cpu.ln_linear(x, *ln, 1e-5, panels, b, gelu=True),
                           cpu.ln_linear(x, *ln, 1e-5, rows_q, b, gelu=True))
        assert bool(((cpu.linear(normed, panels, None).double() - reference.linear(normed, rows_q.dequantize(), None))
                     .abs() <= _int8_bound(normed, rows_q)).all())
    else:
        torch.testing.assert_close(y, reference.linear(x, rows_q.dequantize(), b, residual=residual), atol=2e-5,
                                   rtol=1e-5)


def test_linear_int8_panels_refuse_a_wrong_shape():
    q = quantize_int8(torch.randn(20, 8))
    with pytest.raises(ValueError, match=r"int8 panels for \(20, 8\) must be \(2, 2, 16, 4\)"):
        cpu.linear(torch.randn(2, 8), Int8Weight(to_panels(q.q)[:1], q.scale), None)


@pytest.mark.parametrize("k, panels", [(77, False), (76, True)])
def test_linear_int8_bf16_activations(isa, k, panels):
    x, w, b, _, ln = _inputs(5, k, 33, seed=11, dtype=torch.bfloat16)
    q = quantize_int8(w.float())
    weight = Int8Weight(to_panels(q.q), q.scale) if panels else q
    y = cpu.ln_linear(x, *ln, 1e-5, weight, b)
    normed = reference.layer_norm(x, *ln, 1e-5)  # (5, K) bf16, what the kernel quantizes
    assert y.dtype == torch.bfloat16
    expected = reference.linear(normed, q.dequantize(torch.bfloat16), b).float()  # bf16 dequantized: a bf16 model
    bound = (_int8_bound(normed.float(), q) if cpu.int8_method() == "vnni" else 0) + expected.abs() * 2**-7 + 1e-2
    assert bool(((y.float() - expected).abs() <= bound).all())


def test_linear_nonfinite_rows_stay_nonfinite(isa):
    x, w, b, _, _ = _inputs(3, 40, 17, seed=5)
    x = x.contiguous()
    x[1, 7] = float("nan")
    q = quantize_int8(w)
    for weight in (w, q, Int8Weight(to_panels(q.q), q.scale), w.bfloat16()):
        xx = x.to(torch.bfloat16) if isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 else x
        y = cpu.linear(xx, weight, b.to(xx.dtype)).float()
        assert y[1].isnan().all() and y[[0, 2]].isfinite().all()


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
@pytest.mark.parametrize("vocab", [1, 7, 97, 1013])
def test_lm_head_family(isa, rows, vocab):
    gen = torch.Generator().manual_seed(rows * vocab)
    x, wte = torch.randn(rows, 48, generator=gen), torch.randn(vocab, 48, generator=gen)
    torch.testing.assert_close(cpu.lm_head(x, wte), reference.lm_head(x, wte), atol=1e-4, rtol=1e-5)
    assert torch.equal(cpu.lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
    temperature = torch.tensor([0.0, 0.8, 1.5, 0.0, 1.0, 0.3, 2.0, 0.9] * 3)[:rows]
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 2**40 + 5  # seeds with high words
    for temps in (temperature, temperature + 0.5):
        assert torch.equal(cpu.lm_head_gumbel(x, wte, temps, seeds), reference.lm_head_gumbel(x, wte, temps, seeds))


def test_lm_head_argmax_ties_go_to_the_lowest_id(isa):
    wte = torch.eye(5)[[0, 1, 1, 3, 1]] * 2.0  # ids 1, 2 and 4 tie for row 0
    x = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    assert cpu.lm_head_argmax(x, wte).tolist() == [1, 3]


def test_lm_head_argmax_follows_numpy_on_nan_and_inf(isa):
    gen = torch.Generator().manual_seed(9)
    x, wte = torch.randn(3, 16, generator=gen), torch.randn(301, 16, generator=gen)
    wte[150], wte[200] = float("nan"), float("nan")  # NaN logits at 150 and 200 (two tiles): the first wins
    x[2] = float("-inf")  # a row of -inf and NaN logits
    assert torch.equal(cpu.lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
    assert cpu.lm_head_argmax(x, wte).tolist()[:2] == [150, 150]


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("panels", [False, True])
def test_lm_head_int8(isa, rows, panels):
    gen = torch.Generator().manual_seed(rows)
    x, wte = torch.randn(rows, 72, generator=gen), quantize_int8(torch.randn(301, 72, generator=gen))
    if panels:  # 301 = 18 panels and 13 channels of a 19th
        rows_wte, wte = wte, Int8Weight(to_panels(wte.q), wte.scale)
        if cpu.int8_method() == "vnni":
            assert torch.equal(cpu.lm_head(x, wte), cpu.lm_head(x, rows_wte))
    logits = cpu.lm_head(x, wte)
    expected = reference.lm_head(x, wte.dequantize())
    if cpu.int8_method() == "vnni":
        assert bool(((logits.double() - expected.double()).abs() <= _int8_bound(x, wte)).all())
    else:
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
    # the fused pick sees the very logits lm_head returns
    assert torch.equal(cpu.lm_head_argmax(x, wte), logits.argmax(dim=-1))
    temps, seeds = torch.full((rows,), 0.7), torch.arange(rows, dtype=torch.int64) + 99
    scores = logits / 0.7 + reference.gumbel_from_uniform(reference.philox_uniform(seeds, 301))
    assert torch.equal(cpu.lm_head_gumbel(x, wte, temps, seeds), scores.argmax(dim=-1))


# (context lengths, block size, heads, head dim): partial blocks, one long context among short ones.
DECODE_CASES = [([1], 16, 2, 8), ([5, 17, 33], 16, 3, 24), ([300, 2, 64], 16, 12, 64), ([9, 40], 5, 4, 17)]


@pytest.mark.parametrize("lens, block_size, heads, dim", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_reference(isa, lens, block_size, heads, dim, dtype):
    gen = torch.Generator().manual_seed(sum(lens) + dim)
    tables, next_block = [], 0
    for length in lens:
        n = -(-length // block_size)
        tables.append(list(range(next_block + n - 1, next_block - 1, -1)))  # blocks in reverse: the table matters
        next_block += n
    cache_shape = (next_block + 1, heads, block_size, dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    qkv = torch.randn(len(lens), 3, heads, dim, generator=gen).to(dtype)  # a fused projection's views
    q, k, v = qkv.unbind(1)
    meta = AttentionMetadata.build(tables, lens, [1] * len(lens), block_size=block_size)
    k2, v2 = k_cache.clone(), v_cache.clone()
    out = cpu.write_kv_attention(q, k, v, k_cache, v_cache, meta, dim**-0.5)
    expected = reference.write_kv_attention(q, k, v, k2, v2, meta, dim**-0.5)
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(out.float(), expected.float(), **tol)


def test_prefill_attention_goes_to_the_torch_backend():
    kc = torch.randn(4, 2, 16, 8)
    vc = torch.randn_like(kc)
    meta = AttentionMetadata.build([[0, 1]], [20], [4], block_size=16)
    q, k, v = torch.randn(3, 4, 2, 8).unbind(0)
    out = cpu.write_kv_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.3)
    torch.testing.assert_close(out, reference.write_kv_attention(q, k, v, kc, vc, meta, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_sized_linears_go_to_torch(monkeypatch, dtype):
    monkeypatch.setattr(cpu, "LIBRARY_ROWS", 16)
    x, w, b, residual, ln = _inputs(40, 77, 33, seed=8, dtype=dtype)
    called = []
    monkeypatch.setattr(cpu._cpu, "linear", lambda *args: called.append(args))
    got = cpu.ln_linear(x, *ln, 1e-5, w, b, gelu=True), cpu.linear(x, w, b, residual=residual)
    expected = reference.ln_linear(x, *ln, 1e-5, w, b, gelu=True), reference.linear(x, w, b, residual=residual)
    assert not called
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2**-6)  # bf16: 2 roundings
    for y, e in zip(got, expected):
        torch.testing.assert_close(y.float(), e.float(), **tol)
    assert cpu.linear(x, quantize_int8(w.float()), b).dtype == dtype and len(called) == 1  # int8: native at any size


def test_bad_inputs_raise_value_errors():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="x must be"):
        cpu.linear(torch.randn(2, 9), w, None)
    with pytest.raises(ValueError, match="bias must be"):
        cpu.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="residual must be"):
        cpu.linear(x, w, None, residual=torch.randn(3, 3))
    with pytest.raises(ValueError, match="must be on the CPU"):
        cpu.linear(x.to("meta"), w, None)
    with pytest.raises(ValueError, match="not available"):
        cpu.select_isa("avx1024")


def test_attention_and_lm_head_refuse_bad_inputs():
    kc = torch.randn(2, 2, 4, 8)
    q, k, v = torch.randn(3, 1, 2, 8).unbind(0)
    meta = AttentionMetadata.build([[0]], [3], [1], block_size=4)
    with pytest.raises(ValueError, match="k_cache must be"):
        cpu.write_kv_attention(q, k, v, torch.randn(2, 1, 4, 8), kc.clone(), meta, 0.3)  # 1 head for 2
    with pytest.raises(ValueError, match="v_cache must be"):
        cpu.write_kv_attention(q, k, v, kc.clone(), kc.bfloat16(), meta, 0.3)
    for field, value in (("block_tables", 10**8), ("seq_lens", 10**6), ("slot_mapping", 10**6)):
        bad = AttentionMetadata.build([[0]], [3], [1], block_size=4)  # valid, then one field broken
        getattr(bad, field).view(-1)[0] = value
        with pytest.raises(ValueError, match="decode attention"):
            cpu.write_kv_attention(q, k, v, kc.clone(), kc.clone(), bad, 0.3)
    x, wte = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="both temperature and seeds"):
        cpu.lm_head_gumbel(x, wte, torch.ones(2), None)
    with pytest.raises(ValueError, match="empty vocabulary"):
        cpu.lm_head_argmax(x, torch.randn(0, 8))


def test_nan_temperature_draws_like_the_reference():
    x, wte = torch.randn(1, 8), torch.randn(50, 8)
    t, s = torch.tensor([float("nan")]), torch.tensor([3])
    assert torch.equal(cpu.lm_head_gumbel(x, wte, t, s), reference.lm_head_gumbel(x, wte, t, s))


def test_bf16_weights_with_fp32_activations_are_widened_not_rounded(isa):
    x, w, b, _, _ = _inputs(3, 77, 20, seed=4)
    wb = w.bfloat16()
    torch.testing.assert_close(cpu.linear(x, wb, b), reference.linear(x, wb, b), atol=2e-5, rtol=1e-5)


def test_bf16_lm_head_keeps_fp32_logits_at_any_row_count(monkeypatch):
    monkeypatch.setattr(cpu, "LIBRARY_ROWS", 16)
    x, wte = torch.randn(20, 32).bfloat16(), torch.randn(300, 32).bfloat16()
    torch.testing.assert_close(cpu.lm_head(x, wte), reference.lm_head(x, wte), atol=1e-4, rtol=1e-5)


def test_other_dtypes_run_the_torch_backend():
    x, w, b = torch.randn(3, 8).half(), torch.randn(5, 8).half(), torch.randn(5).half()
    assert not cpu.native(x, w)
    torch.testing.assert_close(cpu.linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True))
    assert torch.equal(cpu.lm_head_argmax(x, w), reference.lm_head_argmax(x, w))


def test_auto_picks_the_cpu_backend_on_a_cpu():
    device = torch.device("cpu")
    assert get_ops("auto", device) is CPU and get_ops("cpu", device) is CPU
    assert CPU.linear is cpu.linear and CPU.lm_head_argmax is cpu.lm_head_argmax


@pytest.mark.parametrize("n", [16, 19])  # a whole vector, and a scalar tail
def test_gelu_epilogue_over_the_whole_range(isa, n):
    """The vector exp under the GELU epilogue (csrc/cpu/rows.h) from -1e30 to 1e30, zero, NaN and infinities,
    against torch's tanh-GELU. The bias carries the values (a NaN in x would spread over its whole row); x @ W.T
    adds a small random term so each row differs."""
    values = torch.tensor([-1e30, -300.0, -88.5, -87.0, -30.0, -9.3, -3.0, -1.0, -1e-3, 0.0, 1e-3, 0.7, 2.5, 10.0,
                           44.4, 88.5, 300.0, 1e30, float("inf"), float("-inf"), float("nan")])
    values = torch.cat([values, torch.linspace(-12, 12, 4 * n)])
    gen = torch.Generator().manual_seed(7)
    w = torch.eye(n) * 1e-3
    for start in range(0, len(values) - n + 1, n // 2):
        b = values[start : start + n]
        x = torch.randn(3, n, generator=gen)
        got, want = cpu.linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True)  # (3, n)
        finite = torch.isfinite(b).expand_as(got)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.isnan(got[~finite]), torch.isnan(want[~finite]))
        assert torch.equal(got[~finite].nan_to_num(0.0), want[~finite].nan_to_num(0.0))  # the infinities
