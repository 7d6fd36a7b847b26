"""Presets have the released sizes; odd shapes are allowed; bad ones are refused by name."""

from __future__ import annotations

import pytest

from gpt2fast.config import PRESETS, GPT2Config, preset

# Parameter counts of the released checkpoints (tied LM head), from their safetensors files.
RELEASED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "distilgpt2": 81_912_576,
}


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_preset_sizes(name):
    assert PRESETS[name].num_params() == RELEASED_PARAMS[name]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; known presets: gpt2, gpt2-medium"):
        preset("gpt5")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=97, n_head=6), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(n_inner=-1), "n_inner must be a positive integer or None"),
    ],
)
def test_bad_shapes(fields, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(**fields)


def test_attention_scale_follows_hf_switches():
    cfg = GPT2Config(n_embd=64, n_head=4)  # head_dim 16
    assert cfg.attn_scale(3) == 0.25
    assert GPT2Config(n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True).attn_scale(3) == 0.25 / 4
    assert GPT2Config(n_embd=64, n_head=4, scale_attn_weights=False).attn_scale(0) == 1.0


def test_openai_hparams_of_the_released_sizes():
    for name, n_embd, n_head, n_layer in [("gpt2", 768, 12, 12), ("gpt2-xl", 1600, 25, 48)]:
        hparams = dict(n_vocab=50257, n_ctx=1024, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
        assert GPT2Config.from_openai_hparams(hparams) == PRESETS[name]


@pytest.mark.parametrize("field, value", [("n_layer", 10**6), ("n_positions", 10**9), ("vocab_size", 10**10),
                                          ("n_embd", 2**20), ("n_inner", 10**9)])
def test_sizes_beyond_the_limits_are_refused(field, value):
    """Checked before anything is listed or allocated (issue 13: n_layer 10**6 cost 19 s and 2.4 GB)."""
    from gpt2fast.config import MAX_SIZES

    fields = {field: value} | ({"n_head": 1} if field == "n_embd" else {})
    with pytest.raises(ValueError, match=rf"GPT2Config.{field} is {value}, more than gpt2fast's limit of "
                                         rf"{MAX_SIZES[field]}"):
        GPT2Config(**fields)
    assert all((getattr(p, name) or 0) <= limit for p in PRESETS.values() for name, limit in MAX_SIZES.items())


def test_deeply_nested_json_config():
    with pytest.raises(ValueError, match="model config is not valid JSON: nested too deeply"):
        GPT2Config.from_json("[" * 100_000)
