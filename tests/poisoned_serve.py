"""Test hook, never shipped: ``python -m tests.poisoned_serve serve ...`` is ``gpt2fast serve`` whose model gets
one NaN after it loads.

``POISON_WPE_ROW=P`` (environment) makes the embedding of position ``P`` NaN, so exactly the sequences
that reach position ``P`` go non-finite at run time: what no load-time check can see coming. Used by
``tests/test_nonfinite.py`` through ``tests.serverproc.running(..., module="tests.poisoned_serve")``.
"""

from __future__ import annotations

import os

import torch

import gpt2fast.engine
from gpt2fast.cli import main


class PoisonedEngine(gpt2fast.engine.Engine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self.model.wpe.weight[int(os.environ["POISON_WPE_ROW"]), 0] = float("nan")


if __name__ == "__main__":
    gpt2fast.engine.Engine = PoisonedEngine  # what `serve` builds its engine with
    raise SystemExit(main())
