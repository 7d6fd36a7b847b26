"""OpenAI's original TensorFlow folder (written by real TensorFlow) loads as the same model as its HF twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2fast import LLM, SamplingParams
from gpt2fast.checkpoint import load_checkpoint

FIXTURE = Path(__file__).parent / "data" / "openai-tiny"
HF_NAME = {"g": "weight", "b": "bias", "w": "weight"}


def hf_twin(folder: Path) -> Path:
    """Write the fixture's ground-truth tensors (tensors.npz) as a Hugging Face folder, with transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hparams = json.loads((FIXTURE / "hparams.json").read_text())
    config = GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
                        n_head=hparams["n_head"], n_layer=hparams["n_layer"], eos_token_id=hparams["n_vocab"] - 1)
    model = GPT2LMHeadModel(config)
    state = {}
    for tf_name, array in np.load(FIXTURE / "tensors.npz").items():
        parts = tf_name.removeprefix("model/").split("/")
        if parts[0] in ("wte", "wpe"):
            name = f"{parts[0]}.weight"
        else:
            head = f"h.{parts[0][1:]}" if parts[0][1:].isdigit() else parts[0]  # "h3" -> "h.3"; "ln_f" stays
            name = ".".join([head] + parts[1:-1] + [HF_NAME[parts[-1]]])
            array = array[0] if parts[-1] == "w" else array  # HF Conv1D is [in, out]; OpenAI's is [1, in, out]
        state["transformer." + name] = torch.from_numpy(array)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), (missing, unexpected)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return hf_twin(tmp_path_factory.mktemp("twin") / "hf")


def test_weights_equal_the_hf_folder(twin):
    ours, theirs = load_checkpoint(str(FIXTURE)), load_checkpoint(str(twin))
    assert ours.config == theirs.config
    assert ours.state_dict.keys() == theirs.state_dict.keys()
    for name, tensor in ours.state_dict.items():
        assert torch.equal(tensor, theirs.state_dict[name]), name


def test_logits_and_generation_equal_the_hf_folder(twin):
    openai, hf = LLM(str(FIXTURE), device="cpu"), LLM(str(twin), device="cpu")
    ids = torch.randint(0, 300, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(openai.logits(ids), hf.logits(ids), atol=0, rtol=0)
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=4)
    sampled = [llm.generate(ids[:5], params)[0].outputs[0].token_ids for llm in (openai, hf)]
    assert sampled[0] == sampled[1]


def test_uses_the_folders_own_vocab():
    llm = LLM(str(FIXTURE), device="cpu")
    assert llm.tokenizer.n_vocab == 300 and llm.config.eos_token_id == 299
    out = llm.generate("the theory", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("the theory")
    assert len(out.outputs[0].token_ids) == 5


def test_missing_hparams_names_the_file(tmp_path):
    (tmp_path / "hparams.json").write_text('{"n_vocab": 300}')
    with pytest.raises(ValueError, match=r"hparams.json: missing \['n_ctx'"):
        load_checkpoint(str(tmp_path))
