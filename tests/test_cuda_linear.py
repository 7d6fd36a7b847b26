"""CUDA C++ decode linear (csrc/kernels/linear.cuh) and embedding (csrc/kernels/embed.cuh) vs
``gpt2fast.ops.reference``.

On CPU the kernels run through the emulated module (the same sources built by g++ against
csrc/emu/cuda_emu.h), in thread orders 0 (forward) and 1 (reverse), with outputs poisoned with NaN;
CI reruns this file under ASan+UBSan (``python -m gpt2fast.ops.cuda_build sanitized-pytest``), which
is where the out-of-range ids and misaligned pointers must stay silent. ``gpu``-marked tests repeat the
comparison with ``gpt2fast._C`` on CUDA at GPT-2 124M and 1.5B decode shapes.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import misaligned

from gpt2fast.ops import cuda, cuda_build, reference

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 3, 16]  # the three row buckets (1, <= 4, <= 16)
# (K, N): 96 the 16-byte path, 97 x 131 the scalar path (odd K) and a partial last block of outputs,
# K = 768 and 3072 GPT-2's (N cut down: the emulator runs N/4 blocks of 128 fibers per call)
SHAPES = [(96, 96), (97, 131), (768, 72), (3072, 36)]
EPILOGUES = {
    "bias": dict(bias=True),
    "bias+gelu": dict(bias=True, gelu=True),
    "bias+residual": dict(bias=True, residual=True),
    "no bias": dict(),
    "gelu+residual": dict(gelu=True, residual=True),
}
# dtype -> tolerance vs the fp32-upcast reference, on top of the fp32 term below. The kernel and the
# reference accumulate the same fp16/bf16 inputs in fp32 (another order) and round once, so they differ
# where the two fp32 values straddle a rounding boundary: one ulp of an O(1..8) output (fp16 2**-8 at 4,
# bf16 2**-5 at 4).
TOLERANCE = {
    torch.float32: dict(atol=0.0, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every ``out`` the wrappers allocate starts as NaN, so an element the kernel skips cannot pass."""


def _linear_inputs(rows: int, k: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """x ~ N(0.5, 1), weight ~ N(0, 1/K) (outputs O(1): GELU's curved part), bias, residual: never zero."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + torch.randn(rows, k, generator=g)  # (T, K)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)  # (N, K)
    b = torch.randn(n, generator=g)  # (N,)
    residual = torch.randn(rows, n, generator=g)  # (T, N)
    return [t.to(device, dtype) for t in (x, w, b, residual)]


def _expected_close(y, x, w, b, residual, gelu):
    """``y`` against reference.linear, with fp32 slack proportional to the row's magnitude:
    1e-5 x sum_k |x_k w_nk| (+ |bias| + |residual|), the size of the terms an fp32 sum reorders."""
    expected = reference.linear(x, w, b, gelu=gelu, residual=residual)
    magnitude = x.float().abs() @ w.float().abs().T  # (T, N)
    if b is not None:
        magnitude += b.float().abs()
    if residual is not None:
        magnitude += residual.float().abs()
    slack = 1e-5 * magnitude.max().item()
    tol = TOLERANCE[x.dtype]
    assert y.dtype == x.dtype and y.shape == expected.shape
    torch.testing.assert_close(y, expected, atol=tol["atol"] + slack, rtol=tol["rtol"])


def _run_epilogue(x, w, b, residual, epilogue: dict):
    bias = b if epilogue.get("bias") else None
    res = residual if epilogue.get("residual") else None
    gelu = epilogue.get("gelu", False)
    y = cuda.linear(x, w, bias, gelu=gelu, residual=res)  # (T, N)
    _expected_close(y, x, w, bias, res, gelu)
    return y


# ---- linear ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("rows", ROWS)
def test_linear_matches_reference_with_every_epilogue(rows, k, n, dtype, order):
    x, w, b, residual = _linear_inputs(rows, k, n, dtype, seed=rows * 31 + k + n)
    for epilogue in EPILOGUES.values():
        _run_epilogue(x, w, b, residual, epilogue)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_gpt2_xl_width(dtype, order):
    """K = 1600 (GPT-2 1.5B's width: 200 fp16 / 400 fp32 vectors per row), N cut down, GELU epilogue."""
    x, w, b, residual = _linear_inputs(3, 1600, 20, dtype, seed=1600)
    _run_epilogue(x, w, b, residual, EPILOGUES["bias+gelu"])


@pytest.mark.skipif(os.environ.get(cuda.SANITIZE_ENV) == "1", reason="the same code paths as the cut-down shapes; "
                    "13 s at -O0 under ASan")  # fmt: skip
@pytest.mark.parametrize("k,n", [(768, 768), (768, 2304)])
def test_linear_full_gpt2_widths(k, n, order):
    """Whole GPT-2 124M projections (qkv with bias, attn proj with the residual), 16 rows, fp16."""
    x, w, b, residual = _linear_inputs(16, k, n, torch.float16, seed=k + n)
    _run_epilogue(x, w, b, residual, EPILOGUES["bias" if n > k else "bias+residual"])


def check_strided_and_misaligned(rows: int, k: int, n: int, dtype: torch.dtype) -> None:
    """cuda.linear (bias + GELU + residual) on strided x (rows 2K + 8 apart: still 16-byte loads; K + 1 apart:
    scalar), a strided residual (rows n + 5 apart), and x or weight one element off a 16-byte boundary (scalar),
    each against the reference. ``rows``: how many rows each case has (x[::2] has them from 2 x rows)."""
    x, w, b, residual = _linear_inputs(2 * rows, k, n, dtype, seed=9)
    wide = torch.randn(rows, 2 * k + 8).to(dtype)
    odd = torch.randn(rows, k + 1).to(dtype)
    res_wide = torch.randn(rows, n + 5).to(dtype)[:, :n]
    cases = {
        "x[::2]": (x[::2], w, res_wide),
        "wide rows": (wide[:, :k], w, residual[:rows]),
        "odd row stride": (odd[:, :k], w, res_wide),
        "misaligned x": (misaligned(x[:rows]), w, residual[:rows]),
        "misaligned weight": (x[:rows], misaligned(w), res_wide),
    }
    for xs, ws, rs in cases.values():
        y = cuda.linear(xs, ws, b, gelu=True, residual=rs)
        _expected_close(y, xs, ws, b, rs, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_strided_rows_and_misaligned_pointers(dtype, order):
    """The decode GEMV's vector and scalar paths on strided and misaligned operands (3 rows, K = 768)."""
    check_strided_and_misaligned(3, 768, 44, dtype)


def check_deterministic(emu, rows: int, k: int, n: int, dtype: torch.dtype) -> None:
    """cuda.linear gives identical bits every call and in every thread order (fixed reduction order, no atomics)."""
    x, w, b, residual = _linear_inputs(rows, k, n, dtype, seed=4)
    results = []
    for order in (0, 1, 2, 3, 0):
        emu.set_order(order)
        results.append(cuda.linear(x, w, b, gelu=True, residual=residual))
    emu.set_order(-1)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_linear_is_deterministic_across_calls_and_thread_orders(emu):
    check_deterministic(emu, 16, 3072, 20, torch.float32)


def test_tanh_gelu_accuracy(emu):
    """The fused GELU, y / (1 + exp(-2z)) with expf, on y in [-12, 12] (K = 1, weight = y): max abs error
    5.1e-7 vs float64 (torch's fp32 tanh form: 4.3e-7), relative error <= 2.5e-6 where |y| <= 5 (torch's tanh
    form loses up to 30% of the tiny negative tail to cancellation in 1 + tanh)."""
    y = torch.linspace(-12, 12, 4801)  # (N,)
    out = cuda.linear(torch.ones(1, 1), y.view(-1, 1), None, gelu=True)[0].double()  # (N,)
    yd = y.double()
    truth = yd / (1 + torch.exp(-2 * math.sqrt(2 / math.pi) * (yd + 0.044715 * yd**3)))
    assert (out - truth).abs().max() < 6e-7
    assert (out - F.gelu(y, approximate="tanh").double()).abs().max() < 6e-7
    core = yd.abs() <= 5
    assert ((out - truth).abs() / truth.abs())[core].max() < 4e-6
    huge = torch.tensor([[1e30], [-1e30], [float("inf")]])  # y^3 overflows: z = +-inf
    edges = cuda.linear(torch.ones(1, 1), huge, None, gelu=True)  # (1, 3)
    assert torch.equal(edges, huge.view(1, 3).clamp_min(0))  # saturates to y or -0, no NaN


def test_no_idle_warps_at_gpt2_124m_widths(emu):
    """GPT-2 124M's K (768 in, 3072 into the MLP's projection) and 1024 (355M): every thread of a block gets the
    same number of 16-byte vectors, so no warp idles; K = 768 in fp16/bf16 (96 vectors) takes 3 warps, not 4."""
    for k in (768, 1024, 3072, 4096):
        for per_vector in (8, 4):  # fp16/bf16, fp32
            vecs = k // per_vector
            assert vecs % (32 * emu.gemv_warps(vecs)) == 0, (k, per_vector, emu.gemv_warps(vecs))
    assert emu.gemv_warps(768 // 8) == 3 and emu.gemv_warps(3072 // 8) == 4


def test_linear_empty_batch_and_row_limit(emu):
    """16 rows is the GEMV's limit (the module exports it); a 17-row linear is the GEMM's (test_cuda_gemm.py)."""
    assert emu.LINEAR_MAX_ROWS == cuda.LINEAR_MAX_ROWS == 16
    x, w, b, _ = _linear_inputs(17, 8, 5, torch.float32, seed=1)
    assert cuda.linear(x[:0], w, b).shape == (0, 5)
    with pytest.raises(ValueError, match="decode batches of at most 16 rows"):
        cuda.ln_linear(x, torch.ones(8), torch.zeros(8), 1e-5, w, b)


def _bad_linear_calls():
    x, w, b, r = _linear_inputs(4, 8, 6, torch.float32, seed=0)
    return {
        "x must be (T, K)": lambda: cuda.linear(x.view(2, 2, 8), w, b),
        "float64": lambda: cuda.linear(x.double(), w.double(), b.double()),
        "weight must be (N, 8)": lambda: cuda.linear(x, w[:, :7], b),
        "weight has dtype": lambda: cuda.linear(x, w.half(), b),
        "weight must be contiguous": lambda: cuda.linear(x, torch.randn(12, 8)[::2], b),
        "weight must be contiguous in its last dim": lambda: cuda.linear(x, torch.randn(8, 6).t(), b),
        "bias must be (6,)": lambda: cuda.linear(x, w, b[:5]),
        "bias has dtype": lambda: cuda.linear(x, w, b.half()),
        "bias must be contiguous": lambda: cuda.linear(x, w, torch.randn(12)[::2]),
        "residual must be (4, 6)": lambda: cuda.linear(x, w, b, residual=r[:3]),
        "residual has dtype": lambda: cuda.linear(x, w, b, residual=r.bfloat16()),
        "residual must be contiguous": lambda: cuda.linear(x, w, b, residual=torch.randn(6, 4).t()),
        "x must be contiguous": lambda: cuda.linear(torch.randn(8, 4).t(), w, b),
        "rows overlap": lambda: cuda.linear(x[:1].expand(4, 8), w, b),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_linear_calls()))
def test_linear_bad_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_linear_calls()[message]()


# ---- ln_linear: the GEMV with its LayerNorm prologue ------------------------------------------------


def _ln_inputs(k: int, dtype: torch.dtype, seed: int):
    """LayerNorm weight around 1 and bias around 0, never zero."""
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(k, generator=g)).to(dtype), (0.2 * torch.randn(k, generator=g)).to(dtype)


def _ln_expected_close(y, x, g, h, w, b, gelu):
    """``y`` against reference.ln_linear (LayerNorm rounded to x's dtype, then the linear); the fp32 slack as
    ``_expected_close``'s, over the normalised rows."""
    normed = reference.layer_norm(x, g, h, 1e-5)  # (T, K): reference.ln_linear is linear of this, by definition
    _expected_close(y, normed, w, b, None, gelu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("rows", ROWS)
def test_ln_linear_matches_reference(rows, k, n, dtype, order):
    """Every row bucket, both load paths (K = 97: scalar), GELU and bias on and off; x with a large mean (a
    one-pass variance would cancel it away)."""
    x, w, b, _ = _linear_inputs(rows, k, n, dtype, seed=rows * 7 + k + n)
    x = (x.float() * 3 + 20).to(dtype)  # mean ~21.5, spread ~3
    g, h = _ln_inputs(k, dtype, seed=k)
    for bias, gelu in ((b, False), (b, True), (None, True)):
        y = cuda.ln_linear(x, g, h, 1e-5, w, bias, gelu=gelu)
        _ln_expected_close(y, x, g, h, w, bias, gelu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ln_linear_strided_rows_and_misaligned_vectors(dtype, order):
    """x rows 2K + 8 apart (16-byte path), x or a LayerNorm vector one element off 16 bytes (scalar path)."""
    k, n = 768, 20
    x, w, b, _ = _linear_inputs(5, k, n, dtype, seed=3)
    g, h = _ln_inputs(k, dtype, seed=4)
    wide = torch.randn(5, 2 * k + 8).to(dtype)
    cases = [(wide[:, :k], g, h), (misaligned(x), g, h), (x, misaligned(g[None])[0], h), (x, g, misaligned(h[None])[0])]
    for xs, gs, hs in cases:
        y = cuda.ln_linear(xs, gs, hs, 1e-5, w, b, gelu=True)
        _ln_expected_close(y, xs, gs, hs, w, b, True)


def test_ln_linear_is_one_launch_and_equals_the_two_kernel_composition(emu):
    """fp32: the fused GEMV against the CUDA LayerNorm then the CUDA linear (two launches); their statistics'
    sums run in other orders, so within fp32 rounding, not bit for bit."""
    x, w, b, _ = _linear_inputs(4, 96, 40, torch.float32, seed=11)
    g, h = _ln_inputs(96, torch.float32, seed=12)
    before = emu.launch_count()
    y = cuda.ln_linear(x, g, h, 1e-5, w, b, gelu=True)
    assert emu.launch_count() - before == 1
    torch.testing.assert_close(y, cuda.linear(cuda.layer_norm(x, g, h, 1e-5), w, b, gelu=True), atol=2e-5, rtol=1e-5)


def _bad_ln_linear_calls():
    x, w, b, _ = _linear_inputs(4, 8, 6, torch.float32, seed=0)
    g, h = _ln_inputs(8, torch.float32, seed=1)
    return {
        "at most 16 rows": lambda: cuda.ln_linear(torch.randn(17, 8), g, h, 1e-5, w, b),
        "ln_weight must be (8,)": lambda: cuda.ln_linear(x, g[:7], h, 1e-5, w, b),
        "ln_bias has dtype": lambda: cuda.ln_linear(x, g, h.half(), 1e-5, w, b),
        "ln_weight must be contiguous": lambda: cuda.ln_linear(x, torch.randn(16)[::2], h, 1e-5, w, b),
        "LayerNorm needs K >= 1": lambda: cuda.ln_linear(x[:, :0], g[:0], h[:0], 1e-5, w[:, :0], b),
        "weight must be (N, 8)": lambda: cuda.ln_linear(x, g, h, 1e-5, w[:, :7], b),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_ln_linear_calls()))
def test_ln_linear_bad_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_ln_linear_calls()[message]()


# ---- embed -------------------------------------------------------------------------------------


def _embed_inputs(tokens: int, width: int, dtype: torch.dtype, seed: int, vocab: int = 257, n_pos: int = 131,
                  device: str = "cpu"):  # fmt: skip
    """Random ids over the whole vocabulary (first and last row included) and positions over the whole table."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (tokens,), generator=g)  # (T,) int64, as the model passes them
    ids[0], ids[-1] = vocab - 1, 0
    positions = torch.randint(0, n_pos, (tokens,), generator=g)  # (T,)
    positions[-1] = n_pos - 1
    wte = torch.randn(vocab, width, generator=g)  # (V, C)
    wpe = 0.5 * torch.randn(n_pos, width, generator=g)  # (P, C)
    return ids.to(device), positions.to(device), wte.to(device, dtype), wpe.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [96, 97, 768, 1600])
@pytest.mark.parametrize("tokens", [1, 3, 17, 111])
def test_embed_matches_reference(tokens, width, dtype, order):
    ids, positions, wte, wpe = _embed_inputs(tokens, width, dtype, seed=tokens + width)
    out = cuda.embed(ids, positions, wte, wpe)  # (T, C)
    assert out.dtype == dtype and out.shape == (tokens, width)
    # one fp32 add of the same two values, one rounding: bit-identical to the reference
    torch.testing.assert_close(out, reference.embed(ids, positions, wte, wpe), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embed_misaligned_tables_strided_ids_and_int32(dtype, order):
    ids, positions, wte, wpe = _embed_inputs(17, 768, dtype, seed=2)
    expected = reference.embed(ids, positions, wte, wpe)
    packed = torch.stack([ids, positions])  # (2, T)
    strided = torch.stack([ids, positions], dim=1)  # (T, 2): ids and positions 2 apart
    wide = torch.randn(wte.shape[0], 776).to(dtype)  # rows 776 apart: still 16-byte aligned
    wide[:, :768] = wte
    cases = {
        "misaligned wte": (ids, positions, misaligned(wte), wpe),
        "misaligned wpe": (ids, positions, wte, misaligned(wpe)),
        "strided ids": (strided[:, 0], strided[:, 1], wte, wpe),
        "int32": (packed[0].int(), packed[1].int(), wte, wpe),
        "strided table rows": (ids, positions, wide[:, :768], wpe),
    }
    for name, args in cases.items():
        torch.testing.assert_close(cuda.embed(*args), expected, atol=0, rtol=0, msg=name)


def test_embed_out_of_range_ids_give_nan_rows_and_read_nothing_out_of_bounds(emu, monkeypatch):
    """No host sync to validate ids: a bad id or position gives a NaN row (under ASan: no read out of bounds)."""
    monkeypatch.setattr(cuda, "_empty", lambda shape, dtype, device: torch.full(shape, 7.0, dtype=dtype))
    ids, positions, wte, wpe = _embed_inputs(6, 96, torch.float16, seed=3, vocab=50, n_pos=20)
    ids[1], ids[2], positions[3], positions[4] = 50, -1, 20, -(2**40)
    ids[5] = 2**62
    out = cuda.embed(ids, positions, wte, wpe)  # (T, C)
    assert torch.isnan(out[1:]).all()
    torch.testing.assert_close(out[0], reference.embed(ids[:1], positions[:1], wte, wpe)[0], atol=0, rtol=0)


def test_embed_empty_batch(emu):
    ids, positions, wte, wpe = _embed_inputs(3, 96, torch.float32, seed=1)
    assert cuda.embed(ids[:0], positions[:0], wte, wpe).shape == (0, 96)


def _bad_embed_calls():
    ids, pos, wte, wpe = _embed_inputs(4, 8, torch.float32, seed=0)
    return {
        "must be (T,)": lambda: cuda.embed(ids.view(2, 2), pos.view(2, 2), wte, wpe),
        "positions must be": lambda: cuda.embed(ids, pos[:3], wte, wpe),
        "int64 or int32": lambda: cuda.embed(ids.float(), pos.float(), wte, wpe),
        "one index dtype": lambda: cuda.embed(ids, pos.int(), wte, wpe),
        "disagree": lambda: cuda.embed(ids, pos, wte, wpe[:, :7]),
        "float32, float16 or bfloat16": lambda: cuda.embed(ids, pos, wte.double(), wpe.double()),
        "wpe has dtype": lambda: cuda.embed(ids, pos, wte, wpe.half()),
        "wte must be contiguous in its last dim": lambda: cuda.embed(ids, pos, torch.randn(8, 257).t(), wpe),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_embed_calls()))
def test_embed_bad_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_embed_calls()[message]()


# ---- nvcc: the real compile for sm_80 and sm_90 ---------------------------------------------------


@pytest.mark.skipif(cuda_build.nvcc_path() is None, reason="nvcc not found: the resource report needs the toolkit")
def test_nvcc_linear_and_embed_kernels_compile_for_both_archs():
    """Every instantiated variant is in the report (no spills is checked for all kernels by the LayerNorm test)."""
    records = cuda_build.resource_report((80, 90))
    names = {(r.arch, r.name) for r in records if r.entry}
    for arch in (80, 90):
        gemv = [n for a, n in names if a == arch and "linear_gemv_kernel" in n]
        # 3 dtypes x (vector, scalar) x row buckets 1 / 4 / 16 x LayerNorm or not x (weights in x's dtype, int8)
        assert len(gemv) == 72, gemv
        # 3 dtypes x (vector, scalar) x int32 / int64 ids x (wte in the dtype, int8)
        assert len([n for a, n in names if a == arch and "embed_kernel" in n]) == 24
    mine = [r for r in records if "linear_gemv_kernel" in r.name or "embed_kernel" in r.name]
    assert not [r for r in mine if r.spill_stores or r.spill_loads or r.stack_frame], cuda_build.format_report(mine)
    gemv = [r for r in mine if "linear_gemv_kernel" in r.name]
    ln16 = [r for r in gemv if ", 16, true" in r.name]  # the 16-row LayerNorm variants: __launch_bounds__(128, 3)
    assert len(ln16) == 24 and all(r.registers <= 168 for r in ln16), cuda_build.format_report(ln16)
    assert all(r.registers <= 128 for r in gemv if r not in ln16)  # __launch_bounds__(128, 4)


# ---- on a GPU: gpt2fast._C ------------------------------------------------------------------------

# (K, N, epilogue) of GPT-2's four decode projections at 124M (C = 768) and 1.5B (C = 1600)
GPU_LINEARS = [
    (c, n, e) for c in (768, 1600)
    for n, e in ((3 * c, "bias"), (c, "bias+residual"), (4 * c, "bias+gelu"))
] + [(4 * c, c, "bias+residual") for c in (768, 1600)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k,n,epilogue", GPU_LINEARS)
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_gpu_linear_matches_reference(rows, k, n, epilogue, dtype):
    x, w, b, residual = _linear_inputs(rows, k, n, dtype, seed=rows + k + n, device="cuda")
    y = _run_epilogue(x, w, b, residual, EPILOGUES[epilogue])
    assert torch.equal(y, cuda.linear(x, w, b, gelu="gelu" in epilogue,
                                      residual=residual if "residual" in epilogue else None))  # fmt: skip
    _run_epilogue(misaligned(x), w, b, residual, EPILOGUES[epilogue])  # the scalar path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [768, 1600])
@pytest.mark.parametrize("tokens", [1, 16, 111])
def test_gpu_embed_matches_reference(tokens, width, dtype):
    ids, positions, wte, wpe = _embed_inputs(tokens, width, dtype, seed=tokens, vocab=50257, n_pos=1024,
                                             device="cuda")  # fmt: skip
    expected = reference.embed(ids, positions, wte, wpe)
    torch.testing.assert_close(cuda.embed(ids, positions, wte, wpe), expected, atol=0, rtol=0)
    torch.testing.assert_close(cuda.embed(ids, positions, misaligned(wte), wpe), expected, atol=0, rtol=0)
