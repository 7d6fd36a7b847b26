"""CUDA C++ GEMM (csrc/kernels/gemm.cuh): the linear above 16 rows and the LM head's logits, vs ``reference``.

fp16/bf16 run on tensor cores (mma.sync m16n8k16 fed by ldmatrix from a 3-stage cp.async ring), fp32 on CUDA
cores. On CPU they run emulated (csrc/emu/cuda_emu.h models those instructions from the PTX ISA's tables:
tests/test_cuda_tensor_core.py), in thread orders 0 and 1, with outputs poisoned with NaN; CI reruns this file
under ASan+UBSan. Shapes: rows 17..300 across tile edges, K and N of every GPT-2 width, odd sizes, strided and
misaligned operands (the element-wise loader), both tile sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_cuda_linear import (
    EPILOGUES,
    _expected_close,
    _linear_inputs,
    _run_epilogue,
    check_deterministic,
    check_strided_and_misaligned,
)

from gpt2fast.ops import cuda, cuda_build, reference

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SANITIZED = os.environ.get(cuda.SANITIZE_ENV) == "1"
# (rows, K, N): one partial row tile; several tiles of K with N not a multiple of 8; three row tiles with the last
# 44 rows, K a multiple of 8 but not of the 32-wide step; K odd (the element-wise loader, no cp.async)
SHAPES = [(17, 64, 40), (130, 96, 200), (300, 104, 72), (33, 97, 50)]
# GPT-2's widths (124M 768, 355M 1024, 774M 1280, 1.5B 1600) as K and N, with the 3x (qkv) and 4x (MLP) of
# them; rows cut to keep each emulated call near a second
GPT2_SHAPES = [(17, 768, 2304), (40, 3072, 768), (23, 1024, 4096), (19, 1280, 3840), (17, 1600, 6400),
               (18, 6400, 1600), (21, 5120, 1280), (25, 4096, 1024)]  # fmt: skip


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every ``out`` the wrappers allocate starts as NaN, so an element the kernel skips cannot pass."""


@pytest.fixture(params=[64, 128], ids=lambda t: f"tile{t}")
def tile(request, emu):
    emu.set_gemm_tile(request.param)
    yield request.param
    emu.set_gemm_tile(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k,n", SHAPES, ids=str)
def test_gemm_matches_reference_with_every_epilogue(rows, k, n, dtype, warp_order, tile):
    x, w, b, residual = _linear_inputs(rows, k, n, dtype, seed=rows * 31 + k + n)
    for epilogue in EPILOGUES.values():
        _run_epilogue(x, w, b, residual, epilogue)


@pytest.mark.skipif(SANITIZED, reason="the code paths of the small shapes; minutes at -O0 under ASan")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,k,n", GPT2_SHAPES, ids=str)
@pytest.mark.parametrize("thread_order", [0, 1])
def test_gemm_gpt2_widths(rows, k, n, dtype, thread_order, emu):
    emu.set_order(thread_order)
    x, w, b, residual = _linear_inputs(rows, k, n, dtype, seed=k + n)
    _run_epilogue(x, w, b, residual, EPILOGUES["bias+gelu" if n > k else "bias+residual"])


def test_gemm_fp32_is_within_1e4_of_float64(warp_order):
    """fp32 runs exact FMAs on CUDA cores (not TF32): the model's fp32 contract."""
    x, w, b, residual = _linear_inputs(70, 768, 136, torch.float32, seed=3)
    y = cuda.linear(x, w, b, gelu=True, residual=residual)
    truth = torch.nn.functional.gelu(x.double() @ w.double().T + b.double(), approximate="tanh") + residual.double()
    assert (y.double() - truth).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_strided_rows_and_misaligned_pointers(dtype, warp_order):
    """20 rows, K = 96: cp.async for the strided rows whose stride is a multiple of 8, the element-wise loader for
    the others and for misaligned x or weight."""
    check_strided_and_misaligned(20, 96, 72, dtype)


def test_gemm_is_deterministic_across_calls_and_thread_orders(emu):
    check_deterministic(emu, 70, 200, 90, torch.float16)


def test_linear_switches_from_the_gemv_to_the_gemm_above_16_rows(emu, monkeypatch):
    """16 rows take the GEMV, 17 the GEMM; both agree with the reference."""
    called = []
    module = cuda.emulated_module()
    for name in ("linear", "gemm"):
        monkeypatch.setattr(module, name, lambda *a, _f=getattr(module, name), _n=name, **k: (called.append(_n),
                                                                                                 _f(*a, **k))[1])
    monkeypatch.setattr(cuda, "module_for", lambda device: module)
    x, w, b, _ = _linear_inputs(17, 64, 24, torch.float16, seed=2)
    for rows in (16, 17):
        _expected_close(cuda.linear(x[:rows], w, b), x[:rows], w, b, None, False)
    assert called == ["linear", "gemm"]


# ---- the LM head's logits -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 17, 70])
def test_lm_head_logits_match_reference(rows, dtype, warp_order):
    """fp32 logits of an odd vocabulary (1013: partial tiles), strided rows; the products are exact in fp32 for
    fp16/bf16 inputs, so only the summation order differs from the reference's."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2 * rows, 96, generator=g).to(dtype)[::2]  # (T, C), rows 2C apart
    wte = (torch.randn(1013, 96, generator=g) * 0.2).to(dtype)  # (V, C)
    logits = cuda.lm_head(x, wte)
    expected = reference.lm_head(x, wte)
    assert logits.dtype == torch.float32 and logits.shape == (rows, 1013)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)


def test_gemm_bad_inputs_raise_value_error():
    w = torch.randn(6, 8)
    with pytest.raises(ValueError, match="the CUDA GEMM takes at most"):
        cuda.linear(torch.randn(1, 8).expand(cuda.GEMM_MAX_ROWS + 1, 8), w, None)
    with pytest.raises(ValueError, match="a tensor or an Int8Weight"):
        cuda.lm_head(torch.randn(2, 8), object())
    with pytest.raises(ValueError, match="weight must be"):
        cuda.lm_head(torch.randn(2, 8), torch.randn(5, 7))


def test_set_gemm_tile_rejects_other_sizes(emu):
    assert emu.set_gemm_tile(32) is False and emu.set_gemm_tile(0) is True


def test_nvcc_gemm_emits_the_tensor_core_instructions(tmp_path):
    """nvcc's sm_80 and sm_90 PTX of the fp16 GEMM holds mma.sync m16n8k16, ldmatrix x4 and cp.async.cg with
    its groups (the inline PTX the emulator models), and ptxas assembles it (the resource report)."""
    import subprocess

    nvcc = cuda_build.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found")
    source = tmp_path / "gemm.cu"
    source.write_text(
        '#include "kernels/gemm.cuh"\n'
        "template __global__ void gpt2fast::gemm_mma_kernel<__half, __half, 64, 64, true, false, __half>(\n"
        "    const __half*, const __half*, const float*, const __half*, const __half*, __half*, int, int, int,"
        " int64_t, int64_t, bool, gpt2fast::GemmChoice);\n"
    )
    for arch in (80, 90):
        ptx = tmp_path / f"gemm{arch}.ptx"
        done = subprocess.run([nvcc, "-std=c++20", "-O3", "-ptx", f"-arch=sm_{arch}", f"-I{cuda_build.CSRC}",
                               str(source), "-o", str(ptx)], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        text = ptx.read_text()
        for instruction in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                            "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global",
                            "cp.async.commit_group", "cp.async.wait_group 1"):  # fmt: skip
            assert instruction in text, (arch, instruction)
