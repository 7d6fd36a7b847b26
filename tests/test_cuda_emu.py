"""The CUDA emulator itself (csrc/emu/cuda_emu.h), through the test kernels of tests/csrc/emu_tests.cpp.

It must catch what it exists to catch: a missing ``__syncthreads`` (wrong output in one of the
thread orders), an early return before a barrier (reported as a deadlock), partial masks (abort);
and it must get right what kernels rely on: shuffles, ballots, barriers with counts, atomics, 3-D
indices, launch-configuration errors and poisoned dynamic shared memory. Aborting kernels run in a
subprocess that loads the module directly (no torch). The out-of-range read under ASan is tested
with the real LayerNorm kernel in test_cuda_layer_norm.py.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from gpt2fast.ops import cuda_build

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

SOURCE = Path(__file__).parent / "csrc" / "emu_tests.cpp"
WARP = 32


@pytest.fixture(scope="module")
def _background():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.fixture(scope="module")
def sanitized(_background) -> Future:
    """The ASan+UBSan build of the test kernels, compiled in the background while the other tests run."""
    return _background.submit(cuda_build.build_emulated, SOURCE, "emu_tests", sanitize=True)


@pytest.fixture(scope="module")
def built(request) -> Path:
    if any("sanitized" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("sanitized")  # start it now; the sanitizer tests come last
    return cuda_build.build_emulated(SOURCE, "emu_tests")


@pytest.fixture(scope="module")
def emu(built):
    module = cuda_build.load_module(built, "emu_tests")
    yield module
    module.set_order(-1)


def _run_aborting(path: Path, call: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``call`` on the module at ``path`` (as ``m``) in a fresh Python; prints 'returned normally' if it did."""
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('emu_tests', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"{call}\n"
        "print('returned normally')\n"
    )
    return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60,
                          env=env)  # fmt: skip


def test_missing_syncthreads_is_caught_in_one_of_the_orders(emu):
    x = [float(i % 7) + 0.25 for i in range(256)]  # exact in fp32 in any summation order
    wrong_in = []
    for order in (0, 1, 2):
        emu.set_order(order)
        assert emu.block_sum(x, True) == [sum(x)] * 256  # with the barrier: right in every order
        if emu.block_sum(x, False) != [sum(x)] * 256:
            wrong_in.append(order)
    assert set(wrong_in) & {0, 1}, "a block reduction without its barrier gave the right sum in both orders"


def test_early_return_before_a_barrier_is_reported_as_a_deadlock(built):
    done = _run_aborting(built, "m.early_return(96)")
    assert done.returncode != 0 and "returned normally" not in done.stdout
    assert "deadlock in kernel early_return_kernel, block (0,0,0)" in done.stderr, done.stderr
    assert "threads 0-31: exited" in done.stderr
    assert "threads 32-95: waiting at __syncthreads (emu_tests.cpp:" in done.stderr


def test_partial_mask_aborts_with_a_message(built):
    done = _run_aborting(built, "m.partial_mask()")
    assert done.returncode != 0 and "returned normally" not in done.stdout
    assert "__shfl_sync(mask=0x0000ffff)" in done.stderr and "full-warp masks only" in done.stderr, done.stderr


def test_bad_emu_order_aborts(built):
    done = _run_aborting(built, "m.block_sum([1.0] * 32, True)", env={"EMU_ORDER": "5", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "EMU_ORDER=5" in done.stderr, done.stderr


def test_fiber_stack_overflow_hits_the_guard_page(built, emu):
    emu.stack_overflow(10)  # shallow: fine
    done = _run_aborting(built, "m.stack_overflow(1_000_000)")
    assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stderr[-2000:])


def _expected_warp_ops(threads: int, width: int) -> list[list[int]]:
    value = [100 * t + 7 for t in range(threads)]
    out = [[0] * threads for _ in range(9)]
    for t in range(threads):
        lane, seg = t % WARP, (t % WARP) // width * width
        base = t - lane
        up, down, xor = lane - 1, lane + 2, lane ^ (5 % width)
        out[0][t] = value[base + seg + 3 % width]
        out[1][t] = value[base + xor] if xor < seg + width else value[t]
        out[2][t] = value[base + up] if up >= seg else value[t]
        out[3][t] = value[base + down] if down < seg + width else value[t]
        out[4][t] = sum(1 << i for i in range(WARP) if i % 3 == 0)  # bits 0, 3, ..., 30
        out[5][t] = int(base <= 40 < base + WARP)
        out[6][t] = 0
        out[7][t] = len(range(0, threads, 4))
        out[8][t] = int.from_bytes(struct.pack("<f", base + 0.5), "little")
    return out


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("width", [32, 8, 1])
def test_warp_collectives(emu, width, order):
    emu.set_order(order)
    threads = 96
    got = emu.warp_ops(threads, width)
    expected = _expected_warp_ops(threads, width)
    names = ["shfl", "shfl_xor", "shfl_up", "shfl_down", "ballot", "any", "all", "syncthreads_count", "shfl float"]
    for k, name in enumerate(names):
        assert got[k * threads : (k + 1) * threads] == expected[k], name


def test_thread_orders_forward_reverse_and_seeded_shuffle(emu):
    emu.set_order(0)
    assert emu.tickets(2, 64) == list(range(64)) * 2
    emu.set_order(1)
    assert emu.tickets(2, 64) == list(range(63, -1, -1)) * 2
    emu.set_order(3)  # warp by warp, the last warp first
    assert emu.tickets(2, 64) == (list(range(32, 64)) + list(range(32))) * 2
    emu.set_order(2)
    emu.set_seed(7)
    first = emu.tickets(2, 64)
    emu.set_seed(7)
    assert emu.tickets(2, 64) == first  # deterministic for a seed
    emu.set_seed(8)
    assert emu.tickets(2, 64) != first
    assert sorted(first[:64]) == list(range(64)) and first[:64] not in (list(range(64)), list(range(63, -1, -1)))
    assert first[:64] != first[64:]  # each block shuffled differently


def test_dynamic_shared_memory_is_poisoned(emu):
    assert emu.poison(64) == [0xFFFFFFFF] * 64


def test_three_dimensional_indices_and_atomics(emu):
    grid, block = [2, 3, 2], [4, 2, 3]
    out, total, largest = emu.indices(grid, block)
    n = 2 * 3 * 2 * 4 * 2 * 3
    assert out == list(range(n)) and total == float(n) and largest == n - 1


@pytest.mark.parametrize("threads,smem,error", [(1025, 0, "cudaErrorInvalidConfiguration"),
                                                (0, 0, "cudaErrorInvalidConfiguration"),
                                                (64, 300 * 1024, "cudaErrorInvalidValue")])  # fmt: skip
def test_bad_launch_configuration_sets_the_last_error(emu, threads, smem, error):
    assert emu.launch_error(threads, smem) == error


# ---- under ASan + UBSan (libasan preloaded in a subprocess) ----------------------------------------


def test_asan_reports_a_read_past_a_heap_buffer(sanitized):
    done = _run_aborting(sanitized.result(), "m.read_past_end(64)", env=cuda_build.sanitizer_env())
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
    assert "read_past_end_kernel" in done.stderr and "returned normally" not in done.stdout


def test_asan_reports_a_read_past_the_dynamic_shared_memory(sanitized):
    in_bounds = "assert m.smem_read(0) == [0xFFFFFFFF] * 32"  # the whole launch's smem, poisoned
    fine = _run_aborting(sanitized.result(), in_bounds, env=cuda_build.sanitizer_env())
    assert fine.returncode == 0 and "returned normally" in fine.stdout, fine.stderr[-3000:]
    done = _run_aborting(sanitized.result(), "m.smem_read(1)", env=cuda_build.sanitizer_env())
    assert "AddressSanitizer: use-after-poison" in done.stderr, done.stderr[-3000:]
    assert "smem_read_kernel" in done.stderr and "returned normally" not in done.stdout


def test_ubsan_reports_a_misaligned_vector_load(sanitized):
    done = _run_aborting(sanitized.result(), "m.misaligned_vector_load()", env=cuda_build.sanitizer_env())
    assert "runtime error: reference binding to misaligned address" in done.stderr, done.stderr[-3000:]
    assert "16 byte alignment" in done.stderr and "returned normally" not in done.stdout
