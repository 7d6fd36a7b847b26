"""CUDA C++ LayerNorm and add+LayerNorm (csrc/kernels/layer_norm.cuh) vs ``gpt2fast.ops.reference``.

On CPU the kernels run through the emulated module (the same sources built by g++ against
csrc/emu/cuda_emu.h), in thread orders 0 (forward) and 1 (reverse), with outputs poisoned with NaN;
once more under ASan+UBSan in a subprocess. ``gpu``-marked tests repeat the comparison with
``gpt2fast._C`` on CUDA. The nvcc resource report (sm_80, sm_90) must show no spill and no stack frame.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import misaligned

from gpt2fast.ops import cuda, cuda_build, reference

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

EPS = 1e-5
ROWS = [1, 3, 17, 111]
WIDTHS = [3, 96, 97, 768, 1600]  # odd widths take the scalar path; 96/768/1600 the 16-byte vectors
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# dtype -> tolerance vs the fp32-upcast reference. fp32: the same math in another summation order.
# fp16/bf16: both round one fp32 result once, so they differ only where the two fp32 values straddle
# a rounding boundary: one ulp of an O(1..4) output (fp16 ulp <= 2**-8, bf16 <= 2**-5 at 4).
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}


@pytest.fixture(scope="session")
def sanitized_build() -> Path:
    """The ASan+UBSan build of the bindings (~25 s cold, then cached)."""
    return cuda_build.build_emulated(cuda_build.BINDINGS, "_C_emu_asan", sanitize=True)


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every ``out`` the wrappers allocate starts as NaN, so an element the kernel skips cannot pass."""


def _inputs(rows: int, width: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """x (mean 2, std 3: a mean that cancellation would show), weight ~1, bias, residual: never zero."""
    g = torch.Generator().manual_seed(seed)
    x = 2 + 3 * torch.randn(rows, width, generator=g)  # (T, C)
    w = 0.5 + torch.rand(width, generator=g)  # (C,)
    b = torch.randn(width, generator=g)  # (C,)
    residual = torch.randn(rows, width, generator=g)  # (T, C)
    return [t.to(device, dtype) for t in (x, w, b, residual)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_layer_norm_matches_reference(rows, width, dtype, order):
    x, w, b, _ = _inputs(rows, width, dtype, seed=rows * 7 + width)
    y = cuda.layer_norm(x, w, b, EPS)  # (T, C)
    assert y.dtype == dtype and y.shape == (rows, width)
    torch.testing.assert_close(y, reference.layer_norm(x, w, b, EPS), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_add_layer_norm_updates_residual_and_matches_reference(rows, width, dtype, order):
    x, w, b, residual = _inputs(rows, width, dtype, seed=rows + width)
    expected_residual = residual.clone()
    expected = reference.add_layer_norm(x, expected_residual, w, b, EPS)
    y = cuda.add_layer_norm(x, residual, w, b, EPS)
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)  # one fp32 add, one rounding
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [96, 768, 1600])
def test_misaligned_pointers_take_the_scalar_path(width, dtype, order):
    x, w, b, residual = _inputs(17, width, dtype, seed=width)
    expected_residual = residual.clone()
    expected = reference.add_layer_norm(x, expected_residual, w, b, EPS)
    for moved in ("x", "weight", "residual"):  # one misaligned pointer is enough to leave the vector path
        named = {"x": x, "weight": w, "residual": residual}
        xs, ws, rs = (misaligned(t) if name == moved else t.clone() for name, t in named.items())
        y = cuda.add_layer_norm(xs, rs, ws, b, EPS)
        torch.testing.assert_close(rs, expected_residual, atol=0, rtol=0)
        torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(cuda.layer_norm(misaligned(x), w, b, EPS), reference.layer_norm(x, w, b, EPS),
                               **TOLERANCE[dtype])  # fmt: skip


@pytest.mark.parametrize("width", [97, 768])
def test_strided_rows(width, emu):
    x, w, b, residual = _inputs(34, width, torch.float32, seed=3)
    wide = torch.randn(17, width + 8)  # rows 4 * k elements apart: still the vector path at 768
    xs, rs = x[::2], wide[:, :width]
    rs.copy_(residual[:17])
    expected_residual = rs.clone()
    expected = reference.add_layer_norm(xs, expected_residual, w, b, EPS)
    y = cuda.add_layer_norm(xs, rs, w, b, EPS)
    torch.testing.assert_close(rs, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cuda.layer_norm(xs, w, b, EPS), reference.layer_norm(xs, w, b, EPS), atol=1e-5,
                               rtol=1e-5)  # fmt: skip


def test_widest_rows_and_empty_batch(emu):
    x, w, b, _ = _inputs(2, cuda.MAX_WIDTH, torch.float32, seed=5)
    assert emu.LAYER_NORM_MAX_WIDTH == cuda.MAX_WIDTH
    torch.testing.assert_close(cuda.layer_norm(x, w, b, EPS), reference.layer_norm(x, w, b, EPS), atol=1e-5, rtol=1e-5)
    odd = _inputs(1, cuda.MAX_WIDTH - 1, torch.float16, seed=6)  # scalar path, 8 items per thread
    torch.testing.assert_close(cuda.layer_norm(*odd[:3], EPS), reference.layer_norm(*odd[:3], EPS),
                               **TOLERANCE[torch.float16])  # fmt: skip
    assert cuda.layer_norm(x[:0], w, b, EPS).shape == (0, cuda.MAX_WIDTH)


def _bad_calls():
    x, w, b, r = _inputs(4, 8, torch.float32, seed=0)
    return {
        "last dim": lambda: cuda.layer_norm(torch.randn(8, 4).t(), w, b, EPS),
        "(T, C)": lambda: cuda.layer_norm(x.view(2, 2, 8), w, b, EPS),
        "float64": lambda: cuda.layer_norm(x.double(), w.double(), b.double(), EPS),
        "one dtype": lambda: cuda.layer_norm(x, w.half(), b, EPS),
        "weight must be (8,)": lambda: cuda.layer_norm(x, w[:7], b, EPS),
        "widths 1..": lambda: cuda.layer_norm(torch.randn(2, cuda.MAX_WIDTH + 1), torch.ones(cuda.MAX_WIDTH + 1),
                                              torch.zeros(cuda.MAX_WIDTH + 1), EPS),
        "residual shape": lambda: cuda.add_layer_norm(x, r[:3], w, b, EPS),
        "overlap": lambda: cuda.add_layer_norm(x, x, w, b, EPS),
        "residual must be contiguous": lambda: cuda.add_layer_norm(x, torch.randn(8, 4).t(), w, b, EPS),
        "rows overlap": lambda: cuda.layer_norm(x[:1].expand(4, 8), w, b, EPS),
        "bias must be contiguous": lambda: cuda.layer_norm(x, w, torch.randn(16)[::2], EPS),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_calls()))
def test_bad_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_calls()[message]()


# ---- ASan + UBSan, in a subprocess (libasan must be loaded before Python) ----------------------

_ASAN_SCRIPT = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("_C_emu_asan", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
m.set_order(int(sys.argv[2]))
rng = np.random.default_rng(0)
errors = {}
for dtype, code in ((np.float32, m.DTYPE_FLOAT32), (np.float16, m.DTYPE_FLOAT16)):
    for rows, width, shift in ((3, 97, 0), (17, 768, 0), (3, 768, 1), (2, 1600, 0)):
        n = rows * width
        buf = (2 + 3 * rng.standard_normal(n + 8)).astype(dtype)
        x = buf[shift:shift + n].reshape(rows, width)  # shift 1: misaligned, the scalar path
        res = rng.standard_normal((rows, width)).astype(dtype)
        w = (0.5 + rng.random(width)).astype(dtype); b = rng.standard_normal(width).astype(dtype)
        out = np.full((rows, width), np.nan, dtype)
        summed = (res.astype(np.float32) + x.astype(np.float32)).astype(dtype).astype(np.float64)
        m.add_layer_norm(x.ctypes.data, res.ctypes.data, w.ctypes.data, b.ctypes.data, out.ctypes.data,
                         rows, width, width, width, 1e-5, code, 0)
        mean = summed.mean(-1, keepdims=True); var = ((summed - mean) ** 2).mean(-1, keepdims=True)
        ref = (summed - mean) / np.sqrt(var + 1e-5) * w + b
        errors[f"{dtype.__name__} {rows}x{width}+{shift}"] = [float(np.abs(out - ref).max()),
                                                              bool((res == summed).all())]
print(json.dumps(errors))
if len(sys.argv) > 3:  # then read past the end of x: one row more than it holds
    x = np.ones((2, 256), np.float32); w = np.ones(256, np.float32); out = np.empty((3, 256), np.float32)
    m.layer_norm(x.ctypes.data, w.ctypes.data, w.ctypes.data, out.ctypes.data, 3, 256, 256, 1e-5, m.DTYPE_FLOAT32, 0)
    print("no report")
"""


def _run_sanitized(path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(_ASAN_SCRIPT), str(path), *args],
                          env=cuda_build.sanitizer_env(), capture_output=True, text=True, timeout=120)  # fmt: skip


def test_layer_norm_under_asan_and_ubsan(sanitized_build):
    done = _run_sanitized(sanitized_build, "1")
    assert done.returncode == 0, done.stderr[-4000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    for case, (max_error, residual_exact) in errors.items():
        assert residual_exact, case
        assert max_error < (1e-5 if case.startswith("float32") else 1.6e-2), (case, max_error)


def test_asan_reports_a_read_past_the_end(sanitized_build):
    done = _run_sanitized(sanitized_build, "0", "overflow")
    assert done.returncode != 0 and "no report" not in done.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-4000:]
    assert "layer_norm_kernel" in done.stderr  # the report names the emulated kernel


# ---- on a GPU: gpt2fast._C ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(1, 3), (17, 97), (111, 768), (4096, 1600), (3, 1599)])
def test_gpu_matches_reference(rows, width, dtype):
    x, w, b, residual = _inputs(rows, width, dtype, seed=rows + width, device="cuda")
    torch.testing.assert_close(cuda.layer_norm(x, w, b, EPS), reference.layer_norm(x, w, b, EPS), **TOLERANCE[dtype])
    expected_residual = residual.clone()
    expected = reference.add_layer_norm(x, expected_residual, w, b, EPS)
    y = cuda.add_layer_norm(misaligned(x), residual, w, b, EPS)
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
