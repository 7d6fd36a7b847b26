"""Fixtures for ``benchmarks/test_ops_bench.py``: the interpreter switch, the copy bandwidth, the roofline table."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel: without a GPU, turn the CPU interpreter on
# here, before the benchmark module (or anything it imports) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOFLINE_ROWS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROOFLINE_ROWS] = []


@pytest.fixture(scope="session")
def copy_bandwidth(request: pytest.FixtureRequest) -> Callable[[torch.device], float | None]:
    """``copy_bandwidth(device)`` -> bytes/s of a large copy (read + write), measured once per device; None when
    benchmarks are disabled (nothing is timed, so there is no floor to compare with)."""
    from gpt2fast.bench import copy_bandwidth as measure

    disabled = bool(request.config.getoption("benchmark_disable", default=False))
    measured: dict[str, float] = {}

    def bandwidth(device: torch.device) -> float | None:
        if disabled:
            return None
        if str(device) not in measured:
            measured[str(device)] = measure(device)
        return measured[str(device)]

    return bandwidth


@pytest.fixture(scope="session")
def roofline_rows(request: pytest.FixtureRequest) -> list[dict]:
    """Rows (one per timed benchmark) that the terminal summary prints as the roofline table."""
    return request.config.stash[ROOFLINE_ROWS]


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Beside pytest-benchmark's timing tables: per group, each provider's median, quartiles and roofline."""
    rows = config.stash.get(ROOFLINE_ROWS, [])
    if not rows:
        return
    write = terminalreporter.write_line
    terminalreporter.section("roofline (median and quartiles of one call; floor = bytes / copy bandwidth)")
    write(f"  {'provider':<10} {'median us':>11} {'q1 us':>10} {'q3 us':>10} {'MB':>9} {'GB/s':>8} {'% of floor':>11}")
    for group in dict.fromkeys(r["group"] for r in rows):
        write(group)
        for r in sorted((r for r in rows if r["group"] == group), key=lambda r: r["median_s"]):
            floor = f"{r['pct_of_floor']:.1f}" if r.get("pct_of_floor") is not None else "-"
            write(f"  {r['provider']:<10} {r['median_s'] * 1e6:>11.1f} {r['q1_s'] * 1e6:>10.1f} "
                  f"{r['q3_s'] * 1e6:>10.1f} {r['bytes'] / 1e6:>9.3f} {r['achieved_gbs']:>8.2f} {floor:>11}")
