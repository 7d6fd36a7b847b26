"""The reference model against Hugging Face transformers' GPT2LMHeadModel with random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import GPT2_124M, ODD, TINY

from gpt2fast import LLM, SamplingParams

CONFIGS = {"tiny": TINY, "odd": ODD, "124M": GPT2_124M}
FORMATS = ["safetensors", "sharded", "bin", "bin-hub"]
# Sharding is covered by the small configs; 124M in 50 KB shards would be thousands of files.
CASES = [(name, fmt) for name in CONFIGS for fmt in FORMATS if (name, fmt) != ("124M", "sharded")]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name, fmt", CASES)
def test_logits_match_hf(hf_folder, name, fmt):
    config = CONFIGS[name]
    model, folder = hf_folder(config, fmt)
    llm = LLM(str(folder), device="cpu")
    ids = torch.randint(0, config["vocab_size"], (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = llm.logits(ids)
    assert ours.dtype == torch.float32 and ours.shape == (37, config["vocab_size"])
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_len", [1, 7, 40])
def test_greedy_generation_matches_hf(hf_folder, prompt_len):
    model, folder = hf_folder(ODD)
    llm = LLM(str(folder), device="cpu", block_size=16)
    prompt = torch.randint(0, ODD["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    expected = model.generate(
        prompt[None], max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0, attention_mask=None
    )[0, prompt_len:].tolist()
    out = llm.generate(prompt.tolist(), SamplingParams(max_tokens=30, temperature=0))[0].outputs[0]
    assert out.token_ids == expected
    assert out.finish_reason == "length"
    assert len(set(expected)) > 1, "a constant sequence would not show the cache working"
