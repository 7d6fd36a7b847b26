"""Run a Triton launch's programs in another order on the interpreter, for kernels whose result must not depend
on which program finishes last (the split-K merges by ticket: the last program to draw one does the merge).

The interpreter runs a grid one program at a time in a fixed x, y, z loop, so without this every launch has the
same program draw the last ticket. ``run_programs_in(order, monkeypatch)`` remaps the grid index it hands each
program; on a GPU (where the tests run the real kernels) it does not apply: mark such tests ``needs_interpreter``.
"""

from __future__ import annotations

import pytest
import torch

ORDERS = ["forward", "reverse", "shuffle"]
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="reorders the Triton interpreter's programs")


def run_programs_in(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the interpreter run each launch's programs in ``order`` ("forward", "reverse" or "shuffle") instead of
    its fixed x, y, z loop, by remapping the grid index it hands each program (until ``monkeypatch`` undoes it)."""
    from triton.runtime.interpreter import interpreter_builder

    real = interpreter_builder.set_grid_idx

    def remapped(x, y, z):
        nx, ny, nz = interpreter_builder.grid_dim
        i, n = (x * ny + y) * nz + z, nx * ny * nz
        if order == "reverse":
            i = n - 1 - i
        elif order == "shuffle":
            i = int(torch.randperm(n, generator=torch.Generator().manual_seed(n))[i])
        real(i // (ny * nz), i // nz % ny, i % nz)

    monkeypatch.setattr(interpreter_builder, "set_grid_idx", remapped)
