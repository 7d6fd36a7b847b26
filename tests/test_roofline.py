"""The decode-step napkin math against independent counts: the model's parameters and the KV cache size."""

from __future__ import annotations

import pytest

from gpt2fast.config import PRESETS
from gpt2fast.roofline import H100_BANDWIDTH, decode_step, step_time


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl"])
def test_a_batch_of_one_reads_every_weight_once_plus_the_kv_cache(name):
    """At batch 1 a step moves the weights (all but the position table) and K/V of the context, plus a
    sliver of activations; the fp16 124M floor is the brief's ~74 us."""
    cfg, context = PRESETS[name], 300
    total = sum(k.calls * k.dram_bytes for k in decode_step(cfg, batch=1, context=context))
    weights = 2 * (cfg.num_params() - cfg.n_positions * cfg.n_embd)
    kv = 2 * cfg.n_layer * 2 * context * cfg.n_embd
    assert weights + kv <= total < (weights + kv) * 1.005
    if name == "gpt2":
        assert 73e-6 < weights / H100_BANDWIDTH < 75e-6


def test_activations_and_kv_grow_with_the_batch_and_the_weights_do_not():
    cfg = PRESETS["gpt2"]
    one, many = (sum(k.calls * k.dram_bytes for k in decode_step(cfg, b, 128)) for b in (1, 64))
    kv_and_acts = many - one
    assert 63 * 2 * cfg.n_layer * 2 * 128 * cfg.n_embd < kv_and_acts < 63 * 2 * cfg.n_layer * 2 * 160 * cfg.n_embd


def test_fused_choice_saves_the_logits_and_the_time_adds_up():
    cfg = PRESETS["gpt2"]
    fused, plain = decode_step(cfg, 8, 64), decode_step(cfg, 8, 64, fused_choice=False)
    saved = sum(k.calls * k.dram_bytes for k in plain) - sum(k.calls * k.dram_bytes for k in fused)
    assert saved > 8 * cfg.vocab_size * 4 * 0.95  # the (B, V) fp32 logits no longer written
    assert step_time(fused) == pytest.approx(sum(k.calls * k.dram_bytes for k in fused) / H100_BANDWIDTH)
