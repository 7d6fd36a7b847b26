"""The CPU weight arena (``gpt2fast.checkpoint.arena``): tensors laid out in one huge-page mapping, same values."""

from __future__ import annotations

import sys

import pytest
import torch

from gpt2fast.checkpoint.arena import ALIGN, WeightArena, arena_enabled
from gpt2fast.config import GPT2Config
from gpt2fast.model import GPT2

CONFIG = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1013, n_positions=32)
BIG = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=40009, n_positions=32)  # wte: 2.6 MB in int8


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux ``/proc/self/smaps``)."""
    mapping = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                mapping = lo <= address < hi
            elif head == "VmFlags:" and mapping:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_take_lays_tensors_out_aligned_and_refuses_overflow():
    shapes = [((3, 5), torch.float32), ((7,), torch.int8), ((2, 33), torch.bfloat16), ((1,), torch.float32)]
    arena = WeightArena(WeightArena.size_for(shapes))
    taken = [arena.take(shape, dtype) for shape, dtype in shapes]
    for (shape, dtype), t in zip(shapes, taken):
        assert (tuple(t.shape), t.dtype, t.data_ptr() % ALIGN) == (shape, dtype, 0)
    for t in taken:  # poisoned, then written: every tensor keeps its own bytes
        t.fill_(float("nan") if t.is_floating_point() else -1)
    values = [torch.randn(s).to(d) if d.is_floating_point else torch.randint(-128, 128, s, dtype=d) for s, d in shapes]
    for t, v in zip(taken, values):
        t.copy_(v)
    assert all(torch.equal(t, v) for t, v in zip(taken, values))
    with pytest.raises(ValueError, match="do not fit"):
        arena.take((1,), torch.float32)
    with pytest.raises(ValueError, match="nbytes"):
        WeightArena(-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_HUGEPAGE and /proc/self/smaps are Linux's")
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_model_weights_share_one_huge_page_mapping_with_the_same_values(monkeypatch, quantization):
    state = GPT2(BIG).init_random(seed=3).state_dict()
    monkeypatch.setenv("GPT2FAST_HUGE_PAGES", "0")
    plain = GPT2.from_state_dict(BIG, dict(state), quantization=quantization)
    monkeypatch.setenv("GPT2FAST_HUGE_PAGES", "1")
    assert arena_enabled("cpu") and not arena_enabled("meta")
    placed = GPT2.from_state_dict(BIG, dict(state), quantization=quantization)
    tensors = dict(placed.state_dict())
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) == 1  # one mapping for every weight, bias and scale
    assert len({t.untyped_storage().data_ptr() for t in plain.state_dict().values()}) > 1  # the arena was off
    assert "hg" in _vm_flags(tensors["wte.weight"].data_ptr())  # madvise(MADV_HUGEPAGE) over its whole pages
    for name, t in plain.state_dict().items():
        assert torch.equal(tensors[name], t), name
        assert tensors[name].data_ptr() % ALIGN == 0


def test_consume_empties_the_state_and_keeps_the_values():
    state = GPT2(CONFIG).init_random(seed=4).state_dict()
    expected = {name: t.clone() for name, t in state.items()}
    model = GPT2.from_state_dict(CONFIG, state, dtype=torch.bfloat16, consume=True)
    assert state == {}
    for name, t in model.state_dict().items():
        assert torch.equal(t, expected[name].to(torch.bfloat16)), name
