"""The emulator's tensor-core instructions (csrc/kernels/mma.cuh over csrc/emu/cuda_emu.h) against the PTX ISA.

The lane-to-element tables below are written out here from the PTX ISA's figures ("Matrix Fragments for
mma.m16n8k16 with floating point type", "Warp-level matrix load instruction: ldmatrix"), not imported from the
emulator: each test packs registers by these tables, runs one instruction in tests/csrc/tensor_core_tests.cpp
and unpacks by them, so an emulator with any other layout fails. Products are checked against float64 matmuls.
cp.async is checked for its group semantics: a wait_group retires all but the newest N groups, the zero-fill
of the bytes past src_size, and the barrier other threads need.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2fast.ops import cuda_build

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

SOURCE = Path(__file__).parent / "csrc" / "tensor_core_tests.cpp"
WARP = 32


@pytest.fixture(scope="module")
def built() -> Path:
    return cuda_build.build_emulated(SOURCE, "tensor_core_tests")


@pytest.fixture(scope="module")
def tc(built):
    module = cuda_build.load_module(built, "tensor_core_tests")
    yield module
    module.set_order(-1)


# ---- the PTX ISA's tables (groupID = lane >> 2, threadID_in_group = lane % 4) ---------------------------


def a_element(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of a_i, i in 0..7, in lane's A fragment of m16n8k16 (.f16/.bf16)."""
    group, tig = lane >> 2, lane % 4
    row = group if i in (0, 1, 4, 5) else group + 8
    col = tig * 2 + (i & 1) if i < 4 else tig * 2 + (i & 1) + 8
    return row, col


def b_element(lane: int, i: int) -> tuple[int, int]:
    """(row, col) = (k, n) of b_i, i in 0..3."""
    group, tig = lane >> 2, lane % 4
    row = tig * 2 + (i & 1) if i < 2 else tig * 2 + (i & 1) + 8
    return row, group


def c_element(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of c_i / d_i, i in 0..3 (fp32 accumulators)."""
    group, tig = lane >> 2, lane % 4
    row = group if i < 2 else group + 8
    return row, tig * 2 + (i & 1)


def bits16(x: np.ndarray, bf16: bool) -> np.ndarray:
    """The 16-bit patterns of float32 values already representable in the type."""
    if bf16:
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(np.float16).view(np.uint16)


def pack(lo: int, hi: int) -> int:
    return int(lo) | (int(hi) << 16)


def random_16bit(rng: np.random.Generator, shape: tuple[int, ...], bf16: bool) -> np.ndarray:
    """Random values exactly representable in fp16 / bf16 (as float64)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if bf16:
        return ((x.view(np.uint32) >> 16) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float16).astype(np.float64)


# ---- mma.sync ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("order", [0, 1])
def test_mma_m16n8k16_follows_the_ptx_fragment_tables(tc, bf16, order):
    tc.set_order(order)
    rng = np.random.default_rng(5 + bf16)
    a = random_16bit(rng, (16, 16), bf16)
    b = random_16bit(rng, (16, 8), bf16)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    a_bits, b_bits = bits16(a, bf16), bits16(b, bf16)
    a_regs, b_regs, c_regs = [], [], []
    for lane in range(WARP):
        elems = [a_bits[a_element(lane, i)] for i in range(8)]
        a_regs += [pack(elems[2 * r], elems[2 * r + 1]) for r in range(4)]
        elems = [b_bits[b_element(lane, i)] for i in range(4)]
        b_regs += [pack(elems[2 * r], elems[2 * r + 1]) for r in range(2)]
        c_regs += [float(c[c_element(lane, i)]) for i in range(4)]
    d = np.array(tc.mma(a_regs, b_regs, c_regs, bf16), dtype=np.float32).reshape(WARP, 4)
    got = np.full((16, 8), np.nan)
    for lane in range(WARP):
        for i in range(4):
            got[c_element(lane, i)] = d[lane, i]
    expected = a @ b + c.astype(np.float64)
    assert not np.isnan(got).any()  # every element of D came back exactly once
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_mma_with_one_element_set_lands_where_the_table_says(tc):
    """A single 1 at A[r][k] and B[k][n] gives D = e_r e_n^T: a transposed or shifted layout cannot pass."""
    one = 0x3C00  # fp16 1.0
    for r, k, n in [(0, 0, 0), (9, 13, 5), (15, 7, 7), (3, 8, 2)]:
        a_regs, b_regs = [0] * (4 * WARP), [0] * (2 * WARP)
        for lane in range(WARP):
            for i in range(8):
                if a_element(lane, i) == (r, k):
                    a_regs[4 * lane + i // 2] |= one << (16 * (i & 1))
            for i in range(4):
                if b_element(lane, i) == (k, n):
                    b_regs[2 * lane + i // 2] |= one << (16 * (i & 1))
        d = tc.mma(a_regs, b_regs, [0.0] * (4 * WARP), False)
        hot = [c_element(lane, i) for lane in range(WARP) for i in range(4) if d[4 * lane + i] != 0.0]
        assert hot == [(r, n)]


# ---- ldmatrix ------------------------------------------------------------------------------------------


def _ldmatrix_expected(values: np.ndarray, rows: list[int], matrices: int, trans: bool) -> list[int]:
    """What lane l receives per the PTX ISA: matrix j's row r is at the address of thread 8 j + r; without
    .trans lane l holds row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1; with .trans column l / 4 of rows
    2 (l % 4) and 2 (l % 4) + 1."""
    out = []
    for lane in range(WARP):
        for j in range(matrices):
            mat = np.stack([values[8 * rows[8 * j + r] : 8 * rows[8 * j + r] + 8] for r in range(8)])  # [row][col]
            if trans:
                lo, hi = mat[2 * (lane % 4), lane >> 2], mat[2 * (lane % 4) + 1, lane >> 2]
            else:
                lo, hi = mat[lane >> 2, 2 * (lane % 4)], mat[lane >> 2, 2 * (lane % 4) + 1]
            out.append(pack(lo, hi))
    return out


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_ldmatrix_follows_the_ptx_tables(tc, matrices, trans):
    rng = np.random.default_rng(matrices * 2 + trans)
    num_rows = 40
    values = rng.integers(0, 2**16, size=8 * num_rows, dtype=np.uint16)
    rows = [int(r) for r in rng.permutation(num_rows)[:WARP]]  # any row address per lane
    used = 8 * matrices
    rows_given = rows[:used] + [-1] * (WARP - used)  # the lanes past 8 x matrices pass a misaligned address
    got = tc.ldmatrix(values.tolist(), rows_given, matrices, trans)
    assert got == _ldmatrix_expected(values, rows, matrices, trans)


@pytest.mark.parametrize("bf16", [False, True])
def test_ldmatrix_then_mma_multiplies_a_tile(tc, bf16):
    """The GEMM's feeding pattern: A row-major and B as [n][k] through shared memory, x4 and x2, one mma."""
    rng = np.random.default_rng(11)
    a = random_16bit(rng, (16, 16), bf16)
    b_nk = random_16bit(rng, (8, 16), bf16)
    d = np.array(tc.tile(bits16(a, bf16).ravel().tolist(), bits16(b_nk, bf16).ravel().tolist(), bf16))
    np.testing.assert_allclose(d.reshape(16, 8), a @ b_nk.T, rtol=1e-6, atol=1e-6)


# ---- cp.async ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1, 2])
def test_cp_async_lands_at_wait_group_with_zero_fill(tc, order):
    tc.set_order(order)
    threads = 64
    src = bytes((i * 37 + 11) % 251 + 1 for i in range(32 * threads))  # no zero bytes
    src_bytes = [(t * 5) % 17 for t in range(threads)]  # 0..16 bytes read, the rest zero-filled
    after1, after0 = (bytes(x) for x in tc.cp_async(list(src), src_bytes))
    first = b"".join(src[16 * t : 16 * t + n] + bytes(16 - n) for t, n in enumerate(src_bytes))
    second = src[16 * threads :]
    # wait_group 1: the first group has landed, the newest has not (its shared bytes still the 0xFF poison)
    assert after1[: 16 * threads] == first
    assert after1[16 * threads :] == b"\xff" * (16 * threads)
    assert after0 == first + second  # wait_group 0: both


def test_cp_async_needs_a_barrier_before_other_threads_read(tc):
    threads = 64
    expected = bytes((i * 7 + 1) % 256 for i in range(16 * threads))
    neighbour = expected[16:] + expected[:16]
    wrong_in = []
    for order in (0, 1):
        tc.set_order(order)
        assert bytes(tc.cp_async_neighbour(threads, True)) == neighbour
        if bytes(tc.cp_async_neighbour(threads, False)) != neighbour:
            wrong_in.append(order)
    assert wrong_in, "reading another thread's cp.async data without a barrier went unnoticed in both orders"


@pytest.mark.parametrize("kind,message", [
    (0, "cp.async.cg at tensor_core_tests.cpp"),
    (1, "outside the launch's 512 bytes of dynamic shared memory"),
    (2, "a partial warp of 16 lanes"),
    (3, "is not aligned to 16 bytes"),
])  # fmt: skip
def test_misuse_aborts_naming_the_instruction(built, kind, message):
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('tensor_core_tests', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"m.misuse({kind})\nprint('returned normally')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(built)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "returned normally" not in done.stdout
    assert message in done.stderr, done.stderr[-2000:]
