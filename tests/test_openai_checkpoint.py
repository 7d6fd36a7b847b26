"""OpenAI's original TensorFlow folder (written by real TensorFlow) loads as the same model as its HF twin."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2fast import LLM, SamplingParams
from gpt2fast.checkpoint import load_checkpoint
from gpt2fast.errors import CheckpointError

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
    shutil.copy(FIXTURE / "encoder.json", folder / "vocab.json")  # the same 300-token vocabulary, HF's names
    shutil.copy(FIXTURE / "vocab.bpe", folder / "merges.txt")
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


# ---- issue 13: non-finite weights, huge hparams, paths out of the folder, unreadable files ----


@pytest.fixture
def folder(tmp_path) -> Path:
    return shutil.copytree(FIXTURE, tmp_path / "openai-tiny")


def poke_float(folder: Path, tf_name: str, index: int, value: float) -> None:
    """Overwrite one float32 of a variable in the data file, at the offset the index gives."""
    from gpt2fast.checkpoint.tf_bundle import _read_index

    _, _, entries = _read_index(folder / "model.ckpt.index")
    with open(folder / "model.ckpt.data-00000-of-00001", "r+b") as f:
        f.seek(entries[tf_name].offset + 4 * index)
        f.write(np.float32(value).tobytes())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(folder, bad):
    poke_float(folder, "model/h0/ln_1/g", 5, bad)
    with pytest.raises(CheckpointError, match=r"model.ckpt: tensor 'model/h0/ln_1/g' holds 1 NaN/inf value\(s\), "
                                              r"first at index \(5,\)"):
        load_checkpoint(str(folder))


def set_hparams(folder: Path, **fields) -> None:
    path = folder / "hparams.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def test_hparams_with_more_layers_than_the_index(folder, monkeypatch):
    """Checked against the index's shapes before any data is read."""
    from gpt2fast.checkpoint import tf_bundle

    set_hparams(folder, n_layer=40)
    monkeypatch.setattr(tf_bundle, "_read_tensor", lambda *args: pytest.fail("read data before checking hparams"))
    with pytest.raises(CheckpointError, match=r"the config says n_layer=40 but the weights hold 2 layer\(s\)"):
        load_checkpoint(str(folder))
    set_hparams(folder, n_layer=2, n_ctx=1000)
    with pytest.raises(CheckpointError, match=r"'model/wpe' has shape \(32, 48\), expected \(1000, 48\)"):
        load_checkpoint(str(folder))


@pytest.mark.parametrize("field, value", [("n_layer", 10**7), ("n_ctx", 10**9), ("n_vocab", 10**10)])
def test_huge_hparams_fail_at_once(folder, field, value):
    set_hparams(folder, **{field: value})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"hparams.json: GPT2Config.\w+ is {value}, more than gpt2fast's limit"):
        load_checkpoint(str(folder))
    assert time.perf_counter() - start < 5


def write_state(folder: Path, path: str) -> None:
    (folder / "checkpoint").write_text(f'model_checkpoint_path: "{path}"\n')


@pytest.mark.parametrize("named", ["../x/model.ckpt", "{outside}/model.ckpt", "sub/../../x/model.ckpt",
                                   "link/model.ckpt", "datalink"])
def test_checkpoint_file_may_not_name_a_prefix_outside_the_folder(folder, tmp_path, named):
    """An OpenAI ``checkpoint`` naming a valid checkpoint elsewhere used to be followed."""
    outside = shutil.copytree(FIXTURE, tmp_path / "x")
    (folder / "link").symlink_to(outside, target_is_directory=True)
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        (folder / name).unlink()  # no stale-path fallback inside the folder
    (folder / "datalink.index").symlink_to(outside / "model.ckpt.index")
    (folder / "datalink.data-00000-of-00001").symlink_to(outside / "model.ckpt.data-00000-of-00001")
    named = named.format(outside=outside)
    write_state(folder, named)
    with pytest.raises(CheckpointError, match=r"checkpoint: names '.*', which (is|leads) outside"):
        load_checkpoint(str(folder))


def test_checkpoint_file_naming_a_huge_path(folder):
    write_state(folder, "a" * 100_000)
    with pytest.raises(CheckpointError, match=r"checkpoint: names 'a{60}\.\.\.a{40} \(100000 characters\)', which is "
                                              "not a usable file name"):
        load_checkpoint(str(folder))


def test_checkpoint_file_naming_a_long_component(folder):
    write_state(folder, "a" * 300)  # under the length limit, over the OS's 255 bytes per name
    with pytest.raises(CheckpointError, match=r"checkpoint: names 'a{60}.*', but .* does not exist"):
        load_checkpoint(str(folder))


def test_absolute_path_inside_the_folder_is_followed(folder):
    write_state(folder, str(folder / "model.ckpt"))
    assert load_checkpoint(str(folder)).config.vocab_size == 300


@pytest.mark.parametrize("file_name", ["hparams.json", "encoder.json"])
def test_deeply_nested_json_names_the_file(folder, file_name):
    (folder / file_name).write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=rf"{file_name}: cannot read .*JSON nested too deeply"):
        LLM(str(folder), device="cpu")


def test_folder_without_its_vocab_files(folder):
    (folder / "vocab.bpe").unlink()
    with pytest.raises(CheckpointError, match=r"has 300 tokens, not GPT-2's 50257.*it has only encoder.json"):
        LLM(str(folder), device="cpu")
